"""Fusion: each LoRA path and the linear it adapts become one fused op.

    add(linear(x, W, b), mul(linear(linear(dropout(x, p, train), A), B), s))
        -> getitem(lora_linear(x, W, b, A, B, s, p, seed, train), 0)
    add(addmm(b, x, W), ...)   (GPT-2's Conv1D, W stored (in, out))
        -> getitem(lora_linear(x, t(W), b, A, B, s, p, seed, train), 0)

Pre: LoRA nodes as passes/methods/lora.py inserts them (DoRA and IA3 sites go to passes/optimize/fuse_scaling.py,
called at the end of ``fuse``; mixed-batch and gated paths are left alone: their term is not
``s * B(A(.))``). Post: no LoRA node of a fused site remains; the op saves x
and the r-wide ``x A^T`` for backward and regenerates the dropout mask from ``seed`` (drawn per
call from the global RNG, so ``torch.manual_seed`` repeats a run) instead of storing drop(x).
The mask differs from the unfused graph's (another generator), so fused and unfused training
agree in distribution, and exactly with dropout off or in eval.

Mixed dtypes (HF PEFT's ``autocast_adapter_dtype``, passes/dtype_policy.py): a site whose path
reads ``x.to(fp32)`` and whose add is cast back (``to(add(y, s * B(A(x'))), bf16)``) fuses whole:
the op gets x and W in the base dtype and A, B in fp32 (never cast down) and returns the base
dtype, so the casts are erased with the site.

Siblings: sites whose linears read the same x node (q/k/v, gate/up), with equal p, dtypes and
bias presence, become one ``peftc::lora_siblings`` node (one GEMM against the stacked A's, x and
h saved once); each former add reads ``getitem(getitem(lora_siblings(...), 0), i)``:

    y_i = add(linear(x, W_i, b_i), s_i * B_i(A_i(drop(x))))   i = 1..n
        -> ys = lora_siblings(x, [W_i], [b_i], [A_i], [B_i], [s_i], p, seed, train)[0]

With p > 0 the siblings would share one dropout mask where PEFT draws one per module (each
sibling's marginal dropout is PEFT's, the masks are correlated), so such sites are grouped only
under ``shared_dropout: true``; otherwise they stay single lora_linear ops. ``ctx.counts``:
``fuse`` = sites fused (either op), ``fuse_siblings`` = lora_siblings nodes.

Coverage (``ctx.coverage("fuse", "adapter sites")``): every site of a method that adapts linears
(LoRA, DoRA, IA3, LoHa, LoKr, VeRA, SSF, LoRA on parameters; one per method, adapter and module)
is a hit when fused, else a miss with the matcher's reason, e.g. ``fuse: 2 of 6 adapter sites:
2 gated LoRA has no fused op; 2 LoHa has no fused op``.

Settings (``optimize: {fuse: {...}}``): ``shared_dropout`` (bool, default false). Unknown
settings are SpecErrors (``check_settings``).
"""

from __future__ import annotations

import operator

import torch
from torch import fx

from peftc.errors import SpecError
from peftc.graph import PEFTC, fetch_attr, has_role
from peftc.passes.context import PassContext, PassResult
from peftc.passes.dtype_policy import is_cast
from peftc.passes.optimize.fuse_scaling import (
    BASE_READ,
    CASTS,
    FORM,
    READ_OUTSIDE,
    base_linear,
    fuse_dora,
    fuse_ia3,
    is_dora_add,
    seed_for,
    site_key,
)
from peftc.passes.pipeline import register_optimization
from peftc.spec import METHODS, Sites

__all__ = ["fuse", "match_lora", "lora_site", "low_rank_chain", "adapter_sites", "sibling_groups", "seed_for",
           "check_settings", "SETTINGS", "UNIT"]

UNIT = "adapter sites"  # what fuse's coverage counts
NO_FUSED_OP = {"loha": "LoHa", "lokr": "LoKr", "vera": "VeRA", "ssf": "SSF", "lora_params": "LoRA on parameters"}

