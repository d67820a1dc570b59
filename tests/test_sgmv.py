"""Segmented multi-adapter LoRA: the peftc::lora_sgmv op against a sample-by-sample reference, and
mixed batches (adapter_names) through it against each sample run alone under its adapter."""

from pathlib import Path

import pytest
import torch
from interpreted import assert_all_passed, run_interpreted

import peftc
from peftc.graph import SUMMARY_LINES
from peftc.kernels.lora_sgmv import keep_mask, lora_sgmv, lora_sgmv_reference
from peftc.models import example_inputs, tiny_model

OP = torch.ops.peftc.lora_sgmv.default


def make(lead=(5, 3), d_in=12, d_out=10, ranks=(2, 4), dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g).to(dtype).requires_grad_()
    return (rnd(*lead, d_out), rnd(*lead, d_in), [rnd(r, d_in) for r in ranks], [rnd(d_out, r) for r in ranks])


# ---------------------------------------------------------------- the op


@pytest.mark.parametrize("lead, index", [
    ((5, 3), [3, 7, 3, -1, 7]),  # unsorted, a base sample: gathered segments
    ((5, 3), [3, 3, 7, 7, -1]),  # sorted: views
    ((15,), [7, -1, 3, 3, 7]),  # Conv1D's flattened (B*T, in) rows
    ((4, 1), [7, 3, -1, 7]),  # a decode step, T = 1
    ((1, 6), [3]),  # a batch of one
    ((3, 2), [-1, -1, -1]),  # nobody adapted
])
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_op_equals_per_sample_reference(lead, index, dtype, tol):
    y, x, As, Bs = make(lead, dtype=dtype)
    index = torch.tensor(index)
    out = lora_sgmv(y, x, index, [3, 7], As, Bs, [2.0, 0.5])
    ref = lora_sgmv_reference(y, x, index, [3, 7], As, Bs, [2.0, 0.5])
    torch.testing.assert_close(out, ref, atol=tol, rtol=0)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=dtype)
    leaves = [y, x, *As, *Bs]
    grads = [torch.autograd.grad(o, leaves, grad, allow_unused=True) for o in (out, ref)]
    for leaf, got, want in zip(leaves, *grads):  # an unused slot: zero from the op, None from the reference
        torch.testing.assert_close(got, torch.zeros_like(leaf) if want is None else want, atol=tol, rtol=0)


def test_dropout_mask_per_slot_regenerated_in_backward():
    y, x, As, Bs = make((6, 4))
    index, seed, p = torch.tensor([0, 1, 0, 1, 1, 0]), torch.tensor(123), [0.3, 0.0]
    out = lora_sgmv(y, x, index, [0, 1], As, Bs, [1.5, 2.0], p, train=True, seed=seed)
    mask0 = torch.ones(6, 4, 12, dtype=torch.float64)
    mask0[[0, 2, 5]] = keep_mask(seed, 0, (12, 12), 0.3, torch.float64).view(3, 4, 12)  # slot 0's gathered rows
    ref = lora_sgmv_reference(y, x, index, [0, 1], As, Bs, [1.5, 2.0], [mask0, None])
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=0)
    grad = torch.randn_like(out)
    for got, want in zip(torch.autograd.grad(out, [x, *As, *Bs], grad), torch.autograd.grad(ref, [x, *As, *Bs], grad)):
        torch.testing.assert_close(got, want, atol=1e-12, rtol=0)
    assert abs((keep_mask(seed, 0, (200, 50), 0.3) == 0).float().mean().item() - 0.3) < 0.03
    evaluated = lora_sgmv(y, x, index, [0, 1], As, Bs, [1.5, 2.0], p, train=False, seed=seed)
    torch.testing.assert_close(evaluated, lora_sgmv_reference(y, x, index, [0, 1], As, Bs, [1.5, 2.0]))


def test_gradcheck_and_opcheck():
    y, x, As, Bs = make((4, 2), d_in=6, d_out=5, ranks=(1, 3))
    index, seed = torch.tensor([1, -1, 0, 1]), torch.tensor(9)
    fn = lambda y, x, a0, a1, b0, b1: lora_sgmv(y, x, index, [0, 1], [a0, a1], [b0, b1], [2.0, 0.5], [0.2, 0.4],
                                                train=True, seed=seed)
    assert torch.autograd.gradcheck(fn, (y, x, *As, *Bs))
    for train in (True, False):
        torch.library.opcheck(OP, (y, x, index, [0, 1], As, Bs, [2.0, 0.5], [0.2, 0.0], seed, train))


