"""LoKr (Kronecker-product adapter, LyCORIS) as a graph rewrite, with HF PEFT's exact numerics.

    y = x W^T + b  ->  y + x dW^T,   dW = kron(w1, w2) * s,   s = alpha / r

With out = a*b and in = c*d split by ``factorization`` (PEFT's: the factor pair nearest the
square root, or ``decompose_factor`` when it divides), w1: (a, c) and w2: (b, d). w2 is kept
whole when r >= max(b, d) / 2, else it is ``w2_a @ w2_b`` with rank r; w1 is decomposed the
same way only with ``decompose_both``. Keys as PEFT's: ``lokr_w1``/``lokr_w1_a``/``lokr_w1_b``,
``lokr_w2``/``lokr_w2_a``/``lokr_w2_b``. Init (PEFT's ``init_weights``): "default" zeroes w1 (or
w1_a), "lycoris" zeroes w2 (or w2_b), "random" zeroes nothing.

The spec fields, PEFT IO, fold and the term around the dW builder are shared with LoHa
(passes/methods/loha.py). ``rank_dropout_scale`` and ``use_effective_conv2d`` are kept for PEFT config
round trips; neither changes a linear layer while rank_dropout is 0 (peftc requires it).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from peftc.passes.context import PassContext
from peftc.passes.methods.linear import LinearTarget
from peftc.passes.methods.loha import LycorisSpec, kaiming_init
from peftc.passes.pipeline import register_method

__all__ = ["LokrSpec", "LokrWeights", "factorization", "rewrite"]

aten = torch.ops.aten


def factorization(dim: int, factor: int = -1) -> tuple[int, int]:
    """``dim`` = m * n as PEFT's LoKr splits it: (factor, dim // factor) when ``factor`` > 0
    divides ``dim``; else the divisor pair nearest sqrt(dim) with m <= ``factor`` (no bound
    for -1), returned with m <= n. ``factorization(128) == (8, 16)``."""
    if factor > 0 and dim % factor == 0:
        return factor, dim // factor
    bound = dim if factor == -1 else factor
    m, n = 1, dim
    while m < n:  # walk up the divisors while they stay within the bound
        nxt = next(d for d in range(m + 1, dim + 1) if dim % d == 0)
        if nxt > bound:
            break
        m, n = nxt, dim // nxt
    return (m, n) if m <= n else (n, m)


@register_method("lokr", peft_type="LOKR", phase="reparameterize")
@dataclass(frozen=True)
class LokrSpec(LycorisSpec):
    """LoKr: dW = kron(w1, w2) * alpha / r; ``decompose_both`` also factors w1 at rank r,
    ``decompose_factor`` (-1: near sqrt) picks the Kronecker split."""

    decompose_both: bool = False
    decompose_factor: int = -1
    rank_dropout_scale: bool = False

    INITS: ClassVar[dict[Any, str]] = {True: "default", False: "random", "lycoris": "lycoris"}
    EXTRA: ClassVar[tuple[str, ...]] = ("decompose_both", "decompose_factor", "rank_dropout_scale")

    def __post_init__(self):
        super().__post_init__()
        for name in ("decompose_both", "rank_dropout_scale"):
            if not isinstance(getattr(self, name), bool):
                self.reject(name, "true or false")
        f = self.decompose_factor
        if isinstance(f, bool) or not isinstance(f, int) or not (f == -1 or f > 0):
            self.reject("decompose_factor", "-1 (split near the square root) or an integer > 0")

    def make_module(self, target: LinearTarget, ctx: PassContext) -> nn.Module:
        return LokrWeights(target.in_features, target.out_features, self.rank_for(target.module), self.init,
                           target.weight, self.decompose_both, self.decompose_factor)


class LokrWeights(nn.Module):
    """The Kronecker factors of one linear layer, under PEFT's names and shapes."""

    def __init__(self, in_features: int, out_features: int, r: int, init: str, like: torch.Tensor,
                 decompose_both: bool, factor: int):
        super().__init__()
        kw = {"dtype": like.dtype, "device": like.device}
        (a, b), (c, d) = factorization(out_features, factor), factorization(in_features, factor)
        parts = {"w1": (a, c, decompose_both and r < max(a, c) / 2), "w2": (b, d, r < max(b, d) / 2)}
        zero = {"default": "w1", "lycoris": "w2", "random": None}[init]
        for name, (rows, cols, low_rank) in parts.items():
            if not low_rank:
                p = kaiming_init(torch.empty(rows, cols, **kw))
                setattr(self, f"lokr_{name}", nn.Parameter(p.zero_() if zero == name else p))
                continue
            fa, fb = kaiming_init(torch.empty(rows, r, **kw)), kaiming_init(torch.empty(r, cols, **kw))
            if zero == "w1" and name == "w1":
                fa.zero_()  # PEFT: w1_a zero, w1_b random
            elif zero == "w2" and name == "w2":
                fb.zero_()  # lycoris: w2_a random, w2_b zero
            setattr(self, f"lokr_{name}_a", nn.Parameter(fa))
            setattr(self, f"lokr_{name}_b", nn.Parameter(fb))

    def delta(self, ops, get: Callable[[str], Any], scale: float):
        """dW = kron(w1, w2) * scale, each factor whole or ``_a @ _b``; ``ops`` is an Inserter
        (graph nodes) or EAGER (tensors), ``get`` fetches a parameter by name."""
        def factor(name):
            if hasattr(self, f"lokr_{name}"):
                return get(f"lokr_{name}")
            return ops.call(aten.mm.default, (get(f"lokr_{name}_a"), get(f"lokr_{name}_b")), name)

        kron = ops.call(aten.kron.default, (factor("w1"), factor("w2")), "kron")
        return ops.call(aten.mul.Tensor, (kron, scale), "scale")


rewrite = LokrSpec.rewrite  # the method's pass (passes/methods/linear.py's skeleton)
