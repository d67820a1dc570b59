"""A PEFT LoRA adapter as a llama.cpp GGUF adapter (``llama-cli -m base.gguf --lora adapter.gguf``).

    save_gguf_adapter("out/", "out/adapter.gguf", base_config=model.config)

The file is what llama.cpp's ``convert_lora_to_gguf.py`` writes for the same adapter:

- metadata ``general.type = "adapter"``, ``adapter.type = "lora"``, ``general.architecture`` of the base,
  ``adapter.lora.alpha`` (float); the rank is not stored, llama.cpp reads it from each tensor's shape;
- per adapted base tensor ``<gguf name>.weight.lora_a`` = PEFT's ``lora_A`` (r, in) and
  ``.lora_b`` = ``lora_B`` (out, r), in PyTorch's row-major orientation (GGUF ``ne`` reversed);
  an embedding's pair is ``lora_a = lora_embedding_A.T`` (vocab, r), ``lora_b = lora_embedding_B``
  (hidden, r), the layout llama.cpp's input-embedding lookup gathers rows of ``lora_a`` from;
- llama.cpp computes ``y += scale * B @ (A @ x)`` with ``scale = alpha / rank`` (one alpha for the
  whole file). PEFT's per-module ``alpha_m / r_m`` (or ``alpha_m / sqrt(r_m)`` with rslora) is
  written as ``alpha = scale_m * r_m``, which must be one number for all modules: rslora at one
  rank becomes ``alpha * sqrt(r)``; an ``alpha_pattern`` that changes the ratio is refused (the
  converter writes ``lora_alpha`` as is, which misscales rslora and alpha_pattern adapters);
- llama.cpp's converter permutes the rows of Llama's ``q_proj``/``k_proj`` weights from HF's
  rotate-half rope pairs (row i with i + d/2 of each head) to adjacent pairs (2i, 2i+1):
  ``W.reshape(heads, 2, d // 2, in).swapaxes(1, 2)``, so ``B`` of q/k gets the same row
  permutation (``A`` reads the input side and is unchanged): ``P (B A) = (P B) A``.

Refused, naming the config field: non-LoRA methods, DoRA and other variants whose forward is not
``B A x``, inits that changed the base (PiSSA, OLoRA, ...), full tensors (modules_to_save, biases),
and modules llama.cpp has no tensor for. PEFT's copy of a targeted embedding's base weight is
skipped, as the converter skips it.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from pathlib import Path

import torch

from peftc.errors import PeftcError
from peftc.peft_files import PREFIX, normal_mode, read_peft_config, read_peft_weights

__all__ = ["save_gguf_adapter", "GGUFExportError"]

# HF architecture -> (llama.cpp's GGUF arch name, does its converter permute q/k rows for rope)
ARCHITECTURES = {
    "LlamaForCausalLM": ("llama", True),
    "MistralForCausalLM": ("llama", True),
    "Qwen2ForCausalLM": ("qwen2", False),
    "Qwen3ForCausalLM": ("qwen3", False),
}
_MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                "qwen3": "Qwen3ForCausalLM"}  # a config built in code has no `architectures`
DTYPES = ("f32", "f16")
_SUFFIXES = {".lora_A.weight": "A", ".lora_B.weight": "B", ".lora_embedding_A": "A", ".lora_embedding_B": "B"}
# LoRA variants whose forward is not y += scale * B A x, or whose B A needs a base other than the original one
_UNREPRESENTABLE = ("use_dora", "lora_bias", "layer_replication", "target_parameters", "trainable_token_indices",
                    "use_qalora", "use_bdlora", "velora_config", "monteclora_config", "arrow_config",
                    "kasa_config")
_BASE_CHANGING_INITS = ("pissa", "corda", "olora", "loftq", "lora_ga")


class GGUFExportError(PeftcError, ValueError):
    """The adapter (or an argument) cannot be written as a llama.cpp GGUF adapter."""

    def __init__(self, field: str, value: object, allowed: str, why: str = ""):
        self.field, self.value, self.allowed = field, value, allowed
        msg = f"{field}: got {value!r}; allowed: {allowed}"
        super().__init__(f"{msg} ({why})" if why else msg)


def _gguf():
    try:
        import gguf
    except ImportError:
        raise PeftcError("writing a GGUF adapter needs the gguf package: pip install gguf") from None
    return gguf


def _check_config(cfg: dict) -> None:
    """Refuses what llama.cpp's LoRA (one alpha, y += alpha/r * B A x on the original base) cannot hold."""
    if cfg.get("peft_type") != "LORA":
        raise GGUFExportError("peft_type", cfg.get("peft_type"), "'LORA'",
                              "llama.cpp adapters are LoRA; merge other methods into the base instead")
    for field in _UNREPRESENTABLE:
        if cfg.get(field):
            raise GGUFExportError(field, cfg[field], "unset / false", "llama.cpp LoRA adapters are plain B @ A")
    init = cfg.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS):
        raise GGUFExportError("init_lora_weights", init, "true, false, 'gaussian', 'eva', 'orthogonal'",
                              "this init changed the base weights; save with PEFT's "
                              "path_initial_model_for_weight_conversion to get a plain LoRA")


