"""Filling a model compiled on the meta device: its base tensors swapped in one at a time, its
adapters created and initialised. Shared by every path that never holds the whole base at once
(``peftc.load_sharded``'s per-rank shards, ``peftc.load_quantized``'s quantized store: the
``shard`` and ``quantize`` optimizations' ``load_base`` / ``load_quantized`` hooks).

    swapped = {}
    swap_tensor(cm.get_base_model(), "model.norm.weight", old, value, swapped)   # ties kept
    retie(cm.get_base_model(), swapped)                                           # other names of a swapped tensor
    materialize_adapters(cm, device="cpu")
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["swap_tensor", "retie", "materialize_adapters", "base_tensors"]


def base_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer under each of its names (a tied weight appears twice)."""
    return dict([*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)])


def swap_tensor(model: nn.Module, name: str, old: torch.Tensor, value: torch.Tensor, swapped: dict) -> torch.Tensor:
    """Registers ``value`` in place of the tensor at ``name`` (a meta tensor cannot take CPU data:
    one new object per old one, remembered in ``swapped`` by the old one's id)."""
    owner, _, leaf = name.rpartition(".")
    module = model.get_submodule(owner)
    if id(old) not in swapped:
        is_param = leaf in module._parameters
        swapped[id(old)] = torch.nn.Parameter(value, requires_grad=False) if is_param else value
    new = swapped[id(old)]
    if leaf in module._parameters:
        module._parameters[leaf] = new
    else:
        module._buffers[leaf] = new
    return new


def retie(model: nn.Module, names: dict[str, torch.Tensor], swapped: dict) -> None:
    """Every other name of a swapped tensor (a head tied to the embedding) -> the new object."""
    for name, t in names.items():
        if id(t) in swapped:
            swap_tensor(model, name, t, swapped[id(t)], swapped)


def materialize_adapters(cm, seed: int = 0, device="cpu") -> None:
    """Adapters compiled on the meta device -> real tensors, initialised as at compile time (LoRA:
    A kaiming-uniform, B zero) from ``seed`` on every rank alike; other methods' adapters must be
    loaded (``cm.load_adapter_state_dict``) and are left empty."""
    from peftc.passes.methods.lora import LoraLinear

    torch.manual_seed(seed)
    for m in cm.adapters.modules():
        if not any(p.device.type == "meta" for p in m.parameters(recurse=False)) and not isinstance(m, LoraLinear):
            continue
        if isinstance(m, LoraLinear) and m.lora_A.weight.device.type == "meta":
            m.to_empty(device=device)
            m.lora_A.reset_parameters()
            nn.init.zeros_(m.lora_B.weight)
        elif not isinstance(m, LoraLinear):
            m.to_empty(device=device, recurse=False)
