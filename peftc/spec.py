"""Declarative PEFT specs: small frozen dataclasses, validated when built.

A spec is data only: it names methods and their settings. Which graph nodes a method
touches is decided later, against a model (``peftc.targets``), but every check that needs no
model happens here so that a bad spec fails before any capture work.

Example::

    spec = Spec.from_dict({
        "adapter": "default",
        "methods": [{"lora": {"targets": ["q_proj", "v_proj"], "r": 16, "alpha": 32}}],
    })
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from enum import Enum
from pathlib import Path
from typing import Any, ClassVar

import yaml

from peftc import targets as _targets
from peftc.errors import PeftcError, SpecError
from peftc.peft_files import read_peft_config

__all__ = [
    "Spec",
    "MethodSpec",
    "Sites",
    "Merging",
    "add_method",
    "add_optimization",
    "Optimization",
    "optimization_hooks",
    "checkpointing",
    "spec_from_peft_config",
    "METHODS",
    "OPTIMIZATIONS",
    "TASK_TYPES",
    "check_targets",
    "check_layer_selection",
]

METHODS: dict[str, type[MethodSpec]] = {}
OPTIMIZATIONS: dict[str, Optimization] = {}  # name -> its one record; filled by optimization passes
TASK_TYPES = ("CAUSAL_LM", "SEQ_CLS", "SEQ_2_SEQ_LM", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION")
_SPEC_FIELDS = ("adapter", "methods", "optimize", "task_type", "base_model", "autocast_adapter_dtype")


class Sites(str, Enum):
    """What a method acts on; the ``select`` pass marks the graph accordingly."""

    LINEAR = "linear"  # the linear-layer calls of the resolved modules
    MODULE = "module"  # every node inside the resolved modules (trained copies)
    GRAPH = "graph"  # the graph as a whole (prompts, attention, residual adds): no module targets
    PARAMETER = "parameter"  # the graph's reads of the resolved parameters (LoRA on MoE experts)


class Merging(str, Enum):
    """How a method's adapter folds into the base weights (``cm.merge()``)."""

    FOLD = "fold"  # W', b' = entry.fold(W, b), folded in place by peftc/merging.py
    REWRITE = "rewrite"  # ``merged_rewrite`` leaves no adapter computation (trained copies)
    NONE = "none"  # adds graph inputs or nodes, not weights: cannot be merged


def add_method(name: str, cls: type[MethodSpec]) -> None:
    """Puts a method class in the table specs are parsed with. Methods register through
    ``peftc.passes.register_method``, which checks their phase against the pipeline first."""
    if name in METHODS:
        raise RuntimeError(f"method {name!r} is registered twice")
    METHODS[name] = cls


HOOKS = ("check_model", "before_merge", "after_unmerge", "before_export", "summary",
         "write_files",  # write_files(cm, write): runs write() (the model's files) as its ranks need (sharded: rank 0)
         "load_base",  # load_base(cm, dir, prefix=, device=) -> bytes read: the base's per-rank tensors (peftc.load_sharded)
         "load_quantized",  # load_quantized(cm, source, prefix=, device=, keep_blocks=) -> counts: peftc.load_quantized
         "export_merged",  # export_merged(cm, save): runs save() with the full base weights in cm.get_base_model()
         "save_artifacts",  # save_artifacts(cm, dir) -> str: writes what it keeps next to an adapter (compiled code)
         "load_artifacts")  # load_artifacts(spec, model, dir) -> str | None: reads it back before the first call


