"""Merging at run time: fold the active adapters into the base weights in place; unmerge restores them bit for bit.

    LoRA   W' = W + s B A            DoRA  W' = (m / ||W + s B A||_row) (W + s B A)
    IA3    W' = W * l (rows; and b' = b * l)   feedforward: W' = W * l (columns)
    SSF    W' = g W (rows), b' = g b + beta     LoHa / LoKr / VeRA: W' = W + dW
    BitFit / train / LN tuning: the graph reads the trained copies (they already exist)

Each mergeable method spec has ``fold(path, module, W, b, transposed) -> (W', b')`` (``W`` as
the model stores it: (in, out) for Conv1D; ``b' = None``: bias unchanged).

**Why in place.** Memory comes first for the users who merge: a merged copy per weight costs as
much as the adapted layers themselves (~13 GB on an 8B model with LoRA on every linear; the
former per-graph copies cost that once per captured call signature). PEFT merges in place too.
Merging walks the adapted weights one at a time, so its peak is a few copies of the largest
one, not of the model; every captured graph reads the base parameters and so sees the merge.

**Why unmerge is exact.** Subtracting the delta again (PEFT's unmerge) misses the original
where ``W + D`` rounded into a coarser binade: a few % of the elements for a LoRA delta small
against ``W``, most of them for one as large as ``W``. So each merged weight keeps a restore
record: which inverse fold to use (``W' - D``, or ``(W' - D) / S`` for a scaling fold such as
IA3 or SSF, with ``D = f(0)``, ``S = f(1) - D``), a bitmask of the elements where it does not
give back ``W``'s bits, and there the integer difference of the bit patterns as int8 (mostly
+-1 ulp; the rare larger ones keep W's bits with their position): 1/32 of an fp32 weight plus
a byte per miss. Where that would cost more than ``W``
itself (DoRA's row normalisation is not affine in ``W``) the record is ``W`` whole. The adapter modules are
snapshotted (adapter-sized), so later edits do not change the inverse; a CRC of ``W`` proves
each restore. A merge that fails part-way restores what it had changed before re-raising.

**Not in place** (one merged tensor, shared by every captured graph, created once): a weight
the model also reads elsewhere (an LM head tied to the embeddings), a bias a fold creates
(SSF's shift on a bias-free linear) and a fold of a trained copy (BitFit's bias under IA3).
The merge pass (``peftc.passes.merge``) points the graphs' linears at these; this module leaves
the ``MergeState`` it reads on the adapter store (``STATE``).

Example (``CompiledModel.merge`` / ``unmerge`` / ``save_merged`` call these)::

    sync(cm)                 # the base holds exactly the active adapters' merge (or none)
    merge_state(cm)          # MergeState(adapters, restores, shared), or None when unmerged
    save_merged(cm, "out/")  # streamed HF model dir (hf_export.write_hf_model)
"""

from __future__ import annotations

import copy
import zlib
from collections import defaultdict
from dataclasses import dataclass, field

import torch
from torch import nn

from peftc import hf_export
from peftc.errors import PeftcError
from peftc.graph import is_placeholder
from peftc.passes.merge import STATE

__all__ = ["apply", "restore", "sync", "merge_state", "merged_tensors", "merged_state_dict", "save_merged",
           "MergeState", "Restore"]

_INTS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


@dataclass
class Restore:
    """How to get one weight (and its bias) back after an in-place merge."""

    key: str  # state-dict key of the weight
    folds: list  # [(entry, snapshot of the adapter module)] applied in order
    transposed: bool
    inverse: str  # "sub": W' - D; "div": (W' - D) / S; "whole": ``values`` is W; "none": bias only
    mask: torch.Tensor | None  # bitmask (packed uint8) of the elements where the inverse misses W's bits
    resid: torch.Tensor | None  # there, W's bits minus the inverse's as int8 (0 where ``far_index``)
    values: torch.Tensor | None  # W itself (inverse "whole")
    crc: int
    bias: torch.Tensor | None = None  # the original bias, when the merge changed it (small)
    far_index: torch.Tensor | None = None  # misses by more than 127 ulps: flat positions ...
    far_bits: torch.Tensor | None = None  # ... and W's bits there

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.mask, self.resid, self.values, self.bias, self.far_index, self.far_bits)
                if t is not None]


