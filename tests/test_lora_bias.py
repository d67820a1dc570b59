"""LoRA ``bias`` modes against HF PEFT: the same trainable biases, keys and logits."""

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

import peftc
from peftc.models import example_inputs, tiny_model


@pytest.mark.parametrize("name, bias, kw", [
    ("tiny-bert", "all", {"task_type": "SEQ_CLS", "target_modules": ["query", "value"]}),
    ("tiny-gpt2", "all", {"fan_in_fan_out": True, "target_modules": ["c_attn"]}),
    ("tiny-gpt2", "lora_only", {"fan_in_fan_out": True, "target_modules": ["c_fc"]}),
])
def test_bias_modes_match_peft(tmp_path, name, bias, kw):
    base = tiny_model(name)
    snapshot = copy.deepcopy(base.state_dict())
    pm = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, bias=bias, **kw))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in pm.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    pm.save_pretrained(tmp_path)
    pm.eval()
    fresh = tiny_model(name)
    fresh.load_state_dict(snapshot)
    cm = peftc.from_peft(fresh, tmp_path, example_inputs(name), trainable=True).eval()
    ex = example_inputs(name, 3, 13, seed=5)
    with torch.no_grad():
        torch.testing.assert_close(cm(**ex).logits, pm(**ex).logits, atol=1e-4, rtol=0)
    assert cm.num_trainable_parameters() == pm.get_nb_trainable_parameters()[0]
    ref = get_peft_model_state_dict(pm)
    ours = cm.adapter_state_dict()
    assert set(ours) == set(ref)
    for k in ref:
        torch.testing.assert_close(ours[k], ref[k], atol=0, rtol=0)
