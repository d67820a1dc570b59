"""What the fused ops share on the torch side: one public module, so no kernel reads another's
private names (the Triton building blocks they share are in ``gemm.py``).

    draw_seed, dropout_on          a fused op's dropout seed (from the global RNG), and when dropout applies
    drop_bits, dropout_mask        the CPU paths' seeded mask (torch.Generator) and its scaled keep mask:
                                   lora_linear, lora_siblings, dora_linear and quant_linear draw the same one
    pack_bits, unpack_bits, no_bits   that mask kept 1 bit per element from forward to backward (or nothing)
    as_dtype                       a tensor in a dtype, without a copy when it already is
    check_lora, lora_torch_forward, lora_torch_backward, add_low_rank
                                   the fused-torch LoRA linear on a given W (lora_linear's CPU path, which
                                   quant_linear runs on a dequantized W and lora_siblings per sibling)

Mixed dtypes follow HF PEFT: the low-rank term runs in the adapter dtype on ``x.to(A.dtype)``, the
base output is promoted for the add and the sum cast back to the base dtype.

    >>> y, h = lora_torch_forward(x, W, b, A, B, 2.0, 0.1, draw_seed(), True)
"""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = ["FLOATS", "draw_seed", "zero_seed", "dropout_on", "drop_bits", "dropout_mask", "pack_bits", "unpack_bits",
           "no_bits", "as_dtype", "check_lora", "add_low_rank", "lora_torch_forward", "lora_torch_backward"]

FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)  # the dtypes the fused torch paths take


def draw_seed(device=None) -> torch.Tensor:
    """A fresh dropout seed from the global RNG (so ``torch.manual_seed`` makes runs repeatable)."""
    return torch.randint(0, 2**62, (), dtype=torch.int64, device=device)


def zero_seed(device=None) -> torch.Tensor:
    """The constant seed an op gets when it cannot drop (no draw from the global RNG)."""
    return torch.zeros((), dtype=torch.int64, device=device)


def dropout_on(p: float, train: bool) -> bool:
    """Dropout applies only in training with p > 0 (a fused op's ``train`` flag is flipped by ``set_training``)."""
    return bool(train) and p > 0.0


