"""Weight formats of the quantized frozen base: how a (out, in) weight is packed and what it stands for.

A quantized weight is four tensors ``(data, qscale, qscale2, qoffset)``:

    nf4   QLoRA's NormalFloat4: per block of ``block_size`` weights along a row, w ~ absmax * code[i],
          i the nearest of 16 code points, two per byte (first in the high nibble). data uint8 (out, in/2);
          with double_quant the absmax constants, minus their mean, are int8 in groups of 256 with one
          fp32 step per group (QLoRA / torchao: 4 + 8/64 + 32/(64*256) = 4.127 bits per weight): qscale
          int8 (blocks), qscale2 fp32 (groups), qoffset fp32 (); else qscale fp32 (blocks) and two empty
          tensors. Codes are chosen against the absmax the dequantizer will use (after double
          quantization), so each weight is as close as the stored scale allows: never worse than
          torchao's ``to_nf4``, which picks them against the unrounded absmax.
    int4  asymmetric, per group of ``block_size`` (default 32) along a row: w ~ q * d + m, q in [0, 15],
          d = (max - min) / 15 and m = min in fp16, codes picked against the rounded d and m. Group g
          is block_size/2 bytes, byte j = q[j] | q[j + block_size/2] << 4: for block 32 exactly GGUF's
          Q4_1 block (5 bits per weight). data uint8 (out, in/2), qscale d fp16 (groups), qscale2
          empty, qoffset m fp16 (groups).
    int8  per-output-channel absmax: w ~ step[row] * q, q in [-127, 127] (8 + 32/in bits per weight):
          data int8 (out, in), qscale fp32 (out,), two empty tensors.
    int8g symmetric int8 per group of ``block_size`` (default 32) along a row: w ~ q * d, d = absmax / 127
          in fp16, codes against the rounded d; for block 32 exactly GGUF's Q8_0 block (8.5 bits per
          weight). data int8 (out, in), qscale d fp16 (groups), two empty tensors.

GGUF blocks convert without rounding (``from_gguf_blocks``): Q4_1 is int4 (block 32); Q4_0 (w = (q - 8) d)
is int4 with m = -8 d, exact in fp16; Q8_0 is int8g (block 32).

    >>> q = quantize_weight(W, "int4", 32)
    >>> (dequantize(*q, "int4", 32) - W).abs().max()
"""

from __future__ import annotations

import torch

__all__ = ["FORMATS", "NF4_CODE", "GROUP", "quantize_weight", "dequantize", "weight_bits", "in_features",
           "nf4_absmax", "from_q4_1", "to_q4_1", "from_gguf_blocks", "GGUF_BLOCKS", "default_block"]

FORMATS = ("nf4", "int4", "int8", "int8g")
# GGUF block types held as they are: name -> (bytes per block of 32 weights, format it is)
GGUF_BLOCKS = {"Q4_0": (18, "int4"), "Q4_1": (20, "int4"), "Q8_0": (34, "int8g")}
# QLoRA's NormalFloat4 code points (bitsandbytes' / torchao's table)
NF4_CODE = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
            -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
            0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
            0.7229568362236023, 1.0)
GROUP = 256  # absmax constants per double-quantization group (QLoRA)
_ROWS = 1 << 20  # quantize in chunks of about this many weights (the int64 code indices are 8 B each)


# ---------------------------------------------------------------- formats (torch)


