"""Triton kernel of peftc::quant_linear (dequant inside the GEMM, LoRA in the epilogue) against a float64
reference on the dequantized weight.

Interpreter tests need TRITON_INTERPRET=1 before triton's import, so tests/test_kernel_quant_linear.py
runs this file in such a process; here they skip otherwise. Small blocks (16) and sizes that are not
multiples of them exercise the tile masks, the K loop and the rank loop. GPU tests run the op on CUDA.
"""

import os

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed (the gpu or dev extra: pip install -e .[dev])")

from peftc.kernels import lora_linear as L
from peftc.kernels import quant_linear as QL

interpret = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                               reason="needs TRITON_INTERPRET=1 before triton's import "
                                      "(test_kernel_quant_linear.py runs this file in such a process)")
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
SMALL = (16, 16, 16)


def make(tokens, d_in, d_out, r, fmt, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g)
    w = rnd(d_out, d_in) / d_in**0.5
    q = tuple(t.to(device) for t in QL.quantize_weight(w, fmt, 32, True))
    cast = lambda t: t.to(device=device, dtype=dtype)
    return (cast(rnd(tokens, d_in)), q, cast(rnd(d_out)), cast(rnd(r, d_in) / d_in**0.5), cast(rnd(d_out, r) / r**0.5),
            cast(rnd(tokens, d_out)))


def reference(x, w, b, a, bb, scale, mask, grad):
    leaves = [t.double().requires_grad_() for t in (x, a, bb)]
    y = L.lora_linear_reference(leaves[0], w.double(), b.double(), leaves[1], leaves[2], scale, mask)
    y.backward(grad.double())
    return y, [t.grad for t in leaves]


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@interpret
@pytest.mark.parametrize("fmt", ["nf4", "int4", "int8"])
@pytest.mark.parametrize("p, dtype, tol", [(0.0, torch.float32, 1e-5), (0.3, torch.float32, 1e-5),
                                           (0.3, torch.bfloat16, 2e-2)])
def test_interpreted_quant_kernel_matches_reference(fmt, p, dtype, tol):
    x, q, b, a, bb, grad = make(11, 64, 40, 5, fmt, dtype=dtype, seed=1)
    seed = torch.tensor(77)
    mask = L.triton_dropout_mask(seed, 11, 64, p).double() if p else None
    w = QL.dequantize(*q, fmt, 32)  # fp32: the kernel dequantizes in fp32, then casts its tile to x's dtype
    w = w.to(dtype)
    y, h = QL.triton_forward(x, q, b, a, bb, 1.5, p, seed, True, fmt, 32, blocks=SMALL)
    dx, d_a, d_b = QL.triton_backward(grad, x, q, a, bb, h, 1.5, p, seed, True, fmt, 32, True, blocks=SMALL)
    y_ref, (dx_ref, da_ref, db_ref) = reference(x, w, b, a, bb, 1.5, mask, grad)
    for got, want in ((y, y_ref), (dx, dx_ref), (d_a, da_ref), (d_b, db_ref)):
        assert rel(got, want) < tol


@interpret
@pytest.mark.parametrize("fmt", ["nf4", "int4", "int8"])
def test_interpreted_plain_quant_linear(fmt):
    """No LoRA: y = x deq(W)^T + b, dx = g deq(W)."""
    x, q, b, _, _, grad = make(9, 64, 24, 4, fmt, seed=2)
    w = QL.dequantize(*q, fmt, 32).double()
    y, _ = QL.triton_forward(x, q, b, None, None, 1.0, 0.0, None, False, fmt, 32, blocks=SMALL)
    dx, _, _ = QL.triton_backward(grad, x, q, None, None, None, 1.0, 0.0, None, False, fmt, 32, True, blocks=SMALL)
    assert rel(y, x.double() @ w.t() + b.double()) < 1e-5
    assert rel(dx, grad.double() @ w) < 1e-5


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("fmt", ["nf4", "int4", "int8"])
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-4), (torch.bfloat16, 2e-2)])
def test_cuda_op_matches_reference(fmt, dtype, tol):
    x, q, b, a, bb, grad = make(300, 256, 192, 16, fmt, dtype=dtype, device="cuda", seed=3)
    w = QL.dequantize(*q, fmt, 32).to(dtype)
    leaves = [t.clone().requires_grad_() for t in (x, a, bb)]
    y = QL.quant_linear(leaves[0], q, b, leaves[1], leaves[2], 2.0, fmt=fmt, block_size=32)
    y.backward(grad)
    y_ref, grads = reference(x, w, b, a, bb, 2.0, None, grad)
    assert rel(y, y_ref) < tol
    for got, want in zip((t.grad for t in leaves), grads):
        assert rel(got, want) < tol
