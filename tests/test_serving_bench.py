"""benchmarks/serving.py in quick mode through ``peftc bench --serving``: the files it writes and that
what it times is right (segmented equals masked and each sample alone); times are never asserted."""

import json

from peftc.cli import main


def test_quick_serving_bench_writes_json_png_and_report(tmp_path):
    assert main(["bench", "--serving", "--quick", "--out", str(tmp_path), "--reps", "1"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["RESULTS.md", "serving.json", "serving.png"]
    res = json.loads((tmp_path / "serving.json").read_text())
    for key in ("prefill", "decode"):
        times = res[key]["times"]
        for n in res["config"]["adapters"]:
            assert {f"segmented n={n}", f"masked n={n}"} <= set(times)
            check = res[key]["checks"][str(n)]
            assert check["segmented_vs_masked"] < 1e-5 and check["a0_rows_vs_alone"] < 1e-5
        assert times["one adapter"]["x_one_adapter"] == 1.0 and times["merged"]["median_ms"] > 0
    text = (tmp_path / "RESULTS.md").read_text()
    assert "<!-- serving:begin -->" in text and "| 4 |" in text
