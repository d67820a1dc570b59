"""The sharded base model: settings, process groups, the store of per-rank shards, and what a
sharded model adds to its life besides the pass (``passes/optimize/shard.py`` registers these
as the ``shard`` optimization's hooks, so the runtime calls them without naming it):

    write_files(cm, write)                 rank 0 writes (adapter checkpoints), then a barrier
    load_base(cm, dir, prefix, device)     each rank reads its shards from an HF safetensors dir
    export_merged(cm, save)                shards gathered one weight at a time; rank 0 runs save()
    before_merge / before_export           refusals: the base weights are per-rank shards

Settings (``optimize: {shard: {...}}``): ``reshard_after_forward`` (true), ``prefetch`` (false),
``mesh`` ([replicate, shard], default [1, world]). Shards are flat (``peftc.kernels.collectives``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from peftc.errors import CheckpointError, PeftcError, SpecError
from peftc.graph import placeholder
from peftc.kernels.collectives import on_rank0, require_process_group, shard_flat, shard_range
from peftc.passes.optimize.meta_load import base_tensors, materialize_adapters, swap_tensor
from peftc.peft_files import checkpoint_files

__all__ = ["check_settings", "SETTINGS", "ROOT", "Groups", "groups", "ShardStore", "shard_store",
           "materialize_adapters", "read_chunk", "load_base", "export_merged", "write_files", "before_merge",
           "before_export"]

ROOT = "_shard"  # store path of the ShardStore (every graph mounts the same one)
SETTINGS = {
    "reshard_after_forward": "true or false (default true): free each gathered weight after its op, gather again "
                             "in backward",
    "prefetch": "true or false (default false): gather block i+1's weights when block i starts "
                "(needs reshard_after_forward: false)",
    "mesh": "[replicate, shard]: two positive integers whose product is the world size (default [1, world])",
}


def check_settings(settings) -> dict:
    """``optimize: {shard: {...}}`` with defaults; SpecError naming a bad setting."""
    for key, value in settings.items():
        if key not in SETTINGS:
            raise SpecError(f"optimize.shard.{key}", value, f"one of {sorted(SETTINGS)}", "unknown shard setting")
    out = {"reshard_after_forward": True, "prefetch": False, "mesh": None, **settings}
    for key in ("reshard_after_forward", "prefetch"):
        if not isinstance(out[key], bool):
            raise SpecError(f"optimize.shard.{key}", out[key], SETTINGS[key])
    if out["prefetch"] and out["reshard_after_forward"]:
        raise SpecError("optimize.shard.prefetch", True, SETTINGS["prefetch"],
                        "with resharding each gather runs inside its op's recompute region; set "
                        "reshard_after_forward: false to prefetch")
    mesh = out["mesh"]
    if mesh is not None:
        if not (isinstance(mesh, (list, tuple)) and len(mesh) == 2 and
                all(isinstance(m, int) and not isinstance(m, bool) and m > 0 for m in mesh)):
            raise SpecError("optimize.shard.mesh", mesh, SETTINGS["mesh"])
        out["mesh"] = tuple(mesh)
    return out


# ---------------------------------------------------------------- process groups


@dataclass(frozen=True)
class Groups:
    """Who shares what: weights are sharded over ``shard`` (size ``shard_world``, this rank is
    ``shard_rank`` there); adapter gradients are averaged over ``data`` (every rank, ``world``)."""

    shard: str
    shard_rank: int
    shard_world: int
    data: str
    world: int


_MESHES: dict[tuple[int, int], object] = {}


def groups(settings: dict) -> Groups:
    """The groups of checked settings: ``mesh: [replicate, shard]`` (hybrid sharding: weights
    sharded within each group of ``shard`` ranks, replicated across the ``replicate`` groups) or
    none (the whole world shards)."""
    require_process_group("optimize.shard", settings)
    world, rank = dist.get_world_size(), dist.get_rank()
    mesh = settings.get("mesh")
    data = dist.group.WORLD.group_name
    if mesh is None or tuple(mesh) == (1, world):
        return Groups(data, rank, world, data, world)
    if math.prod(mesh) != world:
        raise SpecError("optimize.shard.mesh", list(mesh), f"[replicate, shard] with replicate * shard = {world} "
                        "(the world size)")
    key = tuple(mesh)
    if key not in _MESHES:
        from torch.distributed.device_mesh import init_device_mesh

        device = "cuda" if dist.get_backend() == "nccl" else "cpu"
        _MESHES[key] = init_device_mesh(device, key, mesh_dim_names=("replicate", "shard"))
    sub = _MESHES[key]["shard"]
    return Groups(sub.get_group().group_name, sub.get_local_rank(), mesh[1], data, world)


# ---------------------------------------------------------------- the store


class ShardStore(nn.Module):
    """Every rank's shards, as buffers (``w<i>``); ``entries``: key -> (buffer, shape, dtype, rank, world),
    the key being the tensor's name in the base model (a checkpoint key) or ``<store path>`` for buffers
    of other optimizations; ``released``: base names whose full storage was freed."""

    def __init__(self):
        super().__init__()
        self.entries: dict[str, tuple] = {}
        self.by_id: dict[int, str] = {}
        self.released: set[str] = set()
        self.full_bytes = 0

    def add(self, key: str, t: torch.Tensor, rank: int, world: int) -> str:
        if key not in self.entries:
            buf = f"w{len(self.entries)}"
            self.register_buffer(buf, shard_flat(t.detach(), rank, world))
            self.entries[key] = (buf, tuple(t.shape), t.dtype, rank, world)
            self.full_bytes += t.numel() * t.element_size()
            if t.device.type != "meta":  # free the full tensor; shape and identity stay for later captures
                t.data = placeholder(t)
            self.released.add(key)
            self.by_id[id(t)] = key
        return self.entries[key][0]

    def set_shard(self, buf: str, value: torch.Tensor) -> None:
        self._buffers[buf] = value

    def shard_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers() if b.device.type != "meta")


def shard_store(cm) -> ShardStore:
    try:
        return cm.adapters.get_submodule(ROOT)
    except AttributeError:
        raise SpecError("optimize", sorted(cm.spec.optimize), "a spec with optimize: {shard: {...}}",
                        "only a sharded model has shards to load") from None


# ---------------------------------------------------------------- meta-device start


def read_chunk(handle, key: str, shape: tuple[int, ...], rank: int, world: int) -> torch.Tensor:
    """Rank's flat chunk of checkpoint tensor ``key``, reading only the rows that cover it."""
    numel = math.prod(shape)
    start, stop, chunk = shard_range(numel, rank, world)
    sl = handle.get_slice(key)
    row = math.prod(shape[1:]) if len(shape) > 1 else 1
    lo, hi = start // row, -(-stop // row)
    flat = sl[lo:hi].reshape(-1) if stop > start else torch.zeros(0)
    part = flat[start - lo * row: stop - lo * row]
    out = torch.zeros(chunk, dtype=part.dtype)
    out[: part.numel()] = part
    return out