def drop_bits(seed: torch.Tensor, shape, p: float, device=None) -> torch.Tensor:
    """Bool (tokens, features), true where dropped: four 16-bit lanes per 64-bit draw from
    torch.Generator(seed) (on CPU half the cost of torch.rand's one 32-bit draw per element);
    dropped where lane < p * 2^16, so the keep probability is 1 - p with p rounded to 1/65536."""
    device = torch.device("cpu") if device is None else torch.device(device)
    gen = torch.Generator(device=device).manual_seed(int(seed) & (2**63 - 1))
    n = math.prod(shape)
    words = torch.empty(-(-n // 4), dtype=torch.int64, device=device).random_(-(2**63), None, generator=gen)
    return words.view(torch.int16)[:n].view(shape).lt(round(p * 65536) - 32768)


def dropout_mask(seed: torch.Tensor, shape, p: float, dtype=torch.float32, device=None) -> torch.Tensor:
    """The fused-torch paths' keep mask scaled by 1/(1-p) (``drop_bits``' complement): for references."""
    return (~drop_bits(seed, shape, p, device)).to(dtype).mul_(1.0 / (1.0 - p))


def pack_bits(drop: torch.Tensor) -> torch.Tensor:
    """Bool (T, d) -> uint8 (T, ceil(d / 8)): the mask kept from forward to backward at 1/32 of
    drop(x) in fp32 (numpy's packbits: ~20x faster here than drawing the mask again)."""
    return torch.from_numpy(np.packbits(drop.numpy(), axis=-1))


def unpack_bits(bits: torch.Tensor, d: int) -> torch.Tensor:
    """``pack_bits``' inverse: uint8 (T, ceil(d / 8)) -> bool (T, d)."""
    return torch.from_numpy(np.unpackbits(bits.numpy(), axis=-1, count=d).view(np.bool_))


def no_bits(x: torch.Tensor) -> torch.Tensor:
    """The empty uint8 tensor an op returns where it keeps no mask (CUDA, or no dropout)."""
    return x.new_empty(0, dtype=torch.uint8)


def as_dtype(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` in ``dtype``: itself when it already is (``Tensor.to`` without the dispatch)."""
    return t if t.dtype == dtype else t.to(dtype)


def check_lora(x, weight, bias, lora_A, lora_B, p, name: str = "lora_linear"):
    """Shape/dtype checks of one LoRA linear, shared by the wrappers and the fake impls (so tracing
    reports them too): x, weight (and bias) in the base dtype, lora_A, lora_B in one float dtype."""
    (out, d), (r, d_a) = weight.shape, lora_A.shape
    if x.shape[-1] != d or d_a != d or tuple(lora_B.shape) != (out, r):
        raise ValueError(f"{name}: x {tuple(x.shape)}, weight {tuple(weight.shape)}, lora_A "
                         f"{tuple(lora_A.shape)}, lora_B {tuple(lora_B.shape)}: want (..., in), (out, in), "
                         "(r, in), (out, r)")
    if x.dtype != weight.dtype or lora_A.dtype != lora_B.dtype or lora_A.dtype not in FLOATS:
        raise ValueError(f"{name}: x and weight share the base dtype, lora_A and lora_B a float adapter "
                         f"dtype; got {x.dtype}, {weight.dtype}, {lora_A.dtype}, {lora_B.dtype}")
    if bias is not None and (tuple(bias.shape) != (out,) or bias.dtype != weight.dtype):
        raise ValueError(f"{name}: bias {tuple(bias.shape)} {bias.dtype}, want ({out},) {weight.dtype}")
    if not 0.0 <= p < 1.0:
        raise ValueError(f"{name}: dropout p={p}, want 0 <= p < 1")


def add_low_rank(y, h, lora_B, scale):
    """y + s * h B^T: in place when y has the adapter dtype, else in it and cast back (PEFT's promotion)."""
    if y.dtype == h.dtype:
        return y.addmm_(h, lora_B.t(), alpha=scale)
    return torch.mm(h, lora_B.t()).mul_(scale).add_(y).to(y.dtype)


def lora_torch_forward(x, weight, bias, lora_A, lora_B, scale, p, seed, train, keep_bits=False):
    """(y, h) or, with ``keep_bits``, (y, h, bits): y = x W^T + b + s drop(x) A^T B^T (one addmm for the
    base, x A^T once, the low-rank term added in place), h = drop(x) A^T, bits the packed drop mask
    for ``lora_torch_backward`` (CPU, dropout on; else empty)."""
    x2 = x.reshape(-1, x.shape[-1])
    y = torch.mm(x2, weight.t()) if bias is None else torch.addmm(bias, x2, weight.t())
    xa, bits = as_dtype(x2, lora_A.dtype), no_bits(x2)
    if dropout_on(p, train):
        drop = drop_bits(seed, x2.shape, p, x.device)
        xa = xa.masked_fill(drop, 0.0)
        bits = pack_bits(drop) if keep_bits and x.device.type == "cpu" else bits
    h = torch.mm(xa, lora_A.t())  # drop(x) A^T, the 1/(1-p) applied to the r-wide h
    if dropout_on(p, train):
        h.mul_(1.0 / (1.0 - p))
    y = add_low_rank(y, h, lora_B, scale).view(*x.shape[:-1], weight.shape[0])
    return (y, h, bits) if keep_bits else (y, h)


def lora_torch_backward(grad, x, weight, lora_A, lora_B, h, scale, p, seed, train, need_dx, bits=None):
    """(dx, dA, dB) of ``lora_torch_forward``; the drop mask from ``bits`` when forward kept it, else
    drawn again from seed. dx in the base dtype, dA, dB in the adapter dtype."""
    g = grad.reshape(-1, grad.shape[-1])
    x2 = x.reshape(-1, x.shape[-1])
    on = dropout_on(p, train)
    drop = None
    if on:
        drop = unpack_bits(bits, x2.shape[1]) if bits is not None and bits.numel() else \
            drop_bits(seed, x2.shape, p, x.device)
    ga = as_dtype(g, lora_A.dtype)
    gbs = torch.mm(ga, lora_B).mul_(scale / (1.0 - p) if on else scale)  # s/(1-p) * g B: (tokens, r)
    xa = as_dtype(x2, lora_A.dtype)
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
