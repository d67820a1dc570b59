"""The graphs a CompiledModel runs: one capture per call signature, and per signature the
rewritten graph for the current adapter state (built from a copy of the capture).

A captured graph accepts only the keywords it was captured with, hence one per signature
(the keyword set, each tensor's dtype and rank, which dims are 1). Rewritten graphs are a
function of the capture and the adapter state: ``invalidate`` drops them after any change of
which adapters run, and they are rebuilt on the next call. Capture, the slow part, is kept.

Capture is avoided twice (``reuse``): a call with ``labels`` runs the logits graph and the
model's own loss function outside it (``capture.outside_loss``), so calls with and without
labels share one capture; and a signature that differs from a captured one only by size-1 dims
(a last batch of 1, a decode step) runs that capture without export's shape guards — those
guards are 0/1 specialisations (``if batch != 1: expand``) that hold at size 1 too. Both are
checked once, on the call's own inputs, against the eager model (eval mode, no grad); where
they differ, peftc captures as before. ``stats`` counts captures, reuses and their times.
"""

from __future__ import annotations

import copy
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import fx, nn
from torch.utils._pytree import tree_flatten

from peftc.adapters import AdapterRegistry
from peftc.capture import LOSS_KEYS, drop_guards, outside_loss, preserved_modes, set_training
from peftc.passes import PassContext, Plan, build
from peftc.passes.pipeline import MASKS
from peftc.repeat_layers import REPEATED

__all__ = ["GraphCache", "CaptureStats", "signature", "MASKS"]


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


@dataclass
class CaptureStats:
    """What capture cost a CompiledModel (``cm.capture_stats``; a line of ``graph_summary()``)."""

    captures: int = 0  # torch.export / fx traces run
    seconds: float = 0.0  # their wall time, in total
    reused: int = 0  # call signatures served by another signature's capture (size-1 dims)
    check_seconds: float = 0.0  # the one-time eager checks of those reuses and of the outside loss
    loss_outside: bool | None = None  # None: no call with labels yet
    log: list[str] = field(default_factory=list)  # one line per capture, reuse or refused reuse

    def line(self) -> str:
        loss = {None: "", True: "; loss outside the graph (model.loss_function)",
                False: "; loss inside the graph (why: capture_stats.log)"}
        return (f"capture: {self.captures} graph(s) in {self.seconds:.2f} s, {self.reused} signature(s) reused"
                f" (checked against the eager model in {self.check_seconds:.2f} s){loss[self.loss_outside]}\n")


def _ones_free(sig: tuple) -> tuple:
    """A signature without its size-1 flags: signatures equal here differ only by size-1 dims."""
    return tuple((k, d[:3] if d[0] == "tensor" else d) for k, d in sig)


def _ones_subset(captured: tuple, wanted: tuple) -> bool:
    """Whether every size-1 dim of ``captured`` is size 1 in ``wanted`` too (a capture made at
    size 1 may have that 1 baked in; one made at size n > 1 is checked for size 1)."""
    return all(not (c and not w) for (_, dc), (_, dw) in zip(captured, wanted) if dc[0] == "tensor"
               for c, w in zip(dc[3], dw[3]))


def _differ(ref, out) -> str | None:
    """Why two outputs differ (structure, shape, value beyond a dtype-fit tolerance), or None."""
    ref_leaves, ref_spec = tree_flatten(ref)
    out_leaves, out_spec = tree_flatten(out)
    if ref_spec != out_spec:
        return f"output structure {out_spec} != eager {ref_spec}"
    for i, (a, b) in enumerate(zip(ref_leaves, out_leaves)):
        if isinstance(a, torch.Tensor) != isinstance(b, torch.Tensor):
            return f"output {i}: {type(b).__name__} != eager {type(a).__name__}"
        if not isinstance(a, torch.Tensor):
            continue
        if a.shape != b.shape or a.dtype != b.dtype:
            return f"output {i}: {tuple(b.shape)} {b.dtype} != eager {tuple(a.shape)} {a.dtype}"
        if a.is_meta or b.is_meta or not a.is_floating_point():
            if not (a.is_meta or b.is_meta) and not torch.equal(a, b):
                return f"output {i} differs"
            continue
        rtol, atol = (1e-4, 1e-5) if a.dtype in (torch.float32, torch.float64) else (2e-2, 1e-2)
        atol *= max(1.0, a.float().abs().max().item())  # logits near 0 among logits of 20: the sum's rounding
        if not torch.allclose(a.float(), b.float(), rtol=rtol, atol=atol, equal_nan=True):
            return f"output {i}: max abs diff {(a.float() - b.float()).abs().max().item():.3g}"
    return None


