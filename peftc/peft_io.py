"""HF PEFT checkpoints: ``adapter_config.json`` + ``adapter_model.safetensors``.

peftc parameter names map 1:1 onto PEFT keys by dropping the ``<kind>.<adapter>`` segment::

    model.layers.0.q_proj.lora.default.lora_A.weight    <->  base_model.model.model.layers.0.q_proj.lora_A.weight
    classifier.modules_to_save.default.weight           <->  base_model.model.classifier.weight

Pickled ``adapter_model.bin`` files are refused unless ``allow_pickle=True`` (and even then
read with ``weights_only=True``).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from peftc.errors import CheckpointError, SpecError
from peftc.spec import METHODS, Spec

__all__ = [
    "PREFIX", "CONFIG_NAME", "WEIGHTS_NAME", "PICKLE_NAME",
    "read_peft_config", "spec_from_peft_config", "read_peft_weights", "write_adapter", "peft_key",
]

PREFIX = "base_model.model."
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"


def peft_key(name: str, adapter: str) -> str:
    """peftc parameter name (relative to the adapter store) -> PEFT checkpoint key."""
    for d in {m.store_dir for m in METHODS.values()}:
        head, sep, tail = name.rpartition(f".{d}.{adapter}.")
        if sep:
            return f"{PREFIX}{head}.{tail}"
    raise ValueError(f"{name!r} is not an adapter parameter of adapter {adapter!r}")


def read_peft_config(path: str | os.PathLike) -> dict:
    p = Path(path)
    if p.is_dir():
        p = p / CONFIG_NAME
    if not p.is_file():
        raise CheckpointError(f"{p}: no such file (expected a PEFT adapter dir or its {CONFIG_NAME})")
    try:
        d = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{p}: not valid JSON ({e})") from None
    if not isinstance(d, dict) or "peft_type" not in d:
        raise CheckpointError(f"{p}: not a PEFT adapter config (no 'peft_type' field)")
    return d


def spec_from_peft_config(cfg: dict) -> Spec:
    """A trainable peftc Spec equivalent to a PEFT config dict."""
    ptype = cfg.get("peft_type")
    ptype = getattr(ptype, "value", ptype)
    methods = {m.peft_type: m for m in METHODS.values() if m.peft_type}
    if ptype not in methods:
        raise SpecError("peft_type", ptype, f"one of {sorted(methods)}")
    task = cfg.get("task_type")
    task = getattr(task, "value", task)
    entries = methods[ptype].from_peft(cfg)
    return Spec(methods=tuple(entries), task_type=task,
                base_model=cfg.get("base_model_name_or_path"))


def read_peft_weights(path: str | os.PathLike, *, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    d = Path(path)
    st, pk = d / WEIGHTS_NAME, d / PICKLE_NAME
    if st.is_file():
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(st))
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{st}: not a readable safetensors file ({e})") from None
    if pk.is_file():
        if not allow_pickle:
            raise CheckpointError(
                f"{pk}: pickle checkpoints can run code when loaded; pass allow_pickle=True to "
                "read it (with torch.load(weights_only=True)), or convert it to safetensors"
            )
        try:
            return torch.load(pk, map_location="cpu", weights_only=True)
        except Exception as e:
            raise CheckpointError(f"{pk}: could not be read ({e})") from None
    raise CheckpointError(f"{d}: has neither {WEIGHTS_NAME} nor {PICKLE_NAME}")


def write_adapter(path: str | os.PathLike, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Path:
    """Writes config + weights; each file goes to a temp name first, then is renamed."""
    from safetensors.torch import save_file

    d = Path(path)
    d.mkdir(parents=True, exist_ok=True)
    tmps = []
    try:
        fd, cfg_tmp = tempfile.mkstemp(dir=d, prefix=".cfg-")
        tmps.append(cfg_tmp)
        with os.fdopen(fd, "w") as f:
            json.dump(config, f, indent=2, sort_keys=True)
        fd, w_tmp = tempfile.mkstemp(dir=d, prefix=".w-")
        os.close(fd)
        tmps.append(w_tmp)
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, w_tmp,
                  metadata={"format": "pt"})
        os.replace(w_tmp, d / WEIGHTS_NAME)
        os.replace(cfg_tmp, d / CONFIG_NAME)
    finally:
        for t in tmps:
            if os.path.exists(t):
                os.unlink(t)
    return d


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