def test_export_and_compile_keep_the_op_opaque():
    class Mixed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            _, _, As, Bs = make((2, 3), dtype=torch.float32)
            self.a = torch.nn.ParameterList([torch.nn.Parameter(a.detach()) for a in As])
            self.b = torch.nn.ParameterList([torch.nn.Parameter(b.detach()) for b in Bs])

        def forward(self, y, x, index):
            return lora_sgmv(y, x, index, [0, 1], list(self.a), list(self.b), [2.0, 0.5])

    y, x, _, _ = make((3, 4), dtype=torch.float32, seed=2)
    y, x, index = y.detach(), x.detach(), torch.tensor([1, 0, -1])
    mod = Mixed()
    batch, seq = torch.export.Dim("batch", min=2), torch.export.Dim("seq")
    ep = torch.export.export(mod, (y, x, index), dynamic_shapes=({0: batch, 1: seq}, {0: batch, 1: seq}, {0: batch}))
    assert sum(n.target is OP for n in ep.graph.nodes) == 1
    y2, x2, _, _ = make((5, 2), dtype=torch.float32, seed=3)
    index2 = torch.tensor([0, 1, 1, -1, 0])
    torch.testing.assert_close(ep.module()(y2.detach(), x2.detach(), index2), mod(y2, x2, index2))
    compiled = torch.compile(mod, fullgraph=True, backend="aot_eager")
    out = compiled(y2, x2, index2)
    torch.testing.assert_close(out, mod(y2, x2, index2))
    got = torch.autograd.grad(out.sum(), list(mod.parameters()))
    want = torch.autograd.grad(mod(y2, x2, index2).sum(), list(mod.parameters()))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


def test_op_with_fp32_adapters_on_a_bf16_base_computes_as_peft():
    """HF PEFT's default dtypes: x.to(A.dtype) through the fp32 adapter, (y + term).to(bf16) for the
    adapted rows (the masked graph's and a sample alone's order); dA, dB fp32, dx and dy bf16."""
    y, x, As, Bs = make((5, 3), dtype=torch.float32)
    y, x = (t.detach().to(torch.bfloat16).requires_grad_() for t in (y, x))
    index = torch.tensor([3, 7, -1, 3, 7])
    out = lora_sgmv(y, x, index, [3, 7], As, Bs, [2.0, 0.5])
    assert out.dtype == torch.bfloat16
    with torch.no_grad():
        want = y.clone()
        for b, i in enumerate(index.tolist()):
            if i >= 0:
                k = [3, 7].index(i)
                s = [2.0, 0.5][k]
                want[b] = (y[b].float() + s * (x[b].float() @ As[k].t() @ Bs[k].t())).to(torch.bfloat16)
    torch.testing.assert_close(out, want, atol=0, rtol=0)
    torch.testing.assert_close(out, lora_sgmv_reference(y, x, index, [3, 7], As, Bs, [2.0, 0.5]), atol=0, rtol=0)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    leaves = [y, x, *As, *Bs]
    ref = lora_sgmv_reference(y, x, index, [3, 7], As, Bs, [2.0, 0.5])
    for leaf, got, want in zip(leaves, torch.autograd.grad(out, leaves, grad), torch.autograd.grad(ref, leaves, grad)):
        assert got.dtype == leaf.dtype
        torch.testing.assert_close(got, want, atol=1e-2 if leaf.dtype == torch.bfloat16 else 1e-5, rtol=1e-2)
    torch.library.opcheck(OP, (y, x, index, [3, 7], As, Bs, [2.0, 0.5], [0.2, 0.0], torch.tensor(3), True))
    with pytest.raises(ValueError, match="one float adapter dtype"):
        lora_sgmv(y, x, index, [3, 7], [As[0], As[1].double()], Bs, [2.0, 0.5])