@dataclass(frozen=True)
class Optimization:
    """Everything the pipeline and the runtime know of one optimization: one record, made by
    ``peftc.passes.register_optimization`` where the optimization is written.

    ``run(gm, ctx) -> PassResult`` is its pass, run in ``phase``; ``check(settings) -> None``
    validates ``optimize: {name: {...}}`` when a spec is built; ``on_base``: it transforms the
    frozen model itself (quantized weights), so it also runs on graphs without adapter nodes;
    ``hooks``: what it adds to the model's life besides its pass, so the runtime calls it
    without naming it — ``check_model(spec, resolved, model)`` before capture,
    ``before_merge(cm, requantize)``, ``after_unmerge(cm)``, ``before_export(cm)``,
    ``summary(cm) -> str`` (``graph_summary()`` lines); the others are commented at ``HOOKS``."""

    name: str
    run: Callable
    phase: str
    check: Callable | None = None
    on_base: bool = False
    hooks: Mapping[str, Callable] = field(default_factory=dict)
    selectable: bool = True  # False: a lowering the pipeline runs when a graph needs it, not a setting
    checkpointing: Mapping | None = None  # its settings that HF's gradient_checkpointing_enable() stands for

    def __post_init__(self):
        unknown = set(self.hooks) - set(HOOKS)
        if unknown:
            raise RuntimeError(f"optimization {self.name!r}: unknown hooks {sorted(unknown)}; allowed: {list(HOOKS)}")


def add_optimization(record: Optimization) -> None:
    """Puts an optimization in the table ``optimize`` settings are parsed with."""
    if record.name in OPTIMIZATIONS:
        raise RuntimeError(f"optimization {record.name!r} is registered twice")
    OPTIMIZATIONS[record.name] = record


def checkpointing() -> tuple[str, dict]:
    """(name, settings) of the optimization HF's gradient checkpointing maps to: capture inlines
    the model's own checkpointing away, so it is applied as an optimization instead."""
    found = [(n, dict(o.checkpointing)) for n, o in OPTIMIZATIONS.items() if o.checkpointing is not None]
    if len(found) != 1:
        raise PeftcError(f"gradient checkpointing needs one optimization that declares it; found {found}")
    return found[0]


def optimization_hooks(spec: Spec, hook: str) -> list:
    """The ``hook`` functions of the optimizations ``spec`` selects."""
    return [o.hooks[hook] for n, o in OPTIMIZATIONS.items() if n in spec.optimize and hook in o.hooks]


def check_layer_selection(entry) -> None:
    """PEFT's layers_to_transform / layers_pattern, shared by the methods that take them."""
    layers = entry.layers
    if layers is not None and not (
        (isinstance(layers, int) and not isinstance(layers, bool) and layers >= 0)
        or (isinstance(layers, tuple) and layers and all(isinstance(i, int) and i >= 0 for i in layers))
    ):
        entry.reject("layers", "a layer index or a non-empty list of layer indices (>= 0)")
    if entry.layers_pattern is not None and not isinstance(entry.layers_pattern, (str, tuple)):
        entry.reject("layers_pattern", "a module-list name such as 'layers' or 'h', or a list of them")


def check_targets(where: str, value: Any, *, allow_none: bool = False):
    """Normalises a PEFT-style target selector: a list of names/suffixes, "re:<regex>" or
    "all-linear". Returns a tuple of names or the string."""
    if value is None and allow_none:
        return None
    if isinstance(value, str):
        if value == "all-linear":
            return value
        if value.startswith("re:"):
            try:
                re.compile(value[3:])
            except re.error as e:
                raise SpecError(where, value, "a valid regular expression after 're:'", str(e)) from None
            return value
        return (value,)
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) and v for v in value):
        special = [v for v in value if v.startswith("re:") or v == "all-linear"]
        if special:
            raise SpecError(where, list(value), "names in a list; 're:<regex>' and 'all-linear' "
                            "only as the whole selector (a string, not a list item)")
        return tuple(value)
    raise SpecError(
        where, value, "a non-empty list of module names/suffixes, 're:<regex>' or 'all-linear'"
    )


