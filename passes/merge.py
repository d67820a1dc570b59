"""Merging: fold adapters into the weights a graph reads, leaving no adapter nodes.

    LoRA   W' = W + s B A            DoRA  W' = (m / ||W + s B A||_row) (W + s B A)
    IA3    W' = W * l (rows; and b' = b * l)   feedforward: W' = W * l (columns)
    SSF    W' = g W (rows), b' = g b + beta     BitFit / train: the trained copies replace W, b

Each method spec that can be merged has ``fold(path, module, W, b, transposed) -> (W', b')``
(``W`` as the graph stores it: (in, out) for Conv1D). The base model's parameters are never
modified: merged tensors are new buffers the graph reads, so ``unmerge`` is exact.
"""

from __future__ import annotations

import copy
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import fx, nn

from peftc.errors import PeftcError
from peftc.graph import PEFTC, as_linear_site, install_module
from peftc.passes.context import SITES, PassContext, PassResult

__all__ = ["merge", "merged_state_dict", "save_merged", "fold_state_dict"]

HOLDER = "_peftc_merged"


def _fold_of(entry):
    fold = getattr(entry, "fold", None)
    if fold is None:
        raise PeftcError(f"method {entry.method!r} cannot be merged into the base weights")
    return fold


def merge(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    """Pre: adapted linears annotated (select). Post: they read merged weight/bias buffers."""
    try:
        holder = gm.get_submodule(HOLDER)
    except AttributeError:
        holder = nn.Module()
        install_module(gm, HOLDER, holder)
    n = 0
    for node in list(gm.graph.nodes):
        for i in node.meta.get(SITES, ()):
            entry = ctx.spec.methods[i]
            if entry.sites != "linear":
                continue
            site = as_linear_site(node)
            module = ctx.store.get_submodule(f"{site.module}.{entry.store_dir}.{ctx.spec.adapter}")
            b_node = node.args[0] if site.transposed else (node.args[2] if len(node.args) > 2 else None)
            w = _tensor(gm, site.weight.target)
            b = _tensor(gm, b_node.target) if isinstance(b_node, fx.Node) and b_node.op == "get_attr" else None
            with torch.no_grad():
                w2, b2 = _fold_of(entry)(site.module, module, w, b, site.transposed)
            new_w = _register(gm, holder, node, site.weight, w2, site.module, ctx)
            node.replace_input_with(site.weight, new_w)
            if b2 is not None and b is not None:
                node.replace_input_with(b_node, _register(gm, holder, node, b_node, b2, site.module, ctx))
            elif b2 is not None:  # the fold created a bias (SSF's shift on a bias-free linear)
                node.args = (*node.args[:2], _register(gm, holder, node, None, b2, site.module, ctx))
            n += 1
    ctx.counts["merge"] += n
    return PassResult(gm, n > 0)


def _tensor(gm: fx.GraphModule, target: str) -> torch.Tensor:
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _register(gm, holder, user, old, value, path, ctx) -> fx.Node:
    name = f"t{len(holder._buffers)}"
    holder.register_buffer(name, value.detach().clone(), persistent=False)
    with gm.graph.inserting_before(user):
        node = gm.graph.get_attr(f"{HOLDER}.{name}")
    node.meta[PEFTC] = {"method": "merge", "adapter": ctx.spec.adapter, "module": path, "role": "merged_weight"}
    return node


def fold_state_dict(cm, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Folds every active adapter of ``cm`` into a copy of a base state dict."""
    sd = dict(sd)
    kinds = {}
    for name in cm.active_adapters:
        state = cm.registry.state(name)
        for entry, targets in zip(state.spec.methods, state.targets):
            for path, kind in targets.items():
                if entry.sites == "module":  # trained copies (modules_to_save, BitFit)
                    copy_mod = cm.adapters.get_submodule(f"{path}.{entry.store_dir}.{name}")
                    sd.update({f"{path}.{k}": v.detach() for k, v in copy_mod.state_dict().items()})
                    continue
                module = cm.adapters.get_submodule(f"{path}.{entry.store_dir}.{name}")
                kinds[path] = kind
                w, b = sd[f"{path}.weight"], sd.get(f"{path}.bias")
                with torch.no_grad():
                    w2, b2 = _fold_of(entry)(path, module, w, b, kind == "conv1d")
                sd[f"{path}.weight"] = w2
                if b2 is not None:
                    sd[f"{path}.bias"] = b2
    return sd


def merged_state_dict(cm) -> dict[str, torch.Tensor]:
    return fold_state_dict(cm, {k: v.detach() for k, v in cm.base_model.state_dict().items()})


def save_merged(cm, path: str | os.PathLike) -> Path:
    """A plain HF model directory with the adapters folded in (written to a temp dir first)."""
    base = cm.base_model
    if not hasattr(base, "save_pretrained"):
        raise PeftcError(f"{type(base).__name__} has no save_pretrained; use merged_state_dict()")
    merged = copy.deepcopy(base)
    merged.load_state_dict(merged_state_dict(cm))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}-"))
    try:
        merged.save_pretrained(tmp)
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return path
