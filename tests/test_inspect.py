"""peftc.inspection on a real LoRA rewrite of tiny-llama and on hand-built fx graphs."""

import re
import xml.etree.ElementTree as ET

import matplotlib
import pytest
from torch import fx, nn

import peftc
from peftc import capture
from peftc import inspection as pi
from peftc.models import example_inputs, tiny_model

LAYERS = ("model.layers.0", "model.layers.1")
SVG = "{http://www.w3.org/2000/svg}"


@pytest.fixture(scope="module")
def cm():
    spec = {"methods": [{"lora": {"targets": ["q_proj", "v_proj"], "r": 4, "dropout": 0.1}}]}
    return peftc.compile(tiny_model("tiny-llama"), spec, example_inputs("tiny-llama"))


def inserted(graph: fx.Graph) -> list[fx.Node]:
    return [n for n in graph.nodes if "peftc" in n.meta]


def node_ids(path) -> set[str]:
    """Names of the nodes drawn: matplotlib writes each label as <g id="node-NAME">."""
    root = ET.parse(path).getroot()
    return {g.get("id")[5:] for g in root.iter(f"{SVG}g") if (g.get("id") or "").startswith("node-")}


def svg_text(path) -> str:
    return "\n".join(t.text or "" for t in ET.parse(path).getroot().iter(f"{SVG}text"))


def traced() -> fx.GraphModule:
    return fx.symbolic_trace(nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 2)))


# ---- summarize ----------------------------------------------------------------------------
def test_summary_rows_per_module(cm):
    text = cm.graph_summary()
    lines = text.splitlines()
    for layer in LAYERS:
        for proj, out_features, numel in (("q_proj", 64, 4 * 64 + 64 * 4), ("v_proj", 32, 4 * 64 + 32 * 4)):
            i = next(i for i, line in enumerate(lines) if f"{layer}.self_attn.{proj} " in line)
            row = lines[i]
            assert re.search(r"\blora\b", row)
            assert "param, dropout, lora_A, lora_B, scale, add" in row  # roles, in graph order
            assert re.search(r"\s7\s", row)  # 2 params + dropout, A, B, scale, add
            assert "lora_A (4, 64)" in row and row.rstrip().endswith(f"{numel:,}")
            assert f"lora_B ({out_features}, 4)" in lines[i + 1]
    assert "k_proj" not in text and "o_proj" not in text


def test_summary_totals(cm):
    before, after = cm.captured_graph, cm.graph_module.graph
    params = list(cm.adapters.parameters())
    assert len(params) == 8
    text = cm.graph_summary()
    n_ins = len(inserted(after))
    assert n_ins == 4 * 7
    removed = len({n.name for n in before.nodes} - {n.name for n in after.nodes})
    assert (f"nodes: {len(before.nodes)} captured -> {len(after.nodes)} rewritten "
            f"({n_ins} inserted, {removed} removed)") in text
    assert f"adapter parameters: 8 tensors, {sum(p.numel() for p in params):,} values" in text
    assert "1,792 values" in text
    # without the captured graph: only the rewritten graph's counts
    alone = pi.summarize(cm.graph_module)
    assert f"nodes: {len(after.nodes)}, {n_ins} inserted;" in alone and "captured" not in alone


def test_summary_no_adapter_nodes():
    gm = traced()
    n = len(gm.graph.nodes)
    text = pi.summarize(gm, gm.graph)
    assert text.startswith("no adapter nodes")
    assert f"nodes: {n} captured -> {n} rewritten (0 inserted, 0 removed)" in text
    assert pi.summarize(gm).strip() == f"no adapter nodes; nodes: {n}, 0 inserted"


def test_summary_other_method_adapter_and_shared_tensor():
    """A train-style param_swap with a named adapter, read twice: one tensor, counted once."""
    gm = traced()
    gm.get_submodule("0").add_module("modules_to_save", nn.ModuleDict({"mine": nn.Linear(8, 4)}))
    first = next(n for n in gm.graph.nodes if n.op == "call_module")
    info = {"method": "train", "adapter": "mine", "module": "0", "role": "param_swap"}
    with gm.graph.inserting_before(first):
        for _ in range(2):
            gm.graph.get_attr("0.modules_to_save.mine.weight").meta["peftc"] = dict(info)
    text = pi.summarize(gm)
    row = next(line for line in text.splitlines() if "train@mine" in line)
    assert "param_swap" in row and "(4, 8)" in row and row.rstrip().endswith("32")
    assert "adapter parameters: 1 tensors, 32 values" in text


# ---- graph_text and diff ------------------------------------------------------------------
def test_graph_text_marks_inserted_nodes(cm):
    graph = cm.graph_module.graph
    text = pi.graph_text(graph)
    lines = text.splitlines()
    assert len(lines) == len(graph.nodes) and text == pi.graph_text(graph)
    assert sum("[lora:" in line for line in lines) == len(inserted(graph))
    a = next(n for n in inserted(graph)
             if n.meta["peftc"] == {"method": "lora", "adapter": "default", "role": "lora_A",
                                    "module": "model.layers.0.self_attn.q_proj"})
    line = lines[list(graph.nodes).index(a)]
    assert line.startswith(f"{a.name} = call_function aten.linear.default({a.args[0].name}, {a.args[1].name}")
    assert line.endswith("  [lora:lora_A]")
    param = a.args[1]
    assert pi.node_line(param) == (f"{param.name} = get_attr "
                                   "model.layers.0.self_attn.q_proj.lora.default.lora_A.weight  [lora:param]")
    assert not any(re.search(r"\[\w+:\w+\]$", x) for x in pi.graph_text(traced().graph).splitlines())