def _double_quant(absmax: torch.Tensor):
    """absmax (blocks,) -> int8 codes, fp32 step per group of 256, fp32 mean; as torchao (q = round((c - mean)
    * 128 / groupmax)), the last group zero-padded."""
    mean = absmax.mean()
    c = absmax - mean
    n, groups = c.numel(), -(-c.numel() // GROUP)
    padded = torch.nn.functional.pad(c, (0, groups * GROUP - n)).view(groups, GROUP)
    gmax = padded.abs().amax(1).clamp_min(torch.finfo(torch.float32).tiny)
    q = (padded * (128 / gmax)[:, None]).round_().clamp_(-128, 127).to(torch.int8).flatten()[:n]
    return q, gmax / 128, mean


def nf4_absmax(qscale, qscale2, qoffset) -> torch.Tensor:
    """The per-block absmax the dequantizer uses (fp32)."""
    if qscale2.numel() == 0:
        return qscale.float()
    step = qscale2.float().repeat_interleave(GROUP)[: qscale.numel()]
    return qscale.float() * step + qoffset.float()


def quantize_weight(w: torch.Tensor, fmt: str = "nf4", block_size: int = 64, double_quant: bool = True):
    """W (out, in) -> (data, qscale, qscale2, qoffset); see the module docstring."""
    w = w.detach()
    out, d = w.shape
    empty = w.new_empty(0, dtype=torch.float32)
    if fmt == "int8":
        step = w.float().abs().amax(1).clamp_min(torch.finfo(torch.float32).tiny) / 127
        return (w.float() / step[:, None]).round_().clamp_(-127, 127).to(torch.int8), step, empty, empty
    if fmt not in FORMATS:
        raise ValueError(f"quantize_weight: format {fmt!r}, want one of {FORMATS}")
    if d % block_size or block_size % 2:
        raise ValueError(f"quantize_weight: block_size {block_size} must be even and divide the width {d}")
    if fmt == "int4":
        return _quantize_int4(w, block_size)
    if fmt == "int8g":
        g = w.float().reshape(-1, block_size)
        step = (g.abs().amax(1) / 127).half()
        step = torch.where(step == 0, torch.ones_like(step), step)
        q = (g / step.float()[:, None]).round_().clamp_(-127, 127).to(torch.int8).view(out, d)
        return q, step, empty, empty
    absmax = w.float().reshape(-1, block_size).abs().amax(1)
    if double_quant:
        qscale, qscale2, qoffset = _double_quant(absmax)
    else:
        qscale, qscale2, qoffset = absmax, empty, empty
    used = nf4_absmax(qscale, qscale2, qoffset).view(out, -1)
    used = torch.where(used == 0, torch.ones_like(used), used)
    code = torch.tensor(NF4_CODE, device=w.device)
    mids = (code[1:] + code[:-1]) / 2
    data = torch.empty(out, d // 2, dtype=torch.uint8, device=w.device)
    rows = max(1, _ROWS // d)
    for r0 in range(0, out, rows):  # nearest code to w / absmax, two codes per byte (first high)
        normed = w[r0:r0 + rows].float().contiguous().view(-1, d // block_size, block_size) / used[r0:r0 + rows, :, None]
        idx = torch.bucketize(normed, mids).view(-1, d // 2, 2).to(torch.uint8)
        data[r0:r0 + rows] = idx[..., 0] << 4 | idx[..., 1]
    return data, qscale, qscale2, qoffset


def _quantize_int4(w: torch.Tensor, block: int):
    """Asymmetric int4 per group (module docstring); the codes against the fp16-rounded d and m."""
    out, d = w.shape
    empty = w.new_empty(0, dtype=torch.float32)
    data = torch.empty(out, d // 2, dtype=torch.uint8, device=w.device)
    scale = torch.empty(out, d // block, dtype=torch.float16, device=w.device)
    low = torch.empty_like(scale)
    rows = max(1, _ROWS // d)
    for r0 in range(0, out, rows):
        g = w[r0:r0 + rows].float().reshape(-1, d // block, block)
        lo = g.amin(-1).half()
        step = ((g.amax(-1) - lo.float()) / 15).half()
        step = torch.where(step == 0, torch.ones_like(step), step)
        q = ((g - lo.float()[..., None]) / step.float()[..., None]).round_().clamp_(0, 15).to(torch.uint8)
        data[r0:r0 + rows] = (q[..., : block // 2] | q[..., block // 2:] << 4).view(-1, d // 2)
        scale[r0:r0 + rows], low[r0:r0 + rows] = step, lo
    return data, scale.flatten(), empty, low.flatten()


def dequantize(data, qscale, qscale2, qoffset, fmt: str, block_size: int, dtype=torch.float32) -> torch.Tensor:
    """The weight (out, in) a quantized weight stands for, in ``dtype``."""
    if fmt == "int8":
        return (data.float() * qscale.float()[:, None]).to(dtype)
    if fmt == "int8g":
        return (data.view(-1, block_size).float() * qscale.float()[:, None]).view(data.shape).to(dtype)
    if fmt == "int4":  # written into one buffer (5x faster here than cat of the two nibble halves)
        out, half = data.shape
        b, h = data.view(-1, block_size // 2), block_size // 2
        w = torch.empty(b.shape[0], block_size, dtype=torch.float32, device=data.device)
        w[:, :h].copy_(b & 15)
        w[:, h:].copy_(b >> 4)
        return w.mul_(qscale.float()[:, None]).add_(qoffset.float()[:, None]).view(out, 2 * half).to(dtype)
    out, half = data.shape  # one lookup per byte in a 256-entry table of (code[high], code[low]) pairs
    code = torch.tensor(NF4_CODE, device=data.device)
    pairs = torch.stack((code.repeat_interleave(16), code.repeat(16)), 1)
    w = pairs[data.reshape(-1).long()].view(-1, block_size)
    return w.mul_(nf4_absmax(qscale, qscale2, qoffset)[:, None]).view(out, 2 * half).to(dtype)


def from_q4_1(blocks: torch.Tensor, shape) -> tuple[torch.Tensor, ...]:
    """GGUF Q4_1 tensor data (uint8, 20 bytes per 32 weights: d, m fp16, 16 bytes of codes) of a
    (out, in) weight -> the int4 weight (block 32) it is, bit for bit: a GGUF 4-bit model loads
    without a full-precision copy."""
    out, d = shape
    if d % 32 or blocks.numel() != out * d // 32 * 20 or blocks.dtype != torch.uint8:
        raise ValueError(f"from_q4_1: {blocks.numel()} {blocks.dtype} bytes are not Q4_1 blocks of a {tuple(shape)} weight")
    b = blocks.reshape(-1, 20)
    empty = blocks.new_empty(0, dtype=torch.float32)
    half = lambda c: b[:, c:c + 2].contiguous().view(torch.float16).flatten()
    return b[:, 4:].reshape(out, d // 2).contiguous(), half(0), empty, half(2)


def from_gguf_blocks(blocks: torch.Tensor, kind: str, shape) -> tuple[str, tuple[torch.Tensor, ...]]:
    """GGUF tensor data of a (out, in) weight in block type ``kind`` (a key of ``GGUF_BLOCKS``) ->
    (format, quantized weight of block 32) standing for exactly the weights GGUF's dequantizer gives."""
    if kind not in GGUF_BLOCKS:
        raise ValueError(f"from_gguf_blocks: block type {kind!r}, want one of {sorted(GGUF_BLOCKS)}")
    if kind == "Q4_1":
        return "int4", from_q4_1(blocks, shape)
    size, fmt = GGUF_BLOCKS[kind]
    out, d = shape
    if d % 32 or blocks.numel() != out * d // 32 * size or blocks.dtype != torch.uint8:
        raise ValueError(f"from_gguf_blocks: {blocks.numel()} {blocks.dtype} bytes are not {kind} blocks of a "
                         f"{tuple(shape)} weight")
    b = blocks.reshape(-1, size)
    step = b[:, :2].contiguous().view(torch.float16).flatten()
    empty = blocks.new_empty(0, dtype=torch.float32)
    if kind == "Q8_0":
        return fmt, (b[:, 2:].contiguous().view(torch.int8).reshape(out, d), step, empty, empty)
    return fmt, (b[:, 2:].reshape(out, d // 2).contiguous(), step, empty, step * -8)  # Q4_0: (q - 8) d


def default_block(fmt: str) -> int:
    """The block size a format takes when none is given (int8 has none: one step per row)."""
    return 32 if fmt in ("int4", "int8g") else 64


def to_q4_1(q) -> torch.Tensor:
    """``from_q4_1``'s inverse: an int4 weight of block 32 -> GGUF Q4_1 bytes (n_blocks, 20)."""
    data, scale, _, low = q
    if scale.dtype != torch.float16 or data.shape[1] * 2 // 32 * data.shape[0] != scale.numel():
        raise ValueError("to_q4_1: want an int4 weight quantized with block_size 32")
    as_bytes = lambda t: t.contiguous().view(torch.uint8).view(-1, 2)
    return torch.cat((as_bytes(scale), as_bytes(low), data.reshape(-1, 16)), 1)


def weight_bits(q) -> float:
    """Bits per weight of a quantized weight, everything it stores counted."""
    data = q[0]
    numel = data.numel() * (2 if data.dtype == torch.uint8 else 1)
    return 8 * sum(t.numel() * t.element_size() for t in q) / numel


def in_features(data, fmt) -> int:
    """The input width of a packed weight (4-bit formats hold two per byte)."""
    return data.shape[1] * (1 if fmt in ("int8", "int8g") else 2)