def _copies(kwargs: dict) -> dict:
    return {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}


def _on_meta(model: nn.Module) -> bool:
    return any(p.is_meta for p in model.parameters())


def _same(output):
    return output


def _describe(sig: tuple) -> str:
    """A signature for humans: ``input_ids (n, 1) int64, use_cache=False``."""
    parts = []
    for k, d in sig:
        if d[0] == "tensor":
            dims = ", ".join("1" if one else "n" for one in d[3])
            parts.append(f"{k} ({dims}) {str(d[1]).removeprefix('torch.')}")
        else:
            parts.append(f"{k}={d[2]}" if d[0] == "const" else f"{k}: {d[1]}")
    return ", ".join(parts)


def _copy_graph(graph: fx.Graph) -> fx.Graph:
    g = fx.Graph()
    out = g.graph_copy(graph, {})
    g.output(out)
    # pytree in/out specs of exported graphs: a new codegen (a pass may reassign its fields); the specs
    # are immutable and shared (deep-copying them rebuilds deprecated LeafSpec objects)
    g._codegen = codegen = copy.copy(graph._codegen)
    info = getattr(codegen, "pytree_info", None)
    if info is not None:
        codegen.pytree_info = info._replace(orig_args=list(info.orig_args))
    return g


class GraphCache:
    """Captured graphs by signature (and signatures reusing another's capture); rewritten graphs
    by (signature, mixed-batch adapters or None); the pass counts and timings of the example
    inputs' graph; what capture cost (``stats``)."""

    def __init__(self, adapters: AdapterRegistry, capture: Callable[..., fx.GraphModule], *, checks: bool = True,
                 name: str = "", reference: nn.Module | None = None):
        self.adapters, self.capture = adapters, capture
        self.name = name  # what its graphs are called in summaries ("decode step: ", ...)
        self.checks = checks  # False: no size-1 reuse, every new signature is captured
        self.reference = reference  # the eager module a capture is checked against (default: the model)
        self.captured: dict[tuple, fx.GraphModule] = {}  # as captured, never rewritten
        self.reuses: dict[tuple, tuple] = {}  # signature -> the captured signature it runs (size-1 dims)
        self.rewritten: dict[tuple, fx.GraphModule] = {}  # for the current adapter state
        self.example_key: tuple | None = None  # (signature, None) of the example inputs
        self.example_kwargs: dict | None = None  # those inputs: captured again after ``clear``
        self.counts, self.timings = Counter(), {}
        self.segment_mixed = True  # mixed batches: LoRA terms through peftc::lora_sgmv (passes/optimize/sgmv.py); False: masked
        self.stats = CaptureStats()
        self._finish = outside_loss(adapters.base_model)  # None: labels stay graph inputs

    def context(self, name: str, counts: Counter, timings: dict) -> PassContext:
        """The pass context for adapter ``name``."""
        state = self.adapters.state(name)
        return PassContext(spec=state.spec, targets=state.targets, model=self.adapters.base_model,
                           store=self.adapters.store, counts=counts, timings=timings)

    def copy_of_capture(self, key: tuple) -> fx.GraphModule:
        """A rewritable copy of the captured graph; parameters shared, module tree new. A reused
        signature's copy runs without the capture's shape guards."""
        source = self.reuses.get(key[0], key[0])
        captured = self.captured[source]
        gm = fx.GraphModule(captured, _copy_graph(captured.graph), class_name=type(captured).__name__)
        if source != key[0]:
            drop_guards(gm)
        return gm

    # ---- which capture a call runs -------------------------------------------------------
    def split_loss(self, kwargs: dict) -> tuple[dict, Callable]:
        """(the keywords the graph runs with, ``finish(output) -> output``): a call with
        ``labels`` leaves its loss keywords out of the graph and ``finish`` adds the model's
        own loss, once that was checked against the eager model; else (kwargs, identity)."""
        loss_kwargs = {k: kwargs[k] for k in LOSS_KEYS if k in kwargs}
        if "labels" in kwargs and self._finish is None and self.stats.loss_outside is None:
            self.stats.loss_outside = False
            self.stats.log.append(f"loss inside the graph: no outside rule for {type(self.adapters.base_model).__name__}"
                                  " (not an HF model with loss_function, or labels also build decoder inputs)")
        if (self._finish is None or "labels" not in kwargs or self.stats.loss_outside is False or self._widens()
                or kwargs.get("return_dict") is False):  # a tuple output has no .logits to read
            return kwargs, _same
        graph_kwargs = {k: v for k, v in kwargs.items() if k not in loss_kwargs}
        if self.stats.loss_outside is None:
            sig = self.resolve(graph_kwargs)
            why = self._check((sig, None), kwargs, graph_kwargs, lambda out: self._finish(out, loss_kwargs))
            self.stats.loss_outside = why is None
            self.stats.log.append("loss outside the graph" if why is None else f"loss inside the graph: {why}")
            if why is not None:
                return kwargs, _same
        return graph_kwargs, lambda out: self._finish(out, loss_kwargs)

    def _widens(self) -> bool:
        """Whether an adapter is prompt learning: its pass widens ``labels`` in the graph (P
        virtual positions of -100), so the loss must stay there."""
        return any(m.widens_labels for n in self.adapters.names for m in self.adapters.state(n).spec.methods)

    def resolve(self, kwargs: dict) -> tuple:
        """The signature of ``kwargs``, captured first unless an existing capture serves it."""
        sig = signature(kwargs)
        if sig in self.captured or sig in self.reuses:
            return sig
        for source in [s for s in self.captured if self.checks and _ones_free(s) == _ones_free(sig)
                       and _ones_subset(s, sig)]:
            self.reuses[sig] = source
            why = self._check((sig, None), kwargs, kwargs)
            if why is None:
                self.stats.reused += 1
                self.stats.log.append(f"reused a capture for size-1 dims: {_describe(sig)}")
                return sig
            del self.reuses[sig]
            self.stats.log.append(f"size-1 dims need their own capture ({why}): {_describe(sig)}")
        self._capture(sig, kwargs)
        repeated = self.captured[sig].meta.get(REPEATED)
        if repeated and not _on_meta(self.adapters.base_model):
            why = self._check((sig, None), kwargs, kwargs)
            if why is not None:  # the repeated layers differ from the model's own: capture all of them
                self.stats.log.append(f"repeating layer 2 of {repeated[0]} differs from the eager model ({why})")
                self._capture(sig, kwargs, repeat_layers=False)
        return sig

    def _capture(self, sig: tuple, kwargs: dict, **options) -> None:
        start = time.perf_counter()
        self.captured[sig] = gm = self.capture(kwargs, **options)
        seconds = time.perf_counter() - start
        self.stats.captures += 1
        self.stats.seconds += seconds
        how = f" ({gm.meta[REPEATED][1]} layers from 3 traced)" if REPEATED in gm.meta else ""
        self.stats.log.append(f"captured in {seconds:.2f} s{how}: {_describe(sig)}")

    @torch.compiler.disable
    def _check(self, key: tuple, kwargs: dict, graph_kwargs: dict, finish: Callable | None = None) -> str | None:
        """Why the base graph of ``key`` (no adapters, eval mode; ``finish`` applied to its
        output) differs from the eager model on ``kwargs``, or None: the once-per-signature
        price of not capturing again. Dropout is off in both, so no random numbers are drawn; each
        runs on its own copy of the tensors (a step graph writes its KV cache in place)."""
        start = time.perf_counter()
        model = self.reference if self.reference is not None else self.adapters.base_model
        gm = self.copy_of_capture(key)
        set_training(gm, False)
        try:
            with preserved_modes(model), torch.no_grad():
                model.eval()
                ref = model(**_copies(kwargs))
                out = gm(**_copies(graph_kwargs))
                out = finish(out) if finish is not None else out
            return _differ(ref, out)
        except Exception as e:  # the reuse does not run at these shapes: capture instead
            return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        finally:
            self.stats.check_seconds += time.perf_counter() - start

    def graph_for(self, kwargs: dict, mixed: tuple[str, ...] | None, training: bool) -> fx.GraphModule:
        """The graph to run ``kwargs`` on, capturing first for a new signature."""
        sig = self.resolve(kwargs)
        if self.example_key is None:
            self.example_key = (sig, None)
            self.example_kwargs = self.example_kwargs or kwargs
        return self.rewritten_graph((sig, mixed), training)

    def example_graph(self, training: bool) -> fx.GraphModule:
        """The rewritten graph of the example inputs (captured again first after ``clear``)."""
        if self.example_key is None and self.example_kwargs is not None:
            return self.graph_for(self.example_kwargs, None, training)
        return self.rewritten_graph(self.example_key, training)

    def plan(self, mixed: tuple[str, ...] | None, counts: Counter, timings: dict, *, optimize: bool = True,
             name: str = "graph") -> Plan:
        """What the pipeline builds for the current adapter state: the running adapters (or the
        mixed batch's), merged or not, with the model-level optimizations unless ``optimize`` is False."""
        names = mixed if mixed is not None else self.adapters.running
        base = self.context(self.adapters.primary, counts, timings)
        base.graph_name = name
        return Plan(adapters=[self.context(n, counts, timings) for n in names], base=base,
                    merged=self.adapters.merged, mixed=mixed is not None, lower_mixed=self.segment_mixed,
                    optimize=self.adapters.optimize if optimize else {})

    def rewritten_graph(self, key: tuple, training: bool) -> fx.GraphModule:
        """The rewritten graph for (captured signature, mixed-batch adapters or None), built by
        the pipeline for the current adapter state."""
        if key not in self.rewritten:
            counts, timings = Counter(), {}
            name = self.name + _describe(key[0]) + (f" [mixed: {', '.join(key[1])}]" if key[1] else "")
            gm = build(self.copy_of_capture(key), self.plan(key[1], counts, timings, name=name))
            set_training(gm, training)
            self.rewritten[key] = gm
            if key == self.example_key:
                self.counts, self.timings = counts, timings
        return self.rewritten[key]

    def unoptimized(self, kwargs: dict, training: bool) -> fx.GraphModule:
        """A fresh graph for ``kwargs`` with the running adapters' rewrites but no optimization
        passes: the reference an optimization is measured or checked against (not cached)."""
        key = (self.resolve(kwargs), None)
        gm = build(self.copy_of_capture(key), self.plan(None, Counter(), {}, optimize=False))
        set_training(gm, training)
        return gm

    def invalidate(self) -> None:
        """Drops the rewritten graphs (the adapter state changed); captures stay."""
        self.rewritten.clear()

    def clear(self, device=None) -> None:
        """Drops every graph, captures too (they bake device and dtype into factory ops); the
        example inputs move to ``device`` for the next capture."""
        self.example_key = None
        if self.example_kwargs is not None and device is not None:
            self.example_kwargs = {k: v.to(device) if isinstance(v, torch.Tensor) else v
                                   for k, v in self.example_kwargs.items()}
        self.captured.clear()
        self.reuses.clear()
        self.rewritten.clear()

    def all_graphs(self) -> list[fx.GraphModule]:
        return [*self.captured.values(), *self.rewritten.values()]
