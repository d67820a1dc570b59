"""torch.distributed for peftc: the groups the ``shard`` pass talks over, its two collective ops,
rank-0 checkpoint writes, and loading a rank's shard straight from a safetensors checkpoint.

Every byte moves through torch.distributed's functional collectives (``all_gather_single``,
``all_reduce``); peftc adds no communication of its own. The two ops are opaque
``torch.library.custom_op``s, so export, the fx graph and torch.compile see one node each::

    shard_gather(W_shard, group, shape) -> W      all_gather over the shard group, unpadded, reshaped
    grad_mean(A, group, world) -> A'              A' = A (a copy); dL/dA = all_reduce_sum(dL/dA') / world

A weight is sharded flat: ``W.flatten()`` padded with zeros to a multiple of the shard group's
size, rank r keeping chunk r. So no world size is refused for not dividing a weight, and a
checkpoint row range covers each chunk (``load_sharded`` reads only those rows).

    with probe() as p:          # live gathered weights, sampled at every gather
        cm(**batch).loss.backward()
    p.peak, p.live()            # the most bytes gathered at once; bytes still held now
"""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch.distributed.fsdp import FSDPModule

from peftc.errors import CheckpointError, PeftcError, SpecError

__all__ = ["Groups", "groups", "require_process_group", "shard_flat", "shard_range", "probe", "GatherProbe",
           "on_rank0", "check_not_wrapped", "load_sharded", "save_merged_sharded"]


def require_process_group(field: str, value) -> None:
    """A SpecError (before capture) unless torch.distributed has a default process group."""
    if not (dist.is_available() and dist.is_initialized()):
        raise SpecError(field, value, "a spec run under an initialised default process group",
                        "launch with `torchrun --nproc_per_node N ...` and call "
                        "torch.distributed.init_process_group() before peftc.compile")


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
    """The groups of ``optimize.shard`` settings: ``mesh: [replicate, shard]`` (hybrid sharding:
    weights sharded within each group of ``shard`` ranks, replicated across the ``replicate``
    groups) or none (the whole world shards)."""
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


