"""The code-generation phase (``optimize: {compile: ...}``): compiled graphs against the
interpreted graph they come from (outputs, loss and every adapter gradient), generate tokens
against HF PEFT, regional compilation, and the fall-back of a graph the compiler refuses.

Each case compiles with inductor (10-30 s on 2 CPU cores): the cases are few and small."""

import copy
import tarfile
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model

import peftc
from peftc.models import example_inputs, tiny_model
from peftc.passes import PassResult, register_optimization
from peftc.passes.optimize.codegen import Codegen
from peftc.spec import OPTIMIZATIONS, SpecError

LLAMA_QV = ["q_proj", "v_proj"]
CASES = {
    "lora": ({"lora": {"targets": LLAMA_QV, "r": 4, "init": "random"}}, {}),
    "dora": ({"lora": {"targets": LLAMA_QV, "r": 4, "init": "random", "dora": True}}, {}),
    "ia3": ({"ia3": {"targets": ["k_proj", "v_proj", "down_proj"], "feedforward": ["down_proj"], "init": "random"}},
            {}),
    "prefix": ({"prefix": {"tokens": 3}}, {}),
    "prompt": ({"prompt": {"tokens": 3}}, {}),
    "lora-nf4-fused": ({"lora": {"targets": LLAMA_QV, "r": 4, "init": "random"}}, {"fuse": {}, "quantize": {}}),
}


def _nonzero(cm):
    torch.manual_seed(7)
    with torch.no_grad():
        for p in cm.trainable_parameters():
            p.add_(torch.randn_like(p) * 0.05)  # LoRA's B starts at zero, which would hide a wrong path


def _loss(logits: torch.Tensor) -> torch.Tensor:
    """A loss that reaches every logit with a different weight (fixed, not zero)."""
    w = torch.randn(logits.shape, generator=torch.Generator().manual_seed(5), dtype=logits.dtype)
    return (logits * w).sum()


@pytest.mark.parametrize("case", list(CASES))
def test_compiled_graph_equals_the_interpreted_graph(case):
    method, optimize = CASES[case]
    cm = peftc.compile(tiny_model("tiny-llama"), {"methods": [method], "optimize": {**optimize, "compile": {}}},
                       example_inputs("tiny-llama"))
    _nonzero(cm)
    cm.train()  # the training graph; dropout is 0 in these specs, so both runs are deterministic
    ids = example_inputs("tiny-llama", 3, 6, seed=1)["input_ids"]  # another shape than the captured one
    gm = cm.graph_for_call(input_ids=ids)
    assert isinstance(gm.forward, Codegen)
    ref = type(gm).forward(gm, **cm.call_arguments(input_ids=ids)).logits  # the same graph, interpreted
    out = cm(input_ids=ids).logits
    assert gm.forward.failed is None
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    params = cm.trainable_parameters()
    for a, b in zip(torch.autograd.grad(_loss(out), params), torch.autograd.grad(_loss(ref), params)):
        assert b.abs().max() > 0
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    summary = cm.graph_summary()
    assert "compiled by inductor in" in summary and "runs interpreted" not in summary


def test_bf16_base_compiles_to_its_dtype():
    model = tiny_model("tiny-llama").to(torch.bfloat16)
    cm = peftc.compile(model, {"methods": [CASES["lora"][0]], "optimize": ["compile"]}, example_inputs("tiny-llama"))
    _nonzero(cm)
    ids = example_inputs("tiny-llama", 2, 5, seed=2)["input_ids"]
    with torch.no_grad():
        ref = cm.graph_for_call(input_ids=ids, optimized=False)(**cm.call_arguments(input_ids=ids)).logits
        out = cm(input_ids=ids).logits
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref.float(), atol=3e-2, rtol=2e-2)


def test_regional_compiles_one_layer_for_alike_layers():
    model = tiny_model("tiny-llama", num_hidden_layers=4)
    cm = peftc.compile(model, {"methods": [CASES["lora"][0]], "optimize": {"compile": {"regional": True}}},
                       example_inputs("tiny-llama")).eval()
    _nonzero(cm)
    ids = example_inputs("tiny-llama", 2, 5, seed=3)["input_ids"]
    with torch.no_grad():
        ref = cm.graph_for_call(input_ids=ids, optimized=False)(**cm.call_arguments(input_ids=ids)).logits
        out = cm(input_ids=ids).logits
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    line = next(x for x in cm.graph_summary().splitlines() if x.startswith("compile: "))
    assert "regional: 1 compiled layer(s) run 4 layers" in line, line
    assert "1 graph(s) compiled by inductor" in line, line  # one layer compiled, three reuse it