@dataclass(frozen=True)
class MethodSpec:
    """Base of the per-method specs; subclasses are frozen dataclasses.

    A registered subclass is a whole method: its fields and checks, where it acts (``sites``,
    ``kinds``), its pass (``rewrite``, run in its ``phase``), how it merges (``merging``), its
    PEFT mapping (``peft_type``, ``from_peft``/``to_peft``, ``peft_prefix``) and its default
    targets per model type (``DEFAULT_TARGETS``).
    """

    method: ClassVar[str]
    phase: ClassVar[str | None]
    peft_type: ClassVar[str | None]
    store_dir: ClassVar[str]
    kinds: ClassVar[tuple[str, ...]] = ("linear", "conv1d")  # module kinds targets may select
    sites: ClassVar[Sites] = Sites.LINEAR
    merging: ClassVar[Merging] = Merging.NONE
    mixed_batch: ClassVar[bool] = False  # can adapt some samples of a batch only (adapter_names)
    widens_labels: ClassVar[bool] = False  # its pass widens ``labels`` in the graph: the loss stays inside
    inserts_tokens: ClassVar[bool] = False  # prepends its ``tokens`` virtual tokens to the inputs (a KV cache keeps them)
    owns_modules: ClassVar[bool] = False  # its modules are off limits to other methods (PEFT's modules_to_save)
    peft_field: ClassVar[str | None] = None  # saved as this field of another method's PEFT config
    peft_prefix: ClassVar[str] = "base_model.model."  # PEFT checkpoint keys start so (prompt learning: "base_model.")
    DEFAULT_TARGETS: ClassVar[Mapping[str, tuple[str, ...]] | None] = None  # model_type -> targets when unset

    @classmethod
    def rewrite(cls, gm, ctx):
        """The method's pass ``(gm, ctx) -> PassResult``: inserts its nodes for ``ctx.spec``'s
        entries of this class (see passes/)."""
        raise PeftcError(f"method {cls.method!r} has no rewrite pass")

    @classmethod
    def merged_rewrite(cls, gm, ctx):
        """The pass run instead of ``rewrite`` while merged (``merging`` REWRITE)."""
        return cls.rewrite(gm, ctx)

    def default_targets(self, model):
        """Targets when ``targets`` is unset: ``DEFAULT_TARGETS`` for the model's type."""
        return _targets.for_model_type(model, self.DEFAULT_TARGETS or {}, f"{self.method}.targets")

    @classmethod
    def implied_entries(cls, spec: Spec, model) -> list[MethodSpec]:
        """Entries of this method that ``spec`` implies on ``model`` (PEFT trains a SEQ_CLS head)."""
        return []

    @classmethod
    def peft_base_tensors(cls, adapters, name: str) -> dict:
        """Base-model parameters that adapter ``name``'s PEFT checkpoint also holds, by key
        (LoRA's ``bias``); ``adapters`` is the model's AdapterRegistry."""
        return {}

    @classmethod
    def peft_field_value(cls, entries: list, resolved: list[dict[str, str]], cfg: dict):
        """The value of ``peft_field`` in the host method's PEFT config ``cfg`` (which it may
        complete): by default the resolved module paths, or None."""
        return sorted({p for t in resolved for p in t}) or None

    @classmethod
    def from_peft(cls, cfg: Mapping) -> list[MethodSpec]:
        """A PEFT config dict of this method's ``peft_type`` -> spec entries."""
        raise SpecError("peft_type", cls.peft_type, "a PEFT method peftc reads")

    @classmethod
    def to_peft(cls, entries: list, resolved: list[dict[str, str]], model) -> dict:
        """Entries of this method (+ the module paths each resolved to, and the base model)
        -> PEFT config fields."""
        raise PeftcError(f"method {cls.method!r} has no HF PEFT checkpoint format")

    @classmethod
    def from_fields(cls, where: str, d: Any) -> MethodSpec:
        if not isinstance(d, Mapping):
            raise SpecError(where, d, "a mapping of field -> value")
        names = [f.name for f in fields(cls)]
        for k in d:
            if k not in names:
                raise SpecError(f"{where}.{k}", d[k], f"one of the fields {names}", "unknown field")
        required = [
            f.name
            for f in fields(cls)
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        ]
        for k in required:
            if k not in d:
                raise SpecError(f"{where}.{k}", None, "a value (this field is required)")
        return cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items()})

    def expand(self) -> list[MethodSpec]:
        """The entries this one stands for: itself, or several for a combination of methods
        (MAM, UniPELT); ``Spec.from_dict`` stores the expanded entries."""
        return [self]

    def checkpoint_form(self) -> MethodSpec:
        """The entry as a PEFT checkpoint of it can be loaded: itself, unless the checkpoint
        holds less than the method trains (P-tuning saves the encoder's output, not the MLP)."""
        return self

    def to_dict(self) -> dict:
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            out[f.name] = list(v) if isinstance(v, tuple) else v
        return out

    def reject(self, name: str, allowed: str, hint: str = ""):
        """Raises the SpecError for field ``name``: its value, and what is allowed."""
        raise SpecError(f"{self.method}.{name}", getattr(self, name), allowed, hint)


