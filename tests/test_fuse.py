"""The fuse pass: fused LoRA sites give the unfused graph's outputs and gradients."""

import copy

import pytest
import torch

import peftc
from peftc.graph import PEFTC
from peftc.kernels import lora_siblings  # noqa: F401  (registers torch.ops.peftc.lora_siblings)
from peftc.models import example_inputs, tiny_model

LORA = {"targets": "all-linear", "r": 4, "alpha": 8, "init": "random"}


def _pair(name, dropout=0.0, dtype=torch.float32, autocast=True, **extra):
    model = tiny_model(name).to(dtype)
    spec = {"methods": [{"lora": {**LORA, "dropout": dropout, **extra}}], "autocast_adapter_dtype": autocast}
    ref = peftc.compile(copy.deepcopy(model), spec, example_inputs(name))
    fused = peftc.compile(model, spec, example_inputs(name), optimize=["fuse"])
    fused.load_adapter_state_dict(ref.adapter_state_dict())
    return ref, fused


def _grads(cm):
    return {k: p.grad for k, p in cm.named_parameters() if p.requires_grad}


def _ids(seed=1):
    return torch.randint(0, 128, (3, 11), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])  # aten.linear and Conv1D's addmm
def test_fused_matches_unfused_fp32(name):
    ref, fused = _pair(name, dropout=0.1)
    sites = ref.pass_counts["lora"]
    assert fused.pass_counts["fuse"] == sites > 0
    assert not _fuse_lines(fused)  # every adapter site fused: nothing to say
    nodes = list(fused.graph_module.graph.nodes)
    assert not [n for n in nodes if n.meta.get(PEFTC, {}).get("method") == "lora" and n.op == "call_function"]
    assert sum(n.target is torch.ops.peftc.lora_linear.default for n in nodes) == sites
    ids = _ids()
    for cm in (ref, fused):
        cm.eval()  # dropout off: the two graphs compute the same function
        cm(input_ids=ids, labels=ids).loss.backward()
    torch.testing.assert_close(fused(input_ids=ids).logits, ref(input_ids=ids).logits, atol=1e-5, rtol=1e-5)
    g_ref, g_fused = _grads(ref), _grads(fused)
    assert g_ref.keys() == g_fused.keys()
    for k in g_ref:
        assert g_fused[k].abs().sum() > 0
        torch.testing.assert_close(g_fused[k], g_ref[k], atol=1e-5, rtol=1e-4)


def test_fused_matches_unfused_bf16():
    """bf16: logits within 2e-2 relative of the unfused graph; gradients as close to a float64
    reference as the unfused graph's are (rounding differs per op order, not in size). Adapters in
    bf16 too (fp32 adapters on a bf16 base, PEFT's default: tests/test_dtypes.py)."""
    ref, fused = _pair("tiny-llama", dtype=torch.bfloat16, autocast=False)
    exact = copy.deepcopy(ref).double()
    ids = _ids(2)
    for cm in (ref, fused, exact):
        cm.train()
        cm(input_ids=ids, labels=ids).loss.backward()
    a, b = ref(input_ids=ids).logits.float(), fused(input_ids=ids).logits.float()
    assert (a - b).norm() / a.norm() < 2e-2
    g_ref, g_fused, g_exact = _grads(ref), _grads(fused), _grads(exact)
    for k, truth in g_exact.items():
        err_fused = ((g_fused[k].double() - truth).norm() / truth.norm()).item()
        err_ref = ((g_ref[k].double() - truth).norm() / truth.norm()).item()
        assert err_fused < max(2e-2, 2 * err_ref), k


