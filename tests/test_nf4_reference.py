"""peftc's NF4 and int8 weights against a float64 reference written here from the QLoRA paper,
independent of peftc's code (its table, its quantizer, its dequantizer): the stored 4-bit codes are
the nearest codes, the dequantized weight is the reference's, a quantized model's logits are those
of the model holding the reference's weights, and torchao's NF4 is the same format.

The format (kernels/quant_linear.py's docstring): W (out, in) in blocks of 64 consecutive weights
along a row, w ~ absmax(block) * NF4[i]; double quantization stores absmax - mean(absmax) as int8 in
groups of 256 blocks with one step groupmax / 128 per group (the last group zero-padded), and picks
each code against the absmax the dequantizer will use (QLoRA and torchao pick it against the
unrounded absmax: ``against="unrounded"`` below). Two codes per byte, the first in the high nibble.
int8: per output row w ~ step * q, step = absmax(row) / 127, q in [-127, 127].
"""

import copy

import pytest
import torch

import peftc
from peftc.kernels import quant_linear as QL
from peftc.models import example_inputs, tiny_model
from peftc.passes.optimize import quantize as Q

# QLoRA's NormalFloat4 (Dettmers et al. 2023, appendix E; bitsandbytes' get_4bit_type("nf4"))
NF4 = torch.tensor([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
                    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
                    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                    0.7229568362236023, 1.0], dtype=torch.float64)
BLOCK, GROUP = 64, 256  # peftc's default block size; QLoRA's double-quantization group
TIE = 1e-5  # two codes this close (in units of absmax) are a tie: fp32 and float64 may pick either


def weights(kind: str, shape, seed=0) -> torch.Tensor:
    """Fresh fp32 weights, no zero: normal, or heavy-tailed with outlier rows (blocks of unequal absmax)."""
    g = torch.Generator().manual_seed(seed)
    if kind == "normal":
        w = torch.randn(*shape, generator=g) * 0.02
    else:
        chi2 = torch.randn(3, *shape, generator=g).square().sum(0)  # Student t, 3 dof: z / sqrt(chi2 / 3)
        w = torch.randn(*shape, generator=g) / (chi2 / 3).sqrt() * 0.02
        w[::7] *= 8
    assert (w != 0).all()
    return w


def _round_ties(scaled: torch.Tensor, theirs) -> tuple[torch.Tensor, torch.Tensor]:
    """round(scaled), but ``theirs`` where scaled is within 1e-4 of a half (fp32 may round either way):
    (the rounded values, where ``theirs`` was taken and differs)."""
    q = scaled.round()
    if theirs is None:
        return q, torch.zeros_like(q, dtype=torch.bool)
    theirs = theirs.double()
    tie = ((scaled - scaled.floor() - 0.5).abs() <= 1e-4) & ((theirs - scaled).abs() <= 0.5 + 1e-4)
    return torch.where(tie, theirs, q), tie & (theirs != q)


