"""torch.distributed for peftc's runtime: checkpoint writes across ranks, loading a rank's base
tensors straight from a safetensors checkpoint, merged export of a model whose base spans ranks.

The runtime names no optimization: what a model spread over ranks needs comes from the hooks
its optimizations register (``peftc.spec.HOOKS``; the ``shard`` optimization registers them):

    write_files(cm, write)      cm.save_adapter: rank 0 writes, then a barrier
    load_base(cm, dir, ...)     load_sharded: each rank reads only what it keeps
    export_merged(cm, save)     save_merged_sharded: the full base weights for one save()

The collective ops and the flat shard layout are ``peftc.kernels.collectives`` (re-exported here:
``probe``, ``shard_flat``, ``shard_range``, ``on_rank0``, ``require_process_group``).

    with probe() as p:          # live gathered weights, sampled at every gather
        cm(**batch).loss.backward()
    p.peak, p.live()            # the most bytes gathered at once; bytes still held now
"""

from __future__ import annotations

import functools

from torch.distributed.fsdp import FSDPModule

from peftc import merging
from peftc.errors import PeftcError, SpecError
from peftc.kernels.collectives import (
    GatherProbe,
    on_rank0,
    probe,
    require_process_group,
    shard_flat,
    shard_range,
)
from peftc.spec import optimization_hooks

__all__ = ["require_process_group", "shard_flat", "shard_range", "probe", "GatherProbe", "on_rank0",
           "write_files", "check_not_wrapped", "load_sharded", "save_merged_sharded"]


def write_files(cm, write):
    """``write()`` (it writes files of ``cm``) as the model's optimizations need: a model whose
    ranks train one model writes on rank 0, then every rank meets at a barrier (so no rank reads
    a file before it exists); otherwise just ``write()`` (a replicated model, whose users often
    call save on rank 0 alone: a barrier there would wait for ranks that never come)."""
    hooks = optimization_hooks(cm.spec, "write_files")
    return hooks[0](cm, write) if hooks else write()


def _hook(cm, hook: str, what: str):
    hooks = optimization_hooks(cm.spec, hook)
    if not hooks:
        raise SpecError("optimize", sorted(cm.spec.optimize), "a spec with optimize: {shard: {...}}",
                        f"only a model whose base weights are per-rank shards has {what}")
    return hooks[0]


def check_not_wrapped(cm) -> None:
    """FSDP2 ``fully_shard(cm)`` swaps the parameters for DTensors the captured graphs never read:
    training would silently update copies. Refuse, naming what to use instead."""
    if isinstance(cm, FSDPModule):
        raise PeftcError("fully_shard() was applied to a CompiledModel: its graphs read the parameters "
                         "captured at compile time, not FSDP's sharded DTensors. Use "
                         "`optimize: {shard: {}}` in the spec (FSDP-style sharding inside the graph) "
                         "or DistributedDataParallel(cm) for plain data parallelism")


def load_sharded(cm, directory, *, prefix: str = "", device="cpu") -> dict[str, int]:
    """Loads the base weights of a model compiled on the meta device (``optimize: {shard}``) from
    an HF safetensors checkpoint dir: each rank reads only the rows covering its shard of every
    sharded weight, and the small unsharded tensors whole. Adapters left on the meta device are
    created (``to_empty``) and initialised as at compile time, with the same seed on every rank.
    The graphs captured on the meta device bake that device into their factory ops: they are
    dropped and captured again on ``device`` at the next call (the released weights become
    zero-stride placeholders there; the shards are found by identity, not sharded again).
    Returns bytes read per kind ({"shards", "whole"})."""
    load = _hook(cm, "load_base", "shards to load")
    return load(cm, directory, prefix=prefix, device=device)


def save_merged_sharded(cm, path, *, max_shard_size: int | str = "5GB"):
    """``cm.save_merged`` for a sharded model; every rank calls it. The shards are gathered one
    weight at a time (all ranks take part; ranks > 0 drop each at once); rank 0 puts them back into
    the base model (the one full copy), streams the merged model to ``path`` (each merged weight
    computed, written, freed: no second copy), then frees them again. Returns the path on rank 0."""
    export = _hook(cm, "export_merged", "shards to gather")
    return export(cm, functools.partial(merging.save_merged, cm, path, max_shard_size=max_shard_size))
