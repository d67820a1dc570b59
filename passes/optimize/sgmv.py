"""Mixed batches through the segmented op: the masked LoRA terms of one linear become one
``peftc::lora_sgmv`` node, so each sample meets only its own adapter's A and B.

    y_1 = add(y, mul(s_1 * B_1(A_1(drop_1(x))), rows(mask_1)))  ...  y_n = add(y_{n-1}, ... mask_n)
        -> getitem(lora_sgmv(y, x, index, slots, [A_i], [B_i], [s_i], [p_i], seed, train), 0)
    index = sample_index(mask_1, ..., mask_m)     once per graph: each sample's adapter slot, -1 for none

Pre: a mixed-batch graph (``ctx.sample_mask`` set while each adapter was rewritten, so every
adapter term is multiplied by its (batch,) mask under ``graph_cache.MASKS``). Post: every plain
LoRA term (not DoRA, not gated, not LoHa/LoKr: those stay masked, and ``graph_summary()`` says
how many) is folded into its linear's lora_sgmv node; ``ctx.counts["sgmv"]`` = linears rewritten,
``ctx.counts["sgmv_terms"]`` = adapter terms folded, ``ctx.counts["sgmv_masked"]`` = terms left masked.
Outputs equal the masked graph (and each sample run alone under its adapter); with dropout in
training the masks come from another generator, equal in distribution.

The pass runs right after the mixed batch's rewrites and before the optimizations (it is how a
mixed batch is lowered, not a selectable optimization); ``GraphCache.segment_mixed = False``
keeps the masked graph (the reference it is tested and benchmarked against).
"""

from __future__ import annotations

import operator

import torch
from torch import fx

from peftc.graph import PEFTC, SUMMARY_LINES, has_role
from peftc.passes.context import PassContext, PassResult
from peftc.passes.optimize.fuse import low_rank_chain

__all__ = ["segment", "sample_index", "sgmv_seed", "match_masked_lora", "mask_chain"]

aten = torch.ops.aten
MASKED_METHODS = ("lora", "loha", "lokr")  # methods whose mixed-batch term is add(y, mul(term, rows(mask)))


def sample_index(*masks: torch.Tensor) -> torch.Tensor:
    """(batch,) int64: the position of the mask that selects each sample, -1 where none does."""
    stacked = torch.stack([m.reshape(-1) for m in masks]) > 0
    return torch.where(stacked.any(0), stacked.to(torch.int64).argmax(0), -1)


def sgmv_seed(x: torch.Tensor, dropout: bool) -> torch.Tensor:
    """The op's dropout seed: fresh from the global RNG when it may drop, else a constant."""
    from peftc.kernels.lora_sgmv import draw_seed

    return draw_seed(x.device) if dropout else torch.zeros((), dtype=torch.int64, device=x.device)


def _only_user(node, user) -> bool:
    return isinstance(node, fx.Node) and list(node.users) == [user]


def mask_chain(y: fx.Node) -> list[fx.Node]:
    """The masked adapter adds stacked on linear output ``y``, in data-flow order."""
    chain, cur = [], y
    while True:
        adds = [u for u in cur.users if _is_masked_add(u, cur)]  # DoRA's term also reads y itself
        if len(adds) != 1:
            return chain
        chain.append(adds[0])
        cur = adds[0]


def _is_masked_add(add: fx.Node, prev: fx.Node) -> bool:
    info = add.meta.get(PEFTC) or {}
    return (info.get("method") in MASKED_METHODS and info.get("role") == "add" and add.args[0] is prev
            and has_role(add.args[1], info["method"], "mask"))


def match_masked_lora(add: fx.Node, x: fx.Node) -> dict | None:
    """A plain LoRA term ``add(prev, mul(s * B(A(drop(x))), rows(mask)))`` reading ``x``, or None."""
    masked = add.args[1]
    if not (has_role(add, "lora", "add") and _only_user(masked, add) and masked.target is aten.mul.Tensor):
        return None
    term, rows = masked.args
    if not (has_role(term, "lora", "scale") and term.target is aten.mul.Tensor and set(term.users) == {masked, rows}
            and has_role(rows, "lora", "mask_rows") and _only_user(rows, masked)):
        return None
    chain = low_rank_chain(term)
    if chain is None:
        return None
    src, a, b, scale, p, up, down, drop = (chain[k] for k in ("src", "a", "b", "scale", "p", "up", "down", "drop"))
    mask = rows.args[0]
    if src is not x or not (isinstance(mask, fx.Node) and mask.op == "get_attr"):
        return None
    return {"a": a, "b": b, "scale": float(scale), "p": float(p), "mask": mask.target,
            "erase": [add, masked, rows, term, up, down, *([drop] if drop is not None else []),
                      *([mask] if len(mask.users) == 1 else [])]}