def nf4_reference(w: torch.Tensor, block=BLOCK, double_quant=True, against="stored", ties=None) -> dict:
    """Float64 NF4 of W (out, in): blockwise absmax, optional double quantization, nearest codes
    (against the absmax the dequantizer uses, or the unrounded one), and the dequantized weight.
    ``ties``: peftc's stored (int8 absmax, codes), taken only where the reference's own choice is a
    tie; ``out["resolved"]`` counts where that changed something."""
    w = w.double()
    absmax = w.reshape(-1, block).abs().amax(1)
    out = {"absmax": absmax, "resolved": 0}
    if double_quant:  # absmax - mean -> int8 per group of GROUP blocks, step = groupmax / 128
        mean = absmax.mean()
        n, groups = absmax.numel(), -(-absmax.numel() // GROUP)
        c = torch.zeros(groups * GROUP, dtype=torch.float64)
        c[:n] = absmax - mean
        c = c.view(groups, GROUP)
        step = c.abs().amax(1) / 128
        q, resolved = _round_ties((c / step[:, None]).flatten()[:n], None if ties is None else ties[0])
        q = q.clamp(-128, 127)
        used = q * step.repeat_interleave(GROUP)[:n] + mean
        out.update(qabsmax=q, step=step, mean=mean, resolved=int(resolved.sum()))
    else:
        used = absmax
    x = w.reshape(-1, block) / (used if against == "stored" else absmax)[:, None]
    codes = (x[..., None] - NF4).abs().argmin(-1)
    if ties is not None:  # peftc's code where it is as near as the reference's (within TIE)
        theirs = ties[1].reshape(codes.shape)
        tie = ((x - NF4[theirs]).abs() - (x - NF4[codes]).abs()).abs() <= TIE
        out["resolved"] += int((tie & (theirs != codes)).sum())
        codes = torch.where(tie, theirs, codes)
    out.update(used=used, x=x.reshape(w.shape), codes=codes.reshape(w.shape),
               deq=(NF4[codes] * used[:, None]).reshape(w.shape))
    return out


def int8_reference(w: torch.Tensor, ties=None) -> dict:
    """Float64 per-row absmax int8: step = absmax / 127, q = round(w / step); ``ties``: peftc's q,
    taken only where w / step is a tie."""
    w = w.double()
    step = w.abs().amax(1) / 127
    q, resolved = _round_ties(w / step[:, None], ties)
    q = q.clamp(-127, 127)
    return {"step": step, "q": q, "deq": q * step[:, None], "resolved": int(resolved.sum())}


def unpack_codes(data: torch.Tensor) -> torch.Tensor:
    """peftc's packed NF4 (out, in/2) uint8 -> the codes (out, in), first of each pair in the high nibble."""
    return torch.stack((data >> 4, data & 15), -1).reshape(data.shape[0], -1).long()


def reference_dequantize(data, qscale, qscale2, qoffset, fmt: str, block=BLOCK) -> torch.Tensor:
    """Float64 weight of peftc's stored tensors (``quantize_weight``'s tuple, a ``QuantizedWeight``'s buffers)."""
    if fmt == "int8":
        return data.double() * qscale.double()[:, None]
    if fmt == "int8g":  # one fp16 step per group of block along a row
        return (data.reshape(-1, block).double() * qscale.double()[:, None]).reshape(data.shape)
    if fmt == "int4":  # group g: block/2 bytes, byte j = code j (low nibble) | code j + block/2 (high)
        b = data.reshape(-1, block // 2).long()
        codes = torch.cat((b % 16, b // 16), 1).double()
        return (codes * qscale.double()[:, None] + qoffset.double()[:, None]).reshape(data.shape[0], -1)
    absmax = qscale.double()
    if qscale2.numel():
        absmax = absmax * qscale2.double().repeat_interleave(GROUP)[: absmax.numel()] + qoffset.double()
    codes = unpack_codes(data)
    return (NF4[codes].reshape(-1, block) * absmax[:, None]).reshape(codes.shape)


def reference_weight(w: torch.Tensor, fmt: str, stored, block=BLOCK) -> torch.Tensor:
    """The float64 reference's weight for W in peftc's format; ``stored``: peftc's (data, qscale,
    qscale2, qoffset), read only to settle ties. Ties are rare (at most 1 in 1000 weights)."""
    data, qscale, qscale2, _ = stored
    if fmt == "int8":
        ref = int8_reference(w, ties=data)
    else:
        ref = nf4_reference(w, block, qscale2.numel() > 0, ties=(qscale, unpack_codes(data)))
    assert ref["resolved"] <= 1e-3 * w.numel(), ref["resolved"]
    return ref["deq"]


def test_nf4_table_is_qloras_normal_quantiles():
    """The literal table is QLoRA's construction (8 positive and 7 negative N(0,1) quantiles, 0, scaled
    to [-1, 1]; bitsandbytes' create_normal_map), and peftc's table is this one."""
    norm = pytest.importorskip("scipy.stats", reason="scipy is not installed (a dev dependency)").norm
    offset = 0.9677083
    pos = norm.ppf(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1].numpy())
    neg = -norm.ppf(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1].numpy())
    v = torch.tensor(sorted([*pos, 0.0, *neg]), dtype=torch.float64)
    torch.testing.assert_close(v / v.max(), NF4, atol=2e-7, rtol=0)
    torch.testing.assert_close(torch.tensor(QL.NF4_CODE, dtype=torch.float64), NF4, atol=0, rtol=0)


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("kind", ["normal", "heavy"])
def test_nf4_codes_and_scales_are_the_nearest(kind, double_quant):
    """560 blocks: two full double-quantization groups and a padded one. Codes and int8 absmax equal
    the reference's; where the reference has a tie (fp32 may round either way) either choice passes."""
    w = weights(kind, (80, 448))
    data, qscale, qscale2, qoffset = QL.quantize_weight(w, "nf4", BLOCK, double_quant)
    assert data.dtype == torch.uint8 and data.shape == (80, 224)
    codes = unpack_codes(data)
    ref = nf4_reference(w, double_quant=double_quant, ties=(qscale, codes))
    assert ref["resolved"] <= 1e-3 * w.numel()
    if double_quant:
        assert qscale.dtype == torch.int8 and qscale2.shape == (3,) and qoffset.shape == ()
        assert torch.equal(qscale.double(), ref["qabsmax"])
        torch.testing.assert_close(qscale2.double(), ref["step"], atol=0, rtol=1e-5)
        torch.testing.assert_close(qoffset.double(), ref["mean"], atol=0, rtol=1e-5)
    else:
        assert qscale.dtype == torch.float32 and qscale2.numel() == qoffset.numel() == 0
        torch.testing.assert_close(qscale.double(), ref["absmax"], atol=0, rtol=0)
    assert torch.equal(codes, ref["codes"])
    if double_quant:  # the choice is against the stored absmax: the unrounded one picks otherwise somewhere
        assert not torch.equal(codes, nf4_reference(w, against="unrounded")["codes"])


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("kind", ["normal", "heavy"])
def test_nf4_dequantized_weight_is_the_references(kind, double_quant):
    w = weights(kind, (80, 448), seed=1)
    q = QL.quantize_weight(w, "nf4", BLOCK, double_quant)
    ours = QL.dequantize(*q, "nf4", BLOCK).double()
    # peftc's dequantizer on its stored tensors: the reference's reading of them, to fp32 rounding
    torch.testing.assert_close(ours, reference_dequantize(*q, "nf4"), atol=1e-9, rtol=1e-6)
    # end to end: the float64 quantizer's weight
    torch.testing.assert_close(ours, reference_weight(w, "nf4", q), atol=1e-9, rtol=1e-5)
    assert (ours - w.double()).abs().max() > 0  # it did quantize


def test_int8_is_the_float64_reference():
    w = weights("heavy", (96, 320), seed=2)
    data, step, qscale2, qoffset = QL.quantize_weight(w, "int8")
    assert data.dtype == torch.int8 and data.shape == w.shape and qscale2.numel() == qoffset.numel() == 0
    ref = int8_reference(w, ties=data)
    assert ref["resolved"] <= 1e-3 * w.numel()
    assert torch.equal(data.double(), ref["q"])
    torch.testing.assert_close(step.double(), ref["step"], atol=0, rtol=1e-6)
    ours = QL.dequantize(data, step, qscale2, qoffset, "int8", 0).double()
    torch.testing.assert_close(ours, ref["deq"], atol=1e-9, rtol=1e-6)
    torch.testing.assert_close(ours, reference_dequantize(data, step, qscale2, qoffset, "int8"), atol=1e-9, rtol=1e-6)


@pytest.mark.parametrize("name, fmt", [("tiny-llama", "nf4"), ("tiny-gpt2", "nf4"), ("tiny-llama", "int8")])
def test_quantized_model_is_the_model_with_reference_weights(name, fmt):
    """Logits of a compiled model on a quantized base (fused LoRA at init: B = 0) equal the eager
    model whose quantized weights are replaced by the float64 reference's, at an uncaptured shape."""
    model = tiny_model(name)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # fresh non-zero weights, not the checkpoint's
        for m in model.modules():
            if type(m).__name__ in ("Linear", "Conv1D"):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * 0.05)
    base = copy.deepcopy(model)
    cm = peftc.compile(model, {"methods": [{"lora": {"targets": "all-linear", "r": 4}}]}, example_inputs(name),
                       optimize={"fuse": {}, "quantize": {"format": fmt}})
    assert all(not v.any() for k, v in cm.adapter_state_dict().items() if "lora_B" in k)
    stored = {p: m for p, m in cm.adapters.get_submodule(Q.ROOT).named_modules() if isinstance(m, Q.QuantizedWeight)}
    assert len(stored) == cm.pass_counts["quantize"] > 0
    ref = copy.deepcopy(base)
    for path, qw in stored.items():
        mod = ref.get_submodule(path)
        conv1d = type(mod).__name__ == "Conv1D"  # GPT-2 stores W^T (in, out)
        deq = reference_weight(mod.weight.t() if conv1d else mod.weight, fmt, qw.tensors(), qw.block_size).float()
        mod.weight.data = deq.t().contiguous() if conv1d else deq
    ids = torch.randint(0, 128, (3, 11), generator=g)
    cm.eval()
    with torch.no_grad():
        ours, want, plain = cm(input_ids=ids).logits, ref.eval()(input_ids=ids).logits, base.eval()(input_ids=ids).logits
    torch.testing.assert_close(ours, want, atol=1e-5, rtol=1e-5)
    assert (want - plain).abs().max() > 1e-3  # the quantization shows in the logits


@pytest.mark.parametrize("kind", ["normal", "heavy"])
def test_torchao_nf4_is_the_reference_format(kind):
    """torchao's ``to_nf4`` (double quantization, codes against the unrounded absmax) dequantizes to
    the reference's weight; torchao's table is QLoRA's rounded to 4 decimals (<= 5e-5 apart), so
    codes within 1e-4 of a boundary may go either way."""
    ao = pytest.importorskip("torchao.quantization", reason="torchao is not installed (a dev dependency: "
                                                            "the NF4 accuracy reference)")
    w = weights(kind, (128, 256), seed=4)  # 512 blocks: torchao wants whole groups of 256
    theirs = ao.to_nf4(w, BLOCK, GROUP).get_original_weight().double()
    ref = nf4_reference(w, against="unrounded")
    d = (ref["x"][..., None] - NF4).abs().sort(-1).values
    clear = (d[..., 1] - d[..., 0]) > 1e-4  # the nearest code is unambiguous under either table
    assert clear.double().mean() > 0.99
    err = (theirs - ref["deq"]).abs()
    bound = 6e-5 * ref["used"].repeat_interleave(BLOCK).view(w.shape) + 1e-7
    assert (err <= bound)[clear].all(), err[clear].max()
