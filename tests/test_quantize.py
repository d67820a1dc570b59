"""optimize: {quantize: ...}: every method on a quantized base gives the logits and gradients of the
unoptimized graph on a model whose weights are the dequantized ones (fp32), fused or not, on Llama
(aten.linear) and GPT-2 (Conv1D addmm), at a shape other than the captured one; it trains; no
full-precision weight is saved for backward; merge refuses or requantizes; PEFT loads the adapter."""

import copy

import pytest
import torch
from test_nf4_reference import reference_dequantize

import peftc
from peftc.errors import PeftcError, SpecError
from peftc.graph import PEFTC
from peftc.models import example_inputs, tiny_model
from peftc.passes.optimize import quantize as Q
from peftc.passes.optimize import quantize_base as QB

METHODS = {
    "lora": {"lora": {"targets": "all-linear", "r": 4, "alpha": 8}},
    "dora": {"lora": {"targets": "all-linear", "r": 4, "dora": True}},
    "ia3": {"ia3": {"init": "random"}},
}
IA3_GPT2 = {"ia3": {"targets": ["c_attn", "mlp.c_proj"], "feedforward": ["mlp.c_proj"], "init": "random"}}


def _ids(seed=1, shape=(3, 11)):  # captured at (2, 8)
    return torch.randint(0, 128, shape, generator=torch.Generator().manual_seed(seed))


def _entry(name, method):
    return IA3_GPT2 if (name, method) == ("tiny-gpt2", "ia3") else METHODS[method]


def dequantized_model(model, cm):
    """A copy of ``model`` whose quantized weights are replaced by deq(Q(W)), Q(W) as peftc stored it and
    deq the float64 reference of tests/test_nf4_reference.py (not peftc's dequantizer)."""
    ref = copy.deepcopy(model)
    root = cm.adapters.get_submodule(Q.ROOT)
    for path, qw in root.named_modules():
        if isinstance(qw, Q.QuantizedWeight) and not path.endswith(".merged"):
            mod = ref.get_submodule(path)
            w = reference_dequantize(*qw.tensors(), qw.fmt, qw.block_size).to(mod.weight.dtype)
            mod.weight.data = w.t().contiguous() if type(mod).__name__ == "Conv1D" else w
    return ref


def pair(name, method, optimize=(), settings=None, dropout=0.0):
    """(quantized cm, reference cm on the dequantized weights, unoptimized but for ``optimize``), sharing
    perturbed adapter weights."""
    model = tiny_model(name)
    entry = copy.deepcopy(_entry(name, method))
    if dropout:
        entry["lora"]["dropout"] = dropout
    spec = {"methods": [entry]}
    base = copy.deepcopy(model)
    opt = {o: {} for o in optimize}
    cm = peftc.compile(model, spec, example_inputs(name), optimize={**opt, "quantize": settings or {}})
    ref = peftc.compile(dequantized_model(base, cm), spec, example_inputs(name), optimize=opt or None)
    g = torch.Generator().manual_seed(0)
    sd = {k: v + 0.1 * torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in ref.adapter_state_dict().items()}
    for c in (cm, ref):
        c.load_adapter_state_dict(sd)
    return cm, ref


def check_parity(cm, ref, train=False, shape=(3, 11)):
    ids = _ids(shape=shape)
    for c in (cm, ref):
        c.train(train)
        c.zero_grad()
        torch.manual_seed(7)  # the same dropout seeds in both graphs
        c.out = c(input_ids=ids, labels=ids)
        c.out.loss.backward()
    torch.testing.assert_close(cm.out.logits, ref.out.logits, atol=1e-5, rtol=1e-5)
    g_q = {k: p.grad for k, p in cm.named_parameters() if p.requires_grad}
    g_r = {k: p.grad for k, p in ref.named_parameters() if p.requires_grad}
    assert g_q.keys() == g_r.keys() and g_q
    for k in g_q:
        assert g_q[k].abs().sum() > 0, k
        torch.testing.assert_close(g_q[k], g_r[k], atol=1e-5, rtol=1e-4)