def test_bad_inputs_are_errors():
    y, x, As, Bs = make()
    with pytest.raises(ValueError, match="one A, B"):
        lora_sgmv(y, x, torch.tensor([0] * 5), [0, 1], As[:1], Bs, [1.0, 1.0])
    with pytest.raises(ValueError, match="lora_A"):
        lora_sgmv(y, x, torch.tensor([0] * 5), [0, 1], As[::-1], Bs, [1.0, 1.0])
    with pytest.raises(ValueError, match="int64"):
        lora_sgmv(y, x, torch.zeros(5), [0, 1], As, Bs, [1.0, 1.0])


def test_interpreted_triton_kernels():
    path = Path(__file__).with_name("test_kernel_lora_sgmv_triton.py")
    tail = run_interpreted(["-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not gpu", str(path)])
    # every interpreter case ran: 4 shapes x 2 p, 2 bf16, 2 fp32 adapters on bf16, 2 single cases
    assert_all_passed(tail, 4 * 2 + 2 + 2 + 2)


# ---------------------------------------------------------------- mixed batches in a model

LLAMA = ["q_proj", "v_proj", "down_proj"]
ADAPTERS = {  # different ranks, scalings (alpha, rslora), dropout, targets
    "default": {"targets": LLAMA, "r": 2, "alpha": 4, "dropout": 0.0},
    "b": {"targets": LLAMA[:2], "r": 5, "alpha": 3, "dropout": 0.3},
    "c": {"targets": LLAMA[1:], "r": 3, "alpha": 8, "rslora": True, "dropout": 0.1},
}


def compiled(name="tiny-llama", adapters=ADAPTERS, seed=4, dtype=torch.float32):
    (first, spec), *rest = adapters.items()
    cm = peftc.compile(tiny_model(name).to(dtype), {"adapter": first, "methods": [{"lora": spec}]},
                       example_inputs(name))
    for n, s in rest:
        cm.add_adapter({"adapter": n, "methods": [{"lora": s}]})
    cm.set_adapter(list(adapters))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # B non-zero (PEFT initialises it to zero)
        for p in cm.trainable_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return cm


def alone(cm, ex, names, i):
    one = {k: v[i:i + 1] for k, v in ex.items()}
    if names[i] == "__base__":
        cm.disable_adapters()
    else:
        cm.enable_adapters()
        cm.set_adapter(names[i])
    return cm(**one).logits


def sgmv_nodes(cm):
    return [n for (_, mixed), gm in cm.graphs.rewritten.items() if mixed for n in gm.graph.nodes if n.target is OP]


@pytest.mark.parametrize("name, batch, seq", [("tiny-llama", 5, 7), ("tiny-gpt2", 4, 5), ("tiny-llama", 1, 1)])
def test_mixed_batch_equals_each_sample_alone(name, batch, seq):
    adapters = ADAPTERS if name == "tiny-llama" else {
        "default": {"targets": ["c_attn", "c_fc"], "r": 2, "alpha": 4}, "b": {"targets": ["c_attn"], "r": 4}}
    cm = compiled(name, adapters).eval()
    ex = example_inputs(name, batch, seq, seed=8)
    names = (["b", "__base__", "default", "c", "b"] if name == "tiny-llama" else ["b", "default", "__base__", "b"])
    names = names[:batch]
    with torch.no_grad():
        mixed = cm(**ex, adapter_names=names).logits
        nodes = sgmv_nodes(cm)
        masked_left = [n for (_, m), gm in cm.graphs.rewritten.items() if m for n in gm.graph.nodes
                       if (n.meta.get("peftc") or {}).get("role") == "mask_rows"]
        assert nodes and not masked_left  # every linear with an adapter goes through the op
        for i in range(batch):
            torch.testing.assert_close(mixed[i:i + 1], alone(cm, ex, names, i), atol=1e-5, rtol=0)


