"""BitFit and SSF against hand-written eager references of their formulas."""

import copy

import pytest
import torch
from torch import nn

import peftc
from peftc.models import example_inputs, tiny_model


def test_bitfit_trains_exactly_the_biases():
    model = tiny_model("tiny-torch", dropout=0.0).eval()
    cm = peftc.compile(model, {"methods": [{"bitfit": {}}]}, example_inputs("tiny-torch")).eval()
    biases = {n: p for n, p in model.named_parameters() if n.endswith("bias")}
    assert cm.num_trainable_parameters() == sum(p.numel() for p in biases.values())
    x = example_inputs("tiny-torch", 3, 5, seed=1)["x"]
    with torch.no_grad():
        assert torch.equal(cm(x), model(x))  # identity at init
        for p in cm.adapters.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    # eager reference: the same model with its biases replaced by the trained copies
    ref = copy.deepcopy(model).double()
    with torch.no_grad():
        for n, p in cm.adapters.named_parameters():
            path = n.replace(".bitfit.default.bias", "")
            ref.get_submodule(path).bias.copy_(p.double())
    x.requires_grad_(True)
    out = cm(x)
    torch.testing.assert_close(out.double(), ref(x.double()), atol=1e-5, rtol=0)
    out.square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in cm.trainable_parameters())
    assert all(p.grad is None for p in model.parameters())


def test_bitfit_selected_modules_and_merge():
    model = tiny_model("tiny-llama", attention_bias=True).eval()
    cm = peftc.compile(model, {"methods": [{"bitfit": {"targets": ["q_proj"]}}]}, example_inputs("tiny-llama"))
    assert cm.num_trainable_parameters() == 2 * 64
    with torch.no_grad():
        for p in cm.trainable_parameters():
            p.add_(1.0)
    cm.eval()
    ex = example_inputs("tiny-llama", 2, 6, seed=3)
    with torch.no_grad():
        ref = cm(**ex).logits
        cm.merge()
        assert (cm(**ex).logits - ref).abs().max() <= 1e-5


class Reference(nn.Module):
    """y = (x W^T + b) * gamma + beta on every linear (the SSF paper's formula), in float64."""

    def __init__(self, model, adapters):
        super().__init__()
        self.model = copy.deepcopy(model).double()
        for name, mod in self.model.named_modules():
            if isinstance(mod, nn.Linear):
                g = adapters.get_parameter(f"{name}.ssf.default.ssf_scale").detach().double()
                b = adapters.get_parameter(f"{name}.ssf.default.ssf_shift").detach().double()
                mod.register_forward_hook(lambda m, i, o, g=g, b=b: o * g + b)

    def forward(self, x):
        return self.model(x)


def test_ssf_matches_formula_identity_at_init_and_merges():
    model = tiny_model("tiny-torch", dropout=0.0).eval()
    cm = peftc.compile(model, {"methods": [{"ssf": {}}]}, example_inputs("tiny-torch")).eval()
    x = example_inputs("tiny-torch", 2, 7, seed=4)["x"]
    with torch.no_grad():
        assert torch.equal(cm(x), model(x))
        for p in cm.trainable_parameters():
            p.add_(torch.randn_like(p) * 0.2)
        torch.testing.assert_close(cm(x).double(), Reference(model, cm.adapters)(x.double()), atol=1e-5, rtol=0)
        ref = cm(x)
        cm.merge()
        assert (cm(x) - ref).abs().max() <= 1e-5
    assert cm.pass_counts["merge"] == 9


@pytest.mark.parametrize("method", [{"ssf": {"targets": ["c_fc"]}}, {"bitfit": {"targets": ["c_fc"]}}])
def test_gpt2_conv1d(method):
    model = tiny_model("tiny-gpt2").eval()
    cm = peftc.compile(model, {"methods": [method]}, example_inputs("tiny-gpt2")).eval()
    ex = example_inputs("tiny-gpt2", 2, 5, seed=2)
    with torch.no_grad():
        assert torch.allclose(cm(**ex).logits, model(**ex).logits, atol=1e-6)
    cm.train()
    cm(**ex, labels=ex["input_ids"]).loss.backward()
    assert all(p.grad is not None for p in cm.trainable_parameters())
