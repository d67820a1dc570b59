"""Looking at a rewritten graph: what the passes inserted, as a table, a diff, or an SVG.

Every node a pass inserts carries ``node.meta["peftc"]`` (method, adapter, module, role);
everything here reads only that and ``nn_module_stack``, so it works on any pass's output
and on graphs with nothing inserted.

    print(summarize(cm.graph_module, cm.captured_graph))
    print(diff(cm.captured_graph, cm.graph_module.graph))
    to_svg(cm.graph_module.graph, "layer0.svg", module="model.layers.0")
"""

from __future__ import annotations

import difflib
import io
import os
import pathlib
import uuid
from collections import defaultdict

import torch
from torch import fx

from peftc.graph import PEFTC, fetch_attr, owning_module

__all__ = ["summarize", "graph_text", "node_line", "diff", "to_svg", "owning_module", "adapter_info"]

_PARAM_ROLES = ("param", "param_swap")
# Fill colours for inserted nodes, given to methods in sorted order (so stable per graph).
_PALETTE = ("#f28e2b", "#59a14f", "#4e79a7", "#e15759", "#b07aa1", "#edc948", "#76b7b2", "#ff9da7")


def adapter_info(node: fx.Node) -> dict | None:
    """The peftc meta of a node a pass inserted; None for captured nodes."""
    info = node.meta.get(PEFTC)
    return info if isinstance(info, dict) and "role" in info else None


# ---- text -------------------------------------------------------------------------------
def _fmt_target(target) -> str:
    if isinstance(target, str):
        return target
    if isinstance(target, torch._ops.OpOverload | torch._ops.OpOverloadPacket):
        return str(target)  # aten.linear.default
    mod = getattr(target, "__module__", None) or ""
    name = getattr(target, "__qualname__", None) or getattr(target, "__name__", None)
    if name is None:
        return type(target).__name__
    mod = {"_operator": "operator", "builtins": ""}.get(mod, mod)
    return f"{mod}.{name}" if mod else name


def _fmt_arg(a) -> str:
    if isinstance(a, fx.Node):
        return a.name
    if isinstance(a, tuple):
        inner = ", ".join(_fmt_arg(x) for x in a)
        return f"({inner},)" if len(a) == 1 else f"({inner})"
    if isinstance(a, list):
        return "[" + ", ".join(_fmt_arg(x) for x in a) + "]"
    if isinstance(a, dict):
        return "{" + ", ".join(f"{k!r}: {_fmt_arg(v)}" for k, v in a.items()) + "}"
    if isinstance(a, torch.Tensor):
        return f"tensor{tuple(a.shape)}"
    if isinstance(a, slice):
        return f"slice({_fmt_arg(a.start)}, {_fmt_arg(a.stop)}, {_fmt_arg(a.step)})"
    text = repr(a)
    return f"<{type(a).__name__}>" if " at 0x" in text else text  # no addresses: deterministic


def _call_args(node: fx.Node) -> str:
    parts = [_fmt_arg(a) for a in node.args] + [f"{k}={_fmt_arg(v)}" for k, v in node.kwargs.items()]
    return ", ".join(parts)


def _marker(info: dict) -> str:
    adapter = info.get("adapter")
    who = info.get("method", "?") + ("" if adapter in (None, "default") else f"@{adapter}")
    return f"[{who}:{info['role']}]"


def node_line(node: fx.Node) -> str:
    """``name = op target(args)``, with ``[method:role]`` on inserted nodes."""
    if node.op == "placeholder":
        line = f"{node.name} = placeholder"
    elif node.op == "get_attr":
        line = f"{node.name} = get_attr {node.target}"
    elif node.op == "output":
        line = f"{node.name} = output({_call_args(node)})"
    else:
        line = f"{node.name} = {node.op} {_fmt_target(node.target)}({_call_args(node)})"
    info = adapter_info(node)
    return f"{line}  {_marker(info)}" if info else line


def graph_text(graph: fx.Graph) -> str:
    """One line per node in program order; stable across runs, so it diffs cleanly."""
    return "\n".join(node_line(n) for n in graph.nodes) + "\n"