def test_segmented_equals_masked_and_trains_like_samples_alone():
    cm = compiled(adapters={n: {**s, "dropout": 0.0} for n, s in ADAPTERS.items()}).train()  # exact gradients
    ex = example_inputs("tiny-llama", 6, 5, seed=3)
    names = ["c", "b", "__base__", "b", "default", "c"]
    weights = torch.randn(6, 5, 128, generator=torch.Generator().manual_seed(5))
    params = dict(cm.named_parameters())
    trainable = [k for k, p in params.items() if p.requires_grad]

    def grads(fn):  # over the parameters trainable now (set_adapter(n) trains n only)
        loss, now = fn(), [k for k in trainable if params[k].requires_grad]
        if not now:
            return loss.detach(), {}
        return loss.detach(), dict(zip(now, torch.autograd.grad(loss, [params[k] for k in now], allow_unused=True)))

    seg_loss, seg = grads(lambda: (cm(**ex, adapter_names=names).logits * weights).sum())
    assert len(sgmv_nodes(cm)) == 6  # q, v, down in 2 layers
    cm.graphs.segment_mixed = False
    cm.graphs.invalidate()
    masked_loss, masked = grads(lambda: (cm(**ex, adapter_names=names).logits * weights).sum())
    assert not sgmv_nodes(cm)
    torch.testing.assert_close(seg_loss, masked_loss, atol=1e-4, rtol=1e-6)
    per_sample = {k: torch.zeros_like(params[k]) for k in trainable}
    total = 0.0
    for i, n in enumerate(names):
        cm.enable_adapters()
        if n == "__base__":
            cm.disable_adapters()
        else:
            cm.set_adapter(n)
        one = {k: v[i:i + 1] for k, v in ex.items()}
        loss, g = grads(lambda one=one, w=weights[i:i + 1]: (cm(**one).logits * w).sum())
        total += loss
        for k, v in g.items():
            if v is not None:
                per_sample[k] += v
    torch.testing.assert_close(seg_loss, total, atol=1e-4, rtol=1e-6)
    for k in trainable:
        want = per_sample[k]
        for got in (seg.get(k), masked.get(k)):
            torch.testing.assert_close(torch.zeros_like(want) if got is None else got, want, atol=1e-5, rtol=1e-5)
    assert any(per_sample[k].abs().sum() > 0 for k in trainable if ".lora.b." in k)


def test_dropout_per_adapter_in_training():
    cm = compiled().train()
    ex = example_inputs("tiny-llama", 4, 6, seed=2)
    names = ["default", "b", "c", "default"]  # dropout 0, 0.3, 0.1
    with torch.no_grad():
        torch.manual_seed(0)
        first = cm(**ex, adapter_names=names).logits
        torch.manual_seed(0)
        again = cm(**ex, adapter_names=names).logits
        cm.eval()
        plain = cm(**ex, adapter_names=names).logits
    torch.testing.assert_close(first, again, atol=0, rtol=0)  # the seed is drawn from the global RNG
    torch.testing.assert_close(first[[0, 3]], plain[[0, 3]], atol=1e-5, rtol=0)  # p = 0: no dropout
    assert (first[1] - plain[1]).abs().max() > 1e-3 and (first[2] - plain[2]).abs().max() > 1e-3


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_dora_terms_stay_masked_next_to_segmented_lora(dtype, tol):
    """The summary names what stayed masked and why (at bf16 with fp32 adapters too, where the casts
    around each term once kept every term masked under a wrong reason)."""
    adapters = {"default": {"targets": ["q_proj", "v_proj"], "r": 2}, "d": {"targets": ["q_proj"], "r": 3, "dora": True}}
    cm = compiled("tiny-llama", adapters, dtype=dtype).eval()
    ex = example_inputs("tiny-llama", 3, 4, seed=6)
    names = ["d", "default", "__base__"]
    with torch.no_grad():
        mixed = cm(**ex, adapter_names=names).logits
        (gm,) = [gm for (_, m), gm in cm.graphs.rewritten.items() if m]
        assert [line for line in gm.meta[SUMMARY_LINES] if line.startswith("sgmv:")] == [
            "sgmv: 4 of 6 LoRA terms: 2 DoRA terms stay masked"]  # q and v of default, q of d, in 2 layers
        assert sum(n.target is OP for n in gm.graph.nodes) == 4
        for i in range(3):
            torch.testing.assert_close(mixed[i:i + 1], alone(cm, ex, names, i), atol=tol, rtol=0)


