"""The SVG drawing's edges are arrows: one per fx edge, whose head's tip touches the border of
the box of the node it points to (not hidden under the box, not short of it)."""

import re
import xml.etree.ElementTree as ET

import pytest
import torch
from torch import fx

import peftc
from peftc.capture import owning_module
from peftc.models import example_inputs, tiny_model

SVG = "{http://www.w3.org/2000/svg}"


def groups(path, prefix: str) -> dict[str, ET.Element]:
    root = ET.parse(path).getroot()
    return {g.get("id")[len(prefix):]: g for g in root.iter(f"{SVG}g") if (g.get("id") or "").startswith(prefix)}


def points(d: str) -> list[tuple[float, float]]:
    nums = [float(x) for x in re.findall(r"-?\d+(?:\.\d+)?", d)]
    return list(zip(nums[::2], nums[1::2]))


def check_arrows(path, edges: set[tuple[str, str]]) -> None:
    boxes = {name: points(next(g.iter(f"{SVG}path")).get("d")) for name, g in groups(path, "node-").items()}
    arrows = groups(path, "edge-")
    assert set(arrows) == {f"{a}-{b}" for a, b in edges}
    for a, b in edges:
        line, head = arrows[f"{a}-{b}"].findall(f"{SVG}path")
        assert head.get("d").rstrip().endswith("z")  # a closed, filled head
        assert "fill: none" not in head.get("style")
        tip = points(head.get("d"))[1]  # M base L tip L base z
        xs, ys = zip(*boxes[b])
        x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
        gap = ((max(x0 - tip[0], 0, tip[0] - x1)) ** 2 + (max(y0 - tip[1], 0, tip[1] - y1)) ** 2) ** 0.5
        depth = min(tip[0] - x0, x1 - tip[0], tip[1] - y0, y1 - tip[1])  # > 0: inside the box
        assert gap < 2.0 and depth < 1.0, (a, b, tip, (x0, x1, y0, y1))  # ends at the border (pt)


def test_traced_module_arrows(tmp_path):
    gm = fx.symbolic_trace(torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2)))
    from peftc import inspection as drawing

    path = drawing.to_svg(gm.graph, tmp_path / "seq.svg")
    check_arrows(path, {(a.name, n.name) for n in gm.graph.nodes for a in n.all_input_nodes})


@pytest.mark.parametrize("module", ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn"])
def test_lora_module_arrows(tmp_path, module):
    spec = {"methods": [{"lora": {"targets": ["q_proj", "v_proj"], "r": 4, "dropout": 0.1}}]}
    cm = peftc.compile(tiny_model("tiny-llama"), spec, example_inputs("tiny-llama"))
    path = cm.draw(tmp_path / "m.svg", module=module)
    drawn = set(groups(path, "node-"))
    def owner(n):
        return owning_module(n) or (n.target.rpartition(".")[0] if n.op == "get_attr" else "")

    owned = {n.name for n in cm.graph_module.graph.nodes if n.name in drawn
             and (owner(n) == module or (owner(n) or "").startswith(module + "."))}
    # context inputs (drawn, not owned) get no incoming arrows
    edges = {(a.name, n.name) for n in cm.graph_module.graph.nodes if n.name in owned
             for a in n.all_input_nodes if a.name in drawn}
    assert len(edges) >= 8
    check_arrows(path, edges)
