"""Triton kernels for the LoRA-specific traffic only; the frozen GEMMs stay on cuBLAS.

A LoRA linear's forward and backward on CUDA, with keep(t, i) = rand(seed, t * in + i) >= p::

    y  = addmm(b, x, W^T)                            cuBLAS (base dtype)
    h  = drop(x) A^T                                 down():        one pass over x, writes (T, r) only
    y  = (y + s * h B^T).to(y.dtype)                 accumulate():  one pass over y, fp32 add
    gb = s * g B                                     down()         (B^T read as (r, out) strides)
    dx = mm(g, W)                                    cuBLAS
    dx = (dx + keep/(1-p) * gb A).to(dx.dtype)       accumulate():  the mask applied in the epilogue
    dA = (gb^T drop(x)) / (1-p),  dB = s * g^T h     wgrad():       split-K over tokens, fp32 partials

drop(x) is never written: the mask is recomputed from (seed, token, feature) wherever x is read.
Activation tiles (x, g: base dtype) are cast to the adapter dtype before ``tl.dot``, so fp32
adapters on a bf16 base compute as HF PEFT does (``B(A(drop(x.to(A.dtype)))) * s`` in fp32,
added to the base output after promotion); bf16/fp16 adapters take the bf16/fp16 ``tl.dot`` with
fp32 accumulation. Every kernel is ``triton.autotune``d over ``*_CONFIGS`` (r in 8..128 is one
rank tile of next_pow2(r) >= 16; d up to 8192 tiles over K); pass ``config=`` to run one config
(tests under TRITON_INTERPRET=1 run each config's tile sizes on small shapes).

    >>> h = down(x2, A, seed=seed, p=0.1, alpha=1 / 0.9, drop=True)     # (T, r) in A's dtype
    >>> accumulate(y, h, B.t(), beta=2.0)                             # y += 2 h B^T, in place
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl

    from peftc.kernels.gemm import dot
except ImportError:  # pragma: no cover - triton is a Linux-only dependency
    triton = None

__all__ = ["down", "accumulate", "wgrad", "DOWN_CONFIGS", "ACCUM_CONFIGS", "WGRAD_CONFIGS", "rank_block"]


def _configs(names, tiles, warps=(4, 8), stages=(3,)):
    if triton is None:
        return []
    return [triton.Config(dict(zip(names, t)), num_warps=w, num_stages=s) for t in tiles for w in warps
            for s in stages]


# (BLOCK_M, BLOCK_K): tokens x features per program of the down-projection; the rank is one tile
DOWN_CONFIGS = _configs(("BLOCK_M", "BLOCK_K"), [(32, 128), (64, 64), (64, 128), (128, 64)])
# (BLOCK_M, BLOCK_N): the output tile the r-wide product is added into
ACCUM_CONFIGS = _configs(("BLOCK_M", "BLOCK_N"), [(64, 64), (64, 128), (128, 64), (128, 128)])
# (BLOCK_C, BLOCK_M): output rows (features) x tokens per step of one split
WGRAD_CONFIGS = _configs(("BLOCK_C", "BLOCK_M"), [(32, 64), (64, 64), (64, 128), (128, 32)])
SPLIT_TOKENS = 512  # tokens per split-K chunk at least (a multiple of every BLOCK_M)


def rank_block(r: int) -> int:
    """The rank tile: next power of two >= 16 (tl.dot's minimum), capped at 128 (ranks above loop)."""
    return min(128, max(16, 1 << (int(r) - 1).bit_length()))


if triton is not None:

    @triton.jit
    def _down_kernel(
        x_ptr, w_ptr, h_ptr,  # h[M, R] = alpha * drop(x)[M, K] @ w[R, K]^T (x cast to w's dtype)
        seed_ptr,  # int64 scalar, read when DROP
        M, K, R, s_xm, s_xk, s_wr, s_wk, s_hm, s_hr, alpha, p, drop_ld,  # keep(m, k) = rand(seed, m*ld + k) >= p
        DROP: tl.constexpr, BLOCK_R: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        rr = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
        seed = tl.load(seed_ptr) if DROP else 0
        acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + rm[:, None] * s_xm + rk[None, :] * s_xk, mask=(rm[:, None] < M) & (rk[None, :] < K),
                        other=0.0)
            w = tl.load(w_ptr + rk[:, None] * s_wk + rr[None, :] * s_wr, mask=(rk[:, None] < K) & (rr[None, :] < R),
                        other=0.0)
            if DROP:
                x = tl.where(tl.rand(seed, rm[:, None] * drop_ld + rk[None, :]) >= p, x, 0.0)
            acc += dot(x.to(w.dtype), w, PRECISION, UPCAST)
        tl.store(h_ptr + rm[:, None] * s_hm + rr[None, :] * s_hr, (acc * alpha).to(h_ptr.dtype.element_ty),
                 mask=(rm[:, None] < M) & (rr[None, :] < R))

    @triton.jit
    def _accum_kernel(
        c_ptr,  # C[M, N], in place: C = (C + beta * keep * (E @ F)).to(C's dtype), the add in fp32
        e_ptr, f_ptr, seed_ptr,  # E[M, R], F[R, N] (adapter dtype); int64 seed, read when DROP
        M, N, R, s_cm, s_cn, s_em, s_er, s_fr, s_fn, beta, p, drop_ld,  # keep(m, n) = rand(seed, m*ld + n) >= p
        DROP: tl.constexpr, BLOCK_R: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        in_m, in_n = rm[:, None] < M, rn[None, :] < N
        low = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for r0 in range(0, R, BLOCK_R):
            rr = r0 + tl.arange(0, BLOCK_R)
            e = tl.load(e_ptr + rm[:, None] * s_em + rr[None, :] * s_er, mask=in_m & (rr[None, :] < R), other=0.0)
            f = tl.load(f_ptr + rr[:, None] * s_fr + rn[None, :] * s_fn, mask=(rr[:, None] < R) & in_n, other=0.0)
            low += dot(e, f.to(e.dtype), PRECISION, UPCAST)
        if DROP:
            low = tl.where(tl.rand(tl.load(seed_ptr), rm[:, None] * drop_ld + rn[None, :]) >= p, low, 0.0)
        c_at = c_ptr + rm[:, None] * s_cm + rn[None, :] * s_cn
        c = tl.load(c_at, mask=in_m & in_n, other=0.0).to(tl.float32)
        tl.store(c_at, (c + beta * low).to(c_ptr.dtype.element_ty), mask=in_m & in_n)

    @triton.jit
    def _wgrad_kernel(
        p_ptr, q_ptr, out_ptr,  # out[s, C, R] = alpha * sum over split s's tokens m of drop(P)[m, c] * Q[m, r]
        seed_ptr,  # int64 scalar, read when DROP (the mask is on P: keep(m, c) = rand(seed, m*ld + c) >= p)
        M, C, R, CHUNK, s_pm, s_pc, s_qm, s_qr, s_os, s_oc, s_or, alpha, p, drop_ld,
        DROP: tl.constexpr, BLOCK_R: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
        BLOCK_C: tl.constexpr, BLOCK_M: tl.constexpr,
    ):
        rc = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
        rr = tl.program_id(2) * BLOCK_R + tl.arange(0, BLOCK_R)
        split = tl.program_id(1)
        seed = tl.load(seed_ptr) if DROP else 0
        acc = tl.zeros((BLOCK_C, BLOCK_R), dtype=tl.float32)
        for m0 in range(split * CHUNK, split * CHUNK + CHUNK, BLOCK_M):  # rows past M are masked
            rm = m0 + tl.arange(0, BLOCK_M)
            pt = tl.load(p_ptr + rm[None, :] * s_pm + rc[:, None] * s_pc, mask=(rm[None, :] < M) & (rc[:, None] < C),
                         other=0.0)  # P^T tile (BLOCK_C, BLOCK_M)
            q = tl.load(q_ptr + rm[:, None] * s_qm + rr[None, :] * s_qr, mask=(rm[:, None] < M) & (rr[None, :] < R),
                        other=0.0)
            if DROP:
                pt = tl.where(tl.rand(seed, rm[None, :] * drop_ld + rc[:, None]) >= p, pt, 0.0)
            acc += dot(pt.to(q.dtype), q, PRECISION, UPCAST)
        tl.store(out_ptr + split * s_os + rc[:, None] * s_oc + rr[None, :] * s_or, acc * alpha,
                 mask=(rc[:, None] < C) & (rr[None, :] < R))

    _down_tuned = triton.autotune(DOWN_CONFIGS, key=["K", "R", "DROP"])(_down_kernel)
    _accum_tuned = triton.autotune(ACCUM_CONFIGS, key=["N", "R", "DROP"], restore_value=["c_ptr"])(_accum_kernel)
    _wgrad_tuned = triton.autotune(WGRAD_CONFIGS, key=["C", "R", "DROP"])(_wgrad_kernel)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _launch(tuned, raw, grid, args, meta, config):
    """Autotuned launch; with ``config`` (or under the interpreter: the first config) one config."""
    if triton is None:
        raise RuntimeError("lora_triton: the Triton path needs the triton package")
    if config is None and _interpreted():
        config = tuned.configs[0]
    if config is None:
        tuned[grid](*args, **meta)
    else:
        raw[grid](*args, **meta, **config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)


def _meta(a_dtype, is_cuda, drop, r):
    """Compile-time flags: fp32 dots in IEEE unless torch allows TF32 (as torch.mm); bf16 upcast in the
    interpreter only."""
    ieee = a_dtype == torch.float32 and not (is_cuda and torch.backends.cuda.matmul.allow_tf32)
    return dict(DROP=bool(drop), BLOCK_R=rank_block(r), PRECISION="ieee" if ieee else "tf32",
                UPCAST=a_dtype == torch.bfloat16 and _interpreted())


def _seed(t, seed):
    return t if seed is None else seed.to(device=t.device, dtype=torch.int64)


def _check_int32(*tensors):
    for t in tensors:
        if t.numel() >= 2**31:
            raise ValueError(f"lora_triton: Triton indexes with int32; got a tensor of shape {tuple(t.shape)}")


def down(x, w, *, alpha=1.0, drop=False, seed=None, p=0.0, out_dtype=None, config=None):
    """``alpha * drop(x) @ w^T`` for x (M, K) in any dtype, w (R, K) (any strides): (M, R) in w's dtype."""
    (m, k), r = x.shape, w.shape[0]
    _check_int32(x, w)
    h = torch.empty(m, r, dtype=out_dtype or w.dtype, device=x.device)
    meta = _meta(w.dtype, x.is_cuda, drop, r)
    grid = lambda c: (triton.cdiv(m, c["BLOCK_M"]), triton.cdiv(r, meta["BLOCK_R"]))
    _launch(_down_tuned, _down_kernel, grid,
            (x, w, h, _seed(x, seed), m, k, r, *x.stride(), *w.stride(), *h.stride(), float(alpha), float(p), k),
            meta, config)
    return h


def accumulate(c, e, f, *, beta=1.0, drop=False, seed=None, p=0.0, config=None):
    """In place ``c = (c + beta * keep * e @ f).to(c.dtype)``; c (M, N), e (M, R), f (R, N). Returns c."""
    (m, n), r = c.shape, e.shape[1]
    _check_int32(c, e, f)
    meta = _meta(e.dtype, c.is_cuda, drop, r)
    grid = lambda cfg: (triton.cdiv(m, cfg["BLOCK_M"]), triton.cdiv(n, cfg["BLOCK_N"]))
    _launch(_accum_tuned, _accum_kernel, grid,
            (c, e, f, _seed(c, seed), m, n, r, *c.stride(), *e.stride(), *f.stride(), float(beta), float(p), n),
            meta, config)
    return c


def wgrad(pm, q, *, alpha=1.0, drop=False, seed=None, p=0.0, out_dtype=None, splits=None, config=None):
    """``alpha * drop(pm)^T @ q`` (C, R) for pm (M, C), q (M, R): split-K over the M tokens into fp32
    partials, summed by torch (deterministic, no atomics); the result in ``out_dtype`` (q's)."""
    (m, c), r = pm.shape, q.shape[1]
    _check_int32(pm, q)
    if m == 0:
        return torch.zeros(c, r, dtype=out_dtype or q.dtype, device=pm.device)
    if splits is None:  # enough programs to fill the GPU (2 per SM) when C / 64 alone does not
        sms = torch.cuda.get_device_properties(pm.device).multi_processor_count if pm.is_cuda else 1
        splits = max(1, min(_cdiv(m, SPLIT_TOKENS), _cdiv(2 * sms, _cdiv(c, 64))))
    chunk = _cdiv(_cdiv(m, splits), 128) * 128  # a multiple of every BLOCK_M
    splits = _cdiv(m, chunk)
    part = torch.empty(splits, c, r, dtype=torch.float32, device=pm.device)
    meta = _meta(q.dtype, pm.is_cuda, drop, r)
    grid = lambda cfg: (triton.cdiv(c, cfg["BLOCK_C"]), splits, triton.cdiv(r, meta["BLOCK_R"]))
    _launch(_wgrad_tuned, _wgrad_kernel, grid,
            (pm, q, part, _seed(pm, seed), m, c, r, chunk, *pm.stride(), *q.stride(), *part.stride(), float(alpha),
             float(p), c), meta, config)
    out = part[0] if splits == 1 else part.sum(0)
    return out.to(out_dtype or q.dtype)
