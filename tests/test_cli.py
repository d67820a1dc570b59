"""The peftc command line, run in-process: demo, compile, inspect, methods, errors."""

import json
import logging
import os
import stat
import warnings

import pytest
import torch

import peftc
from peftc import Spec
from peftc.cli import main
from peftc.models import tiny_model

EXAMPLES = {"examples/llama-lora.yaml": "tiny-llama", "examples/gpt2-lora.yaml": "tiny-gpt2",
            "examples/bert-lora.json": "tiny-bert"}


def test_methods_lists_every_registered_method(capsys):
    from peftc.spec import METHODS

    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    for name in METHODS:
        assert name in out
    assert "r=8" in out and "targets (required)" in out


@pytest.mark.parametrize("spec_path,model", EXAMPLES.items())
def test_compile_examples_writes_a_peft_adapter(spec_path, model, tmp_path, capsys):
    import peft
    out = tmp_path / "adapter"
    assert main(["compile", "--model", model, "--spec", spec_path, "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "inserted adapter nodes" in text and "trainable parameters" in text
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA"
    spec = Spec.load(spec_path)
    ranks = {m.r for m in spec.methods}
    assert cfg["r"] in ranks
    base = tiny_model(model)
    loaded = peft.PeftModel.from_pretrained(base, out)
    assert loaded.get_nb_trainable_parameters()[1] > 0
    assert any(".lora_A." in k for k in loaded.state_dict())


def test_inspect_svg_diff_graph(tmp_path, capsys):
    svg = tmp_path / "h0.svg"
    rc = main(["inspect", "--model", "tiny-gpt2", "--spec", "examples/gpt2-lora.yaml", "--svg", str(svg),
               "--module", "transformer.h.0", "--diff", "--graph"])
    assert rc == 0
    out = capsys.readouterr().out
    assert svg.read_text().lstrip().startswith(("<?xml", "<svg"))
    assert "[lora:" in out  # inserted nodes tagged in the graph text
    assert any(line.startswith("+") and "lora" in line for line in out.splitlines())  # the diff


def test_bad_spec_is_reported_before_the_model_is_built(tmp_path, capsys, monkeypatch):
    bad = tmp_path / "bad.yaml"
    bad.write_text("methods:\n  - lora: {targets: [q_proj], r: 0}\n")

    def boom(*a, **k):
        raise AssertionError("model built before the spec was validated")

    monkeypatch.setattr("peftc.models.load_model", boom)
    assert main(["compile", "--model", "tiny-llama", "--spec", str(bad)]) == 2
    out = capsys.readouterr().out
    assert "lora.r" in out and "0" in out


def test_unknown_model_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="no config.json"):
        main(["compile", "--model", str(tmp_path), "--spec", "examples/llama-lora.yaml"])


def test_demo_trains_and_matches_peft(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--steps", "8", "--lr", "1e-2", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "match" in text and "MISMATCH" not in text
    first, last = [float(x) for x in text.split("loss: ")[1].split(" over")[0].split(" -> ")]
    assert last < first
    assert (out / "adapter_model.safetensors").is_file()


def test_demo_on_the_pretrained_minilm(tmp_path, capsys):
    """At 1e-2 the contrastive loss rose (1.09 -> 2.08) and the demo exited 1 saying nothing."""
    torch.manual_seed(0)
    assert main(["demo", "--model", "minilm", "--steps", "2", "--out", str(tmp_path / "m")]) == 0
    text = capsys.readouterr().out
    assert "match" in text and "(lr 0.001)" in text and "failed" not in text
    first, last = [float(x) for x in text.split("loss: ")[1].split(" over")[0].split(" -> ")]
    assert last < first


@pytest.mark.parametrize("model", ["tiny-t5", "tiny-torch"])
def test_demo_runs_on_seq2seq_and_plain_torch_models(model, tmp_path, capsys):
    assert main(["demo", "--model", model, "--steps", "3", "--out", str(tmp_path / "d")]) == 0
    text = capsys.readouterr().out
    assert "MISMATCH" not in text and "failed" not in text and "match" in text


def test_demo_that_does_not_learn_says_why(tmp_path, capsys):
    assert main(["demo", "--model", "tiny-gpt2", "--steps", "1", "--out", str(tmp_path / "d")]) == 1
    assert "loss did not decrease" in capsys.readouterr().out  # one step: first loss == last loss


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"peftc {peftc.__version__}"


def test_spec_may_be_a_peft_adapter_dir(tmp_path, capsys):
    out = tmp_path / "adapter"
    assert main(["compile", "--model", "tiny-llama", "--spec", "examples/llama-lora.yaml", "--out", str(out)]) == 0
    first = capsys.readouterr().out.split("trainable parameters: ")[1].split()[0]
    assert main(["compile", "--model", "tiny-llama", "--spec", str(out)]) == 0
    assert capsys.readouterr().out.split("trainable parameters: ")[1].split()[0] == first == "14,336"


def test_saved_adapter_files_honour_the_umask(tmp_path):
    cm = peftc.compile(tiny_model("tiny-llama"), Spec.load("examples/llama-lora.yaml"), {"input_ids": torch.randint(0, 128, (1, 4))})
    old = os.umask(0o022)
    try:
        cm.save_adapter(tmp_path / "a")
        cm.save_merged(tmp_path / "merged")
    finally:
        os.umask(old)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert stat.S_IMODE((tmp_path / "a" / name).stat().st_mode) == 0o644, name
    assert stat.S_IMODE((tmp_path / "merged").stat().st_mode) == 0o755  # not mkdtemp's 0700
    for f in (tmp_path / "merged").iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == 0o644, f.name


def test_inspect_diff_follows_module(capsys):
    base = ["inspect", "--model", "tiny-gpt2", "--spec", "examples/gpt2-lora.yaml", "--diff"]
    assert main(base) == 0
    full = {line for line in capsys.readouterr().out.splitlines() if line.startswith("+") and "lora" in line}
    assert main([*base, "--module", "transformer.h.1"]) == 0
    text = capsys.readouterr().out
    part = {line for line in text.splitlines() if line.startswith("+") and "lora" in line}
    assert "rewritten (transformer.h.1)" in text
    assert part and part < full  # a strict subset: h.0's inserted nodes are left out


def test_inspect_missing_module_is_a_clear_error(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("compiled before --module was checked")

    monkeypatch.setattr("peftc.compile", boom)
    with pytest.raises(SystemExit) as e:
        main(["inspect", "--model", "tiny-gpt2", "--spec", "examples/gpt2-lora.yaml", "--module", "transformer.h.7"])
    text = str(e.value.code)
    assert "'transformer.h.7' is not a module of GPT2LMHeadModel" in text and "transformer.h.1" in text
    assert "Traceback" not in text


def test_dependency_future_warnings_are_hidden_ours_are_not(monkeypatch):
    def bench(rest):
        warnings.warn_explicit("old api", FutureWarning, "x.py", 1, module="transformers.modeling_utils")
        warnings.warn_explicit("old api", FutureWarning, "x.py", 2, module="copyreg")
        warnings.warn_explicit("ours", FutureWarning, "x.py", 3, module="peftc.spec")
        return 0

    monkeypatch.setattr("peftc.cli.cmd_bench", bench)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert main(["bench", "--quick"]) == 0
    assert [str(w.message) for w in seen] == ["ours"]
    assert logging.getLogger("torch.utils._pytree").getEffectiveLevel() == logging.ERROR


def test_bench_quick_runs_every_variant(tmp_path):
    rc = main(["bench", "--quick", "--out", str(tmp_path), "--no-progress", "--dropout", "0.0"])
    assert rc == 0
    res = json.loads((tmp_path / "step_time.json").read_text())
    assert set(res["variants"]) == {"frozen base", "peft p=0.0", "peftc p=0.0", "peftc fused p=0.0"}
    loss = res["step0_loss"]  # same weights, dropout off: the three adapted variants agree
    assert loss["peftc fused p=0.0"] == pytest.approx(loss["peft p=0.0"], abs=1e-5)
    assert loss["peftc p=0.0"] == pytest.approx(loss["peft p=0.0"], abs=1e-5)
    assert res["peftc_pass_counts"]["peftc fused p=0.0"]["fuse"] == 14
    assert (tmp_path / "step_time.png").read_bytes()[:4] == b"\x89PNG"


def test_bench_with_a_model_runs_the_codegen_table_on_it(monkeypatch, capsys):
    seen = []
    monkeypatch.setattr("peftc.benchmarks.codegen.main", lambda argv: seen.append(argv))
    assert main(["bench", "--model", "smollm2", "--only", "decode"]) == 0
    assert seen == [["--models", "smollm2", "--only", "decode"]]
    assert main(["bench", "--model", "gpt5"]) == 2
    assert "--model 'gpt5'" in capsys.readouterr().out


def test_compile_a_local_hf_model_dir(tmp_path, capsys):
    tiny_model("tiny-llama").save_pretrained(tmp_path / "llama")
    out = tmp_path / "adapter"
    assert main(["compile", "--model", str(tmp_path / "llama"), "--spec", "examples/llama-lora.yaml",
                 "--out", str(out), "--batch", "1", "--seq", "5"]) == 0
    assert "trainable parameters: 14,336" in capsys.readouterr().out  # r=16 on q/k/v/o of 2 layers
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert sorted(cfg["target_modules"]) == ["k_proj", "o_proj", "q_proj", "v_proj"]
