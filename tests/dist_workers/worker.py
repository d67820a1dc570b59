"""Run by ``torchrun --nproc_per_node 2 tests/dist_workers/worker.py OUT CASE [CASE ...]`` (gloo, CPU).

Each case trains a tiny Llama 3 AdamW steps with the global batch split across ranks and rank 0
compares against the single-process full-batch run of the same spec without ``shard``. Results
(per case: max loss and weight differences, memory figures) go to OUT as JSON; a failed case
raises, so the launcher's exit status says it.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist

import peftc
from peftc import distributed as pd
from peftc.models import tiny_model

BATCH, SEQ, STEPS = 4, 12, 3  # global batch; the captured example is (2, 8): another shape
LORA = {"lora": {"targets": ["q_proj", "v_proj"], "r": 2, "alpha": 4, "dropout": 0.0}}


def batches():
    g = torch.Generator().manual_seed(123)
    return [torch.randint(0, 128, (BATCH, SEQ), generator=g) for _ in range(STEPS)]


def spec_of(optimize: dict, methods=(LORA,), adapter="default") -> dict:
    return {"adapter": adapter, "methods": list(methods), "optimize": optimize}


def build(optimize: dict, *, meta_from=None, extra_adapter=False, methods=(LORA,)):
    """A compiled tiny Llama; ``meta_from``: built on the meta device (parameters only) and its
    shards loaded from that checkpoint dir, so no rank ever holds the full model."""
    if meta_from is None:
        model = tiny_model("tiny-llama", seed=0)
    else:
        from accelerate import init_empty_weights
        from transformers import AutoConfig, AutoModelForCausalLM

        with init_empty_weights():
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(meta_from))
    base_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    ids = torch.randint(0, 128, (2, 8))
    ex = {"input_ids": ids, "labels": ids}
    cm = peftc.compile(model, spec_of(optimize, methods), ex)
    if meta_from is not None:
        assert all(p.device.type == "meta" for p in model.parameters())
        cm.loaded = pd.load_sharded(cm, meta_from)
    if extra_adapter:
        cm.add_adapter(spec_of({**optimize}, ({"lora": {"targets": ["k_proj", "o_proj"], "r": 2, "dropout": 0.0}},),
                               "second"))
        cm.set_adapter(["default", "second"])
    return cm, base_bytes


def nonzero_adapters(cm) -> None:
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for _, p in sorted(cm.named_parameters(), key=lambda kv: kv[0]):
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def train(cm, ids_list, *, local: bool, step_fn=None):
    """3 AdamW steps; with ``local`` each rank takes its slice of every global batch."""
    model = step_fn if step_fn is not None else cm
    opt = torch.optim.AdamW([p for p in cm.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for ids in ids_list:
        if local:
            r, w = dist.get_rank(), dist.get_world_size()
            ids = ids.chunk(w)[r]
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        value = loss.detach().clone()
        if local:
            dist.all_reduce(value)
            value /= dist.get_world_size()
        losses.append(value.item())
    return losses, opt


def adapter_weights(cm) -> dict:
    return {n: p.detach().clone() for n, p in cm.named_parameters() if p.requires_grad}


def reference(optimize: dict, **kw):
    """The single-process full-batch run of ``optimize`` without shard; cached on disk
    (PEFTC_REF_CACHE) so that launches share it."""
    ref_opt = {k: v for k, v in optimize.items() if k != "shard"}
    key = json.dumps([ref_opt, sorted(kw)], sort_keys=True)
    cache = os.environ.get("PEFTC_REF_CACHE")
    path = os.path.join(cache, f"ref-{hashlib.sha1(key.encode()).hexdigest()[:16]}.pt") if cache else None
    if path and os.path.exists(path):
        return torch.load(path)
    cm, _ = build(ref_opt, **kw)
    nonzero_adapters(cm)
    losses, _ = train(cm, batches(), local=False)
    out = (losses, adapter_weights(cm))
    if path:
        torch.save(out, path + ".tmp")
        os.replace(path + ".tmp", path)
    return out


def live_tensor_bytes() -> int:
    """Every live tensor's storage once (gc + untyped_storage data_ptr dedup)."""
    gc.collect()
    seen = {}
    for o in gc.get_objects():
        try:
            if isinstance(o, torch.Tensor) and o.device.type == "cpu":
                s = o.untyped_storage()
                seen[s.data_ptr()] = max(seen.get(s.data_ptr(), 0), s.nbytes())
        except (RuntimeError, NotImplementedError):  # a tensor without a plain storage (a subclass)
            continue
    return sum(seen.values())


