"""Triton kernels of peftc::lora_linear against the unfused reference.

Interpreter tests need TRITON_INTERPRET=1 set before triton is imported, so they run in a fresh
process (tests/test_kernel_lora_linear.py launches this file that way); in a process that imported
triton without it they skip. Sizes that are not multiples of them exercise
the tile masks, the K loop and the rank loop, at every autotune config's tile sizes, for fp32,
bf16, and fp32 adapters on a bf16 base. GPU tests run the op itself on CUDA.
"""

import os

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed (the gpu or dev extra: pip install -e .[dev])")

from peftc.kernels import lora_linear as L
from peftc.kernels import lora_triton as LT

interpret = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                               reason="needs TRITON_INTERPRET=1 before triton's import "
                                      "(test_kernel_lora_linear.py runs this file in such a process)")
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def make(shape, d_in, d_out, r, dtype=torch.float32, device="cpu", bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g).to(device=device, dtype=dtype)
    x, w, b = rnd(*shape, d_in), rnd(d_out, d_in) / d_in**0.5, rnd(d_out) if bias else None
    return x, w, b, rnd(r, d_in) / d_in**0.5, rnd(d_out, r) / r**0.5


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def reference(x, w, b, a, bb, scale, mask, grad):
    """Float64 forward and (dx, dA, dB) of the unfused formula."""
    leaves = [t.double().requires_grad_() for t in (x, a, bb)]
    y = L.lora_linear_reference(leaves[0], w.double(), None if b is None else b.double(), leaves[1], leaves[2],
                                scale, mask)
    y.backward(grad.double())
    return y, [t.grad for t in leaves]


def tiles(cfg):
    return "x".join(str(v) for v in cfg.kwargs.values())


# one case per autotune tile size of each kernel (warps/stages do not change what the interpreter runs)
CONFIGS = [(d, a, w) for d, a, w in zip(*({tiles(c): c for c in cs}.values()
                                           for cs in (LT.DOWN_CONFIGS, LT.ACCUM_CONFIGS, LT.WGRAD_CONFIGS)))]


SHAPES = [((11,), 37, 53, 5, True, 0.3),
          ((2, 11), 37, 53, 5, False, 0.0),  # 3-D input, no bias
          ((9,), 40, 18, 20, True, 0.3),  # rank above 16: a 32-wide rank tile
          ((3, 5), 70, 33, 9, True, 0.1)]


@interpret
@pytest.mark.parametrize("configs, case", list(zip(CONFIGS, SHAPES)),  # each tile size on one shape
                         ids=["-".join(tiles(c) for c in cs) for cs in CONFIGS])
@pytest.mark.parametrize("dtype, adapter, tol", [(torch.float32, torch.float32, 1e-5),
                                                 (torch.bfloat16, torch.bfloat16, 2e-2),
                                                 (torch.bfloat16, torch.float32, 1e-2)])  # PEFT's default
def test_interpreted_kernels_match_reference(configs, case, dtype, adapter, tol):
    shape, d_in, d_out, r, bias, p = case
    x, w, b, a, bb = make(shape, d_in, d_out, r, dtype=dtype, bias=bias, seed=1)
    a, bb = a.to(adapter), bb.to(adapter)
    seed, tokens = torch.tensor(2024), x.numel() // d_in
    mask = L.triton_dropout_mask(seed, tokens, d_in, p).double() if p else None
    grad = torch.randn(*shape, d_out, generator=torch.Generator().manual_seed(2)).to(dtype)
    y, h = L.triton_forward(x, w, b, a, bb, 1.5, p, seed, True, configs=configs[:2])
    dx, d_a, d_b = L.triton_backward(grad, x, w, a, bb, h, 1.5, p, seed, True, True, configs=configs)
    y_ref, (dx_ref, da_ref, db_ref) = reference(x, w, b, a, bb, 1.5, mask, grad)
    x2 = x.reshape(-1, d_in).double()
    h_ref = (x2 if mask is None else x2 * mask) @ a.double().t()
    assert y.shape == y_ref.shape and dx.shape == x.shape and h.shape == (tokens, r)
    assert (y.dtype, dx.dtype, h.dtype, d_a.dtype, d_b.dtype) == (dtype, dtype, adapter, adapter, adapter)
    pairs = [(y, y_ref, "y"), (h, h_ref, "h"), (dx, dx_ref, "dx"), (d_a, da_ref, "dA"), (d_b, db_ref, "dB")]
    for got, want, name in pairs:
        assert rel(got, want) < tol, name


@interpret
def test_interpreted_mixed_dtypes_equal_peft_formula():
    """bf16 x and W, fp32 A and B: y = (x W^T + b + B(A(drop(x.float()))) * s).to(bf16), as HF PEFT."""
    x, w, b, a, bb = make((2, 9), 24, 20, 8, dtype=torch.bfloat16, seed=6)
    a, bb = a.float(), bb.float()
    seed = torch.tensor(5)
    mask = L.triton_dropout_mask(seed, 18, 24, 0.1)
    y, _ = L.triton_forward(x, w, b, a, bb, 2.0, 0.1, seed, True, configs=CONFIGS[0][:2])
    xd = x.float() * mask.reshape(x.shape)
    want = (torch.nn.functional.linear(x, w, b) + (xd @ a.t()) @ bb.t() * 2.0).to(torch.bfloat16)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, want, atol=1e-2, rtol=1e-2)


