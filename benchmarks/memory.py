"""Training memory: bytes saved for backward and weight bytes per variant; recompute policies vs
HF PEFT (with and without gradient checkpointing) and the frozen base.

    python -m benchmarks.memory                  # the issue's shapes; writes results/memory.{json,png}
    python -m benchmarks.memory --quick --out /tmp/m   # tiny shapes, seconds (tests)
    peftc bench --memory                         # the same

Two shapes (Llama, random init, batch x seq tokens, LoRA on all 7 linears):

- ``saved``: 512-wide, 4 layers, r=16, LoRA dropout 0.05: saved-for-backward bytes of one training
  forward over the frozen base's (target for ``recompute: adapters``: <= +10%), and the step time
  of ``adapters`` vs HF PEFT (interleaved reps, medians).
- ``gc``: 256-wide, 4 layers, LoRA dropout 0: activations a training forward keeps alive,
  ``recompute: blocks`` vs HF PEFT with gradient checkpointing (target: within 1.3x), both as
  saved-for-backward bytes and as process RSS in a child (``peftc.memory.activation_rss``).

Every peftc variant is compared with its counterpart without recompute (same seed): loss and
gradients must agree (recompute is exact). Variants are one table, ``VARIANTS``: a new
optimization (``quantize``) is one more line.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from peftc.benchmarks.report import atomic_write, write_section

__all__ = ["MemConfig", "VARIANTS", "run", "main", "build"]

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTERS = {"recompute": {"policy": "adapters"}}
NF4 = {"quantize": {"format": "nf4", "release_base": True}}  # weights: what the model still holds
# name -> optimize settings ("frozen base" and "peft..." are eager models); budget_mb filled in
# at run time as a fraction of the frozen base's saved bytes (``MemConfig.budget_fraction``)
VARIANTS: tuple[tuple[str, object], ...] = (
    ("frozen base", "frozen"),
    ("peft", "peft"),
    ("peft + gradient checkpointing", "peft_gc"),
    ("peftc unfused", {}),
    ("peftc fused", {"fuse": {}}),
    ("peftc recompute adapters", ADAPTERS),
    ("peftc fused + recompute adapters", {"fuse": {}, **ADAPTERS}),
    ("peftc recompute blocks", {"recompute": {"policy": "blocks"}}),
    ("peftc fused + recompute blocks", {"fuse": {}, "recompute": {"policy": "blocks"}}),
    ("peftc recompute budget", {"recompute": {"policy": "budget", "budget_mb": None}}),
    ("peftc fused + nf4", {"fuse": {}, **NF4}),
    ("peftc fused + int8", {"fuse": {}, "quantize": {"format": "int8", "release_base": True}}),
    ("peftc fused + nf4 + recompute adapters", {"fuse": {}, **NF4, **ADAPTERS}),  # QLoRA's memory, recomputed
)
TIMED = ("frozen base", "peft", "peftc fused", "peftc recompute adapters", "peftc fused + recompute adapters")


@dataclass(frozen=True)
class MemConfig:
    hidden: int = 512
    intermediate: int = 1408  # a multiple of 64: NF4 blocks of 64 along every input width
    gc_hidden: int = 256
    gc_intermediate: int = 688
    layers: int = 4
    heads: int = 8
    vocab: int = 4096
    batch: int = 4
    seq: int = 256
    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    budget_fraction: float = 0.9
    reps: int = 7
    rss: bool = True
    seed: int = 0
    out: str = "benchmarks/results"
    report: str | None = "benchmarks/RESULTS.md"
    command: str = "python -m benchmarks.memory"

    @classmethod
    def quick(cls, **kw) -> MemConfig:
        small = dict(hidden=64, intermediate=128, gc_hidden=64, gc_intermediate=128, layers=2, heads=4, vocab=128,
                     batch=2, seq=16, r=4, alpha=8.0, dropout=0.0, reps=1, rss=False)
        return cls(**{**small, **kw})


def _llama(cfg: MemConfig, hidden: int, inter: int):
    from peftc.models import tiny_model

    return tiny_model("tiny-llama", seed=cfg.seed, hidden_size=hidden, intermediate_size=inter,
                      num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads, num_key_value_heads=cfg.heads,
                      vocab_size=cfg.vocab, max_position_embeddings=max(256, cfg.seq), attention_dropout=0.0)


def build(cfg: dict, shape: str, variant: str, budget_mb: float | None = None):
    """(model in train mode, inputs) for one variant; also the child process's factory."""
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

    import peftc

    c = MemConfig(**cfg) if isinstance(cfg, dict) else cfg
    hidden, inter = (c.hidden, c.intermediate) if shape == "saved" else (c.gc_hidden, c.gc_intermediate)
    p = c.dropout if shape == "saved" else 0.0
    ids = torch.randint(0, c.vocab, (c.batch, c.seq), generator=torch.Generator().manual_seed(c.seed + 2))
    inputs = {"input_ids": ids, "labels": ids.clone(), "use_cache": False}
    base = _llama(c, hidden, inter)
    base.requires_grad_(False)
    opt = dict(VARIANTS)[variant]
    if opt == "frozen":
        base.enable_input_require_grads()
        return base.train(), inputs
    pm = get_peft_model(copy.deepcopy(base), LoraConfig(r=c.r, lora_alpha=c.alpha, lora_dropout=p,
                                                        target_modules=list(LINEARS)))
    g = torch.Generator().manual_seed(c.seed + 1)
    with torch.no_grad():
        for name, w in pm.named_parameters():
            if "lora_B" in name:
                w.copy_(torch.randn(w.shape, generator=g) * 0.02)
    if opt in ("peft", "peft_gc"):
        if opt == "peft_gc":
            pm.base_model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return pm.train(), inputs
    opt = copy.deepcopy(opt)
    if "recompute" in opt and opt["recompute"].get("policy") == "budget":
        opt["recompute"]["budget_mb"] = budget_mb
    spec = {"methods": [{"lora": {"targets": list(LINEARS), "r": c.r, "alpha": c.alpha, "dropout": p}}]}
    cm = peftc.compile(base.train(), spec, example_inputs={"input_ids": ids, "labels": ids.clone()}, optimize=opt)
    cm.load_adapter_state_dict(get_peft_model_state_dict(pm))
    return cm, inputs


