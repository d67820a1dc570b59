"""Sharding: FSDP-style data parallelism as a graph rewrite (SimpleFSDP's design, in eager fx).

    get_attr W (frozen)        -> shard_gather(get_attr W_shard, group, shape)   right before its use
    op(x, W, ...)              -> Checkpointed([shard_gather, op])(x, W_shard, ...)  (reshard_after_forward)
    get_attr A (trainable)     -> grad_mean(A, world_group, world)               dL/dA averaged over ranks

Each rank keeps 1/world of every frozen tensor the graph reads (base parameters, and the quantized
buffers of ``quantize``: sharded NF4 is FSDP-QLoRA), flat and zero-padded (kernels/collectives.py);
the full tensor's storage is released (a zero-stride placeholder of the same shape, as
``quantize.release_base``), so the user's eager model no longer computes. The graph gathers a
weight right before the op that reads it; with ``reshard_after_forward`` (default) gather and op
form one region run under non-reentrant ``torch.utils.checkpoint``: the gathered weight is freed
when the op returns and gathered again in backward, never saved (frozen weights have no gradient,
so no reduce-scatter). In a region that ``recompute: {policy: blocks}`` already checkpoints, the
shard is passed in and gathered inside it: the whole block re-gathers with its recompute. Without
``reshard_after_forward`` one gather per weight feeds every use and autograd keeps it until
backward (no second gather); ``prefetch`` then hoists block i+1's gathers to the start of block i.
Adapters stay replicated; ``grad_mean`` averages their gradients inside backward, so no DDP wrapper.

Settings (``optimize: {shard: {...}}``): ``reshard_after_forward`` (true), ``prefetch`` (false),
``mesh`` ([replicate, shard], default [1, world]: hybrid sharding shards within groups of ``shard``
ranks). Needs an initialised default process group (``torchrun``), checked before capture.
``ctx.counts``: ``shard`` (tensors sharded), ``shard_regions`` (gather + op regions),
``shard_in_blocks`` (gathers placed inside recompute blocks), ``shard_grad_mean`` (adapter tensors).
Coverage (``ctx.coverage("shard", "frozen tensors")``): every frozen tensor the graph reads is
sharded or counted with why it stays whole (model buffers, frozen adapter tensors, constants,
parameters inside ``call_module`` nodes); ``graph_summary()`` also gets a ``sharded over ...``
line of bytes and settings when something was sharded. The settings, the process groups, the
store of shards and the runtime hooks (checkpoint writes on rank 0, loading shards from a
checkpoint, merged export) are ``shard_base.py``.
"""

from __future__ import annotations

import torch
from torch import fx, nn

from peftc.graph import PEFTC, SUMMARY_LINES, fetch_attr, mount_adapter
from peftc.kernels import collectives  # noqa: F401  (registers shard_gather and grad_mean)
from peftc.passes.optimize.recompute_ops import Checkpointed, extract_region
from peftc.passes.optimize.shard_base import (
    ROOT,
    SETTINGS,
    Groups,
    ShardStore,
    before_export,
    before_merge,
    check_settings,
    export_merged,
    groups,
    load_base,
    materialize_adapters,
    shard_store,
    write_files,
)
from peftc.passes.pipeline import PassContext, PassResult, register_optimization

__all__ = ["shard", "check_settings", "check_model", "ShardStore", "shard_store", "materialize_adapters",
           "ROOT", "SETTINGS", "UNIT"]

aten = torch.ops.aten
UNIT = "frozen tensors"  # what the coverage counts: frozen tensors the graph reads (sharded, or why not)
_VIEWS = {aten.t.default, aten.permute.default, aten.transpose.int, aten.view.default, aten.reshape.default,
          aten.expand.default, aten.unsqueeze.default, aten._to_copy.default}


def check_model(spec, resolved, model: nn.Module) -> None:
    """Before capture: a process group exists and the mesh fits the world size."""
    settings = check_settings(dict(spec.optimize.get("shard") or {}))
    groups(settings)


def _store(store: nn.Module) -> ShardStore:
    try:
        return store.get_submodule(ROOT)
    except AttributeError:
        mount_adapter(store, nn.Module(), ROOT, ShardStore)
        return store.get_submodule(ROOT)


