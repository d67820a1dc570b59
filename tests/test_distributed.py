"""Sharded and data-parallel training on 2 gloo ranks (torchrun, CPU) against one process.

The launches run tests/dist_workers/worker.py (cases named there); the checks that need no
process group (settings, padding, checkpoint slices, the error without torchrun) run here.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import peftc
from peftc import distributed as pd
from peftc.models import example_inputs, tiny_model
from peftc.passes.optimize import shard, shard_base

WORKER = Path(__file__).parent / "dist_workers" / "worker.py"
LORA = {"lora": {"targets": ["q_proj", "v_proj"], "r": 2}}


@pytest.fixture(scope="module")
def ref_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("references")  # single-process runs shared by the launches


def launch(cases, tmp_path, ref_cache, *, timeout=300, group_timeout=30, check=True):
    """``torchrun --nproc_per_node 2 worker.py OUT CASES``; returns (results, seconds, process)."""
    out = tmp_path / "results.json"
    env = dict(os.environ, PEFTC_REF_CACHE=str(ref_cache), PEFTC_TEST_DIR=str(tmp_path / "shared"),
               PEFTC_TEST_TIMEOUT=str(group_timeout), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(WORKER), str(out), *cases]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    seconds = time.perf_counter() - t0
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    results = json.loads(out.read_text()) if out.exists() else {}
    return results, seconds, proc


# ---------------------------------------------------------------- 2 ranks


def matches(r, *names):
    """Losses within 1e-5 and adapter weights within 1e-4 of one process after 3 AdamW steps."""
    for name in names:
        assert r[name]["loss_diff"] <= 1e-5 and r[name]["weight_diff"] <= 1e-4, (name, r[name])


def test_shard_and_ddp_match_one_process(tmp_path, ref_cache):
    r, _, _ = launch(["shard", "ddp", "fully_shard", "bad_mesh"], tmp_path, ref_cache)
    matches(r, "shard", "ddp")
    s = r["shard"]
    assert s["live_bytes"] <= 0.6 * s["base_bytes"], s  # every live tensor, after the step
    assert s["gathered_alive_after_forward"] == 0 and s["peak_gathered"] > 0
    assert s["counts"]["shard"] == 21 and s["counts"]["shard_grad_mean"] == 8
    assert "optimize: {shard" in r["fully_shard"]["error"]
    assert "optimize.shard.mesh" in r["bad_mesh"]["error"]


def test_shard_options_no_reshard_prefetch_and_hybrid_mesh(tmp_path, ref_cache):
    r, _, _ = launch(["no_reshard", "hybrid"], tmp_path, ref_cache)
    matches(r, "no_reshard_prefetch", "hybrid_mesh_2x1")
    assert r["no_reshard_prefetch"]["kept_after_forward"] > 0 == r["no_reshard_prefetch"]["kept_after_backward"]


def test_shard_composes_with_fuse_and_recompute(tmp_path, ref_cache):
    r, _, _ = launch(["fuse", "recompute_blocks", "recompute_adapters"], tmp_path, ref_cache)
    matches(r, "fuse", "recompute_blocks", "recompute_adapters")
    assert r["recompute_blocks"]["counts"]["shard_in_blocks"] > 0


def test_shard_composes_with_quantize_and_two_adapters(tmp_path, ref_cache):
    r, _, _ = launch(["quantize", "multi"], tmp_path, ref_cache)
    matches(r, "quantize_nf4", "two_adapters")
    assert r["quantize_nf4"]["live_bytes"] <= 0.6 * r["quantize_nf4"]["base_bytes"]


@pytest.mark.slow  # inductor compiles each rank's graphs: minutes on a loaded 2-core CPU
def test_shard_under_torch_compile(tmp_path, ref_cache):
    r, _, _ = launch(["compile"], tmp_path, ref_cache, timeout=590)
    matches(r, "torch_compile")


def test_rank0_save_merged_export_and_meta_start(tmp_path, ref_cache):
    r, _, _ = launch(["save_export", "meta"], tmp_path, ref_cache)
    assert r["save_export"]["writes"] == 1 and r["save_export"]["merged_max_err"] <= 1e-5
    matches(r, "meta_start")
    assert r["meta_start"]["live_bytes"] <= 0.6 * r["meta_start"]["base_bytes"]


def test_stalled_rank_fails_within_the_group_timeout(tmp_path, ref_cache):
    r, _, _ = launch(["stall"], tmp_path, ref_cache, group_timeout=5)
    assert "did not reach it within the process group's timeout" in r["stall"]["error"]
    assert r["stall"]["seconds_to_error"] <= 5 + 10, r["stall"]


def test_dead_rank_fails_the_launch_instead_of_hanging(tmp_path, ref_cache):
    _, seconds, proc = launch(["die"], tmp_path, ref_cache, group_timeout=5, check=False, timeout=240)
    log = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "exitcode  : 3" in log, log[-3000:]  # torchrun names the dead rank and ends the others
    assert "PeftcError: shard: all_gather" in log or "SIGTERM" in log, log[-3000:]


# ---------------------------------------------------------------- no process group


def test_shard_without_process_group_is_a_spec_error_before_capture():
    with pytest.raises(peftc.SpecError, match="torchrun"):
        peftc.compile(tiny_model("tiny-llama"), {"methods": [LORA], "optimize": {"shard": {}}},
                      example_inputs("tiny-llama"))


@pytest.mark.parametrize("settings, field", [
    ({"reshard": True}, "optimize.shard.reshard"),
    ({"prefetch": True}, "optimize.shard.prefetch"),  # needs reshard_after_forward: false
    ({"mesh": [2]}, "optimize.shard.mesh"),
    ({"mesh": [0, 2]}, "optimize.shard.mesh"),
    ({"reshard_after_forward": "yes"}, "optimize.shard.reshard_after_forward"),
])
def test_bad_shard_settings(settings, field):
    with pytest.raises(peftc.SpecError) as e:
        peftc.Spec.from_dict({"methods": [LORA], "optimize": {"shard": settings}})
    assert e.value.field == field


@pytest.mark.parametrize("shape, world", [((7, 5), 3), ((64,), 3), ((3, 4), 5), ((6, 4), 2)])
def test_flat_shards_pad_any_world_size(shape, world):
    t = torch.randn(shape)
    shards = [pd.shard_flat(t, r, world) for r in range(world)]
    assert len({s.numel() for s in shards}) == 1  # equal chunks: all_gather needs them
    assert torch.equal(torch.cat(shards)[: t.numel()].view(shape), t)


@pytest.mark.parametrize("world", [2, 3])
def test_checkpoint_rows_read_per_rank(tmp_path, world):
    from safetensors import safe_open
    from safetensors.torch import save_file

    t = torch.randn(7, 5)
    save_file({"w": t}, str(tmp_path / "m.safetensors"))
    with safe_open(str(tmp_path / "m.safetensors"), framework="pt") as f:
        for r in range(world):
            assert torch.equal(shard_base.read_chunk(f, "w", (7, 5), r, world), pd.shard_flat(t, r, world))


def test_settings_defaults():
    assert shard.check_settings({}) == {"reshard_after_forward": True, "prefetch": False, "mesh": None}


def test_graph_gathers_inside_regions_on_a_world_of_one(tmp_path):
    """The graph form, in-process (a gloo group of one rank): every gather sits in a checkpoint
    region with the op that reads it, no top-level node reads a full frozen weight, and nothing
    gathered outlives its op."""
    import torch.distributed as dist

    from peftc.graph import fetch_attr
    from peftc.passes.optimize.recompute_ops import Checkpointed

    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        model = tiny_model("tiny-llama")
        frozen = {id(p) for p in model.parameters()}
        ids = torch.randint(0, 128, (2, 8))
        cm = peftc.compile(model, {"methods": [LORA], "optimize": {"shard": {}}}, {"input_ids": ids, "labels": ids})
        gm = cm.graph_module
        gather = torch.ops.peftc.shard_gather.default
        assert not [n for n in gm.graph.nodes if n.target is gather]
        regions = [m for m in gm.modules() if isinstance(m, Checkpointed)]
        inside = sum(n.target is gather for r in regions for n in r.region.graph.nodes)
        assert inside == cm.pass_counts["shard"] == cm.pass_counts["shard_regions"] == 21
        reads = [n for n in gm.graph.nodes if n.op == "get_attr" and id(fetch_attr(gm, n.target)) in frozen]
        assert not reads
        assert all(p.untyped_storage().nbytes() <= 4 for p in model.parameters())  # released
        summary = cm.graph_summary()
        assert "sharded over 1 of 1 ranks: 21 frozen tensors" in summary
        # coverage: the rotary inv_freq buffer is read whole, and said so
        assert "shard: 21 of 22 frozen tensors: 1 model buffers (kept whole on every rank" in summary
        x = torch.randint(0, 128, (3, 5))  # another shape than the captured one
        with pd.probe() as p:
            loss = cm(input_ids=x, labels=x).loss
            assert p.live() == 0 and p.gathers == 21
            loss.backward()
            assert p.gathers > 21  # gathered again in backward
        assert all(q.grad is not None and q.grad.abs().sum() > 0 for q in cm.trainable_parameters()[1::2])
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("method, line", [
    ({"vera": {"targets": ["0", "2"], "r": 2}},
     "shard: 4 of 8 frozen tensors: 4 frozen adapter tensors (adapters stay whole on every rank)"),
    ({"train": {"targets": ["0", "2"]}}, "shard: matched nothing: no frozen tensors in this graph"),
])
def test_shard_summary_names_what_stays_whole(tmp_path, method, line):
    """Coverage on a world of one: VeRA's frozen shared projections stay whole (a partial match);
    every weight trained as a copy leaves nothing frozen to shard (an empty match)."""
    import torch.distributed as dist
    from torch import nn

    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
        x = torch.randn(2, 8)
        cm = peftc.compile(model, {"methods": [method], "optimize": {"shard": {}}}, {"input": x})
        lines = [x for x in cm.graph_summary().splitlines() if x.startswith("shard: ")]
        assert lines == [line]
        cm(input=x).sum().backward()
    finally:
        dist.destroy_process_group()


def test_writes_go_through_the_hooks_of_the_spec(tmp_path):
    """Without an optimization that spans ranks, files are written by the calling rank alone
    (no barrier, no process group needed); load_sharded names what is missing."""
    cm = peftc.compile(tiny_model("tiny-llama"), {"methods": [LORA]}, example_inputs("tiny-llama"))
    assert pd.write_files(cm, lambda: "written") == "written"
    with pytest.raises(peftc.SpecError, match="per-rank shards"):
        pd.load_sharded(cm, tmp_path)