def _step(model, inputs, seed: int):
    torch.manual_seed(seed)
    loss = model(**inputs).loss
    loss.backward()
    grads = {k: p.grad for k, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


def _measure(cfg: MemConfig, shape: str, names, budget_mb=None, keep: dict | None = None) -> dict:
    """Saved and weight bytes, loss and grads per variant; models named in TIMED go to ``keep``."""
    from peftc.memory import saved_for_backward, weight_bytes

    out = {}
    for name in names:
        t0 = time.perf_counter()
        model, inputs = build(cfg, shape, name, budget_mb)
        if keep is not None and name in TIMED:
            keep[name] = (model, inputs)
        torch.manual_seed(cfg.seed)
        saved = saved_for_backward(functools.partial(model, **inputs), exclude=model)
        loss, grads = _step(model, inputs, cfg.seed)
        out[name] = {"saved_bytes": saved.total, "weight_bytes": weight_bytes(model), "loss": loss.item(),
                     "_grads": {k.split("base_model.model.")[-1].replace(".default", ""): g for k, g in grads.items()},
                     "pass_counts": getattr(model, "pass_counts", {}),
                     "notes": list(model.graph_module.meta.get("peftc_summary", [])) if hasattr(model, "graph_module")
                     else []}
        model.zero_grad(set_to_none=True)
        del model
        print(f"[memory] {shape}: {name}: {saved.total / 2**20:.2f} MB saved ({time.perf_counter() - t0:.0f} s)",
              file=sys.stderr, flush=True)
    return out


def _exactness(res: dict) -> None:
    """Each recompute variant vs its counterpart without recompute: max |loss diff|, max |grad diff|."""
    for name, r in res.items():
        if "recompute" not in name:
            continue
        r["vs"] = name.split(" + recompute")[0] if " + recompute" in name else "peftc unfused"
        ref = res[r["vs"]]
        r["loss_diff"] = abs(r["loss"] - ref["loss"])
        r["grad_diff"] = max(((g - ref["_grads"][k]).abs().max().item() for k, g in r["_grads"].items()), default=0.0)
        r["grads_compared"] = len(r["_grads"])


def _time(cfg: MemConfig, models: dict) -> dict:
    opts = {n: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4) if n != "frozen base"
            else None for n, (m, _) in models.items()}
    times = {n: [] for n in TIMED}
    for rep in range(cfg.reps + 1):
        order = list(TIMED[rep % len(TIMED):] + TIMED[:rep % len(TIMED)])
        for n in order:
            m, inputs = models[n]
            t0 = time.perf_counter()
            loss = m(**inputs).loss
            loss.backward()
            if opts[n] is not None:
                opts[n].step()
                opts[n].zero_grad(set_to_none=True)
            if rep:  # the first round warms up
                times[n].append((time.perf_counter() - t0) * 1e3)
        print(f"[memory] step time round {rep}/{cfg.reps}", file=sys.stderr, flush=True)
    return {n: {"median_ms": statistics.median(t), "min_ms": min(t), "max_ms": max(t), "samples_ms": t}
            for n, t in times.items()}


