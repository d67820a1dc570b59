"""Peak memory of ``merge()`` + ``save_merged()`` on a Llama-shaped model built from a config.

    python -m benchmarks.merge_memory                      # ~370M parameters fp32 (1.5 GB), minutes
    python -m benchmarks.merge_memory --quick --out /tmp/m # tiny shapes: seconds

Each measurement runs in a child process started with ``MALLOC_MMAP_THRESHOLD_=65536``, so
large tensors are mmaps and freeing one returns it to the OS: RSS follows live tensors. Per
phase the child resets the kernel's peak-RSS counter (``/proc/self/clear_refs`` <- 5) and reads
``VmHWM`` afterwards; a phase's figure is that peak minus the RSS when it began.

Phases, on a model compiled with LoRA on all seven linears of every layer and captured for
three call signatures (``input_ids``; + ``attention_mask``; + ``labels``):

- **merge**: ``cm.merge()`` and one forward per signature (graphs are built lazily);
- **save_merged**: ``cm.save_merged(dir)``;
- **unmerge**: ``cm.unmerge()`` and one forward per signature;
- **save_merged_unmerged**: ``cm.save_merged(dir)`` again, not merged (folds computed while writing).

Besides RSS the child counts tensor bytes that merging added (unique storages reachable from
the compiled model, its graphs and its merge state, minus those there before), checks merged
against unmerged logits, that the saved directory reloads with ``from_pretrained`` to the
merged logits, and that unmerge gives the base weights back bit for bit.
``--baseline FILE`` adds an earlier run (e.g. of an older commit) to the report as "before".
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

from peftc.benchmarks.report import atomic_write, write_section

__all__ = ["main", "run", "child", "SHAPES", "QUICK"]

SHAPES = {"hidden": 1024, "intermediate": 2816, "layers": 24, "heads": 16, "vocab": 32000, "r": 16}
QUICK = {"hidden": 64, "intermediate": 128, "layers": 2, "heads": 4, "vocab": 256, "r": 4}


def _status(key: str) -> int:
    """A /proc/self/status field in bytes (VmRSS, VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _storages(tensors) -> dict[int, int]:
    return {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors
            if t is not None and t.device.type != "meta"}


def _held_tensors(cm) -> list:
    """Every tensor the compiled model holds: its own, its graphs' and its merge state's."""
    import torch

    out = [*cm.parameters(), *cm.buffers()]
    for gm in cm.graphs.all_graphs():
        out += [*gm.parameters(), *gm.buffers()]
    state = getattr(cm.adapters, "_peftc_merge_state", None)  # absent before in-place merging
    if state is not None:
        out += [t for t in state.tensors() if isinstance(t, torch.Tensor)]
    return out


def child(cfg: dict) -> dict:
    """One measurement (run in a fresh process): returns the figures as a dict."""
    import torch
    import transformers as tf

    import peftc

    torch.manual_seed(0)
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    config = tf.LlamaConfig(hidden_size=cfg["hidden"], intermediate_size=cfg["intermediate"],
                            num_hidden_layers=cfg["layers"], num_attention_heads=cfg["heads"],
                            num_key_value_heads=cfg["heads"], vocab_size=cfg["vocab"],
                            max_position_embeddings=128, tie_word_embeddings=False)
    model = tf.LlamaForCausalLM(config).eval()
    n_params = sum(p.numel() for p in model.parameters())
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, cfg["vocab"], (1, 6), generator=g)
    sigs = [{"input_ids": ids}, {"input_ids": ids, "attention_mask": torch.ones_like(ids)},
            {"input_ids": ids, "labels": ids}]
    lora = {"targets": "all-linear", "r": cfg["r"], "alpha": 2 * cfg["r"]}
    cm = peftc.compile(model, {"methods": [{"lora": lora}]}, sigs[0]).eval()
    with torch.no_grad():
        for p in cm.trainable_parameters():  # PEFT's B = 0 would make the merge a no-op
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)
        ref = [cm(**s).logits for s in sigs]
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    before_bytes = sum(_storages(_held_tensors(cm)).values()) + sum(t.nbytes for t in base.values())
    phases, merged_diff = {}, 0.0

    def phase(name, fn):
        import gc

        gc.collect()
        start = _status("VmRSS")
        exact_peak = _reset_peak()
        out = fn()
        gc.collect()
        phases[name] = {"start_rss": start, "peak_rss": _status("VmHWM"), "end_rss": _status("VmRSS"),
                        "peak_over_start": _status("VmHWM") - start, "peak_is_per_phase": exact_peak}
        return out

    def merge_and_run():
        cm.merge()
        with torch.no_grad():
            return [cm(**s).logits for s in sigs]

    merged = phase("merge", merge_and_run)
    merged_diff = max((m - r).abs().max().item() for m, r in zip(merged, ref))
    held = _storages(_held_tensors(cm))
    base_ptrs = _storages([*base.values()])
    added = sum(v for k, v in held.items() if k not in base_ptrs) + sum(base_ptrs.values()) - before_bytes
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "merged"
        phase("save_merged", lambda: cm.save_merged(out))
        files = sorted(p.name for p in out.iterdir())
        del merged
        loaded = tf.AutoModelForCausalLM.from_pretrained(out).eval()
        with torch.no_grad():
            saved_diff = max((loaded(**s).logits - r).abs().max().item() for s, r in zip(sigs, ref))
        del loaded

    def unmerge_and_run():
        cm.unmerge()
        with torch.no_grad():
            return [cm(**s).logits for s in sigs]

    phase("unmerge", unmerge_and_run)
    restored = all(torch.equal(v, base[k]) for k, v in model.state_dict().items())
    with tempfile.TemporaryDirectory() as tmp:  # exporting without merging: folds computed while writing
        phase("save_merged_unmerged", lambda: cm.save_merged(Path(tmp) / "merged"))
    return {"shapes": cfg, "params": n_params, "model_bytes": model_bytes, "phases": phases,
            "merged_tensor_bytes": added, "merged_vs_unmerged_max_abs": merged_diff,
            "saved_vs_unmerged_max_abs": saved_diff, "saved_files": files,
            "unmerge_bit_exact": restored, "signatures": len(sigs)}


