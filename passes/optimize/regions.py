"""Regional compilation: a graph's transformer layers become calls of one compiled layer.

    gm = pre; layer_0(h, W_0); ...; layer_{N-1}(h, W_{N-1}); post
      -> outer = pre; region_a(h, *W_0); region_b(h, *W_1); ...; region_b(h, *W_{N-1}); post

Each layer's nodes are cut out into a template graph whose inputs are everything the layer
reads from outside it (hidden states, masks, rotary tables, KV-cache buffers) followed by the
tensors it reads through ``get_attr`` (base weights, adapter parameters). Layers whose templates
have the same structure share one template object; compiled once (``torch.compile``), it runs
every such layer with that layer's own tensors, so compile time does not grow with depth. The
outer graph keeps the rest (embedding, norm, head) and runs interpreted: a few ops.

Pre: a graph whose nodes carry ``nn_module_stack`` (capture) and a layer list path
(``peftc.repeat_layers.layer_list``); each layer's nodes contiguous. Post: ``split`` returns the
outer GraphModule (sharing ``gm``'s parameters and pytree call convention) and the distinct
templates, or None with the reason when the graph does not split.
"""

from __future__ import annotations

import copy
import operator
from dataclasses import dataclass

from torch import fx, nn

from peftc.graph import fetch_attr, owning_module

__all__ = ["Split", "split", "layer_of"]


@dataclass
class Split:
    outer: fx.GraphModule  # runs the regions; shares gm's attributes
    templates: list[fx.GraphModule]  # distinct layer templates, in first-use order
    layers: int  # layers cut out


def layer_of(node: fx.Node, prefix: str) -> int | None:
    """The index of the layer of ``prefix`` (a layer list path plus '.') that owns ``node``."""
    owner = owning_module(node)
    if owner is None or not owner.startswith(prefix):
        return None
    head = owner[len(prefix):].split(".", 1)[0]
    return int(head) if head.isdigit() else None


def _layer_runs(gm: fx.GraphModule, prefix: str) -> tuple[dict[int, list[fx.Node]], str | None]:
    """Each layer's compute nodes in graph order, or a reason why layers are not contiguous
    blocks. Nodes without an owner between two nodes of one layer belong to it (getitem, views)."""
    order = [n for n in gm.graph.nodes if n.op in ("call_function", "call_method", "call_module")]
    marks = [layer_of(n, prefix) for n in order]
    for i, m in enumerate(marks):  # an unowned node between two nodes of the same layer joins it
        if m is None:
            before = next((x for x in reversed(marks[:i]) if x is not None), None)
            after = next((x for x in marks[i + 1:] if x is not None), None)
            if before is not None and before == after:
                marks[i] = before
    runs: dict[int, list[fx.Node]] = {}
    last = None
    for n, m in zip(order, marks):
        if m is None:
            last = None if last is None else -1
            continue
        if m in runs and last != m:
            return {}, f"layer {m}'s nodes are not contiguous (around {n.name})"
        runs.setdefault(m, []).append(n)
        last = m
    if len(runs) < 2:
        return {}, f"fewer than two layers of {prefix[:-1]} in the graph"
    return runs, None


def _template(gm: fx.GraphModule, nodes: list[fx.Node]) -> tuple[fx.GraphModule, list, list[fx.Node], tuple]:
    """The layer's nodes as a graph of their outside inputs (values first, then attributes);
    returns (template, the outside inputs as the outer graph passes them, the layer's outputs
    used outside, a structural key equal for layers that can share a template)."""
    inside = set(nodes)
    values, attrs = [], []
    for n in nodes:
        for a in n.all_input_nodes:
            if a not in inside:
                target = attrs if a.op == "get_attr" else values
                if a not in target:
                    target.append(a)
    outputs = [n for n in nodes if any(u not in inside for u in n.users)]
    g = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for i, a in enumerate(values + attrs):
        env[a] = g.placeholder(f"in_{i}")
        env[a].meta = copy.copy(a.meta)
    for n in nodes:
        env[n] = g.node_copy(n, lambda x: env[x])
    g.output(tuple(env[o] for o in outputs))
    template = fx.GraphModule(nn.Module(), g)
    index = {n: i for i, n in enumerate(values + attrs + nodes)}

    def shape(x):
        return ("node", index[x]) if isinstance(x, fx.Node) else x

    key = (len(values), len(attrs), tuple(index[o] for o in outputs),
           tuple((n.op, n.target, tuple(fx.node.map_aggregate(n.args, shape)),
                  tuple(sorted(fx.node.map_aggregate(n.kwargs, shape).items()))) for n in nodes))
    return template, values + attrs, outputs, key


def split(gm: fx.GraphModule, layer_list: str | None, make_region) -> tuple[Split | None, str | None]:
    """(the regional form of ``gm``, None) or (None, why not). ``make_region(template)`` returns
    the callable module that runs a template (e.g. its ``torch.compile``)."""
    if layer_list is None:
        return None, "no list of alike layers in the model"
    runs, why = _layer_runs(gm, layer_list + ".")
    if why:
        return None, why
    templates: dict[tuple, tuple[int, fx.GraphModule]] = {}
    plan = []
    for k in sorted(runs):
        template, inputs, outputs, key = _template(gm, runs[k])
        if key not in templates:
            templates[key] = (len(templates), template)
        plan.append((runs[k], templates[key][0], inputs, outputs))
    holder = nn.Module()
    for i, (_, template) in enumerate(templates.values()):
        holder.add_module(f"r{i}", make_region(template))
    outer = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    first = {id(nodes[0]): (nodes, t, inputs, outputs) for nodes, t, inputs, outputs in plan}
    skip = {n for nodes, *_ in plan for n in nodes}
    for n in gm.graph.nodes:
        if id(n) in first:
            nodes, t, inputs, outputs = first[id(n)]
            for a in inputs:  # a weight read in the layer may stand later in the graph than its first node
                if a not in env and a.op == "get_attr":
                    env[a] = outer.node_copy(a)
                elif a not in env:
                    return None, f"layer {layer_of(nodes[0], layer_list + '.')} reads {a.name}, computed after it starts"
            call = outer.call_module(f"_peftc_regions.r{t}", tuple(env[a] for a in inputs))
            for j, o in enumerate(outputs):
                env[o] = outer.call_function(operator.getitem, (call, j))
                env[o].meta = copy.copy(o.meta)
        if n in skip or n in env:
            continue
        env[n] = outer.node_copy(n, lambda x: env[x])
    outer._codegen = copy.deepcopy(gm.graph._codegen)  # the exported graph's pytree in/out convention
    attrs = {n.target: fetch_attr(gm, n.target) for n in outer.nodes if n.op in ("get_attr", "call_module")
             and not n.target.startswith("_peftc_regions.")}
    attrs.update({f"_peftc_regions.{name}": m for name, m in holder.named_children()})
    module = fx.GraphModule(attrs, outer, class_name=type(gm).__name__)
    for name, child in gm.named_children():  # gm's own module tree: a buffer set on it later (a mixed
        setattr(module, name, child)  # batch's sample masks) is the one the outer graph reads
    return Split(module, [t for _, t in templates.values()], len(plan)), None
