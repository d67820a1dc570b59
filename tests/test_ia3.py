"""(IA)^3 against HF PEFT: logits, trainable counts, keys, gradients, round trip."""

import copy

import pytest
import torch
from peft import IA3Config, get_peft_model, get_peft_model_state_dict
from roundtrip import assert_peft_loads_same

import peftc
from peftc import SpecError
from peftc.models import example_inputs, tiny_model


def peft_pair(name, cfg, tmp_path):
    base = tiny_model(name)
    snapshot = copy.deepcopy(base.state_dict())
    pm = get_peft_model(base, cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in pm.parameters():
            if p.requires_grad:
                p.copy_(1 + torch.randn(p.shape, generator=g) * 0.3)
    pm.save_pretrained(tmp_path / "peft")
    fresh = tiny_model(name)
    fresh.load_state_dict(snapshot)
    return pm.eval(), fresh, snapshot


@pytest.mark.parametrize("name, kw", [
    ("tiny-llama", {}),  # PEFT's default targets + feedforward for llama
    ("tiny-gpt2", {"fan_in_fan_out": True}),  # Conv1D, feedforward mlp.c_proj
    ("tiny-qwen2", {"target_modules": ["q_proj", "down_proj", "up_proj"], "feedforward_modules": ["down_proj"]}),
    ("tiny-bert", {"task_type": "SEQ_CLS"}),
])
def test_from_peft_matches(tmp_path, name, kw):
    pm, fresh, snapshot = peft_pair(name, IA3Config(**kw), tmp_path)
    cm = peftc.from_peft(fresh, tmp_path / "peft", example_inputs(name), trainable=True).eval()
    ex = example_inputs(name, 3, 13, seed=4)
    with torch.no_grad():
        torch.testing.assert_close(cm(**ex).logits, pm(**ex).logits, atol=1e-4, rtol=0)
    assert cm.num_trainable_parameters() == pm.get_nb_trainable_parameters()[0]
    ref, ours = get_peft_model_state_dict(pm), cm.adapter_state_dict()
    assert set(ours) == set(ref)
    for k in ref:
        assert torch.equal(ours[k], ref[k])
    assert cm.pass_counts["ia3"] == sum(1 for k in ref if k.endswith("ia3_l"))
    # gradients reach every trainable parameter
    cm.train()
    out = cm(**ex, labels=ex["input_ids"] if name != "tiny-bert" else torch.randint(0, 3, (3,)))
    out.loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in cm.trainable_parameters())
    # save -> PEFT load round trip
    assert_peft_loads_same(cm, name, snapshot, tmp_path / "ours", **ex)


def test_identity_at_init_and_feedforward_placement():
    model = tiny_model("tiny-llama").eval()
    cm = peftc.compile(model, {"methods": [{"ia3": {}}]}, example_inputs("tiny-llama")).eval()
    ex = example_inputs("tiny-llama", 2, 7, seed=9)
    with torch.no_grad():
        assert torch.equal(cm(**ex).logits, model(**ex).logits)  # all-ones vectors
    shapes = {n: p.shape for n, p in cm.adapters.named_parameters()}
    assert shapes["model.layers.0.mlp.down_proj.ia3.default.ia3_l"] == (1, 128)  # input scaling
    assert shapes["model.layers.0.self_attn.k_proj.ia3.default.ia3_l"] == (32, 1)  # output (GQA kv)
    roles = [n.meta["peftc"]["role"] for n in cm.graph_module.graph.nodes
             if n.meta.get("peftc", {}).get("module") == "model.layers.0.mlp.down_proj"]
    assert roles == ["param", "flatten", "scale_input"]


def test_feedforward_must_be_subset():
    with pytest.raises(SpecError, match="subset of targets"):
        peftc.Spec.from_dict({"methods": [{"ia3": {"targets": ["k_proj"], "feedforward": ["down_proj"]}}]})


def test_no_default_for_unknown_model_type():
    with pytest.raises(SpecError, match="no default for model type"):
        peftc.compile(tiny_model("tiny-torch"), {"methods": [{"ia3": {}}]}, example_inputs("tiny-torch"))
