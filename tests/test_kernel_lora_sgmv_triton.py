"""Triton kernels of peftc::lora_sgmv against the sample-by-sample float64 reference.

Interpreter tests need TRITON_INTERPRET=1 set before triton is imported, so they run in a fresh
process (tests/test_sgmv.py launches this file that way); in a process that imported triton
without it they skip. Small blocks (16) and sizes that are not multiples of them exercise the
tile masks, the K loop, segments longer than a tile and padded ranks; the default BLOCKS run too.
GPU tests run the op itself on CUDA.
"""

import os

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed (the gpu or dev extra: pip install -e .[dev])")

from peftc.kernels import lora_sgmv as S

interpret = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                               reason="needs TRITON_INTERPRET=1 before triton's import "
                                      "(test_sgmv.py runs this file in such a process)")
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
SMALL = (16, 16, 16)
SLOTS, SCALES = [3, 7], [2.0, 0.5]


def make(lead, d_in, d_out, ranks, dtype=torch.float32, device="cpu", seed=0, adapter_dtype=None):
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s, dt=dtype: torch.randn(*s, generator=g).to(device=device, dtype=dt)
    ad = adapter_dtype or dtype
    return rnd(*lead, d_out), rnd(*lead, d_in), [rnd(r, d_in, dt=ad) / d_in**0.5 for r in ranks], \
        [rnd(d_out, r, dt=ad) / r**0.5 for r in ranks]


def rel(a, b):
    return ((a.double() - b.double()).norm() / max(b.double().norm(), 1e-30)).item()


def reference(y, x, index, As, Bs, masks, grad):
    """Float64 forward and (dx, dAs, dBs) of the sample-by-sample formula."""
    leaves = [t.double().requires_grad_() for t in (x, *As, *Bs)]
    out = S.lora_sgmv_reference(y.double(), leaves[0], index, SLOTS, leaves[1:3], leaves[3:], SCALES, masks)
    out.backward(grad.double())
    return out, [t.grad for t in leaves]


def check(lead, d_in, d_out, ranks, index, p, dtype, tol, blocks, device="cpu", adapter_dtype=None, adapter_tol=None):
    """``adapter_dtype``: A, B in it (fp32 on a bf16 base), their gradients within ``adapter_tol``."""
    y, x, As, Bs = make(lead, d_in, d_out, ranks, dtype=dtype, device=device, seed=1, adapter_dtype=adapter_dtype)
    index = torch.tensor(index, device=device)
    seed, rows = torch.tensor(2024, device=device), x.numel() // d_in
    ps = [p, p / 2]
    masks = [S.triton_keep_mask(seed, k, rows, d_in, q, device=device).double() if q else None
             for k, q in enumerate(ps)]
    grad = torch.randn(*lead, d_out, generator=torch.Generator().manual_seed(2)).to(device=device, dtype=dtype)
    out, h = S.triton_forward(y, x, index, SLOTS, As, Bs, SCALES, ps, seed, True, blocks=blocks)
    dx, d_as, d_bs = S.triton_backward(grad, x, h, index, SLOTS, As, Bs, SCALES, ps, seed, True, True, blocks=blocks)
    ref, (dx_ref, *dw_ref) = reference(y, x, index.cpu(), As, Bs, masks, grad)
    assert out.shape == y.shape and dx.shape == x.shape and h.shape == (rows, max(ranks)) and dx.dtype == dtype
    assert out.dtype == dtype and h.dtype == As[0].dtype
    assert rel(out, ref) < tol and rel(dx, dx_ref) < tol
    for got, want, leaf in zip([*d_as, *d_bs], dw_ref, [*As, *Bs]):
        assert got.dtype == leaf.dtype
        if want is None:  # an empty slot: the reference never touched it
            assert got.shape == leaf.shape and not got.any()
        else:
            assert got.shape == want.shape and rel(got, want) < (adapter_tol or tol)


SHAPES = [
    ((5, 3), 37, 21, (2, 20), [3, 7, 3, -1, 7]),  # unsorted, base sample, a rank above the 16-wide tile
    ((19,), 20, 33, (4, 4), [7, 7, 3, 3, 3, 3, 7, 3, 3, 3, 3, 3, 7, 7, 3, 3, 3, 7, 3]),  # a segment > one tile
    ((3, 1), 18, 17, (1, 3), [7, 3, -1]),  # decode step T = 1
    ((1, 9), 24, 16, (5, 2), [3]),  # batch of 1, slot 7 empty
]


