"""``peftc.compile``: spec + model -> CompiledModel, an nn.Module that runs rewritten graphs.

CompiledModel is the facade; its parts are the adapter registry (``peftc.adapters``: which
adapters exist and run) and the graph cache (``peftc.graph_cache``: one capture per call
signature, rewritten for the current adapters). All graphs share the base model's parameters
and one store of adapter modules (``cm.adapters``), so training through any of them updates
the same adapter.

``train()``/``eval()`` switch dropout like the eager model: graphs are captured in train mode
and ``capture.set_training`` flips every dropout (base and adapter) in them.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import torch
from torch import fx, nn

from peftc import distributed, generation, hf_surface, inspection, merging, peft_io, targets
from peftc.adapters import AdapterRegistry, AdapterState
from peftc.capture import capture, restored_on_error, set_training
from peftc.errors import CheckpointError, SpecError
from peftc.graph import FLAT_VIEW, SUMMARY_LINES, is_placeholder
from peftc.graph_cache import MASKS, GraphCache
from peftc.passes import Plan, build
from peftc.resolve import resolve_all, with_implied_entries
from peftc.spec import Spec, checkpointing, optimization_hooks

__all__ = ["CompiledModel", "AdapterState", "compile", "from_peft"]


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
    _refuse_released(model)
    task = spec.task_type or targets.infer_task_type(model)
    spec = with_implied_entries(spec.replace(task_type=task), model)
    resolved = resolve_all(spec, model)
    for check in optimization_hooks(spec, "check_model"):  # e.g. quantized widths, before capture
        check(spec, resolved, model)
    spec, note = _keep_gradient_checkpointing(model, spec)
    with restored_on_error(model):  # a failed compile leaves the user's model as it was
        cm = CompiledModel(model, spec, resolved, example_inputs, frontend=frontend)
    cm.notes = [note] if note else []
    return cm


def _refuse_released(model: nn.Module) -> None:
    """A parameter that is one value broadcast to its shape was given up by an earlier compile
    (``quantize``'s ``release_base``, the default): its values live in that compiled model only, and
    a new capture would read zeros."""
    released = [n for n, p in model.named_parameters() if is_placeholder(p)]
    if released:
        raise SpecError("model", f"{len(released)} released parameters ({released[0]}, ...)",
                        "a model whose parameters hold their values",
                        "an earlier peftc.compile with optimize: {quantize} released them (release_base: true, the "
                        "default); compile a fresh copy of the model, or compile the first time with "
                        "optimize: {quantize: {release_base: false}}")


def _keep_gradient_checkpointing(model: nn.Module, spec: Spec) -> tuple[Spec, str | None]:
    """HF ``gradient_checkpointing_enable()`` is inlined away by capture: it becomes the
    optimization that declares it (``peftc.spec.checkpointing``: recompute per block) unless the
    spec set that optimization itself."""
    on = getattr(model, "is_activation_checkpointing", None)  # transformers 5's name; the old one warns
    if not (on if on is not None else getattr(model, "is_gradient_checkpointing", False)):
        return spec, None
    name, settings = checkpointing()
    if name in spec.optimize:
        return spec, (f"the model had gradient_checkpointing_enable(); the spec's {name} "
                      f"{spec.optimize[name]} applies instead")
    return (spec.replace(optimize={**spec.optimize, name: settings}),
            f"{name} {settings} because the model had gradient_checkpointing_enable()")


class CompiledModel(hf_surface.HFSurface, nn.Module):
    """The base model with adapters inserted into its captured graph(s).

    Graphs are a function of the captured graph and the adapter state: every change of
    which adapters are active (or merged) drops the rewritten graphs, and they are rebuilt
    from the pristine capture on the next call. Capture (the slow part) happens once per
    call signature.

    Parts: ``registry`` (an AdapterRegistry: the adapters, which run, their parameters; what
    ``peft_io`` and ``peftc.merging`` read) and ``graphs`` (a GraphCache).
    """

    def __init__(self, model: nn.Module, spec: Spec, resolved: list[dict[str, str]],
                 example_inputs: dict, *, frontend: str = "auto"):
        super().__init__()
        self.model = model  # the bare model (PEFT: get_base_model()); submodule "model"
        self.adapters = nn.Module()  # every adapter's modules, at <module>.<kind>.<adapter>
        self.frontend = self.frontend_used = frontend
        self.notes: list[str] = []  # settings the user gave that peftc translated (graph_summary shows them)
        self.registry = AdapterRegistry(model, self.adapters, spec, resolved)
        self.graphs = GraphCache(self.registry, self._capture)
        self._params, self._extra_keywords = hf_surface.forward_keywords(model)
        hf_surface.bind_forward(self, model)  # inspect.signature(cm.forward) is the model's (Trainer reads it)
        for p in model.parameters():
            p.requires_grad_(False)
        self.training = model.training
        self._graph_for(self.call_arguments(**example_inputs))
        self.registry.refresh_trainable()
        nn.Module.train(self, self.training)

    def get_base_model(self) -> nn.Module:
        """The model without adapters (PEFT's ``get_base_model``): the one given to ``compile``."""
        return self.model

    @property
    def base_model(self) -> nn.Module:
        return self.model

    # ---- adapters (peftc.adapters.AdapterRegistry) ---------------------------------------
    @property
    def spec(self) -> Spec:
        """The spec of the first active adapter (or of the first added one)."""
        return self.registry.state(self.registry.primary).spec

    @property
    def targets(self) -> list[dict[str, str]]:
        return self.registry.state(self.registry.primary).targets

    @property
    def adapter_names(self) -> list[str]:
        return self.registry.names

    @property
    def active_adapters(self) -> list[str]:
        return list(self.registry.running)

    def add_adapter(self, spec, *, name: str | None = None, activate: bool = False) -> None:
        """Adds another named adapter (its own spec); its parameters are created at once."""
        spec = Spec.coerce(spec)
        if name is not None:
            spec = spec.replace(adapter=name)
        spec = self.registry.add(spec)
        self.graphs.example_graph(self.training)  # captured again if a device change dropped it
        scratch = self.graphs.copy_of_capture(self.graphs.example_key)  # a throwaway rewrite creates the modules
        build(scratch, Plan(adapters=[self.graphs.context(spec.adapter, Counter(), {})]))
        if activate:
            self.set_adapter(self.registry.active + [spec.adapter])
        self.registry.refresh_trainable()

    def set_adapter(self, names) -> None:
        """Activates one adapter or several (LoRA deltas add, IA3 scales multiply, as PEFT)."""
        self.registry.activate(names)
        self._invalidate()

    def disable_adapters(self) -> None:
        """Runs the base model's captured graph as is (``enable_adapters`` undoes it)."""
        self.registry.enabled = False
        self._invalidate()

    def enable_adapters(self) -> None:
        self.registry.enabled = True
        self._invalidate()

    def delete_adapter(self, name: str) -> None:
        self.registry.delete(name)
        self._invalidate()

    def _invalidate(self) -> None:
        self.graphs.invalidate()
        generation.reset(self)
        merging.sync(self)  # merged or not, the base weights follow the active adapters
        self.registry.refresh_trainable()

    # ---- running (peftc.graph_cache.GraphCache) ------------------------------------------
    def _capture(self, kwargs: dict, **options) -> fx.GraphModule:
        # torch.export cannot run inside a torch.compile trace: capture eagerly (one graph break)
        gm, self.frontend_used = torch.compiler.disable(capture)(self.model, kwargs, frontend=self.frontend,
                                                                 **options)
        return gm

    def _graph_for(self, kwargs: dict, mixed: tuple[str, ...] | None = None) -> fx.GraphModule:
        return self.graphs.graph_for(kwargs, mixed, self.training)

    def call_arguments(self, *args, **kwargs) -> dict:
        """The keyword arguments a call runs its graph with: positionals named, None dropped,
        ``use_cache=False`` added for HF models, the loss keywords left out where the loss is
        computed outside the graph (``capture_stats.loss_outside``)."""
        return self.graphs.split_loss(self._normalize(args, kwargs))[0]

    def graph_for_call(self, *args, optimized: bool = True, **kwargs) -> fx.GraphModule:
        """The graph a call with these arguments runs (captured first if needed); with
        ``optimized=False`` a fresh copy without the optimization passes, their reference."""
        kwargs = self.call_arguments(*args, **kwargs)
        gm = self._graph_for(kwargs)
        return gm if optimized else self.graphs.unoptimized(kwargs, self.training)

    @property
    def _graphs(self) -> dict:
        """The rewritten graphs by (signature, mixed adapters); clearing it forces a rebuild."""
        return self.graphs.rewritten

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
        hf_surface.check_keywords(kwargs, self._params, self._extra_keywords)
        if "use_cache" in self._params and "use_cache" not in kwargs:
            kwargs["use_cache"] = False  # a captured graph cannot return a KV cache object
        return kwargs

    def forward(self, *args, adapter_names: list[str] | None = None, **kwargs):
        """Runs the model; ``adapter_names`` (one per sample, "__base__" for none) mixes
        LoRA-family adapters within a batch, in training too."""
        distributed.check_not_wrapped(self)  # fully_shard(cm) would train copies the graphs never read
        kwargs, finish = self.graphs.split_loss(self._normalize(args, kwargs))  # loss outside: one capture
        if adapter_names is None:
            return finish(self._graph_for(kwargs)(**kwargs))
        names = list(adapter_names)
        batch = next((v.shape[0] for v in kwargs.values() if isinstance(v, torch.Tensor) and v.dim()), None)
        if batch != len(names):
            raise SpecError("adapter_names", names, f"one name per sample ({batch} samples)")
        unknown = sorted(set(names) - set(self.adapter_names) - {"__base__"})
        if unknown:
            raise SpecError("adapter_names", unknown, f"names of added adapters {self.adapter_names} or '__base__'")
        if self.registry.merged:
            raise SpecError("adapter_names", names, "nothing while adapters are merged (unmerge first)")
        used = tuple(sorted(set(names) - {"__base__"}))
        gm = self._graph_for(kwargs, mixed=used)
        device = next(iter(self.model.parameters())).device
        for n in used:
            mask = torch.tensor([name == n for name in names], dtype=torch.float32, device=device)
            gm.get_submodule(MASKS).register_buffer(n, mask, persistent=False)
        return finish(gm(**kwargs))

    def generate(self, *args, adapter_names: list[str] | None = None, **kwargs):
        """HF ``generate`` (greedy, sampling, beam search, ...) through the running adapters, with a
        KV cache; ``cm.get_base_model().generate`` is the bare base model (see ``peftc.generation``)."""
        return generation.generate(self, *args, adapter_names=adapter_names, **kwargs)

    def export_aot(self, directory: str | os.PathLike, *, example_length: int = 8, max_cache_len: int | None = None,
                   adapter_names: list[str] | None = None) -> Path:
        """``generate``'s prefill and decode graphs as an AOTInductor package in ``directory``, with a
        greedy loop that needs torch only (``python DIR/generate.py --ids 1,2,3``); see ``peftc.aot``."""
        from peftc import aot  # torch.export / inductor machinery: loaded when a package is made

        return aot.export_aot(self, directory, example_length=example_length, max_cache_len=max_cache_len,
                              adapter_names=adapter_names)

    def train(self, mode: bool = True) -> CompiledModel:
        nn.Module.train(self, mode)
        for gm in self.graphs.rewritten.values():
            set_training(gm, mode)
        return self

    def _apply(self, fn, recurse=True):
        kind = lambda: next(((p.device, p.dtype) for p in self.model.parameters()), None)
        before = kind()
        super()._apply(fn, recurse)
        if kind() != before:  # exported graphs bake device and dtype into factory ops: re-capture there
            self.graphs.clear(kind()[0])
            generation.reset(self, captures=True)
        for gm in self.graphs.all_graphs():
            gm._apply(fn)  # buffers the graphs hold (rotary tables); parameters are shared
        return self

    # ---- memory --------------------------------------------------------------------------
    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None) -> None:
        """HF's switch: recompute per transformer block (the optimization that declares
        ``checkpointing``: ``optimize: {recompute: {policy: blocks}}``); the graphs are rebuilt on
        the next call. Checkpointing is always non-reentrant."""
        unused = hf_surface.checkpointing_notes(gradient_checkpointing_kwargs)  # bad kwargs fail first
        name, settings = checkpointing()
        self._set_checkpointing(settings)
        self.notes = [f"{name} {settings} because of cm.gradient_checkpointing_enable()", *unused]

    def gradient_checkpointing_disable(self) -> None:
        """Drops that optimization; the graphs are rebuilt without it."""
        self._set_checkpointing(None)
        self.notes = []

    @property
    def is_gradient_checkpointing(self) -> bool:
        name, settings = checkpointing()
        chosen = self.registry.optimize.get(name)
        return chosen is not None and all(chosen.get(k) == v for k, v in settings.items())

    def _set_checkpointing(self, settings: dict | None) -> None:
        name = checkpointing()[0]
        opt = {k: v for k, v in self.registry.optimize.items() if k != name}
        self.registry.set_optimize({**opt, name: settings} if settings else opt)
        self._invalidate()

    # ---- merging -------------------------------------------------------------------------
    def merge(self, requantize: bool = False) -> None:
        """Folds the active adapters into the base weights, in place (as PEFT): every captured
        graph then runs without adapter nodes. ``unmerge`` restores the weights bit for bit;
        a merge that fails leaves them unchanged. While merged, changing the active adapters
        re-merges. Why in place and how unmerge is exact: ``peftc.merging``. On a quantized
        base it refuses unless ``requantize`` (then: dequantize, merge, quantize again; the
        rounding error per weight is in ``graph_summary()``)."""
        for hook in optimization_hooks(self.spec, "before_merge"):
            hook(self, requantize)
        self.registry.merged = True
        self._invalidate()  # merging.sync folds the weights; on failure it restores them and raises

    def unmerge(self) -> None:
        """Restores the base weights as they were before ``merge`` (bit for bit, CRC-checked)."""
        for hook in optimization_hooks(self.spec, "after_unmerge"):
            hook(self)
        self.registry.merged = False
        self._invalidate()

    def merged_state_dict(self) -> dict[str, torch.Tensor]:
        """The base model's state dict with the active adapters folded in. Materialising: when not
        merged, each adapted weight is a new tensor (prefer ``save_merged`` to export a big model)."""
        for hook in optimization_hooks(self.spec, "before_export"):
            hook(self)
        return merging.merged_state_dict(self)

    def save_merged(self, path: str | os.PathLike, *, max_shard_size: int | str = "5GB") -> Path:
        """A plain HF model dir (``from_pretrained`` loads it) with the adapters folded in, streamed:
        each merged weight is computed, written and freed in turn, never a copy of the model;
        shards + index json above ``max_shard_size``; written to a temp dir, then renamed."""
        for hook in optimization_hooks(self.spec, "before_export"):
            hook(self)
        return merging.save_merged(self, path, max_shard_size=max_shard_size)

    # ---- parameters and checkpoints ------------------------------------------------------
    def _peft_params(self, adapter: str | None = None) -> dict[str, nn.Parameter]:
        """Every tensor of an adapter's PEFT checkpoint, by key, as the live parameter."""
        return peft_io.peft_params(self.registry, adapter or self.registry.primary)

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
        return peft_io.peft_config(self.registry, adapter or self.registry.primary)

    def save_adapter(self, path: str | os.PathLike, adapter: str | None = None, *, artifacts: bool = False):
        """Writes adapter_config.json + adapter_model.safetensors, loadable by ``peft``.

        With several adapters and none named, saves all in PEFT's layout: "default" (or
        the first) at ``path``, the others at ``path/<name>``. ``artifacts``: also what the
        optimizations keep next to an adapter (``compile``: the generated code, so that
        ``from_peft`` on another process starts warm); the lines say what was written.
        """
        names = [adapter] if adapter else self.adapter_names
        root = "default" if "default" in names else names[0]
        configs = {n: self.peft_config(n) for n in names}  # fails before anything is written

        def write():
            for n in names:
                peft_io.write_adapter(Path(path) if n == root else Path(path) / n, configs[n],
                                      self.adapter_state_dict(n))
        distributed.write_files(self, write)  # a model spread over ranks: rank 0 writes, then a barrier
        if artifacts:
            self.notes = [*self.notes, *(hook(self, path) for hook in optimization_hooks(self.spec, "save_artifacts"))]
        return Path(path)

    def load_adapter(self, path, name: str, *, trainable: bool = False, activate: bool = False,
                     allow_pickle: bool = False) -> None:
        """Adds a PEFT-saved adapter under ``name`` (PEFT's ``load_adapter``)."""
        spec = Spec.from_peft(path).replace(adapter=name)
        weights = peft_io.read_peft_weights(path, allow_pickle=allow_pickle)
        self.add_adapter(spec, activate=activate)
        self.load_adapter_state_dict(weights, adapter=name, source=str(path))
        self.registry.state(name).trainable = trainable
        self.registry.refresh_trainable()

    # ---- inspection (peftc.inspection) ---------------------------------------------------
    @property
    def graph_module(self) -> fx.GraphModule:
        """The rewritten graph for the example inputs' signature."""
        return self.graphs.example_graph(self.training)

    @property
    def captured_graph(self) -> fx.Graph:
        """The graph as captured, before any pass ran."""
        self.graphs.example_graph(self.training)
        return self.graphs.captured[self.graphs.example_key[0]].graph

    @property
    def pass_counts(self) -> dict[str, int]:
        return dict(self.graphs.counts)

    @property
    def pass_timings(self) -> dict[str, float]:
        return dict(self.graphs.timings)

    @property
    def capture_stats(self):
        """Captures run, their seconds, signatures served by another's capture, loss placement
        (``peftc.graph_cache.CaptureStats``)."""
        return self.graphs.stats

    def graph_summary(self) -> str:
        gm = self.graph_module
        text = inspection.summarize(gm.meta.get(FLAT_VIEW, gm), self.captured_graph)
        lines = [*self.notes, *gm.meta.get(SUMMARY_LINES, [])]
        extra = "".join(hook(self) for hook in optimization_hooks(self.spec, "summary"))
        return text + "".join(f"{line}\n" for line in lines) + extra + self.graphs.stats.line()

    def graph_diff(self) -> str:
        return inspection.diff(self.captured_graph, self.graph_module.graph)

    def draw(self, path, *, module: str | None = None):
        """SVG of the rewritten graph, inserted nodes highlighted; ``module`` restricts it."""
        return inspection.to_svg(self.graph_module.graph, path, module=module)

    def explore(self, out_dir=None, *, module: str | None = None, serve: bool = True, port: int = 8080):
        """The captured and rewritten graphs side by side in Model Explorer (``peftc[explorer]``):
        writes them to ``out_dir`` (default: a temp dir) and, with ``serve``, opens them."""
        from peftc import explorer

        return explorer.explore(self, out_dir, module=module, serve_now=serve, port=port)


def from_peft(model: nn.Module, path, example_inputs: dict, *, trainable: bool = False,
              allow_pickle: bool = False, optimize=None, frontend: str = "auto") -> CompiledModel:
    """Compiles ``model`` with a PEFT-saved adapter and loads its weights.

    ``trainable`` is PEFT's ``is_trainable``: when False the adapter is frozen and the model
    is put in eval mode, as ``PeftModel.from_pretrained`` does.
    """
    spec = Spec.from_peft(path)
    spec = spec.replace(methods=tuple(m.checkpoint_form() for m in spec.methods))
    weights = peft_io.read_peft_weights(path, allow_pickle=allow_pickle)
    cm = compile(model, spec, example_inputs, optimize=optimize, frontend=frontend)
    for hook in optimization_hooks(cm.spec, "load_artifacts"):  # before the first call compiles anything
        if line := hook(cm.spec, model, path):
            cm.notes.append(line)
    cm.load_adapter_state_dict(weights, source=str(path))
    if not trainable:
        cm.registry.state(spec.adapter).trainable = False
        cm.registry.refresh_trainable()
        cm.eval()
    return cm
