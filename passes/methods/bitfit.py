"""BitFit (Ben Zaken et al. 2022): train only the bias terms.

    b (frozen) -> b' (a trainable copy at ``<module>.bitfit.<adapter>.bias``); init b' = b

The adapted model equals the base at init. Swapping reuses passes/methods/train.py's mechanism.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from peftc.passes.methods.train import CopyMethod
from peftc.passes.pipeline import register_method
from peftc.spec import check_targets

__all__ = ["BitFitSpec", "BiasCopy", "rewrite"]


@register_method("bitfit", phase="swap")
@dataclass(frozen=True)
class BitFitSpec(CopyMethod):
    """``targets``: modules whose own ``bias`` trains (None = every module that has one)."""

    targets: Any = None

    def __post_init__(self):
        t = check_targets("bitfit.targets", self.targets, allow_none=True)
        if t == "all-linear":
            self.reject("targets", "module names/suffixes, 're:<regex>' or null (every bias)")
        object.__setattr__(self, "targets", t)

    def default_targets(self, model: nn.Module):
        names = [n for n, m in model.named_modules() if n and isinstance(getattr(m, "bias", None), nn.Parameter)]
        return tuple(names) if names else ("<no module with a bias>",)

    def trains(self, name: str) -> bool:
        return name == "bias"

    def copy_of(self, module: nn.Module) -> nn.Module:
        return BiasCopy(module.bias)


class BiasCopy(nn.Module):
    def __init__(self, bias: nn.Parameter):
        super().__init__()
        self.bias = nn.Parameter(bias.detach().clone())


rewrite = BitFitSpec.rewrite
