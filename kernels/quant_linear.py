"""Quantized frozen linear: weights stored NF4, int4, int8 or int8g (kernels/quant_formats.py), read packed
inside the op (+ LoRA / DoRA).

Ops (registered on import)::

    peftc::quant_linear(x, data, qscale, qscale2, qoffset, bias, lora_A?, lora_B?, scale, p, seed?, train,
                        fmt, block_size) -> (y, h)       y = x deq(W)^T + b [+ s drop(x) A^T B^T]; h as lora_linear
    peftc::quant_dora_linear(x, data, qscale, qscale2, qoffset, bias, lora_A, lora_B, magnitude, scale, p,
                             seed, train, fmt, block_size) -> (y, h, z, n)      dora_linear on deq(W)
    peftc::dequantize(data, qscale, qscale2, qoffset, fmt, block_size, dtype) -> W    (no autograd: frozen)

Autograd saves the quantized tensors (buffers, no copy), x and h (with LoRA), never a dequantized
weight: backward dequantizes again for dx = g deq(W) (+ the LoRA terms, as lora_linear). W never
gets a gradient (it is frozen); the bias may (BitFit). CPU, up to ``quant_gemv.MAX_ROWS`` rows
(decode) without dropout: ``quant_gemv.packed_linear`` reads the packed codes, bias and LoRA in the
same C call; more rows, dropout, backward and DoRA: the weight is dequantized into a temporary inside
the op (freed on return), then lora_linear's / dora_linear's fused torch code runs. CUDA
fp16/bf16/fp32: ``_qmm_kernel`` dequantizes W tiles in registers inside the GEMM
(forward x W^T and backward g W) with the LoRA term in its epilogue, as ``gemm.mm``;
DoRA on CUDA dequantizes to a temporary and runs dora_linear's Triton path.

    >>> q = quantize_weight(W, "nf4", 64, True)
    >>> y, h = torch.ops.peftc.quant_linear(x, *q, b, A, B, 2.0, 0.0, None, False, "nf4", 64)
"""

from __future__ import annotations

import torch

from peftc.capture import register_train_flag
from peftc.kernels.common import draw_seed, dropout_on, lora_torch_backward, lora_torch_forward, zero_seed
from peftc.kernels.dora_linear import dora_backward, dora_forward
from peftc.kernels.gemm import BLOCKS, mm, precision, triton_seed, triton_takes, upcast
from peftc.kernels.quant_formats import GROUP, NF4_CODE, dequantize, in_features, quantize_weight, weight_bits
from peftc.kernels.quant_gemv import packed_linear

try:
    import triton
    import triton.language as tl

    from peftc.kernels.gemm import dot, low_rank_tile
except ImportError:  # pragma: no cover - triton is a Linux-only dependency
    triton = None

__all__ = ["NF4_CODE", "GROUP", "quantize_weight", "dequantize", "weight_bits", "quant_linear",
           "triton_forward", "triton_backward"]

# ---------------------------------------------------------------- Triton: dequant inside the GEMM