def _index_node(gm: fx.GraphModule, ctx: PassContext) -> tuple[fx.Node, list[str]]:
    """One ``sample_index`` node after the placeholders, over every mask buffer of the graph."""
    root = ctx.sample_mask.rpartition(".")[0]
    names = [n for n, _ in gm.get_submodule(root).named_buffers(recurse=False)]
    anchor = next(n for n in gm.graph.nodes if n.op != "placeholder")
    with gm.graph.inserting_before(anchor):
        masks = [gm.graph.get_attr(f"{root}.{n}") for n in names]
        index = gm.graph.call_function(sample_index, tuple(masks))
    info = {"method": "sgmv", "adapter": ",".join(names), "module": "", "role": "sample_index"}
    for node in (*masks, index):
        node.meta[PEFTC] = {**info, "role": "mask" if node is not index else "sample_index"}
    return index, [f"{root}.{n}" for n in names]


def _segment_site(gm: fx.GraphModule, y: fx.Node, x: fx.Node, terms: list[dict], index, slots: list[int]):
    """Erases ``terms`` from y's chain and adds one lora_sgmv after the chain's end."""
    first_info = terms[0]["erase"][0].meta[PEFTC]
    for t in terms:
        add = t["erase"][0]
        add.replace_all_uses_with(add.args[0])
        for dead in t["erase"]:
            gm.graph.erase_node(dead)
    chain = mask_chain(y)
    end = chain[-1] if chain else y  # the terms left masked, if any
    users = list(end.users)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    cursor = end
    for n in dict.fromkeys(t[k] for t in terms for k in ("a", "b")):
        if order[n] > order[end]:  # a parameter read after the chain's end: move it before the op
            cursor.append(n)
            cursor = n
    with gm.graph.inserting_after(cursor):
        seed = gm.graph.call_function(sgmv_seed, (x, any(t["p"] > 0 for t in terms)))
    with gm.graph.inserting_after(seed):
        args = (end, x, index, slots, [t["a"] for t in terms], [t["b"] for t in terms],
                [t["scale"] for t in terms], [t["p"] for t in terms], seed, True)
        op = gm.graph.call_function(torch.ops.peftc.lora_sgmv.default, args)
    with gm.graph.inserting_after(op):
        out = gm.graph.call_function(operator.getitem, (op, 0))
    info = {**first_info, "method": "sgmv", "adapter": ",".join(t["adapter"] for t in terms)}
    for node, role in ((seed, "seed"), (op, "lora_sgmv"), (out, "output")):
        node.meta[PEFTC] = {**info, "role": role}
        if "nn_module_stack" in y.meta:
            node.meta["nn_module_stack"] = dict(y.meta["nn_module_stack"])
    for user in users:
        user.replace_input_with(end, out)


def segment(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    """Folds each linear's masked LoRA terms into one lora_sgmv node (see the module docstring)."""
    from peftc.kernels import lora_sgmv  # noqa: F401  (registers the op)

    if not ctx.sample_mask:
        return PassResult(gm, False)
    index, mask_targets = None, []
    sites = terms_total = left = 0
    for y in list(gm.graph.nodes):
        if PEFTC in y.meta or y.op != "call_function" or not (chain := mask_chain(y)):
            continue
        x = y.args[0] if y.target is aten.linear.default else y.args[1] if y.target is aten.addmm.default else None
        terms = []
        for add in chain:
            m = match_masked_lora(add, x) if x is not None else None
            if m is None:
                left += 1
                continue
            m["adapter"] = add.meta[PEFTC]["adapter"]
            terms.append(m)
        if not terms:
            continue
        if index is None:
            index, mask_targets = _index_node(gm, ctx)
        _segment_site(gm, y, x, terms, index, [mask_targets.index(t["mask"]) for t in terms])
        sites += 1
        terms_total += len(terms)
    ctx.counts["sgmv"] += sites
    ctx.counts["sgmv_terms"] += terms_total
    ctx.counts["sgmv_masked"] += left
    line = f"sgmv: {terms_total} LoRA terms on {sites} linears segmented by sample (peftc::lora_sgmv)"
    if left:
        line += f"; {left} terms stay masked (not plain LoRA: DoRA, gated, LoHa, LoKr)"
    gm.meta.setdefault(SUMMARY_LINES, []).append(line)
    return PassResult(gm, sites > 0)
