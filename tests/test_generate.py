"""cm.generate against HF PEFT's generate: greedy tokens on a left-padded batch, for LoRA, prefix
tuning and prompt tuning on tiny Llama and GPT-2; the KV cache's call counts; sampling, beam
search, mixed adapters, and that the graphs are the rewritten ones."""

import copy

import pytest
import torch
from peft import LoraConfig, PrefixTuningConfig, PromptTuningConfig, get_peft_model

import peftc
from peftc.generation import generator
from peftc.models import example_inputs, tiny_model

CONFIGS = {
    "lora": lambda: LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, init_lora_weights=False,
                               target_modules="all-linear"),
    "prefix": lambda: PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
    "prompt": lambda: PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3),
}


def _batch(seed: int = 1, batch: int = 3, length: int = 7):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 128, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding, as a tokenizer with padding_side="left" makes
    mask[1, :1] = 0
    return ids.masked_fill(mask == 0, 0), mask


def _pair(tmp_path, name: str, method: str):
    """A PEFT model (non-zero adapter weights) and the same adapter compiled by peftc."""
    base = tiny_model(name)
    snapshot = copy.deepcopy(base.state_dict())
    torch.manual_seed(3)
    pm = get_peft_model(base, CONFIGS[method]()).eval()
    pm.save_pretrained(tmp_path / "peft")
    fresh = tiny_model(name)
    fresh.load_state_dict(snapshot)
    return pm, peftc.from_peft(fresh, tmp_path / "peft", example_inputs(name))


@pytest.mark.parametrize("method", sorted(CONFIGS))
@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_greedy_tokens_equal_peft(tmp_path, name, method):
    pm, cm = _pair(tmp_path, name, method)
    ids, mask = _batch()
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        ref = pm.generate(**kw)
        bare = cm.base_model.generate(**kw)
    ours = cm.generate(**kw)
    assert ours.shape == ref.shape == (3, 13)
    assert torch.equal(ours, ref)
    assert not torch.equal(bare, ref)  # the adapter changes the tokens: the comparison can fail
    stats = generator(cm).stats
    assert (stats["prefill"], stats["decode"], stats["captures"]) == (1, 5, 2)