@dataclass
class MergeState:
    """What a merge changed: in-place restores, and merged tensors the graphs read instead."""

    adapters: tuple[str, ...]
    restores: list[Restore] = field(default_factory=list)
    shared: dict[str, torch.Tensor] = field(default_factory=dict)  # state-dict key -> merged tensor

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor the merge keeps (restore records, snapshots, shared merged tensors)."""
        out = [t for r in self.restores for t in r.tensors()] + list(self.shared.values())
        snaps = {id(m): m for r in self.restores for _, m in r.folds}
        return out + [t for m in snaps.values() for t in (*m.parameters(), *m.buffers())]

    def nbytes(self) -> int:
        return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in self.tensors()}.values())


def merge_state(cm) -> MergeState | None:
    return getattr(cm.adapters, STATE, None)


# ---- planning -------------------------------------------------------------------------------
def _fold_of(entry):
    fold = getattr(entry, "fold", None)
    if fold is None:
        raise PeftcError(f"method {entry.method!r} cannot be merged into the base weights")
    return fold


def _plan(cm, names) -> tuple[dict[str, list], dict[str, bool], dict[str, torch.Tensor]]:
    """(linear path -> [(entry, live adapter module)], path -> transposed, state-dict key ->
    trained copy); raises before anything changes when an active adapter cannot be merged."""
    folds, transposed, swaps = defaultdict(list), {}, {}
    for name in names:
        state = cm.registry.state(name)
        graph_level = [m.method for m in state.spec.methods if m.sites == "graph"]
        if graph_level:
            raise PeftcError(f"adapter {name!r}: {graph_level} add graph inputs/nodes, not weights: "
                             "they cannot be merged")
        for entry, targets in zip(state.spec.methods, state.targets):
            for path, kind in targets.items():
                if entry.sites != "module":
                    _fold_of(entry)  # before the lookup: a method without a fold says so
                try:
                    module = cm.adapters.get_submodule(f"{path}.{entry.store_dir}.{name}")
                except AttributeError:
                    if entry.sites == "module":
                        continue  # no parameter of it is read, so no copy was made: nothing to merge
                    raise PeftcError(f"adapter {name!r} has no {entry.method} module at {path!r} "
                                     "(the model never reads that module)") from None
                if entry.sites == "module":  # trained copies (modules_to_save, BitFit, LN tuning)
                    swaps.update({f"{path}.{k}": v.detach() for k, v in module.state_dict().items()})
                    continue
                folds[path].append((entry, module))
                transposed[path] = kind == "conv1d"
    return dict(folds), transposed, swaps


def _fold_all(path, folds, w, b, transposed):
    """Each fold computes in the promoted dtype (fp32 adapters on a bf16 base: fp32, as PEFT's
    merge) and its result is rounded back to the weight's dtype, one adapter at a time as PEFT."""
    with torch.no_grad():
        for entry, module in folds:
            w2, b2 = entry.fold(path, module, w, b, transposed)
            w = w2.to(w.dtype)
            b = b if b2 is None else b2.to(b.dtype if b is not None else w.dtype)
    return w, b


def _aliased(model: nn.Module) -> set[str]:
    """Names of parameters the model holds under more than one name (tied weights)."""
    names = defaultdict(list)
    for n, p in model.named_parameters(remove_duplicate=False):
        names[id(p)].append(n)
    return {n for ns in names.values() if len(ns) > 1 for n in ns}


# ---- in-place merge and exact restore -------------------------------------------------------
def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(_INTS[t.element_size()])


def _crc(t: torch.Tensor) -> int:
    return zlib.crc32(t.detach().reshape(-1).contiguous().cpu().view(torch.uint8).numpy())


def _inverse(kind, folds, key, w2, transposed):
    """The inverse fold's guess of W from W' (exact on most elements; see the module doc)."""
    path = key.rpartition(".")[0]
    d = _fold_all(path, folds, torch.zeros_like(w2), None, transposed)[0]
    if kind == "sub":
        return w2 - d
    s = _fold_all(path, folds, torch.ones_like(w2), None, transposed)[0] - d
    return (w2 - d) / s


