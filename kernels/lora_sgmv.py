"""Segmented multi-adapter LoRA (SGMV, as Punica / S-LoRA): a mixed batch, one adapter per sample,
each adapter's A and B applied only to the rows of its own samples.

    out[t] = y[t] + s_k * drop_k(x[t]) A_k^T B_k^T    rows t of a sample whose index is slots[k]
    out[t] = y[t]                                     rows of a sample no slot names ("__base__")

Today's masked mixed batch runs every adapter over every row and multiplies by a 0/1 mask, so
n adapters cost n low-rank paths over the whole batch; here each row meets one adapter, so the
low-rank work is one adapter's, whatever n is. Op (registered on import)::

    torch.ops.peftc.lora_sgmv(y, x, index, slots, lora_As, lora_Bs, scales, dropouts, seed, train) -> (out, h)
        y (..., out): the base output; x (..., in): its input, with the same rows; the rows of one
        sample are contiguous: x is viewed (batch, rows / batch, in), so (B, T, in) and Conv1D's
        (B*T, in) both work, for any T (a decode step T=1, a batch of 1)
        index (batch,) int64: each sample's adapter id; slots[k]: the id lora_As[k], lora_Bs[k] serve
        lora_As[k] (r_k, in), lora_Bs[k] (out, r_k): ranks may differ; scales[k], dropouts[k] per slot
        h (rows, r_max): drop_k(x) A_k^T per row, zero-padded to the largest rank, non-differentiable,
        saved for backward; its row order is the device path's own (CPU: sorted by slot; CUDA: as x)

Dtypes: y and x share the base dtype, every A and B one adapter dtype. With fp32 adapters on a
bf16/fp16 base (HF PEFT's default, ``autocast_adapter_dtype``) the adapter path runs as PEFT's LoRA
does: x cast to the adapter dtype, the term added to y after promotion and the sum cast back,
``out[t] = (y[t] + s_k drop_k(x[t].to(A.dtype)) A_k^T B_k^T).to(y.dtype)`` (what the masked graph and
each sample run alone compute); h, dA, dB in the adapter dtype, dx in the base dtype.

Backward, g = d out: dy = g; for the rows of slot k (keep_k/(1-p_k) the mask, as drawn forward)::

    gb = s_k g B_k     dx = keep_k/(1-p_k) * gb A_k  (0 on base rows)     dA_k = gb^T drop_k(x)     dB_k = s_k g^T h

Dropout applies only when ``train and p_k > 0``; the mask is a pure function of (seed, slot, row,
feature), regenerated in backward instead of saved. CPU: grouped torch: one gather of the adapted
rows sorted by slot (none when already in order), per slot two GEMMs into slices of preallocated
buffers, one index_add_ into the output. CUDA fp16/bf16/fp32: two Triton launches forward (shrink ``h = drop(x) A^T`` and expand
``out += s h B^T`` over a device-side sample order, no host sync), four backward (two weight-gradient
kernels reduce each slot's rows). The devices draw different masks; each agrees with itself.

    >>> out = lora_sgmv(y, x, index, [0, 1], [A0, A1], [B0, B1], [2.0, 0.5])
"""

from __future__ import annotations

import torch

from peftc.capture import register_train_flag
from peftc.kernels.common import FLOATS, as_dtype, draw_seed, dropout_on, zero_seed
from peftc.kernels.gemm import precision, triton_seed, triton_takes, upcast

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is a Linux-only dependency
    triton = None

__all__ = ["lora_sgmv", "lora_sgmv_reference", "keep_mask", "triton_forward", "triton_backward", "triton_keep_mask",
           "BLOCKS"]

BLOCKS = (32, 64, 32)  # Triton (BLOCK_M rows, BLOCK_N, BLOCK_K); small M: a segment is a few samples


# ---------------------------------------------------------------- torch reference and CPU path


def keep_mask(seed, slot: int, shape, p: float, dtype=torch.float32, device=None) -> torch.Tensor:
    """The CPU path's scaled keep mask for slot ``slot``'s gathered rows: keep/(1-p), keep ~ Bernoulli(1-p)."""
    gen = torch.Generator(device=device or "cpu").manual_seed((int(seed) + 7919 * (slot + 1)) & (2**63 - 1))
    keep = torch.empty(shape, dtype=dtype, device=device).bernoulli_(1.0 - p, generator=gen)
    return keep.mul_(1.0 / (1.0 - p))