if triton is not None:

    @triton.jit
    def _dequant_tile(q_ptr, s_ptr, s2_ptr, off_ptr, code_ptr, rows, cols, w_in, mask,
                      FMT: tl.constexpr, BLOCK_Q: tl.constexpr, DQ: tl.constexpr):
        """W[rows, cols] (fp32) of a quantized (out, in) weight; rows, cols broadcast to the tile."""
        if FMT == 2:  # int4: group of BLOCK_Q = BLOCK_Q / 2 bytes, byte j = q[j] | q[j + BLOCK_Q / 2] << 4
            e = rows * w_in + cols
            grp, j = e // BLOCK_Q, e % BLOCK_Q
            byte = tl.load(q_ptr + grp * (BLOCK_Q // 2) + j % (BLOCK_Q // 2), mask=mask, other=0)
            nib = tl.where(j < BLOCK_Q // 2, byte & 15, byte >> 4).to(tl.float32)
            d = tl.load(s_ptr + grp, mask=mask, other=0.0).to(tl.float32)
            return nib * d + tl.load(off_ptr + grp, mask=mask, other=0.0).to(tl.float32)
        elif FMT == 0:  # nf4: two codes per byte, first in the high nibble; absmax per BLOCK_Q along a row
            e = rows * w_in + cols
            byte = tl.load(q_ptr + e // 2, mask=mask, other=0)
            nib = tl.where(e % 2 == 0, byte >> 4, byte & 15).to(tl.int32)
            blk = e // BLOCK_Q
            if DQ:  # double quant: int8 code * step of its group of 256 + mean
                sc = tl.load(s_ptr + blk, mask=mask, other=0).to(tl.float32) * tl.load(s2_ptr + blk // 256, mask=mask,
                                                                                       other=0.0) + tl.load(off_ptr)
            else:
                sc = tl.load(s_ptr + blk, mask=mask, other=0.0)
            return tl.load(code_ptr + nib, mask=mask, other=0.0) * sc
        else:  # int8: per-row step
            v = tl.load(q_ptr + rows * w_in + cols, mask=mask, other=0).to(tl.float32)
            return v * tl.load(s_ptr + rows + cols * 0, mask=mask, other=0.0)

    @triton.jit
    def _qmm_kernel(
        a_ptr, c_ptr,  # C[M, N] = A[M, K] @ W^T (TRANS=0, W (N, K)) or A @ W (TRANS=1, W (K, N)); A, C strided
        q_ptr, s_ptr, s2_ptr, off_ptr, code_ptr,  # the quantized weight (see _dequant_tile); code: NF4 fp32 (16,)
        bias_ptr, e_ptr, f_ptr, seed_ptr,  # bias (N,); epilogue C += beta * E[M, R] @ F[R, N]; dropout seed
        M, N, K, R, W_IN,
        s_am, s_ak, s_cm, s_cn, s_em, s_er, s_fr, s_fn,
        beta, p, drop_ld,  # DROP=3: the epilogue term kept where rand(seed, m * drop_ld + n) >= p
        FMT: tl.constexpr, BLOCK_Q: tl.constexpr, DQ: tl.constexpr, TRANS: tl.constexpr,
        HAS_BIAS: tl.constexpr, HAS_EPI: tl.constexpr, DROP: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
        PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    ):
        rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        in_m, in_n = rm[:, None] < M, rn[None, :] < N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            a = tl.load(a_ptr + rm[:, None] * s_am + rk[None, :] * s_ak, mask=in_m & (rk[None, :] < K), other=0.0)
            wmask = (rk[:, None] < K) & in_n
            if TRANS:
                w = _dequant_tile(q_ptr, s_ptr, s2_ptr, off_ptr, code_ptr, rk[:, None], rn[None, :], W_IN, wmask,
                                  FMT, BLOCK_Q, DQ)
            else:
                w = _dequant_tile(q_ptr, s_ptr, s2_ptr, off_ptr, code_ptr, rn[None, :], rk[:, None], W_IN, wmask,
                                  FMT, BLOCK_Q, DQ)
            acc += dot(a, w.to(a_ptr.dtype.element_ty), PRECISION, UPCAST)
        if HAS_EPI:
            low = low_rank_tile(e_ptr, f_ptr, rm, rn, in_m, in_n, R, s_em, s_er, s_fr, s_fn,
                                BLOCK_M, BLOCK_N, BLOCK_R, PRECISION, UPCAST)
            if DROP == 3:
                low = tl.where(tl.rand(tl.load(seed_ptr), rm[:, None] * drop_ld + rn[None, :]) >= p, low, 0.0)
            acc += beta * low
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
        tl.store(c_ptr + rm[:, None] * s_cm + rn[None, :] * s_cn, acc.to(c_ptr.dtype.element_ty), mask=in_m & in_n)


def _qmm(a, q, fmt, block_size, *, trans, bias=None, epi=None, beta=1.0, seed=None, p=0.0, blocks=None):
    """``_qmm_kernel`` on 2-D ``a``: a @ deq(W)^T (trans=False) or a @ deq(W) (trans=True), + epilogue."""
    data, qscale, qscale2, qoffset = q
    out, w_in = data.shape[0], in_features(data, fmt)
    m, k = a.shape
    n = w_in if trans else out
    if k != (out if trans else w_in):
        raise ValueError(f"quant_linear: operand {tuple(a.shape)} does not fit the weight ({out}, {w_in})")
    if max(a.numel(), out * w_in, m * n) >= 2**31:
        raise ValueError("quant_linear: Triton indexes with int32")
    c = torch.empty(m, n, dtype=a.dtype, device=a.device)
    e, f = epi if epi is not None else (c, c)
    bm, bn, bk = blocks or BLOCKS
    bm = min(bm, max(16, triton.next_power_of_2(m)))
    code = torch.tensor(NF4_CODE, device=a.device)
    offset = qoffset if qoffset.numel() else code
    grid = (triton.cdiv(m, bm), triton.cdiv(n, bn))
    _qmm_kernel[grid](
        a, c, data, qscale, qscale2 if qscale2.numel() else code, offset, code,
        c if bias is None else bias, e, f, c if seed is None else seed,
        m, n, k, e.shape[1] if epi is not None else 0, w_in,
        *a.stride(), *c.stride(), *e.stride(), *f.stride(), float(beta), float(p), n,
        FMT={"nf4": 0, "int8": 1, "int4": 2}[fmt], BLOCK_Q=block_size, DQ=qscale2.numel() > 0, TRANS=trans,
        HAS_BIAS=bias is not None, HAS_EPI=epi is not None, DROP=3 if seed is not None else 0,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, BLOCK_R=16, PRECISION=precision(a), UPCAST=upcast(a),
    )
    return c


def triton_forward(x, q, bias, lora_A, lora_B, scale, p, seed, train, fmt, block_size, blocks=None):
    """(y, h): h = drop(x) A^T (lora_linear's kernel), y = x deq(W)^T + b + s h B^T in one dequant GEMM."""
    x2 = x.reshape(-1, x.shape[-1])
    h, epi = x.new_empty(0), None
    if lora_A is not None:
        on = dropout_on(p, train)
        sd = triton_seed(x, seed, "quant_linear") if on else None
        h = mm(x2, lora_A.t(), out_dtype=x.dtype, alpha=1 / (1 - p) if on else 1.0, drop=1 if on else 0,
               seed=sd, p=p, ld=x2.shape[1], blocks=blocks)
        epi = (h, lora_B.t())
    y = _qmm(x2, q, fmt, block_size, trans=False, bias=bias, epi=epi, beta=scale, blocks=blocks)
    return y.view(*x.shape[:-1], y.shape[1]), h


def triton_backward(grad, x, q, lora_A, lora_B, h, scale, p, seed, train, fmt, block_size, need_dx, blocks=None):
    """(dx, dA, dB): dx = g deq(W) (+ s keep * (g B) A) in one dequant GEMM; dA, dB as lora_linear."""
    g = grad.reshape(-1, grad.shape[-1])
    none = g.new_empty(0)
    d_a = d_b = none
    epi, beta, sd = None, 1.0, None
    if lora_A is not None:
        x2 = x.reshape(-1, x.shape[-1])
        on = dropout_on(p, train)
        inv = 1 / (1 - p) if on else 1.0
        sd = triton_seed(x, seed, "quant_linear") if on else None
        gb = mm(g, lora_B, out_dtype=x.dtype, blocks=blocks)
        d_a = mm(gb.t(), x2, out_dtype=lora_A.dtype, alpha=scale * inv, drop=2 if on else 0, seed=sd, p=p,
                 ld=x2.shape[1], blocks=blocks)
        d_b = mm(g.t(), h, out_dtype=lora_B.dtype, alpha=scale, blocks=blocks)
        epi, beta = (gb, lora_A), scale * inv
    if not need_dx:
        return none, d_a, d_b
    dx = _qmm(g, q, fmt, block_size, trans=True, epi=epi, beta=beta, seed=sd, p=p, blocks=blocks)
    return dx.view(*grad.shape[:-1], dx.shape[1]), d_a, d_b


def _use_triton(x, fmt, lora_A=None) -> bool:
    """CUDA with fp16/bf16/fp32; adapters in another dtype (fp32 on bf16) run the torch code, as does
    int8g (GGUF's Q8_0), which the tile dequantizer does not read yet."""
    return triton_takes(x) and x.is_cuda and fmt != "int8g" and (lora_A is None or lora_A.dtype == x.dtype)


# ---------------------------------------------------------------- CPU path (packed GEMV or a dequantized temporary)


def _torch_forward(x, q, bias, lora_A, lora_B, scale, p, seed, train, fmt, block_size):
    if lora_A is None or not dropout_on(p, train):  # a few rows: the codes read in place (LoRA included)
        out = packed_linear(x.reshape(-1, x.shape[-1]), q, fmt, block_size, bias, lora_A, lora_B, scale)
        if out is not None:
            return out[0].view(*x.shape[:-1], out[0].shape[1]).to(x.dtype), out[1]
    w = dequantize(*q, fmt, block_size, x.dtype)
    if lora_A is None:
        return torch.nn.functional.linear(x, w, bias), x.new_empty(0)
    seed = zero_seed() if seed is None else seed
    return lora_torch_forward(x, w, bias, lora_A, lora_B, scale, p, seed, train)


def _torch_backward(grad, x, q, lora_A, lora_B, h, scale, p, seed, train, fmt, block_size, need_dx):
    w = dequantize(*q, fmt, block_size, grad.dtype)
    if lora_A is None:
        return grad @ w, grad.new_empty(0), grad.new_empty(0)
    seed = zero_seed() if seed is None else seed
    return lora_torch_backward(grad, x, w, lora_A, lora_B, h, scale, p, seed, train, need_dx)


# ---------------------------------------------------------------- custom ops


@torch.library.custom_op("peftc::dequantize", mutates_args=())
def _dequantize_op(data: torch.Tensor, qscale: torch.Tensor, qscale2: torch.Tensor, qoffset: torch.Tensor,
                   fmt: str, block_size: int, dtype: torch.dtype) -> torch.Tensor:
    return dequantize(data, qscale, qscale2, qoffset, fmt, block_size, dtype)


@_dequantize_op.register_fake
def _(data, qscale, qscale2, qoffset, fmt, block_size, dtype):
    return data.new_empty(data.shape[0], in_features(data, fmt), dtype=dtype)


@torch.library.custom_op("peftc::quant_linear", mutates_args=())
def _quant_linear_op(x: torch.Tensor, data: torch.Tensor, qscale: torch.Tensor, qscale2: torch.Tensor,
                     qoffset: torch.Tensor, bias: torch.Tensor | None, lora_A: torch.Tensor | None,
                     lora_B: torch.Tensor | None, scale: float, p: float, seed: torch.Tensor | None, train: bool,
                     fmt: str, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    q = (data, qscale, qscale2, qoffset)
    fn = triton_forward if _use_triton(x, fmt, lora_A) else _torch_forward
    return fn(x, q, bias, lora_A, lora_B, scale, p, seed, train, fmt, block_size)


@_quant_linear_op.register_fake
def _(x, data, qscale, qscale2, qoffset, bias, lora_A, lora_B, scale, p, seed, train, fmt, block_size):
    if x.shape[-1] != in_features(data, fmt):
        raise ValueError(f"quant_linear: x {tuple(x.shape)} does not fit a ({data.shape[0]}, "
                         f"{in_features(data, fmt)}) weight")
    h = x.new_empty(0) if lora_A is None else lora_A.new_empty(x.numel() // x.shape[-1], lora_A.shape[0])
    return x.new_empty(*x.shape[:-1], data.shape[0]), h


@torch.library.custom_op("peftc::quant_linear_backward", mutates_args=())
def _quant_linear_backward_op(grad: torch.Tensor, x: torch.Tensor, data: torch.Tensor, qscale: torch.Tensor,
                              qscale2: torch.Tensor, qoffset: torch.Tensor, lora_A: torch.Tensor | None,
                              lora_B: torch.Tensor | None, h: torch.Tensor, scale: float, p: float,
                              seed: torch.Tensor | None, train: bool, fmt: str, block_size: int,
                              need_dx: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    q = (data, qscale, qscale2, qoffset)
    fn = triton_backward if _use_triton(grad, fmt, lora_A) else _torch_backward
    return fn(grad, x, q, lora_A, lora_B, h, scale, p, seed, train, fmt, block_size, need_dx)


@_quant_linear_backward_op.register_fake
def _(grad, x, data, qscale, qscale2, qoffset, lora_A, lora_B, h, scale, p, seed, train, fmt, block_size, need_dx):
    dx = grad.new_empty(*grad.shape[:-1], in_features(data, fmt)) if need_dx else grad.new_empty(0)
    none = grad.new_empty(0)
    return dx, none if lora_A is None else torch.empty_like(lora_A), none if lora_B is None else torch.empty_like(lora_B)


def _setup(ctx, inputs, output):
    x, data, qscale, qscale2, qoffset, bias, lora_A, lora_B, scale, p, seed, train, fmt, block_size = inputs
    lora = lora_A is not None  # without LoRA backward needs only the quantized weight (and g)
    ctx.save_for_backward(x if lora else None, data, qscale, qscale2, qoffset, lora_A, lora_B, output[1], seed)
    ctx.mark_non_differentiable(output[1])
    ctx.args = (scale, p, train, fmt, block_size)


def _backward(ctx, grad, _grad_h):
    x, data, qscale, qscale2, qoffset, lora_A, lora_B, h, seed = ctx.saved_tensors
    need = ctx.needs_input_grad
    scale, p, train, fmt, block_size = ctx.args
    dx, d_a, d_b = torch.ops.peftc.quant_linear_backward(
        grad, grad.new_empty(0) if x is None else x, data, qscale, qscale2, qoffset, lora_A, lora_B, h, scale, p,
        seed, train, fmt, block_size, need[0])
    d_bias = grad.reshape(-1, grad.shape[-1]).sum(0) if need[5] else None
    lora = lora_A is not None
    return (dx if need[0] else None, None, None, None, None, d_bias, d_a if lora else None, d_b if lora else None,
            None, None, None, None, None, None)


_quant_linear_op.register_autograd(_backward, setup_context=_setup)
register_train_flag(torch.ops.peftc.quant_linear.default)  # set_training flips its ``train``


@torch.library.custom_op("peftc::quant_dora_linear", mutates_args=())
def _quant_dora_op(x: torch.Tensor, data: torch.Tensor, qscale: torch.Tensor, qscale2: torch.Tensor,
                   qoffset: torch.Tensor, bias: torch.Tensor | None, lora_A: torch.Tensor, lora_B: torch.Tensor,
                   magnitude: torch.Tensor, scale: float, p: float, seed: torch.Tensor, train: bool, fmt: str,
                   block_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    w = dequantize(data, qscale, qscale2, qoffset, fmt, block_size, x.dtype)
    return dora_forward(x, w, bias, lora_A, lora_B, magnitude, scale, p, seed, train)  # mixed dtypes too


@_quant_dora_op.register_fake
def _(x, data, qscale, qscale2, qoffset, bias, lora_A, lora_B, magnitude, scale, p, seed, train, fmt, block_size):
    tokens, out = x.numel() // x.shape[-1], data.shape[0]
    return (x.new_empty(*x.shape[:-1], out), lora_A.new_empty(tokens, lora_A.shape[0]),
            lora_A.new_empty(tokens, out), magnitude.new_empty(out))


@torch.library.custom_op("peftc::quant_dora_linear_backward", mutates_args=())
def _quant_dora_backward_op(grad: torch.Tensor, x: torch.Tensor, data: torch.Tensor, qscale: torch.Tensor,
                            qscale2: torch.Tensor, qoffset: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
                            magnitude: torch.Tensor, h: torch.Tensor, z: torch.Tensor, n: torch.Tensor, scale: float,
                            p: float, seed: torch.Tensor, train: bool, fmt: str, block_size: int,
                            need_dx: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    w = dequantize(data, qscale, qscale2, qoffset, fmt, block_size, x.dtype)
    return dora_backward(grad, x, w, lora_A, lora_B, magnitude, h, z, n, scale, p, seed, train, need_dx)


@_quant_dora_backward_op.register_fake
def _(grad, x, data, qscale, qscale2, qoffset, lora_A, lora_B, magnitude, h, z, n, scale, p, seed, train, fmt,
      block_size, need_dx):
    dx = x.new_empty(x.shape) if need_dx else x.new_empty(0)
    return dx, torch.empty_like(lora_A), torch.empty_like(lora_B), torch.empty_like(magnitude)


def _dora_setup(ctx, inputs, output):
    x, data, qscale, qscale2, qoffset, bias, lora_A, lora_B, magnitude, scale, p, seed, train, fmt, block = inputs
    _, h, z, n = output
    ctx.save_for_backward(x, data, qscale, qscale2, qoffset, lora_A, lora_B, magnitude, h, z, n, seed)
    ctx.mark_non_differentiable(h, z, n)
    ctx.args = (scale, p, train, fmt, block)


def _dora_backward(ctx, grad, _gh, _gz, _gn):
    x, data, qscale, qscale2, qoffset, lora_A, lora_B, magnitude, h, z, n, seed = ctx.saved_tensors
    need = ctx.needs_input_grad
    scale, p, train, fmt, block = ctx.args
    dx, d_a, d_b, d_m = torch.ops.peftc.quant_dora_linear_backward(
        grad, x, data, qscale, qscale2, qoffset, lora_A, lora_B, magnitude, h, z, n, scale, p, seed, train, fmt,
        block, need[0])
    d_bias = grad.reshape(-1, grad.shape[-1]).sum(0) if need[5] else None
    return (dx if need[0] else None, None, None, None, None, d_bias, d_a, d_b, d_m, None, None, None, None, None,
            None)


_quant_dora_op.register_autograd(_dora_backward, setup_context=_dora_setup)
register_train_flag(torch.ops.peftc.quant_dora_linear.default)  # set_training flips its ``train``


def quant_linear(x, q, bias=None, lora_A=None, lora_B=None, scale: float = 1.0, p: float = 0.0,
                 train: bool = False, fmt: str = "nf4", block_size: int = 64, seed=None) -> torch.Tensor:
    """Call ``peftc::quant_linear`` with a ``quantize_weight`` tuple; draws a dropout seed when needed."""
    if seed is None and lora_A is not None and dropout_on(p, train):
        seed = draw_seed(x.device)
    return torch.ops.peftc.quant_linear(x, *q, bias, lora_A, lora_B, float(scale), float(p), seed, bool(train),
                                        fmt, int(block_size))[0]
