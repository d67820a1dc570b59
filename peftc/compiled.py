"""``peftc.compile``: spec + model -> CompiledModel, an nn.Module that runs rewritten graphs.

A graph is captured per call signature (the set of keyword arguments, and which dims are 1),
because an exported graph only accepts the keywords it was captured with. All graphs share
the base model's parameters and one store of adapter modules (``cm.adapters``), so training
through any of them updates the same adapter.

``train()``/``eval()`` switch dropout like the eager model: graphs are captured in train mode
and ``capture.set_training`` flips every dropout (base and adapter) in them.
"""

from __future__ import annotations

import copy
import inspect
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import fx, nn

from peftc import peft_io, targets
from peftc.capture import capture, set_training
from peftc.errors import CheckpointError, SpecError
from peftc.graph import install_module
from peftc.passes import PassContext, merge, optimize_passes, rewrite_passes, run_pipeline
from peftc.passes.pipeline import merge_passes
from peftc.resolve import resolve_all, with_implied_heads
from peftc.spec import METHODS, Spec

__all__ = ["CompiledModel", "AdapterState", "compile", "from_peft"]

MASKS = "_peftc_sample_masks"  # per-adapter (batch,) masks a mixed-batch graph reads


def compile(model: nn.Module, spec, example_inputs: dict, *, optimize=None,
            frontend: str = "auto") -> CompiledModel:
    """Captures ``model`` on ``example_inputs`` and rewrites it as ``spec`` says.

    Example::

        cm = peftc.compile(model, spec, example_inputs={"input_ids": ids, "use_cache": False})
        cm(input_ids=ids, labels=ids).loss.backward()
    """
    spec = Spec.coerce(spec)
    if optimize is not None:
        spec = spec.replace(optimize=optimize)
    if not isinstance(model, nn.Module):
        raise SpecError("model", type(model).__name__, "a torch.nn.Module")
    if not isinstance(example_inputs, dict) or not example_inputs or not all(isinstance(k, str) for k in example_inputs):
        raise SpecError("example_inputs", example_inputs, "a non-empty dict of keyword -> value")
    task = spec.task_type or targets.infer_task_type(model)
    spec = with_implied_heads(spec.replace(task_type=task), model)
    resolved = resolve_all(spec, model)
    spec, note = _keep_gradient_checkpointing(model, spec)
    cm = CompiledModel(model, spec, resolved, example_inputs, frontend=frontend)
    cm._memory_notes = [note] if note else []
    return cm


def _keep_gradient_checkpointing(model: nn.Module, spec: Spec) -> tuple[Spec, str | None]:
    """HF ``gradient_checkpointing_enable()`` is inlined away by capture: it becomes
    ``recompute: {policy: blocks}`` unless the spec chose a recompute policy itself."""
    if not getattr(model, "is_gradient_checkpointing", False):
        return spec, None
    if "recompute" in spec.optimize:
        return spec, (f"the model had gradient_checkpointing_enable(); the spec's recompute "
                      f"{spec.optimize['recompute']} applies instead")
    return (spec.replace(optimize={**spec.optimize, "recompute": {"policy": "blocks"}}),
            "recompute (blocks) because the model had gradient_checkpointing_enable()")


@dataclass
class AdapterState:
    """One named adapter: its spec, the module paths each entry resolved to, trainability."""

    spec: Spec
    targets: list[dict[str, str]]
    trainable: bool = True


