"""MAM adapter and UniPELT: spec expansion, and the compiled graph against a hand-written eager
reference (HF model + the prefix fed as a key/value cache + forward hooks for the gates,
LoRA and the bottleneck adapters, each written from its published formula)."""

import pytest
import torch
import torch.nn.functional as F
from transformers import DynamicCache

import peftc
from peftc import SpecError
from peftc.models import example_inputs, tiny_model
from peftc.passes.methods.bottleneck import BottleneckSpec
from peftc.passes.methods.lora import LoraSpec
from peftc.passes.methods.prefix import PrefixSpec

PARTS = {  # name -> (layers, attention module, q/v LoRA targets, norm before the FFN, FFN output)
    "tiny-llama": (lambda m: m.model.layers, "self_attn", ("self_attn.q_proj", "self_attn.v_proj"),
                   "post_attention_layernorm", "mlp"),
    "tiny-gpt2": (lambda m: m.transformer.h, "attn", ("attn.c_attn",), "ln_2", "mlp.dropout"),
}


def gate(lin, x):
    """mean over the sequence of sigmoid(x W^T + b): one value per sample, (B, 1)."""
    return torch.sigmoid(F.linear(x, lin.weight, lin.bias)).mean(1)


def bottleneck(mod, x, scaling, gated):
    down, up = mod.adapter_down[0], mod.adapter_up
    u = F.linear(F.relu(F.linear(x, down.weight, down.bias)), up.weight, up.bias) * scaling
    return u * gate(mod.gate, x)[:, :, None] if gated else u


def reference(model, name, cm, method, x_ids, adapters=True):
    """Logits of ``model`` adapted by hand as ``method`` (mam / unipelt) prescribes."""
    layers, attn, lora_at, pre_ffn, ffn_out = PARTS[name]
    enc = cm.adapters.get_submodule("prompt_encoder.default")
    e = enc.embedding.weight  # prefix MLP reparameterisation: E -> W2 tanh(W1 E + b1) + b2
    kv = F.linear(torch.tanh(F.linear(e, enc.transform[0].weight, enc.transform[0].bias)),
                  enc.transform[2].weight, enc.transform[2].bias)
    n, p = len(layers(model)), e.shape[0]
    heads = model.config.num_key_value_heads if name == "tiny-llama" else model.config.n_head
    kv = kv.view(p, 2 * n, heads, -1).permute(1, 2, 0, 3)  # (2L, heads, P, head_dim)
    b = x_ids.shape[0]
    cache = DynamicCache(config=model.config)
    for i in range(n):
        cache.update(kv[2 * i].expand(b, -1, -1, -1), kv[2 * i + 1].expand(b, -1, -1, -1), i)
    hooks, gated = [], method == "unipelt"
    for i, layer in enumerate(layers(model)):
        path = next(q for q, m in model.named_modules() if m is layer)
        if gated:  # prefix gate from the attention input: E_k, E_v -> g E_k, g E_v
            def pre_attn(m, args, kwargs, i=i):
                g = gate(enc.gates[i], kwargs.get("hidden_states", args[0] if args else None)).view(b, 1, 1, 1)
                cache.layers[i].keys, cache.layers[i].values = kv[2 * i] * g, kv[2 * i + 1] * g
            hooks.append(layer.get_submodule(attn).register_forward_pre_hook(pre_attn, with_kwargs=True))
            for t in lora_at:  # gated LoRA: W x + g(x) B A x (the gate replaces alpha / r)
                lo = cm.adapters.get_submodule(f"{path}.{t}.lora.default")
                hooks.append(layer.get_submodule(t).register_forward_hook(
                    lambda m, a, y, lo=lo: y + gate(lo.gate, a[0])[:, :, None]
                    * F.linear(F.linear(a[0], lo.lora_A.weight), lo.lora_B.weight)))
        if not adapters:
            continue
        mod = cm.adapters.get_submodule(f"{path}.bottleneck.default.output_adapter")
        if gated:  # Pfeiffer, pre-LN: y -> y + A(y) on the layer's output stream
            hooks.append(layer.register_forward_hook(lambda m, a, y, mod=mod: _first(
                y, lambda s: s + bottleneck(mod, s, 1.0, True))))
        else:  # parallel FFN adapter: h -> h + 4 A(r), r = the stream entering the FFN block
            seen = {}
            hooks.append(layer.get_submodule(pre_ffn).register_forward_pre_hook(
                lambda m, a, seen=seen: seen.__setitem__("r", a[0])))
            hooks.append(layer.get_submodule(ffn_out).register_forward_hook(
                lambda m, a, h, mod=mod, seen=seen: h + bottleneck(mod, seen["r"], 4.0, False)))
    try:
        return model(input_ids=x_ids, past_key_values=cache, use_cache=True).logits
    finally:
        for h in hooks:
            h.remove()


