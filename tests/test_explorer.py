"""peftc.explorer without a browser: the Model Explorer graphs, overlays, split view and export
built from a real LoRA rewrite of tiny-llama (and its fused variant)."""

import importlib.util
import json
import re
import sys
from urllib.parse import unquote

import pytest
import torch
from torch import fx

import peftc
from peftc import explorer  # imports without the extra; building a view needs it
from peftc.capture import owning_module
from peftc.cli import main
from peftc.errors import PeftcError
from peftc.models import example_inputs, tiny_model

needs_explorer = pytest.mark.skipif(importlib.util.find_spec("model_explorer") is None,
                                    reason="Model Explorer is not installed (pip install 'peftc[explorer]')")

SPEC = {"methods": [{"lora": {"targets": ["q_proj", "v_proj"], "r": 4}}]}


@pytest.fixture(scope="module")
def cm():
    return peftc.compile(tiny_model("tiny-llama"), SPEC, example_inputs("tiny-llama"))


@pytest.fixture(scope="module")
def view(cm):
    return explorer.build(cm.captured_graph, cm.graph_module, label="tiny-llama")


def graph_of(view, gid):
    (graph,) = view.collections[gid].graphs
    return graph


def nodes_by_id(graph):
    return {n.id: n for n in graph.nodes}


def attrs(node) -> dict:
    return {kv.key: kv.value for kv in node.attrs}


def inserted(gm) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if "peftc" in n.meta]


# ---- graphs -------------------------------------------------------------------------------
@needs_explorer
def test_one_namespace_per_module_path(cm, view):
    for gid, fx_graph in (("captured", cm.captured_graph), ("rewritten", cm.graph_module.graph)):
        graph = graph_of(view, gid)
        assert [n.id for n in graph.nodes] == [n.name for n in fx_graph.nodes]  # one node per fx node
        modules = {ns: a["module"] for ns, a in graph.groupNodeAttributes.items()}
        assert len(set(modules.values())) == len(modules)  # module path <-> namespace is 1:1
        ns_of = {m: ns for ns, m in modules.items()}
        for layer in (0, 1):
            assert ns_of[f"model.layers.{layer}.self_attn.q_proj"] == f"model/layers.{layer}/self_attn/q_proj"
            assert ns_of[f"model.layers.{layer}.mlp"] == f"model/layers.{layer}/mlp"
        by_id = nodes_by_id(graph)
        for n in fx_graph.nodes:
            owner = owning_module(n)
            if n.op == "get_attr":  # captured parameters carry no module stack: their module's layer
                owner = owner or n.target.rpartition(".")[0]
            if n.op == "placeholder" or owner not in ns_of:
                continue
            assert by_id[n.name].namespace == ns_of[owner], n.name
        # every namespace a node sits in is a module's layer (or the inputs / root)
        assert {n.namespace for n in graph.nodes} <= set(modules) | {"inputs", ""}


@needs_explorer
def test_edges_follow_the_fx_graph(cm, view):
    by_id = nodes_by_id(graph_of(view, "rewritten"))
    for n in cm.graph_module.graph.nodes:
        assert [e.sourceNodeId for e in by_id[n.name].incomingEdges] == [a.name for a in n.all_input_nodes]


@needs_explorer
def test_attributes_show_peftc_meta_shapes_and_dtypes(cm, view):
    by_id = nodes_by_id(graph_of(view, "rewritten"))
    q = "model.layers.0.self_attn.q_proj"
    ours = {n.meta["peftc"]["role"]: n for n in inserted(cm.graph_module) if n.meta["peftc"]["module"] == q}
    a = attrs(by_id[ours["lora_A"].name])
    assert (a["peftc.method"], a["peftc.adapter"], a["peftc.role"], a["module"]) == ("lora", "default", "lora_A", q)
    assert a["target"] == "aten.linear.default" and "peftc.optimization" not in a

    def shape(name):
        (item,) = by_id[name].outputsMetadata
        return attrs(item)["tensor_shape"]

    # inserted nodes carry no meta["val"]: their shapes are run on fake tensors of their inputs
    param_a = next(n for n in inserted(cm.graph_module) if n.op == "get_attr" and n.target.endswith(f"{q}.lora.default.lora_A.weight"))
    assert shape(param_a.name) == "float32[4, 64]"
    assert re.fullmatch(r"float32\[s\d+, s\d+, 4\]", shape(ours["lora_A"].name))  # batch, seq dynamic
    assert re.fullmatch(r"float32\[s\d+, s\d+, 64\]", shape(ours["add"].name))
    captured = nodes_by_id(graph_of(view, "captured"))
    assert shape("model_layers_0_self_attn_q_proj_weight") == "float32[64, 64]"
    assert attrs(captured["model_layers_0_self_attn_q_proj_weight"])["module"] == q


