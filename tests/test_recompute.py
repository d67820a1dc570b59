"""The recompute pass: every policy keeps outputs and gradients equal to the graph without it
(exact, dropout on and off, same seed), fused or not, across model families; what autograd saves
drops; the counts show it fired; gradient checkpointing is never dropped; bad settings fail early."""

import pytest
import torch

import peftc
import peftc.memory
from peftc.errors import SpecError
from peftc.models import example_inputs, tiny_model

LORA = {"targets": "all-linear", "r": 4, "alpha": 8, "init": "random"}
POLICIES = {"adapters": {"policy": "adapters"}, "blocks": {"policy": "blocks"},
            "budget": {"policy": "budget", "budget_mb": 1000.0}}


def _inputs(name, seed=5):
    return example_inputs(name, batch=3, seq=11, seed=seed)  # not the captured shape (2 x 8)


def _ref(name, dropout, fuse, method=None):
    """The graph without recompute, built fresh for each test (no mode or gradient carries over)."""
    spec = {"methods": [method or {"lora": {**LORA, "dropout": dropout}}]}
    ref = peftc.compile(tiny_model(name), spec, example_inputs(name), optimize={"fuse": {}} if fuse else {})
    with torch.no_grad():  # non-zero, distinct adapter weights (B starts at zero in PEFT)
        for p in ref.trainable_parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.1)
    return ref, spec


def _pair(name, policy, dropout, fuse, method=None):
    ref, spec = _ref(name, dropout, fuse, method)
    base_opt = {"fuse": {}} if fuse else {}
    rc = peftc.compile(tiny_model(name), spec, example_inputs(name), optimize={**base_opt, "recompute": POLICIES[policy]})
    rc.load_adapter_state_dict(ref.adapter_state_dict())
    return ref, rc


def _step(cm, inp, seed=0):
    """Loss = cross-entropy of the logits against fixed random targets (no second capture for labels)."""
    torch.manual_seed(seed)
    out = cm(**inp)
    logits = out.logits.float()
    target = torch.randint(0, logits.shape[-1], logits.shape[:-1], generator=torch.Generator().manual_seed(7))
    out.loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))
    out.loss.backward()
    grads = {k: p.grad.clone() for k, p in cm.named_parameters() if p.requires_grad}
    cm.zero_grad(set_to_none=True)
    return out, grads


def _saved_bytes(cm, inp):
    return peftc.memory_report(cm, **inp)


CASES = [("tiny-llama", pol, p, f) for pol in POLICIES for p in (0.0, 0.1) for f in (False, True)]
CASES += [(m, pol, 0.1, f) for m in ("tiny-gpt2", "tiny-bert") for pol in ("adapters", "blocks") for f in (False, True)]
CASES += [("tiny-gpt2", "budget", 0.1, False), ("tiny-bert", "budget", 0.0, True)]


@pytest.mark.parametrize("name,policy,dropout,fuse", CASES)
def test_recompute_is_exact_and_saves_less(name, policy, dropout, fuse):
    ref, rc = _pair(name, policy, dropout, fuse)
    assert rc.pass_counts[f"recompute_{policy}"] > 0
    if dropout and policy != "blocks" and not fuse:
        assert rc.pass_counts["recompute_dropout_bits"] == ref.pass_counts["lora"]
    inp = _inputs(name)
    out_ref, g_ref = _step(ref, inp)
    out_rc, g_rc = _step(rc, inp)
    torch.testing.assert_close(out_rc.logits, out_ref.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out_rc.loss, out_ref.loss, atol=1e-5, rtol=1e-5)
    assert g_rc.keys() == g_ref.keys() and len(g_ref) > 0
    for k in g_ref:
        assert g_ref[k].abs().sum() > 0, k
        torch.testing.assert_close(g_rc[k], g_ref[k], atol=1e-5, rtol=1e-5)
    report = _saved_bytes(rc, inp)
    assert report.after.total < report.before.total
    if policy == "blocks":
        assert report.after.by_category.get("recomputed", 0) > 0
    # training changes with the seed: the same seed gives the same loss, another seed another one
    if dropout:
        other, _ = _step(rc, inp, seed=1)
        assert not torch.equal(other.loss, out_rc.loss)