@interpret
def test_interpreted_wgrad_split_k_over_tokens():
    """Three token splits (chunks of 128) of drop(P)^T Q, summed: equal to one full reduction."""
    g, cfg = torch.Generator().manual_seed(9), LT.WGRAD_CONFIGS[-1]
    pm, q, seed = torch.randn(300, 21, generator=g), torch.randn(300, 7, generator=g), torch.tensor(3)
    keep = L.triton_dropout_mask(seed, 300, 21, 0.2)
    out = LT.wgrad(pm, q, alpha=0.5, drop=True, seed=seed, p=0.2, splits=3, config=cfg)
    torch.testing.assert_close(out, 0.5 * (pm * keep * 0.8).t() @ q, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(LT.wgrad(pm, q, splits=1, config=cfg), pm.t() @ q, atol=1e-4, rtol=1e-4)


@interpret
def test_interpreted_rank_above_one_rank_tile():
    """r = 136 > 128: down and wgrad tile the rank over programs, accumulate loops over it."""
    x, w, b, a, bb = make((6,), 20, 12, 136, seed=8)
    y, h = L.triton_forward(x, w, b, a, bb, 0.5, 0.0, torch.tensor(0), True, configs=CONFIGS[0][:2])
    torch.testing.assert_close(y, L.lora_linear_reference(x, w, b, a, bb, 0.5), atol=1e-4, rtol=1e-4)
    _, d_a, d_b = L.triton_backward(torch.ones(6, 12), x, w, a, bb, h, 0.5, 0.0, torch.tensor(0), True, False,
                                    configs=CONFIGS[0])
    torch.testing.assert_close(d_b, 0.5 * torch.ones(6, 12).t() @ h, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(d_a, 0.5 * (torch.ones(6, 12) @ bb).t() @ x, atol=1e-4, rtol=1e-4)


@interpret
def test_interpreted_mask_depends_on_seed_and_skips_dx():
    m1, m2 = (L.triton_dropout_mask(torch.tensor(s), 40, 50, 0.2) for s in (1, 2))
    assert abs((m1 == 0).float().mean().item() - 0.2) < 0.04 and not torch.equal(m1, m2)
    assert torch.equal(m1, L.triton_dropout_mask(torch.tensor(1), 40, 50, 0.2))
    assert torch.allclose(m1[m1 != 0], torch.tensor(1 / 0.8))
    x, w, b, a, bb = make((7,), 20, 12, 3, seed=3)
    _, h = L.triton_forward(x, w, b, a, bb, 1.0, 0.2, torch.tensor(1), True)
    dx, d_a, d_b = L.triton_backward(torch.ones(7, 12), x, w, a, bb, h, 1.0, 0.2, torch.tensor(1), True, False)
    assert dx.numel() == 0 and d_a.shape == a.shape and d_b.shape == bb.shape


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("dtype, adapter, tol", [(torch.float32, torch.float32, 1e-5),
                                                 (torch.bfloat16, torch.bfloat16, 2e-2),
                                                 (torch.bfloat16, torch.float32, 1e-2)])
@pytest.mark.parametrize("p", [0.0, 0.1])
@pytest.mark.parametrize("r", [8, 16, 128])
def test_cuda_op_runs_triton_and_matches_reference(dtype, adapter, tol, p, r):
    x, w, b, a, bb = make((3, 267), 200, 130, r, dtype=dtype, device="cuda", seed=4)  # 801 tokens: 2 splits
    a, bb = a.to(adapter), bb.to(adapter)
    seed, tokens = torch.tensor(77, device="cuda"), 3 * 267
    mask = L.triton_dropout_mask(seed, tokens, 200, p, device="cuda").double() if p else None
    grad = torch.randn(3, 267, 130, device="cuda", dtype=dtype)
    leaves = [t.clone().requires_grad_() for t in (x, a, bb)]
    y, h, bits = torch.ops.peftc.lora_linear(leaves[0], w, b, leaves[1], leaves[2], 1.5, p, seed, True)
    assert bits.numel() == 0 and h.dtype == adapter  # CUDA regenerates the mask: nothing kept
    y.backward(grad)
    y_ref, grads_ref = reference(x, w, b, a, bb, 1.5, mask, grad)
    assert y.dtype == dtype and rel(y, y_ref) < tol
    for t, want, dt in zip(leaves, grads_ref, (dtype, adapter, adapter)):
        assert t.grad.dtype == dt and rel(t.grad, want) < tol


@pytest.mark.gpu
@cuda
def test_cuda_compile_no_graph_breaks():
    x, w, b, a, bb = make((4, 33), 64, 48, 8, device="cuda", seed=5)
    a.requires_grad_()
    fn = lambda x, a, seed: L.lora_linear(x, w, b, a, bb, 2.0, 0.1, train=True, seed=seed)
    seed = torch.tensor(3, device="cuda")
    assert torch._dynamo.explain(fn)(x, a, seed).graph_break_count == 0
    torch._dynamo.reset()
    out = torch.compile(fn, fullgraph=True)(x, a, seed)
    torch.testing.assert_close(out, fn(x, a, seed), atol=1e-4, rtol=1e-4)
    (g_a,) = torch.autograd.grad(out.sum(), a)
    torch.testing.assert_close(g_a, torch.autograd.grad(fn(x, a, seed).sum(), a)[0], atol=1e-4, rtol=1e-4)
