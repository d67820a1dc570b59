"""The CPU-side logic of the one GPU check (scripts/gpu_check.sh): the script parses, and the GPU
branches of the reports (layer_gpu, step_time_gpu) render and judge issue 12's targets from
results shaped as a GPU run returns them, so a typo cannot waste the GPU's time. The script's
full dry run (`bash scripts/gpu_check.sh --dry-run`) takes minutes and is run by hand."""

import subprocess
from pathlib import Path

from peftc.benchmarks import layer, step_time
from peftc.benchmarks.report import write_section

ROOT = Path(__file__).resolve().parents[1]


def test_script_parses_and_has_every_step():
    subprocess.run(["bash", "-n", str(ROOT / "scripts" / "gpu_check.sh")], check=True)
    text = (ROOT / "scripts" / "gpu_check.sh").read_text()
    for step in ("-m pytest -q -m gpu", "-m benchmarks.layer --device cuda", "-m benchmarks.step_time --device cuda",
                 "-m benchmarks.quant_linear --gpu", "--dry-run"):
        assert step in text, step


def _row(ms):
    return {"median_ms": ms, "p10_ms": ms * 0.9, "p90_ms": ms * 1.1, "overhead_pct": 0.0}


def test_layer_report_judges_gpu_targets(tmp_path):
    result = {"config": {"device": "cuda", "tokens": 8192, "d": 4096, "r": 16, "reps": 50, "dtype": "bfloat16",
                         "adapter_dtype": "float32", "dropouts": [0.0], "breakdown_p": 0.0, "command": "x"},
              "environment": "H200", "breakdown": {"base GEMM y = x W^T + b": 0.5},
              "layers": {"0.0": {"frozen linear": _row(1.0), "PEFT unfused": _row(1.6), "peftc fused": _row(1.04)}}}
    text = layer._markdown(result)
    assert "| 0.0 | 1.040x | 1.538x | <= 1.05: met; >= 1.4: met |" in text
    result["layers"]["0.0"]["peftc fused"] = _row(1.2)
    assert "**not met**" in layer._markdown(result)
    write_section(tmp_path / "R.md", "layer_gpu", text)
    assert "layer_gpu:begin" in (tmp_path / "R.md").read_text()


def test_step_time_targets_on_gpu():
    v = {"frozen base": 100.0, "peft p=0.0": 150.0, "peftc fused p=0.0": 110.0, "peft p=0.0 +compile": 125.0}
    result = {"variants": {k: {"median_ms": ms} for k, ms in v.items()},
              "config": {"device": "cuda", "dropouts": [0.0], "r": 16, "hidden": 2048}}
    lines = "\n".join(step_time._targets(result))
    assert "Issue 12's GPU targets" in lines
    assert "| peftc fused p=0.0 tokens/s over peft p=0.0 | >= 1.3x | 1.36x | yes |" in lines
    assert "| peftc fused p=0.0 tokens/s over peft p=0.0 +compile | >= 1.1x | 1.14x | yes |" in lines
    result["config"]["device"] = "cpu"
    assert "| peftc fused p=0.0 vs peft p=0.0 | not slower | -26.7% | yes |" in "\n".join(step_time._targets(result))
