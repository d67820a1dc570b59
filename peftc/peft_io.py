"""HF PEFT checkpoints: ``adapter_config.json`` + ``adapter_model.safetensors``.

peftc parameter names map 1:1 onto PEFT keys by dropping the ``<kind>.<adapter>`` segment::

    model.layers.0.q_proj.lora.default.lora_A.weight    <->  base_model.model.model.layers.0.q_proj.lora_A.weight
    classifier.modules_to_save.default.weight           <->  base_model.model.classifier.weight

Pickled ``adapter_model.bin`` files are refused unless ``allow_pickle=True`` (and even then
read with ``weights_only=True``).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import struct
import tempfile
from pathlib import Path
from typing import Any

import torch

from peftc.errors import CheckpointError, SpecError
from peftc.spec import METHODS, Spec

__all__ = [
    "PREFIX", "CONFIG_NAME", "WEIGHTS_NAME", "PICKLE_NAME",
    "read_peft_config", "spec_from_peft_config", "read_peft_weights", "write_adapter", "peft_key",
    "check_loadable", "bias_keys", "peft_params", "peft_config", "write_hf_model",
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


def _entries(cm, adapter: str, kind) -> list:
    state = cm._states[adapter]
    return [(m, t) for m, t in zip(state.spec.methods, state.targets) if isinstance(m, kind)]


def bias_keys(cm, adapter: str) -> dict[str, torch.nn.Parameter]:
    """PEFT's LoRA ``bias``: "all" trains every bias, "lora_only" those of adapted layers.

    Keys follow PEFT's module wrapping: ``<path>.base_layer.bias`` for an adapted layer;
    inside a module trained whole PEFT also saves ``original_module``/``modules_to_save``.
    """
    from peftc.passes.lora import LoraSpec
    from peftc.passes.train import TrainSpec

    lora = _entries(cm, adapter, LoraSpec)
    modes = {m.bias for m, _ in lora}
    if modes <= {"none"}:
        return {}
    lora_paths = {p for _, t in lora for p in t}
    whole = [p for _, t in _entries(cm, adapter, TrainSpec) for p in t]
    out = {}
    for name, param in cm.base_model.named_parameters():
        path, _, leaf = name.rpartition(".")
        if not ("all" in modes and "bias" in name or "lora_only" in modes and leaf == "bias" and path in lora_paths):
            continue
        root = next((w for w in whole if name.startswith(w + ".")), None)
        if root is None:
            out[PREFIX + (f"{path}.base_layer.{leaf}" if path in lora_paths else name)] = param
            continue
        rel = name[len(root) + 1:]
        out[f"{PREFIX}{root}.original_module.{rel}"] = param
        out[f"{PREFIX}{root}.modules_to_save.{rel}"] = cm.adapters.get_parameter(
            f"{root}.modules_to_save.{adapter}.{rel}")
    return out


def peft_params(cm, adapter: str) -> dict[str, torch.nn.Parameter]:
    """Every tensor of an adapter's PEFT checkpoint, by key, as the live parameter."""
    out = {}
    exporters = {o: m for o, m in cm.adapters.named_modules() if hasattr(m, "peft_tensors") and o.endswith(f".{adapter}")}
    for m in exporters.values():  # modules whose checkpoint is not their parameters (P-tuning)
        out.update(m.peft_tensors())
    for name, p in cm._adapter_params(adapter):
        if any(name.startswith(o + ".") for o in exporters):
            continue
        owner, _, leaf = name.rpartition(".")
        keys = getattr(cm.adapters.get_submodule(owner), "PEFT_KEYS", None)
        out[keys[leaf] if keys else peft_key(name, adapter)] = p  # PEFT_KEYS: non-standard keys
    for name, buf in cm.adapters.named_buffers():  # frozen tensors PEFT saves (VeRA's projections)
        owner, _, leaf = name.rpartition(".")
        keys = getattr(cm.adapters.get_submodule(owner), "PEFT_KEYS", None)
        if keys and leaf in keys and owner.endswith(f".{adapter}"):
            out[keys[leaf]] = buf
    out.update(bias_keys(cm, adapter))
    if any(m.sites == "graph" and m.peft_type for m in cm._states[adapter].spec.methods):
        # prompt learning: PEFT wraps the model without a tuner layer, so keys lose one ".model"
        out = {("base_model." + k[len(PREFIX):] if k.startswith(PREFIX) else k): v for k, v in out.items()}
    return out


def peft_config(cm, adapter: str) -> dict:
    """An adapter as an HF PEFT config dict (one PEFT method + modules trained whole)."""
    from peftc.errors import PeftcError
    from peftc.passes.train import TrainSpec

    state = cm._states[adapter]
    methods = state.spec.methods
    kinds = {type(m) for m in methods if m.peft_type}
    others = [m.method for m in methods if not m.peft_type and not isinstance(m, TrainSpec)]
    if len(kinds) != 1 or others:
        raise PeftcError("a PEFT checkpoint holds one PEFT method (plus modules trained whole); "
                         f"adapter {adapter!r} has {[m.method for m in methods]}")
    (cls,) = kinds
    mine = _entries(cm, adapter, cls)
    cfg = cls.to_peft([m for m, _ in mine], [t for _, t in mine], cm.base_model)
    saved = sorted({p for _, t in _entries(cm, adapter, TrainSpec) for p in t})
    name_or_path = getattr(getattr(cm.base_model, "config", None), "_name_or_path", None) or None
    cfg.update(modules_to_save=saved or None, task_type=state.spec.task_type,
               base_model_name_or_path=state.spec.base_model or name_or_path,
               inference_mode=True, revision=None)
    return cfg


