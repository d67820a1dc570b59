"""VeRA (Kopiczko et al. 2024): one frozen random projection pair shared by every adapted
layer, and two trainable vectors per layer, with HF PEFT's exact numerics.

    y = x W^T + b  ->  y + l_b * (B[:out] (l_d * (A[:, :in] dropout(x))))

A: (r, max_in), B: (max_out, r), the largest in/out features over the adapted layers, drawn
once per adapter from ``prng_key`` as PEFT does (kaiming-uniform with a seeded CPU generator,
A first), so a checkpoint saved without them (``save_projection: false``) reloads exactly.
l_d: (r,) starts at ``d_initial``, l_b: (out,) at zero (the adapted model equals the base);
``init: random`` is PEFT's ``init_weights=False`` (l_b ones, l_d normal).

Conv1D (GPT-2) is supported as in PEFT: the adapter reads the same 2-D input view as the
addmm, and the merged delta is transposed to the (in, out) layout.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any, ClassVar

import torch
from torch import fx, nn

from peftc.errors import SpecError
from peftc.graph import Inserter, mount_adapter
from peftc.passes import dtype_policy
from peftc.passes.context import PassContext
from peftc.passes.methods.linear import LinearMethod, LinearTarget
from peftc.passes.methods.train import TrainSpec
from peftc.passes.pipeline import register_method
from peftc.spec import MethodSpec, check_layer_selection, check_targets

__all__ = ["VeraSpec", "VeraProjection", "VeraVectors", "rewrite", "DEFAULT_TARGETS", "INITS"]

aten = torch.ops.aten
INITS = ("default", "random")

# PEFT's VeRA defaults (its LoRA table; phi differs) for the families peftc is tested on.
DEFAULT_TARGETS = {
    "llama": ["q_proj", "v_proj"], "mistral": ["q_proj", "v_proj"], "mixtral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"], "qwen3": ["q_proj", "v_proj"], "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"], "phi": ["q_proj", "v_proj"], "opt": ["q_proj", "v_proj"],
    "gpt2": ["c_attn"], "bloom": ["query_key_value"], "gpt_neox": ["query_key_value"],
    "bert": ["query", "value"], "roberta": ["query", "value"], "t5": ["q", "v"],
}

_PEFT_DEFAULTS = {"bias": "none"}  # VeraConfig fields peftc does not implement: must keep the default


@register_method("vera", peft_type="VERA", phase="reparameterize")
@dataclass(frozen=True)
class VeraSpec(LinearMethod):
    """``targets``: selectors (None = PEFT's default for the model type); ``r``: projection rank."""

    targets: Any = None
    r: int = 256
    d_initial: float = 0.1
    dropout: float = 0.0
    prng_key: int = 0
    save_projection: bool = True
    init: str = "default"
    layers: Any = None
    layers_pattern: Any = None

    DEFAULT_TARGETS: ClassVar = DEFAULT_TARGETS

    def __post_init__(self):
        object.__setattr__(self, "targets", check_targets("vera.targets", self.targets, allow_none=True))
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            self.reject("r", "an integer > 0")
        if isinstance(self.d_initial, bool) or not isinstance(self.d_initial, (int, float)):
            self.reject("d_initial", "a number (PEFT recommends <= 0.1)")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            self.reject("dropout", "a number in [0, 1)")
        if isinstance(self.prng_key, bool) or not isinstance(self.prng_key, int) or self.prng_key < 0:
            self.reject("prng_key", "an integer >= 0 (the seed of the shared projections)")
        if not isinstance(self.save_projection, bool):
            self.reject("save_projection", "true or false")
        if self.init not in INITS:
            self.reject("init", f"one of {list(INITS)}")
        check_layer_selection(self)
        if self.layers_pattern is not None and self.layers is None:
            self.reject("layers_pattern", "null unless 'layers' is set (as in PEFT)")

    # ---- the rewrite (passes/methods/linear.py): parameters and the term added to y -----------------
    autocast: ClassVar[bool] = True  # PEFT upcasts VeRA's vectors and projections on bf16/fp16 bases

    def make_module(self, target: LinearTarget, ctx: PassContext) -> nn.Module:
        shared = ctx.store.get_submodule(_projection(target.gm, ctx, target.weight))
        return VeraVectors(self.r, target.out_features, self, shared, target.weight)

    def delta(self, ins: Inserter, target: LinearTarget, path: str, ctx: PassContext) -> fx.Node:
        """``l_b * linear(l_d * linear(dropout(x), A[:, :in]), B[:out])``, PEFT's op order; the
        dropout node comes right after the base linear, as PEFT calls it."""
        proj = _projection(target.gm, ctx, target.weight)
        a = ins.call(aten.slice.Tensor, (ins.get_attr(f"{proj}.vera_A", "projection"), 1, 0, target.in_features),
                     "slice_A")
        b = ins.call(aten.slice.Tensor, (ins.get_attr(f"{proj}.vera_B", "projection"), 0, 0, target.out_features),
                     "slice_B")
        lam_d, lam_b = ins.get_attr(f"{path}.vera_lambda_d"), ins.get_attr(f"{path}.vera_lambda_b")
        x = target.input(ins)  # x.to(lambda_d.dtype), as PEFT (passes/dtype_policy.py)
        if self.dropout > 0:
            x = ins.call(aten.dropout.default, (x, float(self.dropout), True), "dropout")
        h = ins.call(aten.mul.Tensor, (lam_d, ins.call(aten.linear.default, (x, a), "vera_A")), "lambda_d")
        return ins.call(aten.mul.Tensor, (lam_b, ins.call(aten.linear.default, (h, b), "vera_B")), "lambda_b")

    def fold(self, path: str, module: nn.Module, w: torch.Tensor, b, transposed: bool):
        """Merged weight (merge.py): W + (l_b B[:out]) (l_d A[:, :in]), as PEFT's delta."""
        out_f, in_f = (w.shape[1], w.shape[0]) if transposed else w.shape
        a, bm = module.projection.sliced(in_f, out_f)
        delta = (module.vera_lambda_b[:, None] * bm) @ (module.vera_lambda_d[:, None] * a)
        return w + (delta.t() if transposed else delta).to(w.dtype), None

    # ---- HF PEFT VeraConfig <-> VeraSpec --------------------------------------------------
    @classmethod
    def from_peft(cls, cfg: Mapping) -> list[MethodSpec]:
        """VeraConfig dict -> [VeraSpec] (+ a TrainSpec for modules_to_save)."""
        for key, default in _PEFT_DEFAULTS.items():
            if cfg.get(key, default) != default:
                raise SpecError(f"peft.{key}", cfg[key], repr(default), "not supported by peftc's VeRA")
        tm = cfg.get("target_modules")
        targets = None if not tm else "re:" + tm if isinstance(tm, str) else tuple(sorted(tm))
        listed = {k: tuple(v) if isinstance(v, list) else v
                  for k, v in (("layers", cfg.get("layers_to_transform")), ("layers_pattern", cfg.get("layers_pattern")))}
        entry = cls(targets=targets, r=cfg.get("r", 256), d_initial=cfg.get("d_initial", 0.1),
                    dropout=cfg.get("vera_dropout", 0.0), prng_key=cfg.get("projection_prng_key", 0),
                    save_projection=cfg.get("save_projection", True),
                    init="default" if cfg.get("init_weights", True) else "random", **listed)
        return [entry, *TrainSpec.from_modules_to_save(cfg)]

    @classmethod
    def to_peft(cls, entries: list, resolved: list[dict[str, str]], model: nn.Module) -> dict:
        """Exact module paths, so the checkpoint does not depend on PEFT's default tables."""
        first = _shared(entries)
        return {"peft_type": "VERA", "r": first.r, "target_modules": sorted(p for t in resolved for p in t),
                "projection_prng_key": first.prng_key, "save_projection": first.save_projection,
                "vera_dropout": first.dropout, "d_initial": first.d_initial, "bias": "none",
                "fan_in_fan_out": any(k == "conv1d" for t in resolved for k in t.values()),
                "init_weights": first.init == "default", "layers_to_transform": None, "layers_pattern": None}


def _shared(entries: list[VeraSpec]) -> VeraSpec:
    """One adapter has one projection pair and one PEFT config: its VeRA entries must agree."""
    first = entries[0]
    for e in entries[1:]:
        for f in ("r", "prng_key", "save_projection", "dropout", "d_initial", "init"):
            if getattr(e, f) != getattr(first, f):
                raise SpecError(f"vera.{f}", getattr(e, f), f"{getattr(first, f)!r}, as in the adapter's first "
                                "VeRA entry", "its entries share one projection pair and one PEFT config")
    return first


def _kaiming_uniform(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """PEFT's projection init: U(-b, b), b = sqrt(3) * sqrt(2) / sqrt(fan_in), fan_in = shape[1]."""
    bound = math.sqrt(3.0) * math.sqrt(2.0) / math.sqrt(shape[1])
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


class VeraProjection(nn.Module):
    """The frozen projections of one adapter (buffers: never trained, saved under PEFT's keys
    ``base_model.vera_A`` / ``base_model.vera_B`` unless ``save_projection`` is off)."""

    def __init__(self, r: int, max_in: int, max_out: int, prng_key: int, save: bool, like: torch.Tensor):
        super().__init__()
        g = torch.Generator(device="cpu").manual_seed(prng_key)
        a = _kaiming_uniform((r, max_in), g)
        b = _kaiming_uniform((max_out, r), g)
        self.register_buffer("vera_A", a.to(like.device, like.dtype))
        self.register_buffer("vera_B", b.to(like.device, like.dtype))
        self.PEFT_KEYS = {"vera_A": "base_model.vera_A", "vera_B": "base_model.vera_B"} if save else {}

    def sliced(self, in_f: int, out_f: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.vera_A[:, :in_f], self.vera_B[:out_f, :]


class VeraVectors(nn.Module):
    """The trainable vectors of one adapted layer (PEFT's names); ``projection`` is a plain
    reference to the shared pair (not a submodule, so its buffers have one name only)."""

    def __init__(self, r: int, out_features: int, entry: VeraSpec, projection: VeraProjection, like: torch.Tensor):
        super().__init__()
        kw = {"dtype": like.dtype, "device": like.device}
        if entry.init == "default":
            b, d = torch.zeros(out_features, **kw), torch.full((r,), float(entry.d_initial), **kw)
        else:
            b, d = torch.ones(out_features, **kw), torch.randn(r, **kw)
        self.vera_lambda_b, self.vera_lambda_d = nn.Parameter(b), nn.Parameter(d)
        object.__setattr__(self, "projection", projection)


def _projection(gm: fx.GraphModule, ctx: PassContext, like: torch.Tensor) -> str:
    """Mounts the adapter's shared projections, sized over every layer its VeRA entries adapt."""
    mine = [(e, t) for e, t in zip(ctx.spec.methods, ctx.targets) if isinstance(e, VeraSpec)]
    first = _shared([e for e, _ in mine])
    shapes = []
    for _, t in mine:
        for p, kind in t.items():
            w = ctx.model.get_submodule(p).weight
            shapes.append(tuple(w.shape) if kind == "conv1d" else tuple(w.shape[::-1]))  # (in, out)
    max_in, max_out = max(s[0] for s in shapes), max(s[1] for s in shapes)
    make = partial(VeraProjection, first.r, max_in, max_out, first.prng_key, first.save_projection, like)
    autocast = getattr(ctx.spec, dtype_policy.FIELD, True)  # PEFT upcasts the projections too
    return mount_adapter(ctx.store, gm, f"vera.{ctx.spec.adapter}",
                         lambda: dtype_policy.upcast_module(make(), autocast))


rewrite = VeraSpec.rewrite  # the method's pass (passes/methods/linear.py's skeleton)
