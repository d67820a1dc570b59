"""DoRA against HF PEFT: logits, magnitude init, gradients in training, checkpoint round trip."""

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
from roundtrip import assert_peft_loads_same

import peftc
from peftc.models import example_inputs, tiny_model


def make_pair(name, tmp_path, **kw):
    base = tiny_model(name)
    snapshot = copy.deepcopy(base.state_dict())
    pm = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, use_dora=True, **kw))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in pm.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    pm.save_pretrained(tmp_path / "peft")
    fresh = tiny_model(name)
    fresh.load_state_dict(snapshot)
    cm = peftc.from_peft(fresh, tmp_path / "peft", example_inputs(name), trainable=True)
    return pm, cm, snapshot


CASES = [
    ("tiny-llama", {"target_modules": ["q_proj", "v_proj", "down_proj"]}),
    ("tiny-llama", {"target_modules": ["q_proj", "up_proj"], "lora_dropout": 0.1}),  # base recomputed
    ("tiny-gpt2", {"target_modules": ["c_attn", "c_fc"], "fan_in_fan_out": True}),  # Conv1D
]


@pytest.mark.parametrize("name, kw", CASES)
def test_dora_matches_peft(tmp_path, name, kw):
    pm, cm, snapshot = make_pair(name, tmp_path, **kw)
    ex = example_inputs(name, 3, 13, seed=5)
    pm.eval()
    cm.eval()
    with torch.no_grad():
        torch.testing.assert_close(cm(**ex).logits, pm(**ex).logits, atol=1e-4, rtol=0)
    assert cm.num_trainable_parameters() == pm.get_nb_trainable_parameters()[0]
    ref = get_peft_model_state_dict(pm)
    assert set(cm.adapter_state_dict()) == set(ref)
    # training: same loss and same gradients on every adapter tensor (same dropout stream)
    pm.train()
    cm.train()
    losses = []
    for model in (pm, cm):
        torch.manual_seed(3)
        out = model(**ex, labels=ex["input_ids"])
        out.loss.backward()
        losses.append(out.loss.item())
    assert losses[0] == pytest.approx(losses[1], abs=1e-5)
    peft_grads = {k: p.grad for k, p in pm.named_parameters() if p.requires_grad}
    for key, p in cm._peft_params().items():
        name_in_peft = key.replace(".lora_A.", ".lora_A.default.").replace(".lora_B.", ".lora_B.default.")
        name_in_peft = name_in_peft.replace("lora_magnitude_vector", "lora_magnitude_vector.default.weight")
        torch.testing.assert_close(p.grad, peft_grads[name_in_peft], atol=1e-5, rtol=1e-4)
    assert_peft_loads_same(cm, name, snapshot, tmp_path / "ours", **ex)


def test_magnitude_init_is_weight_norm_and_identity():
    model = tiny_model("tiny-gpt2").eval()
    cm = peftc.compile(model, {"methods": [{"lora": {"targets": ["c_attn"], "r": 4, "dora": True}}]},
                       example_inputs("tiny-gpt2")).eval()
    w = model.transformer.h[0].attn.c_attn.weight  # Conv1D: (in, out)
    mag = cm.adapters.get_parameter("transformer.h.0.attn.c_attn.lora.default.lora_magnitude_vector")
    torch.testing.assert_close(mag, torch.linalg.norm(w.t(), dim=1))
    ex = example_inputs("tiny-gpt2", 2, 9, seed=1)
    with torch.no_grad():
        torch.testing.assert_close(cm(**ex).logits, model(**ex).logits, atol=1e-5, rtol=0)
