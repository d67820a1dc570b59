"""Train whole modules (PEFT's ``modules_to_save``), e.g. a classification head.

    W (frozen, shared with the base model) -> W' (a trainable copy, ``<path>.modules_to_save.<adapter>``)

``CopyMethod`` and ``swap`` are the mechanism for every method that trains copies of existing
parameters (BitFit, LN tuning too). Only uses inside the trained module are retargeted, so a
weight tied elsewhere (an embedding shared with the LM head) keeps its frozen original at the
other uses, as in PEFT.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any, ClassVar

from torch import fx, nn

from peftc import targets
from peftc.graph import PEFTC, fetch_attr, mount_adapter, stack_owner
from peftc.passes.context import PassContext, PassResult, marked_nodes
from peftc.passes.pipeline import register_method
from peftc.spec import Merging, MethodSpec, Sites, Spec, check_targets

__all__ = ["CopyMethod", "TrainSpec", "rewrite", "swap", "trainable_copy"]


def trainable_copy(module: nn.Module) -> nn.Module:
    dup = copy.deepcopy(module)
    for p in dup.parameters():
        p.requires_grad_(True)
    return dup


@dataclass(frozen=True)
class CopyMethod(MethodSpec):
    """Base of the methods that train copies of a module's own parameters: ``trains(name)``
    picks them, ``copy_of(module)`` makes the copy; merged, the copies are simply read."""

    sites: ClassVar[Sites] = Sites.MODULE
    merging: ClassVar[Merging] = Merging.REWRITE

    def trains(self, name: str) -> bool:
        return True

    def copy_of(self, module: nn.Module) -> nn.Module:
        return trainable_copy(module)

    @classmethod
    def rewrite(cls, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        return swap(cls, gm, ctx)


@register_method("train", store_dir="modules_to_save", phase="whole_modules")
@dataclass(frozen=True)
class TrainSpec(CopyMethod):
    """``targets``: module names/suffixes or "re:<regex>" whose parameters all train."""

    targets: Any

    owns_modules: ClassVar[bool] = True  # PEFT: no adapter goes inside a module trained whole
    peft_field: ClassVar[str] = "modules_to_save"  # saved in the PEFT method's config

    def __post_init__(self):
        t = check_targets("train.targets", self.targets)
        if t == "all-linear":
            self.reject("targets", "module names/suffixes or 're:<regex>' ('all-linear' is for adapters)")
        object.__setattr__(self, "targets", t)

    @classmethod
    def from_modules_to_save(cls, cfg: Mapping) -> list[MethodSpec]:
        """A PEFT config's ``modules_to_save`` as entries; a SEQ_CLS head is left out, since the
        task type implies it (``implied_entries``)."""
        save = [m for m in cfg.get("modules_to_save") or ()
                if not (cfg.get("task_type") == "SEQ_CLS" and m in targets.SEQ_CLS_HEADS)]
        return [cls(targets=tuple(save))] if save else []

    @classmethod
    def implied_entries(cls, spec: Spec, model: nn.Module) -> list[MethodSpec]:
        """PEFT trains the classification head of SEQ_CLS models whole; so does peftc."""
        if spec.task_type != "SEQ_CLS":
            return []
        heads = [h for h in targets.seq_cls_heads(model)
                 if not any(isinstance(m, cls) and h in m.targets for m in spec.methods)]
        return [cls(targets=tuple(heads))] if heads else []


def swap(kind: type, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    """Pre: nodes inside modules of ``kind`` entries annotated. Post: the parameters they read
    (those ``entry.trains(name)`` accepts) come from trainable copies made by ``entry.copy_of``."""
    adapter = ctx.spec.adapter
    swapped = 0
    for node, i, entry in marked_nodes(gm, ctx, kind):
        owner = stack_owner(node)
        root = max((p for p in ctx.targets[i] if owner == p or owner.startswith(p + ".")), key=len)
        original = ctx.model.get_submodule(root)
        by_id = {id(t): name for name, t in original.named_parameters() if entry.trains(name)}
        for arg in node.all_input_nodes:
            if arg.op != "get_attr" or PEFTC in arg.meta:
                continue
            rel = by_id.get(id(fetch_attr(gm, arg.target)))
            if rel is None:
                continue
            path = mount_adapter(ctx.store, gm, f"{root}.{entry.store_dir}.{adapter}",
                                 partial(entry.copy_of, original))
            with gm.graph.inserting_before(node):
                new = gm.graph.get_attr(f"{path}.{rel}")
            new.meta[PEFTC] = {"method": entry.method, "adapter": adapter, "module": root,
                               "role": "param_swap"}
            node.replace_input_with(arg, new)
            swapped += 1
    if any(isinstance(m, kind) for m in ctx.spec.methods):
        ctx.counts[kind.method] += swapped
    return PassResult(gm, swapped > 0)


rewrite = TrainSpec.rewrite