# ---- overlays -----------------------------------------------------------------------------
@needs_explorer
def test_method_overlay_marks_exactly_the_inserted_nodes(cm, view):
    (method,) = view.node_data["peftc method"].graphsData.values()
    assert list(view.node_data["peftc method"].graphsData) == ["rewritten"]
    names = {n.name for n in inserted(cm.graph_module)}
    assert len(names) == 4 * 6 and set(method.results) == names  # A, B params; lora_A, lora_B, scale, add
    assert {(r.value, r.bgColor) for r in method.results.values()} == {("lora", explorer.PALETTE[0])}
    (opt,) = view.node_data["peftc optimization"].graphsData.values()
    assert opt.results == {}  # nothing optimized


@needs_explorer
def test_optimization_overlay_fused_ops(cm):
    fused = peftc.compile(tiny_model("tiny-llama"), {**SPEC, "optimize": ["fuse"]}, example_inputs("tiny-llama"))
    ops = {n.name for n in fused.graph_module.graph.nodes
           if n.op == "call_function" and getattr(n.target, "namespace", None) == "peftc"}
    assert len(ops) == 2  # q_proj and v_proj read the same x: one lora_siblings op per layer
    data = explorer.overlays(fused.graph_module.graph)
    results = data["peftc optimization"].graphsData["rewritten"].results
    assert set(results) == ops
    assert {(r.value, r.bgColor) for r in results.values()} == {("fused", explorer.OPTIMIZATION_COLOURS["fused"])}
    by_id = nodes_by_id(explorer.build_graph(fused.graph_module.graph, "rewritten", fused.graph_module))
    name = sorted(ops)[0]
    assert attrs(by_id[name])["peftc.optimization"] == "fused"
    shapes = [attrs(item)["tensor_shape"] for item in by_id[name].outputsMetadata]  # from its register_fake
    y, *rest = shapes  # y and h symbolic in the token count; the dropout bits empty without dropout
    assert re.fullmatch(r"float32\[.*s\d+.*\]", y) and rest and all(re.fullmatch(r"(float32\[.*s\d+.*\]|uint8\[0\])", s) for s in rest)


@needs_explorer
def test_optimization_overlay_reads_the_generic_meta_field():
    """A later pass (recompute, quantize, shard, or one not written yet) shows up by writing
    meta["peftc"]["optimization"]; nothing here names it."""
    gm = fx.symbolic_trace(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2)))
    nodes = [n for n in gm.graph.nodes if n.op == "call_module"]
    for n, what in zip(nodes, ("recomputed", "quantized", "wobbled")):
        n.meta["peftc"] = {"method": "lora", "adapter": "default", "module": n.target, "role": "base",
                           "optimization": what}
    out = next(n for n in gm.graph.nodes if n.op == "output")
    with gm.graph.inserting_before(out):  # a collective a sharding pass left without meta
        wait = gm.graph.call_function(torch.ops._c10d_functional.wait_tensor.default, (nodes[2],))
    results = explorer.overlays(gm.graph)["peftc optimization"].graphsData["rewritten"].results
    assert {k: (r.value, r.bgColor) for k, r in results.items()} == {
        nodes[0].name: ("recomputed", explorer.OPTIMIZATION_COLOURS["recomputed"]),
        nodes[1].name: ("quantized", explorer.OPTIMIZATION_COLOURS["quantized"]),
        nodes[2].name: ("wobbled", explorer.OTHER_OPTIMIZATION),
        wait.name: ("sharded", explorer.OPTIMIZATION_COLOURS["sharded"])}


