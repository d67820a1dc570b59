"""Mixed batches through the segmented op: the masked LoRA terms of one linear become one
``peftc::lora_sgmv`` node, so each sample meets only its own adapter's A and B.

    y_1 = add(y, mul(s_1 * B_1(A_1(drop_1(x))), rows(mask_1)))  ...  y_n = add(y_{n-1}, ... mask_n)
        -> getitem(lora_sgmv(y, x, index, slots, [A_i], [B_i], [s_i], [p_i], seed, train), 0)
    index = sample_index(mask_1, ..., mask_m)     once per graph: each sample's adapter slot, -1 for none

With HF PEFT's dtypes (fp32 adapters on a bf16/fp16 base, passes/dtype_policy.py) each term reads
``x.to(fp32)`` and its add is cast back, ``y_i = to(add(y_{i-1}, ...), bf16)``: both casts are
matched and erased with the term, and the op gets x in the base dtype and A, B in fp32 (it computes
``(y + s B(A(x.to(fp32)))).to(y.dtype)`` per sample, as PEFT and the masked graph do).

Pre: a mixed-batch graph (each adapter rewritten with ``ctx.sample_mask``, so its terms are
multiplied by its (batch,) mask, a buffer under ``pipeline.MASKS``). Post: every plain LoRA term
is folded into its linear's lora_sgmv node; DoRA, gated LoRA, LoHa and LoKr terms stay masked.
``ctx.coverage("sgmv", "LoRA terms")``: a hit per folded term, a miss per masked one with its
reason (``graph_summary()`` shows e.g. ``sgmv: 4 of 6 LoRA terms: 2 DoRA terms stay masked``);
``ctx.counts["sgmv"]`` = linears rewritten, ``["sgmv_terms"]`` = terms folded, ``["sgmv_masked"]`` =
terms left masked. Outputs equal the masked graph (and each sample run alone under its adapter);
with dropout in training the masks come from another generator, equal in distribution.

The pass is the ``lower_mixed`` phase: the pipeline runs it on every mixed batch right after the
rewrites and before the optimizations (a lowering, not a setting); ``GraphCache.segment_mixed =
False`` keeps the masked graph (the reference it is tested and benchmarked against).
"""

from __future__ import annotations

import operator

import torch
from torch import fx

from peftc.graph import PEFTC, has_role
from peftc.passes.context import PassContext, PassResult
from peftc.passes.dtype_policy import is_cast
from peftc.passes.optimize.fuse import low_rank_chain
from peftc.passes.pipeline import MASKS, register_optimization

__all__ = ["segment", "sample_index", "sgmv_seed", "match_masked_lora", "masked_lora_term", "mask_chain", "UNIT"]

aten = torch.ops.aten
UNIT = "LoRA terms"  # what the lowering's coverage counts: every masked term of a mixed batch
MASKED_METHODS = ("lora", "loha", "lokr")  # methods whose mixed-batch term is add(y, mul(term, rows(mask)))
KINDS = {"loha": "LoHa", "lokr": "LoKr", "dora": "DoRA", "gated": "gated LoRA"}  # terms that stay masked: no op


def _kind(add: fx.Node, term) -> str | None:
    """The name of a masked term the op does not take (by method, or the LoRA term's role), else None."""
    method = add.meta[PEFTC]["method"]
    if method != "lora":
        return KINDS.get(method, method)
    role = (term.meta.get(PEFTC) or {}).get("role") if isinstance(term, fx.Node) else None
    return KINDS.get(role) if role in ("dora", "gated") else None


def sample_index(*masks: torch.Tensor) -> torch.Tensor:
    """(batch,) int64: the position of the mask that selects each sample, -1 where none does."""
    stacked = torch.stack([m.reshape(-1) for m in masks]) > 0
    return torch.where(stacked.any(0), stacked.to(torch.int64).argmax(0), -1)


def sgmv_seed(x: torch.Tensor, dropout: bool) -> torch.Tensor:
    """The op's dropout seed: fresh from the global RNG when it may drop, else a constant."""
    from peftc.kernels.common import draw_seed, zero_seed

    return draw_seed(x.device) if dropout else zero_seed(x.device)


def _only_user(node, user) -> bool:
    return isinstance(node, fx.Node) and list(node.users) == [user]


def mask_chain(y: fx.Node) -> list[fx.Node]:
    """The masked adapter adds stacked on linear output ``y``, in data-flow order (each one's
    cast back to the base dtype, if any, is ``link_end(add)``)."""
    chain, cur = [], y
    while True:
        adds = [u for u in cur.users if _is_masked_add(u, cur)]  # DoRA's term also reads y itself
        if len(adds) != 1:
            return chain
        chain.append(adds[0])
        cur = link_end(adds[0])


def link_end(add: fx.Node) -> fx.Node:
    """The node the next term reads: ``add``, or its one user when that casts it back (PEFT's dtypes)."""
    users = list(add.users)
    return users[0] if len(users) == 1 and is_cast(users[0], "cast_out") else add


