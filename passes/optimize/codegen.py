"""Code generation, the last phase: each rewritten graph runs as TorchInductor-generated code.

    gm(x)  ->  inductor(gm)(x)           forward and backward (AOTAutograd) as generated kernels
    regional:  gm = pre; layer_0; ...; layer_{N-1}; post  ->  pre; R(layer_0); R(layer_1) ... ; post
               with R compiled once per distinct layer structure (passes/optimize/regions.py)

``optimize: {compile: {mode, dynamic, regional}}`` (or ``optimize: [fuse, compile]``). The graph
itself is unchanged, so ``graph_summary()``, ``graph_diff()`` and drawing show what runs; its
``forward`` becomes a ``Codegen`` that lowers the current graph on its first call (compiling
is lazy: inductor needs real inputs) and again when the graph changes (``train()``/``eval()``
flip dropout nodes; each form is kept). The training graph, and the prefill and decode graphs
of ``cm.generate``, all come through the pipeline and so through this phase.

Never silent: a graph inductor cannot compile runs interpreted and ``graph_summary()`` names
the graph and the reason; each graph's compile time, the number of graphs inductor compiled and
dynamo's graph breaks are summary lines too (the ``summary`` hook reads every graph's record).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import fx

from peftc.errors import SpecError
from peftc.passes.context import PassContext, PassResult
from peftc.passes.optimize.codegen_cache import load_artifacts, save_artifacts
from peftc.passes.optimize.regions import split
from peftc.passes.pipeline import register_optimization
from peftc.repeat_layers import layer_list

__all__ = ["Codegen", "codegen", "check_settings", "MODES", "LOG"]

MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
LOG = "_peftc_codegen_log"  # attribute of the adapter store (shared by every graph of a model)
COMPILE_ERRORS = (torch._dynamo.exc.TorchDynamoException, torch._inductor.exc.InductorError,
                  torch._dynamo.exc.BackendCompilerFailed)


def check_settings(settings: dict) -> None:
    allowed = {"mode", "dynamic", "regional", "fullgraph"}
    unknown = set(settings) - allowed
    if unknown:
        raise SpecError("optimize.compile", sorted(unknown), f"settings among {sorted(allowed)}")
    settings.setdefault("mode", "default")
    settings.setdefault("dynamic", None)
    settings.setdefault("regional", "auto")
    settings.setdefault("fullgraph", False)
    if settings["mode"] not in MODES:
        raise SpecError("optimize.compile.mode", settings["mode"], f"one of {list(MODES)} (inductor's modes)")
    if settings["dynamic"] not in (None, True, False):
        raise SpecError("optimize.compile.dynamic", settings["dynamic"], "true, false or null (torch's default)")
    if settings["regional"] not in ("auto", True, False):
        raise SpecError("optimize.compile.regional", settings["regional"],
                        "auto (compile one layer per distinct structure when the model has a layer list), true, false")
    if not isinstance(settings["fullgraph"], bool):
        raise SpecError("optimize.compile.fullgraph", settings["fullgraph"], "true or false")


@dataclass
class CodegenLog:
    """Every compiled graph's lines, by graph name (the ``summary`` hook prints them)."""

    lines: dict[str, str] = field(default_factory=dict)

    def text(self) -> str:
        return "".join(f"{line}\n" for line in self.lines.values())


class _Backend:
    """inductor with ``mode``'s settings, counting the graphs it compiles and their seconds."""

    def __init__(self, mode: str, dynamic):
        self.options = torch._inductor.list_mode_options(mode, dynamic)
        self.graphs = 0

    def __call__(self, gm: fx.GraphModule, example_inputs):
        from torch._inductor.compile_fx import compile_fx

        self.graphs += 1
        return compile_fx(gm, example_inputs, config_patches=self.options)


@dataclass
class _Form:
    """One form of the graph (its generated Python code), lowered."""

    run: object  # callable(*args, **kwargs)
    how: str  # "whole graph" or "regional: ..."
    backend: _Backend
    seconds: float | None = None  # first call (compile + run); None: not called yet
    failed: str | None = None