aten = torch.ops.aten


def _only_user(node: fx.Node, user: fx.Node) -> bool:
    return list(node.users) == [user]


def low_rank_chain(term: fx.Node) -> dict | None:
    """The pieces of ``s * lora_B(lora_A(dropout?(src)))`` ending at ``term`` (each node read only
    by the next), or None: what the fused and the segmented rewrites both replace."""
    up, scale = term.args
    if not (has_role(up, "lora", "lora_B") and _only_user(up, term) and isinstance(scale, (int, float))):
        return None
    down, b = up.args
    if not (has_role(down, "lora", "lora_A") and _only_user(down, up)):
        return None
    src, a = down.args
    p, drop = 0.0, None
    if has_role(src, "lora", "dropout"):
        drop, (src, p, _) = src, src.args[:3]
        if not _only_user(drop, down):
            return None
    return {"src": src, "a": a, "b": b, "scale": float(scale), "p": float(p), "up": up, "down": down, "drop": drop}


def match_lora(add: fx.Node) -> dict | None:
    """The pieces of one unfused LoRA site ending at ``add``, or None if it is not one."""
    if not has_role(add, "lora", "add") or add.target is not aten.add.Tensor:
        return None
    m = lora_site(add)
    return m if isinstance(m, dict) else None


def lora_site(add: fx.Node) -> dict | str:
    """The pieces of the LoRA site ending at ``add`` (a LoRA ``add`` node, not DoRA's: see
    ``fuse_scaling.dora_site``), or why it does not fuse (the reason ``graph_summary()`` shows)."""
    base, term = add.args[:2]
    if has_role(term, "lora", "gated"):
        return "gated LoRA has no fused op"
    if has_role(term, "lora", "mask"):
        return "mixed-batch LoRA (masked per sample) has no fused op"
    if not (has_role(term, "lora", "scale") and term.target is aten.mul.Tensor):
        return f"LoRA {FORM}"
    chain = low_rank_chain(term) if _only_user(term, add) else None
    if chain is None:
        return f"LoRA {READ_OUTSIDE}"
    src, a_w, b_w, scale, p, up, down, drop = (chain[k] for k in ("src", "a", "b", "scale", "p", "up", "down", "drop"))
    cast_in, cast_out = _casts(src, drop or down, add)
    if cast_in is False:
        return f"LoRA {CASTS}"
    src = cast_in.args[0] if cast_in is not None else src
    found = base_linear(base)
    if isinstance(found, str):
        return f"LoRA {found}"
    if list(base.users) != [add]:
        return f"LoRA {BASE_READ}"
    if found["x"] is not src:
        return f"LoRA {FORM}"
    w, bias, transposed = found["w"], found["bias"], found["transposed"]
    return {"x": src, "w": w, "bias": bias, "transposed": transposed, "a": a_w, "b": b_w, "scale": float(scale),
            "p": float(p), "erase": [*([cast_out] if cast_out is not None else []), add, term, up, down,
                                     *([drop] if drop is not None else []),
                                     *([cast_in] if cast_in is not None else []), base],
            "base": base, "info": add.meta[PEFTC]}


def _casts(src: fx.Node, reader: fx.Node, add: fx.Node):
    """PEFT's dtype casts around an adapter path (passes/dtype_policy.py): ``(cast_in, cast_out)``
    when ``src`` is x cast up (read only by ``reader``) and ``add``'s one user casts it back;
    ``(None, None)`` without casts; ``(False, None)`` when only part of the pair is there.
    The fused op takes x in the base dtype, adapter weights as they are (fp32), and returns the
    base dtype: both casts are inside it."""
    if not is_cast(src, "cast_in"):
        return None, None
    users = list(add.users)
    if list(src.users) != [reader] or len(users) != 1 or not is_cast(users[0], "cast_out"):
        return False, None
    return src, users[0]