def diff(before: fx.Graph, after: fx.Graph) -> str:
    """Unified diff of ``graph_text``: inserted nodes are ``+`` lines; a captured node whose
    input was redirected to an adapter's output shows as a ``-``/``+`` pair."""
    lines = difflib.unified_diff(graph_text(before).splitlines(keepends=True),
                                 graph_text(after).splitlines(keepends=True),
                                 fromfile="captured", tofile="rewritten")
    return "".join(lines)


# ---- summary ----------------------------------------------------------------------------
def _resolve(owner, target: str):
    try:
        return fetch_attr(owner, target)
    except AttributeError:
        return None


def _short_param(target: str, info: dict) -> str:
    """``<module>.lora.default.lora_A.weight`` -> ``lora_A``: the part that says which tensor."""
    module = info.get("module") or ""
    rel = target[len(module) + 1:] if module and target.startswith(module + ".") else target
    parts = rel.split(".")
    if len(parts) > 2 and parts[1] == info.get("adapter"):
        parts = parts[2:]  # drop "<store>.<adapter>." (lora.default, modules_to_save.default)
    if len(parts) > 1 and parts[-1] == "weight":
        parts = parts[:-1]
    return ".".join(parts)


def summarize(gm: fx.GraphModule, before: fx.Graph | None = None) -> str:
    """A table of inserted nodes per (module, method, adapter): roles, adapter parameter
    shapes and sizes; then node and parameter totals.

        print(summarize(cm.graph_module, cm.captured_graph))
    """
    from rich import box
    from rich.console import Console
    from rich.table import Table

    groups: dict[tuple, dict] = {}
    seen_total: dict[int, int] = {}
    inserted = 0
    for node in gm.graph.nodes:
        info = adapter_info(node)
        if info is None:
            continue
        inserted += 1
        module = info.get("module") or owning_module(node) or "?"
        key = (module, info.get("method", "?"), info.get("adapter", "?"))
        g = groups.setdefault(key, {"roles": [], "nodes": 0, "params": [], "seen": set(), "numel": 0})
        g["nodes"] += 1
        if info["role"] not in g["roles"]:
            g["roles"].append(info["role"])
        if node.op == "get_attr" and info["role"] in _PARAM_ROLES:
            t = _resolve(gm, node.target)
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else "?"
            g["params"].append(f"{_short_param(node.target, info)} {shape}")
            if isinstance(t, torch.Tensor) and id(t) not in g["seen"]:
                g["seen"].add(id(t))
                g["numel"] += t.numel()
                seen_total[id(t)] = t.numel()

    out = io.StringIO()
    console = Console(file=out, width=120, color_system=None, highlight=False)
    n_after = len(gm.graph.nodes)
    nodes = f"nodes: {n_after}, {inserted} inserted"
    if before is not None:  # names survive rewriting, so a missing name is a removed node
        gone = {n.name for n in before.nodes} - {n.name for n in gm.graph.nodes}
        nodes = (f"nodes: {len(before.nodes)} captured -> {n_after} rewritten "
                 f"({inserted} inserted, {len(gone)} removed)")
    if not groups:
        console.print(f"no adapter nodes; {nodes}")
        return out.getvalue()
    table = Table(title="inserted adapter nodes", title_justify="left", box=box.SIMPLE_HEAD,
                  pad_edge=False, collapse_padding=True)
    table.add_column("module", no_wrap=True)
    table.add_column("method", no_wrap=True)
    table.add_column("roles")
    table.add_column("nodes", justify="right")
    table.add_column("parameters", no_wrap=True)
    table.add_column("#params", justify="right")
    for (module, method, adapter), g in groups.items():
        who = method if adapter == "default" else f"{method}@{adapter}"
        table.add_row(module, who, ", ".join(g["roles"]), str(g["nodes"]),
                      "\n".join(g["params"]) or "-", f"{g['numel']:,}")
    console.print(table)
    console.print(f"{nodes}; adapter parameters: {len(seen_total)} tensors, "
                  f"{sum(seen_total.values()):,} values")
    return out.getvalue()


