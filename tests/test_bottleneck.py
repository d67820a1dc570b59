"""Bottleneck adapters (Houlsby, Pfeiffer, parallel) against a hand-written eager reference.

The reference runs the HF model eagerly and applies AdapterHub's published formulas with
forward hooks on the modules around each residual add (it reads the same adapter
parameters); peftc finds those adds in the graph.
"""

import pytest
import torch
import torch.nn.functional as F

import peftc
from peftc import SpecError
from peftc.capture import capture
from peftc.models import example_inputs, tiny_model
from peftc.passes.methods.bottleneck import residual_sites

ACT = {"relu": F.relu, "swish": F.silu, "gelu": F.gelu}
MODELS = {  # name -> (layer list, attention output module, FFN output module, norm before the FFN)
    "tiny-llama": (lambda m: m.model.layers, "self_attn.o_proj", "mlp", "post_attention_layernorm"),
    "tiny-gpt2": (lambda m: m.transformer.h, "attn.resid_dropout", "mlp.dropout", "ln_2"),
    "tiny-bert": (lambda m: m.bert.encoder.layer, "attention.output.dropout", "output.dropout", None),
}


def adapter_out(mod, x, entry):
    """A(x) = g(x) * s * (W_up f(W_down x + b) + b_up), written from the formula."""
    down, up = mod.adapter_down[0], mod.adapter_up
    u = F.linear(ACT[entry["activation"]](F.linear(x, down.weight, down.bias)), up.weight, up.bias)
    u = u * (mod.scaling if isinstance(entry["scaling"], str) else entry["scaling"])
    if entry["gate"]:
        u = u * torch.sigmoid(F.linear(x, mod.gate.weight, mod.gate.bias)).mean(1, keepdim=True)
    return u


def hooked_reference(model, name, cm, entry):
    """Registers hooks making ``model`` compute the adapted forward; returns the handles."""
    layers, attn_out, ffn_out, pre_ffn_norm = MODELS[name]
    hooks = []
    for layer in layers(model):
        path = next(p for p, m in model.named_modules() if m is layer)
        mods = {loc: cm.adapters.get_submodule(f"{path}.bottleneck.default.{loc}")
                for loc in ("mh_adapter", "output_adapter") if _has(cm, f"{path}.bottleneck.default.{loc}")}
        seen = {}
        if entry["placement"] == "houlsby":  # h -> A(h) + h before the block's own residual add
            for loc, where in (("mh_adapter", attn_out), ("output_adapter", ffn_out)):
                hooks.append(layer.get_submodule(where).register_forward_hook(
                    lambda m, a, h, mod=mods[loc]: _first(h, lambda t: adapter_out(mod, t, entry) + t)))
        elif entry["placement"] == "parallel":  # h -> A(r) + h, r = residual entering the FFN
            if pre_ffn_norm:
                hooks.append(layer.get_submodule(pre_ffn_norm).register_forward_pre_hook(
                    lambda m, a, seen=seen: seen.__setitem__("r", a[0])))
            else:  # BERT: BertOutput(intermediate, input_tensor)
                hooks.append(layer.output.register_forward_pre_hook(lambda m, a, seen=seen: seen.__setitem__("r", a[1])))
            mod = mods["output_adapter"]
            hooks.append(layer.get_submodule(ffn_out).register_forward_hook(
                lambda m, a, h, mod=mod, seen=seen: _first(h, lambda t: adapter_out(mod, seen["r"], entry) + t)))
        elif name == "tiny-bert":  # pfeiffer, post-LN: LN((A(x) + h) + r), x = LN(h + r)
            ln, mod = layer.output.LayerNorm, mods["output_adapter"]
            hooks.append(ln.register_forward_hook(lambda m, a, x, mod=mod: F.layer_norm(
                adapter_out(mod, x, entry) + a[0], m.normalized_shape, m.weight, m.bias, m.eps)))
        else:  # pfeiffer, pre-LN: y + A(y), y = the layer's output stream h + r
            mod = mods["output_adapter"]
            hooks.append(layer.register_forward_hook(
                lambda m, a, y, mod=mod: _first(y, lambda t: adapter_out(mod, t, entry) + t)))
    return hooks


