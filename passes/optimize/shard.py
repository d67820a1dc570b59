"""Sharding: FSDP-style data parallelism as a graph rewrite (SimpleFSDP's design, in eager fx).

    get_attr W (frozen)        -> shard_gather(get_attr W_shard, group, shape)   right before its use
    op(x, W, ...)              -> Checkpointed([shard_gather, op])(x, W_shard, ...)  (reshard_after_forward)
    get_attr A (trainable)     -> grad_mean(A, world_group, world)               dL/dA averaged over ranks

Each rank keeps 1/world of every frozen tensor the graph reads (base parameters, and the quantized
buffers of ``quantize``: sharded NF4 is FSDP-QLoRA), flat and zero-padded (peftc/distributed.py);
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
"""

from __future__ import annotations

import torch
from torch import fx, nn

from peftc import distributed
from peftc.errors import PeftcError, SpecError
from peftc.graph import PEFTC, SUMMARY_LINES, fetch_attr, mount_adapter
from peftc.passes.optimize.recompute_ops import Checkpointed, extract_region
from peftc.passes.pipeline import PassContext, PassResult, register_optimization

__all__ = ["shard", "check_settings", "check_model", "ShardStore", "shard_store", "materialize_adapters",
           "ROOT", "SETTINGS"]

aten = torch.ops.aten
ROOT = "_shard"  # store path of the ShardStore (every graph mounts the same one)
SETTINGS = {
    "reshard_after_forward": "true or false (default true): free each gathered weight after its op, gather again "
                             "in backward",
    "prefetch": "true or false (default false): gather block i+1's weights when block i starts "
                "(needs reshard_after_forward: false)",
    "mesh": "[replicate, shard]: two positive integers whose product is the world size (default [1, world])",
}
_VIEWS = {aten.t.default, aten.permute.default, aten.transpose.int, aten.view.default, aten.reshape.default,
          aten.expand.default, aten.unsqueeze.default, aten._to_copy.default}


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


def check_model(spec, resolved, model: nn.Module) -> None:
    """Before capture: a process group exists and the mesh fits the world size."""
    settings = check_settings(dict(spec.optimize.get("shard") or {}))
    distributed.groups(settings)


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
            self.register_buffer(buf, distributed.shard_flat(t.detach(), rank, world))
            self.entries[key] = (buf, tuple(t.shape), t.dtype, rank, world)
            self.full_bytes += t.numel() * t.element_size()
            if t.device.type != "meta":  # free the full tensor; shape and identity stay for later captures
                t.data = torch.zeros((), dtype=t.dtype, device=t.device).expand(t.shape)
            self.released.add(key)
            self.by_id[id(t)] = key
        return self.entries[key][0]

    def set_shard(self, buf: str, value: torch.Tensor) -> None:
        self._buffers[buf] = value

    def shard_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers() if b.device.type != "meta")


def _store(store: nn.Module) -> ShardStore:
    try:
        return store.get_submodule(ROOT)
    except AttributeError:
        mount_adapter(store, nn.Module(), ROOT, ShardStore)
        return store.get_submodule(ROOT)


def shard_store(cm) -> ShardStore:
    try:
        return cm.adapters.get_submodule(ROOT)
    except AttributeError:
        raise SpecError("optimize", sorted(cm.spec.optimize), "a spec with optimize: {shard: {...}}",
                        "only a sharded model has shards to load") from None


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
    groups = distributed.groups(settings)
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
                m = gm.graph.call_function(torch.ops.peftc.grad_mean.default, (w, groups.data, groups.world))
            _tag(m, w, w.target, "grad_mean", adapter)
            w.replace_all_uses_with(m, delete_user_cb=lambda n, m=m: n is not m)
            counts["shard_grad_mean"] += 1
            continue
        key = owners.get(id(t))
        if key is None:
            continue
        buf = store.add(key, t, groups.shard_rank, groups.shard_world)
        with gm.graph.inserting_before(w):
            shard_node = _tag(gm.graph.get_attr(f"{ROOT}.{buf}"), w, key, "shard", adapter)
        args = (groups.shard, list(t.shape))
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
    _release_quantized(ctx)
    if settings["prefetch"]:
        _prefetch(gm, gathers)
    for k, v in counts.items():
        ctx.counts[k] += v
    gm.meta.setdefault(SUMMARY_LINES, []).append(_line(settings, groups, store, counts))
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


def _line(settings: dict, groups, store: ShardStore, counts: dict) -> str:
    how = ("each gathered weight freed after its op and gathered again in backward"
           if settings["reshard_after_forward"] else "gathered weights kept for backward"
           + (", next block prefetched" if settings["prefetch"] else ""))
    if not counts["shard"]:
        return "shard: no frozen weight read by this graph: nothing sharded"
    return (f"shard: {counts['shard']} frozen tensors sharded over {groups.shard_world} of {groups.world} ranks "
            f"({store.full_bytes:,} -> {store.shard_bytes():,} bytes on this rank); {how} "
            f"({counts['shard_regions']} regions, {counts['shard_in_blocks']} in recompute blocks); "
            f"{counts['shard_grad_mean']} adapter tensors' gradients averaged over {groups.world} ranks")


def materialize_adapters(cm, seed: int = 0, device="cpu") -> None:
    """Adapters compiled on the meta device -> real tensors, initialised as at compile time (LoRA:
    A kaiming-uniform, B zero) from ``seed`` on every rank alike; other methods' adapters must be
    loaded (``cm.load_adapter_state_dict``) and are left empty."""
    from peftc.passes.methods.lora import LoraLinear

    torch.manual_seed(seed)
    for m in cm.adapters.modules():
        if not any(p.device.type == "meta" for p in m.parameters(recurse=False)) and not isinstance(m, LoraLinear):
            continue
        if isinstance(m, LoraLinear) and m.lora_A.weight.device.type == "meta":
            m.to_empty(device=device)
            m.lora_A.reset_parameters()
            nn.init.zeros_(m.lora_B.weight)
        elif not isinstance(m, LoraLinear):
            m.to_empty(device=device, recurse=False)


def _before_merge(cm, requantize: bool) -> None:
    raise PeftcError("merge() folds adapters into the base weights in place, but a sharded model's base weights "
                     "live as per-rank shards; keep the adapter unmerged, or export a merged copy with "
                     "peftc.distributed.save_merged_sharded(cm, path)")


def _before_export(cm) -> None:
    raise PeftcError("the base weights are sharded across ranks: use peftc.distributed.save_merged_sharded(cm, path) "
                     "(every rank calls it; rank 0 writes one weight at a time)")


register_optimization("shard", phase="shard", check=check_settings, on_base=True, check_model=check_model,
                      before_merge=_before_merge, before_export=_before_export)(shard)
