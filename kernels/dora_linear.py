"""Fused DoRA linear: base GEMM, low-rank path and the column-norm rescaling in one opaque op.

HF PEFT's DoRA (peft/tuners/lora/dora.py + LoraLayer.forward), with n = stop_grad(||W + s B A||_row),
mn = m / n (out,), x_d = drop(x), h = x_d A^T, z = x_d W^T + s h B^T::

    no dropout, or eval:  y = x W^T + b + (mn - 1) * (y_base - b) + mn * s h B^T  =  mn * z + b
    dropout in training:  y = x W^T + b + (mn - 1) * x_d W^T      + mn * s h B^T  =  x W^T + b + mn * z - x_d W^T

(PEFT passes the bias-free base output when dropout is the identity, and recomputes it on the
dropped input otherwise; the bias is never rescaled.)

Op (registered on import)::

    torch.ops.peftc.dora_linear(x, weight, bias, lora_A, lora_B, magnitude, scale, p, seed, train)
        -> (y, h, z, n)       h, z, n non-differentiable, returned for autograd to save

Backward, g = dY, g' = g * mn::

    dm = sum_tokens(g * z) / n     dA = s (g' B)^T x_d     dB = s g'^T h
    dx = g' W + s (g' B) A                                  (no dropout)
    dx = g W + keep/(1-p) * ((g * (mn - 1)) W + s (g' B) A) (dropout; mask regenerated from seed)

z is saved rather than recomputed for dm: the unfused graph keeps the (tokens, out) base output
for the same product, and recomputing would add a full GEMM to backward. dW (and db) only when
the base requires grad. The norm is detached, as in PEFT, so no gradient flows through it.

Devices: CPU runs fused torch code with lora_linear's seeded mask (``common.dropout_mask``). CUDA
fp16/bf16/fp32 runs Triton: h by ``gemm.mm``; y and z by ``_dora_fwd_kernel`` (x W^T and, with
dropout, x_d W^T from the same tiles, the low-rank epilogue, column scale and bias); backward by
``gemm.scaled_mm`` (g' B, dB), ``gemm.mm`` (dA), ``gemm.colsum`` (dm) and ``_dora_dx_kernel``.
The norm (weight-sized, token-independent) is torch on both devices. Adapters (A, B, magnitude)
in another dtype than the base (fp32 on bf16, HF PEFT's default): x, W and b are cast to the
adapter dtype, as PEFT's DoRA path casts x and W, y is cast back; dx comes back in the base
dtype, dA, dB, dm in the adapter dtype. Without dropout PEFT's base term is its
bf16 base output (cast up), and so is ours (``_mixed_eval_forward``).

    >>> y = dora_linear(x, W, b, A, B, m, scale=2.0, p=0.1, train=True)   # draws a seed
"""

from __future__ import annotations

import torch

from peftc.capture import register_train_flag
from peftc.kernels.common import draw_seed, dropout_mask, dropout_on, zero_seed
from peftc.kernels.gemm import (
    BLOCKS,
    colsum,
    mm,
    precision,
    scaled_mm,
    triton_dropout_mask,
    triton_seed,
    triton_takes,
    upcast,
)

try:
    import triton
    import triton.language as tl

    from peftc.kernels.gemm import dot
except ImportError:  # pragma: no cover - triton is a Linux-only dependency
    triton = None

__all__ = ["dora_linear", "dora_linear_reference", "weight_norm", "dora_forward", "dora_backward", "triton_forward",
           "triton_backward"]


# ---------------------------------------------------------------- torch reference and CPU path


def weight_norm(weight, lora_A, lora_B, scale):
    """||W + s B A|| per output row, detached (PEFT's ``get_weight_norm``)."""
    with torch.no_grad():
        return torch.linalg.vector_norm(weight + scale * (lora_B @ lora_A), dim=1)


def dora_linear_reference(x, weight, bias, lora_A, lora_B, magnitude, scale, mask=None):
    """Unfused eager semantics, PEFT's formula; ``mask`` is a scaled keep mask or None."""
    lin = torch.nn.functional.linear
    mn = (magnitude / weight_norm(weight, lora_A, lora_B, scale)).view(1, -1)
    y = lin(x, weight, bias)
    xd = x if mask is None else x * mask.reshape(x.shape)
    base = lin(xd, weight) if mask is not None else (y if bias is None else y - bias)
    return y + (mn - 1) * base + mn * lin(lin(xd, lora_A), lora_B) * scale


