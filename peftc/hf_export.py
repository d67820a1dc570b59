"""A plain HF model directory written tensor by tensor (the merged export): no copy of the model.

The safetensors package writes a file only from a dict holding all of its tensors; here each
tensor is written as it is produced and freed, so exporting a merged 8B model needs no second
copy of it. The files are byte-compatible safetensors (the format is a JSON header + raw bytes).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import struct
import tempfile
from pathlib import Path

import torch

from peftc.errors import CheckpointError
from peftc.peft_files import replace_dir

__all__ = ["write_hf_model"]

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
        replace_dir(tmp, path)
    finally:
        if writer is not None and not writer.f.closed:
            writer.f.close()
        if tmp.exists():
            shutil.rmtree(tmp)
    return path
