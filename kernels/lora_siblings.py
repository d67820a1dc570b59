"""Sibling LoRA: n adapted linears that read the same input (q/k/v, gate/up) in one opaque op.

    y_i = x W_i^T + b_i + s_i * drop(x) A_i^T B_i^T          i = 1..n, one x, one dropout mask

The low-rank inputs of all siblings come from ONE GEMM against the stacked A = [A_1; ...; A_n]
(R = sum r_i rows): ``h = drop(x) A^T`` (tokens, R), and sibling i reads its column block h_i.
Op (registered on import)::

    torch.ops.peftc.lora_siblings(x, weights[], biases[], lora_As[], lora_Bs[], scales[], p, seed, train)
        -> (ys[], h, bits)
        x (..., in); weights[i] (out_i, in); biases[i] (out_i,) or None; lora_As[i] (r_i, in);
        lora_Bs[i] (out_i, r_i); scales[i]: s_i; p, seed, train as peftc::lora_linear
        ys[i] (..., out_i); h (tokens, R) in the adapters' dtype and bits (the CPU's packed drop mask,
        else empty): non-differentiable, saved for backward. Adapters may be fp32 on a bf16/fp16 base,
        computed as HF PEFT does (see peftc::lora_linear).

``lora_siblings(...)`` below calls it and returns ys. Backward, g_i = dY_i, keep/(1-p) the mask::

    gbs = [s_1 g_1 B_1, ..., s_n g_n B_n]   (tokens, R)
    dx = sum_i g_i W_i + keep/(1-p) * (gbs A)       dA = gbs^T drop(x)  (split by rows)
    dB_i = s_i g_i^T h_i

so dx's low-rank term and all dA are one GEMM each; autograd saves x, h and the mask bits (besides
the parameters it holds); the mask is drawn exactly as lora_linear draws it (``dropout_mask`` on
CPU, kept as bits; ``tl.rand(seed, token * in + feature)`` in Triton, regenerated), so a
one-sibling call equals lora_linear. dW_i, db_i only when the base requires grad.

Dropout deviation: PEFT draws an independent mask per module; here the siblings share one. Each
sibling's own dropout is PEFT's in distribution, but the masks are correlated across siblings,
which is why passes/optimize/fuse.py groups sites with p > 0 only under ``shared_dropout: true``.

Devices: CPU runs fused torch (addmm per base, one mm for h, addmm_ in place per sibling); CUDA
fp16/bf16/fp32 keeps every base GEMM on cuBLAS (addmm) and runs the r-wide traffic in
``lora_triton``: one ``down`` for h, one ``accumulate`` per sibling forward; backward n ``down``
(g_i B_i), one split-K ``wgrad`` for every dA, n for the dB_i, one ``accumulate`` for dx.

    >>> y_q, y_k, y_v = lora_siblings(x, [Wq, Wk, Wv], [None] * 3, [Aq, Ak, Av], [Bq, Bk, Bv], [2.0] * 3)
"""

from __future__ import annotations

import torch

from peftc.capture import register_train_flag
from peftc.kernels import lora_triton as LT
from peftc.kernels.common import (
    add_low_rank,
    as_dtype,
    check_lora,
    draw_seed,
    drop_bits,
    dropout_on,
    no_bits,
    pack_bits,
    unpack_bits,
    zero_seed,
)
from peftc.kernels.gemm import triton_seed, triton_takes
from peftc.kernels.lora_linear import lora_linear_reference

__all__ = ["lora_siblings", "lora_siblings_reference", "triton_forward", "triton_backward"]


def lora_siblings_reference(x, weights, biases, lora_As, lora_Bs, scales, mask=None):
    """PEFT's eager semantics per sibling (``lora_linear_reference``), one shared scaled keep ``mask``."""
    return [lora_linear_reference(x, w, b, a, bb, s, mask)
            for w, b, a, bb, s in zip(weights, biases, lora_As, lora_Bs, scales)]


