"""Merging (exact folds, no adapter nodes left, unmerge) and several named adapters."""

import copy

import pytest
import torch
from peft import IA3Config, LoraConfig, PeftModel, get_peft_model

import peftc
from peftc.models import example_inputs, tiny_model

ADAPTER_METHODS = {"lora", "ia3"}


def randomize(cm, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in cm.trainable_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2 + (1.0 if p.shape[0] == 1 or p.shape[-1] == 1 else 0.0))


@pytest.mark.parametrize("name, method", [
    ("tiny-llama", {"lora": {"targets": "all-linear", "r": 4, "alpha": 8}}),
    ("tiny-llama", {"lora": {"targets": ["q_proj", "down_proj"], "r": 4, "rslora": True, "dora": True}}),
    ("tiny-gpt2", {"lora": {"targets": ["c_attn", "c_proj"], "r": 4, "dora": True}}),
    ("tiny-gpt2", {"ia3": {}}),
    ("tiny-llama", {"ia3": {}}),
])
def test_merge_is_exact_and_reversible(tmp_path, name, method):
    model = tiny_model(name)
    cm = peftc.compile(model, {"methods": [method]}, example_inputs(name)).eval()
    randomize(cm)
    ex = example_inputs(name, 3, 11, seed=7)
    with torch.no_grad():
        ref = cm(**ex).logits
        cm.merge()
        merged = cm(**ex).logits
    assert (merged - ref).abs().max() <= 1e-5
    assert not [n for n in cm.graph_module.graph.nodes if n.meta.get("peftc", {}).get("method") in ADAPTER_METHODS]
    assert cm.pass_counts["merge"] > 0 and cm.num_trainable_parameters() == 0
    cm.unmerge()
    with torch.no_grad():
        assert torch.equal(cm(**ex).logits, ref)
    fresh = tiny_model(name)
    fresh.load_state_dict(cm.merged_state_dict())
    with torch.no_grad():
        assert (fresh.eval()(**ex).logits - ref).abs().max() <= 1e-5
    cm.save_merged(tmp_path / "merged")
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        assert (loaded(**ex).logits - ref).abs().max() <= 1e-5


def _peft_two_adapters(tmp_path, cfg_a, cfg_b, name="tiny-llama"):
    base = tiny_model(name)
    snapshot = copy.deepcopy(base.state_dict())
    pm = get_peft_model(base, cfg_a)
    pm.add_adapter("b", cfg_b)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n or "ia3_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2 + (1.0 if "ia3_" in n else 0.0))
    pm.save_pretrained(tmp_path)  # default at root, "b" at tmp_path/b
    fresh = tiny_model(name)
    fresh.load_state_dict(snapshot)
    return pm.eval(), fresh


@pytest.mark.parametrize("cfgs", [
    (LoraConfig(target_modules=["q_proj", "v_proj"], r=4), LoraConfig(target_modules=["v_proj", "up_proj"], r=2)),
    (IA3Config(), IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"])),
])
def test_several_adapters_match_peft(tmp_path, cfgs):
    pm, fresh = _peft_two_adapters(tmp_path, *cfgs)
    ex = example_inputs("tiny-llama", 3, 9, seed=2)
    cm = peftc.from_peft(fresh, tmp_path, example_inputs("tiny-llama"))
    cm.load_adapter(tmp_path / "b", "b")
    assert cm.adapter_names == ["default", "b"] and cm.active_adapters == ["default"]
    with torch.no_grad():
        for active in (["default"], ["b"], ["default", "b"]):
            pm.base_model.set_adapter(active)
            cm.set_adapter(active)
            torch.testing.assert_close(cm(**ex).logits, pm(**ex).logits, atol=1e-4, rtol=0)
        with pm.disable_adapter():
            cm.disable_adapters()
            torch.testing.assert_close(cm(**ex).logits, pm(**ex).logits, atol=1e-5, rtol=0)
        cm.enable_adapters()
    cm.save_adapter(tmp_path / "ours")
    again = tiny_model("tiny-llama")
    again.load_state_dict(fresh.state_dict())
    pm2 = PeftModel.from_pretrained(again, tmp_path / "ours").eval()
    pm2.load_adapter(tmp_path / "ours" / "b", "b")
    pm2.base_model.set_adapter(["default", "b"])
    with torch.no_grad():
        torch.testing.assert_close(pm2(**ex).logits, cm(**ex).logits, atol=1e-4, rtol=0)


def test_only_active_adapters_train_and_delete():
    cm = peftc.compile(tiny_model("tiny-llama"), {"methods": [{"lora": {"targets": ["q_proj"], "r": 2}}]},
                       example_inputs("tiny-llama"))
    cm.add_adapter({"adapter": "other", "methods": [{"lora": {"targets": ["v_proj"], "r": 3}}]})
    names = {n for n, p in cm.named_parameters() if p.requires_grad}
    assert names and all(".lora.default." in n for n in names)
    cm.set_adapter("other")
    names = {n for n, p in cm.named_parameters() if p.requires_grad}
    assert names and all(".lora.other." in n for n in names)
    ex = example_inputs("tiny-llama", 2, 6, seed=1)
    cm(**ex, labels=ex["input_ids"]).loss.backward()
    assert all(p.grad is not None for p in cm.trainable_parameters())
    cm.delete_adapter("default")
    assert cm.adapter_names == ["other"]
    assert not [n for n, _ in cm.adapters.named_parameters() if ".default." in n]
    with pytest.raises(peftc.SpecError, match="adapter"):
        cm.set_adapter("default")


@pytest.mark.parametrize("name, extra", [("tiny-llama", {"dora": True}), ("tiny-gpt2", {})])
def test_mixed_batch_equals_per_sample_runs_and_trains(name, extra):
    targets = ["q_proj", "v_proj"] if name == "tiny-llama" else ["c_attn", "c_fc"]
    cm = peftc.compile(tiny_model(name), {"methods": [{"lora": {"targets": targets, "r": 2, **extra}}]},
                       example_inputs(name))
    cm.add_adapter({"adapter": "b", "methods": [{"lora": {"targets": targets[:1], "r": 3, **extra}}]})
    cm.set_adapter(["default", "b"])  # both trainable
    randomize(cm, seed=4)
    cm.eval()
    ex = example_inputs(name, 3, 7, seed=8)
    names = ["b", "__base__", "default"]
    mixed = cm(**ex, adapter_names=names).logits
    with torch.no_grad():
        for i, n in enumerate(names):
            one = {k: v[i:i + 1] for k, v in ex.items()}
            if n == "__base__":
                cm.disable_adapters()
            else:
                cm.set_adapter(n)
            torch.testing.assert_close(mixed[i:i + 1], cm(**one).logits, atol=1e-5, rtol=0)
    cm.set_adapter(["default", "b"])
    cm.train()
    cm(**ex, labels=ex["input_ids"], adapter_names=["b", "b", "__base__"]).loss.backward()
    grads = {n: p.grad for n, p in cm.named_parameters() if p.requires_grad}
    assert all(g is not None and g.abs().sum() > 0 for n, g in grads.items() if ".lora.b." in n)
    assert all(g is None or g.abs().sum() == 0 for n, g in grads.items() if ".lora.default." in n)
    with pytest.raises(peftc.SpecError, match="one name per sample"):
        cm(**ex, adapter_names=["b"])
