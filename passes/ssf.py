"""SSF (Lian et al. 2022): scale and shift the features after each adapted linear layer.

    y = x W^T + b  ->  y * gamma + beta,    gamma = 1, beta = 0 at init (identity)

Mergeable: W' = gamma[:, None] W, b' = gamma * b + beta.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, ClassVar

import torch
from torch import fx, nn

from peftc.errors import PeftcError
from peftc.graph import Inserter, as_linear_site, mount_adapter
from peftc.passes.pipeline import SITES, PassContext, PassResult
from peftc.spec import MethodSpec, check_targets, register_method

__all__ = ["SSFSpec", "ScaleShift", "rewrite"]

aten = torch.ops.aten


@register_method("ssf")
@dataclass(frozen=True)
class SSFSpec(MethodSpec):
    """``targets``: linear layers whose outputs get a learned per-channel scale and shift."""

    targets: Any = "all-linear"
    exclude: Any = None

    sites: ClassVar[str] = "linear"

    def __post_init__(self):
        object.__setattr__(self, "targets", check_targets("ssf.targets", self.targets))
        object.__setattr__(self, "exclude", check_targets("ssf.exclude", self.exclude, allow_none=True))

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


def rewrite(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    """Pre: linear nodes annotated with SSF entries. Post: ``y * scale + shift`` after each."""
    adapter = ctx.spec.adapter
    n = 0
    for node in list(gm.graph.nodes):
        for i in node.meta.get(SITES, ()):
            if not isinstance(ctx.spec.methods[i], SSFSpec):
                continue
            if ctx.sample_mask:
                raise PeftcError("a mixed batch works with the LoRA family only; this adapter uses ssf")
            site = as_linear_site(node)
            weight = gm.get_parameter(site.weight.target)
            out_f = weight.shape[1] if site.transposed else weight.shape[0]
            path = mount_adapter(ctx.store, gm, f"{site.module}.ssf.{adapter}", partial(ScaleShift, out_f, weight))
            ins = Inserter(node, {"method": "ssf", "adapter": adapter, "module": site.module})
            scale, shift = ins.get_attr(f"{path}.ssf_scale"), ins.get_attr(f"{path}.ssf_shift")
            out = ins.call(aten.add.Tensor, (ins.call(aten.mul.Tensor, (node, scale), "scale"), shift), "shift")
            ins.redirect(node, out)
            n += 1
    ctx.counts["ssf"] += n
    return PassResult(gm, n > 0)
