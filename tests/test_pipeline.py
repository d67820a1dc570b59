"""The one pipeline: model-level optimizations across adapters, and the import layering the
layout promises (IR < kernels < passes < runtime)."""

import ast
from pathlib import Path

import pytest
import torch

import peftc
from peftc.models import example_inputs, tiny_model

ROOT = Path(__file__).resolve().parents[1]

LORA = {"lora": {"targets": ["q_proj", "v_proj"], "r": 4, "alpha": 8}}


def _fused(cm) -> int:
    """LoRA sites the example graph's fuse pass rewrote (rebuilt for the running adapters)."""
    assert cm.graph_module is not None  # builds the example graph for the running adapters
    return cm.pass_counts["fuse"]


def _randomize(cm):
    with torch.no_grad():
        for p in cm.adapters.parameters():
            p.copy_(torch.randn_like(p) * 0.05)


@pytest.mark.parametrize("first", ["default", "b"])
def test_optimize_is_model_level_for_every_adapter(first):
    """Adapter b, added without ``optimize``, inherits the model's fuse: its sites fuse, and with
    both adapters running the same sites fuse whichever runs first (before, only the first
    running adapter's ``optimize`` applied); outputs equal the unoptimized graph."""
    cm = peftc.compile(tiny_model("tiny-llama"), {"methods": [LORA], "optimize": ["fuse"]},
                       example_inputs("tiny-llama")).eval()
    cm.add_adapter({"methods": [{"lora": {"targets": ["q_proj", "v_proj", "o_proj"], "r": 2}}]}, name="b")
    _randomize(cm)
    assert cm.registry.state("b").spec.optimize == {"fuse": {}}
    ids = example_inputs("tiny-llama", 3, 5, seed=1)["input_ids"]
    second = "b" if first == "default" else "default"
    for names, fused in ((["b"], 2 * 3), ([first, second], 2 * 3)):  # 2 layers; b: q, v, o
        cm.set_adapter(names)
        assert _fused(cm) == fused, names
        line = [x for x in cm.graph_summary().splitlines() if x.startswith("fuse: ")]
        if len(names) == 1:
            assert not line, line  # every site fused: no line
        else:  # the second adapter's LoRA on q/v adds to the first's output: no fused op for that (said)
            assert line == ["fuse: 6 of 10 adapter sites: 4 LoRA stacked on another adapter's output has no "
                            "fused op"], line
        with torch.no_grad():
            ref = cm.graph_for_call(input_ids=ids, optimized=False)(input_ids=ids, use_cache=False)
            torch.testing.assert_close(cm(input_ids=ids).logits, ref.logits, atol=1e-5, rtol=1e-5)


def test_a_different_optimize_per_adapter_is_an_error_naming_both():
    cm = peftc.compile(tiny_model("tiny-llama"), {"methods": [LORA], "optimize": ["fuse"]},
                       example_inputs("tiny-llama"))
    with pytest.raises(peftc.SpecError) as e:
        cm.add_adapter({"methods": [LORA], "optimize": {"recompute": {"policy": "blocks"}}}, name="b")
    assert "b.optimize" in str(e.value) and "'default'" in str(e.value) and "fuse" in str(e.value)
    assert cm.adapter_names == ["default"]  # nothing half-added
    cm.add_adapter({"methods": [LORA], "optimize": ["fuse"]}, name="c")  # the model's own: accepted
    assert cm.registry.state("c").spec.optimize == {"fuse": {}}


def test_gradient_checkpointing_changes_every_adapters_optimize():
    cm = peftc.compile(tiny_model("tiny-llama"), {"methods": [LORA]}, example_inputs("tiny-llama"))
    cm.add_adapter({"methods": [LORA]}, name="b")
    cm.gradient_checkpointing_enable()
    assert all(cm.registry.state(n).spec.optimize == {"recompute": {"policy": "blocks"}} for n in ("default", "b"))
    cm.add_adapter({"methods": [LORA]}, name="c")
    assert cm.registry.state("c").spec.optimize == {"recompute": {"policy": "blocks"}}


# ---- layering --------------------------------------------------------------------------------
IR = {"peftc.errors", "peftc.spec", "peftc.targets", "peftc.peft_files", "peftc.graph", "peftc.capture",
      "peftc.normalize", "peftc.repeat_layers", "peftc.resolve", "peftc.model_family", "peftc.recipes",
      "peftc.compat"}


def _layer(module: str) -> int:
    """0 IR, 1 kernels, 2 passes, 3 runtime."""
    if module in IR:
        return 0
    if module.startswith("peftc.kernels"):
        return 1
    if module.startswith("peftc.passes"):
        return 2
    return 3


def _modules() -> dict[str, Path]:
    out = {}
    for folder, package in (("peftc", "peftc"), ("passes", "peftc.passes"), ("kernels", "peftc.kernels")):
        for f in (ROOT / folder).rglob("*.py"):
            parts = f.relative_to(ROOT / folder).with_suffix("").parts
            out[".".join((package, *parts)).removesuffix(".__init__")] = f
    return out


def _imports(path: Path, modules: dict) -> set[str]:
    """Every peftc module ``path`` imports, at any depth (lazy imports inside functions too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("peftc"):
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in modules else node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("peftc"))
    return found


def test_no_module_imports_a_higher_layer():
    modules = _modules()
    assert {"peftc.passes.pipeline", "peftc.passes.methods.lora", "peftc.passes.optimize.fuse",
            "peftc.kernels.lora_linear", "peftc.compiled"} <= set(modules)
    upward = []
    for name, path in modules.items():
        if name in ("peftc", "peftc.passes"):  # the package entry points: they import what they expose
            continue
        for dep in _imports(path, modules):
            if _layer(dep) > _layer(name):
                upward.append(f"{name} (layer {_layer(name)}) imports {dep} (layer {_layer(dep)})")
    assert not upward, "\n".join(upward)


def test_kernels_share_no_private_names():
    modules = _modules()
    private = []
    for name, path in modules.items():
        if not name.startswith("peftc.kernels"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("peftc"):
                private += [f"{name}: {node.module}.{a.name}" for a in node.names if a.name.startswith("_")]
    assert not private, private


def test_the_runtime_names_no_method_or_optimization():
    """The runtime learns of methods and optimizations through the registry: it imports nothing
    from passes/methods or passes/optimize."""
    modules = _modules()
    named = [f"{name} imports {dep}" for name, path in modules.items() if _layer(name) == 3
             and name not in ("peftc", "peftc.cli") for dep in _imports(path, modules)
             if dep.startswith(("peftc.passes.methods", "peftc.passes.optimize"))]
    assert not named, named
