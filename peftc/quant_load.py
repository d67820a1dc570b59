"""``peftc.load_quantized``: a checkpoint streamed into the quantized store of a model compiled on the
meta device (QLoRA that never holds the full-precision base).

    with accelerate.init_empty_weights():                   # parameters on the meta device
        model = AutoModelForCausalLM.from_config(config)
    cm = peftc.compile(model, spec, ids, optimize={"quantize": {"format": "nf4"}})
    peftc.load_quantized(cm, "checkpoint_dir")              # safetensors (sharded or not) or a .gguf file

This module opens the checkpoint; the optimization that owns the store fills it (its
``load_quantized`` hook: passes/optimize/quantize_load.py says what is held and the memory bound).
"""

from __future__ import annotations

from pathlib import Path

import torch

from peftc.errors import CheckpointError, SpecError
from peftc.peft_files import checkpoint_files
from peftc.spec import optimization_hooks

__all__ = ["load_quantized", "SafetensorsSource"]


class SafetensorsSource:
    """Tensor by tensor from safetensors files, each opened for one tensor: closing unmaps it, so the
    pages of tensors already converted do not stay resident."""

    def __init__(self, path):
        from safetensors import safe_open

        self.path = Path(path)
        self.open = lambda f: safe_open(str(f), framework="pt")
        self.where, self.shapes = {}, {}
        for f in checkpoint_files(self.path):
            with self.open(f) as h:
                for k in h.keys():
                    self.where[k], self.shapes[k] = f, tuple(h.get_slice(k).get_shape())

    def keys(self) -> list[str]:
        return list(self.where)

    def shape(self, key: str) -> tuple[int, ...]:
        return self.shapes[key]

    def tensor(self, key: str) -> torch.Tensor:
        with self.open(self.where[key]) as h:
            return h.get_tensor(key)


def _source(path):
    from peftc.gguf_base import GGUFSource

    if isinstance(path, GGUFSource | SafetensorsSource):
        return path
    p = Path(path)
    if p.is_file() and p.suffix == ".gguf":
        return GGUFSource(p)
    if not p.exists():
        raise CheckpointError(f"{p}: no such checkpoint (a safetensors file or dir, or a .gguf file)")
    return SafetensorsSource(p)


def load_quantized(cm, path, *, prefix: str = "", device="cpu", keep_blocks: bool = True) -> dict:
    """Fills ``cm`` (compiled on the meta device with ``optimize: {quantize}``) from ``path``: an HF
    safetensors dir (sharded or not), one .safetensors file, or a .gguf file. ``prefix`` is stripped
    from checkpoint names; GGUF Q4_0 / Q4_1 / Q8_0 blocks are held as they are unless ``keep_blocks``
    is False. Returns counts and bytes of what was loaded."""
    hooks = optimization_hooks(cm.spec, "load_quantized")
    if not hooks:
        raise SpecError("optimize", sorted(cm.spec.optimize), "a spec with optimize: {quantize: {...}}",
                        "load_quantized fills the quantized store; without quantize use load_state_dict")
    return hooks[0](cm, _source(path), prefix=prefix, device=device, keep_blocks=keep_blocks)
