"""The captured and the rewritten graph side by side in Google's Model Explorer.

Model Explorer (``pip install 'peftc[explorer]'``, the ``ai-edge-model-explorer`` wheel) is a
web app that runs offline, lays large graphs out by namespace and paints per-node data. Here
each fx node becomes a Model Explorer node whose namespace is its ``nn_module_stack``
(``model/layers.0/self_attn/q_proj``), so a model opens collapsed and a layer expands to its
linears; two node-data overlays paint what peftc did:

* ``peftc method``: every node a rewrite inserted, coloured by its method (``meta["peftc"]``);
* ``peftc optimization``: what an optimization pass did to a node: whatever the pass wrote as
  ``meta["peftc"]["optimization"]`` (recomputed, quantized, sharded, ...), else what the op's
  namespace says (``peftc::`` kernels are ``fused``), so a new pass shows up without a change here.

``export`` writes the pair as plain files (no server needed; attach them to a bug report);
``serve`` opens them split: captured graph left, rewritten right.

    view = build(cm.captured_graph, cm.graph_module, label="tiny-llama lora")
    view.export("graphs/")          # captured.json, rewritten.json, peftc_method.json, peftc_optimization.json
    serve("graphs/")                # or: python -m peftc.explorer graphs/
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import shlex
import tempfile
import uuid
from urllib.parse import quote, unquote

import torch
from torch import fx

from peftc.capture import owning_module
from peftc.errors import PeftcError

__all__ = ["ExplorerMissing", "ExplorerView", "INSTALL_HINT", "build", "build_graph", "explore", "overlays",
           "OP_NAMESPACES", "open_command", "optimization_of", "require", "serve", "split_url_data", "url", "CAPTURED", "REWRITTEN"]

INSTALL_HINT = "pip install 'peftc[explorer]'   (or: pip install ai-edge-model-explorer)"
CAPTURED, REWRITTEN = "captured", "rewritten"
OVERLAYS = {"peftc method": "peftc_method.json", "peftc optimization": "peftc_optimization.json"}
# Fill colours for inserted nodes, given to methods in sorted order (as the SVG drawing does).
PALETTE = ("#f28e2b", "#59a14f", "#4e79a7", "#e15759", "#b07aa1", "#edc948", "#76b7b2", "#ff9da7")
OPTIMIZATION_COLOURS = {"fused": "#9c6ade", "recomputed": "#2ca6a4", "quantized": "#d4a017",
                        "sharded": "#5b8def"}
OTHER_OPTIMIZATION = "#888888"


class ExplorerMissing(PeftcError, ImportError):
    """Model Explorer is an optional extra; this names the command that installs it."""


def require():
    """The ``model_explorer`` package, or ExplorerMissing saying how to install it."""
    try:
        import model_explorer
        from model_explorer import graph_builder, node_data_builder  # noqa: F401
    except ImportError as e:
        raise ExplorerMissing(f"the graph explorer needs Model Explorer ({e.name or e} is not installed); "
                              f"install it with: {INSTALL_HINT}") from None
    return model_explorer


# ---- what a node is ---------------------------------------------------------------------
def _peftc(node: fx.Node) -> dict:
    info = node.meta.get("peftc")
    return info if isinstance(info, dict) else {}


# Op namespace -> what made such a node, for passes that do not write meta["peftc"]["optimization"]:
# kernels/ registers every fused op as peftc::<name>; PT2E quantization and functional collectives
# have their own namespaces.
OP_NAMESPACES = {"peftc": "fused", "quantized_decomposed": "quantized", "torchao": "quantized",
                 "_c10d_functional": "sharded", "c10d_functional": "sharded"}


def optimization_of(node: fx.Node) -> str | None:
    """What an optimization did to ``node``: a pass's ``meta["peftc"]["optimization"]``, else
    what its op's namespace says (``OP_NAMESPACES``), else None."""
    done = _peftc(node).get("optimization")
    if done:
        return str(done)
    namespace = getattr(node.target, "namespace", None)  # OpOverload / OpOverloadPacket
    return OP_NAMESPACES.get(namespace) if node.op == "call_function" else None


