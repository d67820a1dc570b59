"""The graphs a CompiledModel runs: one capture per call signature, and per signature the
rewritten graph for the current adapter state (built from a copy of the capture).

A captured graph accepts only the keywords it was captured with, hence one per signature
(the keyword set, each tensor's dtype and rank, which dims are 1). Rewritten graphs are a
function of the capture and the adapter state: ``invalidate`` drops them after any change of
which adapters run, and they are rebuilt on the next call. Capture, the slow part, is kept.
"""

from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Callable

import torch
from torch import fx, nn

from peftc.adapters import AdapterRegistry
from peftc.capture import set_training
from peftc.graph import install_module
from peftc.passes import PassContext, optimize_passes, rewrite_passes, run_pipeline
from peftc.passes.pipeline import merge_passes
from peftc.passes.sgmv import segment

__all__ = ["GraphCache", "signature", "MASKS"]

MASKS = "_peftc_sample_masks"  # per-adapter (batch,) masks a mixed-batch graph reads


def signature(kwargs: dict) -> tuple:
    """What a captured graph is specific to: keywords, tensor dtypes and ranks, size-1 dims,
    and the values of plain constants."""
    def desc(v):
        if isinstance(v, torch.Tensor):
            return ("tensor", v.dtype, v.dim(), tuple(s == 1 for s in v.shape))
        if isinstance(v, (bool, int, float, str)):
            return ("const", type(v).__name__, v)
        return ("object", type(v).__name__)
    return tuple(sorted((k, desc(v)) for k, v in kwargs.items()))


def _copy_graph(graph: fx.Graph) -> fx.Graph:
    g = fx.Graph()
    out = g.graph_copy(graph, {})
    g.output(out)
    g._codegen = copy.deepcopy(graph._codegen)  # pytree in/out specs of exported graphs
    return g


class GraphCache:
    """Captured graphs by signature; rewritten graphs by (signature, mixed-batch adapters or
    None); the pass counts and timings of the example inputs' graph."""

    def __init__(self, adapters: AdapterRegistry, capture: Callable[[dict], fx.GraphModule]):
        self.adapters, self.capture = adapters, capture
        self.captured: dict[tuple, fx.GraphModule] = {}  # as captured, never rewritten
        self.rewritten: dict[tuple, fx.GraphModule] = {}  # for the current adapter state
        self.example_key: tuple | None = None  # (signature, None) of the example inputs
        self.counts, self.timings = Counter(), {}
        self.segment_mixed = True  # mixed batches: LoRA terms through peftc::lora_sgmv (passes/sgmv.py); False: masked

    def context(self, name: str, counts: Counter, timings: dict) -> PassContext:
        """The pass context for adapter ``name``."""
        state = self.adapters.state(name)
        return PassContext(spec=state.spec, targets=state.targets, model=self.adapters.base_model,
                           store=self.adapters.store, counts=counts, timings=timings)

    def copy_of_capture(self, key: tuple) -> fx.GraphModule:
        """A rewritable copy of the captured graph; parameters shared, module tree new."""
        captured = self.captured[key[0]]
        return fx.GraphModule(captured, _copy_graph(captured.graph), class_name=type(captured).__name__)

    def graph_for(self, kwargs: dict, mixed: tuple[str, ...] | None, training: bool) -> fx.GraphModule:
        """The graph to run ``kwargs`` on, capturing first for a new signature."""
        sig = signature(kwargs)
        if sig not in self.captured:
            self.captured[sig] = self.capture(kwargs)
        if self.example_key is None:
            self.example_key = (sig, None)
        return self.rewritten_graph((sig, mixed), training)

    def rewritten_graph(self, key: tuple, training: bool) -> fx.GraphModule:
        """The rewritten graph for (captured signature, mixed-batch adapters or None), (re)built
        for the current adapter state."""
        if key not in self.rewritten:
            adapters = self.adapters
            gm = self.copy_of_capture(key)
            counts, timings = Counter(), {}
            mixed = key[1]
            if mixed is not None:
                install_module(gm, MASKS, nn.Module())
            for name in mixed if mixed is not None else adapters.running:
                spec = adapters.state(name).spec
                passes = merge_passes(spec) if adapters.merged else rewrite_passes(spec)
                ctx = self.context(name, counts, timings)
                if mixed is not None:
                    gm.get_submodule(MASKS).register_buffer(name, torch.ones(1), persistent=False)
                    ctx.sample_mask = f"{MASKS}.{name}"
                gm = run_pipeline(gm, ctx, passes)
            if mixed and self.segment_mixed and not adapters.merged:  # one op per linear, rows by adapter
                gm = run_pipeline(gm, ctx, [("sgmv", segment)])
            names = mixed if mixed is not None else adapters.running
            if names and not adapters.merged:  # optimizations see every adapter's nodes at once
                gm = run_pipeline(gm, self.context(names[0], counts, timings),
                                  optimize_passes(adapters.state(names[0]).spec))
            elif base_passes := optimize_passes(adapters.state(adapters.primary).spec, base_only=True):
                # no adapter nodes: what transforms the base itself still applies (a quantized base)
                gm = run_pipeline(gm, self.context(adapters.primary, counts, timings), base_passes)
            set_training(gm, training)
            self.rewritten[key] = gm
            if key == self.example_key:
                self.counts, self.timings = counts, timings
        return self.rewritten[key]

    def unoptimized(self, kwargs: dict, training: bool) -> fx.GraphModule:
        """A fresh graph for ``kwargs`` with the running adapters' rewrites but no optimization
        passes: the reference an optimization is measured or checked against (not cached)."""
        sig = signature(kwargs)
        if sig not in self.captured:
            self.captured[sig] = self.capture(kwargs)
        gm = self.copy_of_capture((sig, None))
        for name in self.adapters.running:
            spec = self.adapters.state(name).spec
            passes = merge_passes(spec) if self.adapters.merged else rewrite_passes(spec)
            gm = run_pipeline(gm, self.context(name, Counter(), {}), passes)
        set_training(gm, training)
        return gm

    def invalidate(self) -> None:
        """Drops the rewritten graphs (the adapter state changed); captures stay."""
        self.rewritten.clear()

    def clear(self) -> None:
        """Drops every graph, captures too (they bake device and dtype into factory ops)."""
        self.captured.clear()
        self.rewritten.clear()

    def all_graphs(self) -> list[fx.GraphModule]:
        return [*self.captured.values(), *self.rewritten.values()]
