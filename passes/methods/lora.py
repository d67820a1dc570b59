"""LoRA (Hu et al. 2021) as a graph rewrite, with HF PEFT's exact numerics.

    y = x W^T + b  ->  y + s * B(A(dropout(x))),   s = alpha / r   (rsLoRA: alpha / sqrt(r))

``dora: true`` adds DoRA's magnitude rescaling (passes/methods/dora.py). ``gate: true`` is UniPELT's
gated LoRA as AdapterHub computes it: the gate replaces the scaling,
``y + g(x) * B(A(dropout(x)))`` with ``g(x) = mean_seq sigmoid(x W_g^T + b_g)`` per sample.

A: (r, in), B: (out, r), the same shapes and init as PEFT (A kaiming-uniform(a=sqrt 5) or
normal(std=1/r) for ``init: gaussian``, B zero; ``init: random`` keeps both random, PEFT's
``init_lora_weights=False``). For GPT-2's Conv1D the graph computes ``addmm(b, x2d, W)`` with
W stored (in, out); the low-rank path reads the same 2-D view, so A and B keep PEFT's shapes.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import fx, nn

from peftc.errors import CheckpointError, PeftcError, SpecError
from peftc.graph import Inserter
from peftc.passes.context import PassContext
from peftc.passes.dtype_policy import cast
from peftc.passes.methods.dora import insert_dora, weight_norm
from peftc.passes.methods.gates import init_gate, insert_gate, tokens_3d
from peftc.passes.methods.linear import LinearMethod, LinearTarget, sample_rows
from peftc.passes.methods.train import TrainSpec
from peftc.passes.pipeline import register_method
from peftc.peft_files import PREFIX
from peftc.spec import MethodSpec, check_layer_selection, check_targets

__all__ = ["LoraSpec", "LoraLinear", "rewrite", "pattern_value", "INITS", "BIAS"]

aten = torch.ops.aten
INITS = ("default", "gaussian", "random")
BIAS = ("none", "all", "lora_only")


_PEFT_UNSUPPORTED = {  # LoraConfig fields peftc does not implement: value must be the default
    "lora_bias": lambda v: not v,
    "layer_replication": lambda v: not v, "trainable_token_indices": lambda v: not v,
    "use_qalora": lambda v: not v, "alora_invocation_tokens": lambda v: not v,
    "megatron_config": lambda v: not v, "loftq_config": lambda v: not v,
    "arrow_config": lambda v: not v, "use_bdlora": lambda v: not v,
}


def pattern_value(patterns: Mapping, path: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup: first key matching a dotted suffix."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", path):
            return value
    return default


@register_method("lora", peft_type="LORA", phase="reparameterize")
@dataclass(frozen=True)
class LoraSpec(LinearMethod):
    """``targets``: names/suffixes, "re:<regex>" or "all-linear"; ``alpha``: scaling numerator."""

    targets: Any
    r: int = 8
    alpha: float = 8
    dropout: float = 0.0
    rslora: bool = False
    dora: bool = False
    init: str = "default"
    bias: str = "none"
    exclude: Any = None
    layers: Any = None
    layers_pattern: Any = None
    rank_pattern: Mapping = field(default_factory=dict)
    alpha_pattern: Mapping = field(default_factory=dict)
    gate: bool = False

    mixed_batch: ClassVar[bool] = True

    def __post_init__(self):
        object.__setattr__(self, "targets", check_targets("lora.targets", self.targets))
        object.__setattr__(self, "exclude", check_targets("lora.exclude", self.exclude, allow_none=True))
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            self.reject("r", "an integer > 0")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or self.alpha <= 0:
            self.reject("alpha", "a number > 0")
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            self.reject("dropout", "a number in [0, 1)")
        if not isinstance(self.rslora, bool):
            self.reject("rslora", "true or false")
        if not isinstance(self.dora, bool):
            self.reject("dora", "true or false")
        if self.init not in INITS:
            self.reject("init", f"one of {list(INITS)}")
        if not isinstance(self.gate, bool) or (self.gate and self.dora):
            self.reject("gate", "true or false (and false with dora)")
        if self.bias not in BIAS:
            self.reject("bias", f"one of {list(BIAS)}")
        check_layer_selection(self)
        if isinstance(self.targets, str) and (self.layers is not None or self.layers_pattern is not None):
            self.reject("layers", "unset when targets is a regex or all-linear (as in PEFT): use a name list")
        for name, ok in (("rank_pattern", lambda v: isinstance(v, int) and v > 0),
                         ("alpha_pattern", lambda v: isinstance(v, (int, float)) and v > 0)):
            pat = getattr(self, name)
            if not isinstance(pat, Mapping) or not all(isinstance(k, str) and ok(v) for k, v in pat.items()):
                self.reject(name, "a mapping of module-name pattern -> positive number")

    def rank_for(self, path: str) -> int:
        return pattern_value(self.rank_pattern, path, self.r)

    def scaling_for(self, path: str) -> float:
        r, alpha = self.rank_for(path), pattern_value(self.alpha_pattern, path, self.alpha)
        return alpha / math.sqrt(r) if self.rslora else alpha / r

    # ---- HF PEFT LoraConfig <-> LoraSpec ----------------------------------------------------
    @classmethod
    def from_peft(cls, cfg: Mapping) -> list[MethodSpec]:
        """LoraConfig dict -> [LoraSpec] (+ a TrainSpec for modules_to_save)."""
        for key, ok in _PEFT_UNSUPPORTED.items():
            if key in cfg and not ok(cfg[key]):
                raise SpecError(f"peft.{key}", cfg[key], "its PEFT default", "not supported by peftc's LoRA")
        tm = cfg.get("target_modules")
        inits = {True: "default", "gaussian": "gaussian", False: "random"}
        init = cfg.get("init_lora_weights", True)
        if init not in inits:
            raise SpecError("peft.init_lora_weights", init, "true, false or 'gaussian'")
        from peftc.passes.methods.lora_params import LoraParamsSpec  # it reads LoRA's config, LoRA saves it

        params = LoraParamsSpec.from_lora_config(cfg, inits[init])
        if not tm and params:  # LoRA on parameters only
            return [*params, *TrainSpec.from_modules_to_save(cfg)]
        if isinstance(tm, str):
            targets = "all-linear" if tm.lower() == "all-linear" else "re:" + tm
        elif tm:
            targets = tuple(sorted(tm))
        else:
            raise SpecError("peft.target_modules", tm, "a list of module names or a regex string")
        ex = cfg.get("exclude_modules")
        lora = cls(
            targets=targets, r=cfg.get("r", 8), alpha=cfg.get("lora_alpha", 8),
            dropout=cfg.get("lora_dropout", 0.0), rslora=bool(cfg.get("use_rslora", False)),
            dora=bool(cfg.get("use_dora", False)),
            init=inits[init], bias=cfg.get("bias", "none"),
            exclude=("re:" + ex if isinstance(ex, str) else tuple(ex)) if ex else None,
            layers=tuple(cfg["layers_to_transform"]) if isinstance(cfg.get("layers_to_transform"), list)
            else cfg.get("layers_to_transform"),
            layers_pattern=tuple(cfg["layers_pattern"]) if isinstance(cfg.get("layers_pattern"), list)
            else cfg.get("layers_pattern"),
            rank_pattern=dict(cfg.get("rank_pattern") or {}),
            alpha_pattern=dict(cfg.get("alpha_pattern") or {}),
        )
        return [lora, *params, *TrainSpec.from_modules_to_save(cfg)]

    @classmethod
    def to_peft(cls, entries: list[LoraSpec], resolved: list[dict[str, str]], model: nn.Module) -> dict:
        """[LoraSpec] (+ the module paths each resolved to) -> LoraConfig fields.

        One entry keeps its selectors; several become PEFT's exact-path target list with
        rank_pattern / alpha_pattern for the modules whose rank or alpha differ.
        """
        first = entries[0]
        if any(e.gate for e in entries):
            raise CheckpointError("a gated LoRA (UniPELT) has no HF PEFT checkpoint format")
        for e in entries[1:]:
            for f in ("dropout", "rslora", "dora", "init", "bias"):
                if getattr(e, f) != getattr(first, f):
                    raise CheckpointError(
                        f"LoRA entries differ in {f!r} ({getattr(first, f)!r} vs {getattr(e, f)!r}); "
                        "one PEFT LoraConfig cannot express that: save them as separate adapters")
        cfg = {
            "peft_type": "LORA", "r": first.r, "lora_alpha": first.alpha,
            "lora_dropout": first.dropout, "use_rslora": first.rslora, "bias": first.bias,
            "init_lora_weights": {"default": True, "gaussian": "gaussian", "random": False}[first.init],
            "fan_in_fan_out": any(k == "conv1d" for t in resolved for k in t.values()),
            "use_dora": first.dora, "lora_bias": False,
        }
        if len(entries) == 1:
            t = first.targets
            cfg["target_modules"] = t if t == "all-linear" else t[3:] if isinstance(t, str) else list(t)
            ex = first.exclude
            cfg["exclude_modules"] = None if ex is None else ex[3:] if isinstance(ex, str) else list(ex)
            cfg["layers_to_transform"] = list(first.layers) if isinstance(first.layers, tuple) else first.layers
            cfg["layers_pattern"] = list(first.layers_pattern) if isinstance(first.layers_pattern, tuple) \
                else first.layers_pattern
            cfg["rank_pattern"], cfg["alpha_pattern"] = dict(first.rank_pattern), dict(first.alpha_pattern)
            return cfg
        paths = {p: e for e, t in zip(entries, resolved) for p in t}
        cfg["target_modules"] = sorted(paths)
        rank = {p: e.rank_for(p) for p, e in paths.items()}
        alpha = {p: pattern_value(e.alpha_pattern, p, e.alpha) for p, e in paths.items()}
        cfg["rank_pattern"] = {re.escape(p): v for p, v in rank.items() if v != first.r}
        cfg["alpha_pattern"] = {re.escape(p): v for p, v in alpha.items() if v != first.alpha}
        return cfg

    # ---- the rewrite (passes/methods/linear.py): parameters and the term added to y -----------------
    autocast: ClassVar[bool] = True  # PEFT upcasts LoRA / DoRA adapters on bf16/fp16 bases

    def make_module(self, target: LinearTarget, ctx: PassContext) -> nn.Module:
        dora_scaling = self.scaling_for(target.module) if self.dora else None
        return LoraLinear(target.in_features, target.out_features, self.rank_for(target.module), self.init,
                          target.weight, dora_scaling, target.site.transposed, self.gate)

    def delta(self, ins: Inserter, target: LinearTarget, path: str, ctx: PassContext) -> fx.Node:
        """``s * B(A(drop(x)))`` (DoRA: its rescaled term; gated: ``g(x) * B(A(drop(x)))``). The
        dropout node comes right after the base linear, as PEFT calls it, so random streams
        line up with PEFT's in training."""
        site, scaling = target.site, self.scaling_for(target.module)
        a = ins.get_attr(f"{path}.lora_A.weight")
        b = ins.get_attr(f"{path}.lora_B.weight")
        x = target.input(ins)  # x.to(A.dtype), as PEFT (passes/dtype_policy.py)
        if self.dropout > 0:
            x = ins.call(aten.dropout.default, (x, float(self.dropout), True), "dropout")
        h = ins.call(aten.linear.default, (x, a), "lora_A")
        d = ins.call(aten.linear.default, (h, b), "lora_B")
        if self.dora:
            return insert_dora(ins, site, x, d, a, b, f"{path}.lora_magnitude_vector", scaling,
                               recompute_base=self.dropout > 0, dtype=target.dtype if target.upcast else None)
        if self.gate:
            g3 = tokens_3d(site.x)
            g3 = cast(ins, g3, target.dtype, "cast_in") if target.upcast else g3
            g = insert_gate(ins, g3, f"{path}.gate.weight", f"{path}.gate.bias")
            rows = ins.call(sample_rows, (ins.call(aten.view.default, (g, [-1]), "gate_flat"), d), "gate_rows")
            return ins.call(aten.mul.Tensor, (d, rows), "gated")
        return ins.call(aten.mul.Tensor, (d, scaling), "scale")

    @classmethod
    def peft_base_tensors(cls, adapters, adapter: str) -> dict[str, nn.Parameter]:
        """PEFT's LoRA ``bias``: "all" trains every bias, "lora_only" those of adapted layers.

        Keys follow PEFT's module wrapping: ``<path>.base_layer.bias`` for an adapted layer;
        inside a module trained whole PEFT also saves ``original_module``/``modules_to_save``.
        """
        lora = adapters.entries(adapter, cls)
        modes = {m.bias for m, _ in lora}
        if modes <= {"none"}:
            return {}
        lora_paths = {p for _, t in lora for p in t}
        whole = [(type(m), p) for m, t in adapters.entries(adapter) if m.owns_modules for p in t]
        out = {}
        for name, param in adapters.base_model.named_parameters():
            path, _, leaf = name.rpartition(".")
            if not ("all" in modes and "bias" in name or "lora_only" in modes and leaf == "bias" and path in lora_paths):
                continue
            owner, root = next(((c, w) for c, w in whole if name.startswith(w + ".")), (None, None))
            if root is None:
                out[PREFIX + (f"{path}.base_layer.{leaf}" if path in lora_paths else name)] = param
                continue
            rel = name[len(root) + 1:]
            out[f"{PREFIX}{root}.original_module.{rel}"] = param
            out[f"{PREFIX}{root}.modules_to_save.{rel}"] = adapters.store.get_parameter(
                f"{root}.{owner.store_dir}.{adapter}.{rel}")
        return out

    # ---- merging (peftc/merging.py) ---------------------------------------------------------
    def fold(self, path: str, module: nn.Module, w: torch.Tensor, b, transposed: bool):
        """Merged weight (merge.py): W + s B A, and DoRA's row rescaling."""
        if self.gate:
            raise PeftcError("a gated LoRA depends on its input: it cannot be merged into the weight")
        s = self.scaling_for(path)
        delta = module.lora_B.weight @ module.lora_A.weight
        adapted = (w.t() if transposed else w) + s * delta
        if self.dora:
            adapted = (module.lora_magnitude_vector / torch.linalg.norm(adapted, dim=1))[:, None] * adapted
        return (adapted.t() if transposed else adapted).to(w.dtype), None

    def to_dict(self) -> dict:
        d = super().to_dict()
        d["rank_pattern"], d["alpha_pattern"] = dict(self.rank_pattern), dict(self.alpha_pattern)
        return {k: v for k, v in d.items() if v not in (None, {}) or k == "targets"}


