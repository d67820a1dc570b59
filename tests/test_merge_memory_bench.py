"""benchmarks/merge_memory.py at tiny shapes: the files it writes, their schema, and the
correctness it checks (merged logits, the saved directory, bit-exact unmerge). Memory figures
are sampled RSS and never asserted; the merged tensor bytes are counted and are."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load():
    spec = importlib.util.spec_from_file_location("merge_memory", ROOT / "benchmarks" / "merge_memory.py")
    mod = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
def test_quick_run_writes_json_and_report_section(tmp_path):
    bench = _load()
    report = tmp_path / "RESULTS.md"
    report.write_text("# Results\n\nearlier section\n")
    result = bench.main(["--quick", "--out", str(tmp_path), "--report", str(report)])
    on_disk = json.loads((tmp_path / "merge_memory.json").read_text())
    assert on_disk["schema"] == "peftc.bench.merge_memory/1" and on_disk["after"] == result["after"]
    after = on_disk["after"]
    assert set(after["phases"]) == {"merge", "save_merged", "unmerge", "save_merged_unmerged"}
    assert all(p["peak_rss"] >= p["start_rss"] > 0 for p in after["phases"].values())
    assert after["unmerge_bit_exact"] and after["signatures"] == 3
    assert after["merged_vs_unmerged_max_abs"] <= 1e-5 and after["saved_vs_unmerged_max_abs"] <= 1e-5
    assert after["saved_files"] == ["config.json", "generation_config.json", "model.safetensors"]
    s = after["shapes"]
    weight_bytes = 4 * s["layers"] * (4 * s["hidden"] ** 2 + 3 * s["hidden"] * s["intermediate"])
    # in place: restore records + the adapter snapshot, far less than one copy of the merged weights
    assert 0 < after["merged_tensor_bytes"] < 0.5 * weight_bytes
    assert "| after (" in report.read_text() and "| before (" not in report.read_text()
    bench.write({**result, "before": result["after"]}, tmp_path, report)  # the section is replaced
    text = report.read_text()
    assert text.startswith("# Results\n\nearlier section\n") and text.count("<!-- merge_memory:begin -->") == 1
    assert "| before (" in text and "| after (" in text
