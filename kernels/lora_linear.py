"""Fused LoRA linear: the frozen base GEMM and the low-rank path in one opaque op.

    y = (x W^T + b + s * B(A(drop(x)))).to(base dtype)     drop(x) = x * keep / (1 - p),  keep ~ Bernoulli(1 - p)

Op (registered on import)::

    torch.ops.peftc.lora_linear(x, weight, bias, lora_A, lora_B, scale, p, seed, train) -> (y, h, bits)
        x (..., in); weight (out, in); bias (out,) or None  -- the base dtype (bf16/fp16/fp32)
        lora_A (r, in); lora_B (out, r)                     -- the adapter dtype (e.g. fp32 on a bf16 base)
        scale: s; p: dropout probability; seed: int64 0-d tensor; train: dropout only when true
        y (..., out) in the base dtype; h = drop(x) A^T (tokens, r) in the adapter dtype; bits: the CPU
        path's drop mask packed 8 per byte (empty on CUDA); h and bits are non-differentiable, saved

Mixed dtypes follow HF PEFT: the low-rank term runs in the adapter dtype on x.to(A.dtype), the
base output is promoted for the add and the sum cast back; dA, dB come back in the adapter dtype,
dx in the base dtype. ``lora_linear(...)`` below calls the op and returns y.

Dropout applies only when ``train and p > 0``. Autograd keeps x (and the parameters it already
holds), the r-wide h and, on CPU, the mask as bits (1/32 of drop(x) in fp32): never a (tokens, in)
copy. Measured on CPU, packing (numpy) is ~20x cheaper than drawing the mask a second time. On
CUDA the mask is a pure function of (seed, token, feature), recomputed wherever x is read.
Backward, g = dY::

    dx = g W + keep/(1-p) * ((s g B) A)      dA = s * (g B)^T drop(x)      dB = s * g^T h

dW = g^T x and db = sum(g) are computed only when weight/bias require grad (never for a frozen
base). Double backward is not supported.

Devices: CPU (and any dtype Triton does not take) runs fused torch code: one addmm for the base,
x A^T once, the low-rank term added in place (addmm_), the mask drawn from a torch.Generator
seeded with ``seed`` (``dropout_mask``). CUDA keeps x W^T and g W on cuBLAS (torch.addmm/mm) and
runs only the LoRA-specific traffic in Triton (``lora_triton``: dropout + x A^T in one pass, the
up-projection accumulated into y in one pass, g B, split-K dA/dB, the masked dx term), autotuned,
with the mask from ``tl.rand(seed, token * in + feature)``. The two devices draw different masks
for a seed; each is consistent between its forward and backward. ``_mm`` (one strided Triton GEMM
with a low-rank epilogue) stays for dora_linear, ia3_linear and quant_linear. Forward and
backward are opaque custom ops with fake impls, so graphs using them survive torch.export and
torch.compile without graph breaks.

    >>> y = lora_linear(x, W, b, A, B, scale=2.0, p=0.05, train=True)   # draws a seed
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch

from peftc.capture import register_train_flag
from peftc.kernels import lora_triton as LT

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is a Linux-only dependency
    triton = None

__all__ = ["lora_linear", "lora_linear_reference", "dropout_mask", "triton_dropout_mask", "pack_bits", "unpack_bits",
           "triton_forward", "triton_backward", "draw_seed"]

BLOCKS = (64, 64, 32)  # Triton (BLOCK_M, BLOCK_N, BLOCK_K); the rank is tiled by 16


# ---------------------------------------------------------------- torch reference and CPU path


def draw_seed(device=None) -> torch.Tensor:
    """A fresh dropout seed from the global RNG (so ``torch.manual_seed`` makes runs repeatable)."""
    return torch.randint(0, 2**62, (), dtype=torch.int64, device=device)


def _drop_bits(seed: torch.Tensor, shape, p: float, device=None) -> torch.Tensor:
    """Bool (tokens, features), true where dropped: four 16-bit lanes per 64-bit draw from
    torch.Generator(seed) (on CPU half the cost of torch.rand's one 32-bit draw per element);
    dropped where lane < p * 2^16, so the keep probability is 1 - p with p rounded to 1/65536."""
    device = torch.device("cpu") if device is None else torch.device(device)
    gen = torch.Generator(device=device).manual_seed(int(seed) & (2**63 - 1))
    n = math.prod(shape)
    words = torch.empty(-(-n // 4), dtype=torch.int64, device=device).random_(-(2**63), None, generator=gen)
    return words.view(torch.int16)[:n].view(shape).lt(round(p * 65536) - 32768)


def dropout_mask(seed: torch.Tensor, shape, p: float, dtype=torch.float32, device=None) -> torch.Tensor:
    """The fused-torch path's keep mask scaled by 1/(1-p) (``_drop_bits``' complement): for references."""
    return (~_drop_bits(seed, shape, p, device)).to(dtype).mul_(1.0 / (1.0 - p))


def pack_bits(drop: torch.Tensor) -> torch.Tensor:
    """Bool (T, d) -> uint8 (T, ceil(d / 8)): the mask kept from forward to backward at 1/32 of
    drop(x) in fp32 (numpy's packbits: ~20x faster here than drawing the mask again)."""
    return torch.from_numpy(np.packbits(drop.numpy(), axis=-1))


def unpack_bits(bits: torch.Tensor, d: int) -> torch.Tensor:
    return torch.from_numpy(np.unpackbits(bits.numpy(), axis=-1, count=d).view(np.bool_))


def lora_linear_reference(x, weight, bias, lora_A, lora_B, scale, mask=None):
    """HF PEFT's eager semantics; ``mask`` is a scaled keep mask (e.g. from ``dropout_mask``). Mixed
    dtypes as PEFT: the low-rank term in the adapter dtype, added after type promotion, cast back."""
    xa = x.to(lora_A.dtype)
    xd = xa if mask is None else xa * mask.reshape(x.shape).to(xa.dtype)
    base = torch.nn.functional.linear(x, weight, bias)
    return (base + (xd @ lora_A.t()) @ lora_B.t() * scale).to(base.dtype)


def _dropout_on(p: float, train: bool) -> bool:
    return bool(train) and p > 0.0


_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check(x, weight, bias, lora_A, lora_B, p):
    """Shape/dtype checks shared by the wrapper and the fake impl (so tracing reports them too)."""
    (out, d), (r, d_a) = weight.shape, lora_A.shape
    if x.shape[-1] != d or d_a != d or tuple(lora_B.shape) != (out, r):
        raise ValueError(f"lora_linear: x {tuple(x.shape)}, weight {tuple(weight.shape)}, lora_A "
                         f"{tuple(lora_A.shape)}, lora_B {tuple(lora_B.shape)}: want (..., in), (out, in), "
                         "(r, in), (out, r)")
    if x.dtype != weight.dtype or lora_A.dtype != lora_B.dtype or lora_A.dtype not in _FLOATS:
        raise ValueError(f"lora_linear: x and weight share the base dtype, lora_A and lora_B a float adapter "
                         f"dtype; got {x.dtype}, {weight.dtype}, {lora_A.dtype}, {lora_B.dtype}")
    if bias is not None and (tuple(bias.shape) != (out,) or bias.dtype != weight.dtype):
        raise ValueError(f"lora_linear: bias {tuple(bias.shape)} {bias.dtype}, want ({out},) {weight.dtype}")
    if not 0.0 <= p < 1.0:
        raise ValueError(f"lora_linear: dropout p={p}, want 0 <= p < 1")


def _as(t, dtype):
    return t if t.dtype == dtype else t.to(dtype)


def _add_low_rank(y, h, lora_B, scale):
    """y + s * h B^T: in place when y has the adapter dtype, else in it and cast back (PEFT's promotion)."""
    if y.dtype == h.dtype:
        return y.addmm_(h, lora_B.t(), alpha=scale)
    return torch.mm(h, lora_B.t()).mul_(scale).add_(y).to(y.dtype)


def _torch_forward(x, weight, bias, lora_A, lora_B, scale, p, seed, train, keep_bits=False):
    """(y, h) or, with ``keep_bits``, (y, h, bits): the packed drop mask for ``_torch_backward``."""
    x2 = x.reshape(-1, x.shape[-1])
    y = torch.mm(x2, weight.t()) if bias is None else torch.addmm(bias, x2, weight.t())
    xa, bits = _as(x2, lora_A.dtype), x2.new_empty(0, dtype=torch.uint8)
    if _dropout_on(p, train):
        drop = _drop_bits(seed, x2.shape, p, x.device)
        xa = xa.masked_fill(drop, 0.0)
        bits = pack_bits(drop) if keep_bits and x.device.type == "cpu" else bits
    h = torch.mm(xa, lora_A.t())  # drop(x) A^T, the 1/(1-p) applied to the r-wide h
    if _dropout_on(p, train):
        h.mul_(1.0 / (1.0 - p))
    y = _add_low_rank(y, h, lora_B, scale).view(*x.shape[:-1], weight.shape[0])
    return (y, h, bits) if keep_bits else (y, h)


def _torch_backward(grad, x, weight, lora_A, lora_B, h, scale, p, seed, train, need_dx, bits=None):
    """(dx, dA, dB); the drop mask from ``bits`` when forward kept it, else drawn again from seed."""
    g = grad.reshape(-1, grad.shape[-1])
    x2 = x.reshape(-1, x.shape[-1])
    on = _dropout_on(p, train)
    drop = None
    if on:
        drop = unpack_bits(bits, x2.shape[1]) if bits is not None and bits.numel() else \
            _drop_bits(seed, x2.shape, p, x.device)
    ga = _as(g, lora_A.dtype)
    gbs = torch.mm(ga, lora_B).mul_(scale / (1.0 - p) if on else scale)  # s/(1-p) * g B: (tokens, r)
    xa = _as(x2, lora_A.dtype)
    d_a = torch.mm(gbs.t(), xa if drop is None else xa.masked_fill(drop, 0.0))
    d_b = torch.mm(h.t(), ga).mul_(scale).t().contiguous()  # (r, T) @ (T, out): faster than g^T h
    if not need_dx:
        return x.new_empty(0), d_a, d_b
    dx = torch.mm(g, weight)
    if drop is None and dx.dtype == gbs.dtype:
        dx.addmm_(gbs, lora_A)
    else:
        low = torch.mm(gbs, lora_A)
        dx.add_((low if drop is None else low.masked_fill_(drop, 0.0)).to(dx.dtype))
    return dx.view(x.shape), d_a, d_b


# ---------------------------------------------------------------- Triton kernel and launchers

if triton is not None:

    @triton.jit
    def _dot(a, b, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
        tl.static_assert(a.dtype == b.dtype, "lora_linear: tl.dot operands must share a dtype")
        if UPCAST:  # triton 3.9's interpreter multiplies raw bf16 bit patterns: take fp32 there
            a, b = a.to(tl.float32), b.to(tl.float32)
        return tl.dot(a, b, input_precision=PRECISION)

    @triton.jit
    def _low_rank_tile(e_ptr, f_ptr, rm, rn, in_m, in_n, R, s_em, s_er, s_fr, s_fn,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
                       PRECISION: tl.constexpr, UPCAST: tl.constexpr):
        """The (rm, rn) tile of E[M, R] @ F[R, N] in fp32: the r-wide term a GEMM's epilogue adds."""
        low = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for r0 in range(0, R, BLOCK_R):
            rr = r0 + tl.arange(0, BLOCK_R)
            e = tl.load(e_ptr + rm[:, None] * s_em + rr[None, :] * s_er, mask=in_m & (rr[None, :] < R), other=0.0)
            f = tl.load(f_ptr + rr[:, None] * s_fr + rn[None, :] * s_fn, mask=(rr[:, None] < R) & in_n, other=0.0)
            low += _dot(e, f, PRECISION, UPCAST)
        return low

    @triton.jit
    def _mm_kernel(
        a_ptr, b_ptr, c_ptr,  # C[M, N] = alpha * A[M, K] @ B[K, N], any strides (views, transposes)
        bias_ptr,  # (N,): added last, when HAS_BIAS
        e_ptr, f_ptr,  # epilogue: C += beta * E[M, R] @ F[R, N], when HAS_EPI
        seed_ptr,  # int64 scalar: dropout seed, read when DROP > 0
        M, N, K, R,
        s_am, s_ak, s_bk, s_bn, s_cm, s_cn, s_em, s_er, s_fr, s_fn,
        alpha, beta, p, drop_ld,  # keep(t, i) = rand(seed, t * drop_ld + i) >= p; x is (t, i)
        HAS_BIAS: tl.constexpr, HAS_EPI: tl.constexpr,
        DROP: tl.constexpr,  # 0 none; x is operand A as (t=m, i=k): 1; operand B (k, n): 2; epilogue (m, n): 3
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
        PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    ):
        rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        in_m, in_n = rm[:, None] < M, rn[None, :] < N
        seed = tl.load(seed_ptr) if DROP > 0 else 0
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            a = tl.load(a_ptr + rm[:, None] * s_am + rk[None, :] * s_ak, mask=in_m & (rk[None, :] < K), other=0.0)
            b = tl.load(b_ptr + rk[:, None] * s_bk + rn[None, :] * s_bn, mask=(rk[:, None] < K) & in_n, other=0.0)
            if DROP == 1:
                a = tl.where(tl.rand(seed, rm[:, None] * drop_ld + rk[None, :]) >= p, a, 0.0)
            if DROP == 2:
                b = tl.where(tl.rand(seed, rk[:, None] * drop_ld + rn[None, :]) >= p, b, 0.0)
            acc += _dot(a, b, PRECISION, UPCAST)
        acc = acc * alpha
        if HAS_EPI:
            low = _low_rank_tile(e_ptr, f_ptr, rm, rn, in_m, in_n, R, s_em, s_er, s_fr, s_fn,
                                 BLOCK_M, BLOCK_N, BLOCK_R, PRECISION, UPCAST)
            if DROP == 3:
                low = tl.where(tl.rand(seed, rm[:, None] * drop_ld + rn[None, :]) >= p, low, 0.0)
            acc += beta * low
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
        tl.store(c_ptr + rm[:, None] * s_cm + rn[None, :] * s_cn, acc.to(c_ptr.dtype.element_ty), mask=in_m & in_n)


def _mm(a, b, *, out_dtype, alpha=1.0, bias=None, epi=None, beta=1.0, drop=0, seed=None, p=0.0, ld=0,
        blocks=None):
    """Launch ``_mm_kernel`` on 2-D (possibly transposed) views: returns alpha*a@b (+ epilogue)."""
    (m, k), (k2, n) = a.shape, b.shape
    if k != k2:
        raise ValueError(f"_mm: inner sizes differ: {tuple(a.shape)} @ {tuple(b.shape)}")
    if max(a.numel(), b.numel(), m * n) >= 2**31:
        raise ValueError(f"lora_linear: Triton indexes with int32; got {tuple(a.shape)} @ {tuple(b.shape)}")
    c = torch.empty(m, n, dtype=out_dtype, device=a.device)
    e, f = epi if epi is not None else (c, c)
    bm, bn, bk = blocks or BLOCKS
    bm = min(bm, max(16, triton.next_power_of_2(m)))  # narrow tiles for the r-wide operands
    bn = min(bn, max(16, triton.next_power_of_2(n)))
    ieee = a.dtype == torch.float32 and not (a.is_cuda and torch.backends.cuda.matmul.allow_tf32)  # as torch
    grid = (triton.cdiv(m, bm), triton.cdiv(n, bn))
    _mm_kernel[grid](
        a, b, c, c if bias is None else bias, e, f, c if seed is None else seed,
        m, n, k, e.shape[1] if epi is not None else 0,
        *a.stride(), *b.stride(), *c.stride(), *e.stride(), *f.stride(),
        float(alpha), float(beta), float(p), ld,
        HAS_BIAS=bias is not None, HAS_EPI=epi is not None, DROP=drop,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, BLOCK_R=16, PRECISION="ieee" if ieee else "tf32",
        UPCAST=a.dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1",
    )
    return c


def _triton_seed(x, seed):
    if triton is None:
        raise RuntimeError("lora_linear: the Triton path needs the triton package")
    return seed.to(device=x.device, dtype=torch.int64)


def triton_forward(x, weight, bias, lora_A, lora_B, scale, p, seed, train, configs=None):
    """(y, h): y = addmm(b, x, W^T) on cuBLAS; h = drop(x) A^T and y += s h B^T by ``lora_triton``.
    ``configs``: one triton.Config per kernel (down, accumulate) instead of autotuning (tests)."""
    seed = _triton_seed(x, seed)
    down_cfg, acc_cfg = configs or (None, None)
    x2 = x.reshape(-1, x.shape[-1])
    on = _dropout_on(p, train)
    y = torch.mm(x2, weight.t()) if bias is None else torch.addmm(bias, x2, weight.t())
    h = LT.down(x2, lora_A, alpha=1 / (1 - p) if on else 1.0, drop=on, seed=seed, p=p, config=down_cfg)
    LT.accumulate(y, h, lora_B.t(), beta=scale, config=acc_cfg)
    return y.view(*x.shape[:-1], weight.shape[0]), h


def triton_backward(grad, x, weight, lora_A, lora_B, h, scale, p, seed, train, need_dx, configs=None):
    """(dx, dA, dB): gb = s g B (down), dA and dB split-K over tokens (wgrad), dx = g W on cuBLAS plus
    keep/(1-p) * gb A (accumulate). ``configs``: (down, accumulate, wgrad) triton.Configs or None."""
    seed = _triton_seed(x, seed)
    down_cfg, acc_cfg, wg_cfg = configs or (None, None, None)
    g, x2 = grad.reshape(-1, grad.shape[-1]), x.reshape(-1, x.shape[-1])
    on = _dropout_on(p, train)
    inv = 1 / (1 - p) if on else 1.0
    gb = LT.down(g, lora_B.t(), alpha=scale, config=down_cfg)  # (tokens, r) in the adapter dtype
    d_a = LT.wgrad(x2, gb, alpha=inv, drop=on, seed=seed, p=p, config=wg_cfg).t().contiguous()
    d_b = LT.wgrad(g, h, alpha=scale, config=wg_cfg)
    if not need_dx:
        return x.new_empty(0), d_a, d_b
    dx = torch.mm(g, weight)
    LT.accumulate(dx, gb, lora_A, beta=inv, drop=on, seed=seed, p=p, config=acc_cfg)
    return dx.view(x.shape), d_a, d_b


def triton_dropout_mask(seed, tokens, features, p, device=None) -> torch.Tensor:
    """The Triton path's scaled keep mask (drop(ones) through the kernel): for tests and references."""
    ones = torch.ones(tokens, features, device=device)
    eye = torch.eye(features, device=device)
    return _mm(ones, eye, out_dtype=torch.float32, alpha=1 / (1 - p), drop=1,
               seed=_triton_seed(ones, seed), p=p, ld=features, blocks=(16, 16, 16))


def _use_triton(x, lora_A=None) -> bool:
    ok = (torch.float16, torch.bfloat16, torch.float32)
    return triton is not None and x.dtype in ok and (lora_A is None or lora_A.dtype in ok)


def _forward(x, weight, bias, lora_A, lora_B, scale, p, seed, train):
    if _use_triton(x, lora_A) and x.is_cuda:
        return (*triton_forward(x, weight, bias, lora_A, lora_B, scale, p, seed, train), _no_bits(x))
    return _torch_forward(x, weight, bias, lora_A, lora_B, scale, p, seed, train, keep_bits=True)


def _no_bits(x):
    return x.new_empty(0, dtype=torch.uint8)


# ---------------------------------------------------------------- custom-op registration


@torch.library.custom_op("peftc::lora_linear", mutates_args=())
def _lora_linear_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_A: torch.Tensor,
                    lora_B: torch.Tensor, scale: float, p: float, seed: torch.Tensor,
                    train: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _forward(x, weight, bias, lora_A, lora_B, scale, p, seed, train)


@_lora_linear_op.register_fake
def _(x, weight, bias, lora_A, lora_B, scale, p, seed, train):
    _check(x, weight, bias, lora_A, lora_B, p)
    tokens = x.numel() // x.shape[-1]
    keep = _dropout_on(p, train) and x.device.type == "cpu"  # CPU keeps the packed mask for backward
    bits = x.new_empty(tokens, -(-x.shape[-1] // 8), dtype=torch.uint8) if keep else _no_bits(x)
    return x.new_empty(*x.shape[:-1], weight.shape[0]), lora_A.new_empty(tokens, lora_A.shape[0]), bits


@torch.library.custom_op("peftc::lora_linear_backward", mutates_args=())
def _lora_linear_backward_op(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, lora_A: torch.Tensor,
                             lora_B: torch.Tensor, h: torch.Tensor, bits: torch.Tensor, scale: float, p: float,
                             seed: torch.Tensor, train: bool,
                             need_dx: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if _use_triton(x, lora_A) and x.is_cuda:
        return triton_backward(grad, x, weight, lora_A, lora_B, h, scale, p, seed, train, need_dx)
    return _torch_backward(grad, x, weight, lora_A, lora_B, h, scale, p, seed, train, need_dx, bits)


@_lora_linear_backward_op.register_fake
def _(grad, x, weight, lora_A, lora_B, h, bits, scale, p, seed, train, need_dx):
    dx = x.new_empty(x.shape) if need_dx else x.new_empty(0)
    return dx, torch.empty_like(lora_A), torch.empty_like(lora_B)


def _setup_context(ctx, inputs, output):
    x, weight, bias, lora_A, lora_B, scale, p, seed, train = inputs
    ctx.save_for_backward(x, weight, lora_A, lora_B, output[1], output[2], seed)  # x, h, mask bits: no drop(x)
    ctx.mark_non_differentiable(output[1], output[2])
    ctx.args = (scale, p, train)


def _backward(ctx, grad, _grad_h, _grad_bits):
    x, weight, lora_A, lora_B, h, bits, seed = ctx.saved_tensors
    need = ctx.needs_input_grad
    scale, p, train = ctx.args
    dx, d_a, d_b = torch.ops.peftc.lora_linear_backward(grad, x, weight, lora_A, lora_B, h, bits, scale, p, seed,
                                                        train, need[0])
    g = grad.reshape(-1, grad.shape[-1])
    d_w = torch.mm(g.t(), x.reshape(-1, x.shape[-1])) if need[1] else None  # trainable base only
    d_bias = g.sum(0) if need[2] else None
    return dx if need[0] else None, d_w, d_bias, d_a, d_b, None, None, None, None


_lora_linear_op.register_autograd(_backward, setup_context=_setup_context)
register_train_flag(torch.ops.peftc.lora_linear.default)  # set_training flips its ``train``


def lora_linear(x, weight, bias, lora_A, lora_B, scale: float, p: float = 0.0, train: bool = False,
                seed: torch.Tensor | None = None) -> torch.Tensor:
    """Call the op; draws a seed from the global RNG when dropout is on and none is given."""
    _check(x, weight, bias, lora_A, lora_B, p)
    if seed is None:
        on = _dropout_on(p, train)
        seed = draw_seed(x.device) if on else torch.zeros((), dtype=torch.int64, device=x.device)
    return torch.ops.peftc.lora_linear(x, weight, bias, lora_A, lora_B, float(scale), float(p), seed, bool(train))[0]
