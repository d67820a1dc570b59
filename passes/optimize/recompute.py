"""Recomputation: keep fewer activations for backward, recompute them from what is kept.

Policies (``optimize: {recompute: {policy: ..., budget_mb: ...}}``; ``[recompute]`` = adapters):

- ``adapters`` (default): the adapters keep nothing the frozen model does not keep, but their
  r-wide intermediates. An adapter input ``x`` that the base does not save (a norm output, the
  SwiGLU product, merged heads) is recomputed in backward from the tensors the base saves, by
  the cheap ops that made it::

      x = norm(h)            A-linear / lora_linear saves x        (tokens x d)
        -> saves Recipe(norm, h)   (h is saved by the norm's own backward anyway)

  and adapter dropout keeps its mask as bits::

      y = dropout(x, p)      saves noise (fp32) and A saves y
        -> y, bits = bit_dropout(x, p); A saves Recipe(norm + mask, h, bits)

  Works on the unfused graph and on the fused ops (``lora_linear``, ``lora_siblings``,
  ``dora_linear``, ``ia3_linear`` save x; their dropout mask is already regenerated from a seed).
  Exact: the forward computes what it did; backward sees bit-identical recomputed tensors.
- ``blocks``: activation checkpointing per transformer block. Blocks are the entries
  ``<list>.<i>`` of the module list that owns most nodes (``model.layers``, ``transformer.h``,
  ``bert.encoder.layer``), found from ``nn_module_stack``; each block's span of nodes becomes a
  submodule run under ``torch.utils.checkpoint(use_reentrant=False)`` with the RNG state
  preserved, so dropout masks repeat and loss and gradients equal those without recompute.
- ``budget`` with ``budget_mb``: a min-cut over the forward graph picks what to keep within the
  budget at the least recompute cost (``recompute_budget``); the rest is recomputed by recipes.

Pre: optimizations of earlier phases (fuse) have run. Post: ``ctx.counts`` has
``recompute_<policy>`` (tensors recomputed / blocks checkpointed) and details; the graph's
``meta[SUMMARY_LINES]`` holds what the policy did (sizes, tiers); its coverage (``UNITS``) says
what it could have matched: ``recompute: matched nothing: no repeated blocks in this graph``, or
``recompute: 3 of 5 adapter inputs saved beyond the base's: 2 not cheaply recomputable (kept)``.
"""

from __future__ import annotations

import operator

import torch
from torch import fx

from peftc.capture import register_train_flag
from peftc.errors import SpecError
from peftc.graph import FLAT_VIEW, PEFTC, SUMMARY_LINES
from peftc.passes.context import Coverage
from peftc.passes.optimize.recompute_ops import (
    RecipeFactory,
    SaveWithRecipes,
    apply_bits,
    bit_dropout,
    extract_region,
    frontier,
    kept_by,
    nbytes,
    recipe_chain,
    requires_grad,
    saved_inputs,
    subgraph,
)
from peftc.passes.pipeline import PassContext, PassResult, register_optimization

__all__ = ["recompute", "check_settings", "POLICIES", "UNITS", "SUMMARY", "attach_recipe", "find_blocks", "wrap"]

POLICIES = ("adapters", "blocks", "budget")
UNITS = {  # what each policy's coverage counts
    "adapters": "adapter inputs saved beyond the base's",  # recomputed by a recipe, or kept
    "blocks": "repeated blocks",  # entries <list>.<i> of the module list owning most nodes
    "budget": "saved tensors worth recomputing",  # what the min-cut recomputes within the budget
}
register_train_flag(bit_dropout, 2)  # set_training flips bit_dropout(x, p, train)
SUMMARY = SUMMARY_LINES  # gm.meta key: lines for graph_summary()
VIEW = FLAT_VIEW  # gm.meta key: the graph before blocks were outlined (for inspection)
aten = torch.ops.aten


def check_settings(settings) -> dict:
    """``optimize: {recompute: {...}}`` with defaults; bad settings are SpecErrors (before capture)."""
    allowed = {"policy": f"one of {list(POLICIES)}", "budget_mb": "a positive number (policy: budget)"}
    for key, value in settings.items():
        if key not in allowed:
            raise SpecError(f"optimize.recompute.{key}", value, f"one of {sorted(allowed)}", "unknown recompute setting")
    policy = settings.get("policy", "adapters")
    if policy not in POLICIES:
        raise SpecError("optimize.recompute.policy", policy, allowed["policy"])
    budget = settings.get("budget_mb")
    if policy == "budget":
        if isinstance(budget, bool) or not isinstance(budget, (int, float)) or budget <= 0:
            raise SpecError("optimize.recompute.budget_mb", budget, allowed["budget_mb"],
                            "policy: budget needs the activation budget in MB")
    elif budget is not None:
        raise SpecError("optimize.recompute.budget_mb", budget, "unset unless policy is budget")
    return {"policy": policy, "budget_mb": budget}


