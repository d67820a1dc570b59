"""The ``quantize`` optimization's ``load_quantized`` hook: a model compiled on the meta device, its
checkpoint streamed tensor by tensor into the quantized store (``peftc.load_quantized`` opens the
checkpoint and calls it; QLoRA without ever holding the full-precision base).

    with accelerate.init_empty_weights():                   # parameters on the meta device
        model = AutoModelForCausalLM.from_config(config)
    cm = peftc.compile(model, spec, ids, optimize={"quantize": {"format": "nf4"}})
    peftc.load_quantized(cm, "checkpoint_dir")              # safetensors (sharded or not) or a .gguf file

Each weight the store quantizes is read, quantized and dropped before the next is read (a
safetensors file is opened per tensor, a GGUF file read at offsets, so no memory map keeps the
pages of tensors already done): peak memory is the quantized model, the tensors kept full
precision (norms, embeddings, a skipped head), the largest single tensor and a fixed overhead
(benchmarks/quant_load.py measures it). GGUF Q4_0 / Q4_1 / Q8_0 blocks are held as they are when
``keep_blocks`` (the weight's format becomes int4 / int8g, block 32: exact, no requantization);
other tensors of a GGUF file are dequantized by the gguf package first. The graphs captured on the
meta device are dropped and captured again at the next call; adapters are created as at compile.
"""

from __future__ import annotations

from collections import Counter

from peftc import targets as _targets
from peftc.errors import CheckpointError, SpecError
from peftc.graph import placeholder
from peftc.kernels.quant_formats import quantize_weight
from peftc.passes.optimize.meta_load import base_tensors, materialize_adapters, retie, swap_tensor
from peftc.passes.optimize.quantize import ROOT, QuantizedWeight

__all__ = ["fill_store"]


def _check_complete(cm, source, keys: dict, names: dict, qws: dict) -> None:
    """Before anything is loaded (a failed load leaves the model as it was): every meta tensor (under
    one of its names, ties counted once) and every quantized weight has a checkpoint tensor of its shape."""
    where = getattr(source, "path", "the checkpoint")
    groups: dict[int, list[str]] = {}
    for n, t in names.items():
        if t.device.type == "meta":
            groups.setdefault(id(t), []).append(n)
    missing = sorted(ns[0] for ns in groups.values() if not any(n in keys for n in ns))
    missing += sorted(n for n in qws if n not in keys and n not in missing)
    if missing:
        raise CheckpointError(f"{where}: no tensor for {missing[:5]} ({len(missing)} missing; names as the "
                              "model's, after stripping prefix)")
    for name, key in keys.items():
        if name in qws:
            path, qw = qws[name]
            conv1d = _targets.linear_kind(cm.get_base_model().get_submodule(path)) == "conv1d"
            want = qw.shape[::-1] if conv1d else qw.shape
        elif name in names:
            want = tuple(names[name].shape)
        else:
            continue
        if tuple(source.shape(key)) != tuple(want):
            raise CheckpointError(f"{where}: {key} has shape {tuple(source.shape(key))}; the model's {name} is "
                                  f"{tuple(want)}")


def fill_store(cm, source, *, prefix: str = "", device="cpu", keep_blocks: bool = True) -> dict:
    """Fills ``cm`` (compiled on the meta device with ``quantize``) from ``source`` (``peftc.quant_load``:
    ``keys()``, ``shape(key)``, ``tensor(key)``, or a GGUF file's ``names`` / ``kind`` / ``blocks`` too).
    ``prefix`` is stripped from checkpoint names. Returns counts and bytes: ``quantized`` weights
    (``blocks`` of them held as the file's own), ``full_precision`` tensors, and the bytes of each."""
    root = cm.adapters.get_submodule(ROOT)
    if not root.settings["release_base"]:
        raise SpecError("optimize.quantize.release_base", False, "true (the default) with load_quantized",
                        "the quantized weights are streamed into the store; no full-precision copy is loaded")
    names = base_tensors(cm.get_base_model())
    qws = {f"{p}.weight": (p, m) for p, m in root.named_modules() if isinstance(m, QuantizedWeight)
           and not p.endswith(".merged")}
    if not any(m.data.device.type == "meta" for _, m in qws.values()):
        raise CheckpointError("load_quantized: the quantized weights are already loaded (compile the model on the "
                              "meta device: accelerate.init_empty_weights())")
    gguf = hasattr(source, "blocks")
    config = cm.get_base_model().config.to_dict() if gguf else None
    keys = source.names(cm.get_base_model(), cm.get_base_model().config.num_hidden_layers) if gguf else \
        {k.removeprefix(prefix): k for k in source.keys()}
    _check_complete(cm, source, keys, names, qws)
    swapped, done, stats, kinds = {}, set(), Counter(), Counter()
    for name, key in keys.items():
        if name in qws:
            path_, qw = qws[name]
            held = source.blocks(key, config) if gguf and keep_blocks else None
            if held is not None:
                fmt, q = held
                kinds[f"{source.kind(key)} held as {fmt}"] += 1
                stats["blocks"] += 1
            else:
                w = source.tensor(key, config, qw.dtype) if gguf else source.tensor(key)
                if _targets.linear_kind(cm.get_base_model().get_submodule(path_)) == "conv1d":
                    w = w.t()
                fmt, q = qw.fmt, quantize_weight(w.to(device), qw.fmt, qw.block_size, qw.qscale2.numel() > 0)
                kinds[f"{source.kind(key) if gguf else str(w.dtype).removeprefix('torch.')} quantized to {fmt}"] += 1
                del w
            qw.assign(tuple(t.to(device) for t in q), fmt, 32 if held is not None else qw.block_size)
            stats["quantized"] += 1
            stats["quantized_bytes"] += qw.nbytes()
            done.add(name)
        elif name in names and names[name].device.type == "meta" and name not in done:
            old = names[name]
            value = source.tensor(key, config, old.dtype) if gguf else source.tensor(key).to(old.dtype)
            swap_tensor(cm.get_base_model(), name, old, value.to(device), swapped)
            kinds[f"{str(old.dtype).removeprefix('torch.')} from {source.kind(key)}" if gguf else "full precision"] += 1
            stats["full_precision"] += 1
            stats["full_precision_bytes"] += value.numel() * value.element_size()
            done.add(name)
    retie(cm.get_base_model(), names, swapped)
    for name, t in base_tensors(cm.get_base_model()).items():  # released weights: placeholders of the right shape
        if t.device.type == "meta" and name in qws:
            swap_tensor(cm.get_base_model(), name, t, placeholder(t, device), swapped)
    root.loaded = [f"{n} {'weights' if ' quantized ' in k or ' held ' in k else 'tensors'} {k}"
                   for k, n in sorted(kinds.items())]
    materialize_adapters(cm, device=device)
    cm.graphs.clear(device)
    return dict(stats)
