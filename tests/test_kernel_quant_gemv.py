"""kernels/quant_gemv.py (decode over packed weights, a C kernel) and the int4 format of
kernels/quant_formats.py: the kernel against a float64 product with the independently dequantized
weight (tests/test_nf4_reference.py) for every format, block size (the AVX-512 and the portable
loops) and row count; int4 is GGUF's Q4_1 bit for bit (gguf's own quantizer and dequantizer); the op
takes the kernel for a few rows and the dequantized temporary for more, with equal results; without
a compiler the op still runs and the summary says which path."""

import subprocess
import sys

import pytest
import torch
from test_nf4_reference import reference_dequantize

from peftc.kernels import quant_formats as F
from peftc.kernels import quant_gemv as G

OP = torch.ops.peftc.quant_linear.default


def _weight(shape, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(*shape, generator=g) * 0.03
    w[::5] *= 6  # rows of very different ranges
    return w


CASES = [("int4", 32, False), ("int4", 64, False), ("int4", 16, False), ("nf4", 64, True), ("nf4", 64, False),
         ("nf4", 16, True), ("int8", 0, False), ("int8g", 32, False), ("int8g", 16, False)]


@pytest.mark.parametrize("fmt, block, dq", CASES, ids=[f"{f}-{b}-{'dq' if d else 'plain'}" for f, b, d in CASES])
@pytest.mark.parametrize("n, k, m", [(96, 128, 1), (40, 192, 5), (17, 64, 16)])
@pytest.mark.parametrize("lora", [False, True], ids=["plain", "bias+lora"])
def test_packed_linear_matches_float64(fmt, block, dq, n, k, m, lora):
    g = torch.Generator().manual_seed(m)
    q = F.quantize_weight(_weight((n, k), n + k), fmt, block, dq)
    x = torch.randn(m, k, generator=g)
    b, a, bb = torch.randn(n, generator=g), torch.randn(3, k, generator=g) / 4, torch.randn(n, 3, generator=g)
    y, h = G.packed_linear(x, q, fmt, block, *((b, a, bb, 1.5) if lora else ()))
    assert y.shape == (m, n) and y.dtype == torch.float32
    ref = x.double() @ reference_dequantize(*q, fmt, block).T
    if lora:
        torch.testing.assert_close(h.double(), x.double() @ a.double().T, atol=1e-5, rtol=1e-6)
        ref = ref + b.double() + 1.5 * (x.double() @ a.double().T) @ bb.double().T
    else:
        assert h.numel() == 0
    assert ref.abs().max() > 0.1
    torch.testing.assert_close(y.double(), ref, atol=2e-6 * k ** 0.5, rtol=1e-6)


def test_packed_linear_declines_what_it_does_not_do():
    q = F.quantize_weight(_weight((8, 64), 0), "int4", 32)
    assert G.packed_linear(torch.randn(G.MAX_ROWS + 1, 64), q, "int4", 32) is None  # many rows: a GEMM
    assert G.packed_linear(torch.randn(0, 64), q, "int4", 32) is None
    with pytest.raises(ValueError, match="format 'fp8'"):
        G.packed_linear(torch.randn(2, 64), q, "fp8", 32)
    with pytest.raises(ValueError, match="int4 weight stores torch.uint8 codes and torch.float16 scales"):
        G.packed_linear(torch.randn(2, 64), (q[0], q[1].float(), q[2], q[3]), "int4", 32)


def test_int4_is_ggufs_q4_1_bit_for_bit():
    gguf = pytest.importorskip("gguf", reason="gguf is not installed (the real model's loader)")
    from gguf import quants

    t = gguf.GGMLQuantizationType.Q4_1
    w = _weight((48, 160), 3)
    raw = quants.quantize(w.numpy(), t)
    q = F.from_q4_1(torch.from_numpy(raw), w.shape)  # GGUF's codes, read as they are
    theirs = torch.from_numpy(quants.dequantize(raw, t)).double()
    assert torch.equal(reference_dequantize(*q, "int4", 32), theirs)
    assert torch.equal(F.dequantize(*q, "int4", 32, torch.float64), theirs)
    assert (F.to_q4_1(q).numpy().reshape(raw.shape) == raw).all()
    ours = F.quantize_weight(w, "int4", 32)  # peftc's own quantizer writes Q4_1 that gguf reads
    back = torch.from_numpy(quants.dequantize(F.to_q4_1(ours).numpy().reshape(raw.shape), t)).double()
    assert torch.equal(back, reference_dequantize(*ours, "int4", 32))
    err, err_gguf = (back - w.double()).abs().mean(), (theirs - w.double()).abs().mean()
    assert err <= err_gguf * 1.01  # codes against the stored fp16 d and m: no worse than llama.cpp's
    assert F.weight_bits(ours) == 5.0  # Q4_1: 4 bits + fp16 d and m per 32


def test_int4_rounds_to_the_nearest_level():
    w = _weight((24, 128), 4)
    q = F.quantize_weight(w, "int4", 32)
    step = q[1].float().repeat_interleave(32).view(w.shape)
    assert ((F.dequantize(*q, "int4", 32) - w).abs() <= step / 2 + 1e-4 * step).all()


@pytest.mark.parametrize("fmt", ["int4", "nf4", "int8", "int8g"])
@pytest.mark.parametrize("rows", [3, 40], ids=["kernel", "dequantized"])
def test_op_forward_and_gradients_either_path(fmt, rows):
    """quant_linear in eval (decode) and training without dropout: the packed kernel for a few rows,
    the dequantized temporary for many; both against the float64 dequantized reference."""
    g = torch.Generator().manual_seed(5)
    block = {"int4": 32, "nf4": 64, "int8": 0, "int8g": 32}[fmt]
    q = F.quantize_weight(_weight((48, 128), 6), fmt, block, True)
    x = torch.randn(rows, 128, generator=g, dtype=torch.float64)
    b, a, bb = (torch.randn(*s, generator=g, dtype=torch.float64) for s in ((48,), (4, 128), (48, 4)))
    leaves = [t.float().requires_grad_() for t in (x, b, a, bb)]
    y = OP(leaves[0], *q, leaves[1], leaves[2], leaves[3], 1.5, 0.0, None, True, fmt, block)[0]
    w = reference_dequantize(*q, fmt, block)
    ref_leaves = [t.clone().requires_grad_() for t in (x, b, a, bb)]
    xr, br, ar, bbr = ref_leaves
    y_ref = xr @ w.T + br + 1.5 * (xr @ ar.T) @ bbr.T
    torch.testing.assert_close(y.double(), y_ref, atol=1e-5, rtol=1e-5)
    grad = torch.randn(y.shape, generator=g, dtype=torch.float64)
    y.backward(grad.float())
    y_ref.backward(grad)
    for got, ref in zip(leaves, ref_leaves):
        torch.testing.assert_close(got.grad.double(), ref.grad, atol=1e-4, rtol=1e-5)


def test_bf16_base_with_fp32_adapters_through_the_kernel():
    """HF PEFT's mixed dtypes: y in the base dtype, h in the adapters'; the kernel computes in fp32."""
    g = torch.Generator().manual_seed(8)
    q = F.quantize_weight(_weight((32, 64), 7), "int4", 32)
    x = torch.randn(2, 64, generator=g).to(torch.bfloat16)
    b = torch.randn(32, generator=g).to(torch.bfloat16)
    a, bb = torch.randn(4, 64, generator=g) / 8, torch.randn(32, 4, generator=g)
    y, h = OP(x, *q, b, a, bb, 2.0, 0.0, None, False, "int4", 32)
    assert y.dtype == torch.bfloat16 and h.dtype == torch.float32
    w = F.dequantize(*q, "int4", 32, torch.float64)
    ref = x.double() @ w.T + b.double() + 2.0 * (x.double() @ a.double().T) @ bb.double().T
    torch.testing.assert_close(y.double(), ref, atol=3e-2, rtol=1e-2)
    torch.library.opcheck(OP, (x, *q, b, a, bb, 2.0, 0.0, None, False, "int4", 32))


_NO_COMPILER = """
import os, torch
os.environ["CC"] = "no-such-compiler-peftc"
from peftc.kernels import quant_formats as F, quant_gemv as G, quant_linear
q = F.quantize_weight(torch.randn(8, 64), "int4", 32)
x = torch.randn(2, 64)
print(G.status())
y = torch.ops.peftc.quant_linear(x, *q, None, None, None, 1.0, 0.0, None, False, "int4", 32)[0]
print(G.packed_linear(x, q, "int4", 32), float((y - x @ F.dequantize(*q, "int4", 32).T).abs().max()))
"""


def test_without_a_compiler_the_op_dequantizes_and_says_so(tmp_path):
    env = {"PEFTC_CACHE_DIR": str(tmp_path), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", _NO_COMPILER], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.strip().splitlines()
    assert lines[-2].startswith("dequantize per call (no C compiler (no-such-compiler-peftc")
    none, err = lines[-1].split()
    assert none == "None" and float(err) < 1e-5
    assert not list(tmp_path.glob("kernels/*.so"))


def test_the_library_is_cached_per_machine(tmp_path):
    code = "from peftc.kernels import quant_gemv as G; print(G.status())"
    env = {"PEFTC_CACHE_DIR": str(tmp_path), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    for _ in range(2):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
        assert out.stdout.strip().splitlines()[-1] == "packed C kernel (reads the codes)", out.stderr[-2000:]
    assert len(list(tmp_path.glob("kernels/quant_gemv-*.so"))) == 1
    assert not [p for p in tmp_path.glob("kernels/*") if p.is_dir()]  # no temporary left behind
