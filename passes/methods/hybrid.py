"""MAM adapter and UniPELT: spec-level combinations of existing passes, no code path of their own.

``mam`` (He et al. 2021, AdapterHub's MAMConfig) expands into

    prefix      tokens 30, bottleneck-MLP reparameterisation (projection) of width 800
    bottleneck  placement parallel: FFN adapter from the residual, reduction 2, relu, scaling 4,
                init mam_adapter (zero up projection)

``unipelt`` (Mao et al. 2022, AdapterHub's UniPELTConfig) expands into, every part gated,

    lora        r 8 on the query and value projections; the gate replaces alpha / r
    prefix      tokens 10, projection of width 512
    bottleneck  placement pfeiffer, reduction 16, relu, init bert

so a layer computes ``W x + g_L(x) B A x`` on q / v, attention over
``[g_P(x) E_k ; k], [g_P(x) E_v ; v]`` and Pfeiffer's ``y + g_A(y) A(y)`` (pre-LN) after the FFN,
each ``g(x) = mean_seq sigmoid(x W_g^T + b_g)`` a scalar per sample and module (see
passes/methods/lora.py, passes/methods/prefix.py, passes/methods/bottleneck.py for the exact formulas). The prefix
follows peftc's prefix pass (PEFT's semantics: query positions shifted by the prefix
length; AdapterHub leaves them unshifted) and sizes prefixes by key/value heads.

Example::

    Spec.from_dict({"methods": [{"unipelt": {"prefix_tokens": 16}}]}).methods
    # -> (LoraSpec(..., gate=True), PrefixSpec(tokens=16, ..., gate=True), BottleneckSpec(..., gate=True))
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from peftc.errors import SpecError
from peftc.passes.methods.bottleneck import BottleneckSpec
from peftc.passes.methods.lora import LoraSpec
from peftc.passes.methods.prefix import PrefixSpec
from peftc.passes.pipeline import register_method
from peftc.spec import MethodSpec, Sites, check_targets

__all__ = ["MamSpec", "UniPeltSpec", "QV_TARGETS"]

QV_TARGETS = r"re:(.*\.)?(q_proj|v_proj|query|value|c_attn)"  # AdapterHub's attn_matrices ["q", "v"]


def _positive_int(spec: MethodSpec, name: str):
    v = getattr(spec, name)
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        spec.reject(name, "an integer > 0")


def _expand_checked(spec: MethodSpec) -> None:
    """Builds the parts once so that a bad value fails now, named by this entry's field."""
    try:
        spec.expand()
    except SpecError as e:
        part, _, name = e.field.partition(".")
        name = {"lora": "lora_", "prefix": "prefix_"}.get(part, "") + name
        raise SpecError(f"{spec.method}.{name}", e.value, e.allowed) from None


@register_method("mam", phase=None)  # expands into prefix + bottleneck entries
@dataclass(frozen=True)
class MamSpec(MethodSpec):
    """Mix-and-match adapter: prefix tuning + a parallel FFN adapter (AdapterHub's defaults)."""

    prefix_tokens: int = 30
    prefix_hidden: int = 800
    reduction: float = 2
    scaling: Any = 4.0
    activation: str = "relu"

    sites: ClassVar[Sites] = Sites.GRAPH

    def __post_init__(self):
        _positive_int(self, "prefix_tokens")
        _positive_int(self, "prefix_hidden")
        _expand_checked(self)

    def expand(self) -> list[MethodSpec]:
        return [PrefixSpec(tokens=self.prefix_tokens, projection=True, hidden=self.prefix_hidden),
                BottleneckSpec(placement="parallel", reduction=self.reduction, scaling=self.scaling,
                               activation=self.activation)]


@register_method("unipelt", phase=None)  # expands into lora + prefix + bottleneck entries
@dataclass(frozen=True)
class UniPeltSpec(MethodSpec):
    """UniPELT: gated LoRA + gated prefix + gated Pfeiffer adapter (AdapterHub's defaults).
    ``lora_targets`` defaults to the query and value projections of common model families."""

    lora_targets: Any = QV_TARGETS
    lora_r: int = 8
    lora_alpha: float = 2
    prefix_tokens: int = 10
    prefix_hidden: int = 512
    reduction: float = 16

    sites: ClassVar[Sites] = Sites.GRAPH

    def __post_init__(self):
        object.__setattr__(self, "lora_targets", check_targets("unipelt.lora_targets", self.lora_targets))
        _positive_int(self, "lora_r")
        _positive_int(self, "prefix_tokens")
        _positive_int(self, "prefix_hidden")
        _expand_checked(self)

    def expand(self) -> list[MethodSpec]:
        return [LoraSpec(targets=self.lora_targets, r=self.lora_r, alpha=self.lora_alpha, gate=True),
                PrefixSpec(tokens=self.prefix_tokens, projection=True, hidden=self.prefix_hidden, gate=True),
                BottleneckSpec(placement="pfeiffer", reduction=self.reduction, gate=True)]
