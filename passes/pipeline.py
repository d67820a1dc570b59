"""The one pipeline: every pass that shapes a graph runs from ``build``, in ``PHASES`` order.

A pass is ``fn(gm, ctx) -> PassResult``. The order lives here only, as one list of phases; each
method and optimization declares its phase where it registers (``register_method``,
``register_optimization``), which rejects a phase not in the list, so adding one touches only
its own file. ``build(gm, plan)`` runs, for each running adapter in turn, ``select``, then the
method phases of the methods its spec uses (or ``merge`` for merged adapters), then ``dce``;
then, once over every adapter's nodes, the mixed-batch lowering and the optimizations
``plan.optimize`` selects. After every pass the graph is verified; after every optimization the
pipeline checks what it matched (``Coverage``) and writes a ``graph_summary()`` line for a
partial or empty match. With ``PEFTC_DEBUG=1`` the graph is printed before and after each pass.

Example::

    ctx = PassContext(spec=spec, targets=targets, model=model, store=store)
    gm = build(gm, Plan(adapters=[ctx]))
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import torch
from torch import fx, nn

from peftc.errors import PassError, PeftcError, SpecError
from peftc.graph import PEFTC, SUMMARY_LINES, install_module, linear_sites, stack_owner
from peftc.passes import merge
from peftc.passes.context import SITES, PassContext, PassResult
from peftc.spec import OPTIMIZATIONS, Merging, Optimization, Spec, add_method, add_optimization

__all__ = ["PassResult", "PassContext", "Plan", "build", "run_pipeline", "verify", "register_method",
           "register_optimization", "rewrite_passes", "merge_passes", "optimize_passes", "select_sites",
           "check_every_target_has_a_site", "PHASES", "REWRITE_PHASES", "OPTIMIZE_PHASES", "SITES", "MASKS"]

PHASES: tuple[str, ...] = (
    # -- per running adapter, in order ------------------------------------------------------
    "select",  # node -> meta[SITES]: the entries of this adapter's spec that adapt the node
    "whole_modules",  # W -> W' (a trainable copy of a module trained whole); first: others leave it alone
    "swap",  # b -> b', norm(x; w, b) -> norm(x; w', b'): trainable copies of chosen parameters
    "reparameterize",  # y = x W^T -> y + x dW^T, dW low-rank or structured (LoRA, VeRA, LoHa, LoKr)
    "scale",  # y -> y * l (+ beta), or x -> x * l, per channel (IA3, SSF)
    "prompt",  # embed(ids) -> P ++ embed(ids); sdpa(q, k, v, m) -> sdpa(q, [E;k], [E;v], [1;m])
    "graph",  # h + r -> (A(x) + h) + r: new sub-networks at the residual adds (bottleneck adapters)
    "merge",  # merged adapters, instead of the phases above: linear(x, W) reads W' = fold(W, adapter)
    "dce",  # get_attr without users -> gone
    # -- once per graph, over every adapter's nodes ------------------------------------------
    "lower_mixed",  # sum_a rows(mask_a) * s_a B_a(A_a(x)) -> lora_sgmv(x, [A_a], [B_a], adapter per row)
    "fuse",  # linear(x, W, b) + s * B(A(drop(x))) -> lora_linear(x, W, b, A, B, s, p, seed)
    "quantize",  # frozen W -> Q(W) stored; dequantized inside the op that reads it
    "recompute",  # activations saved for backward -> recomputed in backward from what is kept
    "shard",  # W -> all_gather(W_shard) before its block, freed after it
    "codegen",  # interpreted graph -> inductor-generated code (forward and backward); last
)
REWRITE_PHASES = PHASES[PHASES.index("whole_modules"):PHASES.index("merge")]  # where methods register
LOWERING_PHASES = ("lower_mixed",)  # run by the pipeline when the graph calls for them, never selected
OPTIMIZE_PHASES = PHASES[PHASES.index("fuse"):]  # where ``optimize`` selectable optimizations register
MASKS = "_peftc_sample_masks"  # graph submodule: per-adapter (batch,) 0/1 masks of a mixed batch


# ---- registration --------------------------------------------------------------------------
def register_method(name: str, *, phase: str | None, peft_type: str | None = None, store_dir: str | None = None):
    """Class decorator: registers a MethodSpec under ``name``; the class is the whole method.

    ``phase``: one of ``REWRITE_PHASES``, where the class's ``rewrite`` pass runs (None for
    entries that ``expand`` into other methods); ``peft_type``: the HF PEFT method it reads and
    writes; ``store_dir``: adapter modules of this method live at ``<module path>.<store_dir>.<adapter>``
    (default: ``name``). The pipeline, checkpoint IO and merging read these declarations.
    """
    if phase is not None and phase not in REWRITE_PHASES:
        raise PassError(f"method {name!r} declares phase {phase!r}; a method runs in one of {list(REWRITE_PHASES)}")

    def deco(cls):
        cls.method, cls.phase, cls.peft_type, cls.store_dir = name, phase, peft_type, store_dir or name
        add_method(name, cls)
        return cls

    return deco


def register_optimization(name: str, *, phase: str, check: Callable | None = None, on_base: bool = False,
                          checkpointing: dict | None = None, **hooks):
    """Decorator for an optimization pass: its one record (``peftc.spec.Optimization``).

    ``phase``: one of ``OPTIMIZE_PHASES`` (selected with ``optimize: {name: {...}}``) or of
    ``LOWERING_PHASES`` (run whenever the graph calls for it; not a setting). ``check(settings)``
    validates its settings when a spec is built; ``on_base``: it also runs on graphs without
    adapter nodes; ``checkpointing``: the settings HF's gradient checkpointing means (one
    optimization declares them); ``hooks``: see ``Optimization``. The pass must fill
    ``ctx.coverage(name, unit)``.
    """
    if phase not in OPTIMIZE_PHASES + LOWERING_PHASES:
        raise PassError(f"optimization {name!r} declares phase {phase!r}; one of "
                        f"{list(OPTIMIZE_PHASES + LOWERING_PHASES)} is needed")

    def deco(fn):
        add_optimization(Optimization(name, fn, phase, check=check, on_base=on_base, hooks=hooks,
                                      selectable=phase in OPTIMIZE_PHASES, checkpointing=checkpointing))
        return fn

    return deco


# ---- the passes the pipeline owns ----------------------------------------------------------
def select_sites(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    """Annotates nodes with the spec entries that adapt them; rewrites read only this.

    Marks from an earlier adapter's pipeline are cleared first: indices refer to ctx.spec.
    """
    for node in gm.graph.nodes:
        node.meta.pop(SITES, None)
    marked = 0
    linear = {(i, p) for i, t in enumerate(ctx.targets) for p, kind in t.items() if kind != "module"}
    for site in linear_sites(gm):
        for i, _ in enumerate(ctx.targets):
            if (i, site.module) in linear:
                site.node.meta.setdefault(SITES, []).append(i)
                marked += 1
    params = {(i, p) for i, t in enumerate(ctx.targets) for p, kind in t.items() if kind == "parameter"}
    for node in gm.graph.nodes if params else ():  # reads of targeted parameters (LoRA on parameters)
        for i, _ in enumerate(ctx.targets):
            if node.op == "get_attr" and node.users and (i, node.target) in params:
                node.meta.setdefault(SITES, []).append(i)
                marked += 1
    whole = [(i, p) for i, t in enumerate(ctx.targets) for p, kind in t.items() if kind == "module"]
    if whole:
        for node in gm.graph.nodes:
            owner = stack_owner(node)
            for i, p in whole:
                if owner and (owner == p or owner.startswith(p + ".")):
                    node.meta.setdefault(SITES, []).append(i)
                    marked += 1
    ctx.counts["select"] += marked
    return PassResult(gm, marked > 0)


def drop_unused_attrs(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    """Erases get_attr nodes left without users by rewrites (a retargeted weight)."""
    dead = [n for n in gm.graph.nodes if n.op == "get_attr" and not n.users]
    for n in dead:
        gm.graph.erase_node(n)
    ctx.counts["dce"] += len(dead)
    return PassResult(gm, bool(dead))


def _method_pass(cls, gm: fx.GraphModule, ctx: PassContext, *, merged: bool = False) -> PassResult:
    """Runs a method's pass; a mixed batch reaches only methods that can adapt part of a batch."""
    if ctx.sample_mask and not cls.mixed_batch:
        raise PeftcError("a mixed batch (per-sample adapter_names) works with the LoRA family only; "
                         f"adapter {ctx.spec.adapter!r} uses {cls.method}")
    if merged:
        return cls.merged_rewrite(gm, ctx)
    result = cls.rewrite(gm, ctx)
    check_every_target_has_a_site(cls, result.graph_module, ctx)
    return result


