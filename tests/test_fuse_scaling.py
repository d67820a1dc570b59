"""fuse_ia3 / fuse_dora (run by optimize=["fuse"]): fused IA3 and DoRA sites give the unfused
graph's logits and gradients, on Llama (aten.linear) and GPT-2 (Conv1D addmm), at a batch and
sequence length other than the captured ones."""

import copy

import pytest
import torch

import peftc
from peftc.graph import PEFTC
from peftc.kernels import dora_linear, ia3_linear  # noqa: F401  (register the ops)
from peftc.models import example_inputs, tiny_model

IA3_OP, DORA_OP = torch.ops.peftc.ia3_linear.default, torch.ops.peftc.dora_linear.default
IA3 = {"tiny-llama": {"targets": ["k_proj", "v_proj", "up_proj", "down_proj"], "feedforward": ["down_proj"]},
       "tiny-gpt2": {"targets": ["c_attn", "mlp.c_proj"], "feedforward": ["mlp.c_proj"]}}
DORA = {"tiny-llama": {"targets": "all-linear"}, "tiny-gpt2": {"targets": ["c_attn", "c_fc", "mlp.c_proj"]}}


def _pair(name, entry):
    """Unfused and fused CompiledModels sharing perturbed adapter weights (magnitudes != norms)."""
    model = tiny_model(name)
    spec = {"methods": [entry]}
    ref = peftc.compile(copy.deepcopy(model), spec, example_inputs(name))
    fused = peftc.compile(model, spec, example_inputs(name), optimize=["fuse"])
    g = torch.Generator().manual_seed(0)
    sd = {k: v + 0.1 * torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in ref.adapter_state_dict().items()}
    for cm in (ref, fused):
        cm.load_adapter_state_dict(sd)
    return ref, fused


def _ids(seed=1):
    return torch.randint(0, 128, (3, 11), generator=torch.Generator().manual_seed(seed))  # captured: (2, 8)


def _nodes(cm, method):
    return [n for n in cm.graph_module.graph.nodes if n.op == "call_function" and n.meta.get(PEFTC, {}).get("method")
            == method]


def _check_parity(ref, fused, train=False):
    ids = _ids()
    for cm in (ref, fused):
        cm.train(train)
        cm.zero_grad()
        cm(input_ids=ids, labels=ids).loss.backward()
    torch.testing.assert_close(fused(input_ids=ids).logits, ref(input_ids=ids).logits, atol=1e-5, rtol=1e-5)
    g_ref = {k: p.grad for k, p in ref.named_parameters() if p.requires_grad}
    g_fused = {k: p.grad for k, p in fused.named_parameters() if p.requires_grad}
    assert g_ref.keys() == g_fused.keys() and g_ref
    for k in g_ref:
        assert g_fused[k].abs().sum() > 0, k
        torch.testing.assert_close(g_fused[k], g_ref[k], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_ia3_fused_matches_unfused(name):
    ref, fused = _pair(name, {"ia3": {**IA3[name], "init": "random"}})
    sites = ref.pass_counts["ia3"]
    assert fused.pass_counts["fuse_ia3"] == sites > 0 and fused.pass_counts.get("fuse_dora", 0) == 0
    assert "fuse:" not in fused.graph_summary()  # every adapter site fused
    left = _nodes(fused, "ia3")  # only the vectors' flatten, now read by the ops
    assert {n.meta[PEFTC]["role"] for n in left} == {"flatten"}
    assert all([u.target for u in n.users] == [IA3_OP] for n in left)
    ops = [n for n in fused.graph_module.graph.nodes if n.target is IA3_OP]
    modes = [n.args[4] for n in ops]
    layers = 2  # one feedforward (input-scaled) linear per block
    assert len(ops) == sites and modes.count("in") == layers and modes.count("out") == sites - layers
    _check_parity(ref, fused)


@pytest.mark.parametrize("name, dropout", [("tiny-llama", 0.0), ("tiny-llama", 0.1), ("tiny-gpt2", 0.1)])
def test_dora_fused_matches_unfused(name, dropout):
    """Eval (and, without dropout, training too): the fused op is the unfused graph's function;
    with dropout the unfused graph recomputes the base on the dropped input, the op likewise."""
    ref, fused = _pair(name, {"lora": {**DORA[name], "r": 4, "alpha": 8, "init": "random", "dora": True,
                                       "dropout": dropout}})
    sites = ref.pass_counts["lora"]
    assert fused.pass_counts["fuse_dora"] == sites > 0 and fused.pass_counts["fuse"] == 0
    assert not _nodes(fused, "lora")
    assert sum(n.target is DORA_OP for n in fused.graph_module.graph.nodes) == sites
    _check_parity(ref, fused, train=False)
    if dropout == 0.0:
        _check_parity(ref, fused, train=True)


def test_dora_dropout_follows_train_mode_and_seed():
    _, fused = _pair("tiny-llama", {"lora": {"targets": ["q_proj", "up_proj"], "r": 4, "alpha": 8, "dora": True,
                                             "dropout": 0.2, "init": "random"}})
    ids = _ids(2)
    fused.train()
    flags = lambda: {n.args[9] for n in fused.graph_module.graph.nodes if n.target is DORA_OP}
    torch.manual_seed(0)
    y1 = fused(input_ids=ids).logits
    assert flags() == {True}
    torch.manual_seed(0)
    assert torch.equal(fused(input_ids=ids).logits, y1)  # the seed comes from the global RNG
    fused.eval()
    y_eval = fused(input_ids=ids).logits
    assert flags() == {False} and torch.equal(fused(input_ids=ids).logits, y_eval)
    assert (y_eval - y1).abs().max() > 1e-3  # the mask did something in training


def test_scaling_sites_report_into_fuse_coverage():
    """IA3 and DoRA sites count in fuse's one coverage record with the other adapter sites: IA3 (k,
    v, down) fuses; VeRA (q) has no op; the DoRA on v reads IA3's scaled output (IA3 rewrites later
    and scales the linear itself), a chain no fused op covers."""
    spec = {"methods": [{"vera": {"targets": ["q_proj"], "r": 2}},
                        {"ia3": {"targets": ["k_proj", "v_proj", "down_proj"], "feedforward": ["down_proj"]}},
                        {"lora": {"targets": ["v_proj"], "r": 2, "dora": True}}]}
    cm = peftc.compile(tiny_model("tiny-llama"), spec, example_inputs("tiny-llama"), optimize=["fuse"])
    lines = [line for line in cm.graph_summary().splitlines() if line.startswith("fuse:")]
    assert cm.pass_counts["fuse_ia3"] == 6 and cm.pass_counts.get("fuse_dora", 0) == 0
    assert lines == ["fuse: 6 of 10 adapter sites: 2 VeRA has no fused op; 2 DoRA stacked on another adapter's "
                     "output has no fused op"]
