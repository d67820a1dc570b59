"""Bottleneck adapters (Houlsby 2019, Pfeiffer 2020, He et al. 2021's parallel adapter) as a
graph rewrite, with AdapterHub's defaults and forward formulas.

Per transformer layer and sublayer (attention, FFN) the pass finds in the graph the residual
add ``y = h + r``: ``h`` the sublayer output (after its output projection and dropout), ``r``
the residual stream entering the sublayer. Post-LN blocks (BERT) normalise the sum,
``LN(h + r)``; pre-LN blocks (Llama, GPT-2) do not. With the bottleneck

    A(x) = g(x) * dropout(s * (W_up f(W_down x + b_down) + b_up))
    g(x) = mean_seq sigmoid(x W_g^T + b_g)        (gate: true, one scalar per sample; else 1)

the placements compute (AdapterHub's pre_forward / forward / post_forward):

    placement  sublayers     pre-LN (Llama, GPT-2)        post-LN (BERT)
    houlsby    attn + FFN    (A(h) + h) + r               LN((A(h) + h) + r)
    pfeiffer   FFN           (A(y) + h) + r,  y = h + r   LN((A(x) + h) + r),  x = LN(h + r)
    parallel   FFN           (A(r) + h) + r               LN((A(r) + h) + r)

Pfeiffer applies the block's own LayerNorm twice in post-LN blocks, as AdapterHub does
(``original_ln_before`` and ``original_ln_after``); in pre-LN blocks there is no norm at the
residual add, so its adapter reads the summed stream ``y``. Parallel's input is the residual
``r`` (the sublayer's input before any pre-norm), its output joins ``h``.

Defaults (AdapterHub's DoubleSeqBn / SeqBn / ParBn): reduction 16 / 16 / 2 (bottleneck
``hidden // reduction``), activation swish / relu / relu, scaling 1 / 1 / 4, init
"bert" (normal(0.02) weights, zero biases: near identity) / "bert" / "mam_adapter"
(kaiming down, zero up: exactly the base model). Parameters live at
``<layer>.bottleneck.<adapter>.{mh_adapter,output_adapter}`` with AdapterHub's names
``adapter_down.0`` / ``adapter_up`` / ``gate`` / ``scaling``.
"""

from __future__ import annotations

import math
import operator
import re
from dataclasses import dataclass
from functools import partial
from typing import Any, ClassVar, NamedTuple

import torch
import torch.nn.functional as F
from torch import fx, nn

from peftc.capture import SDPA
from peftc.errors import PeftcError
from peftc.graph import PEFTC, Inserter, as_linear_site, mount_adapter
from peftc.passes.context import PassContext, PassResult
from peftc.passes.methods.gates import init_gate, insert_gate
from peftc.passes.pipeline import register_method
from peftc.spec import MethodSpec, Sites

__all__ = ["BottleneckSpec", "BottleneckAdapter", "ResidualSite", "rewrite", "residual_sites", "PLACEMENTS",
           "ACTIVATIONS"]

aten = torch.ops.aten
PLACEMENTS = {  # placement -> (locations, reduction, activation, scaling, init)
    "houlsby": (("mh_adapter", "output_adapter"), 16, "swish", 1.0, "bert"),
    "pfeiffer": (("output_adapter",), 16, "relu", 1.0, "bert"),
    "parallel": (("output_adapter",), 2, "relu", 4.0, "mam_adapter"),
}
ACTIVATIONS = {  # AdapterHub name -> (aten op, extra args), and the nn module it stands for
    "relu": (aten.relu.default, (), {}), "swish": (aten.silu.default, (), {}),
    "silu": (aten.silu.default, (), {}), "gelu": (aten.gelu.default, (), {}),
    "gelu_new": (aten.gelu.default, (), {"approximate": "tanh"}), "tanh": (aten.tanh.default, (), {}),
    "sigmoid": (aten.sigmoid.default, (), {}), "leakyrelu": (aten.leaky_relu.default, (0.01,), {}),
}
INITS = ("bert", "mam_adapter", "houlsby")
ATTENTION = (SDPA, F.scaled_dot_product_attention)  # exported graphs; plain modules traced by fx
ADD = (aten.add.Tensor, operator.add)


