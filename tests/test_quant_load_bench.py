"""benchmarks/quant_load.py at tiny shapes: the files it writes and what it counts. RSS figures are
sampled and never asserted; bits per weight and bytes held are counted and are."""

import json

import pytest

from peftc.benchmarks import quant_load


@pytest.mark.slow
def test_quick_run_writes_json_plot_and_report_section(tmp_path):
    report = tmp_path / "RESULTS.md"
    report.write_text("# Results\n\nearlier section\n")
    result = quant_load.main(["--quick", "--out", str(tmp_path), "--report", str(report)])
    on_disk = json.loads((tmp_path / "quant_load.json").read_text())
    assert on_disk == json.loads(json.dumps(result)) and on_disk["schema"] == "peftc.bench.quant_load/1"
    bits = on_disk["bits"]
    assert 4.0 < bits["default"]["bits_per_weight"] < 4.3  # NF4 + double quant + the one-element placeholders
    assert 36.0 < bits["release_base: false"]["bits_per_weight"] < 36.3  # + the user's fp32 weights
    (load,) = on_disk["loads"].values()
    assert len(load["loaded"]) == 2  # the quantized weights, the tensors kept full precision
    assert load["loaded"][0].endswith("weights bfloat16 quantized to nf4") and load["store_bytes"] > 0
    assert load["peak_rss"] >= load["start_rss"] > 0
    assert (tmp_path / "quant_load.png").stat().st_size > 0
    text = report.read_text()
    assert "earlier section" in text and "## Quantized base: bits held" in text and "--quick --out" in text
