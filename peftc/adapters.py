"""The named adapters of one compiled model: their specs, resolved targets, which are active,
and their parameters. CompiledModel's adapter calls (``add_adapter``, ``set_adapter``, ...) are
this registry's; ``peft_io`` and ``peftc.merging`` read adapters through it.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from peftc import peft_io
from peftc.errors import SpecError
from peftc.resolve import resolve_all, with_implied_entries
from peftc.spec import METHODS, MethodSpec, Spec

__all__ = ["AdapterState", "AdapterRegistry"]


@dataclass
class AdapterState:
    """One named adapter: its spec, the module paths each entry resolved to, trainability."""

    spec: Spec
    targets: list[dict[str, str]]
    trainable: bool = True


class AdapterRegistry:
    """Adapters by name, over one base model and one store of adapter modules (``store``,
    every adapter's modules at ``<module>.<store_dir>.<adapter>``)."""

    def __init__(self, base_model: nn.Module, store: nn.Module, spec: Spec, resolved: list[dict[str, str]]):
        self.base_model, self.store = base_model, store
        self.states: dict[str, AdapterState] = {spec.adapter: AdapterState(spec, resolved)}
        self.active: list[str] = [spec.adapter]
        self.optimize = spec.optimize  # model-level: every adapter's graphs are optimized alike
        self.enabled = True  # False: the base model's captured graph runs as is
        self.merged = False  # True: active adapters are folded into the weights the graphs read

    # ---- reading -------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return list(self.states)

    @property
    def primary(self) -> str:
        """The first active adapter (or the first added one)."""
        return self.active[0] if self.active else next(iter(self.states))

    @property
    def running(self) -> tuple[str, ...]:
        """The adapters the graphs insert now: the active ones, none while disabled."""
        return tuple(self.active) if self.enabled else ()

    def state(self, name: str) -> AdapterState:
        return self.states[name]

    def entries(self, name: str, kind: type[MethodSpec] | None = None) -> list[tuple[MethodSpec, dict[str, str]]]:
        """(entry, resolved module paths) of adapter ``name``, only ``kind``'s when given."""
        state = self.states[name]
        return [(m, t) for m, t in zip(state.spec.methods, state.targets) if kind is None or isinstance(m, kind)]

    def params(self, name: str) -> list[tuple[str, nn.Parameter]]:
        """Adapter ``name``'s parameters in the store, by store path."""
        dirs = {m.store_dir for m in METHODS.values()}
        return [(n, p) for n, p in self.store.named_parameters() if any(f".{d}.{name}." in f".{n}" for d in dirs)]

    # ---- changing ------------------------------------------------------------------------
    def add(self, spec: Spec) -> Spec:
        """Registers another adapter (resolved against the base model); returns its final spec."""
        if spec.adapter in self.states:
            raise SpecError("adapter", spec.adapter, f"a name not in use (taken: {self.names})")
        if spec.optimize and spec.optimize != self.optimize:
            first = self.states[next(iter(self.states))].spec.adapter
            raise SpecError(f"{spec.adapter}.optimize", dict(spec.optimize),
                            f"nothing (adapters inherit the model's) or the model's own {dict(self.optimize)}",
                            f"optimize is a model-level setting, given with adapter {first!r} or "
                            "peftc.compile(..., optimize=); set_optimize() changes it for every adapter")
        spec = spec.replace(optimize=self.optimize)
        task = spec.task_type or self.states[self.primary].spec.task_type
        spec = with_implied_entries(spec.replace(task_type=task), self.base_model)
        self.states[spec.adapter] = AdapterState(spec, resolve_all(spec, self.base_model))
        return spec

    def set_optimize(self, optimize: dict) -> None:
        """The model-level optimizations, for every adapter (each spec keeps a copy)."""
        self.optimize = optimize
        for state in self.states.values():
            state.spec = state.spec.replace(optimize=optimize)

    def activate(self, names) -> None:
        names = [names] if isinstance(names, str) else list(names)
        unknown = [n for n in names if n not in self.states]
        if unknown or not names:
            raise SpecError("adapter", unknown or names, f"names of added adapters {self.names}")
        self.active, self.enabled = names, True

    def delete(self, name: str) -> None:
        if name not in self.states:
            raise SpecError("adapter", name, f"one of {self.names}")
        if len(self.states) == 1:
            raise SpecError("adapter", name, "another adapter (the last one cannot be deleted)")
        del self.states[name]
        self.active = [n for n in self.active if n != name] or [next(iter(self.states))]
        dirs = {m.store_dir for m in METHODS.values()}
        for path in [p for p, _ in self.store.named_modules() if p.endswith(f".{name}")]:
            parent, _, leaf = path.rpartition(".")
            if parent.rpartition(".")[2] in dirs:
                delattr(self.store.get_submodule(parent), leaf)

    def refresh_trainable(self) -> None:
        """Only active, trainable adapters train (PEFT's set_adapter); the base stays frozen."""
        for name, state in self.states.items():
            on = state.trainable and self.enabled and name in self.active and not self.merged
            for _, p in self.params(name):
                p.requires_grad_(on)
            peft_io.train_base_tensors(self, name, on)