def _first(out, fn):
    return (fn(out[0]), *out[1:]) if isinstance(out, tuple) else fn(out)


def randomize(cm, seed=1, scale=0.2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in cm.adapters.named_parameters():
            p.copy_(p + torch.randn(p.shape, generator=g) * scale)


@pytest.mark.parametrize("name", list(PARTS))
@pytest.mark.parametrize("method", ["mam", "unipelt"])
def test_matches_eager_reference(name, method):
    model = tiny_model(name).eval()
    cm = peftc.compile(model, {"methods": [{method: {"prefix_tokens": 6}}]}, example_inputs(name)).eval()
    lora = 0 if method == "mam" else 2 * len(PARTS[name][2])
    assert cm.pass_counts == {"select": lora, **({"lora": lora} if lora else {}), "prefix": 2, "bottleneck": 2,
                              "dce": cm.pass_counts["dce"]}
    x = example_inputs(name, 3, 10, seed=4)["input_ids"]
    with torch.no_grad():
        if method == "mam":  # zero up projection: at init only the prefix acts
            torch.testing.assert_close(cm(input_ids=x).logits, reference(model, name, cm, method, x, adapters=False),
                                       atol=1e-5, rtol=1e-5)
        randomize(cm)
        torch.testing.assert_close(cm(input_ids=x).logits, reference(model, name, cm, method, x), atol=1e-5, rtol=1e-5)


def test_unipelt_gates_get_gradients():
    name = "tiny-llama"
    cm = peftc.compile(tiny_model(name), {"methods": [{"unipelt": {"prefix_tokens": 4}}]}, example_inputs(name))
    randomize(cm, seed=2)
    x = example_inputs(name, 2, 7, seed=3)["input_ids"]
    cm(input_ids=x, labels=x).loss.backward()
    params = dict(cm.adapters.named_parameters())
    gates = [k for k in params if "gate" in k]
    assert len(gates) == 2 * (2 + 1 + 1) * 2  # per layer: q, v LoRA, prefix, adapter gates; weight + bias
    for k, p in params.items():
        assert p.grad is not None and p.grad.abs().sum() > 0, k
    roles = [n.meta["peftc"]["role"] for n in cm.graph_module.graph.nodes if "peftc" in n.meta]
    assert roles.count("gate_sigmoid") == 2 * 4 and "scale" not in roles  # gated LoRA has no alpha / r


def test_expansion_uses_adapterhub_defaults():
    mam = peftc.Spec.from_dict({"methods": [{"mam": {}}]}).methods
    assert mam == (PrefixSpec(tokens=30, projection=True, hidden=800),
                   BottleneckSpec(placement="parallel", reduction=2, activation="relu", scaling=4.0,
                                  init="mam_adapter"))
    uni = peftc.Spec.from_dict({"methods": [{"unipelt": {}}]})
    lora, prefix, adapter = uni.methods
    assert isinstance(lora, LoraSpec) and (lora.r, lora.alpha, lora.gate) == (8, 2, True)
    assert prefix == PrefixSpec(tokens=10, projection=True, hidden=512, gate=True)
    assert adapter == BottleneckSpec(placement="pfeiffer", reduction=16, gate=True)
    assert peftc.Spec.from_dict(uni.to_dict()) == uni  # the expanded entries round-trip


@pytest.mark.parametrize("method, field, value", [
    ("mam", "reduction", -1), ("mam", "scaling", "big"), ("mam", "prefix_tokens", 0),
    ("unipelt", "lora_r", 0), ("unipelt", "lora_alpha", 0), ("unipelt", "lora_targets", []),
    ("unipelt", "prefix_hidden", 1.5),
])
def test_bad_field_names_it(method, field, value):
    with pytest.raises(SpecError) as e:
        peftc.Spec.from_dict({"methods": [{method: {field: value}}]})
    assert e.value.field == f"{method}.{field}"