def _frozen_owners(ctx: PassContext, store: ShardStore) -> dict[int, str]:
    """id(tensor) -> key of every frozen tensor the pass shards."""
    owners = dict(store.by_id)
    for name, p in ctx.model.named_parameters(remove_duplicate=False):
        if not p.requires_grad and id(p) not in owners:
            owners[id(p)] = name
    for name, b in ctx.store.named_buffers():
        if name.startswith("_quantize.") and id(b) not in owners:
            owners[id(b)] = name
    return owners


def _span(u: fx.Node) -> list[fx.Node]:
    """The op reading a gathered weight, extended through single-use views (t(W) -> mm)."""
    span = [u]
    while span[-1].target in _VIEWS and len(span[-1].users) == 1:
        span.append(next(iter(span[-1].users)))
    return span


def _tag(node: fx.Node, like: fx.Node, key: str, role: str, adapter: str) -> fx.Node:
    node.meta[PEFTC] = {"method": "shard", "adapter": adapter, "module": key, "role": role, "optimization": "sharded"}
    if "nn_module_stack" in like.meta:
        node.meta["nn_module_stack"] = dict(like.meta["nn_module_stack"])
    return node


def _gather_inside(gm: fx.GraphModule, call: fx.Node, w: fx.Node, shard_node: fx.Node, args: tuple,
                   key: str, adapter: str) -> None:
    """A Checkpointed region reads W: it gets the shard instead and gathers it itself."""
    region = gm.get_submodule(call.target).region
    phs = [n for n in region.graph.nodes if n.op == "placeholder"]
    pos = {n: k for k, n in enumerate(region.graph.nodes)}
    for i, a in enumerate(call.args):
        if a is w and phs[i].users:
            ph = phs[i]
            with region.graph.inserting_before(min(ph.users, key=pos.__getitem__)):  # right before its first use
                g = region.graph.call_function(torch.ops.peftc.shard_gather.default, (ph, *args))
            _tag(g, next(iter(ph.users), ph), key, "gather", adapter)
            ph.replace_all_uses_with(g, delete_user_cb=lambda n, g=g: n is not g)
    region.recompile()
    call.replace_input_with(w, shard_node)


