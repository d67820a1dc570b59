"""peftc::ia3_linear and peftc::dora_linear: gradcheck (float64), parity with the unfused float64
reference (fp32 1e-5, bf16 2e-2 relative), what backward saves, opcheck, torch.export and
torch.compile without graph breaks; the Triton kernels under TRITON_INTERPRET=1 in a fresh process
(this file run as a script), and on CUDA when a device is present."""

import os
import re

import pytest
import torch
from interpreted import run_interpreted

from peftc.kernels import dora_linear as D
from peftc.kernels import ia3_linear as I
from peftc.kernels.lora_linear import dropout_mask

IA3, DORA = torch.ops.peftc.ia3_linear.default, torch.ops.peftc.dora_linear.default
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def rnd(g, *shape, dtype=torch.float32, device="cpu"):
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype=dtype, device=device)


def make_ia3(shape=(11,), d_in=37, d_out=53, mode="out", dtype=torch.float32, bias=True, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: rnd(g, *s, dtype=dtype, device=device)
    return r(*shape, d_in), r(d_out, d_in) / d_in**0.5, r(d_out) if bias else None, r(d_out if mode == "out" else d_in)


def make_dora(shape=(11,), d_in=37, d_out=53, rank=5, dtype=torch.float32, bias=True, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: rnd(g, *s, dtype=dtype, device=device)
    x, w, b = r(*shape, d_in), r(d_out, d_in) / d_in**0.5, r(d_out) if bias else None
    m = (torch.rand(d_out, generator=g, dtype=torch.float64) + 0.5).to(dtype=dtype, device=device)  # mn != 1
    return x, w, b, r(rank, d_in) / d_in**0.5, r(d_out, rank) / rank**0.5, m  # B non-zero


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def ia3_ref(x, w, b, v, mode, grad):
    """Float64 output and gradients (x, W, b, l) of the unfused formula."""
    leaves = [t.double().requires_grad_() if t is not None else None for t in (x, w, b, v)]
    y = I.ia3_linear_reference(*leaves, mode)
    y.backward(grad.double())
    return y, [t.grad if t is not None else None for t in leaves]


def dora_ref(x, w, b, a, bb, m, scale, mask, grad):
    """Float64 output and gradients (x, W, b, A, B, m) of PEFT's formula (norm detached)."""
    leaves = [t.double().requires_grad_() if t is not None else None for t in (x, w, b, a, bb, m)]
    y = D.dora_linear_reference(*leaves, scale, mask)
    y.backward(grad.double())
    return y, [t.grad if t is not None else None for t in leaves]


# ---------------------------------------------------------------- CPU op


@pytest.mark.parametrize("mode", ["out", "in"])
@pytest.mark.parametrize("bias", [True, False])
def test_ia3_gradcheck_float64(mode, bias):
    x, w, b, v = make_ia3((2, 3), 7, 6, mode, torch.float64, bias, seed=1)
    args = [t.requires_grad_() for t in (x, w, b, v) if t is not None]
    fn = lambda x, w, *rest: IA3(x, w, rest[0] if bias else None, rest[-1], mode)[0]
    assert torch.autograd.gradcheck(fn, tuple(args))


@pytest.mark.parametrize("p, bias", [(0.0, True), (0.3, True), (0.3, False)])
def test_dora_gradcheck_float64(p, bias):
    """Finite differences over x, bias and m; A, B and W also move the detached norm, so their
    gradients are checked against the float64 reference (which detaches it as PEFT does)."""
    x, w, b, a, bb, m = make_dora((2, 3), 7, 6, 3, torch.float64, bias, seed=1)
    seed = torch.tensor(1234)
    args = [t.requires_grad_() for t in (x, b, m) if t is not None]
    fn = lambda x, *rest: DORA(x, w, rest[0] if bias else None, a, bb, rest[-1], 1.5, p, seed, True)[0]
    assert torch.autograd.gradcheck(fn, tuple(args))
    mask = dropout_mask(seed, (6, 7), p, torch.float64) if p else None
    grad = torch.randn(2, 3, 6, dtype=torch.float64)
    leaves = [t.detach().requires_grad_() if t is not None else None for t in (x, w, b, a, bb, m)]
    D.dora_linear(*leaves, 1.5, p, train=True, seed=seed).backward(grad)
    _, want = dora_ref(x, w, b, a, bb, m, 1.5, mask, grad)
    for got, ref in zip(leaves, want):
        if got is not None:
            torch.testing.assert_close(got.grad, ref, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("shape", [(11,), (3, 11)])
@pytest.mark.parametrize("mode", ["out", "in"])
def test_ia3_matches_unfused_reference(dtype, tol, shape, mode):
    x, w, b, v = make_ia3(shape, mode=mode, dtype=dtype, seed=2)
    grad = rnd(torch.Generator().manual_seed(3), *shape, 53, dtype=dtype)
    leaves = [t.clone().requires_grad_() for t in (x, w, b, v)]  # trainable W too: dW checked
    y = I.ia3_linear(*leaves, mode)
    y.backward(grad)
    y_ref, grads = ia3_ref(x, w, b, v, mode, grad)
    assert y.dtype == dtype and y.shape == y_ref.shape and rel(y, y_ref) < tol
    for t, want, name in zip(leaves, grads, ("dx", "dW", "db", "dl")):
        assert t.grad.dtype == dtype and rel(t.grad, want) < tol, name


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("shape", [(11,), (3, 11)])
@pytest.mark.parametrize("p, train", [(0.0, True), (0.2, True), (0.2, False)])
def test_dora_matches_unfused_reference(dtype, tol, shape, p, train):
    x, w, b, a, bb, m = make_dora(shape, dtype=dtype, seed=2)
    seed = torch.tensor(99)
    tokens = x.numel() // x.shape[-1]
    mask = dropout_mask(seed, (tokens, 37), p, torch.float64) if p and train else None
    grad = rnd(torch.Generator().manual_seed(3), *shape, 53, dtype=dtype)
    leaves = [t.clone().requires_grad_() for t in (x, w, b, a, bb, m)]
    y = D.dora_linear(*leaves, 2.0, p, train=train, seed=seed)
    y.backward(grad)
    y_ref, grads = dora_ref(x, w, b, a, bb, m, 2.0, mask, grad)
    assert y.dtype == dtype and y.shape == y_ref.shape and rel(y, y_ref) < tol
    for t, want, name in zip(leaves, grads, ("dx", "dW", "db", "dA", "dB", "dm")):
        assert t.grad.dtype == dtype and rel(t.grad, want) < tol, name


def test_dora_dropout_is_a_function_of_the_seed_and_off_in_eval():
    x, w, b, a, bb, m = make_dora((64,), seed=4)
    run = lambda s, train=True: D.dora_linear(x, w, b, a, bb, m, 2.0, 0.25, train=train, seed=torch.tensor(s))
    assert torch.equal(run(5), run(5)) and not torch.allclose(run(5), run(6))
    no_drop = D.dora_linear_reference(x, w, b, a, bb, m, 2.0)
    assert not torch.allclose(run(5), no_drop, atol=1e-3)
    torch.testing.assert_close(run(5, train=False), no_drop, atol=1e-5, rtol=1e-5)


def _big_saved(fn, like):
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = fn()
    return out, [t for t in saved if t.numel() >= like.numel()]


def test_backward_saves_base_output_not_recomputed_and_skips_frozen_weight():
    x, w, b, v = make_ia3((8, 16), 32, 24, "out", seed=5)
    x.requires_grad_(), v.requires_grad_()
    y, big = _big_saved(lambda: I.ia3_linear(x, w, b, v, "out"), torch.empty(8, 16, 24))
    assert len(big) == 2 and big[0] is x and big[1].shape == (8, 16, 24)  # x and u = x W^T + b
    torch.testing.assert_close(big[1], torch.nn.functional.linear(x, w, b))
    y.sum().backward()
    assert w.grad is None and b.grad is None and x.grad is not None and v.grad.abs().sum() > 0
    x, w, b, a, bb, m = make_dora((8, 16), 32, 24, 4, seed=5)
    for t in (x, a, bb, m):
        t.requires_grad_()
    y, big = _big_saved(lambda: D.dora_linear(x, w, b, a, bb, m, 2.0, 0.1, train=True, seed=torch.tensor(3)),
                       torch.empty(128, 24))
    assert [t.shape for t in big] == [x.shape, (128, 24)] and big[0] is x  # x and z; drop(x) regenerated
    y.sum().backward()
    assert w.grad is None and all(t.grad.abs().sum() > 0 for t in (x, a, bb, m))


@pytest.mark.parametrize("p", [0.0, 0.2])
def test_opcheck_schema_fake_and_autograd_registration(p):
    for mode in ("out", "in"):
        x, w, b, v = make_ia3((2, 5), 7, 6, mode, seed=7)
        torch.library.opcheck(IA3, (x.requires_grad_(), w, b, v.requires_grad_(), mode))
        u = torch.randn(2, 5, 6) if mode == "out" else torch.empty(0)
        for need_dx in (True, False):
            torch.library.opcheck(torch.ops.peftc.ia3_linear_backward.default,
                                  (torch.randn(2, 5, 6), x.detach(), w, v.detach(), u, mode, need_dx))
    x, w, b, a, bb, m = make_dora((2, 5), 7, 6, 3, seed=7)
    torch.library.opcheck(DORA, (x.requires_grad_(), w, b, a.requires_grad_(), bb.requires_grad_(),
                                 m.requires_grad_(), 1.5, p, torch.tensor(3), True))
    h, z, n = torch.randn(10, 3), torch.randn(10, 6), torch.rand(6) + 1
    for need_dx in (True, False):
        args = (torch.randn(2, 5, 6), x.detach(), w, a.detach(), bb.detach(), m.detach(), h, z, n, 1.5, p,
                torch.tensor(3), True, need_dx)
        torch.library.opcheck(torch.ops.peftc.dora_linear_backward.default, args)


@pytest.mark.parametrize("mode", ["out", "in"])
def test_ia3_fp32_vector_on_a_bf16_base_computes_as_peft(mode):
    """HF PEFT: "out" y = (base(x) * l).to(bf16); "in" y = base((x.float() * l).to(bf16)); dl in fp32."""
    x, w, b, v = make_ia3((3, 7), mode=mode, dtype=torch.bfloat16, seed=21)
    v = v.float()
    grad = torch.randn(3, 7, 53, generator=torch.Generator().manual_seed(22)).to(torch.bfloat16)
    fused, ref = ([t.clone().requires_grad_() for t in (x, v)] for _ in range(2))
    y = I.ia3_linear(fused[0], w, b, fused[1], mode)
    lin = torch.nn.functional.linear
    y_ref = (lin(ref[0], w, b) * ref[1]).to(torch.bfloat16) if mode == "out" else \
        lin((ref[0].float() * ref[1]).to(torch.bfloat16), w, b)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, y_ref, atol=1e-3, rtol=1e-3)
    y.backward(grad)
    y_ref.backward(grad)
    for t, t_ref, dt in zip(fused, ref, (torch.bfloat16, torch.float32)):
        assert t.grad.dtype == dt and rel(t.grad, t_ref.grad) < 1e-3


@pytest.mark.parametrize("p", [0.0, 0.2])
def test_dora_fp32_adapters_on_a_bf16_base(p):
    """A, B, magnitude in fp32 on a bf16 base: y and dx in bf16, dA, dB, dm in fp32, within bf16 rounding
    of PEFT's formula in float64."""
    x, w, b, a, bb, m = make_dora((3, 7), dtype=torch.bfloat16, seed=23)
    a, bb, m = a.float(), bb.float(), m.float()
    seed = torch.tensor(5)
    mask = dropout_mask(seed, (21, 37), p, torch.float64) if p else None
    grad = torch.randn(3, 7, 53, generator=torch.Generator().manual_seed(24)).to(torch.bfloat16)
    leaves = [t.clone().requires_grad_() for t in (x, a, bb, m)]
    y = D.dora_linear(leaves[0], w, b, *leaves[1:], 1.5, p, train=True, seed=seed)
    y.backward(grad)
    y_ref, (dx, _, _, da, db, dm) = dora_ref(x, w, b, a, bb, m, 1.5, mask, grad)
    assert y.dtype == torch.bfloat16 and rel(y, y_ref) < 2e-2
    for t, want, dt in zip(leaves, (dx, da, db, dm), (torch.bfloat16, *[torch.float32] * 3)):
        assert t.grad.dtype == dt and rel(t.grad, want) < 2e-2


def test_opcheck_mixed_dtypes():
    """Fake impls give the dtypes the real ones return when adapters are fp32 on a bf16 base."""
    x, w, b, v = make_ia3((2, 5), d_in=7, d_out=6, dtype=torch.bfloat16, seed=25)
    torch.library.opcheck(IA3, (x.requires_grad_(), w, b, v.float().requires_grad_(), "out"))
    x, w, b, a, bb, m = make_dora((2, 5), d_in=7, d_out=6, rank=3, dtype=torch.bfloat16, seed=26)
    args = [x.requires_grad_(), w, b, *(t.float().requires_grad_() for t in (a, bb, m))]
    torch.library.opcheck(DORA, (*args, 1.5, 0.2, torch.tensor(3), True))


def test_bad_inputs_raise():
    x, w, b, v = make_ia3()
    with pytest.raises(ValueError, match="mode"):
        I.ia3_linear(x, w, b, v, "both")
    with pytest.raises(ValueError, match="vec"):
        I.ia3_linear(x, w, b, v, "in")  # (out,) vector on an input scaling
    x, w, b, a, bb, m = make_dora()
    with pytest.raises(ValueError, match="magnitude"):
        D.dora_linear(x, w, b, a, bb, m[:-1], 1.0)
    with pytest.raises(ValueError, match="p=1.0"):
        D.dora_linear(x, w, b, a, bb, m, 1.0, p=1.0)


class Scaled(torch.nn.Module):
    """A frozen linear with IA3 (output), IA3 (input) and DoRA, each through its fused op."""

    def __init__(self, d=24):
        super().__init__()
        x, w, b, a, bb, m = make_dora((1,), d, d, 4, seed=6)
        self.weight, self.bias = torch.nn.Parameter(w, requires_grad=False), torch.nn.Parameter(b, requires_grad=False)
        self.lora_A, self.lora_B, self.m = torch.nn.Parameter(a), torch.nn.Parameter(bb), torch.nn.Parameter(m)
        self.l_out, self.l_in = torch.nn.Parameter(torch.rand(d) + 0.5), torch.nn.Parameter(torch.rand(d) + 0.5)

    def forward(self, x, seed):
        y = I.ia3_linear(x, self.weight, self.bias, self.l_out, "out")
        y = I.ia3_linear(y, self.weight, self.bias, self.l_in, "in")
        return D.dora_linear(y, self.weight, self.bias, self.lora_A, self.lora_B, self.m, 2.0, 0.1, True, seed)


def test_torch_export_keeps_the_ops():
    mod, x = Scaled(), torch.randn(2, 5, 24)
    dims = ({0: torch.export.Dim("batch"), 1: torch.export.Dim("seq")}, None)
    ep = torch.export.export(mod, (x, torch.tensor(1)), dynamic_shapes=dims, strict=False)
    targets = [n.target for n in ep.graph.nodes]
    assert targets.count(IA3) == 2 and targets.count(DORA) == 1
    x2 = torch.randn(3, 7, 24)  # another batch and sequence length
    torch.testing.assert_close(ep.module()(x2, torch.tensor(4)), mod(x2, torch.tensor(4)), atol=1e-6, rtol=1e-6)


def test_torch_compile_inductor_no_graph_breaks():
    mod = Scaled()
    x, seed = torch.randn(3, 6, 24, requires_grad=True), torch.tensor(8)
    explain = torch._dynamo.explain(mod)(x, seed)
    assert explain.graph_break_count == 0 and explain.graph_count == 1
    torch._dynamo.reset()
    out = torch.compile(mod, backend="inductor", fullgraph=True)(x, seed)
    leaves = [x, mod.lora_A, mod.lora_B, mod.m, mod.l_out, mod.l_in]
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, leaves, grad)
    ref = mod(x, seed)
    want = torch.autograd.grad(ref, leaves, grad)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- Triton


SMALL = (16, 16, 16)  # tiles smaller than the sizes: masks, the K loop and the rank loop all run
TRITON_IA3 = [((11,), 37, 53, "out", True), ((2, 11), 37, 53, "in", False), ((9,), 40, 18, "out", False),
              ((2, 9), 40, 18, "in", True)]
TRITON_DORA = [((11,), 37, 53, 5, True, 0.0), ((2, 11), 37, 53, 5, False, 0.3), ((9,), 40, 18, 20, True, 0.3),
               ((2, 9), 40, 18, 20, True, 0.0)]


def triton_cases(device="cpu", blocks=SMALL) -> int:
    """Every Triton launcher against the float64 reference, fp32 and bf16; returns the cases run."""
    from peftc.kernels.lora_linear import triton_dropout_mask

    n = 0
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        for shape, d_in, d_out, mode, bias in TRITON_IA3:
            x, w, b, v = make_ia3(shape, d_in, d_out, mode, dtype, bias, seed=n, device=device)
            grad = rnd(torch.Generator().manual_seed(n), *shape, d_out, dtype=dtype, device=device)
            y, u = I.triton_forward(x, w, b, v, mode, blocks=blocks)
            for need_dx in (True, False):
                dx, dl = I.triton_backward(grad, x, w, v, u, mode, need_dx, blocks=blocks)
                y_ref, (dx_ref, _, _, dl_ref) = ia3_ref(x, w, b, v, mode, grad)
                assert rel(y, y_ref) < tol and rel(dl, dl_ref) < tol, (dtype, shape, mode)
                assert (rel(dx, dx_ref) < tol) if need_dx else dx.numel() == 0, (dtype, shape, mode)
            n += 1
        for shape, d_in, d_out, rank, bias, p in TRITON_DORA:
            x, w, b, a, bb, m = make_dora(shape, d_in, d_out, rank, dtype, bias, seed=n, device=device)
            grad = rnd(torch.Generator().manual_seed(n), *shape, d_out, dtype=dtype, device=device)
            seed, tokens = torch.tensor(2024 + n), x.numel() // d_in
            mask = triton_dropout_mask(seed, tokens, d_in, p, device=device).double() if p else None
            y, h, z, nrm = D.triton_forward(x, w, b, a, bb, m, 1.5, p, seed, True, blocks=blocks)
            y_ref, (dx_ref, _, _, da_ref, db_ref, dm_ref) = dora_ref(x, w, b, a, bb, m, 1.5, mask, grad)
            assert rel(y, y_ref) < tol, (dtype, shape, p)
            for need_dx in (True, False):
                dx, d_a, d_b, d_m = D.triton_backward(grad, x, w, a, bb, m, h, z, nrm, 1.5, p, seed, True, need_dx,
                                                      blocks=blocks)
                for got, want, name in ((d_a, da_ref, "dA"), (d_b, db_ref, "dB"), (d_m, dm_ref, "dm")):
                    assert got.dtype == dtype and rel(got, want) < tol, (dtype, shape, p, name)
                assert (rel(dx, dx_ref) < tol) if need_dx else dx.numel() == 0, (dtype, shape, p)
            n += 1
    return n


@pytest.mark.slow
def test_triton_kernels_under_interpreter():
    """This file as a script in a fresh interpreter: TRITON_INTERPRET must precede triton's import."""
    tail = run_interpreted([__file__])
    ran = re.search(r"(\d+) triton cases passed", tail)
    assert ran and int(ran.group(1)) == 2 * (len(TRITON_IA3) + len(TRITON_DORA)), tail


@pytest.mark.gpu
@cuda
def test_cuda_ops_run_triton_and_match_reference():
    assert triton_cases("cuda", blocks=None) == 2 * (len(TRITON_IA3) + len(TRITON_DORA))
    x, w, b, a, bb, m = make_dora((3, 67), 200, 130, 16, device="cuda", seed=4)
    leaves = [t.requires_grad_() for t in (x, a, bb, m)]
    y = D.dora_linear(x, w, b, a, bb, m, 1.5, 0.1, train=True, seed=torch.tensor(7, device="cuda"))
    y.sum().backward()
    assert y.is_cuda and all(t.grad is not None and t.grad.abs().sum() > 0 for t in leaves)


if __name__ == "__main__":
    assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1 (see the test above)"
    print(f"{triton_cases()} triton cases passed")
