"""Capture frontends, the pass pipeline's invariants, call signatures and train/eval."""

import copy

import pytest
import torch

import peftc
from peftc.capture import DROPOUT_OPS, SDPA
from peftc.errors import PassError
from peftc.models import example_inputs, tiny_model
from peftc.passes import PassContext, PassResult, run_pipeline

SPEC = {"methods": [{"lora": {"targets": ["q_proj", "v_proj"], "r": 4, "dropout": 0.1}}]}


def inserted(gm):
    return [n for n in gm.graph.nodes if "peftc" in n.meta]


def test_export_frontend_inserts_ordered_tagged_nodes():
    model = tiny_model("tiny-llama")
    modules_before = [n for n, _ in model.named_modules()]
    cm = peftc.compile(model, SPEC, example_inputs("tiny-llama"))
    assert cm.frontend_used == "export"
    assert cm.pass_counts["lora"] == 4  # 2 layers x (q, v)
    site = "model.layers.0.self_attn.q_proj"
    roles = [n.meta["peftc"]["role"] for n in inserted(cm.graph_module) if n.meta["peftc"]["module"] == site]
    assert roles == ["param", "param", "dropout", "lora_A", "lora_B", "scale", "add"]
    for n in inserted(cm.graph_module):
        info = n.meta["peftc"]
        assert info["method"] == "lora" and info["adapter"] == "default"
        assert list(n.meta["nn_module_stack"].values())[-1][0] == info["module"]
    # the user's module tree is untouched; only requires_grad flags changed
    assert [n for n, _ in model.named_modules()] == modules_before
    assert not any(p.requires_grad for p in model.parameters())
    assert all(".lora.default." in n for n, p in cm.named_parameters() if p.requires_grad)


def test_fx_frontend_for_plain_modules():
    model = tiny_model("tiny-torch")
    cm = peftc.compile(model, {"methods": [{"lora": {"targets": ["qkv", "fc2"], "r": 2}}]},
                       example_inputs("tiny-torch"))
    assert cm.frontend_used == "fx" and cm.pass_counts["lora"] == 4
    ops = [n.target for n in cm.graph_module.graph.nodes if n.op == "call_function"]
    assert torch.ops.aten.linear.default in ops and torch.ops.aten.dropout.default in ops
    assert not [n for n in cm.graph_module.graph.nodes
                if n.op == "call_module" and isinstance(cm.graph_module.get_submodule(n.target), torch.nn.Linear)]


def test_signatures_share_adapter_parameters():
    cm = peftc.compile(tiny_model("tiny-llama"), SPEC, example_inputs("tiny-llama"))
    ids = torch.randint(0, 128, (3, 5))
    out = cm(input_ids=ids, labels=ids)
    assert out.loss is not None and out.logits.shape == (3, 5, 128)
    cm(input_ids=ids[:1, :1])  # size-1 dims: a rewritten graph of its own, the same capture
    assert len(cm._graphs) == 2 and cm.capture_stats.captures == 1  # labels: loss outside the graph
    targets = {n.target for gm in cm._graphs.values() for n in inserted(gm) if n.op == "get_attr"}
    for t in targets:
        params = {id(gm.get_parameter(t)) for gm in cm._graphs.values()}
        assert params == {id(cm.adapters.get_parameter(t))}
    assert cm(ids).logits.shape == (3, 5, 128)  # positional input_ids


def _dropout_state(gm):
    return ([n.args[2] for n in gm.graph.nodes if n.target in DROPOUT_OPS],
            [n.args[4] if len(n.args) > 4 else n.kwargs.get("dropout_p", 0.0)
             for n in gm.graph.nodes if n.target is SDPA])


