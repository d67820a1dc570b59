"""kernels/quant_linear.py on CPU: the NF4 / int4 / int8 formats (bits per weight, accuracy against torchao's
NF4 and a float64 QLoRA reference), the op's forward and gradients against the dequantized weight,
what autograd saves; Triton kernels under TRITON_INTERPRET=1 in a subprocess
(tests/test_kernel_quant_linear_triton.py)."""

from pathlib import Path

import pytest
import torch
from interpreted import assert_all_passed, run_interpreted

from peftc.kernels import quant_linear as QL
from peftc.kernels.lora_linear import dropout_mask, lora_linear_reference

OP = torch.ops.peftc.quant_linear.default


def weights(kind: str, shape=(256, 512), seed=0):
    g = torch.Generator().manual_seed(seed)
    if kind == "normal":
        return torch.randn(*shape, generator=g) * 0.02
    # heavy-tailed (Student t, 3 dof) with a few outlier rows: absmax blocks of very different sizes
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        w = torch.distributions.StudentT(3.0).sample(shape) * 0.02
    w[::37] *= 8
    return w


def qlora_float64(w: torch.Tensor, block=64, group=256) -> torch.Tensor:
    """QLoRA's NF4 with double quantization in float64 (nearest code against the unrounded absmax,
    absmax - mean as int8 per group of 256 with step groupmax/128): the dequantized weight."""
    w = w.double()
    code = torch.tensor(QL.NF4_CODE, dtype=torch.float64)
    absmax = w.reshape(-1, block).abs().amax(1)
    mean = absmax.mean()
    c = (absmax - mean).reshape(-1, group)
    step = c.abs().amax(1, keepdim=True) / 128
    absmax_dq = ((c / step).round().clamp(-128, 127) * step + mean).flatten()
    idx = (w.reshape(-1, block, 1) / absmax.reshape(-1, 1, 1) - code).abs().argmin(-1)
    return (code[idx] * absmax_dq[:, None]).reshape(w.shape)


def test_bits_per_weight():
    w = weights("normal", (1024, 4096))
    nf4 = QL.quantize_weight(w, "nf4", 64, True)
    assert QL.weight_bits(nf4) <= 4.13  # QLoRA: 4.127
    assert QL.weight_bits(QL.quantize_weight(w, "nf4", 64, False)) == pytest.approx(4.5)
    assert QL.weight_bits(QL.quantize_weight(w, "int8")) <= 8.1
    assert nf4[0].dtype == torch.uint8 and nf4[0].shape == (1024, 2048) and nf4[1].dtype == torch.int8


@pytest.mark.parametrize("kind", ["normal", "heavy"])
def test_nf4_at_least_as_accurate_as_qlora_float64(kind):
    w = weights(kind)
    ours = QL.dequantize(*QL.quantize_weight(w, "nf4", 64, True), "nf4", 64).double()
    ref = qlora_float64(w)
    err, err_ref = (ours - w.double()).abs(), (ref - w.double()).abs()
    assert err.mean() <= err_ref.mean() * (1 + 1e-6) and err.pow(2).mean() <= err_ref.pow(2).mean() * (1 + 1e-6)
    assert err.max() <= err_ref.max() * (1 + 1e-6)
    same = ((ours - ref).abs() <= 1e-6 * w.abs().max()).double().mean()
    assert same > 0.9  # the same format: codes differ only where the rounded absmax moves a boundary


@pytest.mark.parametrize("kind", ["normal", "heavy"])
def test_nf4_at_least_as_accurate_as_torchao(kind):
    ao = pytest.importorskip("torchao.quantization", reason="torchao is not installed (a dev dependency: the NF4 accuracy reference)")
    w = weights(kind)
    theirs = ao.to_nf4(w, 64, 256).get_original_weight().double()
    ours = QL.dequantize(*QL.quantize_weight(w, "nf4", 64, True), "nf4", 64).double()
    err, err_ao = (ours - w.double()).abs(), (theirs - w.double()).abs()
    assert err.mean() <= err_ao.mean() and err.pow(2).mean() <= err_ao.pow(2).mean()
    assert err.max() <= err_ao.max() * (1 + 1e-3)


def test_int8_and_nf4_without_double_quant_round_to_nearest():
    w = weights("heavy")
    q8 = QL.quantize_weight(w, "int8")
    step = w.abs().amax(1, keepdim=True) / 127
    assert ((QL.dequantize(*q8, "int8", 0) - w).abs() <= step / 2 + 1e-7).all()
    q4 = QL.quantize_weight(w, "nf4", 64, False)
    code = torch.tensor(QL.NF4_CODE)
    gap = (code[1:] - code[:-1]).max() / 2 * w.reshape(-1, 64).abs().amax(1, keepdim=True)
    assert ((QL.dequantize(*q4, "nf4", 64) - w).reshape(-1, 64).abs() <= gap + 1e-7).all()


