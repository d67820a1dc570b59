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

Devices: CPU (and any dtype Triton does not take) runs fused torch code (``common.lora_torch_forward``,
shared with quant_linear): one addmm for the base, x A^T once, the low-rank term added in place
(addmm_), the mask drawn from a torch.Generator seeded with ``seed`` (``dropout_mask``). CUDA keeps x W^T and g W on cuBLAS (torch.addmm/mm) and
runs only the LoRA-specific traffic in Triton (``lora_triton``: dropout + x A^T in one pass, the
up-projection accumulated into y in one pass, g B, split-K dA/dB, the masked dx term), autotuned,
with the mask from ``tl.rand(seed, token * in + feature)``. The two devices draw different masks
for a seed; each is consistent between its forward and backward (``gemm.triton_dropout_mask`` is
the Triton one). Forward and
backward are opaque custom ops with fake impls, so graphs using them survive torch.export and
torch.compile without graph breaks.

    >>> y = lora_linear(x, W, b, A, B, scale=2.0, p=0.05, train=True)   # draws a seed
"""

from __future__ import annotations

import torch

from peftc.capture import register_train_flag
from peftc.kernels import lora_triton as LT
from peftc.kernels.common import (
    check_lora,
    draw_seed,
    dropout_mask,
    dropout_on,
    lora_torch_backward,
    lora_torch_forward,
    no_bits,
    pack_bits,
    unpack_bits,
    zero_seed,
)
from peftc.kernels.gemm import triton_dropout_mask, triton_seed, triton_takes

# dropout_mask, triton_dropout_mask, pack_bits, unpack_bits, draw_seed: this op's masks and seeds
# (kernels/common.py, kernels/gemm.py), re-exported for references and tests
__all__ = ["lora_linear", "lora_linear_reference", "dropout_mask", "triton_dropout_mask", "pack_bits", "unpack_bits",
           "triton_forward", "triton_backward", "draw_seed"]


# ---------------------------------------------------------------- torch reference and CPU path


def lora_linear_reference(x, weight, bias, lora_A, lora_B, scale, mask=None):
    """HF PEFT's eager semantics; ``mask`` is a scaled keep mask (e.g. from ``dropout_mask``). Mixed
    dtypes as PEFT: the low-rank term in the adapter dtype, added after type promotion, cast back."""
    xa = x.to(lora_A.dtype)
    xd = xa if mask is None else xa * mask.reshape(x.shape).to(xa.dtype)
    base = torch.nn.functional.linear(x, weight, bias)
    return (base + (xd @ lora_A.t()) @ lora_B.t() * scale).to(base.dtype)


# ---------------------------------------------------------------- Triton launchers (lora_triton's kernels)


def triton_forward(x, weight, bias, lora_A, lora_B, scale, p, seed, train, configs=None):
    """(y, h): y = addmm(b, x, W^T) on cuBLAS; h = drop(x) A^T and y += s h B^T by ``lora_triton``.
    ``configs``: one triton.Config per kernel (down, accumulate) instead of autotuning (tests)."""
    seed = triton_seed(x, seed, "lora_linear")
    down_cfg, acc_cfg = configs or (None, None)
    x2 = x.reshape(-1, x.shape[-1])
    on = dropout_on(p, train)
    y = torch.mm(x2, weight.t()) if bias is None else torch.addmm(bias, x2, weight.t())
    h = LT.down(x2, lora_A, alpha=1 / (1 - p) if on else 1.0, drop=on, seed=seed, p=p, config=down_cfg)
    LT.accumulate(y, h, lora_B.t(), beta=scale, config=acc_cfg)
    return y.view(*x.shape[:-1], weight.shape[0]), h


def triton_backward(grad, x, weight, lora_A, lora_B, h, scale, p, seed, train, need_dx, configs=None):
    """(dx, dA, dB): gb = s g B (down), dA and dB split-K over tokens (wgrad), dx = g W on cuBLAS plus
    keep/(1-p) * gb A (accumulate). ``configs``: (down, accumulate, wgrad) triton.Configs or None."""
    seed = triton_seed(x, seed, "lora_linear")
    down_cfg, acc_cfg, wg_cfg = configs or (None, None, None)
    g, x2 = grad.reshape(-1, grad.shape[-1]), x.reshape(-1, x.shape[-1])
    on = dropout_on(p, train)
    inv = 1 / (1 - p) if on else 1.0
    gb = LT.down(g, lora_B.t(), alpha=scale, config=down_cfg)  # (tokens, r) in the adapter dtype
    d_a = LT.wgrad(x2, gb, alpha=inv, drop=on, seed=seed, p=p, config=wg_cfg).t().contiguous()
    d_b = LT.wgrad(g, h, alpha=scale, config=wg_cfg)
    if not need_dx:
        return x.new_empty(0), d_a, d_b
    dx = torch.mm(g, weight)
    LT.accumulate(dx, gb, lora_A, beta=inv, drop=on, seed=seed, p=p, config=acc_cfg)
    return dx.view(x.shape), d_a, d_b


def _forward(x, weight, bias, lora_A, lora_B, scale, p, seed, train):
    if triton_takes(x, lora_A) and x.is_cuda:
        return (*triton_forward(x, weight, bias, lora_A, lora_B, scale, p, seed, train), no_bits(x))
    return lora_torch_forward(x, weight, bias, lora_A, lora_B, scale, p, seed, train, keep_bits=True)


# ---------------------------------------------------------------- custom-op registration


@torch.library.custom_op("peftc::lora_linear", mutates_args=())
def _lora_linear_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_A: torch.Tensor,
                    lora_B: torch.Tensor, scale: float, p: float, seed: torch.Tensor,
                    train: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _forward(x, weight, bias, lora_A, lora_B, scale, p, seed, train)


@_lora_linear_op.register_fake
def _(x, weight, bias, lora_A, lora_B, scale, p, seed, train):
    check_lora(x, weight, bias, lora_A, lora_B, p)
    tokens = x.numel() // x.shape[-1]
    keep = dropout_on(p, train) and x.device.type == "cpu"  # CPU keeps the packed mask for backward
    bits = x.new_empty(tokens, -(-x.shape[-1] // 8), dtype=torch.uint8) if keep else no_bits(x)
    return x.new_empty(*x.shape[:-1], weight.shape[0]), lora_A.new_empty(tokens, lora_A.shape[0]), bits


@torch.library.custom_op("peftc::lora_linear_backward", mutates_args=())
def _lora_linear_backward_op(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, lora_A: torch.Tensor,
                             lora_B: torch.Tensor, h: torch.Tensor, bits: torch.Tensor, scale: float, p: float,
                             seed: torch.Tensor, train: bool,
                             need_dx: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if triton_takes(x, lora_A) and x.is_cuda:
        return triton_backward(grad, x, weight, lora_A, lora_B, h, scale, p, seed, train, need_dx)
    return lora_torch_backward(grad, x, weight, lora_A, lora_B, h, scale, p, seed, train, need_dx, bits)


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
    check_lora(x, weight, bias, lora_A, lora_B, p)
    if seed is None:
        on = dropout_on(p, train)
        seed = draw_seed(x.device) if on else zero_seed(x.device)
    return torch.ops.peftc.lora_linear(x, weight, bias, lora_A, lora_B, float(scale), float(p), seed, bool(train))[0]
