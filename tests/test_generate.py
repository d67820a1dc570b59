"""cm.generate against HF PEFT's generate: greedy tokens on a left-padded batch, for LoRA, prefix
tuning and prompt tuning on tiny Llama and GPT-2; the KV cache's call counts; sampling, beam
search, mixed adapters, and that the graphs are the rewritten ones."""

import copy

import pytest
import torch
from peft import (
    IA3Config,
    LoraConfig,
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptTuningConfig,
    get_peft_model,
)
from transformers import GenerationConfig

import peftc
from peftc.generation import generator
from peftc.models import example_inputs, tiny_model

CONFIGS = {
    "lora": lambda: LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, init_lora_weights=False,
                               target_modules="all-linear"),
    "prefix": lambda: PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
    "prompt": lambda: PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3),
    "ptuning": lambda: PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=3, encoder_hidden_size=32),
    "ia3": lambda: IA3Config(task_type="CAUSAL_LM", init_ia3_weights=False),
}
CASES = [(n, m) for n in ("tiny-llama", "tiny-gpt2") for m in ("lora", "prefix", "prompt")]
CASES += [("tiny-llama", "ptuning"), ("tiny-llama", "ia3")]


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


@pytest.mark.slow
@pytest.mark.parametrize(("name", "method"), CASES)
def test_greedy_tokens_equal_peft(tmp_path, name, method):
    pm, cm = _pair(tmp_path, name, method)
    ids, mask = _batch()
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        ref = pm.generate(**kw)
        bare = cm.get_base_model().generate(**kw)
    ours = cm.generate(**kw)
    assert ours.shape == ref.shape == (3, 13)
    assert torch.equal(ours, ref)
    assert not torch.equal(bare, ref)  # the adapter changes the tokens: the comparison can fail
    stats = generator(cm).stats
    assert (stats["prefill"], stats["decode"], stats["captures"]) == (1, 5, 2)


def _lora(name: str = "tiny-llama", **lora):
    spec = {"methods": [{"lora": {"targets": ["q_proj", "v_proj"] if name == "tiny-llama" else ["c_attn"],
                                  "r": 4, "init": "random", **lora}}]}
    return peftc.compile(tiny_model(name), spec, example_inputs(name)).eval()


def _greedy_without_cache(cm, ids, mask, steps: int):
    """The reference loop: the whole sequence through cm(...) every step, no cache."""
    for _ in range(steps):
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            nxt = cm(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, -1].argmax(-1, keepdim=True)
        ids, mask = torch.cat([ids, nxt], 1), torch.cat([mask, torch.ones_like(nxt)], 1)
    return ids


def test_kv_cache_counts_and_no_recapture():
    cm = _lora()
    ids, mask = _batch(seed=4, batch=2, length=24)
    out = cm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=16, do_sample=False)
    stats = generator(cm).stats
    assert (stats["prefill"], stats["decode"], stats["captures"]) == (1, 15, 2)
    assert torch.equal(out, _greedy_without_cache(cm, ids, mask, 16))
    ids2, mask2 = _batch(seed=5, batch=3, length=11)  # another batch size and length: the same graphs
    cm.generate(input_ids=ids2, attention_mask=mask2, max_new_tokens=9, do_sample=False)
    assert (stats["prefill"], stats["decode"], stats["captures"]) == (2, 23, 2)
    longest = cm.generate(input_ids=ids2, attention_mask=mask2, max_length=15, do_sample=False)  # cache: 15
    shorter = cm.generate(input_ids=ids2, attention_mask=mask2,
                          generation_config=GenerationConfig(max_new_tokens=3, do_sample=False))
    assert longest.shape == (3, 15) and torch.equal(shorter, longest[:, :14])


def test_deep_model_step_graphs_trace_three_layers(tmp_path):
    """Eight layers: each step graph is traced from three and checked once against the eager step
    (on copies of the cache, which the check must not write); the tokens stay PEFT's."""
    base = tiny_model("tiny-llama", num_hidden_layers=8)
    snapshot = copy.deepcopy(base.state_dict())
    torch.manual_seed(3)
    pm = get_peft_model(base, CONFIGS["lora"]()).eval()
    pm.save_pretrained(tmp_path / "peft")
    fresh = tiny_model("tiny-llama", num_hidden_layers=8)
    fresh.load_state_dict(snapshot)
    cm = peftc.from_peft(fresh, tmp_path / "peft", example_inputs("tiny-llama"))
    ids, mask = _batch(seed=6)
    with torch.no_grad():
        ref = pm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    out = cm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(out, ref)
    gen = generator(cm)
    assert gen.stats["captures"] == 2  # prefill and decode, none captured again whole
    for graphs in (gen.prefill, gen.decode):
        assert any("(8 layers from 3 traced)" in line for line in graphs.stats.log), graphs.stats.log
        assert not any("differs" in line for line in graphs.stats.log), graphs.stats.log


