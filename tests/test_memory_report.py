"""peftc.memory: saved-for-backward bytes, attributed to nodes, each storage once; the fused
custom ops and checkpointed regions are seen; the CLI and the memory benchmark write it out."""

import importlib.util
import json
import sys
from pathlib import Path

import torch

import peftc
from peftc.memory import saved_for_backward, weight_bytes
from peftc.models import example_inputs, tiny_model

ROOT = Path(__file__).resolve().parents[1]
LORA = {"targets": "all-linear", "r": 4, "alpha": 8, "init": "random", "dropout": 0.1}


def test_storages_counted_once():
    x = torch.randn(64, requires_grad=True)

    def fn():
        y = x * 2  # y: 256 bytes; mul by a constant saves nothing
        z = y.view(8, 8)  # a view of y's storage
        return (y * y).sum() + (z * z).sum() + (y[:32] * y[:32]).sum()  # y saved 3 times, as views

    assert saved_for_backward(fn).total == 64 * 4


def test_parameters_are_weights_not_activations():
    lin = torch.nn.Linear(16, 16)
    x = torch.randn(4, 16, requires_grad=True)
    saved = saved_for_backward(lambda: lin(x).sum(), exclude=lin)
    assert saved.total == x.numel() * 4  # x for dW; W (saved for dx) is a parameter
    assert weight_bytes(lin) == (16 * 16 + 16) * 4


def test_fused_op_saves_are_seen():
    """lora_linear saves x, the r-wide h and the packed dropout bits (register_autograd): all count."""
    from peftc.kernels.lora_linear import lora_linear

    x = torch.randn(5, 7, 16, requires_grad=True)
    w, a, b = torch.randn(24, 16), torch.randn(4, 16, requires_grad=True), torch.randn(24, 4, requires_grad=True)
    saved = saved_for_backward(lambda: lora_linear(x, w, None, a, b, 2.0, 0.1, True).sum())
    seed = 8
    mask_bits = x.numel() // 8  # the dropout mask kept as packed bits (one per element of x)
    assert saved.total == (x.numel() + 5 * 7 * 4) * 4 + seed + mask_bits + w.numel() * 4 + a.numel() * 4 + b.numel() * 4


def _cm(optimize):
    return peftc.compile(tiny_model("tiny-llama"), {"methods": [{"lora": LORA}]}, example_inputs("tiny-llama"),
                         optimize=optimize)


def test_report_attributes_and_matches_plain_hooks():
    cm = _cm(["fuse"])
    inp = example_inputs("tiny-llama", batch=3, seq=9, seed=4)
    report = peftc.memory_report(cm, **inp)
    torch.manual_seed(0)
    plain = saved_for_backward(lambda: cm(**inp), exclude=cm)
    assert report.after.total == plain.total > 0
    assert report.after.by_kind["peftc.lora_linear.default"] > 0  # fused ops: x and h
    assert "linear.default" in report.before.by_kind and report.before.by_category["adapter"] > 0
    assert sum(report.after.by_module.values()) == sum(report.after.by_category.values()) == report.after.total
    assert any(k.endswith("self_attn") for k in report.after.by_module)
    assert report.weight_bytes == weight_bytes(cm)
    text = str(report)
    assert "saved for backward" in text and "by node kind" in text and "peftc.lora_linear.default" in text


def test_report_recompute_categories():
    inp = example_inputs("tiny-llama", batch=3, seq=9, seed=4)
    blocks = peftc.memory_report(_cm({"recompute": {"policy": "blocks"}}), **inp)
    assert blocks.after.by_category["recomputed"] > 0 and blocks.after.by_kind["checkpoint"] > 0
    assert blocks.after.total < 0.5 * blocks.before.total
    adapters = peftc.memory_report(_cm({"fuse": {}, "recompute": {}}), **inp)
    assert adapters.after.by_category["adapter"] < adapters.before.by_category["adapter"]
    assert any("recompute (adapters)" in n for n in adapters.notes)


def test_cli_inspect_memory(capsys):
    from peftc.cli import main

    assert main(["inspect", "--model", "tiny-llama", "--spec", str(ROOT / "examples" / "llama-lora.yaml"),
                 "--optimize", "fuse", "recompute", "--memory"]) == 0
    out = capsys.readouterr().out
    assert "saved for backward" in out and "by module" in out and "recompute (adapters)" in out


def _load_bench():
    spec = importlib.util.spec_from_file_location("bench_memory", ROOT / "benchmarks" / "memory.py")
    mod = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_memory_benchmark_writes_outputs(tmp_path):
    bench = _load_bench()
    res = bench.main(["--quick", "--out", str(tmp_path)])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["RESULTS.md", "memory.json", "memory.png"]
    data = json.loads((tmp_path / "memory.json").read_text())
    assert data["schema"] == "peftc.bench.memory/1"
    assert list(data["saved"]) == [n for n, _ in bench.VARIANTS]
    for name, r in data["saved"].items():
        assert r["saved_bytes"] > 0 and r["weight_bytes"] > 0
        if "recompute" in name:  # recompute is exact
            assert r["loss_diff"] <= 1e-5 and r["grad_diff"] <= 1e-5 and r["grads_compared"] > 0
    assert data["saved"]["peftc recompute adapters"]["saved_bytes"] < data["saved"]["peftc unfused"]["saved_bytes"]
    assert set(data["step_time"]) == set(bench.TIMED)
    assert (tmp_path / "memory.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (tmp_path / "RESULTS.md").read_text()
    assert md.count("<!-- memory:begin -->") == 1 and "peft + gradient checkpointing" in md
    bench.write(res, bench.MemConfig.quick(out=str(tmp_path), report=str(tmp_path / "RESULTS.md")))
    assert (tmp_path / "RESULTS.md").read_text().count("<!-- memory:begin -->") == 1  # the section is replaced, not added
