"""An optimized graph composes with torch.compile: no graph breaks, the peftc ops stay opaque (not
traced into), and inductor's code gives the eager graph's outputs and gradients."""

import copy

import pytest
import torch

import peftc
from peftc.models import example_inputs, tiny_model


@pytest.mark.slow
@pytest.mark.parametrize("optimize,op,dropout", [
    (["fuse"], "lora_linear", 0.1),  # fused LoRA
    ({"fuse": {}, "quantize": {}}, "quant_linear", 0.0),  # fused LoRA on an NF4 base
], ids=["fuse", "fuse+quantize"])
def test_optimized_model_compiles_without_graph_breaks(optimize, op, dropout):
    model = tiny_model("tiny-llama")
    spec = {"methods": [{"lora": {"targets": "all-linear", "r": 4, "alpha": 8, "init": "random", "dropout": dropout}}]}
    cm = peftc.compile(model, spec, example_inputs("tiny-llama"), optimize=optimize).eval()
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    cm(input_ids=ids, labels=ids)  # a new call signature is captured eagerly first (export cannot nest)
    explained = torch._dynamo.explain(cm)(input_ids=ids, labels=ids)
    assert explained.graph_break_count == 0, explained.break_reasons
    ops = [n.target for g in explained.graphs for n in g.graph.nodes if n.op == "call_function"]
    assert sum(t is getattr(torch.ops.peftc, op).default for t in ops) == 14  # opaque, not traced into

    twin = copy.deepcopy(cm)
    compiled = torch.compile(twin)
    ref = cm(input_ids=ids, labels=ids)
    out = compiled(input_ids=ids, labels=ids)
    torch.testing.assert_close(out.logits, ref.logits, atol=1e-5, rtol=1e-5)
    ref.loss.backward()
    out.loss.backward()
    mine = dict(twin.named_parameters())
    for name, p in cm.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(mine[name].grad, p.grad, atol=1e-5, rtol=1e-4)
