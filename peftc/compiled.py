"""``peftc.compile``: spec + model -> CompiledModel, an nn.Module that runs rewritten graphs.

A graph is captured per call signature (the set of keyword arguments, and which dims are 1),
because an exported graph only accepts the keywords it was captured with. All graphs share
the base model's parameters and one store of adapter modules (``cm.adapters``), so training
through any of them updates the same adapter.

``train()``/``eval()`` switch dropout like the eager model: graphs are captured in train mode
and ``capture.set_training`` flips every dropout (base and adapter) in them.
"""

from __future__ import annotations

import inspect
import os
from collections import Counter
from typing import Any

import torch
from torch import fx, nn

from peftc import peft_io, targets
from peftc.capture import capture, set_training
from peftc.errors import PeftcError, SpecError
from peftc.passes import PassContext, rewrite_passes, run_pipeline
from peftc.passes.lora import LoraSpec
from peftc.passes.train import TrainSpec
from peftc.spec import Spec

__all__ = ["CompiledModel", "compile", "from_peft"]


def _as_spec(spec: Any) -> Spec:
    if isinstance(spec, Spec):
        return spec
    if isinstance(spec, dict):
        return Spec.from_dict(spec)
    if isinstance(spec, (str, os.PathLike)):
        return Spec.load(spec)
    raise SpecError("spec", type(spec).__name__, "a peftc.Spec, a dict, or a path to a spec file")


def compile(model: nn.Module, spec, example_inputs: dict, *, optimize=None,
            frontend: str = "auto") -> CompiledModel:
    """Captures ``model`` on ``example_inputs`` and rewrites it as ``spec`` says.

    Example::

        cm = peftc.compile(model, spec, example_inputs={"input_ids": ids, "use_cache": False})
        cm(input_ids=ids, labels=ids).loss.backward()
    """
    spec = _as_spec(spec)
    if optimize is not None:
        spec = spec.replace(optimize=optimize)
    if not isinstance(model, nn.Module):
        raise SpecError("model", type(model).__name__, "a torch.nn.Module")
    if not isinstance(example_inputs, dict) or not example_inputs or not all(isinstance(k, str) for k in example_inputs):
        raise SpecError("example_inputs", example_inputs, "a non-empty dict of keyword -> value")
    task = spec.task_type or targets.infer_task_type(model)
    spec = _with_implied_heads(spec.replace(task_type=task), model)
    resolved = resolve_all(spec, model)
    return CompiledModel(model, spec, resolved, example_inputs, frontend=frontend)


def _with_implied_heads(spec: Spec, model: nn.Module) -> Spec:
    """PEFT trains the classification head of SEQ_CLS models whole; so does peftc."""
    if spec.task_type != "SEQ_CLS":
        return spec
    heads = [h for h in targets.seq_cls_heads(model)
             if not any(isinstance(m, TrainSpec) and h in m.targets for m in spec.methods)]
    return spec.replace(methods=spec.methods + (TrainSpec(targets=tuple(heads)),)) if heads else spec


def resolve_all(spec: Spec, model: nn.Module) -> list[dict[str, str]]:
    """Module paths per spec entry, checked before capture: no match and overlaps are errors."""
    names = [n for n, _ in model.named_modules() if n]
    protected, out = [], []
    for i, m in enumerate(spec.methods):
        if isinstance(m, TrainSpec):
            found = targets.match_names(m.targets, names)
            if not found:
                raise targets._no_match(f"methods[{i}].train.targets", m.targets, names)
            outer = [p for p in found if not any(p.startswith(q + ".") for q in found)]
            protected += outer
    for i, m in enumerate(spec.methods):
        if isinstance(m, TrainSpec):
            out.append({p: "module" for p in protected if targets.match_names(m.targets, [p])})
        else:
            out.append(targets.resolve(m, model, f"methods[{i}].{m.method}", task_type=spec.task_type,
                                       kinds=m.kinds, protected=protected))
    seen: dict[tuple[str, str], int] = {}
    for i, (m, t) in enumerate(zip(spec.methods, out)):
        for p in t:
            j = seen.setdefault((m.method, p), i)
            if j != i:
                raise SpecError(f"methods[{i}].{m.method}.targets", p, "modules no other entry of the "
                                "same method adapts", f"methods[{j}] already adapts it")
    return out


