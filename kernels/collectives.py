"""The collective ops of sharded graphs, and the flat layout of a shard.

Every byte moves through torch.distributed's functional collectives (``all_gather_single``,
``all_reduce``); peftc adds no communication of its own. The two ops are opaque
``torch.library.custom_op``s (registered on import), so export, the fx graph and torch.compile
see one node each::

    shard_gather(W_shard, group, shape) -> W      all_gather over the shard group, unpadded, reshaped
    grad_mean(A, group, world) -> A'              A' = A (a copy); dL/dA = all_reduce_sum(dL/dA') / world

A tensor is sharded flat: ``W.flatten()`` padded with zeros to a multiple of the group's size,
rank r keeping chunk r (``shard_flat``, ``shard_range``). So no world size is refused for not
dividing a weight, and a checkpoint row range covers each chunk.

    with probe() as p:          # live gathered weights, sampled at every gather
        cm(**batch).loss.backward()
    p.peak, p.live()            # the most bytes gathered at once; bytes still held now

``on_rank0(write)``: files written once, by rank 0, then a barrier.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol

from peftc.errors import PeftcError, SpecError

__all__ = ["shard_gather", "grad_mean", "shard_flat", "shard_range", "probe", "GatherProbe", "PROBE",
           "require_process_group", "on_rank0"]


def require_process_group(field: str, value) -> None:
    """A SpecError (before capture) unless torch.distributed has a default process group."""
    if not (dist.is_available() and dist.is_initialized()):
        raise SpecError(field, value, "a spec run under an initialised default process group",
                        "launch with `torchrun --nproc_per_node N ...` and call "
                        "torch.distributed.init_process_group() before peftc.compile")


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


# ---------------------------------------------------------------- the two ops


@torch.library.custom_op("peftc::shard_gather", mutates_args=())
def shard_gather(shard: torch.Tensor, group: str, shape: list[int]) -> torch.Tensor:
    # shard: this rank's flat chunk (chunk,); group: process group name; shape: the full tensor's
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


# ---------------------------------------------------------------- files


def on_rank0(write):
    """``write()`` on rank 0 only, then a barrier (so no rank reads a file before it exists); just
    ``write()`` without a process group. Rank 0's error still reaches the barrier first."""
    if not (dist.is_available() and dist.is_initialized()):
        return write()
    try:
        return write() if dist.get_rank() == 0 else None
    finally:
        dist.barrier()