def run(cfg: MemConfig) -> dict:
    from peftc.memory import activation_rss

    torch.manual_seed(cfg.seed)
    names = [n for n, _ in VARIANTS if n != "peftc recompute budget"]
    models: dict = {}
    saved = _measure(cfg, "saved", names, keep=models)
    budget_mb = cfg.budget_fraction * saved["frozen base"]["saved_bytes"] / 2**20
    saved.update(_measure(cfg, "saved", ["peftc recompute budget"], budget_mb))
    saved = {n: saved[n] for n, _ in VARIANTS}  # the table's order
    gc_names = ["frozen base", "peft", "peft + gradient checkpointing", "peftc unfused", "peftc recompute blocks"]
    if (cfg.gc_hidden, cfg.gc_intermediate, cfg.dropout) == (cfg.hidden, cfg.intermediate, 0.0):
        gc = {n: dict(saved[n]) for n in gc_names}  # the same shape: measured already
    else:
        gc = _measure(cfg, "gc", gc_names)
    _exactness(saved)
    _exactness(gc)
    if cfg.rss:
        for name in ("peft", "peft + gradient checkpointing", "peftc unfused", "peftc recompute blocks"):
            gc[name]["rss_bytes"] = activation_rss("peftc.benchmarks.memory:build", cfg=asdict(cfg), shape="gc",
                                                   variant=name)
    for res in (saved, gc):
        for r in res.values():
            r.pop("_grads")
    base = saved["frozen base"]["saved_bytes"]
    for r in saved.values():
        r["over_frozen_pct"] = 100.0 * (r["saved_bytes"] / base - 1)
    gcref = gc["peft + gradient checkpointing"]
    for r in gc.values():
        r["vs_peft_gc"] = r["saved_bytes"] / gcref["saved_bytes"]
        if "rss_bytes" in r:
            r["rss_vs_peft_gc"] = r["rss_bytes"] / max(gcref["rss_bytes"], 1)
    import peft
    import transformers

    env = {"device": f"CPU ({platform.machine()})", "cpu_count": os.cpu_count(), "torch": torch.__version__,
           "transformers": transformers.__version__, "peft": peft.__version__, "python": platform.python_version()}
    return {"schema": "peftc.bench.memory/1", "config": asdict(cfg), "environment": env, "budget_mb": budget_mb,
            "saved": saved, "gc": gc, "step_time": _time(cfg, models)}