@register_method("bottleneck", phase="graph")
@dataclass(frozen=True)
class BottleneckSpec(MethodSpec):
    """``placement``: houlsby | pfeiffer | parallel; unset fields take that placement's
    AdapterHub defaults. ``scaling``: a number, "learned" (one scalar) or "channel" (a
    vector); ``leave_out``: layer indices without adapters; ``gate``: UniPELT's gate."""

    placement: str = "pfeiffer"
    reduction: float | None = None
    activation: str | None = None
    scaling: Any = None
    init: str | None = None
    dropout: float = 0.0
    gate: bool = False
    leave_out: Any = ()

    sites: ClassVar[Sites] = Sites.GRAPH

    def __post_init__(self):
        if self.placement not in PLACEMENTS:
            self.reject("placement", f"one of {list(PLACEMENTS)}")
        _, red, act, scale, init = PLACEMENTS[self.placement]
        for name, default in (("reduction", red), ("activation", act), ("scaling", scale), ("init", init)):
            if getattr(self, name) is None:
                object.__setattr__(self, name, default)
        if isinstance(self.reduction, bool) or not isinstance(self.reduction, (int, float)) or self.reduction <= 0:
            self.reject("reduction", "a number > 0 (bottleneck width = hidden // reduction)")
        if self.activation not in ACTIVATIONS:
            self.reject("activation", f"one of {sorted(ACTIVATIONS)}")
        if not (self.scaling in ("learned", "channel") or
                (isinstance(self.scaling, (int, float)) and not isinstance(self.scaling, bool))):
            self.reject("scaling", "a number, 'learned' or 'channel'")
        if self.init not in INITS:
            self.reject("init", f"one of {list(INITS)}")
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            self.reject("dropout", "a number in [0, 1)")
        if not isinstance(self.gate, bool):
            self.reject("gate", "true or false")
        if isinstance(self.leave_out, int) and not isinstance(self.leave_out, bool):
            object.__setattr__(self, "leave_out", (self.leave_out,))
        if not (isinstance(self.leave_out, tuple) and all(
                isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in self.leave_out)):
            self.reject("leave_out", "a list of layer indices (>= 0)")

    @property
    def locations(self) -> tuple[str, ...]:
        return PLACEMENTS[self.placement][0]

    @classmethod
    def rewrite(cls, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        return rewrite(gm, ctx)


class BottleneckAdapter(nn.Module):
    """The parameters of one bottleneck adapter at one location (AdapterHub's names)."""

    def __init__(self, hidden: int, entry: BottleneckSpec, like: torch.Tensor):
        super().__init__()
        kw = {"dtype": like.dtype, "device": like.device}
        width = max(1, int(hidden // entry.reduction))
        self.adapter_down = nn.Sequential(nn.Linear(hidden, width, **kw))
        self.adapter_up = nn.Linear(width, hidden, **kw)
        if entry.scaling == "learned":
            self.scaling = nn.Parameter(torch.ones(1, **kw))
        elif entry.scaling == "channel":
            self.scaling = nn.Parameter(torch.ones(hidden, **kw))
        if entry.gate:
            self.gate = nn.Linear(hidden, 1, **kw)
        down = self.adapter_down[0]
        with torch.no_grad():
            if entry.init == "bert":
                for lin in (down, self.adapter_up, *([self.gate] if entry.gate else [])):
                    nn.init.normal_(lin.weight, std=0.02)
                    nn.init.zeros_(lin.bias)
            elif entry.init == "mam_adapter":
                nn.init.kaiming_uniform_(down.weight, a=math.sqrt(5))
                nn.init.zeros_(down.bias)
                nn.init.zeros_(self.adapter_up.weight)
                nn.init.zeros_(self.adapter_up.bias)
                if entry.gate:
                    init_gate(self.gate, zero_bias=True)
            else:  # houlsby: truncated normal(0, 1e-2) in [-2e-2, 2e-2], zero biases
                for lin in (down, self.adapter_up):
                    nn.init.trunc_normal_(lin.weight, std=1e-2, a=-2e-2, b=2e-2)
                    nn.init.zeros_(lin.bias)


class ResidualSite(NamedTuple):
    """A residual add ``add = h + r`` closing a sublayer; ``ln`` its post-LN norm or None."""

    layer: str
    location: str  # "mh_adapter" (after attention) or "output_adapter" (after the FFN)
    add: fx.Node
    h: fx.Node
    r: fx.Node
    ln: fx.Node | None


def _layer_path(node: fx.Node) -> str:
    """The deepest owning module that is an item of a module list (``...layers.3``)."""
    paths = [p for p, _ in node.meta.get("nn_module_stack", {}).values() if re.search(r"\.\d+$", p)]
    if not paths:
        raise PeftcError(f"residual add {node.name} belongs to no indexed transformer layer")
    return paths[-1]


def _closing_add(order: list[fx.Node], start: fx.Node, residual_inside: bool):
    """The first add after ``start`` with one operand computed from ``start`` through a linear
    layer, the other operand not: not from ``start`` at all (``residual_inside`` False: the
    attention's add) or from ``start`` without a linear (True: the FFN's add)."""
    pos = {n: i for i, n in enumerate(order)}
    desc, lin = {start}, set()
    for n in order[pos[start] + 1:]:
        ins = n.all_input_nodes
        if not any(a in desc for a in ins):
            continue
        if n.target in ADD and len(n.args) == 2 and all(isinstance(a, fx.Node) for a in n.args):
            for h, r in (n.args, n.args[::-1]):
                ok_r = (r in desc and r not in lin) if residual_inside else r not in desc
                same = None in (_shape(h), _shape(r)) or _shape(h) == _shape(r)  # fx graphs: no shapes
                if h in lin and ok_r and same:
                    return n, h, r
        desc.add(n)
        if any(a in lin for a in ins) or (as_linear_site(n) is not None and PEFTC not in n.meta):
            lin.add(n)
    return None


def _shape(n: fx.Node):
    v = n.meta.get("val")
    return tuple(v.shape) if isinstance(v, torch.Tensor) else None


def _features(gm: fx.GraphModule, h: fx.Node) -> int:
    """Feature width of ``h``: from its shape meta, else from the linear layer producing it."""
    if (shape := _shape(h)) is not None:
        return shape[-1]
    n = h
    while (site := as_linear_site(n)) is None and n.all_input_nodes:
        n = n.all_input_nodes[0]
    if site is None:
        raise PeftcError(f"cannot tell the feature width of {h.name}")
    w = gm.get_parameter(site.weight.target)
    return w.shape[1] if site.transposed else w.shape[0]


def _post_norm(add: fx.Node, layer: str) -> fx.Node | None:
    """The LayerNorm of a post-LN block: the add's only user, inside the same layer (a
    pre-LN model's final norm after the last layer does not count)."""
    users = [u for u in add.users if u.target is not aten._assert_tensor_metadata.default]
    if len(users) == 1 and users[0].target is aten.layer_norm.default and users[0].args[0] is add:
        if layer in [p for p, _ in users[0].meta.get("nn_module_stack", {}).values()]:
            return users[0]
    return None


def residual_sites(gm: fx.GraphModule) -> list[ResidualSite]:
    """Per attention node: the residual add after attention and the one after the FFN that
    follows it. Pure graph structure: no module names."""
    order = list(gm.graph.nodes)
    out = []
    for sdpa in [n for n in order if n.target in ATTENTION]:
        found = _closing_add(order, sdpa, residual_inside=False)
        if found is None:
            raise PeftcError(f"no residual add after attention node {sdpa.name}")
        add, h, r = found
        layer = _layer_path(add)
        ln = _post_norm(add, layer)
        out.append(ResidualSite(layer, "mh_adapter", add, h, r, ln))
        found = _closing_add(order, ln or add, residual_inside=True)
        if found is None:
            raise PeftcError(f"no FFN residual add after {add.name}")
        add2, h2, r2 = found
        layer = _layer_path(add2)
        out.append(ResidualSite(layer, "output_adapter", add2, h2, r2, _post_norm(add2, layer)))
    return out


def _bottleneck(ins: Inserter, x: fx.Node, path: str, entry: BottleneckSpec) -> fx.Node:
    """A(x) as nodes (see the module docstring)."""
    d = ins.call(aten.linear.default, (x, ins.get_attr(f"{path}.adapter_down.0.weight"),
                                       ins.get_attr(f"{path}.adapter_down.0.bias")), "adapter_down")
    op, extra, kw = ACTIVATIONS[entry.activation]
    d = ins.call(op, (d, *extra), "activation", kw)
    u = ins.call(aten.linear.default, (d, ins.get_attr(f"{path}.adapter_up.weight"),
                                       ins.get_attr(f"{path}.adapter_up.bias")), "adapter_up")
    s = ins.get_attr(f"{path}.scaling") if isinstance(entry.scaling, str) else float(entry.scaling)
    u = ins.call(aten.mul.Tensor, (u, s), "scaling")
    if entry.dropout > 0:
        u = ins.call(aten.dropout.default, (u, float(entry.dropout), True), "dropout")
    if entry.gate:
        g = insert_gate(ins, x, f"{path}.gate.weight", f"{path}.gate.bias")
        u = ins.call(aten.mul.Tensor, (u, ins.call(aten.unsqueeze.default, (g, -1), "gate_view")), "gated")
    return u


def rewrite(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    """Pre: a graph with one attention node per layer, each followed by its residual add and
    an FFN residual add. Post: each selected residual add computes its placement's formula."""
    entries = [m for m in ctx.spec.methods if isinstance(m, BottleneckSpec)]
    if not entries:
        return PassResult(gm, False)
    adapter, like = ctx.spec.adapter, next(iter(ctx.model.parameters()))
    sites = residual_sites(gm)
    layers = list(dict.fromkeys(s.layer for s in sites))
    taken: dict[str, BottleneckSpec] = {}
    n = 0
    for entry in entries:
        for site in sites:
            if site.location not in entry.locations or layers.index(site.layer) in entry.leave_out:
                continue
            path = f"{site.layer}.bottleneck.{adapter}.{site.location}"
            if path in taken:
                raise PeftcError(f"two bottleneck entries place an adapter at {path}")
            taken[path] = entry
            mount_adapter(ctx.store, gm, path, partial(BottleneckAdapter, _features(gm, site.h), entry, like))
            info = {"method": "bottleneck", "adapter": adapter, "module": site.layer}
            if entry.placement == "pfeiffer":
                anchor = site.ln or site.add  # x = LN(h + r) (post-LN) or y = h + r (pre-LN)
                ins = Inserter(anchor, info)
                o = ins.call(aten.add.Tensor, (_bottleneck(ins, anchor, path, entry), site.h), "adapter_residual")
                out = ins.call(aten.add.Tensor, (o, site.r), "residual")
                if site.ln is not None:
                    out = ins.call(aten.layer_norm.default, (out, *site.ln.args[1:]), "layer_norm")
                ins.redirect(anchor, out)
            else:  # houlsby: A(h) + h; parallel: A(r) + h; then the block's own add (and LN)
                ins = Inserter(site.add, info, before=True)
                x = site.h if entry.placement == "houlsby" else site.r
                o = ins.call(aten.add.Tensor, (_bottleneck(ins, x, path, entry), site.h), "adapter_residual")
                site.add.replace_input_with(site.h, o)
            n += 1
    ctx.counts["bottleneck"] += n
    return PassResult(gm, n > 0)