def test_train_eval_switch_base_and_adapter_dropout():
    model = tiny_model("tiny-gpt2")  # dropout in its blocks and in attention (0.1)
    model.eval()
    cm = peftc.compile(model, {"methods": [{"lora": {"targets": ["c_attn"], "r": 2, "dropout": 0.2}}]},
                       example_inputs("tiny-gpt2"))
    assert not cm.training
    flags, ps = _dropout_state(cm.graph_module)
    assert flags and not any(flags) and ps == [0.0, 0.0]
    cm.train()
    flags, ps = _dropout_state(cm.graph_module)
    assert all(flags) and ps == [0.1, 0.1]
    lora_drop = [n for n in inserted(cm.graph_module) if n.meta["peftc"]["role"] == "dropout"]
    assert [n.args[1] for n in lora_drop] == [0.2, 0.2]
    ids = example_inputs("tiny-gpt2", 3, 9, seed=2)["input_ids"]
    a, b = cm(input_ids=ids).logits, cm(input_ids=ids).logits
    assert not torch.allclose(a, b)
    cm.eval()
    assert torch.equal(cm(input_ids=ids).logits, cm(input_ids=ids).logits)
    model.eval()
    with torch.no_grad():
        assert torch.allclose(cm(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-5)  # B = 0


def test_pipeline_names_failing_pass():
    cm = peftc.compile(tiny_model("tiny-llama"), SPEC, example_inputs("tiny-llama"))

    def ok(gm, ctx):
        return PassResult(gm, False)

    def broken(gm, ctx):
        raise RuntimeError("kaboom")

    ctx = PassContext(spec=cm.spec, targets=cm.targets, model=cm.get_base_model(), store=cm.adapters)
    with pytest.raises(PassError, match=r"pass 'broken' failed after \['ok'\]: kaboom"):
        run_pipeline(cm.graph_module, ctx, [("ok", ok), ("broken", broken)])

    def dangling(gm, ctx):
        node = next(n for n in gm.graph.nodes if n.op == "get_attr")
        node.target = "no.such.weight"
        return PassResult(gm, True)

    with pytest.raises(PassError, match="nonexistent attribute"):
        run_pipeline(cm.graph_module, ctx, [("dangling", dangling)])


def test_debug_env_prints_graphs(monkeypatch, capsys):
    monkeypatch.setenv("PEFTC_DEBUG", "1")
    peftc.compile(tiny_model("tiny-torch"), {"methods": [{"lora": {"targets": ["fc1"]}}]},
                  example_inputs("tiny-torch"))
    out = capsys.readouterr().out
    assert "--- before lora ---" in out and "--- after lora ---" in out


def test_pass_timings_recorded():
    cm = peftc.compile(tiny_model("tiny-llama"), SPEC, example_inputs("tiny-llama"))
    assert set(cm.pass_timings) == {"select", "lora", "dce"}
    assert all(t >= 0 for t in cm.pass_timings.values())


def test_t5_encoder_decoder():
    model = tiny_model("tiny-t5")
    cm = peftc.compile(model, {"methods": [{"lora": {"targets": ["q", "v"], "r": 2}}]}, example_inputs("tiny-t5"))
    assert cm.pass_counts["lora"] == 2 * 2 + 2 * 4  # encoder: self-attn; decoder: self + cross
    ex = example_inputs("tiny-t5", 3, 10, seed=3)
    out = cm(**ex, labels=ex["decoder_input_ids"])
    out.loss.backward()
    assert all(p.grad is not None for p in cm.trainable_parameters())


def test_dtype_change_recaptures_and_matches_eager():
    """``cm.double()`` (or ``.to(device)``): graphs that baked the old dtype/device are dropped
    and re-captured on the next call."""
    model = tiny_model("tiny-llama")
    cm = peftc.compile(model, {"methods": [{"lora": {"targets": ["q_proj"], "init": "random"}}]},
                       example_inputs("tiny-llama")).eval()
    ids = example_inputs("tiny-llama", 3, 5, seed=2)["input_ids"]
    cm(input_ids=ids)
    cm.double()
    out = cm(input_ids=ids).logits
    assert out.dtype == torch.float64
    ref = copy.deepcopy(cm.get_base_model())  # eager float64 reference with the same LoRA folded in by hand
    with torch.no_grad():
        for i, layer in enumerate(ref.model.layers):
            lo = cm.adapters.get_submodule(f"model.layers.{i}.self_attn.q_proj.lora.default")
            layer.self_attn.q_proj.weight += lo.lora_B.weight @ lo.lora_A.weight
        torch.testing.assert_close(out, ref.eval()(input_ids=ids).logits, atol=1e-10, rtol=1e-10)