def _check_all(x, weights, biases, lora_As, lora_Bs, scales, p):
    n = len(weights)
    if n == 0 or not len(biases) == len(lora_As) == len(lora_Bs) == len(scales) == n:
        raise ValueError(f"lora_siblings: want n >= 1 weights, biases, lora_As, lora_Bs, scales alike; got "
                         f"{n}, {len(biases)}, {len(lora_As)}, {len(lora_Bs)}, {len(scales)}")
    for w, b, a, bb in zip(weights, biases, lora_As, lora_Bs):
        check_lora(x, w, b, a, bb, p, "lora_siblings")
    if len({a.dtype for a in lora_As}) > 1:
        raise ValueError(f"lora_siblings: the adapters share a dtype, got {[a.dtype for a in lora_As]}")
    _check_bias_grad(biases)


def _check_bias_grad(biases):
    if None in biases and any(b is not None and b.requires_grad for b in biases):
        raise ValueError("lora_siblings: a trainable bias needs every sibling to have one (torch.library "
                         "passes no gradient to a Tensor?[] holding None)")


def _blocks(lora_As):
    """Column offsets of each sibling's block of h."""
    offs = [0]
    for a in lora_As:
        offs.append(offs[-1] + a.shape[0])
    return list(zip(offs[:-1], offs[1:]))


# ---------------------------------------------------------------- CPU: fused torch


def _torch_forward(x, weights, biases, lora_As, lora_Bs, scales, p, seed, train):
    """(ys, h, bits): bits is the packed drop mask kept for backward (CPU, dropout on) or empty."""
    x2 = x.reshape(-1, x.shape[-1])
    xa, bits = as_dtype(x2, lora_As[0].dtype), no_bits(x)
    if dropout_on(p, train):
        drop = drop_bits(seed, x2.shape, p, x.device)
        xa = xa.masked_fill(drop, 0.0)
        bits = pack_bits(drop) if x.device.type == "cpu" else bits
    h = torch.mm(xa, torch.cat(lora_As).t())  # all siblings' x A_i^T in one GEMM
    if dropout_on(p, train):
        h.mul_(1.0 / (1.0 - p))
    ys = []
    for w, b, bb, s, (lo, hi) in zip(weights, biases, lora_Bs, scales, _blocks(lora_As)):
        y = torch.mm(x2, w.t()) if b is None else torch.addmm(b, x2, w.t())
        ys.append(add_low_rank(y, h[:, lo:hi], bb, s).view(*x.shape[:-1], w.shape[0]))
    return ys, h, bits


def _torch_backward(grads, x, weights, lora_As, lora_Bs, h, bits, scales, p, seed, train, need_dx):
    x2 = x.reshape(-1, x.shape[-1])
    gs = [g.reshape(-1, g.shape[-1]) for g in grads]
    on, ad = dropout_on(p, train), lora_As[0].dtype
    drop = None
    if on:
        drop = unpack_bits(bits, x2.shape[1]) if bits.numel() else drop_bits(seed, x2.shape, p, x.device)
    inv = 1.0 / (1.0 - p) if on else 1.0
    gas = [as_dtype(g, ad) for g in gs]
    gbs = torch.cat([torch.mm(g, bb).mul_(s * inv) for g, bb, s in zip(gas, lora_Bs, scales)], dim=1)  # (T, R)
    xa = as_dtype(x2, ad)
    d_a = torch.mm(gbs.t(), xa if drop is None else xa.masked_fill(drop, 0.0))  # (R, in): every dA_i
    d_as = [d_a[lo:hi].clone() for lo, hi in _blocks(lora_As)]  # an op's outputs may not alias each other
    d_bs = [torch.mm(h[:, lo:hi].t(), g).mul_(s).t().contiguous()
            for g, s, (lo, hi) in zip(gas, scales, _blocks(lora_As))]
    if not need_dx:
        return x.new_empty(0), d_as, d_bs
    dx = torch.mm(gs[0], weights[0])
    for g, w in zip(gs[1:], weights[1:]):
        dx.addmm_(g, w)
    if drop is None and dx.dtype == ad:
        dx.addmm_(gbs, torch.cat(lora_As))
    else:
        low = torch.mm(gbs, torch.cat(lora_As))
        dx.add_((low if drop is None else low.masked_fill_(drop, 0.0)).to(dx.dtype))
    return dx.view(x.shape), d_as, d_bs