def _pack(mask: torch.Tensor) -> torch.Tensor:
    """Bool (n,) -> uint8 (ceil(n / 8),): one bit per element."""
    pad = torch.zeros(-mask.numel() % 8, dtype=torch.bool, device=mask.device)
    bits = torch.cat([mask, pad]).view(-1, 8).to(torch.uint8)
    return (bits << torch.arange(8, dtype=torch.uint8, device=mask.device)).sum(1, dtype=torch.uint8)


def _unpack(packed: torch.Tensor, n: int) -> torch.Tensor:
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    return ((packed[:, None] >> shifts) & 1).view(-1)[:n].bool()


def _record(key, folds, w, w2, transposed) -> Restore:
    """A restore record for W -> W' (W still in place): the inverse whose misses are fewest."""
    crc = _crc(w)
    whole = lambda: Restore(key, folds, transposed, "whole", None, None, w.detach().clone(), crc)
    if not w.is_floating_point():
        return whole()
    want, best = _bits(w.detach()), None
    for kind in ("sub", "div"):
        guess = _bits(_inverse(kind, folds, key, w2, transposed))
        miss = guess != want
        n_miss = int(miss.sum())
        if best is None or n_miss < best[2]:
            best = (kind, miss, n_miss, guess)
        if n_miss <= want.numel() // 4:
            break
    kind, miss, n_miss, guess = best
    resid = want[miss].long() - guess[miss].long()
    far = resid.abs() > 127  # rare (a weight near 0 whose merged value is not): kept exactly
    where = miss.nonzero().squeeze(1)[far]
    out_index = where.to(torch.int32 if w.numel() < 2**31 else torch.int64)
    cost = (w.numel() + 7) // 8 + n_miss + out_index.numel() * (out_index.element_size() + w.element_size())
    if cost >= w.numel() * w.element_size():
        return whole()
    return Restore(key, folds, transposed, kind, _pack(miss), resid.masked_fill(far, 0).to(torch.int8),
                   None, crc, far_index=out_index, far_bits=want[where].clone())


def apply(cm) -> MergeState:
    """Folds ``cm``'s active adapters into its base model (in place where possible) and records
    how to undo it; on any failure the base is restored before the error propagates."""
    names = tuple(cm.active_adapters)
    plan, transposed, swaps = _plan(cm, names)
    model, aliased = cm.get_base_model(), _aliased(cm.get_base_model())
    state = MergeState(names)
    memo: dict = {}  # one snapshot of modules shared between adapters (VeRA's projections)
    try:
        for path, folds in plan.items():
            snap = [(e, copy.deepcopy(m, memo)) for e, m in folds]
            owner, wkey, bkey = model.get_submodule(path), f"{path}.weight", f"{path}.bias"
            w, b = owner.weight, getattr(owner, "bias", None)
            w_in, b_in = swaps.get(wkey, w), swaps.get(bkey, b)
            w2, b2 = _fold_all(path, snap, w_in, b_in, transposed[path])
            rec = None
            if is_placeholder(w):  # a released weight: the graph reads its values elsewhere
                pass
            elif wkey in aliased or wkey in swaps:
                state.shared[wkey] = w2
            else:
                rec = _record(wkey, snap, w, w2, transposed[path])
                with torch.no_grad():
                    w.copy_(w2)
                state.restores.append(rec)
            del w2
            if b2 is b_in:
                continue
            if b is None or bkey in aliased or bkey in swaps:
                state.shared[bkey] = b2
                continue
            if rec is None:  # the weight went to a shared copy: a record for the bias alone
                rec = Restore(wkey, [], False, "none", None, None, None, 0)
                state.restores.append(rec)
            rec.bias = b.detach().clone()
            with torch.no_grad():
                b.copy_(b2)
    except BaseException:
        restore(cm, state)
        raise
    return state


