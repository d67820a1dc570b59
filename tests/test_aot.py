"""The ahead-of-time serving package (``cm.export_aot``, ``peftc export --aot``): compiled once
(the AOTInductor C++ build is the slow part), then run in a fresh process that imports neither
peftc nor transformers, with the greedy tokens of ``cm.generate``. The other tests run the
exported programs (``peftc.aot.step_programs``) in-process through the same loop, without the
C++ build: per-row adapters, prompt tuning, a failed export, the command line."""

import json
import subprocess
import sys

import pytest
import torch
from peft import LoraConfig, PromptTuningConfig, get_peft_model

import peftc
from peftc import aot, aot_loop, cli
from peftc.models import example_inputs, tiny_model

# The child process: the package's own generate.py, its command line (a left-padded batch) and
# its Package (more batches, a line each), then no peftc / transformers module may have been imported.
CHILD = """
import importlib.util, json, sys
directory, batches = sys.argv[1], json.loads(sys.argv[2])
spec = importlib.util.spec_from_file_location("generate", directory + "/generate.py")
loop = importlib.util.module_from_spec(spec)
spec.loader.exec_module(loop)
loop.main(["--dir", directory, *sys.argv[3:]])
package = loop.Package.load(directory)
for ids in batches:
    print(json.dumps(package.generate(ids, None, 8).tolist()))
leaked = sorted(m for m in sys.modules if m.startswith(("peftc", "transformers")))
assert not leaked, leaked
"""


def _saved(path, config, seed: int):
    model = tiny_model("tiny-llama")  # seeds its own initialisation
    torch.manual_seed(seed)
    get_peft_model(model, config).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def cm(tmp_path_factory):
    """tiny Llama with two non-zero LoRA adapters saved by HF PEFT: "default" (running), "other"."""
    root = tmp_path_factory.mktemp("aot")
    lora = lambda: LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, init_lora_weights=False,
                              target_modules="all-linear")
    cm = peftc.from_peft(tiny_model("tiny-llama"), _saved(root / "default", lora(), 3), example_inputs("tiny-llama"))
    cm.load_adapter(_saved(root / "other", lora(), 4), "other")
    return cm


def _batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 128, (3, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding
    mask[1, :1] = 0
    return ids.masked_fill(mask == 0, 0), mask


def _greedy(cm, ids, mask, **kw):
    return cm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False, **kw)


def test_package_runs_in_a_fresh_process_with_the_tokens_of_generate(cm, tmp_path):
    out = cm.export_aot(tmp_path / "pkg")
    assert sorted(p.name for p in out.iterdir()) == ["decode.pt2", "generate.py", "peftc_aot.json", "prefill.pt2"]
    meta = json.loads((out / "peftc_aot.json").read_text())
    assert (meta["kv_geometry"], meta["cache_dtype"], meta["adapters"], meta["virtual_tokens"]) == ([2, 2, 16],
                                                                                                     "float32", [], 0)
    assert meta["ranges"]["decode"]["batch"] == [1, None] and meta["max_cache_len"] == 256

    ids, mask = _batch()
    ref = _greedy(cm, ids, mask)
    with torch.no_grad():
        bare = cm.get_base_model().generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    assert not torch.equal(ref, bare)  # the adapter changes the tokens: the comparison can fail
    more = [ids[2:], torch.tensor([[1, 2, 3], [7, 8, 9]])]  # batch 1 (the batch dim is dynamic from 1); EOS
    refs = [_greedy(cm, b, torch.ones_like(b)) for b in more]
    assert (refs[1][0, 3:] == 2).sum() > 1  # row 0 ends with EOS (2) and is padded: HF's stopping rule is run
    args = [f"--{flag}={','.join(map(str, r))}" for i, m in zip(ids.tolist(), mask.tolist())
            for flag, r in (("ids", i), ("mask", m))]
    child = subprocess.run([sys.executable, "-c", CHILD, str(out), json.dumps([b.tolist() for b in more]), *args,
                            "--max-new-tokens=8"], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert child.returncode == 0, child.stderr
    lines = [json.loads(line) for line in child.stdout.strip().splitlines()[-3:]]
    assert lines == [ref.tolist(), *(r.tolist() for r in refs)]


def test_multi_adapter_package_chooses_the_adapter_per_row(cm):
    programs, meta = aot.step_programs(cm, adapter_names=["default", "other"])
    assert meta["inputs"][-1] == aot.ADAPTER_MASK and meta["adapters"] == ["default", "other"]
    for ep in programs.values():  # the sample masks are an input, no longer buffers
        assert not any(str(n.target).startswith(aot.MASKS) for n in ep.graph.nodes if n.op == "get_attr")
    package = aot_loop.Package(meta, programs["prefill"].module(), programs["decode"].module())
    ids, mask = _batch()
    names = ["other", "__base__", "default"]
    mixed = _greedy(cm, ids, mask, adapter_names=names)
    assert not torch.equal(mixed, _greedy(cm, ids, mask))
    assert torch.equal(package.generate(ids, mask, 8, names), mixed)
    with pytest.raises(ValueError, match="one name per row"):
        package.generate(ids, mask, 8)


def test_prompt_tuning_virtual_tokens_are_fed_as_generate_feeds_them(tmp_path):
    path = _saved(tmp_path / "prompt", PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3), 3)
    cm = peftc.from_peft(tiny_model("tiny-llama"), path, example_inputs("tiny-llama"))
    programs, meta = aot.step_programs(cm)
    assert meta["virtual_tokens"] == 3
    package = aot_loop.Package(meta, programs["prefill"].module(), programs["decode"].module())
    ids, mask = _batch()
    assert torch.equal(package.generate(ids, mask, 8), _greedy(cm, ids, mask))


def test_a_failed_export_leaves_the_directory_as_it_was(cm, tmp_path, monkeypatch):
    target = tmp_path / "pkg"
    target.mkdir()
    (target / "old.txt").write_text("kept")

    def fail(ep, package_path):
        raise RuntimeError("no space left on device")
    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", fail)
    with pytest.raises(RuntimeError, match="no space"):
        cm.export_aot(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pkg"]  # no temp dir left over
    assert [p.name for p in target.iterdir()] == ["old.txt"]
    with pytest.raises(peftc.SpecError, match="adapter_names"):
        cm.export_aot(target, adapter_names=["missing"])


def test_command_line_writes_the_package(cm, tmp_path, monkeypatch, capsys):
    """``peftc export --aot``: the wiring (the C++ build replaced by a stub writing the file)."""
    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package",
                        lambda ep, package_path: open(package_path, "wb").close() or package_path)
    adapter = cm.save_adapter(tmp_path / "adapter", "default")
    out = tmp_path / "served"
    assert cli.main(["export", "--aot", str(out), "--model", "tiny-llama", "--adapter", str(adapter)]) == 0
    meta = json.loads((out / "peftc_aot.json").read_text())
    assert meta["running"] == ["default"] and not meta["merged"]
    assert (out / "generate.py").read_text() == open(aot_loop.__file__).read()
    assert "AOTInductor package written to" in capsys.readouterr().out
