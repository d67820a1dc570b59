"""A quantized base after compile: merging onto it (``merge(requantize=...)``), guarding released base
weights, and reporting (``graph_summary()`` lines, ``weight_bytes``). The pass is passes/optimize/quantize.py.

    errors = merge_quantized(cm, requantize=True)   # {module path: max abs rounding error}
    weight_bytes(cm)  # {"quantized": ..., "graph_full_precision": ..., "base_model": ...}
"""

from __future__ import annotations

from collections import Counter

import torch

from peftc import targets as _targets
from peftc.errors import PeftcError
from peftc.kernels.quant_formats import in_features
from peftc.kernels.quant_gemv import MAX_ROWS
from peftc.kernels.quant_gemv import status as gemv_status
from peftc.passes.optimize.quantize import (
    ROOT,
    QuantizedWeight,
    _resolve,
    check_model,
    check_settings,
    quantize,
)
from peftc.passes.optimize.quantize_load import fill_store
from peftc.passes.pipeline import register_optimization

__all__ = ["merge_quantized", "unmerge_quantized", "check_released", "weight_bytes", "summary"]


def merge_quantized(cm, requantize: bool) -> dict[str, float]:
    """``cm.merge(requantize=...)`` on a quantized base: refuses unless ``requantize``; else each
    adapted quantized weight W' = fold(deq(Q(W))) is quantized again, Q(W') stored beside Q(W)
    (the merged graph reads it; ``unmerge`` drops it), and the rounding error max|deq(Q(W')) - W'|
    is returned per module path (and shown in ``graph_summary()``)."""
    root = cm.adapters.get_submodule(ROOT)
    if not requantize:
        raise PeftcError(f"the base weights are stored quantized ({root.settings['format']}): merging the adapters "
                         "into them would round the merged weights again; call merge(requantize=True) to "
                         "dequantize, merge and requantize (the rounding error is reported), or keep the adapter "
                         "unmerged")
    errors = {}
    for path, qw in [(n, m) for n, m in root.named_modules() if isinstance(m, QuantizedWeight)]:
        if path.endswith(".merged"):
            continue
        kind = _targets.linear_kind(cm.get_base_model().get_submodule(path))
        w = qw.dequantize(torch.float32)
        w = w.t() if kind == "conv1d" else w  # as the graph stores it
        bias = getattr(cm.get_base_model().get_submodule(path), "bias", None)
        folded = False
        for name in cm.active_adapters:
            state = cm.registry.state(name)
            for entry, found in zip(state.spec.methods, state.targets):
                if entry.sites != "linear" or path not in found:
                    continue  # the linear-site methods all fold (LinearMethod); others: peftc.merging refuses
                module = cm.adapters.get_submodule(f"{path}.{entry.store_dir}.{name}")
                with torch.no_grad():
                    w, bias = entry.fold(path, module, w, bias, kind == "conv1d")
                folded = True
        if hasattr(qw, "merged"):
            del qw.merged
        if not folded:
            continue
        target = w.t() if kind == "conv1d" else w
        qw.merged = QuantizedWeight(target.to(qw.dtype), qw.fmt, qw.block_size, qw.qscale2.numel() > 0)
        errors[path] = (qw.merged.dequantize(torch.float32) - target.float()).abs().max().item()
    root.merge_error = errors
    return errors


def check_released(cm) -> None:
    """Refuses to read base weights that ``release_base`` replaced by placeholders."""
    try:
        root = cm.adapters.get_submodule(ROOT)
    except AttributeError:
        return
    if root.released:
        raise PeftcError(f"the base weights of {sorted(root.released)[:3]}... were released (optimize.quantize."
                         "release_base: true): their full-precision values are gone; merge(requantize=True) "
                         "merges into the quantized weights instead")


def unmerge_quantized(cm) -> None:
    root = cm.adapters.get_submodule(ROOT)
    for m in root.modules():
        if isinstance(m, QuantizedWeight) and hasattr(m, "merged"):
            del m.merged
    root.merge_error = {}


# ---------------------------------------------------------------- reporting


def weight_bytes(cm) -> dict[str, int]:
    """Bytes of weights: ``quantized`` (stored Q(W)), ``graph_full_precision`` (float tensors the
    rewritten graph still reads, adapters excluded), ``base_model`` (what the user's model holds)."""
    gm = cm.graph_module
    root = cm.adapters.get_submodule(ROOT)
    quant = sum(m.nbytes() for m in root.modules() if isinstance(m, QuantizedWeight))
    seen, full = set(), 0
    adapter_ids = {id(p) for p in cm.adapters.parameters()}
    for n in gm.graph.nodes:
        if n.op == "get_attr":
            t = _resolve(gm, n.target)
            if isinstance(t, torch.Tensor) and t.is_floating_point() and id(t) not in seen | adapter_ids:
                seen.add(id(t))
                full += t.untyped_storage().nbytes()
    base = sum(p.untyped_storage().nbytes() for p in cm.get_base_model().parameters())
    return {"quantized": quant, "graph_full_precision": full, "base_model": base}


def summary(cm) -> str:
    """Lines for ``graph_summary()``: what is quantized, at how many bits, what stayed full precision."""
    try:
        root = cm.adapters.get_submodule(ROOT)
    except AttributeError:
        return ""
    s = root.settings
    qws = [(n, m) for n, m in root.named_modules() if isinstance(m, QuantizedWeight) and not n.endswith(".merged")]
    numel = sum(m.data.shape[0] * in_features(m.data, m.fmt) for _, m in qws)
    nbytes = sum(m.nbytes() for _, m in qws)
    fmt = s["format"] + ("" if s["format"] == "int8" else f", block {s['block_size']}") + (
        f", double_quant {s['double_quant']}" if s["format"] == "nf4" else "")
    held = Counter(f"{m.fmt}, block {m.block_size}" for _, m in qws)
    if any(m.fmt != s["format"] or m.block_size != s["block_size"] for _, m in qws):  # a checkpoint's own blocks
        fmt = "; ".join(f"{n} {f}" for f, n in sorted(held.items()))
    lines = [f"quantize ({fmt}): {len(qws)} weights, {nbytes:,} bytes, "
             f"{8 * nbytes / max(numel, 1):.3f} bits/weight" + ("; base parameters released" if root.released else "")]
    if any(t.device.type == "cpu" for _, m in qws for t in m.tensors()[:1]):
        lines.append(f"quantize (decode path): CPU linears of up to {MAX_ROWS} rows: {gemv_status()}")
    lines += [f"quantize: kept full precision {p}: {why}" for p, why in sorted(root.kept.items())]
    lines += [f"quantize (shared weight) {p}: its linear reads are quantized; {by} still reads the full-precision weight (held too)"
              for p, by in sorted(root.shared.items())]
    lines += [f"quantize (loaded): {line}" for line in getattr(root, "loaded", ())]
    lines += [f"merge: requantized {p}: max abs rounding error {e:.3g}" for p, e in sorted(root.merge_error.items())]
    return "\n".join(lines) + "\n"


# the one record of the quantize optimization: its pass (passes/optimize/quantize.py) and its hooks
register_optimization("quantize", phase="quantize", check=check_settings, on_base=True, check_model=check_model,
                      before_merge=merge_quantized, after_unmerge=unmerge_quantized, before_export=check_released,
                      summary=summary, load_quantized=fill_store)(quantize)