def test_diff_adds_inserted_nodes_and_rewires_consumers(cm):
    before, after = cm.captured_graph, cm.graph_module.graph
    text = pi.diff(before, after)
    lines = text.splitlines()
    assert lines[0] == "--- captured" and lines[1] == "+++ rewritten"
    plus = [x[1:] for x in lines[2:] if x.startswith("+")]
    minus = [x[1:] for x in lines[2:] if x.startswith("-")]
    # every inserted node is a + line, and every marked + line is an inserted node
    assert sorted(x for x in plus if "[lora:" in x) == sorted(pi.node_line(n) for n in inserted(after))
    name = lambda line: line.split(" = ", 1)[0]
    after_names = {n.name for n in after.nodes}
    rewired = [x for x in plus if "[lora:" not in x]
    # the other + lines: captured nodes that now read an adapter's output (the "add" node)
    adds = {n.name for n in inserted(after) if n.meta["peftc"]["role"] == "add"}
    assert len(rewired) == len(adds) == 4
    assert all(any(re.search(rf"\b{a}\b", x) for a in adds) for x in rewired)
    # - lines are only those consumers' old versions, or nodes the pipeline removed (dce)
    assert all("[lora:" not in x for x in minus)
    assert {name(x) for x in rewired} <= {name(x) for x in minus}
    assert all(name(x) in {name(y) for y in rewired} or name(x) not in after_names for x in minus)
    assert pi.diff(before, before) == ""


# ---- to_svg -------------------------------------------------------------------------------
def test_svg_full_graph(cm, tmp_path):
    graph = cm.graph_module.graph
    fonttype = matplotlib.rcParams["svg.fonttype"]
    out = cm.draw(tmp_path / "sub" / "g.svg")
    assert out == tmp_path / "sub" / "g.svg" and out.is_file()
    assert [p.name for p in out.parent.iterdir()] == ["g.svg"]  # no temp file left behind
    assert matplotlib.rcParams["svg.fonttype"] == fonttype  # global rc state untouched
    assert node_ids(out) == {n.name for n in graph.nodes}
    text = svg_text(out)
    for n in inserted(graph):
        if n.op != "get_attr":
            assert n.name in text
    for label in ("[lora:lora_A]", "[lora:lora_B]", "[lora:scale]", "[lora:add]", "[lora:param]",
                  "q_proj.lora_A", "v_proj.lora_B"):
        assert label in text
    assert "inserted by lora" in text and "captured" in text
    assert f"{len(graph.nodes)} nodes, {len(inserted(graph))} inserted" in text
    assert "context input" not in text


def test_svg_module_filter(cm, tmp_path):
    graph = cm.graph_module.graph
    out = pi.to_svg(graph, tmp_path / "l0.svg", module="model.layers.0")
    drawn = node_ids(out)
    assert 0 < len(drawn) < len(graph.nodes) / 2
    ins = {n.name for n in inserted(graph)}
    layer0 = {n.name for n in inserted(graph) if n.meta["peftc"]["module"].startswith("model.layers.0.")}
    assert ins & drawn == layer0 and len(layer0) == 14
    text = svg_text(out)
    assert "context input" in text and "(module model.layers.0)" in text
    assert f"{len(drawn)} nodes, 14 inserted" in text
    # context: inputs of kept nodes, e.g. the input of the first decoder layer (the embedding)
    assert "embedding" in drawn
    assert not any((capture.owning_module(n) or "").startswith("model.layers.1.") for n in graph.nodes
                   if n.name in drawn)
    smaller = node_ids(pi.to_svg(graph, tmp_path / "q.svg", module="model.layers.0.self_attn.q_proj"))
    assert len(smaller) < len(drawn)
    # same graph, same bytes: stable ids and no date
    again = pi.to_svg(graph, tmp_path / "l0b.svg", module="model.layers.0")
    assert again.read_bytes() == out.read_bytes()


def test_svg_limits_and_errors(cm, tmp_path):
    graph = cm.graph_module.graph
    with pytest.raises(ValueError, match=rf"{len(graph.nodes)} nodes.*max_nodes=50.*module="):
        pi.to_svg(graph, tmp_path / "big.svg", max_nodes=50)
    with pytest.raises(ValueError, match="no nodes owned by module 'model.layers.7'"):
        pi.to_svg(graph, tmp_path / "none.svg", module="model.layers.7")
    assert list(tmp_path.iterdir()) == []


def test_svg_no_adapter_nodes(tmp_path):
    gm = traced()
    out = pi.to_svg(gm.graph, tmp_path / "plain.svg")
    assert node_ids(out) == {n.name for n in gm.graph.nodes}
    assert "inserted by" not in svg_text(out) and "0 inserted" in svg_text(out)


def test_owning_module_reexported(cm):
    assert pi.owning_module is capture.owning_module
    a = next(n for n in inserted(cm.graph_module.graph) if n.meta["peftc"]["role"] == "lora_A")
    assert pi.owning_module(a) == a.meta["peftc"]["module"]