def _has(cm, path):
    try:
        cm.adapters.get_submodule(path)
        return True
    except AttributeError:
        return False


def _first(out, fn):
    return (fn(out[0]), *out[1:]) if isinstance(out, tuple) else fn(out)


def randomize(cm, seed=1, scale=0.2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for k, p in cm.adapters.named_parameters():
            if ".bottleneck." in k:
                p.copy_(p + torch.randn(p.shape, generator=g) * scale)


def compiled(name, **fields):
    model = tiny_model(name).eval()
    cm = peftc.compile(model, {"methods": [{"bottleneck": fields}]}, example_inputs(name)).eval()
    entry = cm.spec.of("bottleneck")[0].to_dict()
    return model, cm, entry


CASES = [(n, p) for n in MODELS for p in ("houlsby", "pfeiffer", "parallel")]


@pytest.mark.parametrize("name, placement", CASES)
def test_matches_eager_reference(name, placement):
    model, cm, entry = compiled(name, placement=placement)
    assert cm.pass_counts["bottleneck"] == 2 * (2 if placement == "houlsby" else 1)  # per layer and sublayer
    ex = example_inputs(name, 3, 11, seed=5)
    with torch.no_grad():
        base = model(**ex).logits
        at_init = cm(**ex).logits
        if placement == "parallel":  # zero up projection: exactly the base model
            assert torch.equal(at_init, base)
        else:  # "bert" init, weights ~ N(0, 0.02): near identity
            assert (at_init - base).norm() / base.norm() < 0.02
        randomize(cm)
        ours = cm(**ex).logits
        hooks = hooked_reference(model, name, cm, entry)
        try:
            ref = model(**ex).logits
        finally:
            for h in hooks:
                h.remove()
    assert (ours - base).abs().max() > 1e-2  # the adapters matter
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def test_options_gate_and_gradients():
    """Non-default activation, channel scaling and UniPELT's gate; every parameter trains."""
    name = "tiny-llama"
    model, cm, entry = compiled(name, placement="houlsby", activation="gelu", scaling="channel",
                                gate=True, reduction=8)
    assert cm.adapters.get_submodule("model.layers.1.bottleneck.default.mh_adapter.adapter_down.0").out_features == 8
    randomize(cm, seed=2)
    ex = example_inputs(name, 2, 9, seed=6)
    out = cm(**ex).logits
    hooks = hooked_reference(model, name, cm, entry)
    with torch.no_grad():
        ref = model(**ex).logits
    for h in hooks:
        h.remove()
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    out.pow(2).mean().backward()
    params = dict(cm.adapters.named_parameters())
    assert sum(k.endswith("gate.weight") for k in params) == 4 and sum(k.endswith("scaling") for k in params) == 4
    for k, p in params.items():
        assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, k
    assert all(not p.requires_grad for p in model.parameters())


def test_gradients_reach_every_adapter_parameter():
    for name in ("tiny-gpt2", "tiny-bert"):
        model, cm, _ = compiled(name, placement="parallel", scaling="learned", dropout=0.1)
        randomize(cm, seed=3)
        cm.train()
        ex = example_inputs(name, 2, 6, seed=7)
        cm(**ex).logits.pow(2).mean().backward()
        params = dict(cm.adapters.named_parameters())
        assert any(".bottleneck." in k for k in params)
        for k, p in params.items():
            assert p.grad is not None and p.grad.abs().sum() > 0, k
        drops = [n for n in cm.graph_module.graph.nodes
                 if n.meta.get("peftc", {}).get("method") == "bottleneck" and n.meta["peftc"]["role"] == "dropout"]
        assert len(drops) == 2 and all(n.args[2] is True for n in drops)


@pytest.mark.parametrize("name, post_ln", [("tiny-llama", False), ("tiny-gpt2", False), ("tiny-bert", True)])
def test_residual_sites_found_in_graph(name, post_ln):
    ex = example_inputs(name)
    gm, _ = capture(tiny_model(name), {**ex, **({} if name == "tiny-bert" else {"use_cache": False})})
    sites = residual_sites(gm)
    layers, *_ = MODELS[name]
    model = tiny_model(name)
    paths = [next(p for p, m in model.named_modules() if m is layer) for layer in layers(model)]
    assert [(s.layer, s.location) for s in sites] == [(p, loc) for p in paths for loc in ("mh_adapter", "output_adapter")]
    assert all((s.ln is not None) == post_ln for s in sites)
    for s in sites:  # h comes through the sublayer, r is the stream around it
        assert s.add.args in ((s.h, s.r), (s.r, s.h))


def test_leave_out_and_plain_module():
    model, cm, _ = compiled("tiny-llama", placement="houlsby", leave_out=[0])
    assert cm.pass_counts["bottleneck"] == 2
    assert not any(k.startswith("model.layers.0.") for k, _ in cm.adapters.named_parameters())
    torch.manual_seed(0)
    plain = tiny_model("tiny-torch").eval()  # a hand-written block, traced with torch.fx
    cm = peftc.compile(plain, {"methods": [{"bottleneck": {"placement": "pfeiffer"}}]}, example_inputs("tiny-torch"))
    assert cm.pass_counts["bottleneck"] == 2
    randomize(cm.eval())
    x = torch.randn(3, 5, 64)
    y = x
    for i, blk in enumerate(plain.layers):
        mod = cm.adapters.get_submodule(f"layers.{i}.bottleneck.default.output_adapter")
        y = blk(y)
        y = y + adapter_out(mod, y, {"activation": "relu", "scaling": 1.0, "gate": False})
    with torch.no_grad():
        torch.testing.assert_close(cm(x=x), plain.head(plain.norm(y)), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("field, value", [
    ("placement", "serial"), ("reduction", 0), ("activation", "softplus"), ("scaling", "big"),
    ("init", "xavier"), ("dropout", 1.0), ("gate", "yes"), ("leave_out", [-1]),
])
def test_bad_field_names_it(field, value):
    with pytest.raises(SpecError) as e:
        peftc.Spec.from_dict({"methods": [{"bottleneck": {field: value}}]})
    assert e.value.field == f"bottleneck.{field}"


def test_defaults_are_adapterhubs():
    spec = peftc.Spec.from_dict({"methods": [{"bottleneck": {"placement": p}} for p in ("houlsby", "pfeiffer")]
                                 + [{"bottleneck": {"placement": "parallel"}}]})
    got = [(m.reduction, m.activation, m.scaling, m.init, m.locations) for m in spec.methods]
    assert got == [(16, "swish", 1.0, "bert", ("mh_adapter", "output_adapter")),
                   (16, "relu", 1.0, "bert", ("output_adapter",)),
                   (2, "relu", 4.0, "mam_adapter", ("output_adapter",))]


@pytest.mark.parametrize("init", ["bert", "mam_adapter", "houlsby"])
def test_inits(init):
    _, cm, _ = compiled("tiny-gpt2", placement="pfeiffer", init=init)
    mod = cm.adapters.get_submodule("transformer.h.1.bottleneck.default.output_adapter")
    down, up = mod.adapter_down[0], mod.adapter_up
    assert not down.bias.any() and not up.bias.any()
    if init == "bert":
        assert 0.01 < down.weight.std() < 0.03 and 0.01 < up.weight.std() < 0.03
    elif init == "mam_adapter":  # kaiming-uniform down, zero up
        assert not up.weight.any() and down.weight.abs().max() <= 1 / 64 ** 0.5
    else:  # truncated normal(0, 1e-2) in [-2e-2, 2e-2]
        assert up.weight.abs().max() <= 0.02 and down.weight.abs().max() <= 0.02 and up.weight.any()