def _ops(cm):
    return [str(n.target) for n in cm.graph_module.graph.nodes
            if n.op == "call_function" and (n.meta.get(PEFTC) or {}).get("role", "").startswith("quant")]


@pytest.mark.parametrize("optimize", [(), ("fuse",)], ids=["unfused", "fused"])
@pytest.mark.parametrize("method", ["lora", "dora", "ia3"])
@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_quantized_matches_dequantized_reference(name, method, optimize):
    cm, ref = pair(name, method, optimize)
    n_linear = {"tiny-llama": 14, "tiny-gpt2": 8}[name]
    assert cm.pass_counts["quantize"] == n_linear  # every linear but the head
    ops = _ops(cm)
    weights = {f"{p}.weight" for p in Q.plan(cm.get_base_model(), Q.check_settings({}), cm.spec, cm.targets)}
    assert len(weights) == n_linear and ops
    assert not [n for n in cm.graph_module.graph.nodes if n.op == "get_attr" and n.target in weights]
    if optimize and method == "lora":
        assert "peftc.quant_linear.default" in ops
    if optimize and method == "dora":
        assert "peftc.quant_dora_linear.default" in ops
    check_parity(cm, ref)


@pytest.mark.parametrize("fmt", ["nf4", "int4", "int8"])
def test_fused_dropout_and_shared_siblings_match(fmt):
    """Training with dropout: the quantized op regenerates lora_linear's mask from the same seed; siblings
    split into one op per module keep one shared mask (the same seed node)."""
    cm, ref = pair("tiny-llama", "lora", ("fuse",), {"format": fmt}, dropout=0.2)
    check_parity(cm, ref, train=True)
    model = tiny_model("tiny-llama")
    spec = {"methods": [{"lora": {"targets": "all-linear", "r": 4, "dropout": 0.2}}],
            "optimize": {"fuse": {"shared_dropout": True}}}
    base = copy.deepcopy(model)
    q = peftc.compile(model, {**spec, "optimize": {**spec["optimize"], "quantize": {"format": fmt}}},
                      example_inputs("tiny-llama"))
    r = peftc.compile(dequantized_model(base, q), spec, example_inputs("tiny-llama"))
    assert r.pass_counts["fuse_siblings"] == 4
    sd = {k: v + 0.1 for k, v in r.adapter_state_dict().items()}
    q.load_adapter_state_dict(sd)
    r.load_adapter_state_dict(sd)
    check_parity(q, r, train=True)


@pytest.mark.parametrize("fmt", ["nf4", "int4", "int8", "int8g"])
@pytest.mark.parametrize("optimize", [(), ("fuse",)], ids=["unfused", "fused"])
def test_few_rows_read_the_packed_codes(fmt, optimize):
    """A batch of 1 x 5 tokens (decode-sized: the C kernel reads the codes) matches the dequantized
    reference in logits and gradients; the summary names the path and the format's bits."""
    cm, ref = pair("tiny-llama", "lora", optimize, {"format": fmt})
    check_parity(cm, ref, shape=(1, 5))
    summary = cm.graph_summary()
    assert "quantize (decode path): CPU linears of up to 16 rows: packed C kernel (reads the codes)" in summary
    if fmt == "int4":
        assert "quantize (int4, block 32): 14 weights" in summary and "5.000 bits/weight" in summary


