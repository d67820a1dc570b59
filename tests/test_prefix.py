"""Prefix tuning against HF PEFT (its past_key_values path): logits, keys, round trips, grads."""

import copy

import pytest
import torch
from conftest import reference_or_skip
from peft import PeftModel, PrefixTuningConfig, get_peft_model, get_peft_model_state_dict
from roundtrip import assert_peft_loads_same

import peftc
from peftc.errors import CheckpointError, PassError
from peftc.models import example_inputs, tiny_model


def _batch(seed=3):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 128, (3, 13), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding
    return ids, mask


@pytest.mark.parametrize("name,projection", [("tiny-llama", False), ("tiny-llama", True), ("tiny-gpt2", False),
                                             ("tiny-qwen2", True)])
@pytest.mark.slow
def test_prefix_matches_peft(tmp_path, name, projection):
    base = tiny_model(name)
    snapshot = copy.deepcopy(base.state_dict())
    pm = get_peft_model(base, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4,
                                                 prefix_projection=projection, encoder_hidden_size=24)).eval()
    fresh = tiny_model(name)
    fresh.load_state_dict(snapshot)
    spec = {"methods": [{"prefix": {"tokens": 4, "projection": projection, "hidden": 24}}]}
    cm = peftc.compile(fresh, spec, example_inputs(name))
    assert cm.pass_counts["prefix"] == 2  # one per attention layer
    cm.adapters.get_submodule("prompt_encoder.default").load_state_dict(pm.prompt_encoder["default"].state_dict())
    assert cm.num_trainable_parameters() == pm.get_nb_trainable_parameters()[0]
    ids, mask = _batch()
    plain = tiny_model(name)
    plain.load_state_dict(snapshot)
    cm.eval()
    with torch.no_grad():
        for kw in ({"input_ids": ids}, {"input_ids": ids, "attention_mask": mask, "labels": ids}):
            ref, ours = pm(**kw), cm(**kw)
            assert ours.logits.shape == (3, 13, 128)
            torch.testing.assert_close(ours.logits[:, 4:], ref.logits[:, 4:], atol=1e-4, rtol=0)
            torch.testing.assert_close(ours.logits[1:], ref.logits[1:], atol=1e-4, rtol=0)
            if "labels" in kw:
                torch.testing.assert_close(ours.loss, ref.loss, atol=1e-5, rtol=0)
        assert (plain.eval()(input_ids=ids).logits - cm(input_ids=ids).logits).abs().max() > 1e-2
    sd, ref_sd = cm.adapter_state_dict(), get_peft_model_state_dict(pm)
    assert set(sd) == set(ref_sd) == {"prompt_embeddings"}
    torch.testing.assert_close(sd["prompt_embeddings"], ref_sd["prompt_embeddings"])
    if projection:
        with pytest.raises(CheckpointError, match="computed"):
            cm.load_adapter_state_dict(ref_sd)

    cm.train()
    cm(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
    for p in cm.trainable_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0

    pm.save_pretrained(tmp_path / "peft")
    for trainable in (False, True):
        again = tiny_model(name)
        again.load_state_dict(snapshot)
        loaded = peftc.from_peft(again, tmp_path / "peft", example_inputs(name), trainable=trainable).eval()
        with torch.no_grad():
            torch.testing.assert_close(loaded(input_ids=ids).logits, pm(input_ids=ids).logits, atol=1e-4, rtol=0)
        assert loaded.num_trainable_parameters() == (ref_sd["prompt_embeddings"].numel() if trainable else 0)
    assert_peft_loads_same(cm, name, snapshot, tmp_path / "ours", input_ids=ids)


@pytest.mark.slow
def test_prefix_training_matches_peft():
    """Five AdamW steps: same losses as PEFT (gradients flow through the concatenated k/v)."""
    base = tiny_model("tiny-llama")
    snapshot = copy.deepcopy(base.state_dict())
    pm = get_peft_model(base, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    fresh = tiny_model("tiny-llama")
    fresh.load_state_dict(snapshot)
    cm = peftc.compile(fresh, {"methods": [{"prefix": {"tokens": 3}}]}, example_inputs("tiny-llama"))
    cm.adapters.get_submodule("prompt_encoder.default").load_state_dict(pm.prompt_encoder["default"].state_dict())
    ids, mask = _batch(5)
    opts = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2) for m in (pm, cm)]
    losses = {0: [], 1: []}
    for _ in range(5):
        for i, (m, opt) in enumerate(zip((pm, cm), opts)):
            m.train()
            loss = m(input_ids=ids, attention_mask=mask, labels=ids).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses[i].append(loss.item())
    assert losses[1] == pytest.approx(losses[0], abs=1e-4)
    assert losses[1][-1] < losses[1][0]


def test_prefix_errors():
    for bad in ({"tokens": 0}, {"projection": "yes"}, {"hidden": 0}, {"init": "ones"}):
        with pytest.raises(peftc.SpecError, match="prefix." + next(iter(bad))):
            peftc.Spec.from_dict({"methods": [{"prefix": bad}]})
    with pytest.raises(PassError, match="attention node per layer"):
        peftc.compile(tiny_model("tiny-t5"), {"methods": [{"prefix": {"tokens": 2}}]}, example_inputs("tiny-t5"))


