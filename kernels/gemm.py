"""Triton building blocks the fused ops share: one public module, so no kernel reads another's
private names (the torch-side helpers are in ``common.py``).

    dot, low_rank_tile      @triton.jit functions other kernels call: ``tl.dot`` with the interpreter's
                            bf16 workaround, and the (m, n) tile of an r-wide product E @ F in fp32
    mm                      one strided GEMM with a bias, a low-rank epilogue and in-kernel dropout
                            (lora_linear's mask reference, dora_linear's h and dA, quant_linear's LoRA terms)
    scaled_mm, colsum       a GEMM with a prologue scale along K / a column scale (ia3_linear, dora_linear),
                            and a column sum of a product (their vector gradients)
    triton_dropout_mask     the Triton paths' scaled keep mask, keep = rand(seed, t * ld + i) >= p
    triton_takes, triton_seed, precision, upcast, BLOCKS
                            dispatch and launch settings every launcher shares

The mask is a pure function of (seed, position): every kernel that reads x draws the same keep.

    >>> c = mm(x2, A.t(), out_dtype=x2.dtype, drop=1, seed=seed, p=0.1, ld=x2.shape[1])   # drop(x) A^T
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is a Linux-only dependency
    triton = None

__all__ = ["BLOCKS", "TRITON_DTYPES", "triton_takes", "triton_seed", "precision", "upcast", "mm", "scaled_mm", "colsum",
           "triton_dropout_mask", "dot", "low_rank_tile"]

BLOCKS = (64, 64, 32)  # Triton (BLOCK_M, BLOCK_N, BLOCK_K); the rank is tiled by 16
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def triton_takes(*tensors) -> bool:
    """Triton is installed and every given tensor (None skipped) is fp16, bf16 or fp32."""
    return triton is not None and all(t.dtype in TRITON_DTYPES for t in tensors if t is not None)


def triton_seed(x: torch.Tensor, seed: torch.Tensor, name: str = "the kernel") -> torch.Tensor:
    """``seed`` as the int64 scalar on x's device a kernel loads; an error without triton."""
    if triton is None:
        raise RuntimeError(f"{name}: the Triton path needs the triton package")
    return seed.to(device=x.device, dtype=torch.int64)


def precision(a: torch.Tensor) -> str:
    """``tl.dot``'s input precision for operand dtype ``a.dtype``, as torch's matmul picks it."""
    ieee = a.dtype == torch.float32 and not (a.is_cuda and torch.backends.cuda.matmul.allow_tf32)
    return "ieee" if ieee else "tf32"


def upcast(a: torch.Tensor) -> bool:
    """The kernels' UPCAST flag: bf16 tiles are multiplied in fp32 under triton 3.9's interpreter,
    which multiplies raw bf16 bit patterns."""
    return a.dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1"


