"""Capture once: calls with and without labels, a last batch of 1 and a decode step share one
capture (loss outside the graph, size-1 dims reusing the capture), each reuse checked against
eager; deep models trace three layers and repeat the third (graph size linear in layers)."""

import copy

import pytest
import torch
import transformers as tf
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
from torch import nn

import peftc
from peftc.capture import capture
from peftc.models import example_inputs, tiny_model
from peftc.repeat_layers import REPEATED


def lora_pair(name: str, lora: dict, **overrides):
    """HF PEFT and peftc LoRA on the same base weights; PEFT's B made non-zero and copied."""
    base = tiny_model(name, **overrides)
    snapshot = copy.deepcopy(base.state_dict())
    pm = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, **lora))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    fresh = tiny_model(name, **overrides)
    fresh.load_state_dict(snapshot)
    cm = peftc.compile(fresh, peftc.Spec.from_peft(pm.peft_config["default"]), example_inputs(name, 2, 7))
    cm.load_adapter_state_dict(get_peft_model_state_dict(pm))
    return pm.eval(), cm.eval()


def test_training_loop_with_and_without_labels_and_a_last_batch_of_one_captures_once():
    pm, cm = lora_pair("tiny-llama", {"target_modules": "all-linear"})
    steps = [(4, 9, True), (4, 9, False), (3, 6, True), (1, 6, True), (1, 1, False), (3, 1, False)]
    for i, (batch, seq, labels) in enumerate(steps):
        ids = torch.randint(0, 128, (batch, seq), generator=torch.Generator().manual_seed(i))
        kw = {"input_ids": ids, "labels": ids} if labels else {"input_ids": ids}
        out, ref = cm(**kw), pm(**kw)
        torch.testing.assert_close(out.logits, ref.logits, atol=1e-5, rtol=1e-5)
        if labels:
            torch.testing.assert_close(out.loss, ref.loss, atol=1e-6, rtol=1e-6)
            out.loss.backward()  # the outside loss backpropagates into the adapter
    stats = cm.capture_stats
    assert stats.captures == 1 and stats.loss_outside is True
    assert stats.reused == 3  # (1, n), (1, 1), (n, 1): each checked once against eager
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in cm.trainable_parameters())
    assert "capture: 1 graph(s)" in cm.graph_summary()