class LoraLinear(nn.Module):
    """The parameters of one LoRA adapter on one linear layer (PEFT's names and shapes)."""

    def __init__(self, in_features: int, out_features: int, r: int, init: str, like: torch.Tensor,
                 dora_scaling: float | None = None, transposed: bool = False, gate: bool = False):
        super().__init__()
        kw = {"dtype": like.dtype, "device": like.device}
        self.lora_A = nn.Linear(in_features, r, bias=False, **kw)
        self.lora_B = nn.Linear(r, out_features, bias=False, **kw)
        if init == "default":
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B.weight)
        elif init == "gaussian":
            nn.init.normal_(self.lora_A.weight, std=1 / r)
            nn.init.zeros_(self.lora_B.weight)
        if gate:  # UniPELT's gate, AdapterHub's name and init
            self.gate = nn.Linear(in_features, 1, **kw)
            init_gate(self.gate, zero_bias=False)
        if dora_scaling is not None:  # DoRA's magnitude, PEFT's name and init
            with torch.no_grad():
                w = like.t() if transposed else like
                norm = weight_norm(w, self.lora_A.weight, self.lora_B.weight, dora_scaling)
            self.lora_magnitude_vector = nn.Parameter(norm.to(like.dtype))


rewrite = LoraSpec.rewrite  # the method's pass (passes/methods/linear.py's skeleton)