# ---------------------------------------------------------------- CUDA: cuBLAS + lora_triton


def triton_forward(x, weights, biases, lora_As, lora_Bs, scales, p, seed, train, configs=None):
    """h = drop(x) [A_1; ...]^T in one ``down``; y_i = addmm (cuBLAS), then ``accumulate`` s_i h_i B_i^T."""
    seed = triton_seed(x, seed, "lora_siblings")
    down_cfg, acc_cfg = configs or (None, None)
    x2 = x.reshape(-1, x.shape[-1])
    on = dropout_on(p, train)
    h = LT.down(x2, torch.cat(lora_As), alpha=1 / (1 - p) if on else 1.0, drop=on, seed=seed, p=p, config=down_cfg)
    ys = []
    for w, b, bb, s, (lo, hi) in zip(weights, biases, lora_Bs, scales, _blocks(lora_As)):
        y = torch.mm(x2, w.t()) if b is None else torch.addmm(b, x2, w.t())
        ys.append(LT.accumulate(y, h[:, lo:hi], bb.t(), beta=s, config=acc_cfg).view(*x.shape[:-1], w.shape[0]))
    return ys, h


def triton_backward(grads, x, weights, lora_As, lora_Bs, h, scales, p, seed, train, need_dx, configs=None):
    """(dx, dAs, dBs): gbs by one ``down`` per sibling, every dA in one split-K ``wgrad``, dx = sum g_i W_i
    on cuBLAS plus keep/(1-p) gbs [A_1; ...] by one ``accumulate``."""
    seed = triton_seed(x, seed, "lora_siblings")
    down_cfg, acc_cfg, wg_cfg = configs or (None, None, None)
    x2 = x.reshape(-1, x.shape[-1])
    gs = [g.reshape(-1, g.shape[-1]) for g in grads]
    on = dropout_on(p, train)
    inv = 1 / (1 - p) if on else 1.0
    spans = _blocks(lora_As)
    gbs = torch.cat([LT.down(g, bb.t(), alpha=s, config=down_cfg) for g, bb, s in zip(gs, lora_Bs, scales)], dim=1)
    d_a = LT.wgrad(x2, gbs, alpha=inv, drop=on, seed=seed, p=p, config=wg_cfg)  # (in, R)
    d_as = [d_a[:, lo:hi].t().contiguous() for lo, hi in spans]
    d_bs = [LT.wgrad(g, h[:, lo:hi], alpha=s, config=wg_cfg) for g, s, (lo, hi) in zip(gs, scales, spans)]
    if not need_dx:
        return x.new_empty(0), d_as, d_bs
    dx = torch.mm(gs[0], weights[0])
    for g, w in zip(gs[1:], weights[1:]):
        dx.addmm_(g, w)
    LT.accumulate(dx, gbs, torch.cat(lora_As), beta=inv, drop=on, seed=seed, p=p, config=acc_cfg)
    return dx.view(x.shape), d_as, d_bs


# ---------------------------------------------------------------- custom-op registration


@torch.library.custom_op("peftc::lora_siblings", mutates_args=())
def _lora_siblings_op(x: torch.Tensor, weights: list[torch.Tensor], biases: list[torch.Tensor | None],
                      lora_As: list[torch.Tensor], lora_Bs: list[torch.Tensor], scales: list[float], p: float,
                      seed: torch.Tensor, train: bool) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    if triton_takes(x, lora_As[0]) and x.is_cuda:
        return (*triton_forward(x, weights, biases, lora_As, lora_Bs, scales, p, seed, train), no_bits(x))
    return _torch_forward(x, weights, biases, lora_As, lora_Bs, scales, p, seed, train)


