"""LoHa (Hyeon-Woo et al. 2022, FedPara) as a graph rewrite, with HF PEFT's exact numerics.

    y = x W^T + b  ->  y + x dW^T,   dW = ((w1a @ w1b) * (w2a @ w2b)) * s,   s = alpha / r

w1a, w2a: (out, r); w1b, w2b: (r, in) (PEFT's ``hada_w1_a`` ... keys). PEFT builds dW and runs
``F.linear(x, dW)``; the graph does the same, as aten nodes after the base linear, so merging
(``fold``: W + dW) and the unmerged graph agree to rounding. Init as PEFT: w1a, w1b, w2a
kaiming-uniform(a=sqrt 5), w2b zero (``init: random``: w2b random too).

This file also holds what LoHa and LoKr (passes/methods/lokr.py) share: ``LycorisSpec`` (the fields of
PEFT's LycorisConfig, their PEFT IO, and the term ``x dW^T`` around a method's dW builder). PEFT's rank_dropout / module_dropout are not implemented: a non-zero
value is a SpecError. Only nn.Linear layers: PEFT has no LoHa/LoKr for GPT-2's Conv1D.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any, ClassVar

import torch
from torch import fx, nn

from peftc.errors import CheckpointError, SpecError
from peftc.graph import Inserter
from peftc.passes.context import PassContext
from peftc.passes.methods.linear import LinearMethod, LinearTarget
from peftc.passes.methods.lora import pattern_value
from peftc.passes.methods.train import TrainSpec
from peftc.passes.pipeline import register_method
from peftc.spec import MethodSpec, check_layer_selection, check_targets

__all__ = ["LycorisSpec", "LohaSpec", "LohaWeights", "EAGER", "kaiming_init", "rewrite"]

aten = torch.ops.aten


class _EagerOps:
    """Stands in for an Inserter: runs a dW builder's ops on tensors at once (merge's fold)."""

    @staticmethod
    def call(target, args: tuple, role: str, kwargs: dict | None = None):
        return target(*args, **(kwargs or {}))


EAGER = _EagerOps()


def _selector(v):
    """PEFT target_modules / exclude_modules -> peftc selector."""
    if v is None or v == []:
        return None
    if isinstance(v, str):
        return "all-linear" if v.lower() == "all-linear" else "re:" + v
    return tuple(sorted(v))


def _peft_selector(v):
    return None if v is None else v if v == "all-linear" else v[3:] if isinstance(v, str) else list(v)


@dataclass(frozen=True)
class LycorisSpec(LinearMethod):
    """Fields of PEFT's LycorisConfig shared by LoHa and LoKr (not registered itself).

    ``targets``: names/suffixes, "re:<regex>" or "all-linear"; ``alpha``: scaling numerator
    (s = alpha / r); ``init``: "default" (the adapted model equals the base) or "random".
    """

    targets: Any
    r: int = 8
    alpha: float = 8
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    init: str = "default"
    use_effective_conv2d: bool = False  # conv layers only: kept for PEFT config round trips
    exclude: Any = None
    layers: Any = None
    layers_pattern: Any = None
    rank_pattern: Mapping = field(default_factory=dict)
    alpha_pattern: Mapping = field(default_factory=dict)

    kinds: ClassVar[tuple[str, ...]] = ("linear",)
    mixed_batch: ClassVar[bool] = True
    INITS: ClassVar[dict[Any, str]] = {True: "default", False: "random"}  # PEFT init_weights -> init
    autocast: ClassVar[bool] = True  # PEFT upcasts LoHa / LoKr factors on bf16/fp16 bases

    def __post_init__(self):
        m = self.method
        object.__setattr__(self, "targets", check_targets(f"{m}.targets", self.targets))
        object.__setattr__(self, "exclude", check_targets(f"{m}.exclude", self.exclude, allow_none=True))
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            self.reject("r", "an integer > 0")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or self.alpha <= 0:
            self.reject("alpha", "a number > 0")
        for name in ("rank_dropout", "module_dropout"):
            if getattr(self, name) not in (0, 0.0) or isinstance(getattr(self, name), bool):
                self.reject(name, "0.0", f"peftc does not implement {m}'s {name}")
        if self.init not in self.INITS.values():
            self.reject("init", f"one of {sorted(set(self.INITS.values()))}")
        if not isinstance(self.use_effective_conv2d, bool):
            self.reject("use_effective_conv2d", "true or false")
        check_layer_selection(self)
        for name in ("rank_pattern", "alpha_pattern"):
            pat = getattr(self, name)
            if not isinstance(pat, Mapping) or not all(
                    isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0
                    and (name == "alpha_pattern" or isinstance(v, int)) for k, v in pat.items()):
                self.reject(name, "a mapping of module-name pattern -> positive number")

    def rank_for(self, path: str) -> int:
        return pattern_value(self.rank_pattern, path, self.r)

    def scaling_for(self, path: str) -> float:
        """PEFT's LycorisLayer scaling: alpha / r (per-module from the patterns)."""
        return pattern_value(self.alpha_pattern, path, self.alpha) / self.rank_for(path)

    def delta(self, ins: Inserter, target: LinearTarget, path: str, ctx: PassContext) -> fx.Node:
        """``linear(x, dW)`` after the base linear (PEFT's order), dW from the module's builder."""
        module = target.gm.get_submodule(path)
        dw = module.delta(ins, lambda leaf: ins.get_attr(f"{path}.{leaf}"), self.scaling_for(target.module))
        return ins.call(aten.linear.default, (target.input(ins), dw), "delta")  # x.to(dW.dtype), as PEFT

    def fold(self, path: str, module: nn.Module, w: torch.Tensor, b, transposed: bool):
        """Merged weight (merge.py): W + dW, dW computed by the same builder as the graph."""
        dw = module.delta(EAGER, partial(getattr, module), self.scaling_for(path))
        return (w + dw).to(w.dtype), None

    # ---- HF PEFT LoHaConfig / LoKrConfig <-> spec -------------------------------------------
    EXTRA: ClassVar[tuple[str, ...]] = ()  # method-specific fields, same name in PEFT's config

    @classmethod
    def from_peft(cls, cfg: Mapping) -> list[MethodSpec]:
        """PEFT config dict -> [spec] (+ a TrainSpec for modules_to_save)."""
        targets = _selector(cfg.get("target_modules"))
        if targets is None:
            raise SpecError("peft.target_modules", cfg.get("target_modules"), "a list of module names or a regex")
        init = cfg.get("init_weights", True)
        if init not in cls.INITS:
            raise SpecError("peft.init_weights", init, f"one of {list(cls.INITS)}")
        layers, pattern = cfg.get("layers_to_transform"), cfg.get("layers_pattern")
        entry = cls(
            targets=targets, r=cfg.get("r", 8), alpha=cfg.get("alpha", 8),
            rank_dropout=cfg.get("rank_dropout", 0.0), module_dropout=cfg.get("module_dropout", 0.0),
            init=cls.INITS[init], use_effective_conv2d=bool(cfg.get("use_effective_conv2d", False)),
            exclude=_selector(cfg.get("exclude_modules")),
            layers=tuple(layers) if isinstance(layers, list) else layers,
            layers_pattern=tuple(pattern) if isinstance(pattern, list) else pattern,
            rank_pattern=dict(cfg.get("rank_pattern") or {}), alpha_pattern=dict(cfg.get("alpha_pattern") or {}),
            **{k: cfg[k] for k in cls.EXTRA if k in cfg},
        )
        return [entry, *TrainSpec.from_modules_to_save(cfg)]

    @classmethod
    def to_peft(cls, entries: list, resolved: list[dict[str, str]], model: nn.Module) -> dict:
        """Entries -> PEFT config fields. One entry keeps its selectors; several become exact
        module paths with rank_pattern / alpha_pattern where r or alpha differ."""
        first = entries[0]
        shared = ("rank_dropout", "module_dropout", "init", "use_effective_conv2d", *cls.EXTRA)
        for e in entries[1:]:
            for f in shared:
                if getattr(e, f) != getattr(first, f):
                    raise CheckpointError(f"{cls.method} entries differ in {f!r} ({getattr(first, f)!r} vs "
                                          f"{getattr(e, f)!r}); save them as separate adapters")
        init = next(k for k, v in cls.INITS.items() if v == first.init)
        cfg = {"peft_type": cls.peft_type, "r": first.r, "alpha": first.alpha, "init_weights": init,
               **{f: getattr(first, f) for f in shared if f != "init"}}
        if len(entries) == 1:
            cfg.update(target_modules=_peft_selector(first.targets), exclude_modules=_peft_selector(first.exclude),
                       layers_to_transform=list(first.layers) if isinstance(first.layers, tuple) else first.layers,
                       layers_pattern=list(first.layers_pattern) if isinstance(first.layers_pattern, tuple)
                       else first.layers_pattern,
                       rank_pattern=dict(first.rank_pattern), alpha_pattern=dict(first.alpha_pattern))
            return cfg
        paths = {p: e for e, t in zip(entries, resolved) for p in t}
        cfg["target_modules"] = sorted(paths)
        cfg["rank_pattern"] = {re.escape(p): e.rank_for(p) for p, e in paths.items() if e.rank_for(p) != first.r}
        alpha = {p: pattern_value(e.alpha_pattern, p, e.alpha) for p, e in paths.items()}
        cfg["alpha_pattern"] = {re.escape(p): v for p, v in alpha.items() if v != first.alpha}
        return cfg

    def to_dict(self) -> dict:
        d = super().to_dict()
        d["rank_pattern"], d["alpha_pattern"] = dict(self.rank_pattern), dict(self.alpha_pattern)
        return {k: v for k, v in d.items() if v not in (None, {}) or k == "targets"}