def test_generate_tokens_equal_peft(tmp_path):
    base = tiny_model("tiny-llama")
    snapshot = copy.deepcopy(base.state_dict())
    torch.manual_seed(3)
    pm = get_peft_model(base, LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, init_lora_weights=False,
                                         target_modules="all-linear")).eval()
    pm.save_pretrained(tmp_path)
    fresh = tiny_model("tiny-llama")
    fresh.load_state_dict(snapshot)
    cm = peftc.from_peft(fresh, tmp_path, example_inputs("tiny-llama"), optimize=["compile"])
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 128, (3, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    ids = ids.masked_fill(mask == 0, 0)
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        ref = pm.generate(**kw)
    assert torch.equal(cm.generate(**kw), ref)
    lines = [x for x in cm.graph_summary().splitlines() if x.startswith("compile: ")]
    assert any(x.startswith("compile: prefill") for x in lines), lines
    assert any(x.startswith("compile: decode step") for x in lines), lines
    assert not any("runs interpreted" in x for x in lines), lines


def _opaque(x):
    """Not traceable by dynamo: a graph break, or under fullgraph a refusal."""
    torch._dynamo.graph_break()
    return x


@pytest.fixture
def opaque_node():
    """A test optimization (phase shard, before codegen) that routes layer 1's o_proj output
    through ``_opaque``; the new node belongs to layer 1, so regional compilation meets it too."""

    @register_optimization("test_opaque", phase="shard")
    def insert(gm, ctx):
        node = next(n for n in gm.graph.nodes if n.target is torch.ops.aten.linear.default
                    and "layers.1.self_attn.o_proj" in str(n.meta.get("nn_module_stack")))
        with gm.graph.inserting_after(node):
            wrapped = gm.graph.call_function(_opaque, (node,))
        node.replace_all_uses_with(wrapped, delete_user_cb=lambda user: user is not wrapped)
        wrapped.meta["nn_module_stack"] = node.meta["nn_module_stack"]
        ctx.coverage("test_opaque", "o_proj outputs").hit()
        return PassResult(gm, True)

    yield
    del OPTIMIZATIONS["test_opaque"]


@pytest.mark.parametrize(("fullgraph", "regional"), [(True, True), (True, False), (False, False)])
def test_a_graph_the_compiler_refuses_runs_interpreted_and_says_so(opaque_node, fullgraph, regional):
    spec = {"methods": [CASES["lora"][0]],
            "optimize": {"test_opaque": {}, "compile": {"fullgraph": fullgraph, "regional": regional}}}
    cm = peftc.compile(tiny_model("tiny-llama"), spec, example_inputs("tiny-llama")).eval()
    _nonzero(cm)
    ids = example_inputs("tiny-llama", 2, 5, seed=4)["input_ids"]
    with torch.no_grad():
        ref = cm.graph_for_call(input_ids=ids, optimized=False)(**cm.call_arguments(input_ids=ids)).logits
        out = cm(input_ids=ids).logits
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert any(n.target is _opaque for n in cm.graph_module.graph.nodes)
    line = next(x for x in cm.graph_summary().splitlines() if x.startswith("compile: "))
    if fullgraph:
        assert "input_ids (n, n) int64" in line and "runs interpreted, inductor refused it" in line, line
        assert cm.graph_for_call(input_ids=ids).forward.failed
    else:
        assert "1 graph break(s)" in line, line
        assert cm.graph_for_call(input_ids=ids).forward.failed is None


def test_bad_compile_settings_fail_when_the_spec_is_built():
    for settings, field in (({"mode": "fast"}, "mode"), ({"dynamic": "yes"}, "dynamic"),
                            ({"regional": "some"}, "regional"), ({"backend": "eager"}, "compile")):
        with pytest.raises(SpecError, match=field):
            peftc.Spec.from_dict({"methods": [CASES["lora"][0]], "optimize": {"compile": settings}})


WARM = """
import json, sys, time, torch, peftc
from peftc.models import example_inputs, tiny_model
adapter = sys.argv[1]
ids = example_inputs("tiny-llama", 2, 6, seed=5)["input_ids"]
start = time.perf_counter()
cm = peftc.from_peft(tiny_model("tiny-llama"), adapter, example_inputs("tiny-llama"), optimize=["compile"])
logits = cm(input_ids=ids).logits
seconds = time.perf_counter() - start
from peftc.passes.optimize.codegen_cache import loaded_libraries
loaded = sorted(loaded_libraries())
cm.save_adapter(adapter, artifacts=True)
print(json.dumps({"seconds": seconds, "logits": logits.flatten()[:16].tolist(), "summary": cm.graph_summary(),
                  "notes": cm.notes, "loaded": loaded}))
"""


def test_a_second_process_starts_warm_from_the_saved_artefacts(tmp_path):
    """Each process has its own empty inductor cache dir: only the artefacts saved next to the
    adapter can make the second one warm."""
    import json
    import os
    import subprocess
    import sys

    cm = peftc.compile(tiny_model("tiny-llama"), {"methods": [CASES["lora"][0]]}, example_inputs("tiny-llama"))
    _nonzero(cm)
    cm.save_adapter(tmp_path / "adapter")
    runs = {}
    for mode in ("cold", "warm"):
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / f"inductor-{mode}")}
        done = subprocess.run([sys.executable, "-c", WARM, str(tmp_path / "adapter")], env=env,
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        runs[mode] = json.loads(done.stdout.strip().splitlines()[-1])
    assert (tmp_path / "adapter" / "peftc_compile_cache.bin").stat().st_size > 0
    torch.testing.assert_close(torch.tensor(runs["warm"]["logits"]), torch.tensor(runs["cold"]["logits"]),
                               atol=1e-5, rtol=1e-5)
    assert "compile cache: loaded from" not in runs["cold"]["summary"]
    assert "compile cache: loaded from" in runs["warm"]["summary"], runs["warm"]["summary"]
    line = next(x for x in runs["warm"]["summary"].splitlines() if x.startswith("compile: input_ids"))
    assert "(first call; 0 from the cache)" not in line, line  # every graph came from the saved artefacts
    with tarfile.open(tmp_path / "adapter" / "peftc_compile_kernels.tar") as tar:
        saved = set(tar.getnames())
    assert runs["cold"]["loaded"] and set(runs["cold"]["loaded"]) <= saved
    # the warm process built no kernel library: each one it loaded was restored from the adapter
    assert runs["warm"]["loaded"] and set(runs["warm"]["loaded"]) <= saved, set(runs["warm"]["loaded"]) - saved
    note = next(x for x in runs["warm"]["notes"] if x.startswith("compile cache: loaded from"))
    assert f"{len(saved)} kernel libraries ({len(saved)} restored into inductor's cache dir, 0 already there)" in note


def test_saved_kernels_are_not_loaded_for_another_cpu_or_from_a_bad_archive(tmp_path):
    import io
    import json

    from peftc.passes.optimize import codegen_cache as cc

    model = tiny_model("tiny-llama")
    key = cc.cache_key(model)
    (tmp_path / cc.CACHE_FILE).write_bytes(b"unused")
    (tmp_path / cc.CACHE_KEY).write_text(json.dumps({**key, "cpu": "x86_64 NONE"}))
    assert "made for another cpu" in cc.load_artifacts(None, model, tmp_path)
    outside = io.BytesIO()
    with tarfile.open(fileobj=outside, mode="w") as tar:
        info = tarfile.TarInfo("../escape.so")
        info.size = 4
        tar.addfile(info, io.BytesIO(b"\x7fELF"))
    (tmp_path / cc.KERNELS_FILE).write_bytes(outside.getvalue())
    with pytest.raises(ValueError, match="unexpected entry '../escape.so'"):
        cc.restore_kernels(tmp_path / cc.KERNELS_FILE)
    from torch._inductor.runtime.cache_dir_utils import cache_dir
    assert not (Path(cache_dir()).parent / "escape.so").exists()