def test_beam_search_and_sampling_equal_peft(tmp_path):
    pm, cm = _pair(tmp_path, "tiny-llama", "lora")
    ids, mask = _batch(seed=6)
    for kw in ({"num_beams": 3, "do_sample": False}, {"num_beams": 2, "num_return_sequences": 2, "do_sample": False},
               {"do_sample": True, "top_k": 20, "temperature": 0.7}):
        kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=5, pad_token_id=0, **kw)
        torch.manual_seed(11)
        with torch.no_grad():
            ref = pm.generate(**kw)
        torch.manual_seed(11)
        assert torch.equal(cm.generate(**kw), ref), kw


def test_adapter_changes_reach_generate_and_base_model_is_bare():
    cm = _lora()
    ids, mask = _batch(seed=7)
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    adapted = cm.generate(**kw)
    with torch.no_grad():
        bare = cm.get_base_model().generate(**kw)  # the wrapped model itself: no adapter (documented)
    assert not torch.equal(adapted, bare)
    cm.disable_adapters()
    assert torch.equal(cm.generate(**kw), bare)
    cm.enable_adapters()
    assert torch.equal(cm.generate(**kw), adapted)
    assert generator(cm).stats["captures"] == 2  # rewritten again, not captured again
    cm.merge()
    assert torch.equal(cm.generate(**kw), adapted)
    cm.unmerge()


def test_mixed_adapters_per_sample():
    cm = _lora()
    cm.add_adapter({"methods": [{"lora": {"targets": ["k_proj", "o_proj"], "r": 2, "init": "random"}}]}, name="b")
    ids, mask = _batch(seed=8)
    kw = dict(attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    names = ["default", "b", "__base__"]
    mixed = cm.generate(input_ids=ids, adapter_names=names, **kw)
    for row, name in enumerate(names):
        if name == "__base__":
            cm.disable_adapters()
        else:
            cm.set_adapter(name)
        alone = cm.generate(input_ids=ids, **kw)
        cm.enable_adapters()
        assert torch.equal(mixed[row], alone[row]), name
    beams = cm.generate(input_ids=ids, adapter_names=names, num_beams=2, **kw)  # rows follow their sample
    assert beams.shape == mixed.shape
    with pytest.raises(peftc.SpecError, match="adapter_names"):
        cm.generate(input_ids=ids, adapter_names=["default"], **kw)


@pytest.mark.slow
def test_fused_graphs_generate_the_same_tokens():
    ids, mask = _batch(seed=9)
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    plain = _lora().generate(**kw)
    spec = {"methods": [{"lora": {"targets": ["q_proj", "v_proj"], "r": 4, "init": "random"}}], "optimize": ["fuse"]}
    fused = peftc.compile(tiny_model("tiny-llama"), spec, example_inputs("tiny-llama")).eval()
    assert torch.equal(fused.generate(**kw), plain)
    gm = next(iter(generator(fused).decode.rewritten.values()))
    assert any(str(n.target).startswith("peftc.lora_") for n in gm.graph.nodes)  # the fused op runs


def test_refusals():
    cm = _lora()
    ids, _ = _batch()
    with pytest.raises(peftc.SpecError, match="past_key_values"):
        cm.generate(input_ids=ids, past_key_values=object())
    with pytest.raises(peftc.SpecError, match="input_ids"):
        cm.generate(inputs_embeds=torch.randn(1, 3, 64))
    prompt = peftc.compile(tiny_model("tiny-llama"), {"methods": [{"prompt": {"tokens": 3}}]},
                           example_inputs("tiny-llama"))
    with pytest.raises(peftc.SpecError, match="2 tokens or more"):
        prompt.generate(input_ids=ids[:, :1])
    plain = peftc.compile(tiny_model("tiny-torch"), {"methods": [{"lora": {"targets": ["qkv"]}}]},
                          example_inputs("tiny-torch"))
    with pytest.raises(peftc.PeftcError, match="decoder-only"):
        plain.generate(input_ids=ids)
    t5 = peftc.compile(tiny_model("tiny-t5"), {"methods": [{"lora": {"targets": ["q", "v"]}}]}, example_inputs("tiny-t5"))
    with pytest.raises(peftc.PeftcError, match="decoder-only"):
        t5.generate(input_ids=ids)


@pytest.mark.slow
def test_bottleneck_adapter_equals_the_cacheless_loop():
    """A method PEFT lacks: the cached step graphs give the tokens of whole-sequence forwards."""
    cm = peftc.compile(tiny_model("tiny-llama"), {"methods": [{"bottleneck": {"placement": "houlsby"}}]},
                       example_inputs("tiny-llama")).eval()
    torch.manual_seed(12)
    with torch.no_grad():
        for p in cm.trainable_parameters():
            p.normal_(0, 0.3)  # AdapterHub's init starts near the identity
    ids, mask = _batch(seed=13)
    out = cm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(out, _greedy_without_cache(cm, ids, mask, 6))
    with torch.no_grad():
        bare = cm.get_base_model().generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                                      pad_token_id=0)
    assert not torch.equal(out, bare)
