"""HF PEFT checkpoints of peftc adapters: which tensor goes under which key, and the config.

peftc parameter names map 1:1 onto PEFT keys by dropping the ``<kind>.<adapter>`` segment::

    model.layers.0.q_proj.lora.default.lora_A.weight    <->  base_model.model.model.layers.0.q_proj.lora_A.weight
    classifier.modules_to_save.default.weight           <->  base_model.model.classifier.weight

Everything method-specific comes from the method classes (``store_dir``, ``peft_prefix``,
``peft_field``, ``to_peft``, ``peft_base_tensors``) and from adapter modules (``PEFT_KEYS``,
``peft_tensors``). The files themselves are read and written by ``peftc.peft_files``.
"""

from __future__ import annotations

import torch

from peftc.errors import CheckpointError, PeftcError
from peftc.peft_files import (
    CONFIG_NAME,
    PICKLE_NAME,
    PREFIX,
    WEIGHTS_NAME,
    read_peft_config,
    read_peft_weights,
    write_adapter,
)
from peftc.spec import METHODS, spec_from_peft_config

__all__ = [
    "PREFIX", "CONFIG_NAME", "WEIGHTS_NAME", "PICKLE_NAME",
    "read_peft_config", "spec_from_peft_config", "read_peft_weights", "write_adapter", "peft_key",
    "check_loadable", "base_tensors", "train_base_tensors", "peft_params", "peft_config",
]


def peft_key(name: str, adapter: str) -> str:
    """peftc parameter name (relative to the adapter store) -> PEFT checkpoint key."""
    for d in {m.store_dir for m in METHODS.values()}:
        head, sep, tail = name.rpartition(f".{d}.{adapter}.")
        if sep:
            return f"{PREFIX}{head}.{tail}"
    raise ValueError(f"{name!r} is not an adapter parameter of adapter {adapter!r}")


def check_loadable(expected: dict[str, torch.Tensor], sd: dict[str, torch.Tensor], source: str) -> None:
    """Strict key and shape check; the message names every offending key."""
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    bad = sorted(k for k in set(sd) & set(expected) if tuple(sd[k].shape) != tuple(expected[k].shape))
    problems = []
    if missing:
        problems.append(f"missing keys {missing}")
    if unexpected:
        problems.append(f"unexpected keys {unexpected}")
    for k in bad:
        problems.append(f"key {k!r} has shape {tuple(sd[k].shape)}, expected {tuple(expected[k].shape)}")
    if problems:
        raise CheckpointError(f"{source}: " + "; ".join(problems))


def base_tensors(adapters, name: str) -> dict[str, torch.nn.Parameter]:
    """Base-model parameters adapter ``name``'s checkpoint holds, by key (each method's
    ``peft_base_tensors``, e.g. LoRA's ``bias``); ``adapters`` is an AdapterRegistry."""
    out = {}
    for cls in dict.fromkeys(type(m) for m in adapters.state(name).spec.methods):
        out.update(cls.peft_base_tensors(adapters, name))
    return out


def train_base_tensors(adapters, name: str, on: bool) -> None:
    """Those base parameters train with the adapter; PEFT saves, but freezes, the original of a
    module trained whole (its ``original_module`` keys)."""
    for key, p in base_tensors(adapters, name).items():
        p.requires_grad_(on and ".original_module." not in key)


def peft_params(adapters, adapter: str) -> dict[str, torch.nn.Parameter]:
    """Every tensor of an adapter's PEFT checkpoint, by key, as the live parameter."""
    store = adapters.store
    out = {}
    exporters = {o: m for o, m in store.named_modules() if hasattr(m, "peft_tensors") and o.endswith(f".{adapter}")}
    for m in exporters.values():  # modules whose checkpoint is not their parameters (P-tuning)
        out.update(m.peft_tensors())
    for name, p in adapters.params(adapter):
        if any(name.startswith(o + ".") for o in exporters):
            continue
        owner, _, leaf = name.rpartition(".")
        keys = getattr(store.get_submodule(owner), "PEFT_KEYS", None)
        out[keys[leaf] if keys else peft_key(name, adapter)] = p  # PEFT_KEYS: non-standard keys
    for name, buf in store.named_buffers():  # frozen tensors PEFT saves (VeRA's projections)
        owner, _, leaf = name.rpartition(".")
        keys = getattr(store.get_submodule(owner), "PEFT_KEYS", None)
        if keys and leaf in keys and owner.endswith(f".{adapter}"):
            out[keys[leaf]] = buf
    out.update(base_tensors(adapters, adapter))
    prefix = next((m.peft_prefix for m in adapters.state(adapter).spec.methods if m.peft_type), PREFIX)
    if prefix != PREFIX:  # prompt learning: PEFT wraps the model without a tuner layer ("base_model.")
        out = {(prefix + k[len(PREFIX):] if k.startswith(PREFIX) else k): v for k, v in out.items()}
    return out


def peft_config(adapters, adapter: str) -> dict:
    """An adapter as an HF PEFT config dict: one PEFT method, plus the methods saved as one of
    its fields (``peft_field``: modules trained whole -> ``modules_to_save``)."""
    state = adapters.state(adapter)
    methods = state.spec.methods
    kinds = {type(m) for m in methods if m.peft_type}
    others = [m.method for m in methods if not m.peft_type and not m.peft_field]
    if len(kinds) != 1 or others:
        raise PeftcError("a PEFT checkpoint holds one PEFT method (plus modules trained whole); "
                         f"adapter {adapter!r} has {[m.method for m in methods]}")
    (cls,) = kinds
    mine = adapters.entries(adapter, cls)
    cfg = cls.to_peft([m for m, _ in mine], [t for _, t in mine], adapters.base_model)
    for rider in (c for c in METHODS.values() if c.peft_field):
        riding = adapters.entries(adapter, rider)
        cfg[rider.peft_field] = rider.peft_field_value([m for m, _ in riding], [t for _, t in riding], cfg)
    name_or_path = getattr(getattr(adapters.base_model, "config", None), "_name_or_path", None) or None
    cfg.update(task_type=state.spec.task_type, base_model_name_or_path=state.spec.base_model or name_or_path,
               inference_mode=True, revision=None)
    if not state.spec.autocast_adapter_dtype:  # not a PeftConfig field: PEFT warns and ignores it
        cfg["autocast_adapter_dtype"] = False
    return cfg
