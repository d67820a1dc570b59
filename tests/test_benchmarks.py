"""benchmarks/step_time.py in quick mode: the files it writes, their schema, and that peftc's
and HF PEFT's step-0 losses agree (correctness of what is timed; times are never asserted)."""

import importlib
import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load():
    """The benchmark is a script directory, not an installed package: load it by path."""
    spec = importlib.util.spec_from_file_location("step_time", ROOT / "benchmarks" / "step_time.py")
    mod = sys.modules[spec.name] = importlib.util.module_from_spec(spec)  # dataclasses look it up
    spec.loader.exec_module(mod)
    return mod


step_time = _load()
report = importlib.import_module("peftc.benchmarks.report")
STAT_KEYS = {"median_ms", "min_ms", "max_ms", "q1_ms", "q3_ms", "samples_ms",
             "overhead_pct", "overhead_paired_pct", "overhead_min_pct"}


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    result = step_time.main(["--quick", "--out", str(out), "--reps", "3", "--no-progress",
                             "--dropout", "0.0", "0.1", "--note", "test run"])
    return out, result


def test_quick_writes_json_png_and_report(quick):
    out, result = quick
    assert sorted(p.name for p in out.iterdir()) == ["RESULTS.md", "step_time.json", "step_time.png"]
    on_disk = json.loads((out / "step_time.json").read_text())
    assert on_disk["variants"] == result["variants"]
    assert on_disk["schema"] == "peftc.bench.step_time/1"
    names = ["frozen base", "peft p=0.0", "peftc p=0.0", "peftc fused p=0.0", "peft p=0.1", "peftc p=0.1",
             "peftc fused p=0.1", "peftc fused+shared p=0.1"]
    assert list(on_disk["variants"]) == names
    for s in on_disk["variants"].values():
        assert set(s) == STAT_KEYS
        assert len(s["samples_ms"]) == 3
        assert s["min_ms"] <= s["q1_ms"] <= s["median_ms"] <= s["q3_ms"] <= s["max_ms"]
    base = on_disk["variants"]["frozen base"]
    assert base["overhead_pct"] == base["overhead_paired_pct"] == base["overhead_min_pct"] == 0.0
    assert on_disk["config"]["dropouts"] == [0.0, 0.1] and on_disk["config"]["reps"] == 3
    assert {"device", "cpu_count", "torch", "transformers", "peft"} <= set(on_disk["environment"])
    assert on_disk["trainable_params"]["frozen base"] == 0
    for p in ("0.0", "0.1"):  # the lora pass rewrote all 7 linears of both layers
        assert on_disk["peftc_pass_counts"][f"peftc p={p}"]["lora"] == 7 * 2
        assert on_disk["peftc_pass_counts"][f"peftc fused p={p}"]["fuse"] == 7 * 2
    assert on_disk["trainable_params"]["peftc p=0.0"] == on_disk["trainable_params"]["peft p=0.0"] > 0
    assert (out / "step_time.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "RESULTS.md").read_text()
    assert "--quick --out" in md and "test run" in md and "torch " in md and "peft " in md
    assert all(f"| {n} |" in md for n in names)


def test_step0_losses_peftc_equal_peft(quick):
    _, result = quick
    loss = result["step0_loss"]
    for p in ("0.0", "0.1"):  # same seed before each: dropout masks agree too
        assert loss[f"peftc p={p}"] == pytest.approx(loss[f"peft p={p}"], abs=1e-5)
    # fused: exact without dropout; with dropout its own mask (another generator), so only close
    assert loss["peftc fused p=0.0"] == pytest.approx(loss["peft p=0.0"], abs=1e-5)
    assert loss["peftc fused p=0.1"] == pytest.approx(loss["peft p=0.1"], abs=5e-2)
    # the adapters are non-zero, so the comparison is not base == base
    assert abs(loss["peft p=0.0"] - loss["frozen base"]) > 1e-4
    assert abs(loss["peft p=0.1"] - loss["peft p=0.0"]) > 1e-6


def test_run_api_and_atomic_write(tmp_path):
    cfg = step_time.BenchConfig.quick(out=str(tmp_path / "o"), report=str(tmp_path / "R.md"), reps=1,
                                      warmup=1, dropouts=(0.0,), progress=False)
    result = step_time.run(cfg)
    assert list(result["variants"]) == ["frozen base", "peft p=0.0", "peftc p=0.0", "peftc fused p=0.0"]
    assert (tmp_path / "R.md").exists()
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["step_time.json", "step_time.png"]
    with pytest.raises(ZeroDivisionError):  # a failing writer leaves no file and no temp file
        report.atomic_write(tmp_path / "x.json", lambda p: 1 / 0)
    assert not [p for p in tmp_path.iterdir() if "x.json" in p.name]


def test_sections_of_one_report_do_not_overwrite_each_other(tmp_path):
    md = tmp_path / "RESULTS.md"
    report.write_section(md, "a", "## A\n\nfirst")
    report.write_section(md, "b", "## B")
    report.write_section(md, "a", "## A\n\nsecond")
    text = md.read_text()
    assert "second" in text and "first" not in text and "## B" in text
    assert text.index("## A") < text.index("## B") and text.count("<!-- a:begin -->") == 1


# ---- benchmarks/codegen.py (peftc bench --codegen) -------------------------------------------
codegen = importlib.import_module("peftc.benchmarks.codegen")
DECODE = {"peftc interpreted", "peftc compiled", "PEFT eager", "PEFT + torch.compile", "weight-streaming floor"}


@pytest.fixture(scope="module")
def codegen_quick(tmp_path_factory):
    """Every row on the tiny Llama (inductor compiles ~15 graphs: minutes, not seconds)."""
    out = tmp_path_factory.mktemp("codegen")
    return out, codegen.main(["--quick", "--out", str(out), "--no-progress", "--note", "test run"])


@pytest.mark.slow
def test_decode_gemv_quick_writes_json_and_report(tmp_path):
    """benchmarks/decode_gemv.py: every implementation per format, errors against the dequantized weight."""
    dg = importlib.import_module("peftc.benchmarks.decode_gemv")
    dg.main(["--quick", "--out", str(tmp_path)])
    result = json.loads((tmp_path / "decode_gemv.json").read_text())
    names = set(result["rows"])
    for fmt in ("int4", "nf4", "int8"):
        assert {f"{fmt}: dequantize + F.linear", f"{fmt}: inductor dequant-reduction", f"{fmt}: peftc C kernel"} <= names
        assert result["rows"][f"{fmt}: peftc C kernel"]["max_abs_err_vs_dequantized"] < 1e-4
        assert result["rows"][f"{fmt}: inductor dequant-reduction"]["max_abs_err_vs_dequantized"] < 1e-4
    assert {"int4: torch packed op", "int8: torch packed op", "fp32 F.linear"} <= names
    md = (tmp_path / "RESULTS.md").read_text()
    assert "## Decode over a quantized base, per op" in md and "python -m benchmarks.decode_gemv --quick" in md


@pytest.mark.slow
def test_codegen_quick_writes_json_png_and_report(codegen_quick):
    out, result = codegen_quick
    assert sorted(p.name for p in out.iterdir()) == ["RESULTS.md", "codegen.json", "codegen.png"]
    on_disk = json.loads((out / "codegen.json").read_text())
    assert on_disk["schema"] == "peftc.bench.codegen/1" and on_disk["models"] == result["models"]
    assert on_disk["config"]["rows"] == list(codegen.ROWS) and list(on_disk["models"]) == ["tiny"]
    m, reps = on_disk["models"]["tiny"], on_disk["config"]["reps"]
    assert set(codegen.ROWS) <= set(m)
    assert set(m["decode"]["variants"]) == set(m["decode8"]["variants"]) == DECODE
    assert set(m["decode4"]["variants"]) == {"peftc int4 interpreted", "peftc int4 compiled", "peftc nf4 compiled",
                                             "PEFT eager"}
    assert set(m["prefill"]["variants"]) == DECODE - {"weight-streaming floor"}
    for row in ("decode", "decode4", "decode8", "prefill"):
        for n, s in m[row]["variants"].items():
            assert STAT_KEYS - {"overhead_pct", "overhead_paired_pct", "overhead_min_pct"} <= set(s)
            assert len(s["samples_ms"]) == reps and s["min_ms"] <= s["median_ms"] <= s["max_ms"]
            assert n == "weight-streaming floor" or {"first_call_s", "warm_call_s", "compile_s"} <= set(s)
    assert m["decode8"]["batch"] == on_disk["config"]["batch"] and m["prefill"]["prompt"] == on_disk["config"]["prefill"]
    assert m["decode"]["floor"]["linears"] == 7 * 2 + 1  # every linear of 2 layers + the head
    assert set(m["decode"]["profile"]) == DECODE - {"weight-streaming floor"}
    assert all(p["ops"] and p["steps"] >= 1 for p in m["decode"]["profile"].values())
    lines = m["decode"]["compile_lines"]["peftc compiled"]  # both step graphs went through inductor
    assert any(x.startswith("compile: prefill") for x in lines) and any(x.startswith("compile: decode step") for x in lines)
    assert not any("runs interpreted" in x for row in ("decode", "decode4") for v in m[row]["compile_lines"].values()
                   for x in v)
    (p,) = on_disk["config"]["dropouts"]
    assert set(m["train"]["variants"]) == {"frozen base", "frozen base + torch.compile", *(
        f"{n} p={p}" for n in ("PEFT eager", "PEFT + torch.compile", "peftc interpreted", "peftc compile",
                               "peftc fuse+compile"))}
    assert all(len(s["samples_ms"]) == on_disk["config"]["train_reps"] for s in m["train"]["variants"].values())
    assert "compile cache: loaded from" in "\n".join(m["warm"]["warm"]["summary"])
    assert "compile cache: loaded from" not in "\n".join(m["warm"]["cold"]["summary"])
    assert (out / "codegen.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "RESULTS.md").read_text()
    assert "## Code generation" in md and "--quick --out" in md and "test run" in md and "transformers " in md
    assert "| decode fp32, batch 1" in md and "| warm start" in md and codegen.PENDING not in md


@pytest.mark.slow
def test_codegen_greedy_tokens_and_losses_equal_peft(codegen_quick):
    _, result = codegen_quick
    eq = result["token_equality"]["tiny"]
    for row in ("decode", "decode8", "prefill"):  # peftc, compiled or not, gives PEFT's greedy tokens
        assert eq[row]["peftc compiled"] and eq[row]["peftc interpreted"], (row, eq[row])
    assert eq["warm"] == {"cold": True, "warm": True}
    train = result["models"]["tiny"]["train"]
    (p,) = train["dropouts"]  # same seed: the same dropout masks
    assert train["step0_loss"][f"peftc interpreted p={p}"] == pytest.approx(train["step0_loss"][f"PEFT eager p={p}"],
                                                                           abs=1e-5)


def test_codegen_placeholder_section_and_row_flags(tmp_path):
    md = tmp_path / "RESULTS.md"
    assert codegen.main(["--placeholder", "--out", str(tmp_path)]) is None
    text = md.read_text()
    assert "<!-- codegen:begin -->" in text and codegen.PENDING in text and "python -m benchmarks.codegen" in text
    with pytest.raises(SystemExit):
        codegen.main(["--quick", "--only", "decode,nonsense", "--out", str(tmp_path)])