def test_fused_dropout_is_seeded_and_consistent(monkeypatch):
    """Train-mode dropout: repeatable under torch.manual_seed, active, and its backward is the
    derivative of its forward (float64 finite differences with the seed held fixed; a plain
    torch model, since HF's RMSNorm and loss compute in float32)."""
    model = tiny_model("tiny-torch", dropout=0.0).double()
    spec = {"methods": [{"lora": {**LORA, "dropout": 0.3}}]}
    fused = peftc.compile(model, spec, {"x": torch.randn(2, 8, 64, dtype=torch.float64)}, optimize=["fuse"])
    assert fused.pass_counts["fuse"] == 9  # qkv, proj, fc1, fc2 per block, and the head
    x = torch.randn(3, 5, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    fused.train()
    torch.manual_seed(0)
    y1 = fused(x=x)
    torch.manual_seed(0)
    assert torch.equal(fused(x=x), y1)
    fused.eval()
    assert torch.equal(fused(x=x), fused(x=x))  # eval: no dropout
    assert (fused(x=x) - y1).abs().max() > 1e-3  # the mask did something in train mode
    fused.train()
    import peftc.passes.optimize.fuse as fuse_mod

    monkeypatch.setattr(fuse_mod, "seed_for", lambda x, on: torch.tensor(1234, dtype=torch.int64))
    fused._graphs.clear()  # rebuilt with the fixed seed
    params = fused.trainable_parameters()
    g = torch.Generator().manual_seed(5)
    probe = torch.randn(y1.shape, generator=g, dtype=torch.float64)
    objective = lambda: (fused(x=x) * probe).sum()
    grads = torch.autograd.grad(objective(), params)
    direction = [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in params]
    eps = 1e-6

    def at(sign):
        with torch.no_grad():
            for p, d in zip(params, direction):
                p.add_(sign * eps * d)
            out = objective().item()
            for p, d in zip(params, direction):
                p.sub_(sign * eps * d)
        return out

    numeric = (at(1) - at(-1)) / (2 * eps)
    analytic = sum((gr * d).sum() for gr, d in zip(grads, direction)).item()
    assert numeric == pytest.approx(analytic, rel=1e-6)


def test_dora_sites_take_the_dora_op_not_lora_linear():
    ref, fused = _pair("tiny-llama", dora=True)
    assert fused.pass_counts.get("fuse", 0) == 0 and fused.pass_counts["fuse_dora"] == ref.pass_counts["lora"]
    ids = _ids(4)
    ref.eval(), fused.eval()
    torch.testing.assert_close(fused(input_ids=ids).logits, ref(input_ids=ids).logits, atol=1e-5, rtol=1e-5)


def test_two_adapters_fuse_the_first_and_keep_the_sum():
    model = tiny_model("tiny-llama")
    spec = {"methods": [{"lora": {**LORA, "targets": ["q_proj", "v_proj"]}}]}
    ref = peftc.compile(copy.deepcopy(model), spec, example_inputs("tiny-llama"))
    ref.add_adapter({"adapter": "other", "methods": [{"lora": {**LORA, "targets": ["v_proj"]}}]}, activate=True)
    fused = peftc.compile(model, spec, example_inputs("tiny-llama"), optimize=["fuse"])
    fused.add_adapter({"adapter": "other", "methods": [{"lora": {**LORA, "targets": ["v_proj"]}}]}, activate=True)
    for name in ("default", "other"):
        fused.load_adapter_state_dict(ref.adapter_state_dict(name), adapter=name)
    ids = _ids(5)
    ref.eval(), fused.eval()
    torch.testing.assert_close(fused(input_ids=ids).logits, ref(input_ids=ids).logits, atol=1e-5, rtol=1e-5)
    assert fused.pass_counts["fuse"] >= 2  # q_proj x 2 layers at least
    assert _fuse_lines(fused) == [f"fuse: {fused.pass_counts['fuse']} of 6 adapter sites: 2 LoRA stacked on another "
                                  "adapter's output has no fused op"]  # q, v of default and v of other, 2 layers


def _fuse_lines(cm):
    return [line for line in cm.graph_summary().splitlines() if line.startswith("fuse:")]


@pytest.mark.parametrize("entry, reason", [
    ({"lora": {"targets": ["q_proj", "v_proj"], "r": 2, "gate": True}}, "gated LoRA has no fused op"),
    ({"loha": {"targets": ["q_proj", "v_proj"], "r": 2}}, "LoHa has no fused op"),
])
def test_fuse_that_fuses_nothing_says_why(entry, reason):
    cm = peftc.compile(tiny_model("tiny-llama"), {"methods": [entry]}, example_inputs("tiny-llama"), optimize=["fuse"])
    assert cm.pass_counts["fuse"] == 0
    assert _fuse_lines(cm) == [f"fuse: 0 of 4 adapter sites: 4 {reason}"]  # q and v in 2 layers


def test_fuse_without_adapter_sites_matches_nothing():
    cm = peftc.compile(tiny_model("tiny-llama"), {"methods": [{"prompt": {"tokens": 4}}]}, example_inputs("tiny-llama"),
                       optimize=["fuse"])
    assert _fuse_lines(cm) == ["fuse: matched nothing: no adapter sites in this graph"]


def test_partial_fuse_names_the_sites_left():
    spec = {"methods": [{"lora": {**LORA, "targets": ["q_proj"]}}, {"loha": {"targets": ["v_proj"], "r": 2}}]}
    cm = peftc.compile(tiny_model("tiny-llama"), spec, example_inputs("tiny-llama"), optimize=["fuse"])
    assert cm.pass_counts["fuse"] == 2
    assert sum(n.target is torch.ops.peftc.lora_linear.default for n in cm.graph_module.graph.nodes) == 2
    assert _fuse_lines(cm) == ["fuse: 2 of 4 adapter sites: 2 LoHa has no fused op"]


def test_unknown_optimization_is_an_error():
    with pytest.raises(peftc.SpecError, match="fuse"):
        peftc.compile(tiny_model("tiny-llama"), {"methods": [{"lora": LORA}]}, example_inputs("tiny-llama"),
                      optimize=["fusion"])


# ---------------------------------------------------------------- sibling LoRA (lora_siblings)

SIBLINGS = torch.ops.peftc.lora_siblings.default


def _sibling_pair(dropout, settings):
    model = tiny_model("tiny-llama")
    spec = {"methods": [{"lora": {**LORA, "dropout": dropout}}]}
    ref = peftc.compile(copy.deepcopy(model), spec, example_inputs("tiny-llama"))
    fused = peftc.compile(model, spec, example_inputs("tiny-llama"), optimize={"fuse": settings})
    fused.load_adapter_state_dict(ref.adapter_state_dict())
    return ref, fused


def _sibling_groups(cm):
    """Module names of each lora_siblings node's group, in graph order."""
    return [[m.rsplit(".", 1)[-1] for m in n.meta[PEFTC]["siblings"]]
            for n in cm.graph_module.graph.nodes if n.target is SIBLINGS]


def _assert_same_logits_and_grads(ref, fused, seed):
    ids = _ids(seed)
    ids = torch.cat([ids, ids[:1]])[:, :9]  # (4, 9): neither the example's batch nor its length
    for cm in (ref, fused):
        cm.zero_grad()
        cm(input_ids=ids, labels=ids).loss.backward()
    torch.testing.assert_close(fused(input_ids=ids).logits, ref(input_ids=ids).logits, atol=1e-5, rtol=1e-5)
    g_ref, g_fused = _grads(ref), _grads(fused)
    assert g_ref.keys() == g_fused.keys()
    for k in g_ref:
        assert g_fused[k].abs().sum() > 0, k
        torch.testing.assert_close(g_fused[k], g_ref[k], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("dropout, settings", [(0.0, {}), (0.1, {"shared_dropout": True})])
def test_siblings_fuse_qkv_and_gate_up(dropout, settings):
    """q/k/v and gate/up read one normed x: one lora_siblings node each; o/down stay lora_linear.
    With dropout only under shared_dropout; compared with it off (eval), where both graphs agree."""
    ref, fused = _sibling_pair(dropout, settings)
    counts = fused.pass_counts
    assert counts["fuse"] == ref.pass_counts["lora"] == 14 and counts["fuse_siblings"] == 4
    assert _sibling_groups(fused) == [["q_proj", "k_proj", "v_proj"], ["gate_proj", "up_proj"]] * 2
    nodes = list(fused.graph_module.graph.nodes)
    assert sum(n.target is torch.ops.peftc.lora_linear.default for n in nodes) == 4  # o_proj, down_proj x 2
    assert not [n for n in nodes if n.meta.get(PEFTC, {}).get("method") == "lora" and n.op == "call_function"]
    if dropout:
        ref.eval(), fused.eval()
    _assert_same_logits_and_grads(ref, fused, seed=6)


def test_siblings_with_dropout_stay_single_without_shared_dropout():
    ref, fused = _sibling_pair(0.1, {})
    assert fused.pass_counts["fuse"] == 14 and fused.pass_counts.get("fuse_siblings", 0) == 0
    assert _sibling_groups(fused) == []
    ref.eval(), fused.eval()
    _assert_same_logits_and_grads(ref, fused, seed=7)


def test_shared_dropout_is_seeded_active_and_shared():
    """Train mode: repeatable under torch.manual_seed, different from eval; one seed node feeds a group."""
    _, fused = _sibling_pair(0.3, {"shared_dropout": True})
    ids = _ids(8)
    fused.train()
    torch.manual_seed(0)
    a = fused(input_ids=ids).logits
    torch.manual_seed(0)
    assert torch.equal(fused(input_ids=ids).logits, a)
    assert not torch.equal(fused(input_ids=ids).logits, a)  # a fresh mask per call
    fused.eval()
    assert (fused(input_ids=ids).logits - a).abs().max() > 1e-4
    for n in fused.graph_module.graph.nodes:
        if n.target is SIBLINGS:
            assert n.args[6] == 0.3 and n.args[7].meta[PEFTC]["role"] == "seed" and n.args[8] is False


@pytest.mark.parametrize("settings, field", [({"shared_dropot": True}, "optimize.fuse.shared_dropot"),
                                             ({"shared_dropout": "yes"}, "optimize.fuse.shared_dropout")])
def test_bad_fuse_settings_are_spec_errors(settings, field, monkeypatch):
    def no_capture(*a, **k):
        raise AssertionError("captured before the optimize settings were checked")

    monkeypatch.setattr("peftc.compiled.capture", no_capture)
    with pytest.raises(peftc.SpecError, match=field.replace(".", r"\.")) as err:
        peftc.compile(tiny_model("tiny-llama"), {"methods": [{"lora": LORA}]}, example_inputs("tiny-llama"),
                      optimize={"fuse": settings})
    assert err.value.field == field
    with pytest.raises(peftc.SpecError, match=field.replace(".", r"\.")):
        peftc.Spec.from_dict({"methods": [{"lora": LORA}], "optimize": {"fuse": settings}})