@_lora_siblings_op.register_fake
def _(x, weights, biases, lora_As, lora_Bs, scales, p, seed, train):
    _check_all(x, weights, biases, lora_As, lora_Bs, scales, p)
    ys = [x.new_empty(*x.shape[:-1], w.shape[0]) for w in weights]
    tokens = x.numel() // x.shape[-1]
    keep = dropout_on(p, train) and x.device.type == "cpu"
    bits = x.new_empty(tokens, -(-x.shape[-1] // 8), dtype=torch.uint8) if keep else no_bits(x)
    return ys, lora_As[0].new_empty(tokens, sum(a.shape[0] for a in lora_As)), bits


@torch.library.custom_op("peftc::lora_siblings_backward", mutates_args=())
def _lora_siblings_backward_op(grads: list[torch.Tensor], x: torch.Tensor, weights: list[torch.Tensor],
                               lora_As: list[torch.Tensor], lora_Bs: list[torch.Tensor], h: torch.Tensor,
                               bits: torch.Tensor, scales: list[float], p: float, seed: torch.Tensor, train: bool,
                               need_dx: bool) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    if triton_takes(x, lora_As[0]) and x.is_cuda:
        return triton_backward(grads, x, weights, lora_As, lora_Bs, h, scales, p, seed, train, need_dx)
    return _torch_backward(grads, x, weights, lora_As, lora_Bs, h, bits, scales, p, seed, train, need_dx)


@_lora_siblings_backward_op.register_fake
def _(grads, x, weights, lora_As, lora_Bs, h, bits, scales, p, seed, train, need_dx):
    dx = x.new_empty(x.shape) if need_dx else x.new_empty(0)
    return dx, [torch.empty_like(a) for a in lora_As], [torch.empty_like(bb) for bb in lora_Bs]


def _setup_context(ctx, inputs, output):
    x, weights, biases, lora_As, lora_Bs, scales, p, seed, train = inputs
    n = len(weights)
    _check_bias_grad(biases)
    ctx.save_for_backward(x, output[1], output[2], seed, *weights, *lora_As, *lora_Bs)  # x, h, mask bits
    ctx.mark_non_differentiable(output[1], output[2])
    ctx.args = (n, [b is not None for b in biases], scales, p, train)


def _backward(ctx, grads, _grad_h, _grad_bits):
    n, has_bias, scales, p, train = ctx.args
    x, h, bits, seed, *rest = ctx.saved_tensors
    weights, lora_As, lora_Bs = rest[:n], rest[n:2 * n], rest[2 * n:]
    need = ctx.needs_input_grad  # x, [weights], [biases] (or one flag if one is None), [lora_As], ...
    need_w, need_b = need[1], need[2] if all(has_bias) else [False] * n
    dx, d_as, d_bs = torch.ops.peftc.lora_siblings_backward(grads, x, weights, lora_As, lora_Bs, h, bits, scales,
                                                            p, seed, train, bool(need[0]))
    x2 = x.reshape(-1, x.shape[-1])
    gs = [g.reshape(-1, g.shape[-1]) for g in grads]
    d_w = [torch.mm(g.t(), x2) if nw else None for g, nw in zip(gs, need_w)]  # trainable base only
    d_bias = [g.sum(0) if nb else None for g, nb in zip(gs, need_b)] if all(has_bias) else None
    return dx if need[0] else None, d_w, d_bias, d_as, d_bs, None, None, None, None


_lora_siblings_op.register_autograd(_backward, setup_context=_setup_context)
register_train_flag(torch.ops.peftc.lora_siblings.default)  # set_training flips its ``train``


def lora_siblings(x, weights, biases, lora_As, lora_Bs, scales, p: float = 0.0, train: bool = False,
                  seed: torch.Tensor | None = None) -> list[torch.Tensor]:
    """Call the op; draws a seed from the global RNG when dropout is on and none is given."""
    _check_all(x, weights, biases, lora_As, lora_Bs, scales, p)
    if seed is None:
        seed = draw_seed(x.device) if dropout_on(p, train) else zero_seed(x.device)
    ys, _, _ = torch.ops.peftc.lora_siblings(x, list(weights), list(biases), list(lora_As), list(lora_Bs),
                                          [float(s) for s in scales], float(p), seed, bool(train))
    return ys