def _check(x, weight, bias, lora_A, lora_B, magnitude, p):
    (out, d), (r, d_a) = weight.shape, lora_A.shape
    if x.shape[-1] != d or d_a != d or tuple(lora_B.shape) != (out, r) or tuple(magnitude.shape) != (out,):
        raise ValueError(f"dora_linear: x {tuple(x.shape)}, weight {tuple(weight.shape)}, lora_A {tuple(lora_A.shape)}, "
                         f"lora_B {tuple(lora_B.shape)}, magnitude {tuple(magnitude.shape)}: want (..., in), "
                         "(out, in), (r, in), (out, r), (out,)")
    if x.dtype != weight.dtype or len({lora_A.dtype, lora_B.dtype, magnitude.dtype}) > 1:
        raise ValueError("dora_linear: x and weight share the base dtype, lora_A, lora_B, magnitude the adapter "
                         f"dtype; got {x.dtype}, {weight.dtype}, {lora_A.dtype}, {lora_B.dtype}, {magnitude.dtype}")
    if bias is not None and (tuple(bias.shape) != (out,) or bias.dtype != weight.dtype):
        raise ValueError(f"dora_linear: bias {tuple(bias.shape)}, want ({out},)")
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dora_linear: dropout p={p}, want 0 <= p < 1")


def _mask(seed, x2, p):
    """The scaled keep mask the device's path draws (CPU: torch.Generator; CUDA: Triton's tl.rand)."""
    if x2.is_cuda and triton_takes(x2):
        return triton_dropout_mask(seed, *x2.shape, p, device=x2.device).to(x2.dtype)
    return dropout_mask(seed, x2.shape, p, x2.dtype, x2.device)


def _torch_forward(x, weight, bias, lora_A, lora_B, magnitude, scale, p, seed, train):
    x2 = x.reshape(-1, x.shape[-1])
    n = weight_norm(weight, lora_A, lora_B, scale)
    mn = magnitude.detach() / n
    on = dropout_on(p, train)
    xd = x2 * _mask(seed, x2, p) if on else x2
    h = torch.mm(xd, lora_A.t())
    q = torch.mm(xd, weight.t())
    z = torch.addmm(q, h, lora_B.t(), alpha=scale)
    if on:  # x W^T + b + mn z - x_d W^T
        y = torch.mm(x2, weight.t()) if bias is None else torch.addmm(bias, x2, weight.t())
        y.addcmul_(z, mn).sub_(q)
    else:
        y = z * mn if bias is None else torch.addcmul(bias, z, mn)
    return y.view(*x.shape[:-1], weight.shape[0]), h, z, n


def _torch_backward(grad, x, weight, lora_A, lora_B, magnitude, h, z, n, scale, p, seed, train, need_dx):
    g, x2 = grad.reshape(-1, grad.shape[-1]), x.reshape(-1, x.shape[-1])
    mn = magnitude / n
    on = dropout_on(p, train)
    mask = _mask(seed, x2, p) if on else None
    gm = g * mn
    gbs = torch.mm(gm, lora_B).mul_(scale)  # s g' B: (tokens, r)
    d_a = torch.mm(gbs.t(), x2 if mask is None else x2 * mask)
    d_b = torch.mm(h.t(), gm).mul_(scale).t().contiguous()
    d_m = (g * z).sum(0) / n
    if not need_dx:
        return x.new_empty(0), d_a, d_b, d_m
    if mask is None:
        dx = torch.mm(gm, weight).addmm_(gbs, lora_A)
    else:
        inner = torch.mm(g * (mn - 1), weight).addmm_(gbs, lora_A)
        dx = torch.mm(g, weight).addcmul_(inner, mask)
    return dx.view(x.shape), d_a, d_b, d_m


# ---------------------------------------------------------------- Triton kernels and launchers

