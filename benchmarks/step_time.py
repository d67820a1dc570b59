"""Training-step time: frozen base vs HF PEFT LoRA vs peftc LoRA (unfused, fused; + torch.compile), CPU or GPU.

    python -m benchmarks.step_time                 # 512-wide 4-layer Llama, batch 4 x 256
    python -m benchmarks.step_time --quick --out /tmp/bench   # tiny shapes, 2 reps

A step is ``loss = model(input_ids, labels).loss; loss.backward(); opt.step()`` with AdamW over
the trainable parameters. The frozen base has none, so it has no optimizer; its backward runs
from the loss into the activations down to the input embeddings (transformers'
``enable_input_require_grads``), with no weight gradients: the floor under any adapter step.
Variants run interleaved (round-robin, the order rotated every rep) after warm-up, so load
from other processes hits all of them alike; we report medians with min/max and IQR, and the
overhead over the frozen base both from medians and paired per round.
``run(config)`` is the entry point for tests and a future ``peftc bench``.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import shlex
import statistics
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from peftc.benchmarks.report import atomic_write, write_section

__all__ = ["BenchConfig", "run", "write", "main", "LINEARS"]

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class BenchConfig:
    """Shapes and run settings; ``report`` defaults to ``<out>/RESULTS.md``."""

    hidden: int = 512
    layers: int = 4
    intermediate: int = 1376  # ~8/3 * hidden, Llama's ratio
    heads: int = 8
    vocab: int = 4096  # small, so that the LM head does not hide the adapters' cost
    batch: int = 4
    seq: int = 256
    r: int = 16
    alpha: float = 32.0
    dropouts: tuple[float, ...] = (0.0, 0.05)
    fused: bool = True  # also time peftc with optimize=["fuse"]
    compile: bool = False  # also time torch.compile'd frozen base, PEFT and fused peftc
    ops: bool = True  # per-op micro-benchmark (one LoRA linear, fused op vs unfused)
    reps: int = 20
    warmup: int = 2
    lr: float = 1e-4
    seed: int = 0
    device: str = "cpu"  # "cuda" runs the same steps on a GPU (times synchronised per step)
    out: str = "benchmarks/results"
    report: str | None = None
    command: str = "run(BenchConfig())"
    progress: bool = True
    preliminary: str = ""  # a note printed on top of RESULTS.md (e.g. "machine was shared")

    @classmethod
    def quick(cls, **kw) -> BenchConfig:
        """Tiny shapes, for tests: seconds, not minutes."""
        small = dict(hidden=64, layers=2, intermediate=128, heads=4, vocab=128, batch=2, seq=16,
                     r=4, alpha=8.0, reps=2, warmup=1, ops=False)
        return cls(**{**small, **kw})


GPU_SHAPE = dict(hidden=2048, layers=4, intermediate=5504, heads=16, vocab=32000, batch=8, seq=512, reps=10)


def _base(cfg: BenchConfig) -> torch.nn.Module:
    from peftc.models import tiny_model

    return tiny_model("tiny-llama", seed=cfg.seed, hidden_size=cfg.hidden, intermediate_size=cfg.intermediate,
                      num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads,
                      num_key_value_heads=cfg.heads, vocab_size=cfg.vocab,
                      max_position_embeddings=max(256, cfg.seq), attention_dropout=0.0)


def _variants(cfg: BenchConfig, inputs: dict) -> dict[str, tuple[torch.nn.Module, torch.optim.Optimizer | None]]:
    """name -> (model in train mode, optimizer or None). PEFT and peftc start from the same base
    weights and the same non-zero adapter weights (B random, so the adapters change the loss)."""
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

    import peftc

    base = _base(cfg)
    snapshot = copy.deepcopy(base.state_dict())
    base.requires_grad_(False)
    base.enable_input_require_grads()
    out = {"frozen base": (base.to(cfg.device).train(), None)}
    small = {k: v[:, : max(2, cfg.seq // 2)].clone() for k, v in inputs.items()}  # capture shape != run shape
    for p in cfg.dropouts:
        pm_base = _base(cfg)
        pm_base.load_state_dict(snapshot)
        pm = get_peft_model(pm_base, LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=p,
                                                 target_modules=list(LINEARS)))
        g = torch.Generator().manual_seed(cfg.seed + 1)
        with torch.no_grad():
            for name, w in pm.named_parameters():
                if "lora_B" in name:
                    w.copy_(torch.randn(w.shape, generator=g) * 0.02)
        cm_base = _base(cfg)
        cm_base.load_state_dict(snapshot)
        spec = {"methods": [{"lora": {"targets": list(LINEARS), "r": cfg.r, "alpha": cfg.alpha, "dropout": p}}]}
        cm = peftc.compile(cm_base.train(), spec, example_inputs=small, optimize=None)
        cm.load_adapter_state_dict(get_peft_model_state_dict(pm))
        if cm.pass_counts.get("lora") != len(LINEARS) * cfg.layers:
            raise RuntimeError(f"peftc's lora pass did not rewrite every linear: {cm.pass_counts}")
        models = [(f"peft p={p}", pm), (f"peftc p={p}", cm)]
        # fused; with dropout also with one mask shared by siblings (q/k/v, gate/up), a deviation from PEFT
        for label, shared in (("peftc fused", False), ("peftc fused+shared", True)) if cfg.fused else ():
            if shared and p == 0:
                continue  # without dropout siblings are always grouped
            fb = _base(cfg)
            fb.load_state_dict(snapshot)
            fused = peftc.compile(fb.train(), spec, example_inputs=small,
                                  optimize={"fuse": {"shared_dropout": shared}})
            fused.load_adapter_state_dict(get_peft_model_state_dict(pm))
            if fused.pass_counts.get("fuse") != len(LINEARS) * cfg.layers:
                raise RuntimeError(f"peftc's fuse pass did not fuse every LoRA site: {fused.pass_counts}")
            models.append((f"{label} p={p}", fused))
        for name, model in models:
            model.to(cfg.device)  # before AdamW, so its state lives on the device
            opt = torch.optim.AdamW([w for w in model.parameters() if w.requires_grad], lr=cfg.lr)
            out[name] = (model.train(), opt)
    if cfg.compile:  # compiled runs are compared with the compiled frozen base
        for name in [n for n in out if n == "frozen base" or n.startswith(("peft p=", "peftc fused p="))]:
            model, opt = out[name]
            model = copy.deepcopy(model)  # own weights: the eager twin's steps do not move them
            out[f"{name} +compile"] = (torch.compile(model), opt if opt is None else torch.optim.AdamW(
                [w for w in model.parameters() if w.requires_grad], lr=cfg.lr))
    return out


def _step(model, opt, inputs: dict) -> float:
    if opt is not None:
        opt.zero_grad(set_to_none=True)
    loss = model(**inputs).loss
    loss.backward()
    if opt is not None:
        opt.step()
    return loss.item()  # .item() synchronises, so the wall time covers the whole step


def _sync(device: str):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _spread(ms: list[float]) -> dict:
    q = statistics.quantiles(ms, n=4, method="inclusive") if len(ms) > 1 else [ms[0]] * 3
    return {"median_ms": statistics.median(ms), "min_ms": min(ms), "max_ms": max(ms),
            "q1_ms": q[0], "q3_ms": q[2], "samples_ms": ms}


def _environment(device: str) -> dict:
    import peft
    import transformers

    return {"device": torch.cuda.get_device_name(device) if device.startswith("cuda") else
            f"CPU ({platform.processor() or platform.machine()})",
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__,
            "platform": platform.platform()}


def _rounds(n: int, label: str, show: bool):
    if show:
        try:
            from rich.progress import track

            return track(range(n), description=label, transient=True)
        except ImportError:
            pass
    return range(n)


def run(config: BenchConfig) -> dict:
    """Times every variant; writes JSON, PNG and RESULTS.md when ``config.out`` is set; returns
    the results dict (the JSON's content).

    Example::

        res = run(BenchConfig.quick(out="/tmp/bench"))
        res["variants"]["peftc p=0.0"]["median_ms"], res["step0_loss"]["peft p=0.0"]
    """
    torch.manual_seed(config.seed)
    g = torch.Generator().manual_seed(config.seed + 2)
    ids = torch.randint(0, config.vocab, (config.batch, config.seq), generator=g)
    inputs = {"input_ids": ids, "labels": ids.clone()}
    variants = _variants(config, inputs)
    inputs = {k: v.to(config.device) for k, v in inputs.items()}
    names = list(variants)
    step0, times = {}, {n: [] for n in names}
    for n in names:  # step 0: same seed for each, so losses (dropout masks too) are comparable
        torch.manual_seed(config.seed + 3)
        step0[n] = _step(*variants[n], inputs)
    for _ in _rounds(max(0, config.warmup - 1), "warm-up", config.progress):
        for n in names:
            _step(*variants[n], inputs)
    for rep in _rounds(config.reps, "timing", config.progress):
        shift = rep % len(names)
        gc.collect()
        gc.disable()  # as timeit does: a collection inside one variant's step is noise
        try:
            for n in names[shift:] + names[:shift]:
                _sync(config.device)
                t = time.perf_counter()
                _step(*variants[n], inputs)
                _sync(config.device)
                times[n].append((time.perf_counter() - t) * 1e3)
        finally:
            gc.enable()
    stats = {n: _spread(times[n]) for n in names}
    floor, base = stats["frozen base"], times["frozen base"]
    for n, s in stats.items():  # paired: each round's ratio, robust to load that drifts between rounds
        s["overhead_pct"] = 100.0 * (s["median_ms"] / floor["median_ms"] - 1.0)
        s["overhead_paired_pct"] = 100.0 * (statistics.median(t / b for t, b in zip(times[n], base)) - 1.0)
        s["overhead_min_pct"] = 100.0 * (s["min_ms"] / floor["min_ms"] - 1.0)
    counts = {n: m.pass_counts for n, (m, _) in variants.items() if n.startswith("peftc") and "compile" not in n}
    ops = {}
    if config.ops:  # one LoRA linear / one q,k,v sibling group at the model's shape vs the frozen base
        from peftc.benchmarks.layer import bench_lora_linear, bench_lora_siblings

        kw = dict(reps=config.reps * 2, dropouts=config.dropouts, device=config.device)
        tokens = config.batch * config.seq
        ops = {name: {str(p): rows for p, rows in fn(tokens, config.hidden, config.r, **kw).items()}
               for name, fn in (("lora_linear", bench_lora_linear), ("lora_siblings", bench_lora_siblings))}
    trainable = {n: sum(p.numel() for p in m.parameters() if p.requires_grad) for n, (m, _) in variants.items()}
    cfg = {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(config).items()}
    result = {"schema": "peftc.bench.step_time/1", "config": cfg, "environment": _environment(config.device),
              "variants": stats, "step0_loss": step0, "trainable_params": trainable,
              "peftc_pass_counts": counts, "ops": ops, "time_unix": time.time()}
    if config.out:
        write(result, config)
    return result


def _plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    names = list(result["variants"])
    v = [result["variants"][n] for n in names]
    med = [s["median_ms"] for s in v]
    err = [[m - s["min_ms"] for m, s in zip(med, v)], [s["max_ms"] - m for m, s in zip(med, v)]]
    fig, ax = plt.subplots(figsize=(max(7, 1.1 * len(names)), 4))
    colour = lambda n: "0.6" if n.startswith("frozen") else "C1" if "fused" in n else "C2" if n.startswith("peftc") else "C0"
    ax.bar(names, med, yerr=err, capsize=4, color=[colour(n) for n in names],
           hatch=["//" if "compile" in n else "" for n in names])
    ax.set_ylabel("step time, ms (median, min-max)")
    c = result["config"]
    ax.set_title(f"Llama {c['hidden']}x{c['layers']}, batch {c['batch']}x{c['seq']}, LoRA r={c['r']}")
    ax.tick_params(axis="x", labelrotation=30, labelsize=8)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=120)
    plt.close(fig)


def _markdown(result: dict, files: str) -> str:
    c, e = result["config"], result["environment"]
    gpu = c["device"].startswith("cuda")
    lines = [f"# Benchmark results: training step time{' on a GPU' if gpu else ''}", ""]
    if c["preliminary"]:
        lines += [f"> **Preliminary.** {c['preliminary']}", ""]
    lines += [
        f"Command: `{c['command']}`", "",
        f"Device: {e['device']}; {e['cpu_count']} CPUs, {e['torch_threads']} torch threads; "
        f"torch {e['torch']}, transformers {e['transformers']}, peft {e['peft']}, "
        f"Python {e['python']} on {e['platform']}.", "",
        f"Model: Llama (random init), hidden {c['hidden']}, {c['layers']} layers, intermediate "
        f"{c['intermediate']}, {c['heads']} heads, vocab {c['vocab']}, attention dropout 0. "
        f"Batch {c['batch']} x {c['seq']} tokens. LoRA r={c['r']}, alpha={c['alpha']} on all 7 "
        f"linears of every layer. {c['reps']} timed reps per "
        f"variant after {c['warmup']} warm-up step(s), interleaved round-robin.", "",
        "A step is forward with labels + `loss.backward()` + `AdamW.step()` on the trainable "
        "parameters. **Frozen base** (the floor): every parameter frozen, no optimizer; the "
        "backward runs from the loss through all activations to the input embeddings' output "
        "(transformers' `enable_input_require_grads`), i.e. the activation gradients an adapter "
        "step needs anyway, without weight gradients. It does slightly more than LoRA strictly "
        "needs (the input gradient of layer 0), so overheads are, if anything, understated.", "",
        "Overhead over the frozen base: of the medians (the headline); paired (median over rounds "
        "of the step's time / the frozen base's in the same round); of the minima. On a busy "
        "machine the last two are the more robust.", "",
        "| variant | median ms | min ms | max ms | IQR ms | overhead | paired | of minima "
        "| trainable params | step-0 loss |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for n, s in result["variants"].items():
        lines.append(f"| {n} | {s['median_ms']:.1f} | {s['min_ms']:.1f} | {s['max_ms']:.1f} | "
                     f"{s['q1_ms']:.1f}-{s['q3_ms']:.1f} | {s['overhead_pct']:+.1f}% | "
                     f"{s['overhead_paired_pct']:+.1f}% | {s['overhead_min_pct']:+.1f}% | "
                     f"{result['trainable_params'][n]:,} | {result['step0_loss'][n]:.6f} |")
    lines += ["", "`p` is the LoRA dropout; `peftc` is the unfused graph (`optimize=None`), `peftc fused` "
              "uses `optimize=[\"fuse\"]` (peftc::lora_linear, and peftc::lora_siblings for q/k/v and gate/up "
              "when dropout is off), `peftc fused+shared` also groups siblings under dropout with one mask "
              "shared by the group (`{fuse: {shared_dropout: true}}`, a deviation from PEFT's per-module masks); `+compile` runs `torch.compile` (inductor) on "
              "it, to be compared with the compiled frozen base. "
              f"Raw samples and plot: {files}.", ""]
    for op, runs in result.get("ops", {}).items():
        what = "one LoRA linear" if op == "lora_linear" else "three q/k/v-like sibling LoRA linears on one x"
        lines += [f"## Per op: {op} ({what}; forward + backward, frozen W)", "",
                  f"T = batch x seq = {c['batch'] * c['seq']} tokens, d = {c['hidden']}, r = {c['r']}; "
                  f"`benchmarks/layer.py:bench_{op}`, interleaved.", "",
                  "| p | variant | median ms | p10-p90 ms | over the frozen base |", "|---|---|---:|---:|---:|"]
        for p, rows in runs.items():
            for n, s in rows.items():
                lines.append(f"| {p} | {n} | {s['median_ms']:.2f} | {s['p10_ms']:.2f}-{s['p90_ms']:.2f} | "
                             f"{s['overhead_pct']:+.1f}% |")
        lines.append("")
    lines += _targets(result)
    return "\n".join(lines)


TARGETS = {"no dropout": 10.0, "dropout": 15.0, "compiled": 5.0}  # issue 12's CPU targets, % over the floor
GPU_TARGETS = {"eager": 1.3, "compiled": 1.1}  # issue 12: fused step speed-up over PEFT eager / PEFT + compile


def _targets(result: dict) -> list[str]:
    """Issue 12's targets (CPU or GPU) against this run's medians, and what bounds them."""
    v, c = result["variants"], result["config"]
    over = lambda a, b: 100.0 * (v[a]["median_ms"] / v[b]["median_ms"] - 1.0)
    speedup = lambda a, b: v[b]["median_ms"] / v[a]["median_ms"]
    rows, gpu = [], c["device"].startswith("cuda")
    for p in c["dropouts"]:
        fused, peft = f"peftc fused p={p}", f"peft p={p}"
        if gpu and fused in v:
            for ref, goal in ((peft, GPU_TARGETS["eager"]), (f"{peft} +compile", GPU_TARGETS["compiled"])):
                if ref in v:
                    got = speedup(fused, ref)
                    rows.append((f"{fused} tokens/s over {ref}", f">= {goal}x", f"{got:.2f}x", got >= goal))
            continue
        for name in (fused, f"peftc fused+shared p={p}"):
            if name in v:
                goal = TARGETS["dropout" if p else "no dropout"]
                got = over(name, "frozen base")
                rows.append((f"{name} vs frozen base", f"<= +{goal:.0f}%", f"{got:+.1f}%", got <= goal))
                got = over(name, peft)
                rows.append((f"{name} vs {peft}", "not slower", f"{got:+.1f}%", got <= 0))
        comp = f"peftc fused p={p} +compile"
        if comp in v and "frozen base +compile" in v:
            got = over(comp, "frozen base +compile")
            rows.append((f"{comp} vs frozen base +compile", f"<= +{TARGETS['compiled']:.0f}%", f"{got:+.1f}%",
                         got <= TARGETS["compiled"]))
            if f"{peft} +compile" in v:
                got = over(comp, f"{peft} +compile")
                rows.append((f"{comp} vs {peft} +compile", "faster", f"{got:+.1f}%", got < 0))
    if not rows:
        return []
    lines = [f"## Issue 12's {'GPU' if gpu else 'CPU'} targets", "",
             "| comparison | target | measured (medians) | met |", "|---|---|---:|---|"]
    lines += [f"| {a} | {b} | {m} | {'yes' if ok else '**no**'} |" for a, b, m, ok in rows]
    if gpu:
        return lines + [""]
    flop = 100.0 * 1.5 * c["r"] * 2 / c["hidden"]
    ops = result.get("ops", {}).get("lora_linear", {}).get("0.0", {}).get("fused op")
    lines += ["", f"What bounds them here: LoRA adds 3r(in + out) / (2 in out) = {flop:.1f}% to the FLOPs of a "
              f"square {c['hidden']}-wide frozen linear (forward + input gradient), but its six r-wide GEMMs run "
              "at a lower FLOP rate than the square ones on this CPU"
              + (f": one fused LoRA linear costs {ops['overhead_pct']:+.1f}% over its frozen linear (table above)"
                 if ops else "") + ". With dropout, the mask is drawn once in forward (four 16-bit lanes per 64-bit "
              "draw) and kept as bits for backward; `shared_dropout` draws one per sibling group. Per-op "
              "breakdown: section `layer_cpu` (`python -m benchmarks.layer`). GPU figures: section "
              "`step_time_gpu` (not yet measured on a GPU until `scripts/gpu_check.sh` runs).", ""]
    return lines


def write(result: dict, config: BenchConfig) -> dict[str, Path]:
    """Writes step_time.json and step_time.png into ``config.out`` and the Markdown report."""
    out, tag = Path(config.out), "step_time" if config.device == "cpu" else "step_time_gpu"
    paths = {"json": out / f"{tag}.json", "png": out / f"{tag}.png",
             "md": Path(config.report) if config.report else out / "RESULTS.md"}
    atomic_write(paths["json"], json.dumps(result, indent=2) + "\n")
    atomic_write(paths["png"], lambda p: _plot(result, p))
    files = ", ".join(f"`{os.path.relpath(paths[k], paths['md'].parent)}`" for k in ("json", "png"))
    write_section(paths["md"], tag, _markdown(result, files))
    return paths


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny shapes and 2 reps (for tests)")
    ap.add_argument("--reps", type=int, help="timed steps per variant")
    ap.add_argument("--warmup", type=int, help="untimed steps per variant first")
    ap.add_argument("--out", default="benchmarks/results", help="directory for JSON and PNG")
    ap.add_argument("--report", help="RESULTS.md path (default: benchmarks/RESULTS.md for the default "
                    "--out, else <out>/RESULTS.md)")
    ap.add_argument("--dropout", type=float, nargs="+", help="LoRA dropout values (default 0.0 0.05)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    ap.add_argument("--note", default="", help="a 'preliminary' note for RESULTS.md")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--no-fused", action="store_true", help="skip the fused peftc variant")
    ap.add_argument("--compile", action="store_true", help="add torch.compile'd variants (slow to warm up)")
    ap.add_argument("--no-ops", action="store_true", help="skip the per-op micro-benchmark")
    ap.add_argument("--gpu-shape", action="store_true", help=f"a GPU-sized model: {GPU_SHAPE}")
    args = ap.parse_args(argv)
    argv = sys.argv[1:] if argv is None else argv
    report = args.report or ("benchmarks/RESULTS.md" if args.out == "benchmarks/results" else None)
    kw = {k: v for k, v in dict(reps=args.reps, warmup=args.warmup).items() if v is not None}
    if args.dropout:
        kw["dropouts"] = tuple(args.dropout)
    base = BenchConfig.quick() if args.quick else BenchConfig()
    if args.gpu_shape and not args.quick:
        base = replace(base, **GPU_SHAPE)
    config = replace(base, out=args.out, device=args.device, report=report, preliminary=args.note,
                     progress=not args.no_progress, fused=not args.no_fused, compile=args.compile,
                     ops=not args.no_ops and not args.quick, **kw,
                     command=shlex.join(["python", "-m", "benchmarks.step_time", *argv]))
    result = run(config)
    for n, s in result["variants"].items():
        print(f"{n:>28}: {s['median_ms']:8.1f} ms  (min {s['min_ms']:.1f}, max {s['max_ms']:.1f})  "
              f"{s['overhead_pct']:+6.1f}% (paired {s['overhead_paired_pct']:+.1f}%)  loss0 {result['step0_loss'][n]:.6f}")
    return result


if __name__ == "__main__":
    main()