@dataclass(frozen=True)
class Spec:
    """A whole PEFT configuration: one adapter name, ordered method entries, optimizations."""

    methods: tuple[MethodSpec, ...]
    adapter: str = "default"
    optimize: Mapping[str, Mapping] = field(default_factory=dict)
    task_type: str | None = None
    base_model: str | None = None
    autocast_adapter_dtype: bool = True  # PEFT's: fp32 adapters on bf16/fp16 bases (passes/dtype_policy.py)

    def __post_init__(self):
        if not isinstance(self.adapter, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_\-]*", self.adapter):
            raise SpecError("adapter", self.adapter, "a name of letters, digits, '_' or '-'")
        if not self.methods:
            raise SpecError("methods", list(self.methods), "a non-empty list of method entries")
        if self.task_type is not None and self.task_type not in TASK_TYPES:
            raise SpecError("task_type", self.task_type, f"one of {list(TASK_TYPES)} or null")
        object.__setattr__(self, "optimize", normalize_optimize(self.optimize))
        if not isinstance(self.autocast_adapter_dtype, bool):
            raise SpecError("autocast_adapter_dtype", self.autocast_adapter_dtype, "true or false",
                            "true (PEFT's default): adapter weights float32 on bf16/fp16 bases; false: the base dtype")

    # ---- constructors -------------------------------------------------------------------
    @classmethod
    def coerce(cls, spec: Any) -> Spec:
        """A Spec from a Spec, a dict (``from_dict``) or a file path (``load``)."""
        if isinstance(spec, Spec):
            return spec
        if isinstance(spec, Mapping):
            return cls.from_dict(spec)
        if isinstance(spec, (str, os.PathLike)):
            return cls.load(spec)
        raise SpecError("spec", type(spec).__name__, "a peftc.Spec, a dict, or a path to a spec file")

    @classmethod
    def from_dict(cls, d: Mapping) -> Spec:
        """Builds a spec from ``{"adapter", "methods": [{name: {fields}}], "optimize"}``."""
        if not isinstance(d, Mapping):
            raise SpecError("<spec>", d, "a mapping with keys " + ", ".join(_SPEC_FIELDS))
        for k in d:
            if k not in _SPEC_FIELDS:
                raise SpecError(k, d[k], f"one of the top-level fields {list(_SPEC_FIELDS)}", "unknown field")
        raw = d.get("methods")
        if not isinstance(raw, (list, tuple)) or not raw:
            raise SpecError("methods", raw, "a non-empty list of {method_name: {fields}} entries")
        methods = []
        for i, entry in enumerate(raw):
            if not isinstance(entry, Mapping) or len(entry) != 1:
                raise SpecError(f"methods[{i}]", entry, "a mapping with exactly one method name as key")
            (name, body), = entry.items()
            if name not in METHODS:
                raise SpecError(f"methods[{i}]", name, f"one of the methods {sorted(METHODS)}")
            methods.extend(METHODS[name].from_fields(f"methods[{i}].{name}", body or {}).expand())
        return cls(
            methods=tuple(methods),
            adapter=d.get("adapter", "default"),
            optimize=d.get("optimize") or {},
            task_type=d.get("task_type"),
            base_model=d.get("base_model"),
            autocast_adapter_dtype=d.get("autocast_adapter_dtype", True),
        )

    @classmethod
    def load(cls, path: str | os.PathLike) -> Spec:
        """Reads a YAML or JSON spec file (or an HF PEFT ``adapter_config.json``)."""
        p = Path(path)
        if not p.is_file():
            raise SpecError("path", str(path), "an existing .yaml, .yml or .json file")
        try:
            d = yaml.safe_load(p.read_text())  # YAML is a superset of JSON
        except yaml.YAMLError as e:
            raise SpecError("path", str(path), "a valid YAML or JSON document", str(e)) from None
        if isinstance(d, Mapping) and "peft_type" in d:
            return cls.from_peft(d)
        return cls.from_dict(d)

    @classmethod
    def from_peft(cls, x: Any) -> Spec:
        """From a PEFT config object, a config dict, an adapter dir or its adapter_config.json."""
        if isinstance(x, (str, os.PathLike)):
            x = read_peft_config(x)
        elif hasattr(x, "to_dict") and hasattr(x, "peft_type"):
            x = x.to_dict()
        return spec_from_peft_config(x)

    def to_dict(self) -> dict:
        out: dict[str, Any] = {
            "adapter": self.adapter,
            "methods": [{m.method: m.to_dict()} for m in self.methods],
        }
        if self.optimize:
            out["optimize"] = {k: dict(v) for k, v in self.optimize.items()}
        if self.task_type:
            out["task_type"] = self.task_type
        if self.base_model:
            out["base_model"] = self.base_model
        if not self.autocast_adapter_dtype:
            out["autocast_adapter_dtype"] = False
        return out

    def save(self, path: str | os.PathLike) -> None:
        p = Path(path)
        text = json.dumps(self.to_dict(), indent=2) if p.suffix == ".json" else yaml.safe_dump(self.to_dict(), sort_keys=False)
        tmp = p.with_name(p.name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, p)

    def replace(self, **changes) -> Spec:
        return dataclasses.replace(self, **changes)

    def entries_of(self, method: str) -> list[MethodSpec]:
        """The entries of one method, in spec order."""
        return [m for m in self.methods if m.method == method]

    of = entries_of  # the earlier public name


