"""The one ordered pipeline of passes, and how a pass is run.

A pass is ``fn(gm, ctx) -> PassResult``. The order lives here only, as two lists of phases;
every method and optimization declares its phase where it registers (``register_method``,
``register_optimization``), so adding one touches only its own file. Per adapter: ``select``,
then the rewrites of the methods its spec uses, phase by phase (within a phase, in the order
the spec names them), then ``dce``; after every active adapter's rewrites, the optimizations
the spec selects, phase by phase. After every pass the graph is verified; with
``PEFTC_DEBUG=1`` the graph is printed before and after each pass.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from functools import partial

from torch import fx

from peftc.errors import PassError, PeftcError, SpecError
from peftc.graph import PEFTC, linear_sites, stack_owner
from peftc.passes import merge
from peftc.passes.context import SITES, PassContext, PassResult
from peftc.spec import BASE_OPTIMIZATIONS, OPTIMIZATION_PHASES, OPTIMIZATIONS, Merging, Spec

__all__ = ["PassResult", "PassContext", "rewrite_passes", "optimize_passes", "merge_passes", "run_pipeline", "verify",
           "select_sites", "SITES", "REWRITE_PHASES", "OPTIMIZE_PHASES", "check_every_target_has_a_site"]

REWRITE_PHASES: tuple[str, ...] = (  # method phases, in the order they run for one adapter
    "whole_modules",  # W -> W' (a trainable copy of a module trained whole); first: others leave it alone
    "swap",  # b -> b', norm(x; w, b) -> norm(x; w', b'): trainable copies of chosen parameters
    "reparameterize",  # y = x W^T -> y + x dW^T, dW low-rank or structured (LoRA, VeRA, LoHa, LoKr)
    "scale",  # y -> y * l (+ beta), or x -> x * l, per channel (IA3, SSF)
    "prompt",  # embed(ids) -> P ++ embed(ids); sdpa(q, k, v, m) -> sdpa(q, [E;k], [E;v], [1;m])
    "graph",  # h + r -> (A(x) + h) + r: new sub-networks at the residual adds (bottleneck adapters)
)

OPTIMIZE_PHASES: tuple[str, ...] = (  # optimization phases, in the order they run when selected
    "fuse",  # linear(x, W, b) + s * B(A(drop(x))) -> lora_linear(x, W, b, A, B, s, p, seed)
    "quantize",  # frozen W -> Q(W) stored; dequantized inside the op that reads it
    "recompute",  # activations saved for backward -> recomputed in backward from what is kept
    "shard",  # W -> all_gather(W_shard) before its block, freed after it
)


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


def _methods_in_phase_order(spec: Spec) -> list[type]:
    """The method classes a spec uses, by phase, then by first appearance in the spec."""
    classes = list(dict.fromkeys(type(m) for m in spec.methods))
    unknown = {c.method: c.phase for c in classes if c.phase not in REWRITE_PHASES}
    if unknown:
        raise PassError(f"methods {unknown} declare phases not in {list(REWRITE_PHASES)}")
    return sorted(classes, key=lambda c: REWRITE_PHASES.index(c.phase))


def rewrite_passes(spec: Spec) -> list[tuple[str, Callable]]:
    """The ordered rewrite passes for one adapter's spec: select, its methods, dce."""
    methods = [(c.method, partial(_method_pass, c)) for c in _methods_in_phase_order(spec)]
    return [("select", select_sites), *methods, ("dce", drop_unused_attrs)]


def optimize_passes(spec: Spec, *, base_only: bool = False) -> list[tuple[str, Callable]]:
    """The optimizations ``spec.optimize`` selects, in phase order; they run once, after every
    active adapter's rewrites. ``base_only``: those registered ``on_base`` (for a graph without
    adapter nodes)."""
    unknown = {n: p for n, p in OPTIMIZATION_PHASES.items() if p not in OPTIMIZE_PHASES}
    if unknown:
        raise PassError(f"optimizations {unknown} declare phases not in {list(OPTIMIZE_PHASES)}")
    chosen = [n for n in OPTIMIZATIONS if n in spec.optimize and (not base_only or n in BASE_OPTIMIZATIONS)]
    chosen.sort(key=lambda n: OPTIMIZE_PHASES.index(OPTIMIZATION_PHASES[n]))
    return [(n, OPTIMIZATIONS[n]) for n in chosen]


def merge_passes(spec: Spec) -> list[tuple[str, Callable]]:
    """Folding an adapter into the weights instead of inserting its nodes: methods that merge
    by rewriting (trained copies) run their merged rewrite, then every folding method's
    linear sites read folded weights (passes/merge.py)."""
    unmergeable = [m.method for m in spec.methods if m.merging is Merging.NONE]
    if unmergeable:
        raise PassError(f"{unmergeable} add graph inputs/nodes, not weights: they cannot be merged")
    swaps = [(c.method, partial(_method_pass, c, merged=True))
             for c in _methods_in_phase_order(spec) if c.merging is Merging.REWRITE]
    return [("select", select_sites), *swaps,
            ("merge", merge.merge),  # W -> W' read from a merged buffer
            ("dce", drop_unused_attrs)]


def verify(gm: fx.GraphModule) -> None:
    """Invariants after every pass: a well-formed graph whose get_attr targets resolve (fx's
    lint checks both), and complete peftc meta on inserted nodes."""
    gm.graph.lint()
    for n in gm.graph.nodes:
        info = n.meta.get(PEFTC)
        if info is not None and not {"method", "adapter", "module", "role"} <= set(info):
            raise PassError(f"node {n.name} has incomplete peftc meta {info}")


def run_pipeline(gm: fx.GraphModule, ctx: PassContext, passes) -> fx.GraphModule:
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
        ctx.timings[name] = ctx.timings.get(name, 0.0) + time.perf_counter() - t0
        done.append(name)
        if debug:
            print(f"--- after {name} ---\n{gm.graph}")
    gm.recompile()
    return gm