# ---- drawing ----------------------------------------------------------------------------
def _module_of(node: fx.Node) -> str | None:
    """Owning module; for a get_attr without a module stack, the module its target lives in."""
    found = owning_module(node)
    if found is None and node.op == "get_attr" and isinstance(node.target, str):
        found = node.target.rpartition(".")[0] or None
    return found


def _under(module: str | None, prefix: str) -> bool:
    return module is not None and (module == prefix or module.startswith(prefix + "."))


def _select(graph: fx.Graph, module: str | None) -> tuple[list[fx.Node], set[fx.Node]]:
    """Nodes to draw (program order) and which of them are only context inputs."""
    if module is None:
        return list(graph.nodes), set()
    keep = [n for n in graph.nodes if _under(_module_of(n), module)]
    if not keep:
        near = sorted({m for n in graph.nodes if (m := _module_of(n))})[:5]
        raise ValueError(f"no nodes owned by module {module!r}; modules in this graph include {near}")
    kept = set(keep)
    context = {a for n in keep for a in n.all_input_nodes if a not in kept}
    return [n for n in graph.nodes if n in kept or n in context], context


def _layers(g, order: dict) -> list[list]:
    """Layered layout: topological generations, each source moved down to just above its
    first user (weights sit beside the op reading them); within a layer, nodes sorted by
    the mean position of their inputs (sources: of their users), two sweeps."""
    import networkx as nx

    level = {n: i for i, gen in enumerate(nx.topological_generations(g)) for n in gen}
    for n in level:
        if g.in_degree(n) == 0 and g.out_degree(n) > 0:
            level[n] = min(level[s] for s in g.successors(n)) - 1
    rows: dict[int, list] = defaultdict(list)
    for n in sorted(level, key=order.__getitem__):
        rows[level[n]].append(n)
    x: dict = {}  # sweep 2 reads sweep 1's x for the layers below (users of sources)

    def key(n, use_users: bool):
        at = [x[p] for p in g.predecessors(n) if p in x]
        if not at and use_users:
            at = [x[s] for s in g.successors(n) if s in x]
        return (sum(at) / len(at) if at else float("inf"), order[n])

    for use_users in (False, True):
        layers = []
        for k in sorted(rows):
            row = sorted(rows[k], key=lambda n, u=use_users: key(n, u))
            x.update((n, i - (len(row) - 1) / 2) for i, n in enumerate(row))
            layers.append(row)
    return layers


def _label(node: fx.Node) -> str:
    """Two short lines: which node (weights by module and tensor name), and what it does."""
    info = adapter_info(node)
    name = node.name
    if node.op == "get_attr" and isinstance(node.target, str):
        rel = _short_param(node.target, info) if info else node.target.rsplit(".", 1)[-1]
        owner = (info or {}).get("module") or node.target.rpartition(".")[0]
        name = f"{owner.rsplit('.', 1)[-1]}.{rel}" if owner else rel
    if len(name) > 28:
        name = name[:12] + "…" + name[-15:]
    if info is not None:
        return f"{name}\n{_marker(info)}"
    if node.op in ("call_function", "call_method", "call_module"):
        parts = _fmt_target(node.target).split(".")
        return f"{name}\n{parts[1] if parts[0] == 'aten' and len(parts) > 1 else parts[-1]}"
    return f"{name}\n{node.op}"