class Codegen:
    """``gm.forward`` once the ``compile`` phase ran: runs the current graph through inductor,
    or interpreted where inductor refused it."""

    def __init__(self, gm: fx.GraphModule, settings: dict, layers: str | None, name: str, log: CodegenLog):
        self.gm, self.settings, self.layers, self.name, self.log = gm, settings, layers, name, log
        self._code = None
        self._forms: dict[str, _Form] = {}
        self._form: _Form | None = None

    def _lower(self) -> _Form:
        s = self.settings
        backend = _Backend(s["mode"], s["dynamic"])

        def compiled(module):
            return torch.compile(module, backend=backend, dynamic=s["dynamic"], fullgraph=s["fullgraph"])

        why = "regional: false"
        if s["regional"] is not False:
            regional, why = split(self.gm, self.layers, compiled)
            if regional is not None:
                how = f"regional: {len(regional.templates)} compiled layer(s) run {regional.layers} layers"
                return _Form(regional.outer, how, backend)
        forward = type(self.gm).forward.__get__(self.gm)
        how = "whole graph" + (f" (not regional: {why})" if s["regional"] is not False else "")
        return _Form(compiled(forward), how, backend)

    def __call__(self, *args, **kwargs):
        interpreted = type(self.gm).forward
        if interpreted is not self._code:  # first call, or the graph changed (train/eval)
            self._code = interpreted
            key = self.gm.code
            self._form = self._forms.get(key) or self._forms.setdefault(key, self._lower())
        form = self._form
        if form.failed is not None:
            return interpreted(self.gm, *args, **kwargs)
        if form.seconds is not None:
            return form.run(*args, **kwargs)
        counters = torch._dynamo.utils.counters
        breaks = dict(counters["graph_break"])  # reason -> times seen
        hits = counters["inductor"]["fxgraph_cache_hit"] + counters["aot_autograd"]["autograd_cache_hit"]
        start = time.perf_counter()
        try:
            out = form.run(*args, **kwargs)
        except COMPILE_ERRORS as e:
            out = interpreted(self.gm, *args, **kwargs)  # a user's error raises here, as uncompiled
            reason = str(e).strip().splitlines()[0] if str(e).strip() else ""
            form.failed = f"{type(e).__name__}: {reason[:300]}"
            self.log.lines[self.name] = f"compile: {self.name}: runs interpreted, inductor refused it ({form.failed})"
            return out
        form.seconds = time.perf_counter() - start
        breaks = sum(1 for why, n in counters["graph_break"].items() if n > breaks.get(why, 0))
        hits = counters["inductor"]["fxgraph_cache_hit"] + counters["aot_autograd"]["autograd_cache_hit"] - hits
        self.log.lines[self.name] = (f"compile: {self.name}: {form.how}; {form.backend.graphs} graph(s) compiled by "
                                     f"inductor in {form.seconds:.1f} s (first call; {hits} from the cache), {breaks} graph break(s)"
                                     + (" (TORCH_LOGS=graph_breaks says where)" if breaks else ""))
        return out

    @property
    def failed(self) -> str | None:
        return self._form.failed if self._form is not None else None


def codegen(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    """Pre: the rewritten, optimized graph. Post: ``gm.forward`` is a ``Codegen`` of it."""
    cov = ctx.coverage("compile", "graphs")
    log = getattr(ctx.store, LOG, None)
    if log is None:
        log = CodegenLog()
        setattr(ctx.store, LOG, log)  # a plain attribute: not a module, parameter or buffer
    runner = Codegen(gm, ctx.spec.optimize["compile"], layer_list(ctx.model, min_layers=2), ctx.graph_name, log)
    gm.forward = runner  # instance attribute: nn.Module.__call__ runs it; the class keeps the graph's code
    cov.hit()
    ctx.counts["compile"] += 1
    return PassResult(gm, True)


def summary(cm) -> str:
    log = getattr(cm.adapters, LOG, None)
    return log.text() if log is not None else "compile: no graph has run yet (inductor compiles on the first call)\n"


register_optimization("compile", phase="codegen", check=check_settings, on_base=True, summary=summary,
                      save_artifacts=save_artifacts, load_artifacts=load_artifacts)(codegen)
