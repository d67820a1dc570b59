"""The one ordered pipeline of passes, and how a pass is run.

A pass is ``fn(gm, ctx) -> PassResult``. Rewrite passes come first, in the order below; then
the optimizations the spec selects, in the order of their declared ``OPTIMIZE_PHASES``. After every pass the graph is
verified; with ``PEFTC_DEBUG=1`` the graph is printed before and after each pass.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

from torch import fx, nn

from peftc.errors import PassError, SpecError
from peftc.graph import PEFTC, linear_sites
from peftc.spec import OPTIMIZATION_PHASES, OPTIMIZATIONS, Spec

__all__ = ["PassResult", "PassContext", "rewrite_passes", "optimize_passes", "merge_passes", "run_pipeline", "verify",
           "SITES", "OPTIMIZE_PHASES"]

SITES = "peftc_sites"  # node.meta key: indices of the spec entries that adapt this node


class PassResult(NamedTuple):
    graph_module: fx.GraphModule
    modified: bool


@dataclass
class PassContext:
    """What passes read besides the graph; ``counts`` records how often each pass matched."""

    spec: Spec
    targets: list[dict[str, str]]  # per spec entry: module path -> kind ("linear", "module", ...)
    model: nn.Module  # the user's eager model, for module attributes
    store: nn.Module  # root of the adapter modules, shared by every capture
    counts: Counter = field(default_factory=Counter)
    timings: dict[str, float] = field(default_factory=dict)
    sample_mask: str | None = None  # get_attr target of a (batch,) 0/1 mask: mixed-batch adapters


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
    whole = [(i, p) for i, t in enumerate(ctx.targets) for p, kind in t.items() if kind == "module"]
    if whole:
        for node in gm.graph.nodes:
            owner = _owner(node)
            for i, p in whole:
                if owner and (owner == p or owner.startswith(p + ".")):
                    node.meta.setdefault(SITES, []).append(i)
                    marked += 1
    ctx.counts["select"] += marked
    return PassResult(gm, marked > 0)


def _owner(node: fx.Node) -> str | None:
    stack = node.meta.get("nn_module_stack")
    return list(stack.values())[-1][0] if stack else None


def drop_unused_attrs(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    """Erases get_attr nodes left without users by rewrites (a retargeted weight)."""
    dead = [n for n in gm.graph.nodes if n.op == "get_attr" and not n.users]
    for n in dead:
        gm.graph.erase_node(n)
    ctx.counts["dce"] += len(dead)
    return PassResult(gm, bool(dead))


def rewrite_passes(spec: Spec) -> list[tuple[str, Callable]]:
    """The ordered pass list for a spec: rewrites for the methods it uses, then optimizations."""
    from peftc.passes import (
        bitfit,
        bottleneck,
        ia3,
        ln_tuning,
        loha,
        lokr,
        lora,
        prefix,
        prompt,
        ptuning,
        ssf,
        train,
        vera,
    )

    rewrites = [
        ("select", select_sites),  # spec targets -> node.meta[SITES]
        ("train", train.rewrite),  # W of a module trained whole -> its trainable copy
        ("bitfit", bitfit.rewrite),  # b -> b' (trainable copy)
        ("ln_tuning", ln_tuning.rewrite),  # norm(x; w, b) -> norm(x; w', b') (trainable copy)
        ("lora", lora.rewrite),  # y = x W^T -> y + s * B(A(dropout(x)))
        ("vera", vera.rewrite),  # y -> y + l_b * (B[:out] (l_d * (A[:, :in] dropout(x))))
        ("loha", loha.rewrite),  # y -> y + x dW^T, dW = (w1a w1b) * (w2a w2b) * alpha/r
        ("lokr", lokr.rewrite),  # y -> y + x dW^T, dW = kron(w1, w2) * alpha/r
        ("ia3", ia3.rewrite),  # y -> y * l ; feedforward: x -> x * l
        ("ssf", ssf.rewrite),  # y -> y * gamma + beta
        ("prompt", prompt.rewrite),  # embed(ids) -> prompt ++ embed(ids); ids, mask, labels widened by P
        ("ptuning", ptuning.rewrite),  # embed(ids) -> MLP(E) ++ embed(ids); widened as prompt
        ("prefix", prefix.rewrite),  # sdpa(q, k, v, m) -> sdpa(q, [Ek;k], [Ev;v], [1;m]); positions + P
        ("bottleneck", bottleneck.rewrite),  # h + r -> (A(x) + h) + r, A = s*up(f(down(x))), x = h | h+r | r
        ("dce", drop_unused_attrs),  # get_attr without users -> gone
    ]
    used = {m.method for m in spec.methods}
    return [(n, f) for n, f in rewrites if n in ("select", "dce") or n in used]


def optimize_passes(spec: Spec) -> list[tuple[str, Callable]]:
    """The optimizations ``spec.optimize`` selects, in phase order; they run once, after every
    active adapter's rewrites."""
    unknown = {n: p for n, p in OPTIMIZATION_PHASES.items() if p not in OPTIMIZE_PHASES}
    if unknown:
        raise PassError(f"optimizations {unknown} declare phases not in {list(OPTIMIZE_PHASES)}")
    chosen = [n for n in OPTIMIZATIONS if n in spec.optimize]
    chosen.sort(key=lambda n: OPTIMIZE_PHASES.index(OPTIMIZATION_PHASES[n]))
    return [(n, OPTIMIZATIONS[n]) for n in chosen]


def merge_passes(spec: Spec) -> list[tuple[str, Callable]]:
    """Folding an adapter into the weights instead of inserting its nodes."""
    graph_level = [m.method for m in spec.methods if m.sites == "graph"]
    if graph_level:
        raise PassError(f"{graph_level} add graph inputs/nodes, not weights: they cannot be merged")
    from peftc.passes import merge, train

    used = {m.method for m in spec.methods}
    from peftc.passes import bitfit, ln_tuning

    swaps = [(n, f) for n, f in (("train", train.rewrite), ("bitfit", bitfit.rewrite),
                                 ("ln_tuning", ln_tuning.merge)) if n in used]
    return [("select", select_sites), *swaps,
        ("merge", merge.merge),  # W -> W' read from a merged buffer
        ("dce", drop_unused_attrs),
    ]


OPTIMIZE_PHASES: tuple[str, ...] = (  # optimization phases, in the order they run when selected
    "fuse",  # linear(x, W, b) + s * B(A(drop(x))) -> lora_linear(x, W, b, A, B, s, p, seed)
    "quantize",  # frozen W -> Q(W) stored; dequantized inside the op that reads it
    "recompute",  # activations saved for backward -> recomputed in backward from what is kept
    "shard",  # W -> all_gather(W_shard) before its block, freed after it
)


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