_NO_MODULE = "_empty_nn_module_stack_from_metadata_hook"  # export's marker on guard/size nodes


def _stack(node: fx.Node) -> list[str]:
    """Module paths from the root down to the node's owner; [] when export recorded none
    (captured get_attr nodes: their namespace comes from the tensor's module, see _namespaces)."""
    stack = node.meta.get("nn_module_stack") or {}
    return [path for path, _ in stack.values() if path and path != _NO_MODULE]


def _levels(paths: list[str]) -> list[str]:
    """``["model", "model.layers.0", "model.layers.0.mlp"]`` -> ``["model", "layers.0", "mlp"]``."""
    levels, prev = [], ""
    for path in paths:
        if path != prev:
            levels.append(path[len(prev) + 1:] if prev and path.startswith(prev + ".") else path)
            prev = path
    return levels


def _namespaces(graph: fx.Graph) -> tuple[dict[fx.Node, tuple[str, str]], dict[str, str]]:
    """(module path, namespace) per node, and every module path's namespace: a level per module
    of the call stack (``model.layers.0.self_attn.q_proj`` is ``model/layers.0/self_attn/q_proj``).
    A node without a stack (a captured parameter) joins its module's layer, or the nearest
    enclosing one's."""
    known: dict[str, str] = {}
    for n in graph.nodes:
        paths = _stack(n)
        for i in range(len(paths)):
            known.setdefault(paths[i], "/".join(_levels(paths[: i + 1])))
    out = {}
    for n in graph.nodes:
        paths = _stack(n)
        path = paths[-1] if paths else owning_module(n) or ""
        path = "" if path == _NO_MODULE else path
        if not path and n.op == "get_attr" and isinstance(n.target, str):
            path = n.target.rpartition(".")[0]
        ns, rest, probe = "", path, path
        while probe:
            if probe in known:
                ns, rest = known[probe], path[len(probe) + 1:]
                break
            probe = probe.rpartition(".")[0]
        ns = "/".join(x for x in (ns, rest) if x)
        out[n] = (path, "inputs" if n.op == "placeholder" else ns)
    return out, known


def _target(node: fx.Node) -> str:
    if isinstance(node.target, str) or hasattr(node.target, "overloadpacket"):
        return str(node.target)
    name = getattr(node.target, "__qualname__", None) or getattr(node.target, "__name__", None)
    mod = {"_operator": "operator"}.get(getattr(node.target, "__module__", ""), getattr(node.target, "__module__", ""))
    return f"{mod}.{name}" if name and mod else str(name or node.target)


def _label(node: fx.Node) -> str:
    if node.op == "get_attr" and isinstance(node.target, str):
        parts = node.target.split(".")
        return parts[-2] if _peftc(node) and len(parts) > 1 and parts[-1] == "weight" else parts[-1]
    if node.op in ("placeholder", "output"):
        return node.name if node.op == "placeholder" else "output"
    packet = getattr(node.target, "overloadpacket", None)
    if packet is not None:
        ns, name = str(packet).rsplit(".", 1) if "." in str(packet) else ("", str(packet))
        return name if ns == "aten" else f"{ns}::{name}"
    return getattr(node.target, "__name__", str(node.target))


def _vals(graph: fx.Graph, owner) -> dict[fx.Node, object]:
    """Every node's fake value: the capture's ``meta["val"]``, and for nodes a pass inserted
    (which carry none) their op run on the fake values of their inputs; None where unknown."""
    from torch._guards import detect_fake_mode
    from torch.utils._pytree import tree_map

    vals = {n: n.meta.get("val") for n in graph.nodes}
    mode = detect_fake_mode([v for v in vals.values() if isinstance(v, torch.Tensor)])
    if mode is None:
        return vals
    with mode:
        for n in graph.nodes:
            if vals[n] is not None or n.op in ("placeholder", "output"):
                continue
            if n.op == "get_attr" and owner is not None:
                real = _resolve(owner, n.target)
                vals[n] = mode.from_tensor(real, static_shapes=True) if isinstance(real, torch.Tensor) else None
            elif n.op == "call_function" and all(vals[a] is not None for a in n.all_input_nodes):
                args, kwargs = tree_map(lambda a: vals[a] if isinstance(a, fx.Node) else a, (n.args, n.kwargs))
                try:
                    vals[n] = n.target(*args, **kwargs)
                except (RuntimeError, TypeError, ValueError, NotImplementedError):
                    vals[n] = None  # shown as no shape: a missing shape must not hide the graph
    return vals