def spec_from_peft_config(cfg: Mapping) -> Spec:
    """A trainable peftc Spec equivalent to a PEFT config dict (its ``peft_type`` picks the method)."""
    ptype = cfg.get("peft_type")
    ptype = getattr(ptype, "value", ptype)
    methods = {m.peft_type: m for m in METHODS.values() if m.peft_type}
    if ptype not in methods:
        raise SpecError("peft_type", ptype, f"one of {sorted(methods)}")
    task = cfg.get("task_type")
    task = getattr(task, "value", task)
    entries = methods[ptype].from_peft(cfg)
    autocast = cfg.get("autocast_adapter_dtype", True)  # not a PeftConfig field: peftc writes it when false
    if not isinstance(autocast, bool):
        raise SpecError("peft.autocast_adapter_dtype", autocast, "true or false")
    return Spec(methods=tuple(entries), task_type=task, base_model=cfg.get("base_model_name_or_path"),
                autocast_adapter_dtype=autocast)


def normalize_optimize(opt: Any) -> dict[str, dict]:
    """``["fuse"]`` or ``{"fuse": {...}}`` -> ``{"fuse": {...}}``; unknown names are errors."""
    if opt is None:
        return {}
    if isinstance(opt, str):
        opt = [opt]
    if isinstance(opt, (list, tuple)):
        opt = {name: {} for name in opt}
    if not isinstance(opt, Mapping):
        raise SpecError("optimize", opt, "a list of optimization names or a mapping name -> settings")
    out = {}
    for name, settings in opt.items():
        if name not in OPTIMIZATIONS or not OPTIMIZATIONS[name].selectable:
            allowed = sorted(n for n, o in OPTIMIZATIONS.items() if o.selectable) or "(none are available in this version)"
            raise SpecError("optimize", name, f"one of {allowed}", "unknown optimization")
        if settings is not None and not isinstance(settings, Mapping):
            raise SpecError(f"optimize.{name}", settings, "a mapping of settings")
        out[name] = dict(settings or {})
        if OPTIMIZATIONS[name].check is not None:
            OPTIMIZATIONS[name].check(out[name])
    return out
