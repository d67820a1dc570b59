"""peftc::lora_linear on CPU: gradcheck, parity with the unfused reference, dropout regenerated
from the seed (not saved), torch.export / torch.compile without graph breaks; Triton kernels
under TRITON_INTERPRET=1 in a subprocess (tests/test_kernel_lora_linear_triton.py)."""

from pathlib import Path

import numpy as np
import pytest
import torch
from interpreted import assert_all_passed, run_interpreted

from peftc.kernels.lora_linear import dropout_mask, lora_linear, lora_linear_reference

OP = torch.ops.peftc.lora_linear.default


def make(tokens_shape=(11,), d_in=37, d_out=53, r=5, dtype=torch.float32, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(dtype)
    x = rnd(*tokens_shape, d_in)
    w, b = rnd(d_out, d_in) / d_in**0.5, rnd(d_out) if bias else None
    a, bb = rnd(r, d_in) / d_in**0.5, rnd(d_out, r) / r**0.5  # B non-zero: the low-rank path counts
    return x, w, b, a, bb


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("p, bias", [(0.0, True), (0.3, True), (0.3, False)])
def test_gradcheck_float64(p, bias):
    x, w, b, a, bb = make((2, 3), d_in=7, d_out=6, r=3, dtype=torch.float64, bias=bias, seed=1)
    seed = torch.tensor(1234)
    args = [t.requires_grad_() for t in (x, w, b, a, bb) if t is not None]
    fn = lambda x, w, *rest: OP(x, w, rest[0] if bias else None, *rest[-2:], 1.5, p, seed, True)
    assert torch.autograd.gradcheck(fn, tuple(args), fast_mode=True)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("shape", [(11,), (3, 11)])
@pytest.mark.parametrize("p", [0.0, 0.2])
def test_matches_unfused_reference(dtype, tol, shape, p):
    x, w, b, a, bb = make(shape, dtype=dtype, seed=2)
    seed = torch.tensor(99)
    mask = dropout_mask(seed, (x.numel() // x.shape[-1], x.shape[-1]), p, torch.float64) if p else None
    grad = torch.randn(*shape, w.shape[0], generator=torch.Generator().manual_seed(3)).to(dtype)
    fused = [t.clone().requires_grad_() for t in (x, b, a, bb)]
    ref = [t.double().requires_grad_() for t in (x, b, a, bb)]
    y = lora_linear(fused[0], w, fused[1], fused[2], fused[3], 2.0, p, train=True, seed=seed)
    y_ref = lora_linear_reference(ref[0], w.double(), ref[1], ref[2], ref[3], 2.0, mask)
    y.backward(grad)
    y_ref.backward(grad.double())
    assert y.dtype == dtype and y.shape == y_ref.shape
    assert rel(y, y_ref) < tol
    for t, t_ref, name in zip(fused, ref, ("dx", "db", "dA", "dB")):
        assert t.grad.dtype == dtype and rel(t.grad, t_ref.grad) < tol, name


@pytest.mark.parametrize("p", [0.0, 0.2])
def test_opcheck_schema_fake_and_autograd_registration(p):
    x, w, b, a, bb = make((2, 5), d_in=7, d_out=6, r=3, seed=7)
    x, a, bb = (t.requires_grad_() for t in (x, a, bb))
    torch.library.opcheck(OP, (x, w, b, a, bb, 1.5, p, torch.tensor(3), True))
    g, h = torch.randn(2, 5, 6), torch.randn(10, 3)
    bits = OP(x, w, b, a, bb, 1.5, p, torch.tensor(3), True)[2]
    assert bits.dtype == torch.uint8 and bits.shape == ((10, 1) if p else (0,))
    for need_dx in (True, False):
        for kept in {bits, bits[:0]}:  # the forward's packed mask, or none (drawn again from the seed)
            args = (g, x.detach(), w, a.detach(), bb.detach(), h, kept, 1.5, p, torch.tensor(3), True, need_dx)
            torch.library.opcheck(torch.ops.peftc.lora_linear_backward.default, args)


def test_input_without_grad_still_trains_the_adapter():
    x, w, b, a, bb = make((3, 11), seed=8)  # x.requires_grad is False: dx is never computed
    seed, grad = torch.tensor(21), torch.randn(3, 11, 53)
    mask = dropout_mask(seed, (33, 37), 0.2)
    fused, ref = ([t.clone().requires_grad_() for t in (a, bb)] for _ in range(2))
    lora_linear(x, w, b, *fused, 2.0, 0.2, train=True, seed=seed).backward(grad)
    lora_linear_reference(x, w, b, *ref, 2.0, mask).backward(grad)
    for t, t_ref in zip(fused, ref):
        assert rel(t.grad, t_ref.grad) < 1e-5


def test_dropout_mask_is_a_function_of_the_seed():
    x, w, b, a, bb = make((64,), d_in=40, seed=4)
    run = lambda s, train=True: lora_linear(x, w, b, a, bb, 2.0, 0.25, train=train, seed=torch.tensor(s))
    assert torch.equal(run(5), run(5))
    assert not torch.allclose(run(5), run(6))
    no_drop = lora_linear_reference(x, w, b, a, bb, 2.0)
    assert not torch.allclose(run(5), no_drop, atol=1e-3)
    torch.testing.assert_close(run(5, train=False), no_drop, atol=1e-5, rtol=1e-5)  # eval: p ignored
    keep = dropout_mask(torch.tensor(5), (64, 40), 0.25)
    assert abs((keep == 0).float().mean().item() - 0.25) < 0.05
    assert torch.allclose(keep[keep != 0], torch.tensor(1 / 0.75))
    torch.manual_seed(0)
    drawn = lora_linear(x, w, b, a, bb, 2.0, 0.25, train=True)  # seed drawn from the global RNG
    torch.manual_seed(0)
    assert torch.equal(drawn, lora_linear(x, w, b, a, bb, 2.0, 0.25, train=True))


def test_backward_saves_x_not_the_dropped_input_and_skips_frozen_weight():
    x, w, b, a, bb = make((8, 16), d_in=32, d_out=24, r=4, seed=5)
    x.requires_grad_()
    a.requires_grad_()
    bb.requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = lora_linear(x, w, b, a, bb, 2.0, 0.1, train=True, seed=torch.tensor(3))
    big = [t for t in saved if t.numel() >= x.numel()]
    assert len(big) == 1 and big[0] is x  # nothing (tokens, in)-sized but x itself
    y.sum().backward()
    assert w.grad is None and x.grad is not None and a.grad.abs().sum() > 0 and bb.grad.abs().sum() > 0


def test_bad_shapes_raise():
    x, w, b, a, bb = make()
    with pytest.raises(ValueError, match="lora_B"):
        lora_linear(x, w, b, a, bb.t(), 1.0)
    with pytest.raises(ValueError, match="bias"):
        lora_linear(x, w, b[:-1], a, bb, 1.0)
    with pytest.raises(ValueError, match="p=1.0"):
        lora_linear(x, w, b, a, bb, 1.0, p=1.0)


class LoraLinear(torch.nn.Module):
    """A frozen linear with a LoRA adapter computed by the fused op."""

    def __init__(self, d_in=24, d_out=20, r=4, p=0.1):
        super().__init__()
        x, w, b, a, bb = make((1,), d_in, d_out, r, seed=6)
        self.weight = torch.nn.Parameter(w, requires_grad=False)
        self.bias = torch.nn.Parameter(b, requires_grad=False)
        self.lora_A, self.lora_B, self.p = torch.nn.Parameter(a), torch.nn.Parameter(bb), p

    def forward(self, x, seed=None):  # seed None: drawn in the graph from the global RNG
        return lora_linear(x, self.weight, self.bias, self.lora_A, self.lora_B, 2.0, self.p, self.training, seed)


def test_torch_export_keeps_the_op():
    mod = LoraLinear()
    x, seed = torch.randn(2, 5, 24), torch.tensor(11)
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq")
    ep = torch.export.export(mod, (x, seed), dynamic_shapes=({0: batch, 1: seq}, None), strict=False)
    assert sum(n.target is OP for n in ep.graph.nodes) == 1
    x2 = torch.randn(3, 7, 24)  # another batch and sequence length
    torch.testing.assert_close(ep.module()(x2, torch.tensor(4)), mod(x2, torch.tensor(4)), atol=1e-6, rtol=1e-6)
    drawn = torch.export.export(mod, (x,), dynamic_shapes=({0: batch, 1: seq},), strict=False).module()
    assert any(n.target is torch.ops.aten.randint.low for n in drawn.graph.nodes)
    torch.manual_seed(1)
    first = drawn(x2)
    assert not torch.equal(first, drawn(x2))  # a fresh mask per call
    torch.manual_seed(1)
    torch.testing.assert_close(drawn(x2), first, atol=0, rtol=0)


def test_torch_compile_inductor_no_graph_breaks():
    mod = LoraLinear()
    x, seed = torch.randn(3, 6, 24, requires_grad=True), torch.tensor(8)
    for args in [(x, seed), (x,)]:  # seed passed in, or drawn inside the graph
        explain = torch._dynamo.explain(mod)(*args)
        assert explain.graph_break_count == 0 and explain.graph_count == 1
    torch._dynamo.reset()
    compiled = torch.compile(mod, backend="inductor", fullgraph=True)
    out = compiled(x, seed)
    grad = torch.randn_like(out)
    (gx,) = torch.autograd.grad(out, x, grad, retain_graph=True)
    out.backward(grad)
    grads = [mod.lora_A.grad.clone(), mod.lora_B.grad.clone()]
    mod.zero_grad()
    ref = mod(x, seed)
    ref_gx, *ref_grads = torch.autograd.grad(ref, [x, mod.lora_A, mod.lora_B], grad)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    for got, want in zip([gx, *grads], [ref_gx, *ref_grads]):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_triton_kernels_under_interpreter():
    """Runs the Triton test module in a fresh interpreter: TRITON_INTERPRET must precede triton's import."""
    path = Path(__file__).with_name("test_kernel_lora_linear_triton.py")
    tail = run_interpreted(["-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not gpu", str(path)])
    assert_all_passed(tail, 4 * 3 + 4)  # every interpreter case ran: 4 tile shapes x 3 dtypes, 4 single cases


@pytest.mark.parametrize("base, p", [(torch.bfloat16, 0.0), (torch.bfloat16, 0.2), (torch.float16, 0.2)])
def test_fp32_adapters_on_a_low_precision_base_compute_as_peft(base, p):
    """HF PEFT: lora = B(A(drop(x.to(A.dtype)))) * s in fp32, y = (x W^T + b + lora).to(base); grads of
    A and B in fp32, of x in the base dtype. The reference is that formula run eagerly in those dtypes."""
    x, w, b, a, bb = make((3, 7), dtype=base, seed=12)
    a, bb = a.float(), bb.float()
    seed = torch.tensor(17)
    mask = dropout_mask(seed, (21, 37), p) if p else None
    grad = torch.randn(3, 7, 53, generator=torch.Generator().manual_seed(13)).to(base)
    fused, ref = ([t.clone().requires_grad_() for t in (x, a, bb)] for _ in range(2))
    y = lora_linear(fused[0], w, b, fused[1], fused[2], 2.0, p, train=True, seed=seed)
    y_ref = lora_linear_reference(ref[0], w, b, ref[1], ref[2], 2.0, mask)
    assert y.dtype == y_ref.dtype == base
    torch.testing.assert_close(y, y_ref, atol=1e-2, rtol=1e-2)
    y.backward(grad)
    y_ref.backward(grad)
    for t, t_ref, dt in zip(fused, ref, (base, torch.float32, torch.float32)):
        assert t.grad.dtype == dt
        assert rel(t.grad, t_ref.grad) < (1e-2 if dt == base else 1e-5)


def test_opcheck_mixed_dtypes():
    x, w, b, a, bb = make((2, 5), d_in=7, d_out=6, r=3, dtype=torch.bfloat16, seed=15)
    args = (x.requires_grad_(), w, b, a.float().requires_grad_(), bb.float().requires_grad_())
    for p in (0.0, 0.2):
        torch.library.opcheck(OP, (*args, 1.5, p, torch.tensor(3), True))


def test_backward_uses_the_mask_kept_from_forward():
    """The packed drop bits saved by forward are the forward's mask; backward reads them, not the seed
    (the kept bits, altered, change the gradients; the seed, altered, does not)."""
    x, w, b, a, bb = make((4, 6), d_in=20, d_out=10, r=3, seed=14)
    seed, grad = torch.tensor(8), torch.randn(4, 6, 10)
    y, h, bits = OP(x, w, b, a, bb, 2.0, 0.3, seed, True)
    drop = dropout_mask(seed, (24, 20), 0.3) == 0
    assert torch.equal(torch.from_numpy(np.unpackbits(bits.numpy(), axis=-1, count=20).astype(bool)), drop)
    back = torch.ops.peftc.lora_linear_backward
    dx, d_a, d_b = back(grad, x, w, a, bb, h, bits, 2.0, 0.3, seed, True, True)
    ref = [t.clone().requires_grad_() for t in (x, a, bb)]
    lora_linear_reference(ref[0], w, b, ref[1], ref[2], 2.0, dropout_mask(seed, (24, 20), 0.3)).backward(grad)
    for got, t in zip((dx, d_a, d_b), ref):
        torch.testing.assert_close(got, t.grad, atol=1e-5, rtol=1e-5)
    other = back(grad, x, w, a, bb, h, bits, 2.0, 0.3, torch.tensor(9), True, True)
    assert all(torch.equal(u, v) for u, v in zip(other, (dx, d_a, d_b)))
    flipped = back(grad, x, w, a, bb, h, bits ^ 0xFF, 2.0, 0.3, seed, True, True)
    assert not torch.allclose(flipped[1], d_a)
