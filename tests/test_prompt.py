"""Prompt tuning against HF PEFT: logits (virtual positions included), loss, keys, gradients."""

import copy

import pytest
import torch
from peft import PromptTuningConfig, get_peft_model, get_peft_model_state_dict
from roundtrip import assert_peft_loads_same

import peftc
from peftc.errors import PassError
from peftc.models import example_inputs, tiny_model


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2", "tiny-mistral"])
def test_prompt_tuning_matches_peft(tmp_path, name):
    base = tiny_model(name)
    snapshot = copy.deepcopy(base.state_dict())
    pm = get_peft_model(base, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5))
    pm.save_pretrained(tmp_path / "peft")
    pm.eval()
    fresh = tiny_model(name)
    fresh.load_state_dict(snapshot)
    cm = peftc.from_peft(fresh, tmp_path / "peft", example_inputs(name), trainable=True).eval()
    ids = torch.randint(0, 128, (3, 13), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding
    for kw in ({"input_ids": ids}, {"input_ids": ids, "attention_mask": mask, "labels": ids}):
        with torch.no_grad():
            ref, ours = pm(**kw), cm(**kw)
        assert ours.logits.shape == (3, 18, 128)  # P virtual positions kept, as PEFT
        torch.testing.assert_close(ours.logits, ref.logits, atol=1e-4, rtol=0)
        if "labels" in kw:
            torch.testing.assert_close(ours.loss, ref.loss, atol=1e-5, rtol=0)
    assert cm.num_trainable_parameters() == pm.get_nb_trainable_parameters()[0] == 5 * 64
    ref_sd = get_peft_model_state_dict(pm)
    assert set(cm.adapter_state_dict()) == set(ref_sd) == {"prompt_embeddings"}
    torch.testing.assert_close(cm.adapter_state_dict()["prompt_embeddings"], ref_sd["prompt_embeddings"])
    cm.train()
    cm(input_ids=ids, labels=ids).loss.backward()
    (p,) = cm.trainable_parameters()
    assert p.grad is not None and p.grad.abs().sum() > 0
    with torch.no_grad():
        p.add_(0.5)
    assert_peft_loads_same(cm, name, snapshot, tmp_path / "ours", input_ids=ids)


def test_prompt_nodes_and_errors():
    cm = peftc.compile(tiny_model("tiny-llama"), {"methods": [{"prompt": {"tokens": 4}}]},
                       example_inputs("tiny-llama"))
    roles = [n.meta["peftc"]["role"] for n in cm.graph_module.graph.nodes if "peftc" in n.meta]
    assert roles[:3] == ["batch", "pad_input_ids", "widen_input_ids"] and roles[-1] == "prepend"
    with pytest.raises(peftc.SpecError, match="tokens"):
        peftc.Spec.from_dict({"methods": [{"prompt": {"tokens": 0}}]})
    with pytest.raises(PassError, match="input_ids"):
        peftc.compile(tiny_model("tiny-torch"), {"methods": [{"prompt": {}}]}, example_inputs("tiny-torch"))