@pytest.mark.parametrize("fmt", ["nf4", "int4", "int8", "int8g"])
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("lora", [True, False])
def test_op_matches_dequantized_reference(fmt, p, lora):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 7, 64, generator=g, requires_grad=True)
    q = QL.quantize_weight(torch.randn(40, 64, generator=g), fmt, 32, True)
    b = torch.randn(40, generator=g, requires_grad=True)
    a = (torch.randn(5, 64, generator=g) / 8).requires_grad_(lora)
    bb = torch.randn(40, 5, generator=g).requires_grad_(lora)
    seed = torch.tensor(99)
    args = (a, bb, 1.5, p, seed, True) if lora else (None, None, 1.0, 0.0, None, False)
    y = OP(x, *q, b, *args, fmt, 32)[0]
    w = QL.dequantize(*q, fmt, 32)
    leaves = [t.detach().clone().requires_grad_() for t in (x, b, a, bb)]
    mask = dropout_mask(seed, (21, 64), p) if lora and p else None
    y_ref = (lora_linear_reference(leaves[0], w, leaves[1], leaves[2], leaves[3], 1.5, mask) if lora
             else torch.nn.functional.linear(leaves[0], w, leaves[1]))
    grad = torch.randn(y.shape, generator=g)
    y.backward(grad)
    y_ref.backward(grad)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    for got, leaf in zip((x, b, a, bb) if lora else (x, b), leaves):
        torch.testing.assert_close(got.grad, leaf.grad, atol=1e-5, rtol=1e-5)


def test_gradcheck_float64():
    g = torch.Generator().manual_seed(2)
    q = QL.quantize_weight(torch.randn(6, 8, generator=g), "nf4", 4, True)
    x, b, a, bb = (torch.randn(*s, generator=g, dtype=torch.float64, requires_grad=True)
                   for s in ((2, 3, 8), (6,), (3, 8), (6, 3)))
    fn = lambda x, b, a, bb: OP(x, *q, b, a, bb, 1.5, 0.2, torch.tensor(5), True, "nf4", 4)[0]
    assert torch.autograd.gradcheck(fn, (x, b, a, bb), fast_mode=True)


def test_autograd_saves_the_quantized_weight_not_a_dequantized_copy():
    g = torch.Generator().manual_seed(3)
    q = QL.quantize_weight(torch.randn(48, 64, generator=g), "nf4", 64, True)
    x = torch.randn(5, 64, generator=g, requires_grad=True)
    a, bb = torch.randn(4, 64, generator=g, requires_grad=True), torch.randn(48, 4, generator=g, requires_grad=True)
    for lora in ((a, bb), (None, None)):
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t, s=saved: s.append(t) or t,
                                                      lambda t: t):
            OP(x, *q, None, *lora, 2.0, 0.0, None, False, "nf4", 64)[0].sum().backward()
        assert not [t for t in saved if t.is_floating_point() and t.numel() >= 48 * 64]
        assert any(t is q[0] for t in saved)  # the packed codes themselves, no copy


def test_export_and_fake_tensor_shapes():
    q = QL.quantize_weight(torch.randn(24, 32), "int8")

    class M(torch.nn.Module):
        def forward(self, x):
            return QL.quant_linear(x, q, None, fmt="int8", block_size=0)

    ep = torch.export.export(M(), (torch.randn(2, 5, 32),))
    assert ep.module()(torch.randn(2, 5, 32)).shape == (2, 5, 24)


@pytest.mark.slow
def test_triton_kernels_under_the_interpreter():
    path = Path(__file__).with_name("test_kernel_quant_linear_triton.py")
    tail = run_interpreted(["-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not gpu", str(path)])
    assert_all_passed(tail, 3 * 3 + 3)  # every format: 3 LoRA cases and the plain one


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_fp32_adapters_on_a_bf16_base(p):
    """A quantized bf16 base with fp32 adapters computes as lora_linear (HF PEFT's mixed dtypes) on the
    dequantized weight: y, dx in bf16, dA, dB in fp32; the fake impl agrees on h's dtype."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 7, 64, generator=g).to(torch.bfloat16).requires_grad_()
    q = QL.quantize_weight(torch.randn(40, 64, generator=g), "int8", 32, True)
    b = torch.randn(40, generator=g).to(torch.bfloat16)
    a = (torch.randn(5, 64, generator=g) / 8).requires_grad_()
    bb = torch.randn(40, 5, generator=g).requires_grad_()
    seed = torch.tensor(7)
    y, h = OP(x, *q, b, a, bb, 1.5, p, seed, True, "int8", 32)
    assert y.dtype == torch.bfloat16 and h.dtype == torch.float32
    w = QL.dequantize(*q, "int8", 32, torch.bfloat16)
    leaves = [t.detach().clone().requires_grad_() for t in (x, a, bb)]
    mask = dropout_mask(seed, (21, 64), p) if p else None
    y_ref = lora_linear_reference(leaves[0], w, b, leaves[1], leaves[2], 1.5, mask)
    grad = torch.randn(y.shape, generator=g).to(torch.bfloat16)
    y.backward(grad)
    y_ref.backward(grad)
    torch.testing.assert_close(y, y_ref, atol=1e-2, rtol=1e-2)
    for got, leaf in zip((x, a, bb), leaves):
        assert got.grad.dtype == leaf.dtype
        torch.testing.assert_close(got.grad, leaf.grad, atol=1e-2, rtol=1e-2)
    torch.library.opcheck(OP, (x.detach(), *q, b, a.detach(), bb.detach(), 1.5, p, seed, True, "int8", 32))