# ---- a plain HF model directory, streamed (merged export) -----------------------------------
_ST_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
              torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
              torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2"}


class _SafetensorsWriter:
    """One safetensors file written tensor by tensor: the header (names, dtypes, shapes, offsets)
    is known up front from the layout, so no tensor waits for another. (The safetensors package
    writes only from a dict holding every tensor of the file.) Format: u64 header length, JSON
    header padded to 8 bytes, then the tensors' bytes in header order."""

    def __init__(self, path: Path, layout: dict[str, torch.Tensor], metadata: dict[str, str]):
        header, offset = {"__metadata__": metadata}, 0
        for key, t in layout.items():
            if t.dtype not in _ST_DTYPES:
                raise CheckpointError(f"{key}: dtype {t.dtype} has no safetensors name")
            n = t.numel() * t.element_size()
            header[key] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
            offset += n
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.layout, self.todo, self.f = layout, list(layout), open(path, "wb")
        self.f.write(struct.pack("<Q", len(raw)) + raw)

    def write(self, key: str, t: torch.Tensor) -> None:
        want = self.layout[key]
        if key != self.todo[0] or t.shape != want.shape or t.dtype != want.dtype:
            raise CheckpointError(f"{key}: {tuple(t.shape)} {t.dtype} arrived where {self.todo[0]} "
                                  f"{tuple(want.shape)} {want.dtype} was planned")
        self.todo.pop(0)
        self.f.write(memoryview(t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()))

    def close(self) -> None:
        self.f.close()
        if self.todo:
            raise CheckpointError(f"tensors {self.todo[:5]} never arrived")


def _shard(layout: dict[str, torch.Tensor], max_shard_size: int | str) -> dict[str, list[str]]:
    """File name -> keys: consecutive runs of keys (the stream's order), each run under
    ``max_shard_size`` unless one tensor alone exceeds it; transformers' file names."""
    from huggingface_hub.serialization._base import parse_size_to_int

    limit = parse_size_to_int(max_shard_size) if isinstance(max_shard_size, str) else int(max_shard_size)
    runs, size = [[]], 0
    for k, t in layout.items():
        n = t.numel() * t.element_size()
        if runs[-1] and size + n > limit:
            runs.append([])
            size = 0
        runs[-1].append(k)
        size += n
    if len(runs) == 1:
        return {"model.safetensors": runs[0]}
    return {f"model-{i:05d}-of-{len(runs):05d}.safetensors": r for i, r in enumerate(runs, 1)}


def write_hf_model(model, path: str | os.PathLike, tensors, *, untied=(), max_shard_size: int | str = "5GB") -> Path:
    """An HF ``save_pretrained`` directory for ``model`` whose weights come from ``tensors``, an
    iterator of (state-dict key, tensor) in ``model.state_dict()`` order: config.json
    (+ generation_config.json) and model.safetensors, or shards + model.safetensors.index.json
    above ``max_shard_size`` (transformers' layout and names). Each tensor is written when it
    arrives and then dropped, so the stream may compute them one at a time; the layout is planned
    from ``model``'s own state dict (same keys, shapes and dtypes). Tied aliases are dropped as
    transformers does, except ``untied`` keys (their values differ now; the config unties them).
    Written to a temp dir beside ``path``, then renamed over it.
    """
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    from peftc.errors import PeftcError

    if not hasattr(model, "save_pretrained") or getattr(model, "config", None) is None:
        raise PeftcError(f"{type(model).__name__} is not a transformers model; use merged_state_dict()")
    base = model.state_dict()
    kept = remove_tied_weights_from_state_dict(dict(base), model)
    layout = {k: v for k, v in base.items() if k in kept or k in untied}
    shards = _shard(layout, max_shard_size)
    where = {k: name for name, keys in shards.items() for k in keys}
    config = copy.deepcopy(model.config)
    config.dtype = str(model.dtype).split(".")[1]
    config.architectures = [type(model).__name__]
    if untied:
        config.tie_word_embeddings = False
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}-"))
    writer, done = None, set()
    try:
        config.save_pretrained(tmp)
        if model.can_generate() and getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        for key, t in tensors:
            if key not in layout:
                if key in base:
                    continue  # a tied alias, saved under its other name
                raise PeftcError(f"{key!r} is not a tensor {type(model).__name__} holds (a bias a fold created?): "
                                 "it cannot be saved as this model class; use merged_state_dict()")
            name = where[key]
            if writer is None or writer.f.name != str(tmp / name):
                if writer is not None:
                    writer.close()
                if name in done:
                    raise CheckpointError(f"{key}: out of order (its shard {name} is already closed)")
                done.add(name)
                writer = _SafetensorsWriter(tmp / name, {k: layout[k] for k in shards[name]}, {"format": "pt"})
            writer.write(key, t)
            del t
        if writer is not None:
            writer.close()
        missing = sorted(set(shards) - done)
        if missing:
            raise CheckpointError(f"shards {missing} received no tensors")
        if len(shards) > 1:
            index = {"metadata": {"total_parameters": sum(v.numel() for v in layout.values()),
                                  "total_size": sum(v.numel() * v.element_size() for v in layout.values())},
                     "weight_map": where}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        old = None
        if path.exists():
            old = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}-old-"))
            os.replace(path, old / path.name)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old)
    finally:
        if writer is not None and not writer.f.closed:
            writer.f.close()
        if tmp.exists():
            shutil.rmtree(tmp)
    return path