def test_adapters_policy_keeps_only_r_wide_beyond_the_base():
    """Unfused LoRA with dropout: what the adapters keep after the pass is the r-wide h and the
    mask bits, a small fraction of what they kept before."""
    _, rc = _pair("tiny-llama", "adapters", 0.1, False)
    report = _saved_bytes(rc, _inputs("tiny-llama"))
    before, after = report.before.by_category, report.after.by_category
    assert after["base"] == before["base"]
    assert after["adapter"] < 0.25 * before["adapter"]
    assert "dropout.default" in report.before.by_kind and "dropout.default" not in report.after.by_kind
    assert "recompute (adapters)" in rc.graph_summary()


def test_blocks_found_from_module_paths():
    from peftc.passes.optimize.recompute import find_blocks

    for name, prefix in (("tiny-llama", "model.layers"), ("tiny-gpt2", "transformer.h"),
                         ("tiny-bert", "bert.encoder.layer")):
        cm = peftc.compile(tiny_model(name), {"methods": [{"lora": LORA}]}, example_inputs(name))
        found, spans = find_blocks(cm.graph_module)
        assert found == prefix and sorted(spans) == [0, 1]


def test_train_eval_reaches_checkpointed_blocks():
    """Dropout inside a checkpointed block follows cm.train()/eval()."""
    ref, rc = _pair("tiny-gpt2", "blocks", 0.1, False)
    inp = _inputs("tiny-gpt2")
    rc.eval()
    ref.eval()
    with torch.no_grad():
        a, b = rc(**inp).logits, rc(**inp).logits
        torch.testing.assert_close(a, b)
        torch.testing.assert_close(a, ref(**inp).logits, atol=1e-5, rtol=1e-5)
    rc.train()
    ref.train()
    with torch.no_grad():
        assert not torch.equal(rc(**inp).logits, rc(**inp).logits)


def test_budget_reports_its_choice_and_refuses_too_small():
    _, rc = _pair("tiny-llama", "budget", 0.0, False)
    summary = rc.graph_summary()
    assert "recompute (budget 1000 MB): min-cut keeps" in summary
    assert rc.pass_counts["recompute_budget_kept"] > 0 and "recompute_budget_tier" in rc.pass_counts
    spec = {"methods": [{"lora": LORA}], "optimize": {"recompute": {"policy": "budget", "budget_mb": 1e-6}}}
    with pytest.raises(SpecError, match="budget_mb"):
        peftc.compile(tiny_model("tiny-llama"), spec, example_inputs("tiny-llama"))


def test_gradient_checkpointing_is_kept():
    model = tiny_model("tiny-llama")
    model.gradient_checkpointing_enable()
    spec = {"methods": [{"lora": LORA}]}
    cm = peftc.compile(model, spec, example_inputs("tiny-llama"))
    assert cm.pass_counts["recompute_blocks"] == 2 and cm.is_gradient_checkpointing
    assert "gradient_checkpointing_enable()" in cm.graph_summary()
    explicit = peftc.compile(model, {**spec, "optimize": {"recompute": {"policy": "adapters"}}},
                             example_inputs("tiny-llama"))
    assert explicit.pass_counts["recompute_adapters"] > 0 and "recompute_blocks" not in explicit.pass_counts
    assert "the spec's recompute" in explicit.graph_summary()


