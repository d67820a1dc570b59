"""Capture time linear in what varies, not in depth: trace three transformer layers, copy the
third N-3 times.

``torch.export`` spends ~all its time tracing, ~0.1-0.3 s per layer of a Llama, whatever the
width; a deep model's N layers are one layer N times. So: when layers 1..N-1 are alike
(same module types, parameter names, shapes and dtypes, plain attributes other than
``layer_idx``; one layer type), capture a copy of the model whose layer list holds layers 0-2
only, then repeat layer 2's nodes for layers 3..N-1:

    layer k = layer 2 with  get_attr  <list>.2.<p>  -> <list>.k.<p>,
                            inputs from layer 1's node j -> layer k-1's node j,
                            graph inputs named by layer (key_2 -> key_k), see below
                            nn_module_stack  <list>.2  -> <list>.k
    users of layer 2's node j after the layers -> layer N-1's node j

A graph input that layer 2 reads where layer 1 reads another input at the same place (a step
graph's per-layer KV cache: layer 1 writes ``key_1``, layer 2 ``key_2``) must be named by the
layer index; layer k reads the input whose name has k there.

Layer 0 stays as traced (T5-like first layers differ). Where a model does not fit (one layer
list of ``config.num_hidden_layers``, layers 1 and 2 traced to the same op sequence, contiguous
in the graph, per-layer inputs named by index), ``None`` is returned and the caller captures the whole model. The result is
checked once against the eager model by the graph cache (not on the meta device, where there
are no values); ``tests/test_capture_once.py`` checks it node for node against a full capture.
"""

from __future__ import annotations

import contextlib
import re

from torch import fx, nn

from peftc.graph import fetch_attr

__all__ = ["layer_list", "truncated", "repeat_layer", "MIN_LAYERS", "REPEATED"]

MIN_LAYERS = 6  # below this, tracing every layer costs about what it saves
REPEATED = "peftc_repeated_layers"  # gm.meta key: (layer list path, layers) when repeated


def _plain_attrs(m: nn.Module) -> dict:
    return {k: v for k, v in vars(m).items() if not k.startswith("_") and k not in ("layer_idx", "training")}


def _layer_key(layer: nn.Module) -> list:
    key = []
    for name, m in layer.named_modules():
        if m._forward_hooks or m._forward_pre_hooks:
            return [object()]  # hooks may read the layer index: never alike
        key.append((name, type(m), sorted(_plain_attrs(m).items(), key=lambda kv: kv[0])))
    key += [(n, tuple(p.shape), p.dtype) for n, p in layer.named_parameters()]
    key += [(n, tuple(b.shape), b.dtype) for n, b in layer.named_buffers()]
    return key


def _alike(a: list, b: list) -> bool:
    try:
        return bool(a == b)
    except Exception:  # an attribute whose == is not a bool (a tensor): not alike
        return False


def layer_list(model: nn.Module, min_layers: int = MIN_LAYERS) -> str | None:
    """The path of the model's one ``nn.ModuleList`` of ``config.num_hidden_layers`` alike layers
    (layer 0 may differ), or None. ``min_layers``: fewer layers than this give None."""
    config = getattr(model, "config", None)
    n = getattr(config, "num_hidden_layers", None)
    if not isinstance(n, int) or n < min_layers or len(set((getattr(config, "layer_types", None) or [None])[1:])) > 1:
        return None
    lists = [p for p, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) == n]
    if len(lists) != 1:
        return None
    layers = model.get_submodule(lists[0])
    first = _layer_key(layers[1])
    return lists[0] if all(_alike(first, _layer_key(layer)) for layer in list(layers)[2:]) else None


@contextlib.contextmanager
def truncated(model: nn.Module, path: str, keep: int = 3):
    """The model with the layer list at ``path`` cut to its first ``keep`` layers (the same
    module objects), restored on exit."""
    parent_path, _, leaf = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    full = getattr(parent, leaf)
    setattr(parent, leaf, nn.ModuleList(list(full)[:keep]))
    try:
        yield
    finally:
        setattr(parent, leaf, full)


def _layer_of(node: fx.Node, path: str) -> int | None:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    owner = list(stack.values())[-1][0]
    m = re.match(re.escape(path) + r"\.(\d+)(?:\.|$)", owner)
    return int(m.group(1)) if m else None


def _rename(text: str, old: str, new: str) -> str:
    """``old`` -> ``new`` where ``old`` ends a path component (``layers.2`` but not ``layers.20``)."""
    i = text.find(old)
    while i >= 0:
        end = i + len(old)
        if end == len(text) or text[end] == ".":
            text = text[:i] + new + text[end:]
            end = i + len(new)
        i = text.find(old, end)
    return text


