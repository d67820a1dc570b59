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
from typing import Any, ClassVar

import torch
from torch import fx, nn

from peftc.errors import CheckpointError
from peftc.graph import Inserter
from peftc.passes import dtype_policy
from peftc.passes.context import PassContext
from peftc.passes.methods.linear import LinearMethod, LinearTarget
from peftc.passes.methods.train import TrainSpec
from peftc.passes.pipeline import register_method
from peftc.spec import MethodSpec, check_targets
from peftc.targets import for_model_type

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


@register_method("ia3", peft_type="IA3", phase="scale")
@dataclass(frozen=True)
class IA3Spec(LinearMethod):
    """``targets``/``feedforward``: selectors (None = PEFT's default for the model type)."""

    targets: Any = None
    feedforward: Any = None
    exclude: Any = None
    init: str = "ones"

    DEFAULT_TARGETS: ClassVar = DEFAULT_TARGETS
    autocast: ClassVar[bool] = True  # PEFT upcasts the (IA)^3 vectors on bf16/fp16 bases

    def __post_init__(self):
        object.__setattr__(self, "targets", check_targets("ia3.targets", self.targets, allow_none=True))
        object.__setattr__(self, "exclude", check_targets("ia3.exclude", self.exclude, allow_none=True))
        ff = self.feedforward
        if ff is not None and not (isinstance(ff, str) or isinstance(ff, (list, tuple))):
            self.reject("feedforward", "a list of module names/suffixes, 're:<regex>' or null")
        if isinstance(ff, list):
            object.__setattr__(self, "feedforward", tuple(ff))
        if isinstance(self.targets, tuple) and isinstance(self.feedforward, tuple):
            extra = [f for f in self.feedforward if f not in self.targets]
            if extra:
                self.reject("feedforward", f"a subset of targets {list(self.targets)}", f"{extra} are not targets")
        if self.init not in ("ones", "random"):
            self.reject("init", "'ones' or 'random'")

    def is_feedforward(self, path: str, model: nn.Module) -> bool:
        ff = self.feedforward if self.feedforward is not None else \
            for_model_type(model, DEFAULT_FEEDFORWARD, "ia3.feedforward")
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

    # ---- the rewrite (passes/methods/linear.py): the vector, and where it scales ---------------------
    def make_module(self, target: LinearTarget, ctx: PassContext) -> nn.Module:
        ff = self.is_feedforward(target.module, ctx.model)
        shape = (1, target.in_features) if ff else (target.out_features, 1)
        return IA3Vector(shape, self.init, target.weight, ff)

    def output(self, ins: Inserter, target: LinearTarget, path: str, ctx: PassContext) -> fx.Node | None:
        """Output scaling: ``(x W^T + b) * l`` read by y's users; feedforward: ``x * l`` fed to
        the linear itself (None: nothing to redirect)."""
        site = target.site
        if not self.is_feedforward(target.module, ctx.model):  # PEFT: (y * l).to(y.dtype)
            vec = ins.call(aten.reshape.default, (ins.get_attr(f"{path}.ia3_l"), [-1]), "flatten")
            return target.output_cast(ins, ins.call(aten.mul.Tensor, (site.node, vec), "scale_output"))
        before = Inserter(site.node, ins.info, before=True)  # PEFT: (x.to(l.dtype) * l).to(x.dtype)
        vec = before.call(aten.reshape.default, (before.get_attr(f"{path}.ia3_l"), [-1]), "flatten")
        scaled = before.call(aten.mul.Tensor, (target.input(before), vec), "scale_input")
        if target.upcast:
            scaled = dtype_policy.cast(before, scaled, dtype_policy.node_dtype(site.x, target.weight.dtype), "cast_out")
        site.node.replace_input_with(site.x, scaled)
        return None

    @classmethod
    def from_peft(cls, cfg: Mapping) -> list[MethodSpec]:
        def sel(v):
            if v is None or isinstance(v, (list, tuple, set)):
                return tuple(sorted(v)) if v is not None else None
            return "re:" + v
        entry = cls(targets=sel(cfg.get("target_modules")), feedforward=sel(cfg.get("feedforward_modules")),
                    exclude=sel(cfg.get("exclude_modules")),
                    init="ones" if cfg.get("init_ia3_weights", True) else "random")
        return [entry, *TrainSpec.from_modules_to_save(cfg)]

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


rewrite = IA3Spec.rewrite  # the method's pass (passes/methods/linear.py's skeleton)