def _resolve(owner, target: str):
    obj = owner
    for part in target.split("."):
        obj = getattr(obj, part, None)
    return obj


def _shape(val) -> str | None:
    if isinstance(val, torch.Tensor):
        dims = ", ".join(str(int(d)) if str(d).isdigit() else str(d) for d in val.shape)
        return f"{str(val.dtype).removeprefix('torch.')}[{dims}]"
    return None


# ---- building ---------------------------------------------------------------------------
def build_graph(graph: fx.Graph, graph_id: str, owner=None):
    """One Model Explorer ``Graph``: a node per fx node, namespaced by owning module.

    ``owner`` (the GraphModule) resolves inserted parameters for their shapes. Node ids are
    fx node names, which survive rewriting, so the two panes name a node alike.
    """
    gb = require().graph_builder
    vals = _vals(graph, owner)
    out = gb.Graph(id=graph_id, groupNodeAttributes={},
                   layoutConfigs=gb.LayoutConfigs(keepLayersWithASingleChild=True))
    spaces, modules = _namespaces(graph)
    for n in graph.nodes:
        path, namespace = spaces[n]
        node = gb.GraphNode(id=n.name, label=_label(n), namespace=namespace)
        for i, src in enumerate(n.all_input_nodes):
            node.incomingEdges.append(gb.IncomingEdge(sourceNodeId=src.name, targetNodeInputId=str(i)))
        attrs = {"op": n.op, "target": _target(n)}
        if path:
            attrs["module"] = path
        for key in ("method", "adapter", "role"):
            if _peftc(n).get(key) is not None:
                attrs[f"peftc.{key}"] = str(_peftc(n)[key])
        if optimization_of(n):
            attrs["peftc.optimization"] = optimization_of(n)
        node.attrs = [gb.KeyValue(key=k, value=v) for k, v in attrs.items()]
        outs = vals[n] if isinstance(vals[n], list | tuple) else [vals[n]]
        for i, v in enumerate(outs):
            if _shape(v):
                node.outputsMetadata.append(gb.MetadataItem(id=str(i), attrs=[
                    gb.KeyValue(key="tensor_shape", value=_shape(v))]))
        out.nodes.append(node)
    for path, namespace in modules.items():  # the side panel of a selected layer names its module
        out.groupNodeAttributes[namespace] = {"module": path}
    return out


def overlays(graph: fx.Graph, graph_id: str = REWRITTEN) -> dict[str, object]:
    """The two node-data overlays of a graph, by display name: ``ModelNodeData`` keyed by graph
    id, string values (a collapsed layer shows a bar of the kinds it holds)."""
    ndb = require().node_data_builder
    methods = sorted({_peftc(n)["method"] for n in graph.nodes if _peftc(n).get("method")})
    colour = {m: PALETTE[i % len(PALETTE)] for i, m in enumerate(methods)}
    inserted = {n.name: ndb.NodeDataResult(value=_peftc(n)["method"], bgColor=colour[_peftc(n)["method"]])
                for n in graph.nodes if _peftc(n).get("method")}
    optimized = {n.name: ndb.NodeDataResult(value=opt, bgColor=OPTIMIZATION_COLOURS.get(opt, OTHER_OPTIMIZATION))
                 for n in graph.nodes if (opt := optimization_of(n))}
    data = {}
    for name, results in (("peftc method", inserted), ("peftc optimization", optimized)):
        # showExpandedSummaryOnGroupNode left out (None is dropped on export): the page relayouts,
        # losing the node selected from the URL, when that flag differs from the previous overlay's.
        per_graph = ndb.GraphNodeData(results=results, name=name, showExpandedSummaryOnGroupNode=None)
        data[name] = ndb.ModelNodeData(graphsData={graph_id: per_graph})
    return data