def test_prefix_on_bert_sequence_classification(tmp_path):
    """An encoder with learned positions sliced from a buffer (and token types gathered by
    position, which must not shift): PEFT's logits, and its checkpoint round-trips."""
    base = tiny_model("tiny-bert")
    snapshot = copy.deepcopy(base.state_dict())
    pm = get_peft_model(base, PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=4)).eval()
    pm.save_pretrained(tmp_path / "peft")
    fresh = tiny_model("tiny-bert")
    fresh.load_state_dict(snapshot)
    cm = peftc.from_peft(fresh, tmp_path / "peft", example_inputs("tiny-bert"))
    assert cm.pass_counts["prefix"] == 2 and cm.pass_counts["train"] == 2  # + the classifier, as PEFT
    ids, mask = _batch(7)
    mask = torch.ones_like(ids)
    mask[0, 9:] = 0  # right padding
    with torch.no_grad():  # PEFT's forward is where transformers >= 5.24 makes it refuse
        ref = reference_or_skip(pm, input_ids=ids, attention_mask=mask).logits
        torch.testing.assert_close(cm(input_ids=ids, attention_mask=mask).logits, ref, atol=1e-4, rtol=0)
    assert set(cm.adapter_state_dict()) == set(get_peft_model_state_dict(pm))
    cm.save_adapter(tmp_path / "ours")
    again = tiny_model("tiny-bert")
    again.load_state_dict(snapshot)
    pm2 = PeftModel.from_pretrained(again, tmp_path / "ours").eval()
    with torch.no_grad():
        torch.testing.assert_close(pm2(input_ids=ids, attention_mask=mask).logits,
                                   cm(input_ids=ids, attention_mask=mask).logits, atol=1e-4, rtol=0)


def _bert_prefix_reference(bert, classifier, prefix, ids, mask):
    """BERT sequence classification with prefix tuning, written out in eager torch: per layer the
    P learned keys/values go before the tokens' (always visible), and positions start at P (as
    PEFT's past_key_values path shifts them); token types are not shifted."""
    cfg = bert.config
    b, s = ids.shape
    heads, dh = cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads
    p = prefix.shape[0]
    kv = prefix.view(p, cfg.num_hidden_layers * 2, heads, dh).permute(1, 2, 0, 3)  # (L*2, heads, P, dh)
    e = bert.embeddings
    pos = torch.arange(p, p + s)
    x = e.word_embeddings(ids) + e.position_embeddings(pos)[None] + e.token_type_embeddings(torch.zeros_like(ids))
    x = e.LayerNorm(x)
    visible = torch.cat([torch.ones(b, p), mask.float()], dim=1)[:, None, None, :]
    bias = (1.0 - visible) * torch.finfo(x.dtype).min

    def heads_of(t):
        return t.view(b, s, heads, dh).transpose(1, 2)

    for i, layer in enumerate(bert.encoder.layer):
        att = layer.attention.self
        q = heads_of(att.query(x))
        k = torch.cat([kv[2 * i].expand(b, -1, -1, -1), heads_of(att.key(x))], dim=2)
        v = torch.cat([kv[2 * i + 1].expand(b, -1, -1, -1), heads_of(att.value(x))], dim=2)
        w = torch.softmax(q @ k.transpose(-1, -2) / dh**0.5 + bias, dim=-1)
        ctx = (w @ v).transpose(1, 2).reshape(b, s, heads * dh)
        x = layer.attention.output.LayerNorm(layer.attention.output.dense(ctx) + x)
        h = torch.nn.functional.gelu(layer.intermediate.dense(x))
        x = layer.output.LayerNorm(layer.output.dense(h) + x)
    pooled = torch.tanh(bert.pooler.dense(x[:, 0]))
    return classifier(pooled)


def test_prefix_on_bert_matches_eager_reference():
    """Prefix tuning on BERT without HF PEFT: logits and the prefix's gradient against the
    hand-written reference, at a shape other than the captured one, with right padding."""
    model = tiny_model("tiny-bert").eval()
    cm = peftc.compile(model, {"task_type": "SEQ_CLS", "methods": [{"prefix": {"tokens": 4}}]},
                       example_inputs("tiny-bert"))
    assert cm.pass_counts["prefix"] == 2
    (prefix,) = [p for n, p in cm.adapters.named_parameters() if n.startswith("prompt_encoder.default")]
    with torch.no_grad():
        prefix.normal_(0, 0.5)
    classifier = cm.adapters.get_submodule("classifier.modules_to_save.default")  # trained whole, as PEFT
    with torch.no_grad():
        classifier.weight.normal_(0, 0.5)
    ids, _ = _batch(11)
    mask = torch.ones_like(ids)
    mask[0, 9:] = 0
    cm.eval()
    ours = cm(input_ids=ids, attention_mask=mask).logits
    ref = _bert_prefix_reference(model.bert, classifier, prefix, ids, mask)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    assert (model(input_ids=ids, attention_mask=mask).logits - ours).abs().max() > 1e-2  # the prefix acts
    g_ours, = torch.autograd.grad(ours.square().sum(), prefix)
    g_ref, = torch.autograd.grad(ref.square().sum(), prefix)
    torch.testing.assert_close(g_ours, g_ref, atol=1e-5, rtol=1e-4)
    assert g_ours.abs().sum() > 0