def lora_sgmv_reference(y, x, index, slots, lora_As, lora_Bs, scales, masks=None):
    """Eager semantics, sample by sample; ``masks[k]`` a scaled keep mask shaped like x (or None).
    Adapters in another dtype than x, y (fp32 on bf16): as HF PEFT's LoRA, x cast to the adapter
    dtype, the term added to y after promotion and the sum cast back."""
    batch = index.shape[0]
    x3, out = x.reshape(batch, -1, x.shape[-1]), y.reshape(batch, -1, y.shape[-1]).clone()
    for b, i in enumerate(index.tolist()):
        if i in slots:
            k = slots.index(i)
            xb = x3[b].to(lora_As[k].dtype)
            xb = xb if masks is None or masks[k] is None else xb * masks[k].reshape(x3.shape)[b].to(xb.dtype)
            out[b] = (out[b] + scales[k] * ((xb @ lora_As[k].t()) @ lora_Bs[k].t())).to(y.dtype)
    return out.reshape(y.shape)


def _check(y, x, index, slots, lora_As, lora_Bs, scales, dropouts):
    """Shape/dtype checks shared by the wrapper and the fake impl (so tracing reports them too)."""
    n = len(slots)
    if not (len(lora_As) == len(lora_Bs) == len(scales) == len(dropouts) == n) or n == 0:
        raise ValueError(f"lora_sgmv: want one A, B, scale and dropout per slot ({n} slots), got {len(lora_As)}, "
                         f"{len(lora_Bs)}, {len(scales)}, {len(dropouts)}")
    if index.dim() != 1 or index.dtype != torch.int64:
        raise ValueError(f"lora_sgmv: index must be (batch,) int64, got {tuple(index.shape)} {index.dtype}")
    d, o = x.shape[-1], y.shape[-1]
    if x.shape[:-1] != y.shape[:-1] or (x.numel() // max(d, 1)) % max(index.shape[0], 1):
        raise ValueError(f"lora_sgmv: x {tuple(x.shape)} and y {tuple(y.shape)} need the same rows, a "
                         f"multiple of the batch {index.shape[0]}")
    for a, bb in zip(lora_As, lora_Bs):
        if a.dim() != 2 or a.shape[1] != d or tuple(bb.shape) != (o, a.shape[0]):
            raise ValueError(f"lora_sgmv: lora_A {tuple(a.shape)}, lora_B {tuple(bb.shape)}: want (r, {d}), ({o}, r)")
    dtypes = {t.dtype for t in (*lora_As, *lora_Bs)}
    if y.dtype != x.dtype or len(dtypes) > 1 or not dtypes <= set(FLOATS):
        raise ValueError(f"lora_sgmv: x and y share the base dtype, every lora_A and lora_B one float adapter dtype "
                         f"(e.g. fp32 on a bf16 base); got x {x.dtype}, y {y.dtype}, adapters {sorted(map(str, dtypes))}")
    if not all(0.0 <= p < 1.0 for p in dropouts):
        raise ValueError(f"lora_sgmv: dropouts {dropouts}, want 0 <= p < 1")


def _segments(index, slots):
    """The adapted samples sorted by slot (None when that is 0..n-1 in order: no gather needed) and
    per non-empty slot (k, first position in that order, samples)."""
    where = {slot: k for k, slot in enumerate(slots)}
    samples: dict[int, list[int]] = {}
    for b, i in enumerate(index.tolist()):
        if i in where:
            samples.setdefault(where[i], []).append(b)
    order, segs = [], []
    for k in sorted(samples):
        segs.append((k, len(order), len(samples[k])))
        order += samples[k]
    identity = order == list(range(len(order)))
    return (None if identity else torch.tensor(order, device=index.device)), len(order), segs


def _gather(t3, order, n):
    """The rows of the first n samples of ``order`` as (n * rows, features): a view when in place."""
    part = t3[:n] if order is None else t3.index_select(0, order)
    return part.reshape(-1, t3.shape[-1])


def _torch_forward(y, x, index, slots, lora_As, lora_Bs, scales, dropouts, seed, train):
    """One gather of the adapted rows (sorted by slot), per slot two GEMMs into slices of
    preallocated buffers, one index_add_ into the output. h is kept in that sorted row order.
    Adapters in another dtype (fp32 on bf16): the gathered rows are cast to it, and the adapted
    rows of the output become (y + delta).to(y.dtype), HF PEFT's promotion."""
    batch, r_max, ad = index.shape[0], max(a.shape[0] for a in lora_As), lora_As[0].dtype
    x3 = x.reshape(batch, -1, x.shape[-1])
    out = y.reshape(batch, -1, y.shape[-1]).clone()
    rows = x3.shape[1]
    h = x.new_zeros(batch * rows, r_max, dtype=ad)
    order, n, segs = _segments(index, slots)
    if n == 0:
        return out.view(y.shape), h
    xs = as_dtype(_gather(x3, order, n), ad)
    delta = h.new_empty(n * rows, y.shape[-1])
    for k, first, count in segs:
        lo, hi, r = first * rows, (first + count) * rows, lora_As[k].shape[0]
        xk = xs[lo:hi]
        if dropout_on(dropouts[k], train):
            xk = xk * keep_mask(seed, k, xk.shape, dropouts[k], ad, x.device)
        if r == r_max:
            hk = torch.mm(xk, lora_As[k].t(), out=h[lo:hi])
        else:
            hk = torch.mm(xk, lora_As[k].t())
            h[lo:hi, :r] = hk
        torch.addmm(delta[lo:hi], hk, lora_Bs[k].t(), beta=0, alpha=scales[k], out=delta[lo:hi])
    delta = delta.view(n, rows, -1)
    if ad != y.dtype:  # the adapted rows: (y + delta) in the adapter dtype, cast back
        delta = delta.add_(_gather(out, order, n).view(delta.shape)).to(y.dtype)
        if order is None:
            out[:n] = delta
        else:
            out.index_copy_(0, order, delta)
    elif order is None:
        out[:n] += delta
    else:
        out.index_add_(0, order, delta)
    return out.view(y.shape), h


def _torch_backward(grad, x, h, index, slots, lora_As, lora_Bs, scales, dropouts, seed, train, need_dx):
    batch = index.shape[0]
    x3, g3 = x.reshape(batch, -1, x.shape[-1]), grad.reshape(batch, -1, grad.shape[-1])
    rows = x3.shape[1]
    d_as, d_bs = [torch.zeros_like(a) for a in lora_As], [torch.zeros_like(b) for b in lora_Bs]
    dx = x.new_zeros(x3.shape) if need_dx else x.new_empty(0)
    order, n, segs = _segments(index, slots)
    if n == 0:
        return (dx.view(x.shape) if need_dx else dx), d_as, d_bs
    ad = lora_As[0].dtype  # the adapter path runs in its dtype: x, g cast up (fp32 adapters on bf16)
    xs, gs = as_dtype(_gather(x3, order, n), ad), as_dtype(_gather(g3, order, n), ad)
    dxs = xs.new_empty(n * rows, x.shape[-1]) if need_dx else None
    for k, first, count in segs:
        lo, hi, r = first * rows, (first + count) * rows, lora_As[k].shape[0]
        xk, gk, hk = xs[lo:hi], gs[lo:hi], h[lo:hi, :r]
        mask = keep_mask(seed, k, xk.shape, dropouts[k], ad, x.device) if dropout_on(dropouts[k], train) else None
        gb = torch.mm(gk, lora_Bs[k]).mul_(scales[k])  # s g B: (rows, r)
        d_as[k] = torch.mm(gb.t(), xk if mask is None else xk * mask)
        d_bs[k] = torch.mm(hk.t(), gk).mul_(scales[k]).t().contiguous()
        if need_dx:
            torch.mm(gb, lora_As[k], out=dxs[lo:hi])
            if mask is not None:
                dxs[lo:hi].mul_(mask)
    if need_dx:
        dxs = as_dtype(dxs.view(n, rows, -1), x.dtype)
        if order is None:
            dx[:n] = dxs
        else:
            dx.index_copy_(0, order, dxs)
    return (dx.view(x.shape) if need_dx else dx), d_as, d_bs


# ---------------------------------------------------------------- Triton kernels and launchers

if triton is not None:

    @triton.jit
    def _sgmv_kernel(
        x_ptr, w_ptr, c_ptr,  # C[rows] (+)= alpha_k * X[rows] @ W_k for the rows of slot k; W (K, KD, N) strided
        order_ptr, seg_ptr,  # samples sorted by slot (batch,); slot k's samples: order[seg[k]:seg[k+1]]
        alpha_ptr, p_ptr, seed_ptr,  # per slot: alpha (fp32), dropout p (fp32); int64 seed
        R, KD, N, s_xm, s_xk, s_wb, s_wk, s_wn, s_cm, s_cn, drop_ld,
        ACC: tl.constexpr,  # add into C (else store)
        DROP: tl.constexpr,  # 0 none; 1 mask X (row, k); 3 mask the result (row, n): keep = rand(seed + k, row * ld + col) >= p_k
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    ):
        slot = tl.program_id(2)
        start, end = tl.load(seg_ptr + slot) * R, tl.load(seg_ptr + slot + 1) * R  # in sorted rows
        m0 = start + tl.program_id(0) * BLOCK_M
        if m0 < end:
            pos = m0 + tl.arange(0, BLOCK_M)
            in_m = pos < end
            row = tl.load(order_ptr + pos // R, mask=in_m, other=0) * R + pos % R  # the row in x / c
            rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
            in_n = rn < N
            p = tl.load(p_ptr + slot)
            seed = tl.load(seed_ptr) + slot
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for k0 in range(0, KD, BLOCK_K):
                rk = k0 + tl.arange(0, BLOCK_K)
                a = tl.load(x_ptr + row[:, None] * s_xm + rk[None, :] * s_xk, mask=in_m[:, None] & (rk[None, :] < KD),
                            other=0.0)
                b = tl.load(w_ptr + slot * s_wb + rk[:, None] * s_wk + rn[None, :] * s_wn,
                            mask=(rk[:, None] < KD) & in_n[None, :], other=0.0)
                if DROP == 1:
                    a = tl.where(tl.rand(seed, row[:, None] * drop_ld + rk[None, :]) >= p, a, 0.0)
                a = a.to(b.dtype)  # X's tile in the adapter's dtype (W is always an adapter: PEFT's x.to(A.dtype))
                if UPCAST:  # triton's interpreter multiplies raw bf16 bit patterns: take fp32 there
                    a, b = a.to(tl.float32), b.to(tl.float32)
                acc += tl.dot(a, b, input_precision=PRECISION)
            if DROP == 3:
                acc = tl.where(tl.rand(seed, row[:, None] * drop_ld + rn[None, :]) >= p, acc, 0.0)
            acc = acc * tl.load(alpha_ptr + slot)
            c_at = c_ptr + row[:, None] * s_cm + rn[None, :] * s_cn
            in_c = in_m[:, None] & in_n[None, :]
            if ACC:
                acc += tl.load(c_at, mask=in_c, other=0.0).to(tl.float32)
            tl.store(c_at, acc.to(c_ptr.dtype.element_ty), mask=in_c)

    @triton.jit
    def _sgmv_wgrad_kernel(
        p_mat, q_mat, d_ptr,  # D_k[a, b] = alpha_k * sum over slot k's rows t of P[t, a] Q[t, b]; D (K, A, B)
        order_ptr, seg_ptr, alpha_ptr, drop_ptr, seed_ptr,
        R, AD, BD, s_pm, s_pa, s_qm, s_qb, s_db, s_da, s_dn, drop_ld,
        DROP: tl.constexpr,  # 1: Q is x, masked at (row, b) as forward
        BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_T: tl.constexpr,
        PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    ):
        slot = tl.program_id(2)
        start, end = tl.load(seg_ptr + slot) * R, tl.load(seg_ptr + slot + 1) * R
        ra = tl.program_id(0) * BLOCK_A + tl.arange(0, BLOCK_A)
        rb = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
        p = tl.load(drop_ptr + slot)
        seed = tl.load(seed_ptr) + slot
        acc = tl.zeros((BLOCK_A, BLOCK_B), dtype=tl.float32)
        for t0 in range(start, end, BLOCK_T):
            pos = t0 + tl.arange(0, BLOCK_T)
            in_t = pos < end
            row = tl.load(order_ptr + pos // R, mask=in_t, other=0) * R + pos % R
            pt = tl.load(p_mat + row[None, :] * s_pm + ra[:, None] * s_pa, mask=in_t[None, :] & (ra[:, None] < AD),
                         other=0.0)  # (BLOCK_A, BLOCK_T): P^T
            q = tl.load(q_mat + row[:, None] * s_qm + rb[None, :] * s_qb, mask=in_t[:, None] & (rb[None, :] < BD),
                        other=0.0)
            if DROP == 1:
                q = tl.where(tl.rand(seed, row[:, None] * drop_ld + rb[None, :]) >= p, q, 0.0)
            pt, q = pt.to(d_ptr.dtype.element_ty), q.to(d_ptr.dtype.element_ty)  # both in the adapter's dtype
            if UPCAST:
                pt, q = pt.to(tl.float32), q.to(tl.float32)
            acc += tl.dot(pt, q, input_precision=PRECISION)
        acc = acc * tl.load(alpha_ptr + slot)
        tl.store(d_ptr + slot * s_db + ra[:, None] * s_da + rb[None, :] * s_dn, acc.to(d_ptr.dtype.element_ty),
                 mask=(ra[:, None] < AD) & (rb[None, :] < BD))


def _plan(index, slots):
    """Device-side segments: samples sorted by slot (base samples last) and each slot's start."""
    slot_ids = torch.tensor(slots, device=index.device, dtype=torch.int64)
    pos = (index[:, None] == slot_ids[None, :]).int().argmax(1)
    pos = torch.where((index[:, None] == slot_ids[None, :]).any(1), pos, len(slots))
    order = torch.argsort(pos, stable=True)
    seg = torch.zeros(len(slots) + 1, dtype=torch.int64, device=index.device)
    seg[1:] = torch.bincount(pos, minlength=len(slots) + 1)[:len(slots)].cumsum(0)
    return order, seg


def _vec(values, device):
    return torch.tensor([float(v) for v in values], dtype=torch.float32, device=device)


def _stack(mats, rows, cols):
    """(K, rows, cols) zero-padded stack of 2-D matrices with differing sizes."""
    out = mats[0].new_zeros(len(mats), rows, cols)
    for i, m in enumerate(mats):
        out[i, :m.shape[0], :m.shape[1]] = m
    return out


def _sgmv(x, w, c, order, seg, R, alpha, p, seed, *, acc=False, drop=0, blocks=None):
    """Launch ``_sgmv_kernel``: c[rows of slot k] (+)= alpha_k X W_k, W (K, KD, N) any strides."""
    bm, bn, bk = blocks or BLOCKS
    n_rows, (K, kd, n) = x.shape[0], w.shape
    if max(x.numel(), c.numel()) >= 2**31:
        raise ValueError(f"lora_sgmv: Triton indexes with int32; got x {tuple(x.shape)}, out {tuple(c.shape)}")
    bn = min(bn, max(16, triton.next_power_of_2(n)))
    grid = (triton.cdiv(n_rows, bm), triton.cdiv(n, bn), K)
    _sgmv_kernel[grid](x, w, c, order, seg, alpha, p, seed, R, kd, n, *x.stride(), *w.stride(), *c.stride(),
                       x.shape[1] if drop == 1 else c.shape[1], ACC=acc, DROP=drop, BLOCK_M=bm, BLOCK_N=bn,
                       BLOCK_K=bk, PRECISION=precision(w), UPCAST=upcast(x) or upcast(w))
    return c


def _wgrad(pm, qm, K, order, seg, R, alpha, p, seed, *, out_dtype, drop=0, blocks=None):
    """Launch ``_sgmv_wgrad_kernel``: (K, A, B) with D_k = alpha_k P_k^T Q_k over slot k's rows."""
    bm, bn, bk = blocks or BLOCKS
    ad, bd = pm.shape[1], qm.shape[1]
    ba, bb = min(bn, max(16, triton.next_power_of_2(ad))), min(bn, max(16, triton.next_power_of_2(bd)))
    d = torch.empty(K, ad, bd, dtype=out_dtype, device=pm.device)
    grid = (triton.cdiv(ad, ba), triton.cdiv(bd, bb), K)
    _sgmv_wgrad_kernel[grid](pm, qm, d, order, seg, alpha, p, seed, R, ad, bd, *pm.stride(), *qm.stride(),
                             *d.stride(), bd, DROP=drop, BLOCK_A=ba, BLOCK_B=bb, BLOCK_T=bk, PRECISION=precision(d),
                             UPCAST=upcast(d))
    return d


def _triton_args(x, index, slots, dropouts, seed, train):
    seed = triton_seed(x, seed, "lora_sgmv")
    order, seg = _plan(index, slots)
    on = [dropout_on(p, train) for p in dropouts]
    inv = [1.0 / (1.0 - p) if o else 1.0 for p, o in zip(dropouts, on)]
    p = _vec([q if o else 0.0 for q, o in zip(dropouts, on)], x.device)
    return order, seg, inv, p, seed, 1 if any(on) else 0


def triton_forward(y, x, index, slots, lora_As, lora_Bs, scales, dropouts, seed, train, blocks=None):
    """(out, h) in two launches: h = drop(x) A_k^T (shrink), out = y + s_k h B_k^T (expand)."""
    order, seg, inv, p, seed, drop = _triton_args(x, index, slots, dropouts, seed, train)
    x2, R = x.reshape(-1, x.shape[-1]), x.numel() // x.shape[-1] // index.shape[0]
    r_max = max(a.shape[0] for a in lora_As)
    a_t = _stack(lora_As, r_max, x.shape[-1]).transpose(1, 2)  # (K, in, r_max)
    b_t = _stack(lora_Bs, y.shape[-1], r_max).transpose(1, 2)  # (K, r_max, out)
    h = a_t.new_zeros(x2.shape[0], r_max)  # in the adapter dtype; out = (y + s h B^T).to(y.dtype) in fp32
    _sgmv(x2, a_t, h, order, seg, R, _vec(inv, x.device), p, seed, drop=drop, blocks=blocks)
    out = y.reshape(-1, y.shape[-1]).clone()
    _sgmv(h, b_t, out, order, seg, R, _vec(scales, x.device), p, seed, acc=True, blocks=blocks)
    return out.view(y.shape), h


def triton_backward(grad, x, h, index, slots, lora_As, lora_Bs, scales, dropouts, seed, train, need_dx, blocks=None):
    """(dx, dAs, dBs): gb = g B_k, dx = mask * s_k gb A_k, dA_k = s_k gb^T drop(x), dB_k = s_k g^T h."""
    order, seg, inv, p, seed, drop = _triton_args(x, index, slots, dropouts, seed, train)
    g, x2 = grad.reshape(-1, grad.shape[-1]), x.reshape(-1, x.shape[-1])
    R, K, r_max = x2.shape[0] // index.shape[0], len(slots), h.shape[1]
    a_s, b_s = _stack(lora_As, r_max, x.shape[-1]), _stack(lora_Bs, g.shape[1], r_max)  # (K, r, in), (K, out, r)
    ones, s_inv = _vec([1.0] * K, x.device), _vec([s * i for s, i in zip(scales, inv)], x.device)
    gb = _sgmv(g, b_s, b_s.new_zeros(g.shape[0], r_max), order, seg, R, ones, p, seed, blocks=blocks)
    d_a = _wgrad(gb, x2, K, order, seg, R, s_inv, p, seed, out_dtype=lora_As[0].dtype, drop=drop, blocks=blocks)
    d_b = _wgrad(g, h, K, order, seg, R, _vec(scales, x.device), p, seed, out_dtype=lora_Bs[0].dtype, blocks=blocks)
    d_as = [d_a[k, :a.shape[0]].contiguous() for k, a in enumerate(lora_As)]
    d_bs = [d_b[k, :, :a.shape[0]].contiguous() for k, a in enumerate(lora_As)]
    if not need_dx:
        return x.new_empty(0), d_as, d_bs
    dx = _sgmv(gb, a_s, x2.new_zeros(x2.shape), order, seg, R, s_inv, p, seed, drop=3 if drop else 0, blocks=blocks)
    return dx.view(x.shape), d_as, d_bs


def triton_keep_mask(seed, slot: int, rows: int, features: int, p: float, device=None) -> torch.Tensor:
    """The Triton path's scaled keep mask of slot ``slot`` over (rows, features), row = the row in x."""
    ones, eye = torch.ones(rows, features, device=device), torch.eye(features, device=device)[None]
    index = torch.zeros(rows, dtype=torch.int64, device=device)
    order, seg = _plan(index, [0])
    s = torch.as_tensor(seed, device=device).to(torch.int64) + slot
    return _sgmv(ones, eye, torch.empty_like(ones), order, seg, 1, _vec([1 / (1 - p)], device), _vec([p], device),
                 s, drop=1, blocks=(16, 16, 16))


# ---------------------------------------------------------------- custom-op registration


@torch.library.custom_op("peftc::lora_sgmv", mutates_args=())
def _lora_sgmv_op(y: torch.Tensor, x: torch.Tensor, index: torch.Tensor, slots: list[int],
                  lora_As: list[torch.Tensor], lora_Bs: list[torch.Tensor], scales: list[float],
                  dropouts: list[float], seed: torch.Tensor, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return _torch_forward(y, x, index, slots, lora_As, lora_Bs, scales, dropouts, seed, train)


@_lora_sgmv_op.register_kernel("cuda")
def _(y, x, index, slots, lora_As, lora_Bs, scales, dropouts, seed, train):
    fn = triton_forward if triton_takes(x, lora_As[0]) else _torch_forward
    return fn(y, x, index, slots, lora_As, lora_Bs, scales, dropouts, seed, train)


@_lora_sgmv_op.register_fake
def _(y, x, index, slots, lora_As, lora_Bs, scales, dropouts, seed, train):
    _check(y, x, index, slots, lora_As, lora_Bs, scales, dropouts)
    return torch.empty_like(y), lora_As[0].new_empty(x.numel() // x.shape[-1], max(a.shape[0] for a in lora_As))


@torch.library.custom_op("peftc::lora_sgmv_backward", mutates_args=())
def _lora_sgmv_backward_op(grad: torch.Tensor, x: torch.Tensor, h: torch.Tensor, index: torch.Tensor,
                           slots: list[int], lora_As: list[torch.Tensor], lora_Bs: list[torch.Tensor],
                           scales: list[float], dropouts: list[float], seed: torch.Tensor, train: bool,
                           need_dx: bool) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    return _torch_backward(grad, x, h, index, slots, lora_As, lora_Bs, scales, dropouts, seed, train, need_dx)


@_lora_sgmv_backward_op.register_kernel("cuda")
def _(grad, x, h, index, slots, lora_As, lora_Bs, scales, dropouts, seed, train, need_dx):
    fn = triton_backward if triton_takes(x, lora_As[0]) else _torch_backward
    return fn(grad, x, h, index, slots, lora_As, lora_Bs, scales, dropouts, seed, train, need_dx)


@_lora_sgmv_backward_op.register_fake
def _(grad, x, h, index, slots, lora_As, lora_Bs, scales, dropouts, seed, train, need_dx):
    dx = x.new_empty(x.shape) if need_dx else x.new_empty(0)
    return dx, [torch.empty_like(a) for a in lora_As], [torch.empty_like(b) for b in lora_Bs]


def _setup_context(ctx, inputs, output):
    y, x, index, slots, lora_As, lora_Bs, scales, dropouts, seed, train = inputs
    ctx.save_for_backward(x, output[1], index, seed, *lora_As, *lora_Bs)  # x and h: the masks are regenerated
    ctx.mark_non_differentiable(output[1])
    ctx.args = (list(slots), list(scales), list(dropouts), train)


def _backward(ctx, grad, _grad_h):
    slots, scales, dropouts, train = ctx.args
    x, h, index, seed, *ab = ctx.saved_tensors
    lora_As, lora_Bs = ab[:len(slots)], ab[len(slots):]
    need = ctx.needs_input_grad  # y, x, index, slots, [lora_As], [lora_Bs], ...
    dx, d_as, d_bs = torch.ops.peftc.lora_sgmv_backward(grad, x, h, index, slots, list(lora_As), list(lora_Bs),
                                                        scales, dropouts, seed, train, bool(need[1]))
    return grad if need[0] else None, dx if need[1] else None, None, None, d_as, d_bs, None, None, None, None


_lora_sgmv_op.register_autograd(_backward, setup_context=_setup_context)
register_train_flag(torch.ops.peftc.lora_sgmv.default)  # set_training flips its ``train``


def lora_sgmv(y, x, index, slots, lora_As, lora_Bs, scales, dropouts=None, train: bool = False,
              seed: torch.Tensor | None = None) -> torch.Tensor:
    """Call the op; dropouts default to 0; draws a seed from the global RNG when dropout is on and none is given."""
    dropouts = [0.0] * len(slots) if dropouts is None else [float(p) for p in dropouts]
    _check(y, x, index, list(slots), lora_As, lora_Bs, scales, dropouts)
    if seed is None:
        on = any(dropout_on(p, train) for p in dropouts)
        seed = draw_seed(x.device) if on else zero_seed(x.device)
    return torch.ops.peftc.lora_sgmv(y, x, index, [int(s) for s in slots], list(lora_As), list(lora_Bs),
                                     [float(s) for s in scales], dropouts, seed, bool(train))[0]
