"""HF PEFT adapter files: ``adapter_config.json`` + ``adapter_model.safetensors`` on disk (and where
an HF model checkpoint's safetensors files are: ``checkpoint_files``).

Reading and writing only; what the keys and fields mean for peftc's adapters is
``peftc.peft_io``. Pickled ``adapter_model.bin`` files are refused unless ``allow_pickle=True``
(and even then read with ``weights_only=True``).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from peftc.errors import CheckpointError

__all__ = ["PREFIX", "CONFIG_NAME", "WEIGHTS_NAME", "PICKLE_NAME", "read_peft_config", "read_peft_weights", "write_adapter",
           "normal_mode", "replace_dir", "checkpoint_files"]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"
PREFIX = "base_model.model."  # PEFT checkpoint keys of a tuner-layer model start so (prompt learning: "base_model.")

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


def read_peft_weights(path: str | os.PathLike, *, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    d = Path(path)
    st, pk = d / WEIGHTS_NAME, d / PICKLE_NAME
    if st.is_file():
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


def normal_mode(directory: bool = False) -> int:
    """The mode ``open``/``mkdir`` would give (0666/0777 less the umask): temp files and dirs
    from ``tempfile`` are 0600/0700 and must get it before they are renamed into place."""
    mask = os.umask(0o022)  # reading the umask means setting it; put it straight back
    os.umask(mask)
    return (0o777 if directory else 0o666) & ~mask


def replace_dir(tmp: Path, path: Path) -> None:
    """Puts the finished temp dir ``tmp`` at ``path``: an existing ``path`` is moved aside first
    and removed only once the new one is in place, so a failure never leaves half a directory."""
    old = None
    if path.exists():
        old = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}-old-"))
        os.replace(path, old / path.name)
    os.chmod(tmp, normal_mode(directory=True))  # mkdtemp made it 0700
    os.replace(tmp, path)
    if old is not None:
        shutil.rmtree(old)


def write_adapter(path: str | os.PathLike, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Path:
    """Writes config + weights; each file goes to a temp name first, then is renamed."""
    from safetensors.torch import save_file  # looked up per call (tests replace it to simulate a full disk)

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
        for t in tmps:  # mkstemp makes 0600; saved files get a normal file's mode (0666 less the umask)
            os.chmod(t, normal_mode())
        os.replace(w_tmp, d / WEIGHTS_NAME)
        os.replace(cfg_tmp, d / CONFIG_NAME)
    finally:
        for t in tmps:
            if os.path.exists(t):
                os.unlink(t)
    return d


def checkpoint_files(directory: Path) -> list[Path]:
    """The safetensors files of an HF checkpoint dir (its index when sharded), or the one file given."""
    directory = Path(directory)
    if directory.is_file():
        return [directory]
    index = directory / "model.safetensors.index.json"
    if index.exists():
        return sorted({directory / f for f in json.loads(index.read_text())["weight_map"].values()})
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{directory}: no *.safetensors files (save_pretrained(..., safe_serialization=True))")
    return files