@dataclasses.dataclass
class ExplorerView:
    """Two graph collections (captured, rewritten: one graph each, one file each) and the
    rewritten graph's overlays, ready to export or serve."""

    collections: dict[str, object]  # CAPTURED / REWRITTEN -> graph_builder.GraphCollection
    node_data: dict[str, object]  # overlay name -> node_data_builder.ModelNodeData

    def export(self, out_dir) -> dict[str, pathlib.Path]:
        """Writes ``captured.json``, ``rewritten.json`` and one file per overlay into ``out_dir``
        (each to a temp name, then renamed); returns the paths by graph id / overlay name."""
        out = pathlib.Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        written = {gid: _write(out / f"{gid}.json", json.dumps(dataclasses.asdict(c)))
                   for gid, c in self.collections.items()}
        for name, data in self.node_data.items():
            written[name] = _write(out / OVERLAYS[name], data.to_json_string())
        return written


def _write(path: pathlib.Path, text: str) -> pathlib.Path:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def build(captured: fx.Graph, rewritten: fx.GraphModule, *, label: str = "peftc") -> ExplorerView:
    """The captured graph and the rewritten one, each its own collection (labels ``<label>
    captured`` / ``<label> rewritten``; graph ids ``captured`` / ``rewritten``), with the rewritten
    graph's overlays. Two collections, because Model Explorer loads node data once per
    collection: the overlays then land on the rewritten pane whichever pane loads first."""
    gb = require().graph_builder
    collections = {gid: gb.GraphCollection(label=f"{label} {gid}", graphs=[build_graph(g, gid, rewritten)])
                   for gid, g in ((CAPTURED, captured), (REWRITTEN, rewritten.graph))}
    return ExplorerView(collections, overlays(rewritten.graph))


# ---- opening ----------------------------------------------------------------------------
def split_url_data(config, labels: dict[str, str], expand: list[str] = (),
                   select: dict[str, str] | None = None) -> dict:
    """The ``data`` URL parameter of a Model Explorer config, plus the ui state that opens two
    panes, captured left and rewritten right (``labels``: graph id -> collection label), with
    the layers ``expand`` names (namespaces, ``model/layers.0``) open and the node ``select``
    names per graph id selected (the page zooms to it and lists its attributes)."""
    data = json.loads(unquote(config.to_url_param_value()))
    pane = {"deepestExpandedGroupNodeIds": [f"{ns}___group___" for ns in expand], "widthFraction": 0.5,
            "flattenLayers": False}
    data["uiState"] = {"paneStates": [
        {**pane, "selectedGraphId": gid, "selectedCollectionLabel": labels[gid], "selected": gid == REWRITTEN,
         "selectedNodeId": (select or {}).get(gid, "")} for gid in (CAPTURED, REWRITTEN)]}
    return data