def _base_hparams(cfg: dict, base_config, adapter_dir: Path) -> dict:
    if base_config is None:
        name = cfg.get("base_model_name_or_path")
        if not (name and (Path(name) / "config.json").is_file()):
            raise GGUFExportError("base_config", None, "the base model's transformers config or a dict",
                                  f"base_model_name_or_path {name!r} of {adapter_dir} is not a local model dir; "
                                  "pass base_config=AutoConfig.from_pretrained(...)")
        return json.loads((Path(name) / "config.json").read_text())
    return dict(base_config) if isinstance(base_config, dict) else base_config.to_dict()


def _arch(hp: dict) -> tuple[str, bool]:
    archs = hp.get("architectures") or [_MODEL_TYPES.get(hp.get("model_type"), hp.get("model_type"))]
    if archs[0] not in ARCHITECTURES:
        raise GGUFExportError("base_config.architectures", archs, ", ".join(ARCHITECTURES))
    return ARCHITECTURES[archs[0]]


def _pairs(weights: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """{HF module name: {"A": ..., "B": ..., "emb": bool}} from the PEFT checkpoint keys."""
    pairs: dict[str, dict] = {}
    for key, t in weights.items():
        if key.endswith(".base_layer.weight"):  # PEFT's copy of a targeted embedding's base; the converter skips it
            continue
        suffix = next((s for s in _SUFFIXES if key.endswith(s)), None)
        if suffix is None or not key.startswith(PREFIX):
            raise GGUFExportError("adapter tensor", key, "lora_A/lora_B (or lora_embedding_A/B) weights",
                                  "llama.cpp adapters hold only LoRA pairs: no modules_to_save, biases or tokens")
        entry = pairs.setdefault(key[len(PREFIX):-len(suffix)], {"emb": "embedding" in suffix})
        entry[_SUFFIXES[suffix]] = t.float()
    for module, p in pairs.items():
        if "A" not in p or "B" not in p:
            raise GGUFExportError("adapter tensors", module, "both lora_A and lora_B", "the checkpoint is missing one")
    return pairs


def _pattern(patterns: dict, module: str, default):
    """PEFT's rank/alpha_pattern lookup: the first key that matches a dotted suffix of the name."""
    return next((v for k, v in patterns.items() if re.match(rf"(.*\.)?({k})$", module)), default)


def _alpha(cfg: dict, pairs: dict) -> float:
    """The one llama.cpp alpha giving every module PEFT's scale: alpha_m / r_m, or alpha_m / sqrt(r_m)."""
    rslora = bool(cfg.get("use_rslora"))
    per_module = {}
    for module, p in pairs.items():
        r = p["A"].shape[0]
        a = float(_pattern(cfg.get("alpha_pattern") or {}, module, cfg.get("lora_alpha", 8)))
        per_module[module] = a * math.sqrt(r) if rslora else a  # = PEFT scale * r
    values = sorted(set(per_module.values()))
    if not math.isclose(values[0], values[-1], rel_tol=1e-6):
        field = "alpha_pattern" if cfg.get("alpha_pattern") else "use_rslora"
        raise GGUFExportError(field, cfg.get(field), "one alpha/rank ratio for every module",
                              f"llama.cpp has one adapter alpha (scale = alpha / rank); these modules need "
                              f"alpha {per_module}")
    if values[0] == 0:
        raise GGUFExportError("lora_alpha", 0, "nonzero", "llama.cpp reads adapter.lora.alpha = 0 as scale 1")
    return values[0]


def _rope_rows(b: torch.Tensor, heads: int, module: str) -> torch.Tensor:
    """llama.cpp's q/k row permutation: rotate-half pairs (i, i + d/2) -> adjacent pairs (2i, 2i + 1)."""
    if b.shape[0] % (2 * heads):
        raise GGUFExportError("base_config heads", heads, f"a divisor of {module}'s {b.shape[0]} rows / 2")
    return b.reshape(heads, 2, b.shape[0] // heads // 2, *b.shape[1:]).transpose(1, 2).reshape(b.shape)


def _tensors(pairs: dict, hp: dict, arch: str, permute: bool) -> list[tuple[str, torch.Tensor]]:
    gguf = _gguf()
    heads = hp.get("num_attention_heads")
    kv_heads = hp.get("num_key_value_heads") or heads
    layers = hp.get("num_hidden_layers")
    if not (isinstance(heads, int) and isinstance(layers, int)):
        raise GGUFExportError("base_config", {"num_attention_heads": heads, "num_hidden_layers": layers},
                              "integer num_attention_heads and num_hidden_layers")
    names = gguf.get_tensor_name_map(next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch), layers)
    out = []
    block = lambda module: int(m.group(1)) if (m := re.search(r"\.(\d+)\.", module)) else -1
    for module, p in sorted(pairs.items(), key=lambda kv: (block(kv[0]), kv[0])):
        name = names.get_name(module)
        if name is None:
            raise GGUFExportError("target module", module, f"a module with a llama.cpp {arch} tensor",
                                  f"no GGUF name for it (or base_config's {layers} layers are wrong)")
        if name == "output" and hp.get("tie_word_embeddings"):
            raise GGUFExportError("target module", module, "not lm_head when the base ties it to the embeddings",
                                  "a tied llama.cpp base has no output.weight to adapt")
        a, b = p["A"], p["B"]
        if permute and module.endswith("q_proj"):
            b = _rope_rows(b, heads, module)
        elif permute and module.endswith("k_proj"):
            b = _rope_rows(b, kv_heads, module)
        if p["emb"]:
            a = a.T  # llama.cpp gathers token rows of lora_a: (vocab, r)
        out += [(f"{name}.weight.lora_a", a), (f"{name}.weight.lora_b", b)]
    return out


def save_gguf_adapter(adapter_dir: str | os.PathLike, path: str | os.PathLike, *, base_config=None,
                      dtype: str = "f32") -> Path:
    """Writes the PEFT LoRA adapter at ``adapter_dir`` (adapter_config.json + adapter_model.safetensors)
    as a llama.cpp GGUF adapter at ``path`` (a temp file in the same dir, then renamed).

    ``base_config``: the base model's transformers config or its dict (architecture, heads, key/value
    heads, layers); None reads ``base_model_name_or_path``'s config.json when that is a local dir.
    ``dtype``: "f32" or "f16" (llama.cpp's converter ``--outtype``). Raises ``GGUFExportError``
    naming the field for what llama.cpp cannot represent, e.g.::

        save_gguf_adapter("out/", "out/adapter.gguf", base_config=model.config, dtype="f16")
    """
    if dtype not in DTYPES:
        raise GGUFExportError("dtype", dtype, ", ".join(DTYPES))
    gguf = _gguf()
    adapter_dir, path = Path(adapter_dir), Path(path)
    cfg = read_peft_config(adapter_dir)
    _check_config(cfg)
    hp = _base_hparams(cfg, base_config, adapter_dir)
    arch, permute = _arch(hp)
    pairs = _pairs(read_peft_weights(adapter_dir))
    if not pairs:
        raise GGUFExportError("adapter tensors", [], "at least one LoRA pair")
    alpha = _alpha(cfg, pairs)
    tensors = _tensors(pairs, hp, arch, permute)

    np_dtype = {"f32": "float32", "f16": "float16"}[dtype]
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-", suffix=".tmp")
    os.close(fd)
    try:
        w = gguf.GGUFWriter(tmp, arch)
        w.add_type(gguf.GGUFType.ADAPTER)
        w.add_string(gguf.Keys.Adapter.TYPE, "lora")
        w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        w.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16}[dtype])
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        if tokens := cfg.get("alora_invocation_tokens"):  # activated LoRA: llama.cpp's converter writes these
            w.add_key_value(gguf.Keys.Adapter.ALORA_INVOCATION_TOKENS, [int(t) for t in tokens],
                            gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.UINT32)
        for name, t in tensors:
            w.add_tensor(name, t.contiguous().numpy().astype(np_dtype))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.chmod(tmp, normal_mode())  # mkstemp made it 0600
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path