def load_base(cm, directory, *, prefix: str = "", device="cpu") -> dict[str, int]:
    """``peftc.load_sharded``: each rank reads only the checkpoint rows covering its shard of every
    sharded weight, and the small unsharded tensors whole; adapters left on the meta device are
    materialized; the graphs (captured on the meta device) are dropped. Bytes read per kind."""
    from safetensors import safe_open

    store = shard_store(cm)
    directory = Path(directory)
    wanted = dict(store.entries)  # checkpoint key -> (buffer name, shape, dtype, rank, world)
    names = base_tensors(cm.get_base_model())
    swapped: dict[int, torch.Tensor] = {}  # a meta tensor cannot take CPU data: new objects, ties kept
    read = {"shards": 0, "whole": 0}
    for path in checkpoint_files(directory):
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                name = key.removeprefix(prefix)
                if name in wanted:
                    buf, shape, dtype, rank, world = wanted.pop(name)
                    chunk = read_chunk(f, key, shape, rank, world).to(device=device, dtype=dtype)
                    store.set_shard(buf, chunk)
                    read["shards"] += chunk.numel() * chunk.element_size()
                elif name in names and names[name].device.type == "meta" and name not in store.released:
                    value = f.get_tensor(key).to(device=device, dtype=names[name].dtype)
                    swap_tensor(cm.get_base_model(), name, names[name], value, swapped)
                    read["whole"] += value.numel() * value.element_size()
    if wanted:
        raise CheckpointError(f"{directory}: no weights for sharded {sorted(wanted)[:5]} "
                              f"({len(wanted)} missing; prefix={prefix!r})")
    for name, t in names.items():
        if t.device.type == "meta" and name in store.released:
            new = swap_tensor(cm.get_base_model(), name, t, placeholder(t, device), swapped)
            store.by_id[id(new)] = name
    materialize_adapters(cm, device=device)
    cm.graphs.clear(device)
    return read


# ---------------------------------------------------------------- files and merging


def export_merged(cm, save):
    """``save()`` (it writes the merged model from ``cm.get_base_model()``) with the full base weights:
    every rank gathers the shards one weight at a time (ranks > 0 drop each at once); rank 0 puts
    them back into the base model, runs ``save()``, frees them again; then a barrier."""
    if "quantize" in cm.spec.optimize:
        raise PeftcError("a merged export of a quantized sharded base is not supported: the quantized weights "
                         "would have to be dequantized; export the adapter (save_adapter) instead")
    store = shard_store(cm)
    group = groups(check_settings(dict(cm.spec.optimize["shard"]))).shard
    params = dict(cm.get_base_model().named_parameters(remove_duplicate=False))
    full = {}
    for key, (buf, shape, *_rest) in store.entries.items():
        t = torch.ops.peftc.shard_gather(store.get_buffer(buf), group, list(shape))
        if dist.get_rank() == 0 and key in params:
            full[key] = t
        del t

    def write():
        placeholders = {k: params[k].data for k in full}
        try:
            for k, t in full.items():
                params[k].data = t
            return save()
        finally:
            for k, t in placeholders.items():
                params[k].data = t
            full.clear()

    return on_rank0(write)


def write_files(cm, write):
    """A sharded model's ranks train one model: rank 0 writes its files, then a barrier."""
    return on_rank0(write)


def before_merge(cm, requantize: bool) -> None:
    raise PeftcError("merge() folds adapters into the base weights in place, but a sharded model's base weights "
                     "live as per-rank shards; keep the adapter unmerged, or export a merged copy with "
                     "peftc.distributed.save_merged_sharded(cm, path)")


def before_export(cm) -> None:
    raise PeftcError("the base weights are sharded across ranks: use peftc.distributed.save_merged_sharded(cm, path) "
                     "(every rank calls it; rank 0 writes one weight at a time)")