# ---- export and split view ----------------------------------------------------------------
@needs_explorer
def test_static_export_files(view, tmp_path):
    written = view.export(tmp_path / "out")
    names = {p.name for p in (tmp_path / "out").iterdir()}
    assert names == {"captured.json", "rewritten.json", "peftc_method.json", "peftc_optimization.json"}
    assert set(written) == {"captured", "rewritten", "peftc method", "peftc optimization"}
    for gid in ("captured", "rewritten"):
        data = json.loads(written[gid].read_text())
        # the shape Model Explorer's JSON loader takes as one collection: {label, graphs: [...]}
        assert data["label"] == f"tiny-llama {gid}" and [g["id"] for g in data["graphs"]] == [gid]
        assert len(data["graphs"][0]["nodes"]) == len(graph_of(view, gid).nodes)
    method = json.loads(written["peftc method"].read_text())
    ids = {n["id"] for n in json.loads(written["rewritten"].read_text())["graphs"][0]["nodes"]}
    assert list(method) == ["rewritten"] and set(method["rewritten"]["results"]) <= ids
    assert len(method["rewritten"]["results"]) == 24
    assert "showExpandedSummaryOnGroupNode" not in method["rewritten"]  # see explorer.overlays


@needs_explorer
def test_split_view_url(view, tmp_path):
    view.export(tmp_path)
    data = json.loads(unquote(explorer.url(tmp_path, module="model.layers.0", select="linear_default",
                                           port=8123).split("?data=", 1)[1]))
    assert [m["url"] for m in data["models"]] == [str(tmp_path.resolve() / f) for f in ("captured.json", "rewritten.json")]
    assert sorted(data["nodeData"]) == sorted(str(tmp_path.resolve() / f) for f in explorer.OVERLAYS.values())
    assert data["nodeData"][-1].endswith("peftc_method.json")  # the page shows the last one
    assert data["nodeDataTargets"] == ["tiny-llama rewritten"] * 2
    left, right = data["uiState"]["paneStates"]
    assert (left["selectedGraphId"], left["selectedCollectionLabel"]) == ("captured", "tiny-llama captured")
    assert (right["selectedGraphId"], right["selectedCollectionLabel"]) == ("rewritten", "tiny-llama rewritten")
    assert left["widthFraction"] == right["widthFraction"] == 0.5 and right["selected"]
    assert "model/layers.0/self_attn/q_proj___group___" in right["deepestExpandedGroupNodeIds"]
    assert all(g.startswith("model/layers.0") for g in right["deepestExpandedGroupNodeIds"])
    assert right["selectedNodeId"] == "linear_default" and left["selectedNodeId"] == ""  # only the rewrite has it
    with pytest.raises(PeftcError, match="no layer for module 'model.layers.9'"):
        explorer.url(tmp_path, module="model.layers.9")


# ---- command line -------------------------------------------------------------------------
@needs_explorer
def test_cli_explorer_out(tmp_path, capsys):
    out = tmp_path / "graphs"
    rc = main(["inspect", "--model", "tiny-llama", "--spec", "examples/llama-lora.yaml", "--explorer-out", str(out),
               "--module", "model.layers.0"])
    assert rc == 0
    text = capsys.readouterr().out
    assert f"python -m peftc.explorer {out.resolve()} --module model.layers.0" in text
    assert f"model-explorer {out.resolve()}/captured.json,{out.resolve()}/rewritten.json" in text
    method = json.loads((out / "peftc_method.json").read_text())["rewritten"]["results"]
    assert len(method) == 2 * 4 * 7  # q, k, v, o LoRA on 2 layers, 7 nodes each (with dropout)


def test_cli_without_the_extra(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "model_explorer", None)  # import fails as if not installed
    rc = main(["inspect", "--model", "tiny-llama", "--spec", "examples/llama-lora.yaml", "--explorer-out",
               str(tmp_path / "x")])
    out = capsys.readouterr()
    assert rc == 2 and "Traceback" not in out.out + out.err
    assert "pip install 'peftc[explorer]'" in " ".join(out.out.split())
    assert not (tmp_path / "x").exists()


@needs_explorer
def test_compiled_model_explore_writes_the_export(cm, tmp_path, capsys):
    out = cm.explore(tmp_path / "e", serve=False)
    assert out == tmp_path / "e"
    assert json.loads((out / "rewritten.json").read_text())["label"] == "LlamaForCausalLM rewritten"
    assert len(json.loads((out / "peftc_method.json").read_text())["rewritten"]["results"]) == 24
    assert "python -m peftc.explorer" in capsys.readouterr().out