def compare(name, optimize, results, wrap=None, **kw):
    """Distributed training of ``optimize`` vs the single-process reference, on rank 0."""
    ref_kw = {k: v for k, v in kw.items() if k != "meta_from"}  # the reference starts from the real model
    ref = reference(optimize, **ref_kw) if dist.get_rank() == 0 else None
    gc.collect()
    dist.barrier()
    before = live_tensor_bytes()
    cm, base_bytes = build(optimize, **kw)
    nonzero_adapters(cm)
    with pd.probe() as probe:
        losses, opt = train(cm, batches(), local=True, step_fn=wrap(cm) if wrap else None)
        peak_gathered = probe.peak
    live = live_tensor_bytes() - before
    mine = adapter_weights(cm)
    # replicas agree: the max difference to rank 0's adapter weights, everywhere
    for t in mine.values():
        other = t.clone()
        dist.broadcast(other, 0)
        assert torch.equal(other, t), f"{name}: adapter replicas differ"
    out = {"losses": losses, "live_bytes": live, "base_bytes": base_bytes, "peak_gathered": peak_gathered,
           "counts": cm.pass_counts, "summary": cm.graph_summary().splitlines()[-3:]}
    if ref is not None:
        ref_losses, ref_w = ref
        out["loss_diff"] = max(abs(a - b) for a, b in zip(losses, ref_losses))
        out["weight_diff"] = max((mine[k] - ref_w[k]).abs().max().item() for k in ref_w)
        assert set(mine) == set(ref_w)
        assert out["loss_diff"] <= 1e-5, (name, losses, ref_losses)
        assert out["weight_diff"] <= 1e-4, (name, out["weight_diff"])
    results[name] = out
    del opt
    return cm


# ---------------------------------------------------------------- cases


def settled_live(probe, seconds=2.0):
    """Gathered bytes still alive once the process group has let go: gloo's work object may drop
    its reference to the last gathered buffer a moment after the wait returned. A buffer that is
    really kept (a leak) is still alive after ``seconds``."""
    deadline = time.monotonic() + seconds
    live = probe.live()
    while live and time.monotonic() < deadline:
        time.sleep(0.01)
        live = probe.live()
    return live


def case_shard(results):
    cm = compare("shard", {"shard": {}}, results)
    r = results["shard"]
    assert cm.pass_counts["shard"] > 0 and cm.pass_counts["shard_regions"] > 0, cm.pass_counts
    assert r["live_bytes"] <= 0.6 * r["base_bytes"], r
    # gathered weights are freed after each op: at a gather, at most the largest weight (padded) is
    # alive besides the new one. (The process group's work object may drop the previous gather's
    # buffer a moment after its op has run: sampled at the next gather, that one can still count.)
    biggest = max(pd.shard_range(p.numel(), 0, 2)[2] * 2 * p.element_size()
                  for p in cm.get_base_model().parameters())
    assert 0 < r["peak_gathered"] <= 2 * biggest, (r["peak_gathered"], biggest)
    ids = batches()[0].chunk(2)[dist.get_rank()]
    with pd.probe() as p:
        loss = cm(input_ids=ids, labels=ids).loss
        after_forward = settled_live(p)
        loss.backward()
    results["shard"]["gathered_alive_after_forward"] = after_forward
    assert after_forward == 0, after_forward