def check_every_target_has_a_site(cls, gm: fx.GraphModule, ctx: PassContext) -> None:
    """Invariant: every module (or parameter) a ``cls`` entry resolved to has a node of this
    method and adapter in the graph; else a PassError naming them and the ops they run as."""
    wanted = {p: i for i, (m, t) in enumerate(zip(ctx.spec.methods, ctx.targets)) if isinstance(m, cls) for p in t}
    if not wanted:
        return
    hit, ops = set(), {}
    for n in gm.graph.nodes:
        info = n.meta.get(PEFTC)
        if info and info.get("method") == cls.method and info.get("adapter") == ctx.spec.adapter:
            hit.update((info.get("module"), info.get("site")))
        elif n.op in ("call_function", "call_method") and (owner := stack_owner(n)) in wanted:
            ops.setdefault(owner, set()).add(getattr(n.target, "__name__", str(n.target)))
    missing = sorted(set(wanted) - hit)
    if missing:
        runs = {p: sorted(ops.get(p, ())) or "no op in this graph" for p in missing[:8]}
        raise PassError(f"methods[{wanted[missing[0]]}].{cls.method}: {len(missing)} target(s) resolve in the model "
                        f"but have no site in the captured graph: {missing}; they run as {runs}, "
                        "not as a form this method adapts")


