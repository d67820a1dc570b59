"""Invariant: a target that resolves to modules but yields no graph site is a PassError naming
the modules, for every method family (passes/pipeline.py ``check_every_target_has_a_site``),
never a compiled model that silently adapts nothing."""

import pytest
import torch
from torch import nn

import peftc
from peftc import PassError


class SumLinear(nn.Linear):
    """A linear layer written as a broadcast multiply and sum: no linear form capture reads."""

    def forward(self, x):
        return (x.unsqueeze(-2) * self.weight).sum(-1) + self.bias


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 8)
        self.odd = SumLinear(8, 8)
        self.norm = nn.LayerNorm(8)
        self.unused = nn.Linear(8, 8)  # defined, never called in forward
        self.unused_norm = nn.LayerNorm(8)

    def forward(self, x):
        return self.odd(self.norm(torch.relu(self.proj(x))))


LINEAR = [  # (method, settings): every method acting on linear sites
    ("lora", {"r": 2}), ("lora", {"r": 2, "dora": True}), ("vera", {"r": 2}), ("loha", {"r": 2}),
    ("lokr", {"r": 2}), ("ia3", {"feedforward": ["proj"]}), ("ssf", {}),
]


def compile_(spec, frontend="auto"):
    torch.manual_seed(0)
    return peftc.compile(Model(), {"methods": [spec]}, {"x": torch.randn(2, 3, 8)}, frontend=frontend)


@pytest.mark.parametrize("method, kw", LINEAR, ids=[f"{m}{'-dora' if kw.get('dora') else ''}" for m, kw in LINEAR])
@pytest.mark.parametrize("missing", ["odd", "unused"])
def test_linear_methods_name_the_module_without_a_site(method, kw, missing):
    with pytest.raises(PassError, match=rf"no site in the captured graph: \['{missing}'\]") as err:
        compile_({method: {"targets": ["proj", missing], **kw}})
    if missing == "odd":  # what the module runs as, so the user sees why
        assert "mul" in str(err.value) and "sum" in str(err.value)
    else:
        assert "no op in this graph" in str(err.value)


@pytest.mark.parametrize("method", ["bitfit", "ln_tuning", "train"])
def test_module_methods_name_the_module_without_a_site(method):
    target = "unused" if method == "bitfit" else "unused_norm"
    with pytest.raises(PassError, match=rf"\['{target}'\]"):
        compile_({method: {"targets": ["norm", target]}})


def test_export_frontend_and_the_sites_that_exist_still_compile():
    with pytest.raises(PassError, match=r"\['odd'\]"):
        compile_({"lora": {"targets": ["proj", "odd"], "r": 2}}, frontend="export")
    cm = compile_({"lora": {"targets": ["proj"], "r": 2}}, frontend="export")
    assert cm.pass_counts["lora"] == 1