@register_method("loha", peft_type="LOHA", phase="reparameterize")
@dataclass(frozen=True)
class LohaSpec(LycorisSpec):
    """LoHa: dW = (w1a w1b) ⊙ (w2a w2b) * alpha / r on each targeted linear."""

    def make_module(self, target: LinearTarget, ctx: PassContext) -> nn.Module:
        return LohaWeights(target.in_features, target.out_features, self.rank_for(target.module), self.init,
                           target.weight)


def kaiming_init(t: torch.Tensor) -> torch.Tensor:
    nn.init.kaiming_uniform_(t, a=math.sqrt(5))
    return t


class LohaWeights(nn.Module):
    """The four LoHa factors of one linear layer, under PEFT's names and shapes."""

    def __init__(self, in_features: int, out_features: int, r: int, init: str, like: torch.Tensor):
        super().__init__()
        kw = {"dtype": like.dtype, "device": like.device}
        for name, shape in (("hada_w1_a", (out_features, r)), ("hada_w1_b", (r, in_features)),
                            ("hada_w2_a", (out_features, r)), ("hada_w2_b", (r, in_features))):
            setattr(self, name, nn.Parameter(kaiming_init(torch.empty(shape, **kw))))
        if init == "default":  # one zero factor: the adapted model starts equal to the base
            nn.init.zeros_(self.hada_w2_b)

    def delta(self, ops, get: Callable[[str], Any], scale: float):
        """dW = ((w1a @ w1b) * (w2a @ w2b)) * scale, as PEFT's HadaWeight orders it; ``ops`` is an
        Inserter (graph nodes) or EAGER (tensors), ``get`` fetches a parameter by name."""
        w1 = ops.call(aten.mm.default, (get("hada_w1_a"), get("hada_w1_b")), "w1")
        w2 = ops.call(aten.mm.default, (get("hada_w2_a"), get("hada_w2_b")), "w2")
        prod = ops.call(aten.mul.Tensor, (w1, w2), "hadamard")
        return ops.call(aten.mul.Tensor, (prod, scale), "scale")


rewrite = LohaSpec.rewrite  # the method's pass (passes/methods/linear.py's skeleton)