def test_compiled_model_gradient_checkpointing_switch():
    ref, cm = _pair("tiny-llama", "adapters", 0.1, False)
    cm.gradient_checkpointing_disable()
    assert cm.graph_module is not None  # rebuilt
    assert not any(k.startswith("recompute") for k in cm.pass_counts) and not cm.is_gradient_checkpointing
    cm.gradient_checkpointing_enable()
    assert cm.graph_module is not None
    assert cm.pass_counts["recompute_blocks"] == 2 and cm.is_gradient_checkpointing
    inp = _inputs("tiny-llama")
    (o1, g1), (o2, g2) = _step(ref, inp), _step(cm, inp)
    torch.testing.assert_close(o2.loss, o1.loss, atol=1e-5, rtol=1e-5)
    for k in g1:
        torch.testing.assert_close(g2[k], g1[k], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("optimize,field", [
    ({"recompute": {"policy": "everything"}}, "optimize.recompute.policy"),
    ({"recompute": {"policy": "budget"}}, "optimize.recompute.budget_mb"),
    ({"recompute": {"policy": "budget", "budget_mb": -1}}, "optimize.recompute.budget_mb"),
    ({"recompute": {"policy": "blocks", "budget_mb": 10}}, "optimize.recompute.budget_mb"),
    ({"recompute": {"polcy": "blocks"}}, "optimize.recompute.polcy"),
])
def test_bad_settings_fail_before_capture(monkeypatch, optimize, field):
    import peftc.compiled

    def no_capture(*a, **k):
        raise AssertionError("capture ran before the spec was checked")

    monkeypatch.setattr(peftc.compiled, "capture", no_capture)
    with pytest.raises(SpecError) as e:
        peftc.compile(tiny_model("tiny-llama"), {"methods": [{"lora": LORA}], "optimize": optimize},
                      example_inputs("tiny-llama"))
    assert e.value.field == field


def test_list_form_is_adapters():
    from peftc.passes.optimize.recompute import check_settings

    spec = peftc.Spec.from_dict({"methods": [{"lora": LORA}], "optimize": ["recompute"]})
    assert check_settings(spec.optimize["recompute"]) == {"policy": "adapters", "budget_mb": None}
    cm = peftc.compile(tiny_model("tiny-llama"), spec, example_inputs("tiny-llama"))
    assert cm.pass_counts["recompute_adapters"] > 0


@pytest.mark.parametrize("method", [{"ia3": {"targets": ["q_proj", "v_proj", "down_proj"], "feedforward": ["down_proj"]}},
                                    {"lora": {**LORA, "targets": ["q_proj", "o_proj", "down_proj"], "dora": True}}])
@pytest.mark.parametrize("fuse", [False, True])
def test_adapters_policy_other_methods(method, fuse):
    """IA3 and DoRA (unfused, and their fused ops ia3_linear / dora_linear): exact, and it fired."""
    ref, rc = _pair("tiny-llama", "adapters", 0.0, fuse, method)
    assert rc.pass_counts["recompute_adapters"] > 0
    inp = _inputs("tiny-llama")
    (o1, g1), (o2, g2) = _step(ref, inp), _step(rc, inp)
    torch.testing.assert_close(o2.loss, o1.loss, atol=1e-5, rtol=1e-5)
    for k in g1:
        torch.testing.assert_close(g2[k], g1[k], atol=1e-5, rtol=1e-5)
    report = _saved_bytes(rc, inp)
    assert report.after.total < report.before.total


def test_budget_fits_by_recomputing_gemms_exactly():
    """A budget below what elementwise recompute reaches: the min-cut recomputes base GEMMs, the
    measured saved bytes fit (within 5%: the op table is an estimate), and it stays exact."""
    inp = example_inputs("tiny-llama", batch=4, seq=32, seed=3)
    inp["labels"] = inp["input_ids"].clone()
    spec = {"methods": [{"lora": {**LORA, "dropout": 0.05}}]}
    ref = peftc.compile(tiny_model("tiny-llama"), spec, inp)
    cm = peftc.compile(tiny_model("tiny-llama"), spec, inp,
                       optimize={"recompute": {"policy": "budget", "budget_mb": 0.8}})
    cm.load_adapter_state_dict(ref.adapter_state_dict())
    assert cm.pass_counts["recompute_budget_tier"] == 2  # base GEMMs
    saved = peftc.memory.saved_for_backward(lambda: cm(**inp), exclude=cm)
    assert saved.total <= 0.8 * 2**20 * 1.05
    results = []
    for c in (ref, cm):
        torch.manual_seed(3)
        loss = c(**inp).loss
        loss.backward()
        results.append((loss, {k: p.grad for k, p in c.named_parameters() if p.requires_grad}))
    torch.testing.assert_close(results[1][0], results[0][0], atol=1e-5, rtol=1e-5)
    for k, g in results[0][1].items():
        torch.testing.assert_close(results[1][1][k], g, atol=1e-5, rtol=1e-5)
