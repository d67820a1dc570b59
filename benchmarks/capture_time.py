"""Capture + rewrite time of Llama-shaped models on the meta device (no weights, no values).

    python -m benchmarks.capture_time                  # 2/8/32/80 layers at 8B and 70B widths
    python -m benchmarks.capture_time --quick          # 2 and 8 layers, 8B width

Each point is ``peftc.compile(model, lora(all 7 linears, r=16), {"input_ids": (2, 16)})`` on a
``LlamaForCausalLM`` built under ``torch.device("meta")``: capture (``torch.export``; for >= 6
alike layers three traced and the third repeated, ``peftc.repeat_layers``) and the rewrite
passes. ``--full`` also times the whole-model trace (``capture(..., repeat_layers=False)``),
the way every layer was captured before. One process, a warm-up compile first (imports, lazy
init); each point is the minimum of ``--reps`` runs (others' load only adds time). Results:
``benchmarks/results/capture_time.json`` and the ``capture_time`` section of RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from peftc.benchmarks.report import atomic_write, write_section

__all__ = ["WIDTHS", "measure", "run", "main"]

WIDTHS = {  # Llama-3 shapes
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8),
    "70b": dict(hidden_size=8192, intermediate_size=28672, num_attention_heads=64, num_key_value_heads=8),
}
SPEC = {"methods": [{"lora": {"targets": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                          "down_proj"], "r": 16}}]}


def _model(width: str, layers: int):
    import transformers as tf

    cfg = tf.LlamaConfig(**WIDTHS[width], num_hidden_layers=layers, vocab_size=128256, max_position_embeddings=8192)
    with torch.device("meta"):
        return tf.LlamaForCausalLM(cfg)


def measure(width: str, layers: int, *, repeat_layers: bool = True) -> dict:
    """One compile on the meta device: seconds in total, in capture, in the passes; graph size."""
    import peftc
    from peftc.graph_cache import GraphCache

    model = _model(width, layers)
    ids = torch.zeros((2, 16), dtype=torch.long, device="meta")
    original = GraphCache._capture
    if not repeat_layers:  # the whole-model trace: what capture did before repeat_layers
        def whole(self, sig, kwargs, **options):
            return original(self, sig, kwargs, **{**options, "repeat_layers": False})
        GraphCache._capture = whole
    try:
        start = time.perf_counter()
        cm = peftc.compile(model, SPEC, {"input_ids": ids})
        total = time.perf_counter() - start
    finally:
        GraphCache._capture = original
    return {"width": width, "layers": layers, "repeat_layers": repeat_layers, "total_s": total,
            "capture_s": cm.capture_stats.seconds, "passes_s": sum(cm.pass_timings.values()),
            "captured_nodes": len(cm.captured_graph.nodes), "lora_sites": cm.pass_counts.get("lora", 0)}


def run(points: list[tuple[str, int]], *, full: bool, reps: int) -> list[dict]:
    measure("8b", 2)  # warm-up
    rows = []
    for width, layers in points:
        for repeat in (True, False) if full else (True,):
            runs = [measure(width, layers, repeat_layers=repeat) for _ in range(reps)]
            best = min(runs, key=lambda r: r["total_s"])
            best["runs_total_s"] = [round(r["total_s"], 3) for r in runs]
            rows.append(best)
            print(json.dumps(best), flush=True)
    return rows


def _markdown(rows: list[dict], argv: str, load: str) -> str:
    lines = ["## Capture time (meta device)", "",
             f"`{argv}` on {platform.processor() or platform.machine()} ({os.cpu_count()} cores, load average "
             f"{load} during the run), torch {torch.__version__}; "
             "LoRA r=16 on all 7 linears, input_ids (2, 16); minimum of the runs (a shared CPU: others' "
             "load only adds time). `repeated`: three layers traced, the third repeated; `whole`: every "
             "layer traced.", "",
             "| width | layers | capture | total (capture + passes) | passes | captured nodes | LoRA sites |",
             "|---|---:|---|---:|---:|---:|---:|"]
    for r in rows:
        how = "repeated" if r["repeat_layers"] else "whole"
        lines.append(f"| {r['width']} | {r['layers']} | {how} | {r['total_s']:.2f} s | {r['passes_s']:.2f} s | "
                     f"{r['captured_nodes']} | {r['lora_sites']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="2 and 8 layers at the 8B width only")
    ap.add_argument("--full", action="store_true", help="also time the whole-model trace")
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent)
    args = ap.parse_args(argv)
    points = [("8b", 2), ("8b", 8)] if args.quick else [
        ("8b", 2), ("8b", 8), ("8b", 32), ("8b", 80), ("70b", 2), ("70b", 8), ("70b", 32), ("70b", 80)]
    load = os.getloadavg()[0]
    rows = run(points, full=args.full, reps=args.reps)
    load = f"{load:.0f} -> {os.getloadavg()[0]:.0f}"
    atomic_write(args.out / "results" / "capture_time.json", json.dumps(rows, indent=1))
    cmd = " ".join(["python -m benchmarks.capture_time", *(sys.argv[1:] if argv is None else argv)])
    write_section(args.out / "RESULTS.md", "capture_time", _markdown(rows, cmd, load))


if __name__ == "__main__":
    main()