if triton is not None:

    @triton.jit
    def dot(a, b, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
        """``tl.dot`` of two tiles of one dtype, accumulated in fp32 (bf16 taken as fp32 when UPCAST)."""
        tl.static_assert(a.dtype == b.dtype, "dot: tl.dot operands must share a dtype")
        if UPCAST:  # triton 3.9's interpreter multiplies raw bf16 bit patterns: take fp32 there
            a, b = a.to(tl.float32), b.to(tl.float32)
        return tl.dot(a, b, input_precision=PRECISION)

    @triton.jit
    def low_rank_tile(e_ptr, f_ptr, rm, rn, in_m, in_n, R, s_em, s_er, s_fr, s_fn,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
                      PRECISION: tl.constexpr, UPCAST: tl.constexpr):
        """The (rm, rn) tile of E[M, R] @ F[R, N] in fp32: the r-wide term a GEMM's epilogue adds."""
        low = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for r0 in range(0, R, BLOCK_R):
            rr = r0 + tl.arange(0, BLOCK_R)
            e = tl.load(e_ptr + rm[:, None] * s_em + rr[None, :] * s_er, mask=in_m & (rr[None, :] < R), other=0.0)
            f = tl.load(f_ptr + rr[:, None] * s_fr + rn[None, :] * s_fn, mask=(rr[:, None] < R) & in_n, other=0.0)
            low += dot(e, f, PRECISION, UPCAST)
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
            acc += dot(a, b, PRECISION, UPCAST)
        acc = acc * alpha
        if HAS_EPI:
            low = low_rank_tile(e_ptr, f_ptr, rm, rn, in_m, in_n, R, s_em, s_er, s_fr, s_fn,
                                 BLOCK_M, BLOCK_N, BLOCK_R, PRECISION, UPCAST)
            if DROP == 3:
                low = tl.where(tl.rand(seed, rm[:, None] * drop_ld + rn[None, :]) >= p, low, 0.0)
            acc += beta * low
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
        tl.store(c_ptr + rm[:, None] * s_cm + rn[None, :] * s_cn, acc.to(c_ptr.dtype.element_ty), mask=in_m & in_n)

    @triton.jit
    def _scaled_mm_kernel(
        a_ptr, b_ptr, c_ptr,  # C[M, N] = alpha * (A[M, K] * pro[K]) @ B[K, N], any strides
        u_ptr,  # (M, N): the tile before the column scale, stored when STORE_U
        bias_ptr,  # (N,): added after alpha, when HAS_BIAS
        pro_ptr,  # (K,): scales A's columns before the dot, when PRO
        col_ptr,  # (N,): scales C's columns last, when COL
        M, N, K,
        s_am, s_ak, s_bk, s_bn, s_cm, s_cn, s_um, s_un,
        alpha,
        HAS_BIAS: tl.constexpr, PRO: tl.constexpr, COL: tl.constexpr, STORE_U: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    ):
        rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        in_m, in_n = rm[:, None] < M, rn[None, :] < N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            a = tl.load(a_ptr + rm[:, None] * s_am + rk[None, :] * s_ak, mask=in_m & (rk[None, :] < K), other=0.0)
            b = tl.load(b_ptr + rk[:, None] * s_bk + rn[None, :] * s_bn, mask=(rk[:, None] < K) & in_n, other=0.0)
            if PRO:  # rounded to A's dtype, as the torch path's x * vec
                s = tl.load(pro_ptr + rk, mask=rk < K, other=0.0).to(tl.float32)
                a = (a.to(tl.float32) * s[None, :]).to(a.dtype)
            acc += dot(a, b, PRECISION, UPCAST)
        acc = acc * alpha
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
        if STORE_U:
            tl.store(u_ptr + rm[:, None] * s_um + rn[None, :] * s_un, acc.to(u_ptr.dtype.element_ty),
                     mask=in_m & in_n)
        if COL:
            acc = acc * tl.load(col_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
        tl.store(c_ptr + rm[:, None] * s_cm + rn[None, :] * s_cn, acc.to(c_ptr.dtype.element_ty), mask=in_m & in_n)

    @triton.jit
    def _colsum_kernel(
        a_ptr, b_ptr, out_ptr,  # out[N] = sum_m A[m, n] * B[m, n], fp32 accumulation
        M, N, s_am, s_an, s_bm, s_bn,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for m0 in range(0, M, BLOCK_M):
            rm = m0 + tl.arange(0, BLOCK_M)
            mask = (rm[:, None] < M) & (rn[None, :] < N)
            a = tl.load(a_ptr + rm[:, None] * s_am + rn[None, :] * s_an, mask=mask, other=0.0).to(tl.float32)
            b = tl.load(b_ptr + rm[:, None] * s_bm + rn[None, :] * s_bn, mask=mask, other=0.0).to(tl.float32)
            acc += tl.sum(a * b, axis=0)
        tl.store(out_ptr + rn, acc.to(out_ptr.dtype.element_ty), mask=rn < N)


def mm(a, b, *, out_dtype, alpha=1.0, bias=None, epi=None, beta=1.0, drop=0, seed=None, p=0.0, ld=0, blocks=None):
    """Launch ``_mm_kernel`` on 2-D (possibly transposed) views: returns alpha*a@b (+ epilogue)."""
    (m, k), (k2, n) = a.shape, b.shape
    if k != k2:
        raise ValueError(f"mm: inner sizes differ: {tuple(a.shape)} @ {tuple(b.shape)}")
    if max(a.numel(), b.numel(), m * n) >= 2**31:
        raise ValueError(f"mm: Triton indexes with int32; got {tuple(a.shape)} @ {tuple(b.shape)}")
    c = torch.empty(m, n, dtype=out_dtype, device=a.device)
    e, f = epi if epi is not None else (c, c)
    bm, bn, bk = blocks or BLOCKS
    bm = min(bm, max(16, triton.next_power_of_2(m)))  # narrow tiles for the r-wide operands
    bn = min(bn, max(16, triton.next_power_of_2(n)))
    grid = (triton.cdiv(m, bm), triton.cdiv(n, bn))
    _mm_kernel[grid](
        a, b, c, c if bias is None else bias, e, f, c if seed is None else seed,
        m, n, k, e.shape[1] if epi is not None else 0,
        *a.stride(), *b.stride(), *c.stride(), *e.stride(), *f.stride(),
        float(alpha), float(beta), float(p), ld,
        HAS_BIAS=bias is not None, HAS_EPI=epi is not None, DROP=drop,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, BLOCK_R=16, PRECISION=precision(a), UPCAST=upcast(a),
    )
    return c


def scaled_mm(a, b, *, out_dtype, alpha=1.0, bias=None, pro=None, col=None, store_u=False, blocks=None):
    """Launch ``_scaled_mm_kernel`` on 2-D (possibly transposed) views: returns C, or (C, U)."""
    if triton is None:
        raise RuntimeError("scaled_mm: the Triton path needs the triton package")
    (m, k), (k2, n) = a.shape, b.shape
    if k != k2:
        raise ValueError(f"scaled_mm: inner sizes differ: {tuple(a.shape)} @ {tuple(b.shape)}")
    if max(a.numel(), b.numel(), m * n) >= 2**31:
        raise ValueError(f"scaled_mm: Triton indexes with int32; got {tuple(a.shape)} @ {tuple(b.shape)}")
    c = torch.empty(m, n, dtype=out_dtype, device=a.device)
    u = torch.empty_like(c) if store_u else c
    bm, bn, bk = blocks or BLOCKS
    bm, bn = min(bm, max(16, triton.next_power_of_2(m))), min(bn, max(16, triton.next_power_of_2(n)))
    _scaled_mm_kernel[(triton.cdiv(m, bm), triton.cdiv(n, bn))](
        a, b, c, u, c if bias is None else bias, c if pro is None else pro, c if col is None else col,
        m, n, k, *a.stride(), *b.stride(), *c.stride(), *u.stride(), float(alpha),
        HAS_BIAS=bias is not None, PRO=pro is not None, COL=col is not None, STORE_U=store_u,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, PRECISION=precision(a), UPCAST=upcast(a),
    )
    return (c, u) if store_u else c


def colsum(a, b, *, out_dtype, block=(32, 64)):
    """sum over rows of a * b (both (M, N)) as (N,), by ``_colsum_kernel``."""
    (m, n), bm, bn = a.shape, *block
    out = torch.empty(n, dtype=out_dtype, device=a.device)
    _colsum_kernel[(triton.cdiv(n, bn),)](a, b, out, m, n, *a.stride(), *b.stride(), BLOCK_M=bm, BLOCK_N=bn)
    return out


def triton_dropout_mask(seed, tokens, features, p, device=None) -> torch.Tensor:
    """The Triton path's scaled keep mask (drop(ones) through the kernel): for tests and references."""
    ones = torch.ones(tokens, features, device=device)
    eye = torch.eye(features, device=device)
    return mm(ones, eye, out_dtype=torch.float32, alpha=1 / (1 - p), drop=1,
              seed=triton_seed(ones, seed, "triton_dropout_mask"), p=p, ld=features, blocks=(16, 16, 16))
