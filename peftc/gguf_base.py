"""GGUF files (llama.cpp's format) as a frozen base: their quantized blocks kept, never requantized.

    cm = peftc.from_gguf("SmolLM2-135M-Instruct.Q4_1.gguf", {"methods": [{"lora": {"r": 16}}]})
    tok = peftc.gguf_base.tokenizer("SmolLM2-135M-Instruct.Q4_1.gguf")

``from_gguf`` builds the model on the meta device from the file's metadata (transformers' GGUF
config reader), compiles it with ``quantize`` there, then ``peftc.load_quantized`` streams the file
tensor by tensor: each Q4_0, Q4_1 or Q8_0 linear is held as its own blocks (int4 / int8g, block 32:
kernels/quant_formats.py), bit for bit, so the frozen base computes exactly the weights gguf's
dequantizer gives; every other tensor (norms, embeddings, F32/F16 and K-quant linears) is
dequantized by the gguf package into the model's dtype and kept full precision, listed in
``graph_summary()``. No full-precision copy of a held weight ever exists.

Tensor names come from the gguf package's name map; llama.cpp's converter permutes the rows of
llama's q/k weights (rotary layout), undone here with transformers' own GGUF tensor processor,
applied to row indices so packed rows move whole.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from peftc.errors import CheckpointError, SpecError
from peftc.kernels.quant_formats import GGUF_BLOCKS, from_gguf_blocks

__all__ = ["GGUFSource", "from_gguf", "tokenizer", "ARCHITECTURES", "INSTALL"]

ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3")  # plain transformers tensor processors (rows at most permuted)
INSTALL = "pip install 'peftc[gguf]' (gguf and accelerate)"
_FLOATS = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def _gguf():
    try:
        import gguf
    except ImportError:
        raise CheckpointError(f"reading GGUF files needs the gguf package: {INSTALL}") from None
    return gguf


class GGUFSource:
    """A GGUF file read tensor by tensor with positioned reads: the reader's memory map serves the
    header only, so the pages of weights already converted never stay resident."""

    def __init__(self, path):
        gguf = _gguf()
        self.path = Path(path)
        if not self.path.is_file():
            raise CheckpointError(f"{self.path}: no such GGUF file")
        try:
            self.reader = gguf.GGUFReader(self.path)
        except (ValueError, OSError) as e:
            raise CheckpointError(f"{self.path}: not a GGUF file ({e})") from None
        self.arch = self.field("general.architecture")
        self.tensors = {t.name: t for t in self.reader.tensors}

    def field(self, key: str):
        f = self.reader.get_field(key)
        if f is None:
            raise CheckpointError(f"{self.path}: no {key!r} in the GGUF metadata")
        return f.contents()

    def kind(self, name: str) -> str:
        return self.tensors[name].tensor_type.name

    def shape(self, name: str) -> tuple[int, ...]:
        """torch's order (GGUF lists the fastest dimension first)."""
        return tuple(int(d) for d in reversed(self.tensors[name].shape.tolist()))

    def names(self, model, num_layers: int) -> dict[str, str]:
        """Model tensor name -> GGUF tensor name, for every model tensor the file holds."""
        gguf = _gguf()
        arch = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}.get(self.arch)
        if arch is None:
            raise CheckpointError(f"{self.path}: GGUF architecture {self.arch!r} is unknown to the gguf package")
        name_map = gguf.get_tensor_name_map(arch, num_layers)
        out = {}
        for n, _ in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
            g = name_map.get_name(n, try_suffixes=(".weight", ".bias"))
            if g in self.tensors:
                out[n] = g
        return out

    def raw(self, name: str) -> torch.Tensor:
        t = self.tensors[name]
        buf = torch.empty(int(t.n_bytes), dtype=torch.uint8)
        with open(self.path, "rb") as f:
            f.seek(int(t.data_offset))
            if f.readinto(memoryview(buf.numpy())) != buf.numel():
                raise CheckpointError(f"{self.path}: tensor {name} is cut short")
        return buf

    def rows(self, name: str, config: dict) -> torch.Tensor | None:
        """The row order that undoes the converter's permutation of ``name`` (None: rows as stored)."""
        from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor

        proc = TENSOR_PROCESSORS.get(self.arch, TensorProcessor)(config=config)
        n = self.shape(name)[0]
        idx = proc.process(np.arange(n).reshape(n, 1), name).weights.reshape(-1)
        return None if (idx == np.arange(n)).all() else torch.from_numpy(np.ascontiguousarray(idx))

    def blocks(self, name: str, config: dict) -> tuple[str, tuple[torch.Tensor, ...]] | None:
        """(format, quantized weight) holding the file's own blocks of a 2-D weight; None when its
        type is not held packed (see ``GGUF_BLOCKS``)."""
        kind, shape = self.kind(name), self.shape(name)
        if kind not in GGUF_BLOCKS or len(shape) != 2:
            return None
        fmt, q = from_gguf_blocks(self.raw(name), kind, shape)
        rows = self.rows(name, config)
        if rows is not None:  # per-row tensors (codes, and group scales as (rows, groups)) move whole rows
            q = tuple(t if t.numel() == 0 else t.view(shape[0], -1)[rows].reshape(t.shape) for t in q)
        return fmt, q

    def tensor(self, name: str, config: dict, dtype: torch.dtype) -> torch.Tensor:
        """The tensor as gguf's dequantizer gives it (rows unpermuted), in ``dtype``."""
        gguf = _gguf()
        kind, shape = self.kind(name), self.shape(name)
        raw = self.raw(name)
        if kind in _FLOATS:
            t = raw.view(_FLOATS[kind]).view(shape)
        else:
            qtype = gguf.GGMLQuantizationType[kind]
            t = torch.from_numpy(gguf.quants.dequantize(raw.numpy().reshape(shape[0], -1) if len(shape) > 1
                                                        else raw.numpy(), qtype)).view(shape)
        rows = self.rows(name, config) if len(shape) == 2 else None
        return (t if rows is None else t[rows]).to(dtype)


