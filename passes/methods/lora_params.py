"""LoRA on parameters (PEFT's ``target_parameters``): MoE experts stored as fused 3-D tensors
and routers, with HF PEFT's exact numerics, names and checkpoint keys.

Where LoRA adds ``s B(A(x))`` to a linear's output, this adapts the parameter itself, wherever
the graph reads it (``get_attr W``), as PEFT's ``ParamWrapper`` parametrizes it:

    2-D W (out, in):        W -> W + s * B @ A                     A: (r, in), B: (out, r)
    3-D W (E, d1, d2):      W -> baddbmm(W, B_e, A_e, alpha=s)     A: (r*E, d2), B: (d1, r*E)
                            A_e = A.view(E, r, d2), B_e = B.view(d1, r, E).permute(2, 0, 1)

(a 3-D parameter of a module with ``is_transposed`` is (E, in, out): W + s * A_e^T @ B_e^T).
s = alpha / r (rsLoRA: alpha / sqrt(r)); r and alpha per parameter from ``rank_pattern`` /
``alpha_pattern`` matched against the parameter's full name, as PEFT does.

transformers 5 fuses Mixtral-style experts (``experts.gate_up_proj``, ``experts.down_proj``)
and makes the router a custom module (``gate.weight``); on those families PEFT's ``all-linear``
adds the three as target parameters, with rank and alpha doubled on ``gate_up_proj`` (two
former projections). ``implied_entries`` does the same, so ``all-linear`` equals PEFT's.

Checkpoint keys: parameter p of module M is ``M.lora_A.weight`` when p is the last targeted
parameter of M in registration order, ``M.base_layer.lora_A.weight`` for the one before, and
so on (PEFT nests one ParamWrapper per parameter). A PEFT LoraConfig saves the entries as its
``target_parameters`` field (``peft_field``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any, ClassVar

import torch
from torch import fx, nn

from peftc.errors import CheckpointError, SpecError
from peftc.graph import Inserter, mount_adapter
from peftc.passes.context import PassContext, PassResult, marked_nodes
from peftc.passes.methods.lora import pattern_value
from peftc.passes.pipeline import register_method
from peftc.spec import MethodSpec, Sites
from peftc.targets import match_parameters

__all__ = ["LoraParamsSpec", "ParamLora", "rewrite", "fuses_experts", "MOE_PARAMETERS"]

aten = torch.ops.aten
STORE = "lora_params"
MOE_PARAMETERS = {"gate.weight": 1, "gate_up_proj": 2, "down_proj": 1}  # PEFT's all-linear on fused MoE: -> rank factor


def fuses_experts(model: nn.Module) -> bool:
    """Whether PEFT's ``all-linear`` adds the experts and router as target parameters on this
    model: transformers 5 families converted like Mixtral or Qwen2-MoE from v4 checkpoints
    (Mixtral, Qwen3-MoE, OLMoE, ...; PEFT reads transformers' conversion table)."""
    mt = getattr(getattr(model, "config", None), "model_type", None)
    try:
        from transformers.conversion_mapping import (
            _MODEL_TO_CONVERSION_PATTERN,
            get_checkpoint_conversion_mapping,
        )
    except ImportError:  # transformers 4: experts are nn.Linear modules, all-linear finds them
        return False
    family = {**_MODEL_TO_CONVERSION_PATTERN, "mixtral": "mixtral"}.get(mt)
    return family in ("mixtral", "qwen2_moe") and get_checkpoint_conversion_mapping(mt) is not None


@register_method("lora_params", store_dir=STORE, phase="reparameterize")
@dataclass(frozen=True)
class LoraParamsSpec(MethodSpec):
    """``targets``: parameter names or dotted suffixes (``experts.gate_up_proj``, ``gate.weight``)."""

    targets: Any
    r: int = 8
    alpha: float = 8
    rslora: bool = False
    init: str = "default"
    rank_pattern: Mapping = field(default_factory=dict)
    alpha_pattern: Mapping = field(default_factory=dict)

    sites: ClassVar[Sites] = Sites.PARAMETER
    kinds: ClassVar[tuple[str, ...]] = ("parameter",)
    peft_field: ClassVar[str] = "target_parameters"

    def __post_init__(self):
        t = self.targets
        if isinstance(t, str) or not (isinstance(t, (list, tuple)) and t and all(isinstance(v, str) and v for v in t)):
            self.reject("targets", "a non-empty list of parameter names or dotted suffixes (as PEFT's target_parameters)")
        object.__setattr__(self, "targets", tuple(t))
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            self.reject("r", "an integer > 0")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or self.alpha <= 0:
            self.reject("alpha", "a number > 0")
        if not isinstance(self.rslora, bool):
            self.reject("rslora", "true or false")
        if self.init not in ("default", "gaussian", "random"):
            self.reject("init", "one of ['default', 'gaussian', 'random']")
        for name in ("rank_pattern", "alpha_pattern"):
            pat = getattr(self, name)
            if not isinstance(pat, Mapping) or not all(isinstance(k, str) and v > 0 for k, v in pat.items()):
                self.reject(name, "a mapping of parameter-name pattern -> positive number")

    def rank_for(self, name: str) -> int:
        return pattern_value(self.rank_pattern, name, self.r)

    def scaling_for(self, name: str) -> float:
        r, alpha = self.rank_for(name), pattern_value(self.alpha_pattern, name, self.alpha)
        return alpha / math.sqrt(r) if self.rslora else alpha / r

    # ---- PEFT's LoraConfig: implied by all-linear, read from and written to target_parameters
    @classmethod
    def implied_entries(cls, spec, model) -> list[MethodSpec]:
        """PEFT's ``all-linear`` on a fused-MoE model adds the experts and the router."""
        if any(isinstance(m, cls) for m in spec.methods) or not fuses_experts(model):
            return []
        names = [n for n, _ in model.named_parameters()]
        out = []
        for m in spec.methods:
            if m.method == "lora" and m.targets == "all-linear":
                found = [p for p in MOE_PARAMETERS if match_parameters((p,), names)]
                if not found:
                    continue
                refused = [f for f, on in (("dropout", m.dropout > 0), ("dora", m.dora), ("gate", m.gate)) if on]
                if refused:  # PEFT's ParamWrapper raises for these too
                    raise SpecError(f"lora.{refused[0]}", getattr(m, refused[0]), "its default with all-linear here",
                                    f"all-linear on {model.config.model_type} also adapts the experts and router "
                                    "as parameters, which take no dropout, DoRA or gate (as in PEFT); name the "
                                    "target modules instead")
                doubled = {rf".*\.{re.escape(p)}": f for p, f in MOE_PARAMETERS.items() if f > 1 and p in found}
                out.append(cls(targets=tuple(found), r=m.r, alpha=m.alpha, rslora=m.rslora, init=m.init,
                               rank_pattern={**m.rank_pattern, **{k: m.r * f for k, f in doubled.items()}},
                               alpha_pattern={**m.alpha_pattern, **{k: m.alpha * f for k, f in doubled.items()}}))
        return out

    @classmethod
    def from_lora_config(cls, cfg: Mapping, init: str) -> list[MethodSpec]:
        """A LoraConfig's ``target_parameters`` (with its r, alpha, patterns) as an entry."""
        tp = cfg.get("target_parameters")
        if not tp:
            return []
        return [cls(targets=tuple(sorted(tp)), r=cfg.get("r", 8), alpha=cfg.get("lora_alpha", 8),
                    rslora=bool(cfg.get("use_rslora", False)), init=init,
                    rank_pattern=dict(cfg.get("rank_pattern") or {}), alpha_pattern=dict(cfg.get("alpha_pattern") or {}))]

    @classmethod
    def peft_field_value(cls, entries: list, resolved: list[dict[str, str]], cfg: dict):
        """``target_parameters`` of the LoraConfig ``cfg``; its r, alpha and patterns must hold
        for these entries too (PEFT applies one config to modules and parameters)."""
        if not entries:
            return None
        if cfg.get("peft_type") != "LORA":
            raise CheckpointError(f"target_parameters are a LoRA field; the adapter's PEFT method is {cfg.get('peft_type')}")
        for e in entries:
            for ours, theirs in (("r", "r"), ("alpha", "lora_alpha"), ("rslora", "use_rslora")):
                if getattr(e, ours) != cfg.get(theirs):
                    raise CheckpointError(f"lora_params {ours}={getattr(e, ours)!r} differs from the LoRA entry's "
                                          f"{cfg.get(theirs)!r}; one PEFT LoraConfig holds one value")
            for ours, theirs in (("rank_pattern", "rank_pattern"), ("alpha_pattern", "alpha_pattern")):
                merged = dict(cfg.get(theirs) or {})
                for k, v in getattr(e, ours).items():
                    if merged.setdefault(k, v) != v:
                        raise CheckpointError(f"{ours} {k!r}: {v} for lora_params, {merged[k]} for LoRA")
                cfg[theirs] = merged
        return sorted({t for e in entries for t in e.targets})

    # ---- the rewrite: W -> W + delta where the graph reads W ---------------------------------
    def make_module(self, name: str, weight: torch.Tensor, transposed: bool) -> ParamLora:
        return ParamLora(weight, self.rank_for(name), self.init, transposed)

    @classmethod
    def rewrite(cls, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        """Pre: ``get_attr`` nodes of targeted parameters annotated. Post: their users read
        ``W + delta``; ``ctx.counts["lora_params"]`` = parameters adapted."""
        adapter, n = ctx.spec.adapter, 0
        for node, _, entry in marked_nodes(gm, ctx, cls):
            name = node.target
            module, _, leaf = name.rpartition(".")
            weight = gm.get_parameter(name)
            transposed = bool(getattr(ctx.model.get_submodule(module), "is_transposed", False))
            path = mount_adapter(ctx.store, gm, f"{module}.{STORE}.{adapter}.{leaf}",
                                 partial(entry.make_module, name, weight, transposed))
            ParamLora.set_peft_keys(ctx, module, adapter, cls)
            ins = Inserter(node, {"method": cls.method, "adapter": adapter, "module": module, "site": name})
            ins.redirect(node, _adapted(ins, node, path, weight, entry.rank_for(name), entry.scaling_for(name),
                                        transposed))
            n += 1
        ctx.counts[cls.method] += n
        return PassResult(gm, n > 0)


def _adapted(ins: Inserter, w: fx.Node, path: str, weight: torch.Tensor, r: int, s: float,
             transposed: bool) -> fx.Node:
    a = ins.get_attr(f"{path}.lora_A.weight")
    b = ins.get_attr(f"{path}.lora_B.weight")
    if weight.dim() == 2:  # PEFT: W + (B @ A) * s
        delta = ins.call(aten.mul.Tensor, (ins.call(aten.mm.default, (b, a), "lora_BA"), s), "scale")
        return ins.call(aten.add.Tensor, (w, delta), "add")
    e, d1, d2 = weight.shape
    if transposed:  # (E, in, out): A_e^T (E, in, r) @ B_e^T (E, r, out)
        lhs = ins.call(aten.permute.default, (ins.call(aten.view.default, (a, [e, r, d1]), "lora_A_e"), [0, 2, 1]), "lhs")
        rhs = ins.call(aten.permute.default, (ins.call(aten.view.default, (b, [d2, r, e]), "lora_B_e"), [2, 1, 0]), "rhs")
    else:  # (E, out, in): B_e (E, out, r) @ A_e (E, r, in)
        lhs = ins.call(aten.permute.default, (ins.call(aten.view.default, (b, [d1, r, e]), "lora_B_e"), [2, 0, 1]), "lhs")
        rhs = ins.call(aten.view.default, (a, [e, r, d2]), "rhs")
    return ins.call(aten.baddbmm.default, (w, lhs, rhs), "add", {"alpha": s})


class ParamLora(nn.Module):
    """One parameter's LoRA factors, PEFT's names, shapes and init (nn.Linear A and B)."""

    def __init__(self, weight: torch.Tensor, r: int, init: str, transposed: bool = False):
        super().__init__()
        kw = {"dtype": weight.dtype, "device": weight.device}
        if weight.dim() == 2:
            e, (out_f, in_f) = 1, weight.shape
        elif weight.dim() == 3:
            e, d1, d2 = weight.shape
            in_f, out_f = (d1, d2) if transposed else (d2, d1)
        else:
            raise CheckpointError(f"LoRA on a parameter needs a 2-D or 3-D one, not {tuple(weight.shape)}")
        self.lora_A = nn.Linear(in_f, r * e, bias=False, **kw)
        self.lora_B = nn.Linear(r * e, out_f, bias=False, **kw)
        if init == "default":
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B.weight)
        elif init == "gaussian":
            nn.init.normal_(self.lora_A.weight, std=1 / r)
            nn.init.zeros_(self.lora_B.weight)

    @staticmethod
    def set_peft_keys(ctx: PassContext, module: str, adapter: str, kind: type) -> None:
        """PEFT keys of the adapted parameters of ``module``: one ``base_layer.`` per parameter
        targeted after it (PEFT wraps in registration order, the last one outermost)."""
        holder = ctx.store.get_submodule(f"{module}.{STORE}.{adapter}")
        targeted = {p for m, t in zip(ctx.spec.methods, ctx.targets) if isinstance(m, kind) for p in t}
        order = [n for n, _ in ctx.model.get_submodule(module).named_parameters(recurse=False)]
        adapted = [n for n in order if f"{module}.{n}" in targeted]
        for depth, leaf in enumerate(reversed(adapted)):
            if not hasattr(holder, leaf):
                continue
            for part in ("lora_A", "lora_B"):
                getattr(getattr(holder, leaf), part).PEFT_KEYS = {
                    "weight": f"base_model.model.{module}.{'base_layer.' * depth}{part}.weight"}


rewrite = LoraParamsSpec.rewrite
