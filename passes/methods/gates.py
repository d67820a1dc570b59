"""UniPELT's gates, as AdapterHub computes them, shared by the gated LoRA, prefix and
bottleneck adapters: ``g(x) = mean_seq sigmoid(x W_g^T + b_g)``, one value per sample.
"""

from __future__ import annotations

import torch
from torch import fx, nn

from peftc.errors import PeftcError
from peftc.graph import Inserter, as_linear_site

__all__ = ["init_gate", "insert_gate", "tokens_3d", "attention_input"]

aten = torch.ops.aten
VIEWS = (aten.view.default, aten.reshape.default, aten._unsafe_view.default)


def init_gate(gate: nn.Linear, zero_bias: bool) -> None:
    """AdapterHub's gate init: weight normal(0, 0.02); bias zero under "bert"-style inits,
    else nn.Linear's default (its LoRA and prefix gates)."""
    nn.init.normal_(gate.weight, std=0.02)
    if zero_bias:
        nn.init.zeros_(gate.bias)


def tokens_3d(x: fx.Node) -> fx.Node:
    """The (batch, seq, features) tensor behind ``x`` (Conv1D reads a flattened 2-D view)."""
    v = x.meta.get("val")
    if isinstance(v, torch.Tensor) and v.dim() == 2 and x.target in VIEWS:
        x = x.args[0]
        v = x.meta.get("val")
    if not (isinstance(v, torch.Tensor) and v.dim() == 3):
        raise PeftcError(f"a gate needs (batch, seq, features) inputs; {x.name} is not one")
    return x


def attention_input(sdpa: fx.Node) -> fx.Node:
    """The token states entering the query projection of an attention node."""
    seen, todo = set(), [sdpa.args[0]]
    while todo:
        n = todo.pop(0)
        site = as_linear_site(n)
        if site is not None:
            return tokens_3d(site.x)
        if n not in seen:
            seen.add(n)
            todo += n.all_input_nodes
    raise PeftcError(f"no query projection found before attention node {sdpa.name}")


def insert_gate(ins: Inserter, x: fx.Node, weight: str, bias: str) -> fx.Node:
    """``mean_seq sigmoid(x W^T + b)`` -> (batch, outputs): AdapterHub's gate."""
    g = ins.call(aten.linear.default, (x, ins.get_attr(weight), ins.get_attr(bias)), "gate")
    g = ins.call(aten.sigmoid.default, (g,), "gate_sigmoid")
    return ins.call(aten.mean.dim, (g, [1]), "gate_mean")