def test_outside_loss_gradients_equal_peft():
    pm, cm = lora_pair("tiny-gpt2", {"target_modules": ["c_attn", "c_fc"], "fan_in_fan_out": True},
                       resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    ids = torch.randint(0, 128, (3, 5), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[:, :2] = -100  # ignored positions
    cm(input_ids=ids, labels=labels).loss.backward()
    pm(input_ids=ids, labels=labels).loss.backward()
    ours = {k: p.grad for k, p in cm._peft_params().items()}
    theirs = {k: p.grad for k, p in pm.named_parameters() if p.requires_grad}
    for k, g in ours.items():
        ref = theirs[k.replace(".weight", ".default.weight")]
        torch.testing.assert_close(g, ref, atol=1e-6, rtol=1e-5)
    assert cm.capture_stats.captures == 1 and cm.capture_stats.loss_outside


def test_an_outside_loss_that_differs_from_eager_is_refused(monkeypatch):
    wrong = lambda m, logits, kw: 2 * m.loss_function(logits=logits, vocab_size=m.config.vocab_size, **kw)
    monkeypatch.setitem(peftc.capture._LOSS_CALLS, "ForCausalLM", wrong)
    model = tiny_model("tiny-llama")
    ids = torch.randint(0, 128, (2, 8))
    cm = peftc.compile(model, {"methods": [{"lora": {"targets": ["q_proj"], "r": 2}}]}, {"input_ids": ids})
    out = cm.eval()(input_ids=ids, labels=ids)
    with torch.no_grad():
        torch.testing.assert_close(out.loss, model.eval()(input_ids=ids, labels=ids).loss)  # B = 0
    assert cm.capture_stats.loss_outside is False and cm.capture_stats.captures == 2
    assert "loss inside the graph" in cm.graph_summary()


class BranchesOnOne(nn.Module):
    """A model whose batch-1 path differs: a reuse of its batch-n capture must be refused."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 8)

    def forward(self, x):
        y = self.proj(x)
        return y * 2 if x.shape[0] == 1 else y


def test_size_one_reuse_is_refused_where_the_model_branches_on_one():
    model = BranchesOnOne()
    cm = peftc.compile(model, {"methods": [{"lora": {"targets": ["proj"], "r": 2}}]},
                       {"x": torch.randn(3, 8)}, frontend="export")
    x = torch.randn(1, 8)
    with torch.no_grad():
        torch.testing.assert_close(cm(x=x), model(x=x))  # B = 0: the adapter adds nothing
    stats = cm.capture_stats
    assert stats.captures == 2 and stats.reused == 0
    assert any("need their own capture" in line for line in stats.log)


def _llama(layers: int, device="cpu") -> nn.Module:
    cfg = tf.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    with torch.device(device):
        return tf.LlamaForCausalLM(cfg)


def _ops(gm):
    return [(n.op, str(n.target), list(n.meta.get("nn_module_stack", {}).values())[-1:])
            for n in gm.graph.nodes if n.op != "get_attr"]


def test_repeated_layers_equal_the_whole_capture():
    model = _llama(6).eval()
    kw = {"input_ids": torch.randint(0, 64, (2, 7)), "use_cache": False}
    repeated, _ = capture(model, kw)
    whole, _ = capture(model, kw, repeat_layers=False)
    assert repeated.meta[REPEATED] == ("model.layers", 6) and REPEATED not in whole.meta
    assert _ops(repeated) == _ops(whole)  # node for node: ops, order, owning modules
    attrs = sorted(n.target for n in repeated.graph.nodes if n.op == "get_attr")
    assert attrs == sorted(n.target for n in whole.graph.nodes if n.op == "get_attr")
    assert repeated.get_parameter("model.layers.5.mlp.down_proj.weight") is model.model.layers[5].mlp.down_proj.weight
    from peftc.capture import set_training
    set_training(repeated, False)
    x = {"input_ids": torch.randint(0, 64, (3, 5)), "use_cache": False}
    with torch.no_grad():
        torch.testing.assert_close(repeated(**x).logits, model(**x).logits, atol=0, rtol=0)


def test_capture_grows_linearly_in_layers_on_meta():
    sizes = {}
    for layers in (6, 7, 9):
        cm = peftc.compile(_llama(layers, "meta"), {"methods": [{"lora": {"targets": ["q_proj", "down_proj"], "r": 4}}]},
                           {"input_ids": torch.zeros((2, 8), dtype=torch.long, device="meta")})
        assert REPEATED in cm.graphs.captured[cm.graphs.example_key[0]].meta
        assert cm.pass_counts["lora"] == 2 * layers
        sizes[layers] = (len(cm.captured_graph.nodes), len(cm.graph_module.graph.nodes))
    for i in range(2):  # nodes = a + b * layers, captured and rewritten
        assert sizes[9][i] - sizes[7][i] == 2 * (sizes[7][i] - sizes[6][i]) > 0


@pytest.mark.parametrize("reason", ["hook", "shape"])
def test_layers_that_differ_are_captured_whole(reason):
    model = _llama(6)
    if reason == "hook":
        model.model.layers[4].register_forward_hook(lambda m, a, o: o)
    else:
        model.model.layers[4].mlp.up_proj = nn.Linear(32, 64, bias=True)
    gm, _ = capture(model, {"input_ids": torch.randint(0, 64, (2, 5)), "use_cache": False})
    assert REPEATED not in gm.meta
    assert any(n.target == "model.layers.4.mlp.up_proj.weight" for n in gm.graph.nodes if n.op == "get_attr")


def test_step_graph_repeats_layers_with_each_layer_its_own_cache():
    """A generate step graph reads and writes one KV cache input per layer: layer k of the
    repeated graph must write key_k / value_k, as the whole capture does."""
    from peftc.capture import set_training
    from peftc.generation import _KVCache, _Step
    from peftc.model_family import kv_geometry

    model = _llama(7).eval()
    step = _Step(model)
    cache = _KVCache(12)
    cache.allocate(2, kv_geometry(model), model.lm_head.weight)
    for t in (*cache.keys, *cache.values):
        t.normal_()
    kw = {"input_ids": torch.randint(0, 64, (2, 5)), "attention_mask": torch.ones(2, 5, dtype=torch.long),
          "start": torch.zeros(2, 1, dtype=torch.long), "past": torch.tensor(0), **cache.inputs()}
    repeated, _ = capture(step, kw)
    whole, _ = capture(step, kw, repeat_layers=False)
    assert repeated.meta[REPEATED] == ("model.layers", 7)
    sizes = ("aten.sym_size.int", "_guards_fn")  # shape reads of other cache inputs: where export put them
    assert [o for o in _ops(repeated) if o[1] not in sizes] == [o for o in _ops(whole) if o[1] not in sizes]

    def writes(gm):  # (layer of the writing node, cache input written), in graph order
        return [(list(n.meta["nn_module_stack"].values())[-1][0], n.args[0].target) for n in gm.graph.nodes
                if n.op == "call_function" and "index_copy_" in str(n.target)]
    assert writes(repeated) == writes(whole)
    assert ("model.layers.6.self_attn", "value_6") in writes(repeated)
    outs = []
    for gm in (repeated, whole):
        set_training(gm, False)
        copy = {k: v.clone() for k, v in kw.items()}
        with torch.no_grad():
            outs.append((gm(**copy), copy))
    torch.testing.assert_close(outs[0][0], outs[1][0], atol=0, rtol=0)
    for k in kw:
        torch.testing.assert_close(outs[0][1][k], outs[1][1][k], atol=0, rtol=0)