class CompiledModel(nn.Module):
    """The base model with adapters inserted into its captured graph(s).

    Graphs are a function of the captured graph and the adapter state: every change of
    which adapters are active (or merged) drops the rewritten graphs, and they are rebuilt
    from the pristine capture on the next call. Capture (the slow part) happens once per
    call signature.
    """

    def __init__(self, model: nn.Module, spec: Spec, resolved: list[dict[str, str]],
                 example_inputs: dict, *, frontend: str = "auto"):
        super().__init__()
        self.base_model = model
        self.adapters = nn.Module()  # every adapter's modules, at <module>.<kind>.<adapter>
        self.frontend = self.frontend_used = frontend
        self._states: dict[str, AdapterState] = {spec.adapter: AdapterState(spec, resolved)}
        self._active: list[str] = [spec.adapter]
        self._enabled = True
        self._merged = False
        self._pristine: dict = {}  # signature -> GraphModule as captured (never rewritten)
        self._graphs: dict = {}  # signature -> rewritten GraphModule for the current state
        self._counts, self._timings = Counter(), {}
        self._params = [n for n, p in inspect.signature(model.forward).parameters.items()
                        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        for p in model.parameters():
            p.requires_grad_(False)
        self.training = model.training
        example = self._normalize((), dict(example_inputs))
        self._first = (self._signature(example), None)
        self._graph_for(example)
        self._refresh_trainable()
        nn.Module.train(self, self.training)

    # ---- adapters ------------------------------------------------------------------------
    @property
    def spec(self) -> Spec:
        """The spec of the first active adapter (or of the first added one)."""
        return self._states[self._primary()].spec

    @property
    def targets(self) -> list[dict[str, str]]:
        return self._states[self._primary()].targets

    def _primary(self) -> str:
        return self._active[0] if self._active else next(iter(self._states))

    @property
    def adapter_names(self) -> list[str]:
        return list(self._states)

    @property
    def active_adapters(self) -> list[str]:
        return list(self._active) if self._enabled else []

    def add_adapter(self, spec, *, name: str | None = None, activate: bool = False) -> None:
        """Adds another named adapter (its own spec); its parameters are created at once."""
        spec = Spec.coerce(spec)
        if name is not None:
            spec = spec.replace(adapter=name)
        if spec.adapter in self._states:
            raise SpecError("adapter", spec.adapter, f"a name not in use (taken: {self.adapter_names})")
        spec = with_implied_heads(spec.replace(task_type=spec.task_type or self.spec.task_type), self.base_model)
        self._states[spec.adapter] = AdapterState(spec, resolve_all(spec, self.base_model))
        scratch = self._fresh(self._first)  # a throwaway rewrite creates the adapter's modules
        run_pipeline(scratch, self._ctx(spec.adapter, Counter(), {}), rewrite_passes(spec))
        if activate:
            self.set_adapter(self._active + [spec.adapter])
        self._refresh_trainable()

    def set_adapter(self, names) -> None:
        """Activates one adapter or several (LoRA deltas add, IA3 scales multiply, as PEFT)."""
        names = [names] if isinstance(names, str) else list(names)
        unknown = [n for n in names if n not in self._states]
        if unknown or not names:
            raise SpecError("adapter", unknown or names, f"names of added adapters {self.adapter_names}")
        self._active, self._enabled = names, True
        self._invalidate()

    def disable_adapters(self) -> None:
        """Runs the base model's captured graph as is (``enable_adapters`` undoes it)."""
        self._enabled = False
        self._invalidate()

    def enable_adapters(self) -> None:
        self._enabled = True
        self._invalidate()

    def delete_adapter(self, name: str) -> None:
        if name not in self._states:
            raise SpecError("adapter", name, f"one of {self.adapter_names}")
        if len(self._states) == 1:
            raise SpecError("adapter", name, "another adapter (the last one cannot be deleted)")
        del self._states[name]
        self._active = [n for n in self._active if n != name] or [next(iter(self._states))]
        for path, _ in [(p, m) for p, m in self.adapters.named_modules() if p.endswith(f".{name}")]:
            parent, _, leaf = path.rpartition(".")
            if parent.rpartition(".")[2] in {m.store_dir for m in METHODS.values()}:
                delattr(self.adapters.get_submodule(parent), leaf)
        self._invalidate()

    def _invalidate(self) -> None:
        self._graphs.clear()
        self._refresh_trainable()

    def _refresh_trainable(self) -> None:
        """Only active, trainable adapters train (PEFT's set_adapter); base stays frozen."""
        for name, state in self._states.items():
            on = state.trainable and self._enabled and name in self._active and not self._merged
            for _, p in self._adapter_params(name):
                p.requires_grad_(on)
            for key, p in peft_io.bias_keys(self, name).items():
                p.requires_grad_(on and ".original_module." not in key)  # PEFT saves, but freezes, those

    def _adapter_params(self, name: str) -> list[tuple[str, nn.Parameter]]:
        dirs = {m.store_dir for m in METHODS.values()}
        return [(n, p) for n, p in self.adapters.named_parameters()
                if any(f".{d}.{name}." in f".{n}" for d in dirs)]

    # ---- running -------------------------------------------------------------------------
    def _normalize(self, args: tuple, kwargs: dict) -> dict:
        if args:
            names = self._params
            if len(args) > len(names):
                raise TypeError(f"too many positional arguments ({len(args)})")
            for n, a in zip(names, args):
                if n in kwargs:
                    raise TypeError(f"got multiple values for argument {n!r}")
                kwargs[n] = a
        kwargs = {k: v for k, v in kwargs.items() if v is not None}
        if "use_cache" in self._params and "use_cache" not in kwargs:
            kwargs["use_cache"] = False  # a captured graph cannot return a KV cache object
        return kwargs

    @staticmethod
    def _signature(kwargs: dict) -> tuple:
        def desc(v):
            if isinstance(v, torch.Tensor):
                return ("tensor", v.dtype, v.dim(), tuple(s == 1 for s in v.shape))
            if isinstance(v, (bool, int, float, str)):
                return ("const", type(v).__name__, v)
            return ("object", type(v).__name__)
        return tuple(sorted((k, desc(v)) for k, v in kwargs.items()))

    def _ctx(self, name: str, counts: Counter, timings: dict) -> PassContext:
        state = self._states[name]
        return PassContext(spec=state.spec, targets=state.targets, model=self.base_model,
                           store=self.adapters, counts=counts, timings=timings)

    def _fresh(self, key) -> fx.GraphModule:
        """A rewritable copy of the captured graph; parameters shared, module tree new."""
        pristine = self._pristine[key[0]]
        return fx.GraphModule(pristine, _copy_graph(pristine.graph), class_name=type(pristine).__name__)

    def _graph_for(self, kwargs: dict, mixed: tuple[str, ...] | None = None) -> fx.GraphModule:
        sig = self._signature(kwargs)
        if sig not in self._pristine:
            # torch.export cannot run inside a torch.compile trace: capture eagerly (one graph break)
            capture_now = torch.compiler.disable(capture)
            self._pristine[sig], self.frontend_used = capture_now(self.base_model, kwargs, frontend=self.frontend)
        return self._built((sig, mixed))

    def _built(self, key) -> fx.GraphModule:
        """The rewritten graph for (captured signature, mixed-batch adapters or None), (re)built
        for the current adapter state."""
        if key not in self._graphs:
            gm = self._fresh(key)
            counts, timings = Counter(), {}
            mixed = key[1]
            if mixed is not None:
                install_module(gm, MASKS, nn.Module())
            for name in mixed if mixed is not None else self._active if self._enabled else ():
                spec = self._states[name].spec
                passes = merge_passes(spec) if self._merged else rewrite_passes(spec)
                ctx = self._ctx(name, counts, timings)
                if mixed is not None:
                    gm.get_submodule(MASKS).register_buffer(name, torch.ones(1), persistent=False)
                    ctx.sample_mask = f"{MASKS}.{name}"
                gm = run_pipeline(gm, ctx, passes)
            names = mixed if mixed is not None else self._active if self._enabled else ()
            if names and not self._merged:  # optimizations see every adapter's nodes at once
                gm = run_pipeline(gm, self._ctx(names[0], counts, timings),
                                  optimize_passes(self._states[names[0]].spec))
            set_training(gm, self.training)
            self._graphs[key] = gm
            if key == self._first:
                self._counts, self._timings = counts, timings
        return self._graphs[key]

    def forward(self, *args, adapter_names: list[str] | None = None, **kwargs):
        """Runs the model; ``adapter_names`` (one per sample, "__base__" for none) mixes
        LoRA-family adapters within a batch, in training too."""
        kwargs = self._normalize(args, kwargs)
        if adapter_names is None:
            return self._graph_for(kwargs)(**kwargs)
        names = list(adapter_names)
        batch = next((v.shape[0] for v in kwargs.values() if isinstance(v, torch.Tensor) and v.dim()), None)
        if batch != len(names):
            raise SpecError("adapter_names", names, f"one name per sample ({batch} samples)")
        unknown = sorted(set(names) - set(self._states) - {"__base__"})
        if unknown:
            raise SpecError("adapter_names", unknown, f"names of added adapters {self.adapter_names} or '__base__'")
        if self._merged:
            raise SpecError("adapter_names", names, "nothing while adapters are merged (unmerge first)")
        used = tuple(sorted(set(names) - {"__base__"}))
        gm = self._graph_for(kwargs, mixed=used)
        device = next(iter(self.base_model.parameters())).device
        for n in used:
            mask = torch.tensor([name == n for name in names], dtype=torch.float32, device=device)
            gm.get_submodule(MASKS).register_buffer(n, mask, persistent=False)
        return gm(**kwargs)

    def train(self, mode: bool = True) -> CompiledModel:
        nn.Module.train(self, mode)
        for gm in self._graphs.values():
            set_training(gm, mode)
        return self

    def _apply(self, fn, recurse=True):
        kind = lambda: next(((p.device, p.dtype) for p in self.base_model.parameters()), None)
        before = kind()
        super()._apply(fn, recurse)
        if kind() != before:  # exported graphs bake device and dtype into factory ops: re-capture there
            self._pristine.clear()
            self._graphs.clear()
        for gm in [*self._pristine.values(), *self._graphs.values()]:
            gm._apply(fn)  # buffers the graphs hold (rotary tables); parameters are shared
        return self

    # ---- memory --------------------------------------------------------------------------
    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None) -> None:
        """HF's switch: recompute per transformer block (``optimize: {recompute: {policy: blocks}}``);
        the graphs are rebuilt on the next call. Checkpointing is always non-reentrant."""
        self._set_recompute({"policy": "blocks"})
        self._memory_notes = ["recompute (blocks) because of cm.gradient_checkpointing_enable()"]

    def gradient_checkpointing_disable(self) -> None:
        """Drops the recompute optimization; the graphs are rebuilt without it."""
        self._set_recompute(None)
        self._memory_notes = []

    @property
    def is_gradient_checkpointing(self) -> bool:
        return self.spec.optimize.get("recompute", {}).get("policy") == "blocks"

    def _set_recompute(self, settings: dict | None) -> None:
        for state in self._states.values():
            opt = {k: v for k, v in state.spec.optimize.items() if k != "recompute"}
            state.spec = state.spec.replace(optimize={**opt, "recompute": settings} if settings else opt)
        self._invalidate()

    # ---- merging -------------------------------------------------------------------------
    def merge(self) -> None:
        """Folds the active adapters into the weights the graph reads: no adapter nodes
        remain. The base model's own parameters are not modified; ``unmerge`` undoes it."""
        self._merged = True
        self._invalidate()

    def unmerge(self) -> None:
        self._merged = False
        self._invalidate()

    def merged_state_dict(self) -> dict[str, torch.Tensor]:
        """The base model's state dict with the active adapters folded in."""
        return merge.merged_state_dict(self)

    def save_merged(self, path: str | os.PathLike) -> None:
        """A plain HF model dir (``save_pretrained``) with the adapters folded in."""
        merge.save_merged(self, path)

    # ---- parameters and checkpoints ------------------------------------------------------
    def _peft_params(self, adapter: str | None = None) -> dict[str, nn.Parameter]:
        """Every tensor of an adapter's PEFT checkpoint, by key, as the live parameter."""
        return peft_io.peft_params(self, adapter or self._primary())

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def num_trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.trainable_parameters())

    def adapter_state_dict(self, adapter: str | None = None) -> dict[str, torch.Tensor]:
        """An adapter in PEFT's checkpoint format (``get_peft_model_state_dict``'s keys)."""
        return {k: v.detach() for k, v in self._peft_params(adapter).items()}

    def load_adapter_state_dict(self, sd: dict[str, torch.Tensor], *, adapter: str | None = None,
                                source: str = "state dict") -> None:
        """Strict load; missing, unexpected or mis-shaped keys raise CheckpointError."""
        params = self._peft_params(adapter)
        peft_io.check_loadable(params, sd, source)
        computed = [k for k, p in params.items() if not p.is_leaf]
        if computed:
            raise CheckpointError(f"{computed} are computed by this adapter (e.g. a P-tuning encoder's output) "
                                  "and cannot be loaded into it; load the checkpoint with peftc.from_peft")
        with torch.no_grad():
            for k, p in params.items():
                p.copy_(sd[k].to(p.dtype))

    def peft_config(self, adapter: str | None = None) -> dict:
        """An adapter as an HF PEFT config dict (one PEFT method + modules trained whole)."""
        return peft_io.peft_config(self, adapter or self._primary())

    def save_adapter(self, path: str | os.PathLike, adapter: str | None = None):
        """Writes adapter_config.json + adapter_model.safetensors, loadable by ``peft``.

        With several adapters and none named, saves all in PEFT's layout: "default" (or
        the first) at ``path``, the others at ``path/<name>``.
        """
        names = [adapter] if adapter else self.adapter_names
        root = "default" if "default" in names else names[0]
        configs = {n: self.peft_config(n) for n in names}  # fails before anything is written
        for n in names:
            peft_io.write_adapter(Path(path) if n == root else Path(path) / n, configs[n],
                                  self.adapter_state_dict(n))
        return Path(path)

    def load_adapter(self, path, name: str, *, trainable: bool = False, activate: bool = False,
                     allow_pickle: bool = False) -> None:
        """Adds a PEFT-saved adapter under ``name`` (PEFT's ``load_adapter``)."""
        spec = Spec.from_peft(path).replace(adapter=name)
        weights = peft_io.read_peft_weights(path, allow_pickle=allow_pickle)
        self.add_adapter(spec, activate=activate)
        self.load_adapter_state_dict(weights, adapter=name, source=str(path))
        self._states[name].trainable = trainable
        self._refresh_trainable()

    # ---- inspection ----------------------------------------------------------------------
    @property
    def graph_module(self) -> fx.GraphModule:
        """The rewritten graph for the example inputs' signature."""
        return self._built(self._first)

    @property
    def captured_graph(self) -> fx.Graph:
        """The graph as captured, before any pass ran."""
        return self._pristine[self._first[0]].graph

    @property
    def pass_counts(self) -> dict[str, int]:
        return dict(self._counts)

    @property
    def pass_timings(self) -> dict[str, float]:
        return dict(self._timings)

    def graph_summary(self) -> str:
        from peftc import inspect as _inspect

        gm = self.graph_module
        text = _inspect.summarize(gm.meta.get("peftc_recompute_view", gm), self.captured_graph)
        lines = [*getattr(self, "_memory_notes", []), *gm.meta.get("peftc_recompute", [])]
        return text + "".join(f"{line}\n" for line in lines)

    def graph_diff(self) -> str:
        from peftc import inspect as _inspect

        return _inspect.diff(self.captured_graph, self.graph_module.graph)

    def draw(self, path, *, module: str | None = None):
        """SVG of the rewritten graph, inserted nodes highlighted; ``module`` restricts it."""
        from peftc import inspect as _inspect

        return _inspect.to_svg(self.graph_module.graph, path, module=module)


def _copy_graph(graph: fx.Graph) -> fx.Graph:
    g = fx.Graph()
    out = g.graph_copy(graph, {})
    g.output(out)
    g._codegen = copy.deepcopy(graph._codegen)  # pytree in/out specs of exported graphs
    return g


def from_peft(model: nn.Module, path, example_inputs: dict, *, trainable: bool = False,
              allow_pickle: bool = False, optimize=None, frontend: str = "auto") -> CompiledModel:
    """Compiles ``model`` with a PEFT-saved adapter and loads its weights.

    ``trainable`` is PEFT's ``is_trainable``: when False the adapter is frozen and the model
    is put in eval mode, as ``PeftModel.from_pretrained`` does.
    """
    spec = Spec.from_peft(path)
    spec = spec.replace(methods=tuple(m.as_loaded() for m in spec.methods))
    weights = peft_io.read_peft_weights(path, allow_pickle=allow_pickle)
    cm = compile(model, spec, example_inputs, optimize=optimize, frontend=frontend)
    cm.load_adapter_state_dict(weights, source=str(path))
    if not trainable:
        cm._states[spec.adapter].trainable = False
        cm._refresh_trainable()
        cm.eval()
    return cm