def shard_range(numel: int, rank: int, world: int) -> tuple[int, int, int]:
    """(start, stop, chunk) of rank's chunk of a flat tensor padded to ``world * chunk``;
    ``stop - start`` < ``chunk`` at the padded tail."""
    chunk = -(-numel // world)
    start = min(rank * chunk, numel)
    return start, min(start + chunk, numel), chunk


def shard_flat(t: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """Rank's chunk of ``t.flatten()`` zero-padded to a multiple of ``world`` (a new tensor)."""
    start, stop, chunk = shard_range(t.numel(), rank, world)
    out = torch.zeros(chunk, dtype=t.dtype, device=t.device)
    if t.device.type != "meta":
        out[: stop - start] = t.reshape(-1)[start:stop]
    return out


# ---------------------------------------------------------------- the two collective ops


class GatherProbe:
    """Bytes of gathered weights alive, tracked by storage weak references; sampled at each gather."""

    def __init__(self):
        self.refs: list[tuple[int, int]] = []
        self.peak = self.gathers = 0
        self.enabled = False

    def record(self, t: torch.Tensor) -> None:
        if self.enabled:
            s = t.untyped_storage()
            self.refs.append((s._weak_ref(), s.nbytes()))
            self.gathers += 1
            self.peak = max(self.peak, self.live())

    def live(self) -> int:
        alive = []
        for ref, n in self.refs:
            if torch.UntypedStorage._expired(ref):
                torch.UntypedStorage._free_weak_ref(ref)
            else:
                alive.append((ref, n))
        self.refs = alive
        return sum(n for _, n in alive)


PROBE = GatherProbe()


@contextlib.contextmanager
def probe():
    """Tracks gathered weights while the block runs (tests and memory checks)."""
    PROBE.__init__()
    PROBE.enabled = True
    try:
        yield PROBE
    finally:
        PROBE.enabled = False


@contextlib.contextmanager
def _collective(what: str, group: str):
    """A failed collective (a rank died, or stalled past the process group's timeout) -> PeftcError."""
    try:
        yield
    except RuntimeError as e:
        raise PeftcError(f"shard: {what} over process group {group!r} failed on rank {dist.get_rank()} of "
                         f"{dist.get_world_size()}: another rank died or did not reach it within the process "
                         f"group's timeout (init_process_group(timeout=...)). Cause: {e}") from e


@torch.library.custom_op("peftc::shard_gather", mutates_args=())
def shard_gather(shard: torch.Tensor, group: str, shape: list[int]) -> torch.Tensor:
    with _collective("all_gather of a weight shard", group):
        full = funcol.wait_tensor(funcol.all_gather_single(shard.contiguous(), 0, group))
    out = full[: math.prod(shape)].view(shape)
    PROBE.record(out)
    return out


@shard_gather.register_fake
def _(shard, group, shape):
    return shard.new_empty(shape)


@torch.library.custom_op("peftc::grad_mean", mutates_args=())
def grad_mean(x: torch.Tensor, group: str, world: int) -> torch.Tensor:
    return x.clone()


@grad_mean.register_fake
def _(x, group, world):
    return torch.empty_like(x)


def _grad_mean_setup(ctx, inputs, output):
    ctx.group, ctx.world = inputs[1], inputs[2]


def _grad_mean_backward(ctx, grad):
    with _collective("all_reduce of an adapter gradient", ctx.group):
        total = funcol.wait_tensor(funcol.all_reduce(grad.contiguous(), "sum", ctx.group))
    return total / ctx.world, None, None


grad_mean.register_autograd(_grad_mean_backward, setup_context=_grad_mean_setup)


# ---------------------------------------------------------------- around the model


def on_rank0(write, collective: bool = True):
    """``write()`` on rank 0 only, then a barrier (so no rank reads a file before it exists); just
    ``write()`` without a process group or when not ``collective`` (a replicated model, whose users
    often call save on rank 0 alone: a barrier there would wait for ranks that never come). Rank
    0's error still reaches the barrier first."""
    if not (collective and dist.is_available() and dist.is_initialized()):
        return write()
    try:
        return write() if dist.get_rank() == 0 else None
    finally:
        dist.barrier()


def check_not_wrapped(cm) -> None:
    """FSDP2 ``fully_shard(cm)`` swaps the parameters for DTensors the captured graphs never read:
    training would silently update copies. Refuse, naming what to use instead."""
    if isinstance(cm, FSDPModule):
        raise PeftcError("fully_shard() was applied to a CompiledModel: its graphs read the parameters "
                         "captured at compile time, not FSDP's sharded DTensors. Use "
                         "`optimize: {shard: {}}` in the spec (FSDP-style sharding inside the graph) "
                         "or DistributedDataParallel(cm) for plain data parallelism")


# ---------------------------------------------------------------- meta-device start


def _checkpoint_files(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.exists():
        return sorted({directory / f for f in json.loads(index.read_text())["weight_map"].values()})
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{directory}: no *.safetensors files (save_pretrained(..., safe_serialization=True))")
    return files


def _read_chunk(handle, key: str, shape: tuple[int, ...], rank: int, world: int) -> torch.Tensor:
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


def _swap(model, name: str, old: torch.Tensor, value: torch.Tensor, swapped: dict) -> torch.Tensor:
    """Registers ``value`` in place of the tensor at ``name`` (one new object per old one)."""
    owner, _, leaf = name.rpartition(".")
    module = model.get_submodule(owner)
    if id(old) not in swapped:
        is_param = leaf in module._parameters
        swapped[id(old)] = torch.nn.Parameter(value, requires_grad=False) if is_param else value
    new = swapped[id(old)]
    if leaf in module._parameters:
        module._parameters[leaf] = new
    else:
        module._buffers[leaf] = new
    return new


def load_sharded(cm, directory, *, prefix: str = "", device="cpu") -> dict[str, int]:
    """Loads the base weights of a model compiled on the meta device (``optimize: {shard}``) from
    an HF safetensors checkpoint dir: each rank reads only the rows covering its shard of every
    sharded weight, and the small unsharded tensors whole. Adapters left on the meta device are
    created (``to_empty``) and initialised as at compile time, with the same seed on every rank.
    The graphs captured on the meta device bake that device into their factory ops: they are
    dropped and captured again on ``device`` at the next call (the released weights become
    zero-stride placeholders there; the shards are found by identity, not sharded again).
    Returns bytes read per kind ({"shards", "whole"})."""
    from safetensors import safe_open

    from peftc.passes.optimize import shard as shard_pass

    store = shard_pass.shard_store(cm)
    directory = Path(directory)
    wanted = dict(store.entries)  # checkpoint key -> (buffer name, shape, dtype, rank, world)
    names = {n: t for n, t in [*cm.base_model.named_parameters(remove_duplicate=False),
                               *cm.base_model.named_buffers(remove_duplicate=False)]}
    swapped: dict[int, torch.Tensor] = {}  # a meta tensor cannot take CPU data: new objects, ties kept
    read = {"shards": 0, "whole": 0}
    for path in _checkpoint_files(directory):
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                name = key.removeprefix(prefix)
                if name in wanted:
                    buf, shape, dtype, rank, world = wanted.pop(name)
                    chunk = _read_chunk(f, key, shape, rank, world).to(device=device, dtype=dtype)
                    store.set_shard(buf, chunk)
                    read["shards"] += chunk.numel() * chunk.element_size()
                elif name in names and names[name].device.type == "meta" and name not in store.released:
                    value = f.get_tensor(key).to(device=device, dtype=names[name].dtype)
                    _swap(cm.base_model, name, names[name], value, swapped)
                    read["whole"] += value.numel() * value.element_size()
    if wanted:
        raise CheckpointError(f"{directory}: no weights for sharded {sorted(wanted)[:5]} "
                              f"({len(wanted)} missing; prefix={prefix!r})")
    for name, t in names.items():
        if t.device.type == "meta" and name in store.released:
            new = _swap(cm.base_model, name, t, torch.zeros((), dtype=t.dtype, device=device).expand(t.shape), swapped)
            store.by_id[id(new)] = name
    shard_pass.materialize_adapters(cm, device=device)
    cm.graphs.clear()
    return read


def save_merged_sharded(cm, path, *, max_shard_size: int | str = "5GB"):
    """``cm.save_merged`` for a sharded model; every rank calls it. The shards are gathered one
    weight at a time (all ranks take part; ranks > 0 drop each at once); rank 0 puts them back into
    the base model (the one full copy), streams the merged model to ``path`` (each merged weight
    computed, written, freed: no second copy), then frees them again. Returns the path on rank 0."""
    from peftc.passes import merge
    from peftc.passes.optimize import shard as shard_pass

    if "quantize" in cm.spec.optimize:
        raise PeftcError("a merged export of a quantized sharded base is not supported: the quantized weights "
                         "would have to be dequantized; export the adapter (save_adapter) instead")
    store = shard_pass.shard_store(cm)
    group = groups(shard_pass.check_settings(dict(cm.spec.optimize["shard"]))).shard
    params = dict(cm.base_model.named_parameters(remove_duplicate=False))
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
            return merge.save_merged(cm, path, max_shard_size=max_shard_size)
        finally:
            for k, t in placeholders.items():
                params[k].data = t
            full.clear()

    return on_rank0(write)