if triton is not None:

    @triton.jit
    def _dora_fwd_kernel(
        x_ptr, w_ptr,  # x (M, K) tokens x in; w (K, N) = W^T as a strided view
        h_ptr, bt_ptr,  # low-rank epilogue: h (M, R) = x_d A^T, bt (R, N) = B^T
        bias_ptr, mn_ptr,  # (N,) each: bias when HAS_BIAS; mn = m / n
        y_ptr, z_ptr,  # outputs (M, N): y, and z = x_d W^T + s h B^T (saved for dm)
        seed_ptr,  # int64 scalar: dropout seed, read when DROP
        M, N, K, R,
        s_xm, s_xk, s_wk, s_wn, s_hm, s_hr, s_br, s_bn, s_ym, s_yn, s_zm, s_zn,
        scale, p, inv,  # keep(t, i) = rand(seed, t * K + i) >= p, as gemm.mm with DROP=1
        HAS_BIAS: tl.constexpr, DROP: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
        PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    ):
        rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        in_m, in_n = rm[:, None] < M, rn[None, :] < N
        seed = tl.load(seed_ptr) if DROP else 0
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)  # x W^T
        acc_d = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)  # x_d W^T * (1 - p), when DROP
        for k0 in range(0, K, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            a = tl.load(x_ptr + rm[:, None] * s_xm + rk[None, :] * s_xk, mask=in_m & (rk[None, :] < K), other=0.0)
            b = tl.load(w_ptr + rk[:, None] * s_wk + rn[None, :] * s_wn, mask=(rk[:, None] < K) & in_n, other=0.0)
            acc += dot(a, b, PRECISION, UPCAST)
            if DROP:
                a = tl.where(tl.rand(seed, rm[:, None] * K + rk[None, :]) >= p, a, 0.0)
                acc_d += dot(a, b, PRECISION, UPCAST)
        low = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for r0 in range(0, R, BLOCK_R):
            rr = r0 + tl.arange(0, BLOCK_R)
            e = tl.load(h_ptr + rm[:, None] * s_hm + rr[None, :] * s_hr, mask=in_m & (rr[None, :] < R), other=0.0)
            f = tl.load(bt_ptr + rr[:, None] * s_br + rn[None, :] * s_bn, mask=(rr[:, None] < R) & in_n, other=0.0)
            low += dot(e, f, PRECISION, UPCAST)
        mn = tl.load(mn_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
        if DROP:
            q = acc_d * inv
            z = q + scale * low
            y = acc + mn * z - q
        else:
            z = acc + scale * low
            y = mn * z
        if HAS_BIAS:
            y += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
        tl.store(z_ptr + rm[:, None] * s_zm + rn[None, :] * s_zn, z.to(z_ptr.dtype.element_ty), mask=in_m & in_n)
        tl.store(y_ptr + rm[:, None] * s_ym + rn[None, :] * s_yn, y.to(y_ptr.dtype.element_ty), mask=in_m & in_n)

    @triton.jit
    def _dora_dx_kernel(
        g_ptr, w_ptr,  # g (M, K) tokens x out; w (K, N) = W (out, in)
        c_ptr,  # (K,): mn without dropout, mn - 1 with it: scales g's columns
        e_ptr, a_ptr,  # low-rank term: e (M, R) = s g' B, a (R, N) = A
        dx_ptr, seed_ptr,  # output (M, N); int64 seed read when DROP
        M, N, K, R,
        s_gm, s_gk, s_wk, s_wn, s_em, s_er, s_ar, s_an, s_dm, s_dn,
        p, inv,  # keep(t, i) = rand(seed, t * N + i) >= p: the forward's mask on x (t, i)
        DROP: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
        PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    ):
        rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        in_m, in_n = rm[:, None] < M, rn[None, :] < N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)  # g W, when DROP
        acc_c = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)  # (g * c) W
        for k0 in range(0, K, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            a = tl.load(g_ptr + rm[:, None] * s_gm + rk[None, :] * s_gk, mask=in_m & (rk[None, :] < K), other=0.0)
            b = tl.load(w_ptr + rk[:, None] * s_wk + rn[None, :] * s_wn, mask=(rk[:, None] < K) & in_n, other=0.0)
            if DROP:
                acc += dot(a, b, PRECISION, UPCAST)
            c = tl.load(c_ptr + rk, mask=rk < K, other=0.0).to(tl.float32)
            acc_c += dot((a.to(tl.float32) * c[None, :]).to(a.dtype), b, PRECISION, UPCAST)
        for r0 in range(0, R, BLOCK_R):
            rr = r0 + tl.arange(0, BLOCK_R)
            e = tl.load(e_ptr + rm[:, None] * s_em + rr[None, :] * s_er, mask=in_m & (rr[None, :] < R), other=0.0)
            f = tl.load(a_ptr + rr[:, None] * s_ar + rn[None, :] * s_an, mask=(rr[:, None] < R) & in_n, other=0.0)
            acc_c += dot(e, f, PRECISION, UPCAST)
        if DROP:
            seed = tl.load(seed_ptr)
            keep = tl.rand(seed, rm[:, None] * N + rn[None, :]) >= p
            acc_c = acc + tl.where(keep, acc_c * inv, 0.0)
        tl.store(dx_ptr + rm[:, None] * s_dm + rn[None, :] * s_dn, acc_c.to(dx_ptr.dtype.element_ty),
                 mask=in_m & in_n)


def _launch(kernel, ptrs, mats, floats, flags, drop, seed, blocks):
    """Grid, tiles and precision of the two DoRA kernels; ``mats`` = (a (M, K), b (K, N), e (M, R),
    f (R, N), *outputs (M, N)) give the sizes and strides, ``ptrs`` the pointer arguments."""
    a, b, e = mats[:3]
    (m, k), n, r = a.shape, b.shape[1], e.shape[1]
    if max(a.numel(), b.numel(), m * n) >= 2**31:
        raise ValueError(f"dora_linear: Triton indexes with int32; got {tuple(a.shape)} @ {tuple(b.shape)}")
    bm, bn, bk = blocks or BLOCKS
    bm, bn = min(bm, max(16, triton.next_power_of_2(m))), min(bn, max(16, triton.next_power_of_2(n)))
    strides = [s for t in mats for s in t.stride()]
    kernel[(triton.cdiv(m, bm), triton.cdiv(n, bn))](
        *ptrs, seed, m, n, k, r, *strides, *floats, DROP=drop, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
        BLOCK_R=16, PRECISION=precision(a), UPCAST=upcast(a), **flags)


def triton_forward(x, weight, bias, lora_A, lora_B, magnitude, scale, p, seed, train, blocks=None):
    """(y, h, z, n): h by gemm.mm, then y and z in one ``_dora_fwd_kernel`` launch."""
    seed, x2 = triton_seed(x, seed, "dora_linear"), x.reshape(-1, x.shape[-1])
    n = weight_norm(weight, lora_A, lora_B, scale)
    mn = magnitude.detach() / n
    on, inv = dropout_on(p, train), 1 / (1 - p)
    h = mm(x2, lora_A.t(), out_dtype=x.dtype, alpha=inv if on else 1.0, drop=1 if on else 0, seed=seed, p=p,
            ld=x2.shape[1], blocks=blocks)
    y, z = (torch.empty(x2.shape[0], weight.shape[0], dtype=x.dtype, device=x.device) for _ in range(2))
    bt = lora_B.t()
    _launch(_dora_fwd_kernel, (x2, weight.t(), h, bt, y if bias is None else bias, mn, y, z),
            (x2, weight.t(), h, bt, y, z), (float(scale), float(p), inv), {"HAS_BIAS": bias is not None}, on,
            seed, blocks)
    return y.view(*x.shape[:-1], weight.shape[0]), h, z, n


def triton_backward(grad, x, weight, lora_A, lora_B, magnitude, h, z, n, scale, p, seed, train, need_dx,
                    blocks=None):
    """(dx, dA, dB, dm): s g' B, then dA, dB, dm, dx from it (5 launches; 4 without dx)."""
    seed = triton_seed(x, seed, "dora_linear")
    g, x2 = grad.reshape(-1, grad.shape[-1]), x.reshape(-1, x.shape[-1])
    mn = magnitude / n
    on, inv = dropout_on(p, train), 1 / (1 - p)
    gbs = scaled_mm(g, lora_B, out_dtype=x.dtype, alpha=scale, pro=mn.to(x.dtype), blocks=blocks)  # s g' B
    d_a = mm(gbs.t(), x2, out_dtype=lora_A.dtype, alpha=inv if on else 1.0, drop=2 if on else 0, seed=seed, p=p,
              ld=x2.shape[1], blocks=blocks)
    d_b = scaled_mm(h.t(), g, out_dtype=lora_B.dtype, alpha=scale, col=mn, blocks=blocks).t().contiguous()
    d_m = colsum(g, z, out_dtype=torch.float32).div_(n).to(magnitude.dtype)
    if not need_dx:
        return x.new_empty(0), d_a, d_b, d_m
    dx = torch.empty_like(x2)
    c = (mn - 1 if on else mn).to(x.dtype)
    _launch(_dora_dx_kernel, (g, weight, c, gbs, lora_A, dx), (g, weight, gbs, lora_A, dx), (float(p), inv), {},
            on, seed, blocks)
    return dx.view(x.shape), d_a, d_b, d_m


# ---------------------------------------------------------------- custom-op registration


def _up(*ts, dtype):
    """Tensors cast to the adapter dtype (None stays None): PEFT's DoRA casts x and W to it as well."""
    return [t if t is None else t.to(dtype) for t in ts]


def _mixed_eval_forward(x, weight, bias, lora_A, lora_B, magnitude, scale):
    """PEFT without dropout: its bf16 base output (less the bias) is the DoRA ``base_result``,
    added in the adapter dtype to the low-rank term of x cast up; then y back in the base dtype."""
    ad, x2 = lora_A.dtype, x.reshape(-1, x.shape[-1])
    yb = torch.nn.functional.linear(x2, weight, bias)
    base = (yb if bias is None else yb - bias).to(ad)
    with torch.no_grad():  # PEFT's get_weight_norm on B A as it builds it: (I A^T B^T)^T
        n = torch.linalg.vector_norm(weight.to(ad) + scale * (lora_A.t() @ lora_B.t()).t(), dim=1)
    mn = magnitude.detach() / n
    h = torch.mm(x2.to(ad), lora_A.t())
    low = torch.mm(h, lora_B.t())
    y = (yb + ((mn - 1) * base + mn * low * scale)).to(x.dtype)  # PEFT's order of operations
    return y.view(*x.shape[:-1], weight.shape[0]), h, low.mul_(scale).add_(base), n  # z = base + s h B^T


def dora_forward(x, weight, bias, lora_A, lora_B, magnitude, scale, p, seed, train):
    """(y, h, z, n) on x's device, mixed dtypes as PEFT: the op's forward, which quant_linear's DoRA
    op runs on a dequantized W."""
    if x.dtype != lora_A.dtype and not dropout_on(p, train):
        return _mixed_eval_forward(x, weight, bias, lora_A, lora_B, magnitude, scale)
    if x.dtype != lora_A.dtype:  # with dropout PEFT computes the base term in the adapter dtype too
        y, h, z, n = dora_forward(*_up(x, weight, bias, dtype=lora_A.dtype), lora_A, lora_B, magnitude, scale, p,
                                  seed, train)
        return y.to(x.dtype), h, z, n
    fn = triton_forward if x.is_cuda and triton_takes(x) else _torch_forward
    return fn(x, weight, bias, lora_A, lora_B, magnitude, scale, p, seed, train)


def dora_backward(grad, x, weight, lora_A, lora_B, magnitude, h, z, n, scale, p, seed, train, need_dx):
    """(dx, dA, dB, dm) of ``dora_forward``: dx in the base dtype, the rest in the adapter dtype."""
    if x.dtype != lora_A.dtype:
        dx, d_a, d_b, d_m = dora_backward(*_up(grad, x, weight, dtype=lora_A.dtype), lora_A, lora_B, magnitude, h,
                                          z, n, scale, p, seed, train, need_dx)
        return dx.to(x.dtype), d_a, d_b, d_m
    fn = triton_backward if x.is_cuda and triton_takes(x) else _torch_backward
    return fn(grad, x, weight, lora_A, lora_B, magnitude, h, z, n, scale, p, seed, train, need_dx)


@torch.library.custom_op("peftc::dora_linear", mutates_args=())
def _dora_linear_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_A: torch.Tensor,
                    lora_B: torch.Tensor, magnitude: torch.Tensor, scale: float, p: float, seed: torch.Tensor,
                    train: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return dora_forward(x, weight, bias, lora_A, lora_B, magnitude, scale, p, seed, train)


@_dora_linear_op.register_fake
def _(x, weight, bias, lora_A, lora_B, magnitude, scale, p, seed, train):
    _check(x, weight, bias, lora_A, lora_B, magnitude, p)
    tokens, out = x.numel() // x.shape[-1], weight.shape[0]
    return (x.new_empty(*x.shape[:-1], out), lora_A.new_empty(tokens, lora_A.shape[0]), lora_A.new_empty(tokens, out),
            lora_A.new_empty(out))


@torch.library.custom_op("peftc::dora_linear_backward", mutates_args=())
def _dora_linear_backward_op(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, lora_A: torch.Tensor,
                             lora_B: torch.Tensor, magnitude: torch.Tensor, h: torch.Tensor, z: torch.Tensor,
                             n: torch.Tensor, scale: float, p: float, seed: torch.Tensor, train: bool,
                             need_dx: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return dora_backward(grad, x, weight, lora_A, lora_B, magnitude, h, z, n, scale, p, seed, train, need_dx)


@_dora_linear_backward_op.register_fake
def _(grad, x, weight, lora_A, lora_B, magnitude, h, z, n, scale, p, seed, train, need_dx):
    dx = x.new_empty(x.shape) if need_dx else x.new_empty(0)
    return dx, torch.empty_like(lora_A), torch.empty_like(lora_B), torch.empty_like(magnitude)


def _setup_context(ctx, inputs, output):
    x, weight, bias, lora_A, lora_B, magnitude, scale, p, seed, train = inputs
    _, h, z, n = output
    ctx.save_for_backward(x, weight, lora_A, lora_B, magnitude, h, z, n, seed)
    ctx.mark_non_differentiable(h, z, n)
    ctx.args = (scale, p, train)


def _backward(ctx, grad, _gh, _gz, _gn):
    x, weight, lora_A, lora_B, magnitude, h, z, n, seed = ctx.saved_tensors
    need = ctx.needs_input_grad
    scale, p, train = ctx.args
    dx, d_a, d_b, d_m = torch.ops.peftc.dora_linear_backward(grad, x, weight, lora_A, lora_B, magnitude, h, z, n,
                                                             scale, p, seed, train, need[0])
    g, x2 = _up(grad.reshape(-1, grad.shape[-1]), x.reshape(-1, x.shape[-1]), dtype=lora_A.dtype)
    d_w = None
    if need[1]:  # trainable base only: d/dW of x W^T + (mn - 1) x_d W^T (the norm is detached)
        mn = magnitude / n
        if dropout_on(p, train):
            d_w = torch.mm(g.t(), x2).addmm_((g * (mn - 1)).t(), x2 * _mask(seed, x2, p))
        else:
            d_w = torch.mm((g * mn).t(), x2)
        d_w = d_w.to(weight.dtype)
    d_bias = g.sum(0).to(weight.dtype) if need[2] else None
    return dx if need[0] else None, d_w, d_bias, d_a, d_b, d_m, None, None, None, None


_dora_linear_op.register_autograd(_backward, setup_context=_setup_context)
register_train_flag(torch.ops.peftc.dora_linear.default)  # set_training flips its ``train``


def dora_linear(x, weight, bias, lora_A, lora_B, magnitude, scale: float, p: float = 0.0, train: bool = False,
                seed: torch.Tensor | None = None) -> torch.Tensor:
    """Call the op and return y; draws a seed from the global RNG when dropout is on and none is given."""
    _check(x, weight, bias, lora_A, lora_B, magnitude, p)
    if seed is None:
        seed = draw_seed(x.device) if dropout_on(p, train) else zero_seed(x.device)
    return torch.ops.peftc.dora_linear(x, weight, bias, lora_A, lora_B, magnitude, float(scale), float(p), seed,
                                       bool(train))[0]
