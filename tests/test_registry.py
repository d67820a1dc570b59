"""The method registry: a method is one declaration (its class), the pipeline order comes from
the phases methods declare, and every file of peftc.passes is loaded without a hand-kept list."""

import copy
import pkgutil
import sys
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import nn

import peftc
from peftc import passes
from peftc.models import example_inputs, tiny_model
from peftc.passes import pipeline
from peftc.passes.methods.linear import LinearMethod
from peftc.passes.pipeline import register_method, register_optimization
from peftc.spec import METHODS, OPTIMIZATIONS, Merging, Sites, Spec


@pytest.fixture
def shift_method():
    """A method defined entirely here, as a new passes/<m>.py would: y -> y + beta per channel."""

    class Shift(nn.Module):
        def __init__(self, features: int, like: torch.Tensor):
            super().__init__()
            self.beta = nn.Parameter(torch.zeros(features, dtype=like.dtype, device=like.device))

    @register_method("test_shift", phase="scale")
    @dataclass(frozen=True)
    class ShiftSpec(LinearMethod):
        targets: Any = "all-linear"

        def make_module(self, target, ctx):
            return Shift(target.out_features, target.weight)

        def delta(self, ins, target, path, ctx):
            return ins.get_attr(f"{path}.beta")

        def fold(self, path, module, w, b, transposed):
            return w, (b if b is not None else 0) + module.beta

    yield ShiftSpec
    del METHODS["test_shift"]


def test_a_method_is_one_declaration(shift_method):
    model = tiny_model("tiny-torch", dropout=0.0).eval()
    spec = {"methods": [{"test_shift": {"targets": ["fc2", "head"]}}, {"lora": {"targets": ["fc2"], "r": 2}}]}
    cm = peftc.compile(model, spec, example_inputs("tiny-torch")).eval()
    assert cm.pass_counts["test_shift"] == 3  # fc2 in both layers, and the head
    assert [n for n, _ in pipeline.rewrite_passes(cm.spec)] == ["select", "lora", "test_shift", "dce"]
    with torch.no_grad():
        for p in cm.adapters.parameters():
            p.copy_(torch.randn_like(p) * 0.1)  # non-zero: LoRA's B and the shifts start at zero
    # eager reference: each targeted layer's output plus its shift, and LoRA's term by hand
    ref = copy.deepcopy(model)
    hooks = []
    for path in ("layers.0.fc2", "layers.1.fc2", "head"):
        beta = cm.adapters.get_parameter(f"{path}.test_shift.default.beta")
        lora = cm.adapters.get_submodule(f"{path}.lora.default") if path != "head" else None

        def hook(mod, args, out, beta=beta, lora=lora):
            if lora is not None:
                out = out + lora.lora_B(lora.lora_A(args[0])) * (8 / 2)
            return out + beta
        hooks.append(ref.get_submodule(path).register_forward_hook(hook))
    x = example_inputs("tiny-torch", 3, 5, seed=1)["x"]  # another shape than the captured one
    with torch.no_grad():
        expected = ref(x)
        torch.testing.assert_close(cm(x), expected, atol=1e-5, rtol=0)
        assert (cm(x) - model(x)).abs().max() > 1e-3
    cm2 = peftc.compile(tiny_model("tiny-torch", dropout=0.0).eval(),
                        {"methods": [{"test_shift": {"targets": ["fc2", "head"]}}]}, example_inputs("tiny-torch"))
    with torch.no_grad():
        for n, p in cm2.adapters.named_parameters():
            p.copy_(cm.adapters.get_parameter(n))
        unmerged = cm2.eval()(x)
        cm2.merge()  # merging comes from the class's ``merging`` (FOLD) and ``fold``
        torch.testing.assert_close(cm2(x), unmerged, atol=1e-5, rtol=0)
    assert not any(n.meta.get("peftc", {}).get("method") == "test_shift" for n in cm2.graph_module.graph.nodes)