def _retarget_stack(stack: dict, old: str, new: str) -> dict:
    return {_rename(k, old, new): (_rename(v[0], old, new), *v[1:]) for k, v in stack.items()}


def repeat_layer(gm: fx.GraphModule, model: nn.Module, path: str, layers: int) -> bool:
    """Grows ``gm`` (captured with layers 0-2 of the list at ``path``) to ``layers`` layers by
    repeating layer 2; ``model`` (full again) provides the parameters. False, ``gm`` untouched,
    where layer 2 is not a contiguous copy of layer 1's op sequence."""
    graph = gm.graph
    nodes = list(graph.nodes)
    by_layer: dict[int, list[fx.Node]] = {1: [], 2: []}
    for node in nodes:
        k = _layer_of(node, path)
        if k in by_layer:
            by_layer[k].append(node)
    one, two = by_layer[1], by_layer[2]
    if not two or len(one) != len(two) or any(a.target != b.target or a.op != b.op for a, b in zip(one, two)):
        return False
    start, end = nodes.index(two[0]), nodes.index(two[-1])
    if nodes[start:end + 1] != two:
        return False
    per_layer = _per_layer_inputs(graph, one, two, layers)
    if per_layer is None:
        return False
    after = nodes[end + 1]
    old = f"{path}.2"
    attrs = {n.target: n for n in nodes if n.op == "get_attr" and n.target.startswith(old + ".")}
    template = set(two)
    prev = dict(zip(one, two))  # layer 1's node j -> the previous layer's node j (layer 2 at first)
    for k in range(3, layers):
        new = f"{path}.{k}"
        env: dict[fx.Node, fx.Node] = {}
        mapped = {**prev, **{x: by_k[k] for x, by_k in per_layer.items()}}  # and each node as it is copied

        def arg(a: fx.Node, mapped=mapped) -> fx.Node:
            return mapped.get(a, a)
        with graph.inserting_before(after):
            for target, attr in attrs.items():
                name = _rename(target, old, new)
                _install(gm, name, fetch_attr(model, name), buffer=not isinstance(fetch_attr(gm, target), nn.Parameter))
                env[attr] = mapped[attr] = graph.get_attr(name)
                env[attr].meta = dict(attr.meta)
            for node in two:
                copy = graph.node_copy(node, arg)
                if "nn_module_stack" in copy.meta:
                    copy.meta["nn_module_stack"] = _retarget_stack(copy.meta["nn_module_stack"], old, new)
                env[node] = mapped[node] = copy
        prev = {a: env[b] for a, b in zip(one, two)}
    stamped = {n for n in graph.nodes} - set(nodes)
    last = {b: prev[a] for a, b in zip(one, two)}
    for b in two:
        for user in list(b.users):
            if user not in template and user not in stamped:
                user.replace_input_with(b, last[b])
    graph.lint()
    gm.recompile()
    gm.meta[REPEATED] = (path, layers)
    return True


def _per_layer_inputs(graph: fx.Graph, one: list, two: list, layers: int) -> dict | None:
    """{input layer 2 reads: {k: the input layer k reads}} for the inputs named by layer
    (``key_2`` where layer 1 reads ``key_1``: ``key_k``); None where such an input has no name of
    that form or a layer's input is missing."""
    inputs = {n.target: n for n in graph.nodes if n.op == "placeholder"}
    out: dict[fx.Node, dict[int, fx.Node]] = {}
    for a, b in zip(one, two):
        for x, y in zip(a.all_input_nodes, b.all_input_nodes):
            if y.op != "placeholder" or x is y or y in out:
                continue
            if x.op != "placeholder":
                return None
            spots = [m.start() for m in re.finditer(r"(?<!\d)2(?!\d)", y.target)
                     if y.target[:m.start()] + "1" + y.target[m.end():] == x.target]
            if len(spots) != 1:
                return None
            i = spots[0]
            names = {k: y.target[:i] + str(k) + y.target[i + 1:] for k in range(3, layers)}
            if any(name not in inputs for name in names.values()):
                return None
            out[y] = {k: inputs[name] for k, name in names.items()}
    return out


def _install(gm: fx.GraphModule, target: str, value, *, buffer: bool) -> None:
    """Registers ``value`` at dotted ``target`` in ``gm``, creating plain parent modules."""
    parent = gm
    *parents, leaf = target.split(".")
    for part in parents:
        if not hasattr(parent, part):
            parent.add_module(part, nn.Module())
        parent = getattr(parent, part)
    if buffer:
        parent.register_buffer(leaf, value)
    else:
        parent.register_parameter(leaf, value)