@pytest.mark.parametrize("method", ["lora", "dora", "ia3"])
def test_every_method_trains_on_a_quantized_base(method):
    torch.manual_seed(0)
    model = tiny_model("tiny-llama")
    cm = peftc.compile(model, {"methods": [METHODS[method]]}, example_inputs("tiny-llama"),
                       optimize={"fuse": {}, "quantize": {}})
    opt = torch.optim.AdamW(cm.trainable_parameters(), lr=1e-1 if method == "ia3" else 1e-2)  # IA3 starts at 1
    ids = _ids(shape=(4, 16))
    losses = []
    for _ in range(6):
        loss = cm(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses


def test_no_full_precision_weight_is_saved_for_backward():
    """Saved-for-backward tensors: the plain graph keeps every (out, in) weight; the quantized one none."""
    shapes = {(64, 64), (32, 64), (128, 64), (64, 128)}
    ids = _ids(shape=(3, 5))

    def saved(cm):
        found = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: found.append(t) or t, lambda t: t):
            cm(input_ids=ids, labels=ids)
        head = cm.get_base_model().lm_head.weight.data_ptr()  # skipped: full precision, saved as in the plain graph
        return [t for t in found if t.is_floating_point() and tuple(t.shape) in shapes and t.data_ptr() != head]

    spec = {"methods": [METHODS["lora"]]}
    for optimize in ([], ["fuse"]):
        assert saved(peftc.compile(tiny_model("tiny-llama"), spec, example_inputs("tiny-llama"), optimize=optimize))
        cm = peftc.compile(tiny_model("tiny-llama"), spec, example_inputs("tiny-llama"),
                           optimize=[*optimize, "quantize"])
        assert saved(cm) == []


def test_graph_drops_weights_and_the_default_frees_them_release_base_false_keeps_them():
    model = tiny_model("tiny-llama")
    ids = _ids()
    kept_model = copy.deepcopy(model)
    keep = peftc.compile(kept_model, {"methods": [METHODS["lora"]]}, example_inputs("tiny-llama"),
                         optimize={"quantize": {"release_base": False}})
    cm = peftc.compile(model, {"methods": [METHODS["lora"]]}, example_inputs("tiny-llama"),
                       optimize={"quantize": {}})
    assert kept_model.model.layers[0].self_attn.q_proj.weight.untyped_storage().nbytes() == 64 * 64 * 4
    cm.load_adapter_state_dict({k: v + 0.1 for k, v in keep.adapter_state_dict().items()})
    keep.load_adapter_state_dict({k: v + 0.1 for k, v in keep.adapter_state_dict().items()})
    q_proj = model.model.layers[0].self_attn.q_proj.weight
    assert q_proj.shape == (64, 64) and q_proj.untyped_storage().nbytes() == 4  # one element left
    assert model.lm_head.weight.untyped_storage().nbytes() == 128 * 64 * 4  # skipped: untouched
    b_keep, b_rel = QB.weight_bytes(keep), QB.weight_bytes(cm)
    assert b_rel["quantized"] == b_keep["quantized"] and b_rel["graph_full_precision"] == b_keep["graph_full_precision"]
    assert b_rel["base_model"] < b_keep["base_model"] - 14 * 64 * 64 * 4 * 0.9
    assert b_keep["quantized"] * 7 < 8 * sum(m.weight.numel() for n, m in model.named_modules()
                                             if n in Q.plan(model, Q.check_settings({}), cm.spec, cm.targets))
    # a new call signature (labels) is captured after the release: shapes survive, the values come from Q(W)
    torch.testing.assert_close(cm(input_ids=ids, labels=ids).logits, keep(input_ids=ids, labels=ids).logits)
    cm.disable_adapters()
    keep.disable_adapters()
    torch.testing.assert_close(cm(input_ids=ids).logits, keep(input_ids=ids).logits)
    assert "base parameters released" in cm.graph_summary()
    with pytest.raises(SpecError, match="released parameters .*release_base: false"):  # never a capture of zeros
        peftc.compile(model, {"methods": [METHODS["lora"]]}, example_inputs("tiny-llama"))


