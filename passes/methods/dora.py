"""DoRA (Liu et al. 2024) as an extension of the LoRA rewrite, with HF PEFT's formula.

    m: (out,) magnitude, init ||W + s B A||_row      n = stop_grad(||W + s B A||_row)
    y = base + (m/n - 1) * base' + (m/n) * s * B(A(drop(x)))

``base'`` is the base output without bias; with LoRA dropout active PEFT recomputes it on the
dropped input (``x_d W^T``), so the graph does the same whenever dropout > 0 (in eval the
dropout is the identity and this equals ``y - b`` up to rounding).
"""

from __future__ import annotations

import torch
from torch import fx

from peftc.graph import Inserter, LinearSite

__all__ = ["weight_norm", "insert_dora"]

aten = torch.ops.aten


def weight_norm(weight_out_in: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float):
    """Row norms of the adapted weight, as PEFT computes them (for the magnitude init)."""
    return torch.linalg.norm(weight_out_in + scaling * (lora_B @ lora_A), dim=1)


def insert_dora(ins: Inserter, site: LinearSite, x: fx.Node, d: fx.Node, a: fx.Node, b: fx.Node,
                mag_target: str, scaling: float, recompute_base: bool, dtype: torch.dtype | None = None) -> fx.Node:
    """Inserts DoRA's term after the low-rank output ``d = B(A(x))`` and returns it.

    ``dtype``: the adapter's dtype when it differs from the base (PEFT's autocast): the norm and
    the terms then run in it by type promotion (``W + s B A`` with W bf16, BA fp32 is fp32, as
    PEFT's ``weight.to(x.dtype)``), and the recomputed base reads ``W.to(dtype)`` as PEFT does."""
    w = site.weight
    if site.transposed:  # Conv1D stores (in, out)
        w = ins.call(aten.t.default, (w,), "weight_t")
    m = ins.get_attr(mag_target)
    ba = ins.call(aten.mm.default, (b, a), "delta_weight")
    adapted = ins.call(aten.add.Tensor, (w, ins.call(aten.mul.Tensor, (ba, scaling), "scale_delta")),
                       "adapted_weight")
    norm = ins.call(aten.linalg_vector_norm.default, (adapted, 2, [1]), "weight_norm")
    norm = ins.call(aten.detach.default, (norm,), "detach_norm")
    mag = ins.call(aten.reshape.default, (ins.call(aten.div.Tensor, (m, norm), "mag_norm_scale"), [1, -1]),
                   "mag_row")
    y = site.node
    if recompute_base:
        wx = ins.call(aten.to.dtype, (w, dtype), "cast_weight") if dtype is not None else w
        base = ins.call(aten.linear.default, (x, wx), "base_recompute")
    else:
        bias = y.args[0] if site.transposed else (y.args[2] if len(y.args) > 2 else None)
        base = ins.call(aten.sub.Tensor, (y, bias), "base_no_bias") if bias is not None else y
    t1 = ins.call(aten.mul.Tensor, (ins.call(aten.sub.Tensor, (mag, 1), "mag_minus_one"), base), "dora_base")
    t2 = ins.call(aten.mul.Tensor, (ins.call(aten.mul.Tensor, (mag, d), "dora_lora"), scaling), "scale")
    return ins.call(aten.add.Tensor, (t1, t2), "dora")