# ---- the order -----------------------------------------------------------------------------
def _methods_in_phase_order(spec: Spec) -> list[type]:
    """The method classes a spec uses, by phase, then by first appearance in the spec."""
    classes = list(dict.fromkeys(type(m) for m in spec.methods))
    return sorted(classes, key=lambda c: PHASES.index(c.phase))


def rewrite_passes(spec: Spec) -> list[tuple[str, Callable]]:
    """The ordered rewrite passes for one adapter's spec: select, its methods, dce."""
    methods = [(c.method, partial(_method_pass, c)) for c in _methods_in_phase_order(spec)]
    return [("select", select_sites), *methods, ("dce", drop_unused_attrs)]


def merge_passes(spec: Spec) -> list[tuple[str, Callable]]:
    """Folding an adapter into the weights instead of inserting its nodes: methods that merge
    by rewriting (trained copies) run their merged rewrite, then every folding method's
    linear sites read folded weights (passes/merge.py)."""
    unmergeable = [m.method for m in spec.methods if m.merging is Merging.NONE]
    if unmergeable:
        raise PassError(f"{unmergeable} add graph inputs/nodes, not weights: they cannot be merged")
    swaps = [(c.method, partial(_method_pass, c, merged=True))
             for c in _methods_in_phase_order(spec) if c.merging is Merging.REWRITE]
    return [("select", select_sites), *swaps, ("merge", merge.merge), ("dce", drop_unused_attrs)]


def optimize_passes(optimize, *, base_only: bool = False, phases=OPTIMIZE_PHASES) -> list[tuple[str, Callable]]:
    """The optimizations ``optimize`` (the model-level setting) selects, in phase order.
    ``base_only``: those registered ``on_base`` (for a graph without adapter nodes)."""
    chosen = [o for n, o in OPTIMIZATIONS.items() if n in optimize and (o.on_base or not base_only)]
    chosen.sort(key=lambda o: phases.index(o.phase))
    return [(o.name, o.run) for o in chosen]


