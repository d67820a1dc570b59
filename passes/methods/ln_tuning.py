"""LN tuning (Zhao et al. 2023): train copies of the normalisation layers, as HF PEFT does.

    norm(x; w, b) (frozen)  ->  norm(x; w', b'),   w', b' a trainable copy, init w' = w, b' = b

The copy lives at ``<module>.ln_tuning_layers.<adapter>`` and is saved under PEFT's key
``base_model.model.<module>.ln_tuning_layers.<param>``. Swapping reuses passes/methods/train.py's
mechanism. With no ``targets`` the norms are PEFT's defaults for the model type. Merged,
the norm reads frozen snapshots of its trained copy (PEFT swaps the copy in).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import fx, nn

from peftc.graph import PEFTC, install_module
from peftc.passes.context import PassContext, PassResult
from peftc.passes.merge import HOLDER
from peftc.passes.methods.train import CopyMethod, TrainSpec, swap
from peftc.passes.pipeline import register_method
from peftc.spec import MethodSpec, check_targets

__all__ = ["LNTuningSpec", "rewrite", "merge", "DEFAULT_TARGETS", "STORE"]

STORE = "ln_tuning_layers"  # PEFT's attribute name; also where the copies live in the store

# PEFT's defaults (norm module names) for the families peftc is tested on.
DEFAULT_TARGETS = {
    "llama": ["input_layernorm", "post_attention_layernorm", "norm"],
    "mistral": ["input_layernorm", "post_attention_layernorm", "norm"],
    "gemma": ["input_layernorm", "post_attention_layernorm", "norm"],
    "gemma2": ["input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
               "post_feedforward_layernorm", "norm"],
    "qwen2": ["post_attention_layernorm"], "qwen3": ["post_attention_layernorm"],
    "phi": ["input_layernorm", "final_layernorm"], "falcon": ["input_layernorm", "post_attention_layernorm", "ln_f"],
    "bloom": ["input_layernorm", "post_attention_layernorm", "ln_f"],
    "gpt2": ["ln_1", "ln_2", "ln_f"], "gptj": ["ln_1", "ln_f"],
    "t5": ["layer_norm", "final_layer_norm"],
    "bart": ["self_attn_layer_norm", "encoder_attn_layer_norm", "final_layer_norm"],
}


@register_method("ln_tuning", peft_type="LN_TUNING", store_dir=STORE, phase="swap")
@dataclass(frozen=True)
class LNTuningSpec(CopyMethod):
    """``targets``: modules (norms) trained as copies; None = PEFT's default for the model type;
    ``exclude``: modules left out (PEFT's exclude_modules)."""

    targets: Any = None
    exclude: Any = None

    DEFAULT_TARGETS: ClassVar = DEFAULT_TARGETS

    def __post_init__(self):
        for name in ("targets", "exclude"):
            t = check_targets(f"ln_tuning.{name}", getattr(self, name), allow_none=True)
            if t == "all-linear":
                self.reject(name, "module names/suffixes, 're:<regex>' or null")
            object.__setattr__(self, name, t)

    @classmethod
    def from_peft(cls, cfg: Mapping) -> list[MethodSpec]:
        """LNTuningConfig dict -> [LNTuningSpec] (+ a TrainSpec for modules_to_save)."""
        tm, ex = cfg.get("target_modules"), cfg.get("exclude_modules")
        sel = lambda v: None if not v else "re:" + v if isinstance(v, str) else tuple(sorted(v))
        return [cls(targets=sel(tm), exclude=sel(ex)), *TrainSpec.from_modules_to_save(cfg)]

    @classmethod
    def to_peft(cls, entries: list, resolved: list[dict[str, str]], model: nn.Module) -> dict:
        """Exact module paths, so the checkpoint does not depend on PEFT's default tables."""
        return {"peft_type": "LN_TUNING", "target_modules": sorted(p for t in resolved for p in t),
                "exclude_modules": None}

    @classmethod
    def rewrite(cls, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        """Pre: nodes inside the targeted modules annotated. Post: they read trainable copies,
        each copy tagged with its PEFT checkpoint keys (``PEFT_KEYS``, read by peftc.peft_io)."""
        result = swap(cls, gm, ctx)
        adapter = ctx.spec.adapter
        for entry, paths in zip(ctx.spec.methods, ctx.targets):
            if not isinstance(entry, cls):
                continue
            for path in paths:
                try:
                    copy = ctx.store.get_submodule(f"{path}.{STORE}.{adapter}")
                except AttributeError:
                    continue  # a module without parameters the graph reads
                copy.PEFT_KEYS = {n: f"base_model.model.{path}.{STORE}.{n}" for n, _ in copy.named_parameters()}
        return result

    @classmethod
    def merged_rewrite(cls, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        return merge(gm, ctx)


def merge(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    """Pre: as ``rewrite``. Post: the targeted modules read frozen snapshots of their trained
    copies (buffers under merge.HOLDER), so no ln_tuning node remains."""
    gm, _ = LNTuningSpec.rewrite(gm, ctx)
    try:
        holder = gm.get_submodule(HOLDER)
    except AttributeError:
        holder = nn.Module()
        install_module(gm, HOLDER, holder)
    n = 0
    for node in gm.graph.nodes:
        info = node.meta.get(PEFTC, {})
        if node.op != "get_attr" or info.get("method") != "ln_tuning" or info.get("adapter") != ctx.spec.adapter:
            continue
        name = f"t{sum(1 for _ in holder.buffers(recurse=False))}"  # merge.py names them so too
        holder.register_buffer(name, gm.get_parameter(node.target).detach().clone(), persistent=False)
        node.target = f"{HOLDER}.{name}"
        node.meta[PEFTC] = {**info, "method": "merge", "role": "merged_weight"}
        n += 1
    ctx.counts["merge"] += n
    return PassResult(gm, n > 0)


rewrite = LNTuningSpec.rewrite
