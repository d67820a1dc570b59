"""``recompute: {policy: budget, budget_mb: B}``: what to keep, by a min-cut (torch's partitioner,
Checkmate), so the tensors kept for backward fit B at the least recompute cost.

Flow network over the forward graph (networkx max-flow), one edge ``n_in -> n_out`` per tensor
node with capacity = its bytes at the example inputs' sizes (keeping it costs that)::

    SOURCE -> n_in    inf   n is free (parameter, input) or may not be recomputed at this tier
    n_out  -> SINK    inf   some op saves n for backward
    n_out  -> u_in    inf   for each user u

A minimum cut separates what backward needs from the source: the cut edges are the tensors to
keep, everything needed on the sink side is recomputed from them. Which ops may be recomputed
grows in tiers of cost (``TIERS``: views and elementwise ops, then r-wide adapter GEMMs, then
base GEMMs, then attention); the first tier whose cut fits B is chosen: the least recompute
that fits. Never recomputed: random ops (dropout, seeds) and ops whose saved inputs peftc cannot
redirect (SDPA, dropout, and ops that save their own output: those are kept as they are). A needed tensor not kept becomes a
Recipe (``recompute_ops``) over the kept tensors, stored by the ops that save it. The adapters
policy runs first (its recipes cost no recompute of the base); the tensors its recipes hold are
pinned as kept.
"""

from __future__ import annotations

import operator

import networkx as nx
import torch
from torch import fx

from peftc.errors import SpecError
from peftc.graph import PEFTC
from peftc.passes.context import Coverage
from peftc.passes.optimize.recompute_ops import CHEAP, bit_dropout, nbytes, requires_grad, saved_inputs
from peftc.passes.pipeline import PassContext

__all__ = ["budget", "plan", "TIERS"]

aten = torch.ops.aten
TIERS = ("elementwise", "adapter GEMMs", "base GEMMs", "attention")
_VIEWS = {aten.view.default, aten.unsqueeze.default, aten.expand.default, aten.transpose.int, aten.permute.default,
          aten.t.default, aten.slice.Tensor, aten.alias.default, aten.squeeze.dim, aten.select.int}
_GEMMS = {aten.linear.default, aten.addmm.default, aten.mm.default, aten.bmm.default, aten.matmul.default}
_RANDOM = {aten.dropout.default, aten.native_dropout.default, aten.bernoulli.default, aten.rand.default,
           aten.randn.default, aten.randint.low, bit_dropout}
# consumers whose saves cannot be redirected (SDPA's train flag is switched by identity; composites
# such as cross_entropy save an intermediate of the input's size, not the input)
_OPAQUE = {aten.scaled_dot_product_attention.default, aten.dropout.default, bit_dropout,
           aten.cross_entropy_loss.default}


def _tier(n: fx.Node) -> int | None:
    """The cheapest tier at which n may be recomputed (None: never)."""
    if n.op != "call_function" or n.target in _RANDOM or "seed" in getattr(n.target, "__name__", ""):
        return None
    if n.target in CHEAP or n.target is operator.getitem:
        return 0
    if n.target in _GEMMS:
        return 1 if PEFTC in n.meta else 2
    if getattr(n.target, "namespace", None) == "peftc":
        return 2
    return 3 if n.target is aten.scaled_dot_product_attention.default else None


def _needed(gm: fx.GraphModule, req) -> dict[fx.Node, list[fx.Node]]:
    """Tensor node -> the ops that save it for backward."""
    out: dict[fx.Node, list[fx.Node]] = {}
    for c in gm.graph.nodes:
        for t in saved_inputs(c, req):
            if nbytes(t):
                out.setdefault(t, []).append(c)
    return out


def _base_of(n: fx.Node) -> fx.Node:
    while n.op == "call_function" and n.target in _VIEWS and isinstance(n.args[0], fx.Node):
        n = n.args[0]
    return n


def fill_vals(gm: fx.GraphModule) -> int:
    """Traced values (fake tensors) for nodes inserted without one (adapter nodes), by running
    the graph under the capture's fake mode; returns how many were filled."""
    from torch._guards import detect_fake_mode

    phs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    mode = detect_fake_mode([n.meta.get("val") for n in phs])
    if mode is None or any("val" not in n.meta for n in phs):
        return 0
    filled = 0

    class Prop(fx.Interpreter):
        def run_node(self, n):
            nonlocal filled
            out = super().run_node(n)
            if "val" not in n.meta and n.op != "output":
                n.meta["val"] = out
                filled += 1
            return out

        def placeholder(self, target, args, kwargs):
            return phs_vals.pop(0)

        def get_attr(self, target, args, kwargs):
            t = super().get_attr(target, args, kwargs)
            return mode.from_tensor(t) if isinstance(t, torch.Tensor) else t

    phs_vals = [n.meta["val"] for n in phs]
    with mode, torch.no_grad():
        Prop(gm).run(*phs_vals)
    return filled


