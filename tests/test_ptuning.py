"""P-tuning against HF PEFT: encoder output, logits, checkpoint keys, round trips, gradients."""

import copy

import pytest
import torch
from peft import PromptEncoderConfig, get_peft_model, get_peft_model_state_dict
from roundtrip import assert_peft_loads_same

import peftc
from peftc.errors import CheckpointError
from peftc.models import example_inputs, tiny_model


def _batch(seed=2):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 128, (3, 13), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding
    return ids, mask


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_ptuning_matches_peft(tmp_path, name):
    base = tiny_model(name)
    snapshot = copy.deepcopy(base.state_dict())
    pm = get_peft_model(base, PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=5,
                                                  encoder_hidden_size=24))
    pm.eval()
    fresh = tiny_model(name)
    fresh.load_state_dict(snapshot)
    cm = peftc.compile(fresh, {"methods": [{"ptuning": {"tokens": 5, "hidden": 24}}]}, example_inputs(name))
    assert cm.pass_counts["ptuning"] == 1
    # the same encoder weights (PEFT's random init: embedding and MLP all non-zero)
    src = pm.prompt_encoder["default"].state_dict()
    dst = cm.adapters.get_submodule("prompt_encoder.default")
    dst.load_state_dict(src)
    assert cm.num_trainable_parameters() == pm.get_nb_trainable_parameters()[0]
    ids, mask = _batch()
    cm.eval()
    for kw in ({"input_ids": ids}, {"input_ids": ids, "attention_mask": mask, "labels": ids}):
        with torch.no_grad():
            ref, ours = pm(**kw), cm(**kw)
        assert ours.logits.shape == (3, 18, 128)
        torch.testing.assert_close(ours.logits, ref.logits, atol=1e-4, rtol=0)
    sd, ref_sd = cm.adapter_state_dict(), get_peft_model_state_dict(pm)
    assert set(sd) == set(ref_sd) == {"prompt_embeddings"}
    torch.testing.assert_close(sd["prompt_embeddings"], ref_sd["prompt_embeddings"])
    with pytest.raises(CheckpointError, match="computed"):
        cm.load_adapter_state_dict(ref_sd)

    cm.train()
    cm(input_ids=ids, labels=ids).loss.backward()
    for p in cm.trainable_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0

    # PEFT saves the encoder output; loading it gives PEFT's logits, frozen or trainable
    pm.save_pretrained(tmp_path / "peft")
    for trainable in (False, True):
        again = tiny_model(name)
        again.load_state_dict(snapshot)
        loaded = peftc.from_peft(again, tmp_path / "peft", example_inputs(name), trainable=trainable).eval()
        with torch.no_grad():
            torch.testing.assert_close(loaded(input_ids=ids, attention_mask=mask).logits,
                                       pm(input_ids=ids, attention_mask=mask).logits, atol=1e-4, rtol=0)
        assert loaded.num_trainable_parameters() == (5 * 64 if trainable else 0)
    # and peftc's save loads in PEFT to the same logits
    assert_peft_loads_same(cm, name, snapshot, tmp_path / "ours", input_ids=ids)


def test_ptuning_spec_errors():
    for bad in ({"tokens": 0}, {"encoder": "lstm"}, {"hidden": -3}):
        with pytest.raises(peftc.SpecError, match="ptuning." + next(iter(bad))):
            peftc.Spec.from_dict({"methods": [{"ptuning": bad}]})
    cfg = PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, encoder_reparameterization_type="LSTM")
    with pytest.raises(peftc.SpecError, match="encoder_reparameterization_type"):
        peftc.Spec.from_peft(cfg)