SETTINGS = {"shared_dropout": "true or false (default false): siblings with dropout > 0 share one mask"}


def check_settings(settings) -> dict:
    """``optimize: {fuse: {...}}`` with defaults filled in; an unknown or ill-typed setting is a SpecError."""
    for key, value in settings.items():
        if key not in SETTINGS:
            raise SpecError(f"optimize.fuse.{key}", value, f"one of {sorted(SETTINGS)}", "unknown fuse setting")
        if not isinstance(value, bool):
            raise SpecError(f"optimize.fuse.{key}", value, SETTINGS[key])
    return {"shared_dropout": False, **settings}


def _dtype(gm: fx.GraphModule, node) -> torch.dtype | None:
    """A tensor node's dtype: the attribute's for get_attr, else the traced ``val`` (None if unknown)."""
    if node.op == "get_attr":
        return fetch_attr(gm, node.target).dtype
    val = node.meta.get("val")
    return val.dtype if isinstance(val, torch.Tensor) else None


def sibling_groups(gm: fx.GraphModule, sites: list[dict], shared_dropout: bool) -> list[list[dict]]:
    """Sites (``match_lora`` results, graph order) that read the same x node with the same p,
    dtypes and bias presence, in groups of >= 2; p > 0 only with ``shared_dropout``."""
    groups: dict[tuple, list[dict]] = {}
    for m in sites:
        if m["p"] > 0 and not shared_dropout:
            continue
        key = (m["x"], m["p"], m["bias"] is None, *(_dtype(gm, m[k]) for k in ("w", "a", "b")))
        groups.setdefault(key, []).append(m)
    return [g for g in groups.values() if len(g) >= 2]


def _stamp(nodes, info: dict, stack) -> None:
    for node, role in nodes:
        node.meta[PEFTC] = {**info, "role": role}
        if stack:
            node.meta["nn_module_stack"] = dict(stack)


def _weight(gm: fx.GraphModule, m: dict) -> list[tuple[fx.Node, str]]:
    """W as the op wants it, (out, in): Conv1D's addmm stores (in, out), so insert t(W)."""
    if not m["transposed"]:
        return []
    m["w"] = gm.graph.call_function(aten.t.default, (m["w"],))
    return [(m["w"], "weight_t")]


def _fuse_one(gm: fx.GraphModule, m: dict) -> None:
    """linear(x, W, b) + s * B(A(drop(x))) -> getitem(lora_linear(x, W, b, A, B, s, p, seed, train), 0)."""
    add = m["erase"][0]
    with gm.graph.inserting_before(add):
        new = _weight(gm, m)
        seed = gm.graph.call_function(seed_for, (m["x"], m["p"] > 0))
        args = (m["x"], m["w"], m["bias"], m["a"], m["b"], m["scale"], m["p"], seed, True)
        fused = gm.graph.call_function(torch.ops.peftc.lora_linear.default, args)
        y = gm.graph.call_function(operator.getitem, (fused, 0))
    _stamp([*new, (seed, "seed"), (fused, "lora_linear"), (y, "output")], {**m["info"], "method": "fuse"},
           m["base"].meta.get("nn_module_stack"))
    add.replace_all_uses_with(y)
    for dead in m["erase"]:
        gm.graph.erase_node(dead)


