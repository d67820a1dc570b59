"""peftc::lora_siblings: gradcheck, parity with the unfused reference (one shared mask), equality
with lora_linear for one sibling, opcheck, saved tensors, torch.export / torch.compile; Triton
kernels under TRITON_INTERPRET=1 (cases defined only in such a process: the driver test below
runs this file that way) and on CUDA (marker gpu)."""

import os
from pathlib import Path

import pytest
import torch
from interpreted import assert_all_passed, run_interpreted

from peftc.kernels import lora_siblings as S
from peftc.kernels.lora_linear import dropout_mask, lora_linear

OP = torch.ops.peftc.lora_siblings.default
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
SCALES = [1.5, 2.0, 0.5]


def make(tokens_shape=(11,), d_in=37, outs=(53, 19, 29), ranks=(5, 3, 7), dtype=torch.float32, bias=(1, 0, 1),
         seed=0, device="cpu"):
    """x, weights, biases (None where bias[i] is 0), As, Bs: B non-zero, so the low-rank path counts."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    x = rnd(*tokens_shape, d_in)
    ws = [rnd(o, d_in) / d_in**0.5 for o in outs]
    bs = [rnd(o) if has else None for o, has in zip(outs, bias)]
    As = [rnd(r, d_in) / d_in**0.5 for r in ranks]
    Bs = [rnd(o, r) / r**0.5 for o, r in zip(outs, ranks)]
    return x, ws, bs, As, Bs


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def reference(x, ws, bs, As, Bs, scales, mask, grads):
    """Float64 outputs and (dx, dAs, dBs) of the unfused formula."""
    d = lambda t: None if t is None else t.double()
    xr, ar, br = x.double().requires_grad_(), [a.double().requires_grad_() for a in As], \
        [b.double().requires_grad_() for b in Bs]
    ys = S.lora_siblings_reference(xr, [d(w) for w in ws], [d(b) for b in bs], ar, br, scales, mask)
    torch.autograd.backward(ys, [g.double() for g in grads])
    return ys, xr.grad, [a.grad for a in ar], [b.grad for b in br]


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_gradcheck_float64(p):
    """Every input differentiable, a trainable base included (dW, db)."""
    x, ws, bs, As, Bs = make((2, 3), d_in=7, outs=(6, 4), ranks=(3, 2), dtype=torch.float64, bias=(1, 1), seed=1)
    seed, n = torch.tensor(1234), 2
    leaves = tuple(t.requires_grad_() for t in (x, *ws, *bs, *As, *Bs))

    def fn(x, *ts):
        ys, _, _ = OP(x, list(ts[:n]), list(ts[n:2 * n]), list(ts[2 * n:3 * n]), list(ts[3 * n:]), [1.5, 0.7], p, seed,
                   True)
        return tuple(ys)

    assert torch.autograd.gradcheck(fn, leaves, fast_mode=True)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("shape", [(11,), (3, 11)])
@pytest.mark.parametrize("p", [0.0, 0.2])
def test_matches_unfused_reference(dtype, tol, shape, p):
    x, ws, bs, As, Bs = make(shape, dtype=dtype, seed=2)
    seed, tokens = torch.tensor(99), x.numel() // x.shape[-1]
    mask = dropout_mask(seed, (tokens, x.shape[-1]), p, torch.float64) if p else None
    g = torch.Generator().manual_seed(3)
    grads = [torch.randn(*shape, w.shape[0], generator=g).to(dtype) for w in ws]
    xl, al, bl = x.clone().requires_grad_(), [a.clone().requires_grad_() for a in As], \
        [b.clone().requires_grad_() for b in Bs]
    ys = S.lora_siblings(xl, ws, bs, al, bl, SCALES, p, train=True, seed=seed)
    torch.autograd.backward(ys, grads)
    ys_ref, dx_ref, da_ref, db_ref = reference(x, ws, bs, As, Bs, SCALES, mask, grads)
    for y, y_ref in zip(ys, ys_ref):
        assert y.dtype == dtype and y.shape == y_ref.shape and rel(y, y_ref) < tol
    assert xl.grad.dtype == dtype and rel(xl.grad, dx_ref) < tol
    for t, want in zip([*al, *bl], [*da_ref, *db_ref]):
        assert t.grad.dtype == dtype and t.grad.abs().sum() > 0 and rel(t.grad, want) < tol


@pytest.mark.parametrize("p", [0.0, 0.25])
def test_one_sibling_equals_lora_linear(p):
    """Same seed, same mask: a group of one computes exactly what lora_linear does."""
    x, ws, bs, As, Bs = make((4, 9), outs=(53,), ranks=(5,), bias=(1,), seed=4)
    seed, grad = torch.tensor(5), torch.randn(4, 9, 53)
    leaves = [[t.clone().requires_grad_() for t in (x, As[0], Bs[0])] for _ in range(2)]
    (y1,) = S.lora_siblings(leaves[0][0], ws, bs, [leaves[0][1]], [leaves[0][2]], [2.0], p, True, seed)
    y2 = lora_linear(leaves[1][0], ws[0], bs[0], leaves[1][1], leaves[1][2], 2.0, p, True, seed)
    y1.backward(grad)
    y2.backward(grad)
    torch.testing.assert_close(y1, y2, atol=1e-6, rtol=1e-6)
    for a, b in zip(*leaves):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("p", [0.0, 0.2])
def test_opcheck_schema_fake_and_autograd_registration(p):
    x, ws, bs, As, Bs = make((2, 5), d_in=7, outs=(6, 4, 5), ranks=(3, 2, 1), seed=7)
    x, As, Bs = x.requires_grad_(), [a.requires_grad_() for a in As], [b.requires_grad_() for b in Bs]
    torch.library.opcheck(OP, (x, ws, bs, As, Bs, SCALES, p, torch.tensor(3), True))
    grads, h = [torch.randn(2, 5, w.shape[0]) for w in ws], torch.randn(10, 6)
    bits = OP(x, ws, bs, As, Bs, SCALES, p, torch.tensor(3), True)[2]
    assert bits.dtype == torch.uint8 and bits.shape == ((10, 1) if p else (0,))
    for need_dx in (True, False):
        for kept in {bits, bits[:0]}:  # the forward's packed mask, or none (drawn again from the seed)
            args = (grads, x.detach(), ws, [a.detach() for a in As], [b.detach() for b in Bs], h, kept, SCALES, p,
                    torch.tensor(3), True, need_dx)
            torch.library.opcheck(torch.ops.peftc.lora_siblings_backward.default, args)


def test_backward_saves_x_and_h_only():
    x, ws, bs, As, Bs = make((8, 16), d_in=32, outs=(24, 24, 24), ranks=(4, 4, 4), seed=5)
    x.requires_grad_()
    for t in (*As, *Bs):
        t.requires_grad_()
    saved, seed = [], torch.tensor(3)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        ys = S.lora_siblings(x, ws, bs, As, Bs, SCALES, 0.1, train=True, seed=seed)
    held = (*ws, *As, *Bs, seed)
    acts = [t for t in saved if not any(t is q for q in held)]  # activations: x, h, mask bits; no drop(x)
    assert len(acts) == 3 and acts[0] is x and acts[1].shape == (128, 12)
    assert acts[2].dtype == torch.uint8 and acts[2].shape == (128, 4)  # 32 features, 8 per byte
    sum(y.sum() for y in ys).backward()
    assert all(w.grad is None for w in ws) and x.grad is not None


def test_bad_inputs_raise():
    x, ws, bs, As, Bs = make()
    with pytest.raises(ValueError, match="lora_B"):
        S.lora_siblings(x, ws, bs, As, [Bs[0], Bs[1].t(), Bs[2]], SCALES)
    with pytest.raises(ValueError, match="scales"):
        S.lora_siblings(x, ws, bs, As, Bs, SCALES[:2])
    bs[0].requires_grad_()  # a trainable bias beside a missing one: torch.library would drop its grad
    with pytest.raises(ValueError, match="trainable bias"):
        S.lora_siblings(x, ws, bs, As, Bs, SCALES)


class Siblings(torch.nn.Module):
    """Frozen q/k/v-like linears with LoRA adapters computed by the fused op."""

    def __init__(self, p=0.1):
        super().__init__()
        _, ws, bs, As, Bs = make((1,), d_in=24, outs=(20, 12, 12), ranks=(4, 2, 4), bias=(1, 1, 1), seed=6)
        frozen = lambda ts: torch.nn.ParameterList(torch.nn.Parameter(t, requires_grad=False) for t in ts)
        self.ws, self.bs = frozen(ws), frozen(bs)
        self.As, self.Bs = torch.nn.ParameterList(As), torch.nn.ParameterList(Bs)
        self.p = p

    def forward(self, x, seed=None):
        ys = S.lora_siblings(x, list(self.ws), list(self.bs), list(self.As), list(self.Bs), SCALES, self.p,
                             self.training, seed)
        return ys[0] + ys[1].sum(-1, keepdim=True) * ys[2].mean(-1, keepdim=True)


def test_torch_export_keeps_the_op():
    mod = Siblings()
    x, seed = torch.randn(2, 5, 24), torch.tensor(11)
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq")
    ep = torch.export.export(mod, (x, seed), dynamic_shapes=({0: batch, 1: seq}, None), strict=False)
    assert sum(n.target is OP for n in ep.graph.nodes) == 1
    x2 = torch.randn(3, 7, 24)  # another batch and sequence length
    torch.testing.assert_close(ep.module()(x2, torch.tensor(4)), mod(x2, torch.tensor(4)), atol=1e-6, rtol=1e-6)


@pytest.mark.slow
def test_torch_compile_inductor_no_graph_breaks():
    mod = Siblings()
    x, seed = torch.randn(3, 6, 24, requires_grad=True), torch.tensor(8)
    for args in [(x, seed), (x,)]:  # seed passed in, or drawn inside the graph
        explain = torch._dynamo.explain(mod)(*args)
        assert explain.graph_break_count == 0 and explain.graph_count == 1
    torch._dynamo.reset()
    leaves = [x, *mod.As, *mod.Bs]
    out = torch.compile(mod, backend="inductor", fullgraph=True)(x, seed)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, leaves, grad)
    ref = mod(x, seed)
    want = torch.autograd.grad(ref, leaves, grad)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("p", [0.0, 0.2])
def test_fp32_adapters_on_a_bf16_base_compute_as_peft(p):
    """Each sibling as HF PEFT with fp32 adapters on bf16: the low-rank term in fp32 on x.float(), added
    after promotion, cast back to bf16; dA, dB in fp32, dx in bf16."""
    x, ws, bs, As, Bs = make((3, 7), dtype=torch.bfloat16, seed=12)
    As, Bs = [a.float() for a in As], [b.float() for b in Bs]
    seed = torch.tensor(17)
    mask = dropout_mask(seed, (21, 37), p) if p else None
    g = torch.Generator().manual_seed(13)
    grads = [torch.randn(3, 7, w.shape[0], generator=g).to(torch.bfloat16) for w in ws]
    fused, ref = ([t.clone().requires_grad_() for t in (x, *As, *Bs)] for _ in range(2))
    ys = S.lora_siblings(fused[0], ws, bs, fused[1:4], fused[4:], SCALES, p, train=True, seed=seed)
    ys_ref = S.lora_siblings_reference(ref[0], ws, bs, ref[1:4], ref[4:], SCALES, mask)
    for y, y_ref in zip(ys, ys_ref):
        assert y.dtype == y_ref.dtype == torch.bfloat16
        torch.testing.assert_close(y, y_ref, atol=1e-2, rtol=1e-2)
    torch.autograd.backward(ys, grads)
    torch.autograd.backward(ys_ref, grads)
    assert fused[0].grad.dtype == torch.bfloat16 and rel(fused[0].grad, ref[0].grad) < 1e-2
    for t, t_ref in zip(fused[1:], ref[1:]):
        assert t.grad.dtype == torch.float32 and rel(t.grad, t_ref.grad) < 1e-5


# ---------------------------------------------------------------- Triton (interpreter; CUDA)

INTERPRETER_CASES = [  # shape, d_in, outs, ranks, bias
    ((11,), 37, (53, 19, 29), (5, 3, 7), (1, 0, 1)),
    ((2, 11), 37, (53, 19, 29), (5, 3, 7), (0, 0, 0)),  # 3-D input, no bias
    ((9,), 40, (18, 23), (20, 3), (1, 1)),  # stacked rank above the 16-wide rank tile
]
DTYPES = [(torch.float32, torch.float32, 1e-5), (torch.bfloat16, torch.bfloat16, 2e-2),
          (torch.bfloat16, torch.float32, 1e-2)]  # fp32 adapters on a bf16 base, as HF PEFT


@pytest.mark.slow
def test_triton_kernels_under_interpreter():
    """Runs this file's interpreter cases in a fresh process: TRITON_INTERPRET precedes triton's import."""
    tail = run_interpreted(["-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "interpreted", str(Path(__file__))])
    assert_all_passed(tail, 2 * len(DTYPES) * len(INTERPRETER_CASES) + 1)


if INTERPRET:  # defined only where triton runs interpreted (the driver above), so never a skip elsewhere

    @pytest.mark.parametrize("shape, d_in, outs, ranks, bias", INTERPRETER_CASES)
    @pytest.mark.parametrize("p", [0.0, 0.3])
    @pytest.mark.parametrize("dtype, adapter, tol", DTYPES)
    def test_interpreted_kernels_match_reference(shape, d_in, outs, ranks, bias, p, dtype, adapter, tol):
        from peftc.kernels.lora_linear import triton_dropout_mask
        from peftc.kernels.lora_triton import ACCUM_CONFIGS, DOWN_CONFIGS, WGRAD_CONFIGS

        i = INTERPRETER_CASES.index((shape, d_in, outs, ranks, bias))  # a different tile size per case
        configs = (DOWN_CONFIGS[-2 * i - 1], ACCUM_CONFIGS[2 * i], WGRAD_CONFIGS[2 * i + 1])
        x, ws, bs, As, Bs = make(shape, d_in, outs, ranks, dtype=dtype, bias=bias, seed=1)
        As, Bs = [a.to(adapter) for a in As], [b.to(adapter) for b in Bs]
        seed, tokens, scales = torch.tensor(2024), x.numel() // d_in, SCALES[:len(outs)]
        mask = triton_dropout_mask(seed, tokens, d_in, p).double() if p else None
        g = torch.Generator().manual_seed(2)
        grads = [torch.randn(*shape, o, generator=g).to(dtype) for o in outs]
        ys, h = S.triton_forward(x, ws, bs, As, Bs, scales, p, seed, True, configs=configs[:2])
        dx, d_as, d_bs = S.triton_backward(grads, x, ws, As, Bs, h, scales, p, seed, True, True, configs=configs)
        ys_ref, dx_ref, da_ref, db_ref = reference(x, ws, bs, As, Bs, scales, mask, grads)
        x2 = x.reshape(-1, d_in).double()
        h_ref = (x2 if mask is None else x2 * mask) @ torch.cat(As).double().t()
        assert h.shape == (tokens, sum(ranks)) and dx.shape == x.shape and dx.dtype == dtype
        assert all(y.dtype == dtype for y in ys) and all(t.dtype == adapter for t in (h, *d_as, *d_bs))
        pairs = [*zip(ys, ys_ref), (h, h_ref), (dx, dx_ref), *zip(d_as, da_ref), *zip(d_bs, db_ref)]
        for got, want in pairs:
            assert got.shape == want.shape and rel(got, want) < tol

    def test_interpreted_backward_skips_dx():
        x, ws, bs, As, Bs = make((7,), 20, (12, 5), (3, 2), bias=(1, 1), seed=3)
        seed = torch.tensor(1)
        _, h = S.triton_forward(x, ws, bs, As, Bs, [1.0, 2.0], 0.2, seed, True)
        grads = [torch.ones(7, 12), torch.ones(7, 5)]
        dx, d_as, d_bs = S.triton_backward(grads, x, ws, As, Bs, h, [1.0, 2.0], 0.2, seed, True, False)
        assert dx.numel() == 0 and [a.shape for a in d_as] == [a.shape for a in As]
        assert [b.shape for b in d_bs] == [b.shape for b in Bs]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("p", [0.0, 0.1])
def test_cuda_op_runs_triton_and_matches_reference(dtype, tol, p):
    from peftc.kernels.lora_linear import triton_dropout_mask

    x, ws, bs, As, Bs = make((3, 67), 200, (130, 64, 64), (16, 16, 8), dtype=dtype, seed=4, device="cuda")
    seed, tokens = torch.tensor(77, device="cuda"), 3 * 67
    mask = triton_dropout_mask(seed, tokens, 200, p, device="cuda").double() if p else None
    grads = [torch.randn(3, 67, w.shape[0], device="cuda", dtype=dtype) for w in ws]
    xl, al = x.clone().requires_grad_(), [a.clone().requires_grad_() for a in As]
    ys = S.lora_siblings(xl, ws, bs, al, Bs, SCALES, p, train=True, seed=seed)
    torch.autograd.backward(ys, grads)
    ys_ref, dx_ref, da_ref, _ = reference(x, ws, bs, As, Bs, SCALES, mask, grads)
    for got, want in [*zip(ys, ys_ref), (xl.grad, dx_ref), *zip([a.grad for a in al], da_ref)]:
        assert rel(got, want) < tol