def plan(gm: fx.GraphModule, tier: int) -> tuple[float, set[fx.Node], dict]:
    """Min-cut with ops up to ``tier`` recomputable: (bytes kept, nodes kept, needed map).

    A view owns no storage: it is never cut (infinite capacity), keeping it means keeping its
    base, and a view that must be kept pins its base instead."""
    req = requires_grad(gm)
    needed = _needed(gm, req)
    pinned = {_base_of(n) if c.op == "call_function" and c.target in _OPAQUE else n
              for n, cs in needed.items() for c in cs
              if c is n or c.op != "call_function" or c.target in _OPAQUE}
    g = nx.DiGraph()
    for n in gm.graph.nodes:
        size = nbytes(n)
        if n.op == "output" or not size:
            continue
        t = _tier(n)
        free = n.op in ("get_attr", "placeholder")
        view = n.op == "call_function" and n.target in _VIEWS
        if not view and (free or t is None or t > tier or n in pinned):  # a view always follows its base
            g.add_edge("SOURCE", (n, "in"))
        if view:
            g.add_edge((n, "in"), (n, "out"))
        else:
            g.add_edge((n, "in"), (n, "out"), capacity=0 if free else size)
        if n in needed:
            g.add_edge((n, "out"), "SINK")
        for u in n.users:
            if nbytes(u):
                g.add_edge((n, "out"), (u, "in"))
    if "SINK" not in g:
        return 0.0, set(), needed
    value, (reach, _) = nx.minimum_cut(g, "SOURCE", "SINK")
    keep = {n for n, side in (k for k in reach if isinstance(k, tuple)) if side == "in" and (n, "out") not in reach}
    return value, keep, needed


def _chain(t: fx.Node, keep: set[fx.Node]) -> list[fx.Node]:
    """Nodes recomputing t from kept and free nodes, in graph order."""
    chain, stack = {t}, [t]
    while stack:
        for a in stack.pop().all_input_nodes:
            if a not in chain and a not in keep and a.op not in ("get_attr", "placeholder") and nbytes(a):
                chain.add(a)
                stack.append(a)
    return [n for n in t.graph.nodes if n in chain]


def budget(gm: fx.GraphModule, ctx: PassContext, budget_mb: float, cov: Coverage) -> list[str]:
    """Adapter inputs as recipes first, then the min-cut's recomputed tensors; ``cov`` counts both."""
    from peftc.passes.optimize.recompute import _adapters, attach_recipe, wrap

    lines = []
    try:
        fill_vals(gm)
    except (RuntimeError, TypeError, NotImplementedError) as e:  # sizes then come from what capture traced
        lines.append(f"recompute (budget): sizes of inserted nodes unknown ({type(e).__name__}): estimates are low")
    before = ctx.counts["recompute_adapters"]
    lines += _adapters(gm, ctx)  # first what costs nothing: adapter inputs and masks
    cov.hit(ctx.counts["recompute_adapters"] - before)
    limit = budget_mb * 2**20
    tried = []
    for tier in range(len(TIERS)):
        value, keep, needed = plan(gm, tier)
        tried.append(value)
        if value <= limit:
            break
    else:
        raise SpecError("optimize.recompute.budget_mb", budget_mb,
                        f">= {min(tried) / 2**20:.3f} (the least this graph can keep at the example inputs' sizes)")
    baseline = sum(nbytes(n) for n in {_base_of(t) for t in needed})
    recomputed = [t for t in needed if t not in keep and _base_of(t) not in keep]
    for i, t in enumerate(recomputed):
        recipe = attach_recipe(gm, t, _chain(t, keep), f"_peftc_budget_{i}")
        for c in needed[t]:
            wrap(c, recipe)
    cov.hit(len(recomputed))
    ctx.counts["recompute_budget"] += len(recomputed) + ctx.counts["recompute_adapters"]
    ctx.counts["recompute_budget_kept"] += len(keep)
    ctx.counts["recompute_budget_tier"] = tier
    return [*lines, f"recompute (budget {budget_mb:.6g} MB): min-cut keeps {len(keep)} tensors = {value / 2**20:.3f} MB "
            f"(of {baseline / 2**20:.3f} MB saved without recompute) at the example inputs' sizes; "
            f"{len(recomputed)} recomputed in backward, recomputing up to {TIERS[tier]} "
            f"(cuts per tier: {', '.join(f'{v / 2**20:.3f}' for v in tried)} MB)"]

