"""Every linear form is a site: capture normalizes ``x @ W.T``, einsum, mm/addmm/bmm linears
into ``aten.linear`` (peftc/normalize.py), checked against the graph as exported and against
eager; Falcon (``FalconLinear``: ``x @ W.T + b``) and an einsum nn.Linear subclass get their
adapters, with HF PEFT's logits and trainable count."""

import copy

import pytest
import torch
import transformers as tf
from peft import IA3Config, LoraConfig, get_peft_model
from torch import nn

import peftc
from peftc.capture import capture
from peftc.graph import linear_sites
from peftc.normalize import NORMALIZED, normalize_linears

aten = torch.ops.aten
LEFTOVER = {aten.matmul.default, aten.mm.default, aten.bmm.default, aten.einsum.default, aten.numpy_T.default,
            aten.t.default}


class EinLinear(nn.Linear):
    """A Linear subclass computing its output with einsum (PEFT wraps it as an nn.Linear)."""

    def forward(self, x):
        return torch.einsum("...i,oi->...o", x, self.weight) + self.bias


class Forms(nn.Module):
    """One layer per linear form; every weight stored (out, in) like nn.Linear's."""

    def __init__(self, d=8):
        super().__init__()
        self.a, self.b, self.c, self.d, self.e, self.f = (EinLinear(d, d) for _ in range(6))

    def forward(self, x):
        h = x @ self.a.weight.T + self.a.bias  # numpy_T + matmul (+ bias)
        h = torch.relu(torch.matmul(h, self.b.weight.t()))  # t + matmul
        h = torch.mm(h.reshape(-1, h.shape[-1]), self.c.weight.t()).reshape(h.shape)  # mm
        h = torch.addmm(self.d.bias, h.reshape(-1, h.shape[-1]), self.d.weight.t()).reshape(h.shape)  # addmm
        h = torch.bmm(h, self.e.weight.t().expand(h.shape[0], -1, -1))  # bmm
        return self.f(h)  # einsum + bias


def _randomize(params, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)


@pytest.mark.parametrize("frontend", ["export", "fx"])
def test_every_form_becomes_a_linear_site(frontend):
    torch.manual_seed(0)
    model = Forms().eval()
    gm, used = capture(model, {"x": torch.randn(2, 5, 8)}, frontend=frontend)
    assert used == frontend
    sites = linear_sites(gm)
    assert sorted(s.module for s in sites) == list("abcdef")
    assert sum(gm.meta[NORMALIZED].values()) == 6
    assert not [n for n in gm.graph.nodes if n.target in LEFTOVER]
    x = torch.randn(3, 4, 8)  # another shape than the captured one
    with torch.no_grad():
        torch.testing.assert_close(gm(x=x) if frontend == "export" else gm(x), model(x), atol=1e-6, rtol=1e-6)


def test_normalized_graph_equals_the_exported_one():
    torch.manual_seed(1)
    model = Forms()
    ep = torch.export.export(model, (), kwargs={"x": torch.randn(2, 5, 8)}, strict=False,
                             dynamic_shapes={"x": {0: torch.export.Dim.AUTO, 1: torch.export.Dim.AUTO}})
    original = ep.module()
    normalized = normalize_linears(copy.deepcopy(original))
    forms = normalized.meta[NORMALIZED]  # export records torch.mm as aten.matmul
    assert sum(forms.values()) == 6 and {"matmul+bias", "addmm", "bmm", "einsum+bias"} <= set(forms)
    x = torch.randn(4, 3, 8, requires_grad=True)
    y0, y1 = original(x=x), normalized(x=x)
    torch.testing.assert_close(y1, y0, atol=1e-6, rtol=1e-6)
    g0, = torch.autograd.grad(y0.square().sum(), x)
    g1, = torch.autograd.grad(y1.square().sum(), x)
    torch.testing.assert_close(g1, g0, atol=1e-5, rtol=1e-5)


def test_a_transposed_matmul_of_a_weight_stored_in_out_is_left_alone():
    """``x @ W`` with W (in, out) is no nn.Linear; it must not become linear(x, W)."""

    class InOut(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(8, 4))

        def forward(self, x):
            return x @ self.w + torch.einsum("bi,io->bo", x, self.w)

    gm, _ = capture(InOut(), {"x": torch.randn(2, 8)}, frontend="export")
    assert gm.meta[NORMALIZED] == {} and not linear_sites(gm)


def _falcon(seed=0):
    cfg = tf.FalconConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, bias=True,
                          new_decoder_architecture=False, multi_query=True, alibi=False)
    torch.manual_seed(seed)
    return tf.FalconForCausalLM(cfg)


@pytest.mark.parametrize("method", ["lora", "ia3"])
def test_falcon_x_at_w_T_gets_peft_adapters(tmp_path, method):
    base = _falcon()
    fresh = _falcon(seed=5)
    fresh.load_state_dict(base.state_dict())
    assert any(type(m).__name__ == "FalconLinear" for m in base.modules())
    if method == "lora":
        cfg = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")
    else:
        cfg = IA3Config(target_modules=["query_key_value", "dense_4h_to_h"], feedforward_modules=["dense_4h_to_h"])
    pm = get_peft_model(base, cfg)
    _randomize([p for p in pm.parameters() if p.requires_grad])
    pm.save_pretrained(tmp_path)
    ids = torch.randint(0, 128, (2, 7))
    cm = peftc.from_peft(fresh, tmp_path, {"input_ids": ids}, trainable=True).eval()
    n_peft = sum(p.numel() for p in pm.parameters() if p.requires_grad)
    assert cm.pass_counts[method] == (8 if method == "lora" else 4)  # every FalconLinear (all-linear)
    assert sum(p.numel() for p in cm.parameters() if p.requires_grad) == n_peft
    pm.eval()
    ids = torch.randint(0, 128, (3, 11), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref, got, bare = pm(input_ids=ids).logits, cm(input_ids=ids).logits, fresh(input_ids=ids).logits
    assert (ref - bare).abs().max() > 1e-3  # the adapters change the output
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


class EinMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = EinLinear(16, 32), EinLinear(32, 16)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def test_einsum_linear_subclass_trains_with_lora():
    torch.manual_seed(0)
    model = EinMLP()
    ref_model = copy.deepcopy(model)
    cm = peftc.compile(model, {"methods": [{"lora": {"targets": "all-linear", "r": 2, "alpha": 4}}]},
                       {"x": torch.randn(2, 3, 16)})
    assert cm.pass_counts["lora"] == 2
    _randomize(list(cm.adapters.parameters()))
    pm = get_peft_model(ref_model, LoraConfig(r=2, lora_alpha=4, target_modules=["up", "down"]))
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                path = name.replace("base_model.model.", "").replace(".default", "")
                mod, _, rest = path.partition(".lora_")
                p.copy_(cm.adapters.get_parameter(f"{mod}.lora.default.lora_{rest}"))
    x = torch.randn(4, 5, 16)
    torch.testing.assert_close(cm(x), pm(x), atol=1e-6, rtol=1e-6)
    loss = cm(x).square().mean()
    loss.backward()
    grads = [p.grad for p in cm.adapters.parameters()]
    assert len(grads) == 4 and all(g is not None and g.abs().sum() > 0 for g in grads)