@register_optimization("recompute", phase="recompute", check=check_settings, checkpointing={"policy": "blocks"})
def recompute(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    """Applies the selected policy (see the module docstring)."""
    settings = check_settings(ctx.spec.optimize.get("recompute") or {})
    policy = settings["policy"]
    cov = ctx.coverage("recompute", UNITS[policy])
    if policy == "adapters":
        lines = _adapters(gm, ctx, cov)
    elif policy == "blocks":
        lines = _blocks(gm, ctx, cov)
    else:
        from peftc.passes.optimize.recompute_budget import budget

        lines = budget(gm, ctx, settings["budget_mb"], cov)
    gm.meta.setdefault(SUMMARY, []).extend(lines)
    ctx.counts[f"recompute_{policy}"] += 0  # present even when it matched nothing
    return PassResult(gm, ctx.counts[f"recompute_{policy}"] > 0)


# ---------------------------------------------------------------- recipes (adapters, budget)

_WRAPPERS: dict = {}


def wrap(consumer: fx.Node, recipe: fx.Node) -> None:
    """Makes ``consumer`` store ``recipe`` in place of the recipe's tensor if it saves it."""
    if not isinstance(consumer.target, SaveWithRecipes):
        consumer.target = _WRAPPERS.setdefault(consumer.target, SaveWithRecipes(consumer.target))
    consumer.kwargs = {**consumer.kwargs, "_recipes": [*consumer.kwargs.get("_recipes", []), recipe]}


def attach_recipe(gm: fx.GraphModule, target: fx.Node, chain: list[fx.Node], name: str, *, tail=None,
                  extra: tuple[fx.Node, ...] = ()) -> fx.Node:
    """Inserts ``recipe = RecipeFactory(chain)(target, *inputs)`` after target and its inputs;
    ``tail(graph, x, placeholders)`` appends ops after the chain's result (``extra`` inputs are
    the last placeholders)."""
    inputs = frontier(chain) + list(extra) if chain else [target, *extra]
    fn = subgraph(gm, chain, inputs, [chain[-1] if chain else target], tail=tail)
    gm.add_submodule(name, RecipeFactory(fn))
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    last = max([target, *inputs], key=order.__getitem__)
    with gm.graph.inserting_after(last):
        node = gm.graph.call_module(name, (target, *inputs))
    node.meta[PEFTC] = {"method": "recompute", "adapter": "*", "module": _owner(target) or "", "role": "recipe"}
    if "nn_module_stack" in target.meta:
        node.meta["nn_module_stack"] = dict(target.meta["nn_module_stack"])
    return node


def _owner(node: fx.Node) -> str | None:
    stack = node.meta.get("nn_module_stack")
    return list(stack.values())[-1][0] if stack else None


def _is_adapter(n) -> bool:
    return isinstance(n, fx.Node) and PEFTC in n.meta and n.meta[PEFTC].get("method") != "recompute"


def _bit_dropouts(gm: fx.GraphModule) -> dict[fx.Node, tuple[fx.Node, fx.Node, float]]:
    """Adapter dropouts -> bit_dropout; returns y -> (x, bits, p)."""
    out = {}
    for d in [n for n in gm.graph.nodes if _is_adapter(n) and n.target is aten.dropout.default]:
        x, p, train = d.args[:3]
        with gm.graph.inserting_before(d):
            bd = gm.graph.call_function(bit_dropout, (x, p, train))
            y = gm.graph.call_function(operator.getitem, (bd, 0))
            bits = gm.graph.call_function(operator.getitem, (bd, 1))
        for n, role in ((bd, "bit_dropout"), (y, "dropout"), (bits, "dropout_bits")):
            n.meta[PEFTC] = {**d.meta[PEFTC], "role": role}
            if "nn_module_stack" in d.meta:
                n.meta["nn_module_stack"] = dict(d.meta["nn_module_stack"])
        y.meta["val"] = d.meta.get("val")
        d.replace_all_uses_with(y)
        gm.graph.erase_node(d)
        out[y] = (x, bits, float(p))
    return out


def _flat_nodes(args) -> list[fx.Node]:
    out = []
    for a in args:
        if isinstance(a, fx.Node):
            out.append(a)
        elif isinstance(a, (list, tuple)):
            out.extend(_flat_nodes(a))
    return out


def _adapters(gm: fx.GraphModule, ctx: PassContext, cov: Coverage | None = None) -> list[str]:
    """Adapter inputs the base does not keep -> recipes over what it keeps; ``cov`` (None when
    the budget policy runs this first) counts each one recomputed or kept."""
    req = requires_grad(gm)
    kept = kept_by(gm, req)
    drops = _bit_dropouts(gm)
    consumers: dict[fx.Node, list[fx.Node]] = {}
    for c in gm.graph.nodes:
        if c.op != "call_function" or not _is_adapter(c) or c.target in (operator.getitem, bit_dropout):
            continue
        saves = saved_inputs(c, req)
        for a in _flat_nodes(c.args):
            if a not in saves:
                continue
            if a in drops or (not _is_adapter(a) and a not in kept and a.op == "call_function" and nbytes(a)):
                consumers.setdefault(a, []).append(c)
    recomputed, kept_x, saved = 0, 0, 0
    for i, (t, users) in enumerate(consumers.items()):
        if t in drops:
            x, bits, p = drops[t]
            chain = [] if x in kept else (recipe_chain(x, kept) or [])
            recipe = attach_recipe(gm, x, chain, f"_peftc_recipe_{i}", extra=(bits,),
                                   tail=lambda g, v, ph, p=p: g.call_function(apply_bits, (v, ph[-1], p)))
            ctx.counts["recompute_dropout_bits"] += 1
        else:
            chain = recipe_chain(t, kept)
            if chain is None:
                kept_x += 1
                if cov is not None:
                    cov.miss("not cheaply recomputable (kept)")
                continue
            recipe = attach_recipe(gm, t, chain, f"_peftc_recipe_{i}")
        for c in users:
            wrap(c, recipe)
        recomputed += 1
        saved += nbytes(drops[t][0] if t in drops else t)
        ctx.counts["recompute_adapters"] += 1
        ctx.counts["recompute_consumers"] += len(users)
        if cov is not None:
            cov.hit()
    return [f"recompute (adapters): {recomputed} adapter inputs stored as recipes "
            f"({ctx.counts['recompute_dropout_bits']} dropout masks as bits), ~{saved / 2**20:.2f} MB fewer "
            f"saved at the example shape; {kept_x} inputs kept (not cheaply recomputable)"
            if recomputed else "recompute (adapters): nothing to recompute (no adapter input outside what "
            "the base keeps)"]


# ---------------------------------------------------------------- blocks


def find_blocks(gm: fx.GraphModule) -> tuple[str, dict[int, list[fx.Node]]]:
    """The module list owning most nodes (``<prefix>.<i>`` paths in nn_module_stack) and its
    blocks' contiguous node spans (graph order), by block index."""
    owned: dict[str, dict[int, list[fx.Node]]] = {}
    for n in gm.graph.nodes:
        seen = set()
        for path, _ in (n.meta.get("nn_module_stack") or {}).values():
            prefix, _, idx = path.rpartition(".")
            if idx.isdigit() and prefix and (prefix, idx) not in seen:
                seen.add((prefix, idx))
                owned.setdefault(prefix, {}).setdefault(int(idx), []).append(n)
    lists = {p: b for p, b in owned.items() if len(b) >= 2}
    if not lists:
        return "", {}
    prefix = max(lists, key=lambda p: (sum(map(len, lists[p].values())), -len(p)))
    order = list(gm.graph.nodes)
    pos = {n: i for i, n in enumerate(order)}
    spans = {}
    for i, nodes in sorted(lists[prefix].items()):
        lo, hi = pos[nodes[0]], pos[nodes[-1]]
        spans[i] = order[lo:hi + 1]
    return prefix, spans


def _blocks(gm: fx.GraphModule, ctx: PassContext, cov: Coverage) -> list[str]:
    prefix, spans = find_blocks(gm)
    starts = sorted((s[0], s[-1]) for s in spans.values())
    pos = {n: i for i, n in enumerate(gm.graph.nodes)}
    if any(pos[b[0]] <= pos[a[1]] for a, b in zip(starts, starts[1:])):
        raise SpecError("optimize.recompute.policy", "blocks", "a model whose blocks run one after another",
                        f"the spans of {prefix}.<i> interleave")
    if spans:
        gm.meta[VIEW] = fx.GraphModule(gm, _copy(gm.graph))
    done = 0
    for i, span in spans.items():
        if extract_region(gm, list(span), f"_peftc_block_{i}") is not None:
            done += 1
            cov.hit()
        else:
            cov.miss("no output used after the block")
    ctx.counts["recompute_blocks"] += done
    return [f"recompute (blocks): {done} blocks of {prefix} checkpointed (torch.utils.checkpoint, "
            "non-reentrant, RNG state preserved)"] if done else []  # none: the coverage line says so


def _copy(graph: fx.Graph) -> fx.Graph:
    g = fx.Graph()
    g.output(g.graph_copy(graph, {}))
    return g