def run(cfg: dict) -> dict:
    """Runs ``child`` in a fresh interpreter with the mmap threshold set; returns its result."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    proc = subprocess.run([sys.executable, "-m", "benchmarks.merge_memory", "--child", json.dumps(cfg)],
                          env=env, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    if proc.returncode:
        raise RuntimeError(f"merge_memory child failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _mb(n: float) -> str:
    return f"{n / 2**20:,.0f}"


def _section(result: dict) -> str:
    rows = [("before", result.get("before")), ("after", result["after"])]
    s = result["after"]["shapes"]
    lines = [
        "## Merge memory: `merge()` + `save_merged()`", "",
        f"Command: `{result['command']}`", "",
        f"Model: Llama (random init, fp32), hidden {s['hidden']}, {s['layers']} layers, intermediate "
        f"{s['intermediate']}, vocab {s['vocab']}: {result['after']['params']:,} parameters "
        f"({_mb(result['after']['model_bytes'])} MB). LoRA r={s['r']} on all 7 linears of every layer; "
        "graphs captured for 3 call signatures. Peak RSS over the RSS at the start of each phase, measured "
        "in a child process with `MALLOC_MMAP_THRESHOLD_=65536` (peak reset per phase via /proc/self/clear_refs). "
        "Merged tensor bytes: unique storages that merging added (counted, not sampled).", "",
        "| code | merge peak MB | save_merged peak MB | unmerge peak MB | save_merged, not merged, peak MB | "
        "merged tensor bytes MB | merged vs unmerged | saved dir vs unmerged | unmerge bit-exact |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for name, r in rows:
        if r is None:
            continue
        p = r["phases"]
        lines.append(f"| {name} ({r.get('commit', '?')}) | {_mb(p['merge']['peak_over_start'])} | "
                     f"{_mb(p['save_merged']['peak_over_start'])} | {_mb(p['unmerge']['peak_over_start'])} | "
                     f"{_mb(p['save_merged_unmerged']['peak_over_start']) if 'save_merged_unmerged' in p else '-'} | "
                     f"{_mb(r['merged_tensor_bytes'])} | {r['merged_vs_unmerged_max_abs']:.1e} | "
                     f"{r['saved_vs_unmerged_max_abs']:.1e} | {r['unmerge_bit_exact']} |")
    lines += ["", f"Raw figures: `results/merge_memory.json`. {result.get('note', '')}".rstrip()]
    return "\n".join(lines) + "\n"


def write(result: dict, out: Path, report: Path) -> None:
    """JSON to ``out/merge_memory.json``; the report section replaced (or appended) in ``report``."""
    atomic_write(out / "merge_memory.json", json.dumps(result, indent=2) + "\n")
    write_section(report, "merge_memory", _section(result))


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).resolve().parents[1]).stdout.strip() or "?"
    except OSError:
        return "?"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny shapes (seconds)")
    ap.add_argument("--out", default="benchmarks/results", help="directory for merge_memory.json")
    ap.add_argument("--report", help="RESULTS.md to put the section in (default: <out>/../RESULTS.md for "
                    "the default --out, else <out>/RESULTS.md)")
    ap.add_argument("--baseline", help="an earlier merge_memory.json (its 'after' run is shown as 'before')")
    ap.add_argument("--note", default="", help="a line under the table")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return {}
    cfg = dict(QUICK if args.quick else SHAPES)
    after = {**run(cfg), "commit": _commit()}
    before = json.loads(Path(args.baseline).read_text())["after"] if args.baseline else None
    result = {"schema": "peftc.bench.merge_memory/1", "command": "python -m benchmarks.merge_memory "
              + " ".join(argv if argv is not None else sys.argv[1:]), "before": before, "after": after,
              "note": args.note, "platform": f"{platform.machine()}, {os.cpu_count()} CPUs, Python "
              f"{platform.python_version()}"}
    out = Path(args.out)
    report = Path(args.report) if args.report else (
        Path("benchmarks/RESULTS.md") if args.out == "benchmarks/results" else out / "RESULTS.md")
    write(result, out, report)
    return result


if __name__ == "__main__":
    main()