def _is_masked_add(add: fx.Node, prev: fx.Node) -> bool:
    info = add.meta.get(PEFTC) or {}
    return (info.get("method") in MASKED_METHODS and info.get("role") == "add" and add.args[0] is prev
            and has_role(add.args[1], info["method"], "mask"))


def match_masked_lora(add: fx.Node, x: fx.Node | None) -> dict | None:
    """A plain LoRA term ``add(prev, mul(s * B(A(drop(x))), rows(mask)))`` reading ``x``, or None."""
    m = masked_lora_term(add, x)
    return m if isinstance(m, dict) else None


def masked_lora_term(add: fx.Node, x: fx.Node | None) -> dict | str:
    """The pieces of a plain LoRA term ``add(prev, mul(s * B(A(drop(x'))), rows(mask)))``, x' = x or
    ``x.to(A.dtype)`` with the add cast back, or why it stays masked (the summary's reason).
    ``x``: the linear's input (None: the adapted op is not a linear)."""
    masked = add.args[1]
    term = masked.args[0] if isinstance(masked, fx.Node) and masked.args else None
    kind = _kind(add, term)
    if kind is not None:
        return f"{kind} terms stay masked"
    if x is None:
        return "LoRA terms on an op other than aten.linear / Conv1D's addmm stay masked"
    rows = masked.args[1]
    if not (has_role(term, "lora", "scale") and term.target is aten.mul.Tensor and masked.target is aten.mul.Tensor
            and has_role(rows, "lora", "mask_rows")):
        return "LoRA terms not in the form the rewrite inserts stay masked"
    chain = low_rank_chain(term)
    if not (_only_user(masked, add) and set(term.users) == {masked, rows} and _only_user(rows, masked)) \
            or chain is None:
        return "LoRA terms with a node read outside the term stay masked"
    src, a, b, scale, p, up, down, drop = (chain[k] for k in ("src", "a", "b", "scale", "p", "up", "down", "drop"))
    cast_in, cast_out = None, None
    if is_cast(src, "cast_in"):  # PEFT's dtypes: x.to(A.dtype) read by this term only, the sum cast back
        cast_in, src, cast_out = src, src.args[0], link_end(add)
        if not _only_user(cast_in, drop or down) or cast_out is add:
            return "LoRA terms with only part of PEFT's dtype casts stay masked"
    mask = rows.args[0]
    if src is not x or not (isinstance(mask, fx.Node) and mask.op == "get_attr"):
        return "LoRA terms not in the form the rewrite inserts stay masked"
    return {"a": a, "b": b, "scale": float(scale), "p": float(p), "mask": mask.target, "info": add.meta[PEFTC],
            "add": add, "end": cast_out or add,
            "erase": [*([cast_out] if cast_out is not None else []), add, masked, rows, term, up, down,
                      *([drop] if drop is not None else []), *([cast_in] if cast_in is not None else []),
                      *([mask] if len(mask.users) == 1 else [])]}


def _index_node(gm: fx.GraphModule) -> tuple[fx.Node, list[str]]:
    """One ``sample_index`` node after the placeholders, over every mask buffer of the graph."""
    root = MASKS
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
    first_info = terms[0]["info"]
    for t in terms:
        t["end"].replace_all_uses_with(t["add"].args[0])  # the term (and its cast back) out of the chain
        for dead in t["erase"]:
            gm.graph.erase_node(dead)
    chain = mask_chain(y)
    end = link_end(chain[-1]) if chain else y  # the terms left masked, if any
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


@register_optimization("sgmv", phase="lower_mixed")
def segment(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    """Folds each linear's masked LoRA terms into one lora_sgmv node (see the module docstring)."""
    from peftc.kernels import lora_sgmv  # noqa: F401  (registers the op)

    cov = ctx.coverage("sgmv", UNIT)
    if not hasattr(gm, MASKS):  # not a mixed batch: no masked terms
        return PassResult(gm, False)
    index, mask_targets = None, []
    sites = terms_total = left = 0
    for y in list(gm.graph.nodes):
        if PEFTC in y.meta or y.op != "call_function" or not (chain := mask_chain(y)):
            continue
        x = y.args[0] if y.target is aten.linear.default else y.args[1] if y.target is aten.addmm.default else None
        terms = []
        for add in chain:
            m = masked_lora_term(add, x)
            if isinstance(m, str):
                cov.miss(m)
                left += 1
                continue
            m["adapter"] = add.meta[PEFTC]["adapter"]
            terms.append(m)
        if not terms:
            continue
        if index is None:
            index, mask_targets = _index_node(gm)
        _segment_site(gm, y, x, terms, index, [mask_targets.index(t["mask"]) for t in terms])
        cov.hit(len(terms))
        sites += 1
        terms_total += len(terms)
    ctx.counts["sgmv"] += sites
    ctx.counts["sgmv_terms"] += terms_total
    ctx.counts["sgmv_masked"] += left
    return PassResult(gm, sites > 0)