def to_svg(graph: fx.Graph, path, *, module: str | None = None, max_nodes: int = 2000) -> pathlib.Path:
    """Draws the graph to an SVG, inserted nodes filled by method, with a legend.

    Needs no graphviz: a networkx DAG in layers, drawn with matplotlib. ``module`` keeps the
    nodes owned by that module path prefix, plus their direct inputs as grey context nodes.
    The file is written to a temporary name first and renamed, so it is never half-written.

        to_svg(cm.graph_module.graph, "layer0.svg", module="model.layers.0")
    """
    import matplotlib
    import networkx as nx
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    nodes, context = _select(graph, module)
    if len(nodes) > max_nodes:
        hint = next((m for n in graph.nodes if adapter_info(n) and (m := _module_of(n))), None)
        hint = hint or next((m for n in graph.nodes if (m := _module_of(n))), "model.layers.0")
        raise ValueError(f"graph has {len(nodes)} nodes to draw, more than max_nodes={max_nodes}; "
                         f"draw part of it with module=..., e.g. module={hint!r}, or raise max_nodes")
    order = {n: i for i, n in enumerate(nodes)}
    g = nx.DiGraph()
    g.add_nodes_from(nodes)
    g.add_edges_from((a, n) for n in nodes if n not in context for a in n.all_input_nodes if a in order)
    layers = _layers(g, order)
    pos = {n: (i - (len(row) - 1) / 2, -depth)
           for depth, row in enumerate(layers) for i, n in enumerate(row)}

    methods = sorted({info.get("method", "?") for n in nodes if (info := adapter_info(n))})
    colour = {m: _PALETTE[i % len(_PALETTE)] for i, m in enumerate(methods)}
    width = max((len(row) for row in layers), default=1)
    legend_in = 0.25 + 0.17 * (len(methods) + 3)  # a strip on top for the legend, off the nodes
    height = max(3.0, 0.75 * len(layers) + 0.5) + legend_in
    fig = Figure(figsize=(max(6.0, 1.5 * width + 1), height))
    ax = fig.add_axes((0, 0, 1, 1 - legend_in / height))
    ax.set_axis_off()
    ax.set_xlim(-width / 2 - 0.5, width / 2 + 0.5)
    ax.set_ylim(-len(layers) + 0.4, 0.6)
    labels = {}
    for n in nodes:
        info = adapter_info(n)
        if n in context:
            box = {"boxstyle": "round,pad=0.25", "fc": "#f4f4f4", "ec": "#b0b0b0", "ls": "--"}
            style = {"fontsize": 4.5, "color": "#777777"}
        else:
            fill = colour[info.get("method", "?")] if info else "#ffffff"
            box = {"boxstyle": "round,pad=0.3", "fc": fill, "ec": "#333333", "lw": 0.8 if info else 0.5}
            style = {"fontsize": 5.5, "color": "#111111"}
        # gid: the SVG group of each node is <g id="node-NAME">, for tools and tests.
        labels[n] = ax.text(*pos[n], _label(n), ha="center", va="center", bbox=box, zorder=2,
                            gid=f"node-{n.name}", **style)
    # An arrow per edge (<g id="edge-A-B">), clipped to both label boxes: drawn after the labels
    # (zorder 3), so it clips to the boxes as placed in this very drawing.
    for a, b in g.edges:
        arrow = ax.annotate("", xy=pos[b], xytext=pos[a], zorder=3, arrowprops={
            "arrowstyle": "-|>,head_length=0.5,head_width=0.25", "color": "#9a9a9a", "lw": 0.6,
            "shrinkA": 0, "shrinkB": 0, "patchA": labels[a].get_bbox_patch(),
            "patchB": labels[b].get_bbox_patch()}).arrow_patch
        arrow.set_gid(f"edge-{a.name}-{b.name}")
    handles = [Patch(fc=colour[m], ec="#333333", label=f"inserted by {m}") for m in methods]
    handles.append(Patch(fc="#ffffff", ec="#333333", label="captured"))
    if context:
        handles.append(Patch(fc="#f4f4f4", ec="#b0b0b0", ls="--", label="context input"))
    inserted = sum(1 for n in nodes if adapter_info(n))
    title = f"{len(nodes)} nodes, {inserted} inserted" + (f" (module {module})" if module else "")
    fig.legend(handles=handles, loc="upper left", fontsize=7, title=title, title_fontsize=7, frameon=True)

    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")  # same dir: replace is atomic
    try:
        # Text as <text> (searchable) and stable ids, only for this save; global rc untouched.
        with open(tmp, "xb") as f, matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "peftc"}):
            fig.savefig(f, format="svg", metadata={"Date": None})
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
