"""(IA)^3 (Liu et al. 2022): learned vectors that rescale activations, as HF PEFT does.

    output scaling:       y = (x W^T + b) * l          l: (out, 1), PEFT key ``ia3_l``
    feedforward targets:  y = (x * l) W^T + b          l: (1, in)

Init is all ones (the adapted model equals the base), or random for ``init: random``
(PEFT's ``init_ia3_weights=False``). With no ``targets``/``feedforward`` the defaults are
PEFT's per model type.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any, ClassVar

import torch
from torch import fx, nn

from peftc.errors import CheckpointError, PeftcError, SpecError
from peftc.graph import Inserter, as_linear_site, mount_adapter
from peftc.passes.pipeline import SITES, PassContext, PassResult
from peftc.spec import MethodSpec, check_targets, register_method

__all__ = ["IA3Spec", "IA3Vector", "rewrite", "DEFAULT_TARGETS", "DEFAULT_FEEDFORWARD"]

aten = torch.ops.aten

# PEFT's defaults (target modules, feedforward modules) for the families peftc is tested on.
DEFAULT_TARGETS = {
    "llama": ["k_proj", "v_proj", "down_proj"], "mistral": ["k_proj", "v_proj", "down_proj"],
    "qwen2": ["q_proj", "v_proj", "down_proj"], "qwen3": ["q_proj", "v_proj", "down_proj"],
    "gemma": ["q_proj", "v_proj", "down_proj"], "gemma2": ["q_proj", "v_proj", "down_proj"],
    "phi": ["q_proj", "v_proj", "fc2"], "opt": ["q_proj", "k_proj", "fc2"],
    "gpt2": ["c_attn", "mlp.c_proj"], "bert": ["key", "value", "output.dense"],
    "roberta": ["key", "value", "output.dense"], "t5": ["k", "v", "wo"],
}
DEFAULT_FEEDFORWARD = {
    "llama": ["down_proj"], "mistral": ["down_proj"], "qwen2": ["down_proj"], "qwen3": ["down_proj"],
    "gemma": ["down_proj"], "gemma2": ["down_proj"], "phi": ["fc2"], "opt": ["fc2"],
    "gpt2": ["mlp.c_proj"], "bert": ["output.dense"], "roberta": ["output.dense"], "t5": ["wo"],
}


def _model_type(model: nn.Module, table: dict, field: str) -> list[str]:
    mt = getattr(getattr(model, "config", None), "model_type", None)
    if mt not in table:
        raise SpecError(f"ia3.{field}", None, f"explicit module names (no default for model type {mt!r}; "
                        f"defaults exist for {sorted(table)})")
    return table[mt]


@register_method("ia3", peft_type="IA3")
@dataclass(frozen=True)
class IA3Spec(MethodSpec):
    """``targets``/``feedforward``: selectors (None = PEFT's default for the model type)."""

    targets: Any = None
    feedforward: Any = None
    exclude: Any = None
    init: str = "ones"

    sites: ClassVar[str] = "linear"

    def __post_init__(self):
        object.__setattr__(self, "targets", check_targets("ia3.targets", self.targets, allow_none=True))
        object.__setattr__(self, "exclude", check_targets("ia3.exclude", self.exclude, allow_none=True))
        ff = self.feedforward
        if ff is not None and not (isinstance(ff, str) or isinstance(ff, (list, tuple))):
            self._err("feedforward", "a list of module names/suffixes, 're:<regex>' or null")
        if isinstance(ff, list):
            object.__setattr__(self, "feedforward", tuple(ff))
        if isinstance(self.targets, tuple) and isinstance(self.feedforward, tuple):
            extra = [f for f in self.feedforward if f not in self.targets]
            if extra:
                self._err("feedforward", f"a subset of targets {list(self.targets)}", f"{extra} are not targets")
        if self.init not in ("ones", "random"):
            self._err("init", "'ones' or 'random'")

    def default_targets(self, model: nn.Module):
        return tuple(_model_type(model, DEFAULT_TARGETS, "targets"))

    def is_feedforward(self, path: str, model: nn.Module) -> bool:
        ff = self.feedforward if self.feedforward is not None else _model_type(model, DEFAULT_FEEDFORWARD, "feedforward")
        if isinstance(ff, str):
            return re.fullmatch(ff[3:] if ff.startswith("re:") else ff, path) is not None
        return any(path.endswith(f) for f in ff)  # PEFT: plain suffix, no dot boundary

    def fold(self, path: str, module: nn.Module, w: torch.Tensor, b, transposed: bool):
        """Merged weight (merge.py): rows (or, feedforward, columns) scaled; bias too on rows."""
        v, ff = module.ia3_l.flatten(), module.feedforward
        if transposed:  # Conv1D stores (in, out)
            w2 = w * (v[:, None] if ff else v[None, :])
        else:
            w2 = w * (v[None, :] if ff else v[:, None])
        return w2, (b * v if b is not None and not ff else None)

    @classmethod
    def from_peft(cls, cfg: Mapping) -> list[MethodSpec]:
        from peftc.passes.train import TrainSpec

        def sel(v):
            if v is None or isinstance(v, (list, tuple, set)):
                return tuple(sorted(v)) if v is not None else None
            return "re:" + v
        entry = cls(targets=sel(cfg.get("target_modules")), feedforward=sel(cfg.get("feedforward_modules")),
                    exclude=sel(cfg.get("exclude_modules")),
                    init="ones" if cfg.get("init_ia3_weights", True) else "random")
        save = [m for m in cfg.get("modules_to_save") or () if not (cfg.get("task_type") == "SEQ_CLS"
                                                                   and m in ("classifier", "score"))]
        return [entry] + ([TrainSpec(targets=tuple(save))] if save else [])

    @classmethod
    def to_peft(cls, entries: list, resolved: list[dict[str, str]], model: nn.Module) -> dict:
        """Exact module paths, so the checkpoint does not depend on PEFT's default tables."""
        paths = sorted(p for t in resolved for p in t)
        ff = sorted(p for e, t in zip(entries, resolved) for p in t if e.is_feedforward(p, model))
        inits = {e.init for e in entries}
        if len(inits) > 1:
            raise CheckpointError("IA3 entries differ in 'init'; one PEFT IA3Config cannot express that")
        return {"peft_type": "IA3", "target_modules": paths, "feedforward_modules": ff,
                "exclude_modules": None, "init_ia3_weights": inits == {"ones"},
                "fan_in_fan_out": any(k == "conv1d" for t in resolved for k in t.values())}


class IA3Vector(nn.Module):
    """One (IA)^3 vector, shaped as PEFT stores it: (out, 1), or (1, in) on feedforward layers."""

    def __init__(self, shape: tuple[int, int], init: str, like: torch.Tensor, feedforward: bool):
        super().__init__()
        self.feedforward = feedforward
        v = torch.randn(shape, dtype=like.dtype, device=like.device)
        self.ia3_l = nn.Parameter(torch.ones_like(v) if init == "ones" else v)


def rewrite(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    """Pre: linear nodes annotated with IA3 entries. Post: their output (or, on feedforward
    layers, their input) is multiplied by the flattened vector."""
    adapter = ctx.spec.adapter
    if ctx.sample_mask:
        raise PeftcError("a mixed batch (per-sample adapter_names) works with the LoRA family only; "
                         f"adapter {adapter!r} uses ia3")
    n = 0
    for node in list(gm.graph.nodes):
        for i in node.meta.get(SITES, ()):
            entry = ctx.spec.methods[i]
            if not isinstance(entry, IA3Spec):
                continue
            site = as_linear_site(node)
            weight = gm.get_parameter(site.weight.target)
            in_f, out_f = weight.shape if site.transposed else weight.shape[::-1]
            ff = entry.is_feedforward(site.module, ctx.model)
            shape = (1, in_f) if ff else (out_f, 1)
            path = mount_adapter(ctx.store, gm, f"{site.module}.ia3.{adapter}",
                                 partial(IA3Vector, shape, entry.init, weight, ff))
            info = {"method": "ia3", "adapter": adapter, "module": site.module}
            ins = Inserter(node, info, before=ff)
            vec = ins.call(aten.reshape.default, (ins.get_attr(f"{path}.ia3_l"), [-1]), "flatten")
            if ff:  # y = (x * l) W^T + b
                scaled = ins.call(aten.mul.Tensor, (site.x, vec), "scale_input")
                node.replace_input_with(site.x, scaled)
            else:  # y = (x W^T + b) * l
                out = ins.call(aten.mul.Tensor, (node, vec), "scale_output")
                ins.redirect(node, out)
            n += 1
    ctx.counts["ia3"] += n
    return PassResult(gm, n > 0)