def _config(path: str):
    from transformers import AutoConfig

    p = Path(path)
    return AutoConfig.from_pretrained(str(p.parent), gguf_file=p.name)


def tokenizer(path):
    """The tokenizer stored in the GGUF file (transformers' reader)."""
    from transformers import AutoTokenizer

    p = Path(path)
    return AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)


def _quantize_settings(spec, held: list[str], linears: list[str]) -> dict:
    """The spec's ``quantize`` for a GGUF base: which linears hold their blocks is the file's choice."""
    mine = dict(spec.optimize.get("quantize") or {})
    for key in ("format", "block_size", "double_quant", "release_base"):
        if key in mine:
            raise SpecError(f"optimize.quantize.{key}", mine[key], "unset for a GGUF base",
                            "from_gguf holds each Q4_0 / Q4_1 / Q8_0 linear as its own blocks and keeps no "
                            "full-precision copy; only skip and shared_weights apply")
    skip = list(mine.get("skip") or [])
    skip += [p for p in linears if p not in held and p not in skip]
    return {**mine, "format": "int4", "block_size": 32, "release_base": True, "skip": skip}


def from_gguf(path, spec, example_inputs: dict | None = None, *, dtype: torch.dtype = torch.float32,
              device="cpu", **compile_kwargs):
    """A CompiledModel whose frozen linears hold ``path``'s own quantized blocks (module docstring).
    ``example_inputs`` default to 8 token ids; ``dtype``: of the tensors kept full precision and of
    the adapters; ``compile_kwargs`` go to ``peftc.compile`` (``optimize=`` replaces the spec's)."""
    from transformers import AutoModelForCausalLM

    from peftc import targets as _targets
    from peftc.compiled import compile as compile_model
    from peftc.quant_load import load_quantized
    from peftc.spec import Spec

    try:
        from accelerate import init_empty_weights
    except ImportError:
        raise CheckpointError(f"from_gguf needs accelerate: {INSTALL}") from None
    source = GGUFSource(path)
    if source.arch not in ARCHITECTURES:
        raise CheckpointError(f"{source.path}: GGUF architecture {source.arch!r}; from_gguf reads {ARCHITECTURES}")
    spec = Spec.coerce(spec)
    if "optimize" in compile_kwargs:
        spec = spec.replace(optimize=compile_kwargs.pop("optimize"))
    config = _config(str(source.path))
    with init_empty_weights():  # parameters on the meta device; buffers (rotary tables) computed
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.tie_weights()  # from_pretrained ties after loading; here the capture must see the tie
    model.eval()
    names = source.names(model, config.num_hidden_layers)
    linears = [p for p, m in model.named_modules() if p and _targets.linear_kind(m) == "linear"]
    held = [p for p in linears if f"{p}.weight" in names and source.kind(names[f"{p}.weight"]) in GGUF_BLOCKS]
    if not held:
        raise CheckpointError(f"{source.path}: no linear weight in Q4_0, Q4_1 or Q8_0 (types: "
                              f"{sorted({source.kind(n) for n in names.values()})}); load it with transformers")
    optimize = {**spec.optimize, "quantize": _quantize_settings(spec, held, linears)}
    spec = spec.replace(optimize=optimize)
    if example_inputs is None:
        example_inputs = {"input_ids": torch.randint(0, config.vocab_size, (1, 8))}
    cm = compile_model(model, spec, example_inputs, **compile_kwargs)
    load_quantized(cm, source, device=device)
    return cm