@dataclass
class Plan:
    """What one graph is built for. ``adapters``: one context per running adapter, in order
    (empty: the base model's graph); ``merged``: they are folded into the weights; ``mixed``:
    a per-sample batch (each adapter's terms masked by its rows, then lowered to one segmented
    op per linear unless ``lower_mixed`` is False); ``optimize``: the model-level optimizations,
    run with ``base`` as context (its counts and timings are the graph's); False for the
    unoptimized reference."""

    adapters: list[PassContext]
    base: PassContext | None = None
    merged: bool = False
    mixed: bool = False
    lower_mixed: bool = True
    optimize: dict = field(default_factory=dict)


def build(gm: fx.GraphModule, plan: Plan) -> fx.GraphModule:
    """Runs every phase ``plan`` calls for on ``gm``, in ``PHASES`` order."""
    if plan.mixed:
        install_module(gm, MASKS, nn.Module())
    for ctx in plan.adapters:
        if plan.mixed:  # placeholders; the caller writes each call's masks into these buffers
            gm.get_submodule(MASKS).register_buffer(ctx.spec.adapter, torch.ones(1), persistent=False)
            ctx.sample_mask = f"{MASKS}.{ctx.spec.adapter}"
        gm = run_pipeline(gm, ctx, merge_passes(ctx.spec) if plan.merged else rewrite_passes(ctx.spec))
    ctx = plan.base or (plan.adapters[0] if plan.adapters else None)
    if ctx is None:
        return gm
    inserted = bool(plan.adapters) and not plan.merged
    if plan.mixed and plan.lower_mixed and inserted:
        lowerings = [(o.name, o.run) for o in OPTIMIZATIONS.values() if o.phase in LOWERING_PHASES]
        gm = run_pipeline(gm, ctx, lowerings, report=True)
    selected = optimize_passes(plan.optimize, base_only=not inserted)
    return run_pipeline(gm, ctx, selected, report=True)


# ---- running and checking ------------------------------------------------------------------
def verify(gm: fx.GraphModule) -> None:
    """Invariants after every pass: a well-formed graph whose get_attr targets resolve (fx's
    lint checks both), and complete peftc meta on inserted nodes."""
    gm.graph.lint()
    for n in gm.graph.nodes:
        info = n.meta.get(PEFTC)
        if info is not None and not {"method", "adapter", "module", "role"} <= set(info):
            raise PassError(f"node {n.name} has incomplete peftc meta {info}")


def _report(gm: fx.GraphModule, ctx: PassContext, name: str) -> None:
    """Never silent: an optimization that matched nothing, or less than it could, gets a line."""
    cov = ctx.reports.get(name)
    if cov is None:
        raise PassError(f"optimization {name!r} did not report what it matched (ctx.coverage)")
    line = cov.line(name)
    lines = [x for x in gm.meta.get(SUMMARY_LINES, []) if not x.startswith(f"{name}: ")]
    gm.meta[SUMMARY_LINES] = [*lines, line] if line else lines


def run_pipeline(gm: fx.GraphModule, ctx: PassContext, passes, *, report: bool = False) -> fx.GraphModule:
    """Runs ``passes`` in order, verifying after each; ``report``: they are optimizations, whose
    coverage is checked and summarised."""
    debug = os.environ.get("PEFTC_DEBUG", "") not in ("", "0")
    done: list[str] = []
    for name, fn in passes:
        if debug:
            print(f"--- before {name} ---\n{gm.graph}")
        t0 = time.perf_counter()
        try:
            gm, _ = fn(gm, ctx)
            verify(gm)
        except (PassError, SpecError):  # SpecError: a setting only a model can refute
            raise
        except Exception as e:
            raise PassError(f"pass {name!r} failed after {done or 'no passes'}: {e}") from e
        if report:
            _report(gm, ctx, name)
        ctx.timings[name] = ctx.timings.get(name, 0.0) + time.perf_counter() - t0
        done.append(name)
        if debug:
            print(f"--- after {name} ---\n{gm.graph}")
    gm.recompile()
    return gm