def shard(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    """Frozen reads -> gathers of per-rank shards; trainable reads -> grad_mean (module docstring)."""
    settings = check_settings(dict(ctx.spec.optimize.get("shard") or {}))
    grp = groups(settings)
    cov = ctx.coverage("shard", UNIT)
    store = _store(ctx.store)
    mount_adapter(ctx.store, gm, ROOT, lambda: store)
    owners = _frozen_owners(ctx, store)
    trainable = {id(p) for p in ctx.store.parameters() if p.requires_grad}
    adapter = ctx.spec.adapter
    counts = dict.fromkeys(("shard", "shard_regions", "shard_in_blocks", "shard_grad_mean"), 0)
    gathers: list[fx.Node] = []
    for w in [n for n in gm.graph.nodes if n.op == "get_attr"]:
        t = fetch_attr(gm, w.target)
        if not isinstance(t, torch.Tensor) or not w.users:
            continue
        if id(t) in trainable:
            with gm.graph.inserting_after(w):
                m = gm.graph.call_function(torch.ops.peftc.grad_mean.default, (w, grp.data, grp.world))
            _tag(m, w, w.target, "grad_mean", adapter)
            w.replace_all_uses_with(m, delete_user_cb=lambda n, m=m: n is not m)
            counts["shard_grad_mean"] += 1
            continue
        key = owners.get(id(t))
        if key is None:
            cov.miss(_kept_whole(t, ctx))
            continue
        buf = store.add(key, t, grp.shard_rank, grp.shard_world)
        with gm.graph.inserting_before(w):
            shard_node = _tag(gm.graph.get_attr(f"{ROOT}.{buf}"), w, key, "shard", adapter)
        args = (grp.shard, list(t.shape))
        shared = None
        for u in list(w.users):
            if u.op == "call_module" and isinstance(gm.get_submodule(u.target), Checkpointed):
                _gather_inside(gm, u, w, shard_node, args, key, adapter)
                counts["shard_in_blocks"] += 1
                continue
            if settings["reshard_after_forward"] or shared is None:
                with gm.graph.inserting_before(u):
                    g = _tag(gm.graph.call_function(torch.ops.peftc.shard_gather.default, (shard_node, *args)),
                             u, key, "gather", adapter)
                shared = g
            u.replace_input_with(w, shared)
            if settings["reshard_after_forward"]:
                name = f"_peftc_shard_{counts['shard_regions']}"
                call = extract_region(gm, [shared, *_span(u)], name)
                if call is not None:
                    call.meta[PEFTC] = {"method": "shard", "adapter": adapter, "module": key, "role": "regather",
                                        "optimization": "sharded"}
                    counts["shard_regions"] += 1
            else:
                gathers.append(shared)
        gm.graph.erase_node(w)
        counts["shard"] += 1
        cov.hit()
    for u in [n for n in gm.graph.nodes if n.op == "call_module"]:  # a module left whole by the frontend
        held = sum(not p.requires_grad for p in gm.get_submodule(u.target).parameters())
        if held:
            cov.miss("frozen parameters inside call_module nodes (only get_attr reads are sharded)", held)
    _release_quantized(ctx)
    if settings["prefetch"]:
        _prefetch(gm, gathers)
    for k, v in counts.items():
        ctx.counts[k] += v
    if counts["shard"]:
        gm.meta.setdefault(SUMMARY_LINES, []).append(_line(settings, grp, store, counts))
    return PassResult(gm, counts["shard"] + counts["shard_grad_mean"] > 0)


def _release_quantized(ctx: PassContext) -> None:
    """The graph reads Q(W) (sharded) instead of W: the full-precision W is freed too, as
    ``quantize: {release_base: true}`` would (merging then needs ``merge(requantize=True)``)."""
    from peftc.passes.optimize.quantize import ROOT as QROOT
    from peftc.passes.optimize.quantize import QuantizedWeight, _release

    try:
        root = ctx.store.get_submodule(QROOT)
    except AttributeError:
        return
    for path, m in root.named_modules():
        if isinstance(m, QuantizedWeight) and not path.endswith(".merged"):
            _release(ctx.model.get_submodule(path), root, path)


def _prefetch(gm: fx.GraphModule, gathers: list[fx.Node]) -> None:
    """Each gather of block i+1 moves to the start of block i (blocks as recompute finds them)."""
    from peftc.passes.optimize.recompute import find_blocks

    _, spans = find_blocks(gm)
    order = sorted(spans)
    first = {i: spans[i][0] for i in order}
    block_of = {n: i for i in order for n in spans[i]}
    pos = {n: k for k, n in enumerate(gm.graph.nodes)}
    for g in gathers:
        user = min(g.users, key=pos.__getitem__, default=None)
        i = block_of.get(user)
        if i is not None and order.index(i) > 0:
            start = first[order[order.index(i) - 1]]
            start.prepend(g.args[0])  # the shard's get_attr, then its gather
            start.prepend(g)


def _kept_whole(t: torch.Tensor, ctx: PassContext) -> str:
    """Why a tensor the graph reads stays whole on every rank (a coverage miss): the pass shards
    the base model's frozen parameters and the quantized weights, and nothing else."""
    if t.requires_grad:
        return "trainable tensors outside the adapter store (neither sharded nor averaged over ranks)"
    if any(b is t for b in ctx.model.buffers()):
        return "model buffers (kept whole on every rank: only parameters are sharded)"
    if any(x is t for x in (*ctx.store.parameters(), *ctx.store.buffers())):
        return "frozen adapter tensors (adapters stay whole on every rank)"
    return "graph constants (kept whole on every rank)"


def _line(settings: dict, grp: Groups, store: ShardStore, counts: dict) -> str:
    """What was sharded, where and how (the coverage line, if any, says what was not)."""
    how = ("each gathered weight freed after its op and gathered again in backward"
           if settings["reshard_after_forward"] else "gathered weights kept for backward"
           + (", next block prefetched" if settings["prefetch"] else ""))
    return (f"sharded over {grp.shard_world} of {grp.world} ranks: {counts['shard']} frozen tensors "
            f"({store.full_bytes:,} -> {store.shard_bytes():,} bytes on this rank); {how} "
            f"({counts['shard_regions']} regions, {counts['shard_in_blocks']} in recompute blocks); "
            f"{counts['shard_grad_mean']} adapter tensors' gradients averaged over {grp.world} ranks")


# the one record of the shard optimization: its pass and what a sharded model adds to the runtime
register_optimization("shard", phase="shard", check=check_settings, on_base=True, check_model=check_model,
                      before_merge=before_merge, before_export=before_export, write_files=write_files,
                      load_base=load_base, export_merged=export_merged)(shard)