def case_no_reshard(results):
    cm = compare("no_reshard_prefetch", {"shard": {"reshard_after_forward": False, "prefetch": True}}, results)
    ids = batches()[0].chunk(2)[dist.get_rank()]
    with pd.probe() as p:
        loss = cm(input_ids=ids, labels=ids).loss
        kept = p.live()
        loss.backward()
        del loss
        freed = settled_live(p)
    results["no_reshard_prefetch"].update(kept_after_forward=kept, kept_after_backward=freed)
    assert kept > 0 and freed == 0, (kept, freed)


def case_hybrid(results):
    compare("hybrid_mesh_2x1", {"shard": {"mesh": [2, 1]}}, results)


def case_ddp(results):
    ref = reference({}) if dist.get_rank() == 0 else None
    cm, _ = build({})
    nonzero_adapters(cm)
    ddp = torch.nn.parallel.DistributedDataParallel(cm)
    losses, _ = train(cm, batches(), local=True, step_fn=ddp)
    if ref is not None:
        mine = adapter_weights(cm)
        d = {"losses": losses, "loss_diff": max(abs(a - b) for a, b in zip(losses, ref[0])),
             "weight_diff": max((mine[k] - ref[1][k]).abs().max().item() for k in ref[1])}
        assert d["loss_diff"] <= 1e-5 and d["weight_diff"] <= 1e-4, d
        results["ddp"] = d


def case_fully_shard(results):
    from torch.distributed.fsdp import fully_shard

    cm, _ = build({})
    fully_shard(cm)
    ids = batches()[0].chunk(2)[dist.get_rank()]
    try:
        cm(input_ids=ids, labels=ids)
    except peftc.PeftcError as e:
        assert "optimize: {shard" in str(e)
        results["fully_shard"] = {"error": str(e)}
    else:
        raise AssertionError("fully_shard(cm) ran without an error")


def case_fuse(results):
    compare("fuse", {"fuse": {}, "shard": {}}, results)


def case_recompute_blocks(results):
    compare("recompute_blocks", {"recompute": {"policy": "blocks"}, "shard": {}}, results)
    assert results["recompute_blocks"]["counts"]["shard_in_blocks"] > 0


def case_recompute_adapters(results):
    compare("recompute_adapters", {"recompute": {"policy": "adapters"}, "shard": {}}, results)


def case_quantize(results):
    compare("quantize_nf4", {"quantize": {"block_size": 32}, "shard": {}}, results)
    r = results["quantize_nf4"]
    assert r["counts"]["quantize"] > 0 and r["live_bytes"] <= 0.6 * r["base_bytes"], r


def case_multi(results):
    compare("two_adapters", {"shard": {}}, results, extra_adapter=True)


def case_compile(results):
    compare("torch_compile", {"fuse": {}, "shard": {}}, results, wrap=torch.compile)


def case_bad_mesh(results):
    try:
        peftc.compile(tiny_model("tiny-llama"), spec_of({"shard": {"mesh": [3, 1]}}), {"input_ids": torch.ones(1, 4, dtype=torch.long)})
    except peftc.SpecError as e:
        results["bad_mesh"] = {"error": str(e)}
    else:
        raise AssertionError("a mesh of 3 ranks on a world of 2 was accepted")


def _shared_dir() -> str:
    d = os.environ["PEFTC_TEST_DIR"]
    os.makedirs(d, exist_ok=True)
    return d