def test_adapters_disabled_run_the_quantized_base():
    model = tiny_model("tiny-llama")
    base = copy.deepcopy(model)
    cm = peftc.compile(model, {"methods": [METHODS["lora"]]}, example_inputs("tiny-llama"), optimize=["quantize"])
    cm.disable_adapters()
    ids = _ids()
    assert cm.pass_counts["quantize"] == 14
    torch.testing.assert_close(cm(input_ids=ids).logits, dequantized_model(base, cm)(input_ids=ids).logits,
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_merge_refuses_or_requantizes(name):
    cm, _ = pair(name, "lora", ("fuse",))
    cm.eval()  # GPT-2's own dropout
    ids = _ids()
    before = cm(input_ids=ids).logits.detach()
    with pytest.raises(PeftcError, match=r"requantize=True"):
        cm.merge()
    errors = QB.merge_quantized(cm, True)
    cm.merge(requantize=True)
    assert set(errors) == set(cm.targets[0]) and all(0 < e < 0.5 for e in errors.values())
    summary = cm.graph_summary()
    assert "max abs rounding error" in summary
    assert not any((n.meta.get(PEFTC) or {}).get("method") in ("lora", "fuse") for n in cm.graph_module.graph.nodes)
    merged = cm(input_ids=ids).logits
    ref = copy.deepcopy(cm.get_base_model()).eval()  # the requantized merged weights, dequantized, in the eager model
    for path, qw in cm.adapters.get_submodule(Q.ROOT).named_modules():
        if path.endswith(".merged"):
            mod = ref.get_submodule(path[: -len(".merged")])
            w = qw.dequantize()
            mod.weight.data = w.t().contiguous() if name == "tiny-gpt2" else w
    torch.testing.assert_close(merged, ref(input_ids=ids).logits, atol=1e-5, rtol=1e-5)
    assert (merged - before).abs().max() < 0.5  # rounding, not a different model
    cm.unmerge()
    torch.testing.assert_close(cm(input_ids=ids).logits, before)


def test_peft_loads_an_adapter_trained_on_a_quantized_base(tmp_path):
    import peft  # a dev dependency: the reference must be there
    model = tiny_model("tiny-llama")
    base = copy.deepcopy(model)
    cm = peftc.compile(model, {"methods": [METHODS["lora"]]}, example_inputs("tiny-llama"),
                       optimize={"fuse": {}, "quantize": {}})
    opt = torch.optim.AdamW(cm.trainable_parameters(), lr=1e-2)
    ids = _ids()
    for _ in range(3):
        opt.zero_grad()
        cm(input_ids=ids, labels=ids).loss.backward()
        opt.step()
    cm.save_adapter(tmp_path / "a")
    pm = peft.PeftModel.from_pretrained(dequantized_model(base, cm), tmp_path / "a").eval()
    cm.eval()
    torch.testing.assert_close(pm(input_ids=ids).logits, cm(input_ids=ids).logits, atol=1e-5, rtol=1e-5)


def test_bitfit_bias_trains_through_the_quantized_op():
    model = tiny_model("tiny-gpt2")
    base = copy.deepcopy(model)
    spec = {"methods": [{"bitfit": {"targets": ["c_attn", "c_fc"]}}]}
    cm = peftc.compile(model, spec, example_inputs("tiny-gpt2"), optimize=["quantize"])
    ref = peftc.compile(dequantized_model(base, cm), spec, example_inputs("tiny-gpt2"))
    check_parity(cm, ref)


def test_tied_head_stays_full_precision_and_is_reported():
    cm = peftc.compile(tiny_model("tiny-gpt2"), {"methods": [METHODS["lora"]]}, example_inputs("tiny-gpt2"),
                       optimize={"quantize": {"skip": []}})
    assert cm.pass_counts["quantize_kept"] == 1
    assert "kept full precision lm_head: also read by aten.embedding.default" in cm.graph_summary()


@pytest.mark.parametrize("fmt", ["int4", "int8"])
def test_shared_weights_quantize_a_tied_head_for_its_linear_reads(fmt):
    """shared_weights: quantize: GPT-2's head (tied to the embedding) is read quantized by the head's
    matmul while the embedding still reads the full-precision weight: logits and gradients equal a
    model whose head alone has the dequantized weight; the summary says both are held."""
    model = tiny_model("tiny-gpt2")
    ref_model = copy.deepcopy(model)
    cm = peftc.compile(model, {"methods": [METHODS["lora"]]}, example_inputs("tiny-gpt2"),
                       optimize={"quantize": {"format": fmt, "skip": [], "shared_weights": "quantize",
                                              "release_base": True}})
    assert cm.pass_counts["quantize"] == 9 and cm.pass_counts["quantize_kept"] == 0
    root = cm.adapters.get_submodule(Q.ROOT)
    ref = dequantized_model(ref_model, cm)  # wrote deq(head) into the tied pair: untie, embedding as it was
    head = root.get_submodule("lm_head")
    ref.lm_head.weight = torch.nn.Parameter(reference_dequantize(*head.tensors(), fmt, head.block_size).float())
    ref.transformer.wte.weight = torch.nn.Parameter(ref_model.transformer.wte.weight.detach().clone())
    assert ref.lm_head.weight is not ref.transformer.wte.weight  # untied in the reference only
    ref = peftc.compile(ref, {"methods": [METHODS["lora"]]}, example_inputs("tiny-gpt2"))
    g = torch.Generator().manual_seed(0)
    sd = {k: v + 0.1 * torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in ref.adapter_state_dict().items()}
    for c in (cm, ref):
        c.load_adapter_state_dict(sd)
    check_parity(cm, ref)
    assert torch.equal(cm.get_base_model().transformer.wte.weight, ref_model.transformer.wte.weight)  # not released
    assert "quantize (shared weight) lm_head: its linear reads are quantized; aten.embedding.default still reads" in cm.graph_summary()


@pytest.mark.parametrize("settings, field", [
    ({"format": "fp8"}, "optimize.quantize.format"),
    ({"block_size": 63}, "optimize.quantize.block_size"),
    ({"block_size": "64"}, "optimize.quantize.block_size"),
    ({"format": "int8", "block_size": 32}, "optimize.quantize.block_size"),
    ({"format": "int4", "double_quant": True}, "optimize.quantize.double_quant"),
    ({"format": "int4", "block_size": 7}, "optimize.quantize.block_size"),
    ({"shared_weights": "yes"}, "optimize.quantize.shared_weights"),
    ({"bits": 4}, "optimize.quantize.bits"),
    ({"skip": "re:("}, "optimize.quantize.skip"),
])
def test_bad_settings_fail_when_the_spec_is_built(settings, field):
    with pytest.raises(SpecError) as e:
        peftc.Spec.from_dict({"methods": [METHODS["lora"]], "optimize": {"quantize": settings}})
    assert e.value.field == field


def _no_capture(monkeypatch):
    def fail(*a, **k):
        raise AssertionError("captured before the spec error")
    monkeypatch.setattr(peftc.compiled, "capture", fail)


@pytest.mark.parametrize("spec, field, words", [
    ({"optimize": {"quantize": {"block_size": 48}}}, "optimize.quantize.block_size", "has input width 64"),
    ({"optimize": {"quantize": {"skip": ["no_such_module"]}}}, "optimize.quantize.skip", "matches no module"),
    ({"methods": [METHODS["lora"], {"train": {"targets": ["model.layers.0.mlp.up_proj"]}}],
      "optimize": {"quantize": {"skip": ["lm_head"]}}}, "optimize.quantize.skip", "trains"),
])
def test_bad_input_against_the_model_fails_before_capture(monkeypatch, spec, field, words):
    _no_capture(monkeypatch)
    with pytest.raises(SpecError, match=words) as e:
        peftc.compile(tiny_model("tiny-llama"), {"methods": [METHODS["lora"]], **spec}, example_inputs("tiny-llama"))
    assert e.value.field == field


def test_a_module_trained_whole_is_left_out_by_default():
    cm = peftc.compile(tiny_model("tiny-llama"), {"methods": [METHODS["lora"], {"train": {"targets": ["up_proj"]}}]},
                       example_inputs("tiny-llama"), optimize=["quantize"])
    assert cm.pass_counts["quantize"] == 12


@pytest.mark.parametrize("optimize", [(), ("fuse",)], ids=["unfused", "fused"])
def test_dora_with_dropout_on_int8_conv1d(optimize):
    """DoRA recomputes the base on the dropped input (a second quantized read of W); GPT-2's own dropout on."""
    cm, ref = pair("tiny-gpt2", "dora", optimize, {"format": "int8"}, dropout=0.1)
    check_parity(cm, ref, train=True)