def _plot(res: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(14, 4.8), gridspec_kw={"width_ratios": [10, 6]})
    c = res["config"]
    for ax, key, title in ((axes[0], "saved", f"Llama {c['hidden']}x{c['layers']}, LoRA r={c['r']} p={c['dropout']}"),
                           (axes[1], "gc", f"Llama {c['gc_hidden']}x{c['layers']}, LoRA r={c['r']} p=0")):
        names = list(res[key])
        x = range(len(names))
        ax.bar([i - 0.2 for i in x], [res[key][n]["saved_bytes"] / 2**20 for n in names], 0.4,
               label="saved for backward")
        ax.bar([i + 0.2 for i in x], [res[key][n]["weight_bytes"] / 2**20 for n in names], 0.4, label="weights")
        ax.set_xticks(list(x), names, rotation=35, ha="right", fontsize=7)
        ax.set_ylabel("MB")
        ax.set_title(f"{title}, batch {c['batch']}x{c['seq']}", fontsize=9)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=110)
    plt.close(fig)




def _markdown(res: dict) -> str:
    c, s, g, t = res["config"], res["saved"], res["gc"], res["step_time"]
    mb = lambda b: f"{b / 2**20:.2f}"
    ok = lambda good: "meets" if good else "misses"
    adapt = s["peftc recompute adapters"]["over_frozen_pct"]
    fadapt = s["peftc fused + recompute adapters"]["over_frozen_pct"]
    blocks = g["peftc recompute blocks"]
    lines = ["## Memory: bytes saved for backward (recompute)", "",
             f"Command: `{c['command']}`. {res['environment']['device']}, {res['environment']['cpu_count']} CPUs, "
             f"torch {res['environment']['torch']}, peft {res['environment']['peft']}. Saved-for-backward = bytes "
             "autograd keeps after one training forward (saved-tensor hooks, each storage once, parameters "
             "excluded; `peftc.memory`); weights = parameters and buffers of the model.", "",
             f"### {c['hidden']}-wide {c['layers']}-layer Llama, batch {c['batch']}x{c['seq']}, LoRA r={c['r']} "
             f"on all 7 linears, dropout {c['dropout']}", "",
             "| variant | saved for backward MB | over frozen base | weights MB | loss / grad diff vs no recompute |",
             "|---|---:|---:|---:|---|"]
    for n, r in s.items():
        diff = f"{r['loss_diff']:.1e} / {r['grad_diff']:.1e} (vs {r['vs']})" if "vs" in r else ""
        if "nf4" in n or "int8" in n:
            diff = diff or "quantized base (tests check it against the dequantized weights)"
        lines.append(f"| {n} | {mb(r['saved_bytes'])} | {r['over_frozen_pct']:+.1f}% | {mb(r['weight_bytes'])} | {diff} |")
    lines += ["", f"Target `recompute: adapters` <= +10% over the frozen base at dropout {c['dropout']}: "
              f"unfused {adapt:+.1f}%, fused {fadapt:+.1f}% ({ok(max(adapt, fadapt) <= 10)}; HF PEFT "
              f"{s['peft']['over_frozen_pct']:+.1f}%). `budget` ran with budget_mb = {res['budget_mb']:.2f} "
              f"({c['budget_fraction']} x the frozen base's saved bytes) and measured "
              f"{mb(s['peftc recompute budget']['saved_bytes'])} MB "
              f"({ok(s['peftc recompute budget']['saved_bytes'] <= res['budget_mb'] * 2**20)} the budget; the min-cut "
              "sizes tensors from a table of what each aten op saves, so ops it does not know are not counted). "
              "The pass's own account: " + " ".join(s["peftc recompute budget"]["notes"]), "",
              f"### Activations kept vs HF PEFT + gradient checkpointing ({c['gc_hidden']}-wide {c['layers']}-layer "
              f"Llama, batch {c['batch']}x{c['seq']}, LoRA r={c['r']}, dropout 0)", "",
              "| variant | saved for backward MB | x PEFT+GC | RSS after forward MB | x PEFT+GC (RSS) | loss / grad diff |",
              "|---|---:|---:|---:|---:|---|"]
    for n, r in g.items():
        rss = (f"{mb(r['rss_bytes'])} | {r['rss_vs_peft_gc']:.2f}x") if "rss_bytes" in r else "- | -"
        diff = f"{r['loss_diff']:.1e} / {r['grad_diff']:.1e}" if "vs" in r else ""
        lines.append(f"| {n} | {mb(r['saved_bytes'])} | {r['vs_peft_gc']:.2f}x | {rss} | {diff} |")
    lines += ["", f"Target `recompute: blocks` within 1.3x of PEFT + gradient checkpointing with loss and grads "
              f"<= 1e-5 of no recompute: {blocks['vs_peft_gc']:.2f}x saved-for-backward"
              + (f", {blocks['rss_vs_peft_gc']:.2f}x RSS" if "rss_vs_peft_gc" in blocks else "")
              + f", diffs {blocks['loss_diff']:.1e} / {blocks['grad_diff']:.1e} "
              f"({ok(blocks['vs_peft_gc'] <= 1.3 and max(blocks['loss_diff'], blocks['grad_diff']) <= 1e-5)}).", "",
              f"### Step time, {c['hidden']}-wide shape, dropout {c['dropout']} ({c['reps']} interleaved reps, medians)",
              "", "Times are noisy when other processes share the CPU (compare the frozen base here with an "
              "idle run of `benchmarks/step_time.py`); medians and minima of interleaved runs.", "", "| variant | median ms | min-max ms |", "|---|---:|---:|"]
    for n, r in t.items():
        lines.append(f"| {n} | {r['median_ms']:.1f} | {r['min_ms']:.1f}-{r['max_ms']:.1f} |")
    rs = {k: [t[n][f"{k}_ms"] / t["peft"][f"{k}_ms"] for n in ("peftc recompute adapters",
          "peftc fused + recompute adapters")] for k in ("median", "min")}
    lines += ["", f"Target: step with `adapters` no slower than HF PEFT: unfused {rs['median'][0]:.2f}x, fused "
              f"{rs['median'][1]:.2f}x PEFT's median; of the minima (more robust when other processes load the "
              f"CPU) {rs['min'][0]:.2f}x and {rs['min'][1]:.2f}x (by medians: unfused "
              f"{ok(rs['median'][0] <= 1.0)}, fused {ok(rs['median'][1] <= 1.0)}). "
              "GPU: not yet measured on a GPU.", "",
              "Raw numbers: `results/memory.json`; plot: `results/memory.png`."]
    return "\n".join(lines) + "\n"