def _config(export_dir, module: str | None = None, select: str | None = None):
    """A Model Explorer config for an exported dir whose URL opens the split view, with the
    layer of module path ``module`` (and its sub-layers) expanded and node ``select`` selected
    in the panes that have it."""
    require()
    from model_explorer.config import ModelExplorerConfig

    export_dir = pathlib.Path(export_dir).resolve()
    files = {gid: export_dir / f"{gid}.json" for gid in (CAPTURED, REWRITTEN)}
    missing = [str(f) for f in files.values() if not f.is_file()]
    if missing:
        raise PeftcError(f"{missing} not found: export the graphs first (peftc inspect ... --explorer-out DIR)")
    collections = {gid: json.loads(f.read_text()) for gid, f in files.items()}
    expand = []
    if module:
        spaces = {a["module"]: ns for c in collections.values() for g in c["graphs"]
                  for ns, a in (g["groupNodeAttributes"] or {}).items()}
        if module not in spaces:
            raise PeftcError(f"no layer for module {module!r}; layers include {sorted(spaces)[:6]}")
        expand = sorted({ns for m, ns in spaces.items() if m == module or m.startswith(module + ".")})
    labels = {gid: c["label"] for gid, c in collections.items()}
    chosen = {gid: select for gid, c in collections.items()
              if select and any(n["id"] == select for g in c["graphs"] for n in g["nodes"])}
    if select and not chosen:
        raise PeftcError(f"no node named {select!r} in {sorted(files.values())}")

    class SplitConfig(ModelExplorerConfig):
        def to_url_param_value(self) -> str:  # the server builds the URL it opens from this
            return quote(json.dumps(split_url_data(super(), labels, expand, chosen)))

    config = SplitConfig()
    for f in files.values():
        config.add_model_from_path(str(f))
    for name in reversed(OVERLAYS.values()):  # the page shows the last one added: methods
        if (export_dir / name).is_file():
            config.add_node_data_from_path(str(export_dir / name), model_name=labels[REWRITTEN])
    return config


def open_command(export_dir, module: str | None = None) -> str:
    """The commands that open an exported dir: split view, or Model Explorer's own CLI."""
    d = pathlib.Path(export_dir).resolve()
    expand = f" --module {shlex.quote(module)}" if module else ""
    graphs = ",".join(str(d / f"{gid}.json") for gid in (CAPTURED, REWRITTEN))
    data = ",".join(str(d / f) for f in OVERLAYS.values())
    return (f"python -m peftc.explorer {shlex.quote(str(d))}{expand}\n"
            f"model-explorer {shlex.quote(graphs)} --node_data_paths={shlex.quote(data)}")


def serve(export_dir, *, module: str | None = None, select: str | None = None, host: str = "localhost",
          port: int = 8080, open_browser: bool = True) -> None:
    """Serves an exported dir with Model Explorer's local server (blocks until Ctrl+C); the
    page opens split, with ``module``'s layer expanded and node ``select`` selected."""
    me = require()
    me.visualize_from_config(_config(export_dir, module, select), host=host, port=port,
                             no_open_in_browser=not open_browser)


def url(export_dir, *, module: str | None = None, select: str | None = None, host: str = "localhost",
        port: int = 8080) -> str:
    """The page address ``serve`` opens."""
    return f"http://{host}:{port}/?data={_config(export_dir, module, select).to_url_param_value()}"


def explore(cm, out_dir=None, *, label: str | None = None, module: str | None = None, serve_now: bool = True,
            port: int = 8080, open_browser: bool = True) -> pathlib.Path:
    """Exports a CompiledModel's captured and rewritten graphs to ``out_dir`` (default: a new
    temp dir), prints the commands that open them, and (``serve_now``) serves them split."""
    require()
    out = pathlib.Path(out_dir) if out_dir is not None else pathlib.Path(tempfile.mkdtemp(prefix="peftc-explorer-"))
    label = label or type(cm.get_base_model()).__name__
    build(cm.captured_graph, cm.graph_module, label=label).export(out)
    print(f"graphs and overlays written to {out}; open them with:\n{open_command(out, module)}")
    if serve_now:
        serve(out, module=module, port=port, open_browser=open_browser)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m peftc.explorer",
                                 description="Open an exported peftc graph pair in Model Explorer, split view.")
    ap.add_argument("export_dir")
    ap.add_argument("--module", help="expand this module's layer (e.g. model.layers.0)")
    ap.add_argument("--select", help="select this node (an fx node name) in the panes that have it")
    ap.add_argument("--host", default="localhost")
    ap.add_argument("--port", type=int, default=8080)
    ap.add_argument("--no-browser", action="store_true", help="only serve; print the URL")
    args = ap.parse_args(argv)
    try:
        serve(args.export_dir, module=args.module, select=args.select, host=args.host, port=args.port,
              open_browser=not args.no_browser)
    except PeftcError as e:
        print(f"error: {e}")
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