@interpret
@pytest.mark.parametrize("lead, d_in, d_out, ranks, index", SHAPES)
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_interpreted_kernels_match_reference(lead, d_in, d_out, ranks, index, p):
    check(lead, d_in, d_out, ranks, index, p, torch.float32, 1e-5, SMALL)


@interpret
@pytest.mark.parametrize("lead, d_in, d_out, ranks, index", SHAPES[:2])
def test_interpreted_bf16(lead, d_in, d_out, ranks, index):
    check(lead, d_in, d_out, ranks, index, 0.3, torch.bfloat16, 2e-2, SMALL)


@interpret
@pytest.mark.parametrize("lead, d_in, d_out, ranks, index", SHAPES[:1])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_interpreted_fp32_adapters_on_bf16(lead, d_in, d_out, ranks, index, p):
    """HF PEFT's default dtypes: x, g tiles cast up to fp32 before the dots, y + s h B^T added in
    fp32 and stored bf16: out, dx within bf16 rounding; h, dA, dB fp32 and as exact as fp32."""
    check(lead, d_in, d_out, ranks, index, p, torch.bfloat16, 1e-2, SMALL, adapter_dtype=torch.float32,
          adapter_tol=1e-5)


@interpret
def test_interpreted_default_blocks():
    check((6, 5), 70, 130, (8, 16), [7, -1, 3, 3, 7, 7], 0.1, torch.float32, 1e-5, None)


@interpret
def test_interpreted_mask_depends_on_seed_and_slot():
    m1, m2, m3 = (S.triton_keep_mask(torch.tensor(s), k, 40, 50, 0.2) for s, k in ((1, 0), (2, 0), (1, 1)))
    assert abs((m1 == 0).float().mean().item() - 0.2) < 0.04 and not torch.equal(m1, m2) and not torch.equal(m1, m3)
    assert torch.equal(m1, S.triton_keep_mask(torch.tensor(1), 0, 40, 50, 0.2))
    assert torch.allclose(m1[m1 != 0], torch.tensor(1 / 0.8))


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("dtype, tol, adapter_dtype", [(torch.float32, 1e-4, None), (torch.bfloat16, 2e-2, None),
                                                       (torch.bfloat16, 2e-2, torch.float32)])
@pytest.mark.parametrize("p", [0.0, 0.1])
def test_cuda_op_runs_triton_and_matches_reference(dtype, tol, adapter_dtype, p):
    index = [int(i) for i in torch.randint(-1, 2, (24,), generator=torch.Generator().manual_seed(0))]
    index = [SLOTS[i] if i >= 0 else -1 for i in index]
    check((24, 67), 256, 200, (16, 8), index, p, dtype, tol, None, device="cuda", adapter_dtype=adapter_dtype,
          adapter_tol=1e-4 if adapter_dtype else None)
    y, x, As, Bs = make((24, 67), 256, 200, (16, 8), dtype=dtype, device="cuda", adapter_dtype=adapter_dtype)
    leaves = [t.clone().requires_grad_() for t in (x, *As, *Bs)]
    out = S.lora_sgmv(y, leaves[0], torch.tensor(index, device="cuda"), SLOTS, leaves[1:3], leaves[3:], SCALES)
    out.sum().backward()
    assert out.dtype == dtype and all(t.grad is not None and t.grad.dtype == t.dtype for t in leaves)


@pytest.mark.gpu
@cuda
def test_cuda_compile_no_graph_breaks():
    y, x, As, Bs = make((4, 33), 64, 48, (8, 4), device="cuda", seed=5)
    index = torch.tensor([3, -1, 7, 3], device="cuda")
    fn = lambda y, x: S.lora_sgmv(y, x, index, SLOTS, As, Bs, SCALES, [0.1, 0.0], train=True,
                                  seed=torch.tensor(3, device="cuda"))
    assert torch._dynamo.explain(fn)(y, x).graph_break_count == 0
    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(fn, fullgraph=True)(y, x), fn(y, x), atol=1e-4, rtol=1e-4)