def restore(cm, state: MergeState) -> None:
    """Undoes ``state``'s in-place writes, newest first; each weight is checked against its CRC."""
    model, bad = cm.get_base_model(), []
    for rec in reversed(state.restores):
        owner = model.get_submodule(rec.key.rpartition(".")[0])
        with torch.no_grad():
            if rec.bias is not None:
                owner.bias.copy_(rec.bias)
            if rec.inverse == "none":
                continue
            w = owner.weight
            for _, m in rec.folds:
                m.to(w.device)  # snapshots stay where they were made; the model may have moved
            if rec.inverse == "whole":
                w.copy_(rec.values)
            else:
                guess = _inverse(rec.inverse, rec.folds, rec.key, w.detach(), rec.transposed).to(w.dtype)
                bits, miss = _bits(guess), _unpack(rec.mask.to(w.device), guess.numel())
                bits[miss] += rec.resid.to(w.device, bits.dtype)
                bits[rec.far_index.to(w.device).long()] = rec.far_bits.to(w.device, bits.dtype)
                w.copy_(guess)
                del guess, bits, miss
        if _crc(owner.weight) != rec.crc:
            bad.append(rec.key)
    state.restores.clear()
    state.shared.clear()
    if bad:
        raise PeftcError(f"unmerge did not restore {bad} bit for bit (their dtype changed since merge, or "
                         "the fold is not deterministic on this device); they hold the nearest values found")


def sync(cm) -> None:
    """Makes the base hold exactly the active adapters' merge while ``cm`` is merged (adapters
    set, enabled, disabled or deleted since); leaves it pristine when none is active."""
    state, want = merge_state(cm), tuple(cm.active_adapters) if cm.registry.merged else ()
    if state is not None and state.adapters == want:
        return
    if state is not None:
        setattr(cm.adapters, STATE, None)
        restore(cm, state)
    if want:
        try:
            setattr(cm.adapters, STATE, apply(cm))
        except BaseException:
            cm.registry.merged = False
            raise


# ---- the merged model's tensors, streamed ----------------------------------------------------
def merged_tensors(cm):
    """Yields (key, tensor) of the merged model's state dict, in the base's order: the live
    parameter where the base is merged (or untouched), else the fold computed when its key is
    reached. Biases a fold creates come last (keys the base model lacks)."""
    state = merge_state(cm)
    if state is not None:
        swaps, sd = _plan(cm, state.adapters)[2], cm.get_base_model().state_dict()
        for key, t in sd.items():
            yield key, state.shared.get(key, swaps.get(key, t))
        yield from ((k, v) for k, v in state.shared.items() if k not in sd)
        return
    plan, transposed, swaps = _plan(cm, tuple(cm.active_adapters))
    sd = cm.get_base_model().state_dict()
    pending = {}
    for key, t in sd.items():
        path, _, leaf = key.rpartition(".")
        if key in pending:
            yield key, pending.pop(key)
        elif path in plan and leaf in ("weight", "bias"):
            wkey, bkey = f"{path}.weight", f"{path}.bias"
            b_in = swaps.get(bkey, sd.get(bkey))
            w2, b2 = _fold_all(path, plan.pop(path), swaps.get(wkey, sd[wkey]), b_in, transposed[path])
            pending.update({wkey: w2, bkey: b2} if b2 is not None else {wkey: w2})
            yield key, pending.pop(key)
        else:
            yield key, swaps.get(key, t)
    yield from pending.items()


def merged_state_dict(cm) -> dict[str, torch.Tensor]:
    """Materialises every merged tensor: a copy of each adapted weight (merged in place, the
    copy keeps the dict valid after ``unmerge``); other entries are the live tensors."""
    state, written = merge_state(cm), set()
    for r in state.restores if state else ():
        written |= {r.key} if r.inverse != "none" else set()
        written |= {r.key.rpartition(".")[0] + ".bias"} if r.bias is not None else set()
    return {k: v.detach().clone() if k in written else v.detach() for k, v in merged_tensors(cm)}


def save_merged(cm, path, *, max_shard_size="5GB"):
    """Streams the merged model to an HF ``save_pretrained`` directory; see hf_export.write_hf_model."""
    state, model = merge_state(cm), cm.get_base_model()
    folded = {f"{p}.weight" for p in _plan(cm, state.adapters if state else tuple(cm.active_adapters))[0]}
    ties = defaultdict(set)
    for n, p in model.named_parameters(remove_duplicate=False):
        ties[id(p)].add(n)
    untied = {n for group in ties.values() if len(group) > 1 and group & folded for n in group}
    return hf_export.write_hf_model(model, path, merged_tensors(cm), untied=untied, max_shard_size=max_shard_size)