def _mixed_counts(cm):
    """The sgmv counts of the mixed-batch graph last built (the pipeline's ctx.counts are the example's)."""
    (gm,) = [gm for (_, m), gm in cm.graphs.rewritten.items() if m]
    return sum(n.target is OP for n in gm.graph.nodes), [line for line in gm.meta.get(SUMMARY_LINES, [])
                                                         if line.startswith("sgmv:")]


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_bf16_base_with_fp32_adapters_lowers_to_sgmv(name):
    """HF PEFT's default dtypes (autocast_adapter_dtype): every term reads x.to(fp32) and its sum is
    cast back; the lowering takes the casts with the term, and the logits equal the masked graph's
    and each sample's alone (bf16 tolerance; here bit-equal), the adapters' gradients the masked graph's."""
    adapters = ADAPTERS if name == "tiny-llama" else {
        "default": {"targets": ["c_attn", "c_fc"], "r": 2, "alpha": 4}, "b": {"targets": ["c_attn"], "r": 4}}
    cm = compiled(name, {n: {**s, "dropout": 0.0} for n, s in adapters.items()}, dtype=torch.bfloat16).eval()
    assert {p.dtype for p in cm.trainable_parameters()} == {torch.float32}
    ex = example_inputs(name, 4, 6, seed=8)
    names = ["b", "__base__", "default", "c"] if name == "tiny-llama" else ["b", "default", "__base__", "b"]
    with torch.no_grad():
        segmented = cm(**ex, adapter_names=names).logits
        ops, lines = _mixed_counts(cm)
        assert ops == (6 if name == "tiny-llama" else 4) and lines == []  # every term folded: nothing to say
        (gm,) = [gm for (_, m), gm in cm.graphs.rewritten.items() if m]
        left = [n for n in gm.graph.nodes if (n.meta.get("peftc") or {}).get("role") in ("mask_rows", "cast_in")]
        assert not left
        cm.graphs.segment_mixed = False
        cm.graphs.invalidate()
        masked = cm(**ex, adapter_names=names).logits
        assert not sgmv_nodes(cm)
        torch.testing.assert_close(segmented, masked, atol=1e-2, rtol=1e-2)
        cm.graphs.segment_mixed = True
        cm.graphs.invalidate()
        for i in range(len(names)):
            torch.testing.assert_close(segmented[i:i + 1], alone(cm, ex, names, i), atol=1e-2, rtol=1e-2)
    params = list(cm.trainable_parameters())  # gradients in eval: GPT-2's own dropout stays off

    def grads():
        loss = cm(**ex, adapter_names=names).logits.float().pow(2).mean()
        return torch.autograd.grad(loss, params, allow_unused=True)

    cm.set_adapter(list(adapters))
    seg, n_ops = grads(), len(sgmv_nodes(cm))
    cm.graphs.segment_mixed = False
    cm.graphs.invalidate()
    for got, want in zip(seg, grads()):
        assert (got is None) == (want is None)
        if got is not None:
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-3)
    assert n_ops > 0


def test_fuse_on_a_mixed_batch_counts_the_terms_left_masked():
    """fuse runs after the lowering: segmented terms are lora_sgmv's, not adapter sites; the DoRA
    terms left masked are, with their reason."""
    spec = {"methods": [{"lora": {"targets": ["q_proj", "v_proj"], "r": 2}}], "optimize": ["fuse"]}
    cm = peftc.compile(tiny_model("tiny-llama"), spec, example_inputs("tiny-llama")).eval()
    cm.add_adapter({"adapter": "d", "methods": [{"lora": {"targets": ["q_proj"], "r": 2, "dora": True}}]})
    with torch.no_grad():
        cm(**example_inputs("tiny-llama", 3, 4, seed=6), adapter_names=["d", "default", "__base__"])
    ops, lines = _mixed_counts(cm)
    (gm,) = [gm for (_, m), gm in cm.graphs.rewritten.items() if m]
    assert ops == 4 and lines == ["sgmv: 4 of 6 LoRA terms: 2 DoRA terms stay masked"]
    assert [line for line in gm.meta[SUMMARY_LINES] if line.startswith("fuse:")] == [
        "fuse: 0 of 2 adapter sites: 2 mixed-batch LoRA (masked per sample) has no fused op"]
