"""Train whole modules (PEFT's ``modules_to_save``), e.g. a classification head.

    W (frozen, shared with the base model) -> W' (a trainable copy, ``<path>.modules_to_save.<adapter>``)

``swap`` is the mechanism for every method that trains existing parameters (BitFit too).

Only uses inside the trained module are retargeted, so a weight tied elsewhere (an embedding
shared with the LM head) keeps its frozen original at the other uses, as in PEFT.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from functools import partial
from typing import Any, ClassVar

from torch import fx, nn

from peftc.errors import PeftcError
from peftc.graph import PEFTC, mount_adapter
from peftc.passes.pipeline import SITES, PassContext, PassResult
from peftc.spec import MethodSpec, check_targets, register_method

__all__ = ["TrainSpec", "rewrite", "swap", "trainable_copy"]


@register_method("train", store_dir="modules_to_save")
@dataclass(frozen=True)
class TrainSpec(MethodSpec):
    """``targets``: module names/suffixes or "re:<regex>" whose parameters all train."""

    targets: Any

    sites: ClassVar[str] = "module"
    protects: ClassVar[bool] = True  # PEFT: no adapter goes inside a module trained whole

    def trains(self, name: str) -> bool:
        return True

    def copy_of(self, module: nn.Module) -> nn.Module:
        return trainable_copy(module)

    def __post_init__(self):
        t = check_targets("train.targets", self.targets)
        if t == "all-linear":
            self._err("targets", "module names/suffixes or 're:<regex>' ('all-linear' is for adapters)")
        object.__setattr__(self, "targets", t)


def swap(kind: type, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    """Pre: nodes inside modules of ``kind`` entries annotated. Post: the parameters they read
    (those ``entry.trains(name)`` accepts) come from trainable copies made by ``entry.copy_of``."""
    adapter = ctx.spec.adapter
    entries = [m for m in ctx.spec.methods if isinstance(m, kind)]
    if ctx.sample_mask and entries:
        raise PeftcError("a mixed batch (per-sample adapter_names) works with the LoRA family only; "
                         f"adapter {adapter!r} uses {entries[0].method}")
    swapped = 0
    for node in list(gm.graph.nodes):
        for i in node.meta.get(SITES, ()):
            entry = ctx.spec.methods[i]
            if not isinstance(entry, kind):
                continue
            owner = _owner(node)
            root = max((p for p in ctx.targets[i] if owner == p or owner.startswith(p + ".")), key=len)
            original = ctx.model.get_submodule(root)
            by_id = {id(t): name for name, t in original.named_parameters() if entry.trains(name)}
            for arg in node.all_input_nodes:
                if arg.op != "get_attr" or PEFTC in arg.meta:
                    continue
                rel = by_id.get(id(_fetch(gm, arg.target)))
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
    if entries:
        ctx.counts[entries[0].method] += swapped
    return PassResult(gm, swapped > 0)


rewrite = partial(swap, TrainSpec)


def _owner(node: fx.Node) -> str:
    return list(node.meta["nn_module_stack"].values())[-1][0]


def _fetch(gm: fx.GraphModule, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def trainable_copy(module: nn.Module) -> nn.Module:
    dup = copy.deepcopy(module)
    for p in dup.parameters():
        p.requires_grad_(True)
    return dup
