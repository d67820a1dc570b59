"""Never silent: an optimization that matches nothing, or only part of what it could, says so in
``graph_summary()`` with the reasons (its ``Coverage``); a full match adds no such line.
(fuse, sgmv and shard have their own report tests.)"""

import pytest

import peftc
from peftc.models import example_inputs, tiny_model

LORA_QV = {"lora": {"targets": ["q_proj", "v_proj"], "r": 4}}


def _lines(cm, name):
    """The coverage lines of optimization ``name`` ("name: ..."), not its own detail lines."""
    return [x for x in cm.graph_summary().splitlines() if x.startswith(f"{name}: ")]


def _compile(name, methods, optimize, **overrides):
    return peftc.compile(tiny_model(name, **overrides), {"methods": methods}, example_inputs(name), optimize=optimize)


# ---- quantize: unit "frozen linear weights" (tiny-llama: 14 in the blocks + the head) ----------
@pytest.mark.parametrize("settings, line", [
    ({"skip": "re:.*"}, "quantize: 0 of 15 frozen linear weights: 15 in optimize.quantize.skip"),
    ({"skip": ["mlp"]}, "quantize: 9 of 15 frozen linear weights: 6 in optimize.quantize.skip"),
    ({}, "quantize: 14 of 15 frozen linear weights: 1 output head (skipped by default)"),
], ids=["skip-everything", "skip-mlp", "default-head"])
def test_quantize_reports_what_it_left_out(settings, line):
    cm = _compile("tiny-llama", [LORA_QV], {"quantize": settings})
    assert _lines(cm, "quantize") == [line]
    assert cm.pass_counts["quantize"] == int(line.split()[1])


def test_quantize_reports_a_tied_head_kept_full_precision():
    cm = _compile("tiny-gpt2", [{"lora": {"targets": ["c_attn"], "r": 4}}], {"quantize": {"skip": []}})
    assert _lines(cm, "quantize")[0] == ("quantize: 8 of 9 frozen linear weights: 1 kept full precision: "
                                         "also read by aten.embedding.default, aten.linear.default")


def test_quantize_full_match_has_no_coverage_line():
    cm = _compile("tiny-llama", [LORA_QV], {"quantize": {"skip": []}})
    assert cm.pass_counts["quantize"] == 15
    assert _lines(cm, "quantize") == []


# ---- recompute: unit per policy ----------------------------------------------------------------
def test_recompute_blocks_on_a_model_without_repeated_blocks():
    cm = _compile("tiny-llama", [LORA_QV], {"recompute": {"policy": "blocks"}}, num_hidden_layers=1)
    assert _lines(cm, "recompute") == ["recompute: matched nothing: no repeated blocks in this graph"]
    assert cm.pass_counts["recompute_blocks"] == 0


def test_recompute_blocks_full_match_has_no_coverage_line():
    cm = _compile("tiny-llama", [LORA_QV], {"recompute": {"policy": "blocks"}})
    assert cm.pass_counts["recompute_blocks"] == 2
    assert _lines(cm, "recompute") == []


def test_recompute_adapters_with_no_adapter_input_to_recompute():
    """BitFit trains bias copies: no adapter op saves an input, so the policy has nothing to do."""
    cm = _compile("tiny-gpt2", [{"bitfit": {"targets": ["c_attn"]}}], {"recompute": {}})
    assert _lines(cm, "recompute") == [
        "recompute: matched nothing: no adapter inputs saved beyond the base's in this graph"]


def test_recompute_adapters_reports_inputs_it_keeps():
    """Layer 0's norm reads the embedding output, which needs no gradient, so the base keeps nothing
    to recompute LoRA's input there from; layer 1's input is recomputed from what the base keeps.
    With adapter dropout every input is recomputed (from its mask bits)."""
    cm = _compile("tiny-llama", [LORA_QV], {"recompute": {}})
    assert _lines(cm, "recompute") == [
        "recompute: 1 of 2 adapter inputs saved beyond the base's: 1 not cheaply recomputable (kept)"]
    full = _compile("tiny-llama", [{"lora": {**LORA_QV["lora"], "dropout": 0.1}}], {"recompute": {}})
    assert full.pass_counts["recompute_adapters"] == 4  # q and v dropouts, in both layers
    assert _lines(full, "recompute") == []