def _fuse_group(gm: fx.GraphModule, group: list[dict]) -> bool:
    """Sibling sites -> one lora_siblings node before the first site's add, getitem per sibling.
    Later siblings' parameters (get_attr) move up to it; any other input defined after it
    (a computed weight) leaves the group unfused: returns False."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    first = min((m["erase"][0] for m in group), key=order.__getitem__)
    inputs = [m[k] for m in group for k in ("w", "bias", "a", "b") if isinstance(m[k], fx.Node)]
    late = [n for n in inputs if order[n] > order[first]]
    if any(n.op != "get_attr" for n in late):
        return False
    for n in late:
        first.prepend(n)
    with gm.graph.inserting_before(first):
        new = [pair for m in group for pair in _weight(gm, m)]
        x, p = group[0]["x"], group[0]["p"]
        seed = gm.graph.call_function(seed_for, (x, p > 0))
        args = (x, *([m[k] for m in group] for k in ("w", "bias", "a", "b")), [m["scale"] for m in group], p,
                seed, True)
        fused = gm.graph.call_function(torch.ops.peftc.lora_siblings.default, args)
        ys = gm.graph.call_function(operator.getitem, (fused, 0))
        outs = [gm.graph.call_function(operator.getitem, (ys, i)) for i in range(len(group))]
    info = {**group[0]["info"], "method": "fuse", "siblings": [m["info"].get("module") for m in group]}
    stack = group[0]["base"].meta.get("nn_module_stack")
    _stamp([*new, (seed, "seed"), (fused, "lora_siblings"), (ys, "outputs")], info, stack)
    for m, y in zip(group, outs):
        _stamp([(y, "output")], {**m["info"], "method": "fuse"}, m["base"].meta.get("nn_module_stack"))
        m["erase"][0].replace_all_uses_with(y)
        for dead in m["erase"]:
            gm.graph.erase_node(dead)
    return True


def adapter_sites(gm: fx.GraphModule) -> dict[tuple, str]:
    """``site_key`` -> method of every adapter site on a linear (or a parameter read) in the graph,
    in graph order: what ``fuse`` could fuse, whether or not it has a fused op for it. A site counts
    by its computing nodes (a mixed batch's segmented terms leave only their weights' get_attr)."""
    sites = {}
    for node in gm.graph.nodes:
        info = node.meta.get(PEFTC) if node.op == "call_function" else None
        cls = METHODS.get(info.get("method")) if info else None
        if cls is not None and cls.sites in (Sites.LINEAR, Sites.PARAMETER):
            sites.setdefault(site_key(info), info["method"])
    return sites


def _report(ctx: PassContext, sites: dict[tuple, str], outcome: dict[tuple, str | None]) -> None:
    """One hit per fused site, one miss per other site: the matcher's reason, or its method's lack of an op."""
    cov = ctx.coverage("fuse", UNIT)
    for key, method in sites.items():
        reason = outcome.get(key, f"{NO_FUSED_OP.get(method, method)} has no fused op")
        cov.hit() if reason is None else cov.miss(reason)


@register_optimization("fuse", phase="fuse", check=check_settings)
def fuse(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    """Replaces sibling LoRA sites by lora_siblings, every other matched site by lora_linear, IA3
    and DoRA sites by their ops (see the module docstring); reports every adapter site's outcome."""
    from peftc.kernels import lora_linear, lora_siblings  # noqa: F401  (register the ops)

    settings = check_settings(ctx.spec.optimize.get("fuse") or {})
    candidates = adapter_sites(gm)
    outcome: dict[tuple, str | None] = {}  # site -> None (fused) or why not
    sites = []
    for node in list(gm.graph.nodes):
        if has_role(node, "lora", "add") and node.target is aten.add.Tensor and not is_dora_add(node):
            m = lora_site(node)
            outcome[site_key(node.meta[PEFTC])] = m if isinstance(m, str) else None
            if isinstance(m, dict):
                sites.append(m)
    grouped = set()
    for group in sibling_groups(gm, sites, settings["shared_dropout"]):
        if _fuse_group(gm, group):
            grouped.update(id(m) for m in group)
            ctx.counts["fuse_siblings"] += 1
    for m in sites:
        if id(m) not in grouped:
            _fuse_one(gm, m)
    scaling = {**fuse_ia3(gm, ctx), **fuse_dora(gm, ctx)}  # IA3 / DoRA sites: counts "fuse_ia3", "fuse_dora"
    outcome.update(scaling)
    _report(ctx, candidates, outcome)
    n = len(sites)
    ctx.counts["fuse"] += n
    return PassResult(gm, n > 0 or any(r is None for r in scaling.values()))