def write(res: dict, cfg: MemConfig) -> None:
    out = Path(cfg.out)
    atomic_write(out / "memory.json", json.dumps(res, indent=1, default=float))
    atomic_write(out / "memory.png", lambda tmp: _plot(res, tmp))
    if cfg.report:
        write_section(Path(cfg.report), "memory", _markdown(res))


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="peftc bench --memory", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny shapes (seconds)")
    ap.add_argument("--out", help="directory for memory.json / memory.png (default benchmarks/results)")
    ap.add_argument("--report", help="markdown file to write the section into (default benchmarks/RESULTS.md, "
                    "or <out>/RESULTS.md with --out)")
    ap.add_argument("--reps", type=int)
    ap.add_argument("--no-rss", action="store_true", help="skip the child-process RSS measurement")
    args = ap.parse_args(argv)
    cfg = MemConfig.quick() if args.quick else MemConfig()
    changes = {"command": "python -m benchmarks.memory " + " ".join(argv if argv is not None else sys.argv[1:])}
    if args.out:
        changes.update(out=args.out, report=str(Path(args.out) / "RESULTS.md"))
    if args.report:
        changes["report"] = args.report
    if args.reps:
        changes["reps"] = args.reps
    if args.no_rss:
        changes["rss"] = False
    cfg = replace(cfg, **changes)
    res = run(cfg)
    write(res, cfg)
    return res


if __name__ == "__main__":
    main()
