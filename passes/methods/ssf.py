"""SSF (Lian et al. 2022): scale and shift the features after each adapted linear layer.

    y = x W^T + b  ->  y * gamma + beta,    gamma = 1, beta = 0 at init (identity)

Mergeable: W' = gamma[:, None] W, b' = gamma * b + beta.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from peftc.graph import Inserter
from peftc.passes.context import PassContext
from peftc.passes.methods.linear import LinearMethod, LinearTarget
from peftc.passes.pipeline import register_method
from peftc.spec import check_targets

__all__ = ["SSFSpec", "ScaleShift", "rewrite"]

aten = torch.ops.aten


@register_method("ssf", phase="scale")
@dataclass(frozen=True)
class SSFSpec(LinearMethod):
    """``targets``: linear layers whose outputs get a learned per-channel scale and shift."""

    targets: Any = "all-linear"
    exclude: Any = None

    def __post_init__(self):
        object.__setattr__(self, "targets", check_targets("ssf.targets", self.targets))
        object.__setattr__(self, "exclude", check_targets("ssf.exclude", self.exclude, allow_none=True))

    def make_module(self, target: LinearTarget, ctx: PassContext) -> nn.Module:
        return ScaleShift(target.out_features, target.weight)

    def output(self, ins: Inserter, target: LinearTarget, path: str, ctx: PassContext) -> fx.Node:
        """``y * scale + shift``."""
        scale, shift = ins.get_attr(f"{path}.ssf_scale"), ins.get_attr(f"{path}.ssf_shift")
        return ins.call(aten.add.Tensor, (ins.call(aten.mul.Tensor, (target.site.node, scale), "scale"), shift),
                        "shift")

    def fold(self, path: str, module: nn.Module, w: torch.Tensor, b, transposed: bool):
        g = module.ssf_scale
        w2 = w * (g[None, :] if transposed else g[:, None])
        b2 = (b * g if b is not None else 0) + module.ssf_shift
        return w2, b2


class ScaleShift(nn.Module):
    def __init__(self, features: int, like: torch.Tensor):
        super().__init__()
        self.ssf_scale = nn.Parameter(torch.ones(features, dtype=like.dtype, device=like.device))
        self.ssf_shift = nn.Parameter(torch.zeros(features, dtype=like.dtype, device=like.device))


rewrite = SSFSpec.rewrite  # the method's pass (passes/methods/linear.py's skeleton)