def case_save_export(results):
    """save_adapter: rank 0 writes, every rank loads; the merged export gathers the shards."""
    from safetensors.torch import load_file

    from peftc import peft_io

    cm, _ = build({"shard": {}})
    nonzero_adapters(cm)
    calls = []
    write = peft_io.write_adapter
    peft_io.write_adapter = lambda *a, **k: (calls.append(a[0]), write(*a, **k))
    try:
        path = cm.save_adapter(os.path.join(_shared_dir(), "adapter"))
    finally:
        peft_io.write_adapter = write
    assert len(calls) == (1 if dist.get_rank() == 0 else 0), calls
    sd = load_file(str(path / "adapter_model.safetensors"))  # exists on every rank after the barrier
    before = adapter_weights(cm)
    with torch.no_grad():
        for p in cm.parameters():
            if p.requires_grad:
                p.zero_()
    cm.load_adapter_state_dict(sd)
    assert all(torch.equal(before[k], v) for k, v in adapter_weights(cm).items())
    out = pd.save_merged_sharded(cm, os.path.join(_shared_dir(), "merged"))
    result = {"writes": len(calls)}
    if dist.get_rank() == 0:
        merged = load_file(str(out / "model.safetensors"))
        base = tiny_model("tiny-llama", seed=0).state_dict()
        err = 0.0
        for key, w in base.items():
            path_, _, leaf = key.rpartition(".")
            expect = w
            if leaf == "weight" and path_.endswith(("q_proj", "v_proj")):
                lora = cm.adapters.get_submodule(f"{path_}.lora.default")
                expect = w + 2.0 * lora.lora_B.weight.detach() @ lora.lora_A.weight.detach()
            if key in merged:
                err = max(err, (merged[key] - expect).abs().max().item())
        result["merged_max_err"] = err
        assert err <= 1e-5, err
    results["save_export"] = result


def case_meta(results):
    """Compile on the meta device, load each rank's shard from a safetensors checkpoint, train."""
    ckpt = os.path.join(_shared_dir(), "base")
    if dist.get_rank() == 0 and not os.path.exists(ckpt):
        tiny_model("tiny-llama", seed=0).save_pretrained(ckpt + ".tmp", safe_serialization=True)
        os.replace(ckpt + ".tmp", ckpt)
    dist.barrier()
    cm = compare("meta_start", {"shard": {}}, results, meta_from=ckpt)
    results["meta_start"]["loaded"] = cm.loaded
    assert cm.loaded["shards"] <= 0.55 * results["meta_start"]["base_bytes"], cm.loaded


def case_stall(results):
    """Rank 1 stops taking part: rank 0's next collective fails within the group's timeout."""
    cm, _ = build({"shard": {}})
    ids = batches()[0].chunk(2)[dist.get_rank()]
    cm(input_ids=ids, labels=ids).loss.backward()
    marker = os.path.join(_shared_dir(), "stall-done")
    if dist.get_rank() == 1:
        for _ in range(600):  # stalled, until rank 0 has its error (or 60 s)
            if os.path.exists(marker):
                break
            time.sleep(0.1)
        os._exit(0)
    t0 = time.perf_counter()
    try:
        cm(input_ids=ids, labels=ids).loss.backward()
    except peftc.PeftcError as e:
        results["stall"] = {"error": str(e)[:400], "seconds_to_error": round(time.perf_counter() - t0, 2)}
    else:
        raise AssertionError("a step ran with a stalled rank")
    open(marker, "w").close()
    with open(sys.argv[1], "w") as f:
        json.dump(results, f, indent=1, default=str)
    os._exit(0)  # the group is broken: no destroy_process_group


def case_die(results):
    """Rank 1 dies mid-training: the launch fails within the timeout, never hangs."""
    cm, _ = build({"shard": {}})
    ids = batches()[0].chunk(2)[dist.get_rank()]
    cm(input_ids=ids, labels=ids).loss.backward()
    if dist.get_rank() == 1:
        os._exit(3)
    cm(input_ids=ids, labels=ids).loss.backward()
    raise AssertionError("a step ran with a dead rank")


CASES = {n.removeprefix("case_"): f for n, f in globals().items() if n.startswith("case_")}


def main():
    out, *names = sys.argv[1:]
    dist.init_process_group("gloo", timeout=timedelta(seconds=float(os.environ.get("PEFTC_TEST_TIMEOUT", "30"))))
    torch.set_num_threads(1)
    results = {}
    try:
        for n in names:
            t0 = time.perf_counter()
            CASES[n](results)
            results.setdefault(n, {})["seconds"] = round(time.perf_counter() - t0, 2)
        if dist.get_rank() == 0:
            tmp = out + ".tmp"
            with open(tmp, "w") as f:
                json.dump(results, f, indent=1, default=str)
            os.replace(tmp, out)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