def test_pipeline_order_comes_from_phases():
    spec = Spec.from_dict({"methods": [{"ssf": {}}, {"prompt": {}}, {"ia3": {"targets": ["q_proj"]}},
                                       {"lora": {"targets": ["v_proj"]}}, {"train": {"targets": ["lm_head"]}},
                                       {"bitfit": {}}]})
    names = [n for n, _ in pipeline.rewrite_passes(spec)]
    assert names == ["select", "train", "bitfit", "lora", "ssf", "ia3", "prompt", "dce"]  # in a phase: spec order
    for cls in METHODS.values():
        assert cls.phase in pipeline.REWRITE_PHASES or (cls.phase is None and cls.sites is Sites.GRAPH), cls
        assert (cls.merging is Merging.FOLD) == hasattr(cls, "fold"), cls


def test_unmergeable_and_unknown_phase_are_errors():
    with pytest.raises(peftc.PassError, match="cannot be merged"):
        pipeline.merge_passes(Spec.from_dict({"methods": [{"prompt": {}}]}))
    with pytest.raises(peftc.PassError, match="'nowhere'.*reparameterize"):  # checked when it registers
        register_method("test_nowhere", phase="nowhere")
    with pytest.raises(peftc.PassError, match="'select'.*fuse"):
        register_optimization("test_early", phase="select")
    with pytest.raises(RuntimeError, match="registered twice"):
        register_optimization("fuse", phase="fuse")(lambda gm, ctx: None)
    assert "test_nowhere" not in METHODS and "test_early" not in OPTIMIZATIONS


@pytest.fixture
def count_linears():
    """An optimization defined entirely here, as a new passes/optimize/<o>.py would: it marks
    every frozen linear (a no-op rewrite) and reports the adapted ones as not matched."""

    @register_optimization("test_count", phase="recompute", check=lambda settings: None)
    def count(gm, ctx):
        cov = ctx.coverage("test_count", "linears")
        for node in gm.graph.nodes:
            if node.target is torch.ops.aten.linear.default and "peftc" not in node.meta:  # base linears
                adapted = any(u.meta.get("peftc") for u in node.users)
                cov.miss("adapted by LoRA") if adapted else cov.hit()
        ctx.counts["test_count"] += cov.matched
        return pipeline.PassResult(gm, False)

    yield count
    del OPTIMIZATIONS["test_count"]


def test_an_optimization_is_one_declaration(count_linears):
    model = tiny_model("tiny-torch", dropout=0.0).eval()
    spec = {"methods": [{"lora": {"targets": ["fc2"], "r": 2}}], "optimize": ["test_count", "fuse"]}
    cm = peftc.compile(model, spec, example_inputs("tiny-torch"))
    assert [n for n, _ in pipeline.optimize_passes(cm.spec.optimize)] == ["fuse", "test_count"]  # phase order
    assert cm.pass_counts["test_count"] == 7  # every linear but the fused fc2s (no aten.linear any more)
    with pytest.raises(peftc.SpecError, match="test_coun"):
        Spec.from_dict({"methods": [{"lora": {"targets": ["q_proj"]}}], "optimize": ["test_coun"]})
    assert "test_count:" not in cm.graph_summary()  # every linear it looked at was matched
    cm2 = peftc.compile(tiny_model("tiny-torch", dropout=0.0).eval(), {**spec, "optimize": ["test_count"]},
                        example_inputs("tiny-torch"))
    assert "test_count: 7 of 9 linears: 2 adapted by LoRA\n" in cm2.graph_summary()


def test_a_lowering_is_not_a_setting():
    with pytest.raises(peftc.SpecError, match="sgmv"):
        Spec.from_dict({"methods": [{"lora": {"targets": ["q_proj"]}}], "optimize": ["sgmv"]})


def test_every_passes_module_is_loaded():
    names = [m.name for m in pkgutil.walk_packages(passes.__path__, "peftc.passes.")]
    assert {"peftc.passes.methods.lora", "peftc.passes.methods.ssf", "peftc.passes.optimize.fuse",
            "peftc.passes.merge", "peftc.passes.methods.linear", "peftc.passes.pipeline"} <= set(names)
    assert all(n in sys.modules for n in names)