class CompiledModel(nn.Module):
    """The base model with adapters inserted into its captured graph(s)."""

    def __init__(self, model: nn.Module, spec: Spec, resolved: list[dict[str, str]],
                 example_inputs: dict, *, frontend: str = "auto"):
        super().__init__()
        self.base_model = model
        self.adapters = nn.Module()
        self.spec, self.targets, self.frontend = spec, resolved, frontend
        self._graphs: dict = {}  # signature -> rewritten GraphModule (plain dict: not children)
        self._captured: dict = {}  # signature -> fx.Graph as captured
        self._params = [n for n, p in inspect.signature(model.forward).parameters.items()
                        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        self._ctx = PassContext(spec=spec, targets=resolved, model=model, store=self.adapters,
                                counts=Counter())
        for p in model.parameters():
            p.requires_grad_(False)
        self.training = model.training
        self._first = self._graph_for(self._normalize((), dict(example_inputs)))
        for key, p in self._bias_keys().items():
            p.requires_grad_(".original_module." not in key)  # PEFT saves, but freezes, those
        nn.Module.train(self, self.training)

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

    def _graph_for(self, kwargs: dict) -> tuple:
        key = self._signature(kwargs)
        if key not in self._graphs:
            gm, self.frontend_used = capture(self.base_model, kwargs, frontend=self.frontend)
            self._captured[key] = _copy_graph(gm.graph)
            gm = run_pipeline(gm, self._ctx, rewrite_passes(self.spec))
            set_training(gm, self.training)
            self._graphs[key] = gm
        return key

    def forward(self, *args, **kwargs):
        kwargs = self._normalize(args, kwargs)
        return self._graphs[self._graph_for(kwargs)](**kwargs)

    def train(self, mode: bool = True) -> CompiledModel:
        nn.Module.train(self, mode)
        for gm in self._graphs.values():
            set_training(gm, mode)
        return self

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        for gm in self._graphs.values():
            gm._apply(fn)  # buffers the graphs hold (rotary tables); parameters are shared
        return self

    # ---- parameters ------------------------------------------------------------------------
    def _bias_keys(self) -> dict[str, nn.Parameter]:
        """PEFT's LoRA ``bias``: "all" trains every bias, "lora_only" those of adapted layers.

        Keys follow PEFT's module wrapping: ``<path>.base_layer.bias`` for an adapted layer;
        inside a module trained whole PEFT also saves ``original_module``/``modules_to_save``.
        """
        modes = {m.bias for m in self.spec.methods if isinstance(m, LoraSpec)}
        lora_paths = {p for m, t in zip(self.spec.methods, self.targets) if isinstance(m, LoraSpec) for p in t}
        whole = [p for m, t in zip(self.spec.methods, self.targets) if isinstance(m, TrainSpec) for p in t]
        out = {}
        for name, param in self.base_model.named_parameters():
            path, _, leaf = name.rpartition(".")
            if not ("all" in modes and "bias" in name or "lora_only" in modes and leaf == "bias" and path in lora_paths):
                continue
            root = next((w for w in whole if name.startswith(w + ".")), None)
            if root is None:
                out[peft_io.PREFIX + (f"{path}.base_layer.{leaf}" if path in lora_paths else name)] = param
                continue
            rel = name[len(root) + 1:]
            out[f"{peft_io.PREFIX}{root}.original_module.{rel}"] = param
            copy = self.adapters.get_parameter(f"{root}.modules_to_save.{self.spec.adapter}.{rel}")
            out[f"{peft_io.PREFIX}{root}.modules_to_save.{rel}"] = copy
        return out

    def _peft_params(self) -> dict[str, nn.Parameter]:
        """Every tensor of the PEFT checkpoint, by key, as the live parameter it maps to."""
        out = {peft_io.peft_key(n, self.spec.adapter): p for n, p in self.adapters.named_parameters()}
        out.update(self._bias_keys())
        return out

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def num_trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.trainable_parameters())

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """The adapter in PEFT's checkpoint format (``get_peft_model_state_dict``'s keys)."""
        return {k: v.detach() for k, v in self._peft_params().items()}

    def load_adapter_state_dict(self, sd: dict[str, torch.Tensor], *, source: str = "state dict") -> None:
        """Strict load; missing, unexpected or mis-shaped keys raise CheckpointError."""
        params = self._peft_params()
        peft_io.check_loadable(params, sd, source)
        with torch.no_grad():
            for k, p in params.items():
                p.copy_(sd[k].to(p.dtype))

    def peft_config(self) -> dict:
        """This adapter as an HF PEFT config dict (one PEFT method + modules trained whole)."""
        kinds = {type(m) for m in self.spec.methods if m.peft_type}
        others = [m.method for m in self.spec.methods if not m.peft_type and not isinstance(m, TrainSpec)]
        if len(kinds) != 1 or others:
            raise PeftcError("a PEFT checkpoint holds one PEFT method (plus modules trained whole); "
                             f"this spec has {[m.method for m in self.spec.methods]}")
        (cls,) = kinds
        mine = [(m, t) for m, t in zip(self.spec.methods, self.targets) if type(m) is cls]
        cfg = cls.to_peft([m for m, _ in mine], [t for _, t in mine], self.base_model)
        saved = sorted({p for m, t in zip(self.spec.methods, self.targets) if isinstance(m, TrainSpec) for p in t})
        cfg.update(modules_to_save=saved or None, task_type=self.spec.task_type,
                   base_model_name_or_path=self.spec.base_model or _name_or_path(self.base_model),
                   inference_mode=True, revision=None)
        return cfg

    def save_adapter(self, path: str | os.PathLike):
        """Writes adapter_config.json + adapter_model.safetensors, loadable by ``peft``."""
        cfg = self.peft_config()  # fails before anything is written
        return peft_io.write_adapter(path, cfg, self.adapter_state_dict())

    # ---- inspection ----------------------------------------------------------------------
    @property
    def graph_module(self) -> fx.GraphModule:
        """The rewritten graph for the example inputs' signature."""
        return self._graphs[self._first]

    @property
    def captured_graph(self) -> fx.Graph:
        """The graph as captured, before any pass ran."""
        return self._captured[self._first]

    @property
    def pass_counts(self) -> dict[str, int]:
        return dict(self._ctx.counts)

    @property
    def pass_timings(self) -> dict[str, float]:
        return dict(self._ctx.timings)

    def graph_summary(self) -> str:
        from peftc import inspect as _inspect

        return _inspect.summarize(self.graph_module, self.captured_graph)

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
    return g


def _name_or_path(model: nn.Module) -> str | None:
    cfg = getattr(model, "config", None)
    return getattr(cfg, "_name_or_path", None) or None


def from_peft(model: nn.Module, path, example_inputs: dict, *, trainable: bool = False,
              allow_pickle: bool = False, optimize=None, frontend: str = "auto") -> CompiledModel:
    """Compiles ``model`` with a PEFT-saved adapter and loads its weights.

    ``trainable`` is PEFT's ``is_trainable``: when False the adapter is frozen and the model
    is put in eval mode, as ``PeftModel.from_pretrained`` does.
    """
    spec = Spec.from_peft(path)
    weights = peft_io.read_peft_weights(path, allow_pickle=allow_pickle)
    cm = compile(model, spec, example_inputs, optimize=optimize, frontend=frontend)
    cm.load_adapter_state_dict(weights, source=str(path))
    if not trainable:
        for p in cm.trainable_parameters():
            p.requires_grad_(False)
        cm.eval()
    return cm
