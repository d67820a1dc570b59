"""Code generation (``optimize: [compile]``): peftc interpreted / compiled vs HF PEFT eager / + torch.compile.

    python -m benchmarks.codegen                          # SmolLM2-135M (if installed) + 512-wide 4-layer Llama
    python -m benchmarks.codegen --only decode,train      # a subset of rows
    python -m benchmarks.codegen --quick --out /tmp/cg    # tiny Llama, 2 reps: the harness, not a measurement

Rows (``--only``; what each measures: benchmarks/README.md): decode, decode4 (4-bit base: int4 and NF4), decode8,
prefill, train, warm. Variants run interleaved (``codegen_rows.interleaved``); each row starts from
``torch._dynamo.reset()`` and an empty ``TORCHINDUCTOR_CACHE_DIR``, so first calls compile cold. peftc's
greedy tokens are checked against PEFT's (``token_equality`` in the JSON); times are never asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from peftc.benchmarks import codegen_rows as rows
from peftc.benchmarks import step_time
from peftc.benchmarks.report import atomic_write, write_section

__all__ = ["CodegenConfig", "run", "write", "main", "ROWS", "TARGETS"]

ROWS = ("decode", "decode4", "decode8", "prefill", "train", "warm")
# The compile issue's targets (one place to change them).
TARGETS = {
    "decode_floor": 1.25,  # peftc compiled ms/token <= 1.25x the weight-streaming floor
    "decode_vs_eager": 1.8,  # ... i.e. tokens/s >= 1.8x PEFT eager on this CPU
    "decode4_vs_eager_fp32": 3.0,  # 4-bit base: peftc compiled tokens/s >= 3x PEFT eager on the fp32 base
    "decode8_vs_eager": 1.3,  # batch 8: peftc compiled tokens/s >= 1.3x PEFT eager
    "prefill_vs_eager": 1.0,  # prefill: peftc compiled no slower than PEFT eager
    "decode_compile_s": 30.0,  # first compile of the decode graphs <= 30 s (PEFT + torch.compile: 89 s)
    "train_vs_frozen_compiled_pct": {0.0: 10.0, 0.05: 15.0},  # step <= frozen base compiled +10% / +15%
    "train_compile_s": 60.0,  # first compile of the training graph (SmolLM2, 30 layers) <= 60 s
    "train_compile_depth": 1.5,  # ... and <= 1.5x the 4-layer model's (regional)
    "warm_s": 10.0,  # warm start from the on-disk cache: first output <= 10 s
}


@dataclass(frozen=True)
class CodegenConfig:
    models: tuple[str, ...] = ("smollm2", "llama512")  # "tiny" = step_time's quick shapes
    rows: tuple[str, ...] = ROWS
    r: int = 16
    alpha: float = 32.0
    dropouts: tuple[float, ...] = (0.0, 0.05)
    prompt: int = 32  # decode prompt length
    new_tokens: int = 64
    batch: int = 8  # the decode8 row's batch
    prefill: int = 512
    reps: int = 10
    warmup: int = 2
    train_reps: int = 10
    smollm2_train: tuple[int, int] = (1, 256)  # batch x seq of SmolLM2's training step
    profile: bool = True
    lr: float = 1e-4
    seed: int = 0
    timeout: int = 1800  # per warm-start child process, s
    out: str = "benchmarks/results"
    report: str | None = None
    command: str = "run(CodegenConfig())"
    progress: bool = True
    preliminary: str = ""

    @classmethod
    def quick(cls, **kw) -> CodegenConfig:
        small = dict(models=("tiny",), prompt=8, new_tokens=5, batch=3, prefill=24, reps=2, warmup=1,
                     train_reps=2, r=4, alpha=8.0, dropouts=(0.05,), timeout=600)
        return cls(**{**small, **kw})


def _sources(cfg: CodegenConfig, skipped: dict):
    """(key, Source) per model; SmolLM2 missing: a skip line and the install command."""
    positions = max(cfg.prefill, cfg.prompt) + cfg.new_tokens + 8
    for key in cfg.models:
        if key not in ("smollm2", "llama512", "tiny"):
            raise ValueError(f"unknown model {key!r}: smollm2, llama512 or tiny")
        src = rows.smollm2(*cfg.smollm2_train) if key == "smollm2" else rows.llama512(
            step_time.BenchConfig.quick() if key == "tiny" else step_time.BenchConfig(), positions)
        if src is None:
            skipped["SmolLM2-135M"] = f"not installed: {rows.INSTALL}"
            print(f"[codegen] SmolLM2-135M-Instruct is not installed ({rows.INSTALL}): the 512-wide Llama only",
                  flush=True)
            continue
        yield key, src


def _decode_row(src, pm, cfg, row: str, pad: int) -> dict:
    """decode / decode4 / decode8, and prefill (a long prompt, one new token)."""
    batch, prompt, new = (cfg.batch if row == "decode8" else 1), cfg.prompt, cfg.new_tokens
    if row == "prefill":
        prompt, new = cfg.prefill, 1
    calls, short, cms = rows.decode_variants(src, pm, batch=batch, prompt=prompt, new_tokens=new,
                                             which="4bit" if row == "decode4" else "fp32", pad=pad)
    if row == "prefill":
        del calls[rows.FLOOR]
    records, first = rows.interleaved(calls, cfg.reps, cfg.warmup, cfg.progress, f"{src.name} {row}")
    variants = {}
    for n, recs in records.items():
        s = step_time._spread([r["prefill_ms" if row == "prefill" else "decode_ms"] for r in recs])
        if n != rows.FLOOR:
            warm = statistics.median(r["total_s"] for r in recs)
            s.update(prefill_ms=statistics.median(r["prefill_ms"] for r in recs), warm_call_s=warm,
                     first_call_s=first[n]["seconds"], compile_s=first[n]["seconds"] - warm)
        variants[n] = {**s, "tokens_per_s": batch * 1e3 / s["median_ms"]} if row != "prefill" else s
    tokens = {n: first[n]["tokens"] for n in calls if n != rows.FLOOR}
    from peftc.generation import generator

    out = {"batch": batch, "prompt": prompt, "new_tokens": new, "variants": variants, "tokens": tokens,
           "compile_lines": {n: [x for x in cm.graph_summary().splitlines() if x.startswith("compile:")]
                             for n, cm in cms.items()},
           "capture_s": {n: generator(cm).stats["capture_seconds"] for n, cm in cms.items()}}
    if row != "decode4":
        out["token_equality"] = {n: tokens[n] == tokens["PEFT eager"] for n in tokens if n != "PEFT eager"}
    else:  # a 4-bit base is not the fp32 model: agreement, for information
        ref = torch.tensor(tokens["PEFT eager"])
        out["token_agreement_vs_fp32"] = {n: (torch.tensor(t) == ref).float().mean().item()
                                          for n, t in tokens.items() if n != "PEFT eager"}
        out["quantize"] = {"int4": rows.INT4, "nf4": rows.nf4_settings(src.model)}
    if row == "decode":
        out["floor"] = {"linears": calls[rows.FLOOR].weights, "bytes": calls[rows.FLOOR].bytes}
        if cfg.profile:
            out["profile"] = {n: rows.top_ops(calls[n], short[n]) for n in short}
    return out


def _train_row(src, cfg) -> dict:
    g = torch.Generator().manual_seed(cfg.seed + 2)
    ids = torch.randint(0, src.vocab, (src.train_batch, src.train_seq), generator=g)
    inputs = {"input_ids": ids, "labels": ids.clone()}
    calls, models = rows.train_variants(src, cfg.dropouts, cfg.r, cfg.alpha, cfg.lr, inputs)
    losses = rows.step0_losses(models, inputs, cfg.seed + 3)
    records, first = rows.interleaved(calls, cfg.train_reps, cfg.warmup, cfg.progress, f"{src.name} train")
    variants = {}
    for n, recs in records.items():
        s = step_time._spread([r["step_ms"] for r in recs])
        variants[n] = {**s, "first_step_s": first[n]["seconds"], "compile_s": first[n]["seconds"] - s["median_ms"] / 1e3}
    lines = {n: [x for x in m.graph_summary().splitlines() if x.startswith("compile:")]
             for n, (m, _) in models.items() if n.startswith("peftc") and "compile" in n}
    return {"batch": src.train_batch, "seq": src.train_seq, "layers": src.layers, "dropouts": list(cfg.dropouts),
            "variants": variants, "step0_loss": losses, "compile_lines": lines}


def _warm_row(key, src, cfg, pm, workdir: Path, pad: int) -> dict:
    bench = step_time.BenchConfig.quick() if key == "tiny" else step_time.BenchConfig()
    return rows.warm_start(pm, workdir, {"model": key, "bench": asdict(bench), "new_tokens": cfg.new_tokens,
                                         "positions": max(cfg.prefill, cfg.prompt) + cfg.new_tokens + 8,
                                         "ids": src.ids(1, cfg.prompt, seed=1).tolist(), "pad": pad}, cfg.timeout)


def run(config: CodegenConfig) -> dict:
    """Runs the rows on each model; writes JSON, PNG and the RESULTS.md section when ``config.out``
    is set; returns the results dict.

    Example::

        res = run(CodegenConfig.quick(out="/tmp/cg", rows=("decode",)))
        res["models"]["tiny"]["decode"]["token_equality"]["peftc compiled"]   # True
    """
    torch.manual_seed(config.seed)
    skipped, result = {}, {}
    saved_cache, tmp = os.environ.get("TORCHINDUCTOR_CACHE_DIR"), tempfile.mkdtemp(prefix="peftc-codegen-")
    try:  # an empty inductor cache per row, the user's setting back afterwards
        for key, src in _sources(config, skipped):
            pad = src.tokenizer.pad_token_id if src.tokenizer is not None else 0
            res = result[key] = {"name": src.name, "layers": src.layers}
            pm = rows.lora_adapter(src, config.r, config.alpha, 0.0).eval()
            for row in [r for r in ROWS if r in config.rows]:
                torch._dynamo.reset()
                os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(Path(tmp) / f"inductor-{key}-{row}")
                if config.progress:
                    print(f"[codegen] {src.name}: {row}", flush=True)
                start = time.perf_counter()
                if row in ("decode", "decode4", "decode8", "prefill"):
                    res[row] = _decode_row(src, pm, config, row, pad)
                elif row == "train":
                    res[row] = _train_row(src, config)
                else:
                    res[row] = _warm_row(key, src, config, pm, Path(tmp) / f"warm-{key}", pad)
                res[row]["row_s"] = time.perf_counter() - start
                if config.progress:
                    print(f"[codegen] {src.name}: {row} done in {res[row]['row_s']:.0f} s", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
        if saved_cache is not None:
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = saved_cache
    cfg = {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(config).items()}
    out = {"schema": "peftc.bench.codegen/1", "config": cfg, "environment": step_time._environment("cpu"),
           "peft_compile_recipe": rows.PEFT_COMPILE, "targets": TARGETS, "skipped": skipped,
           "models": result, "time_unix": time.time(),
           "token_equality": {k: {row: r["token_equality"] for row, r in m.items() if isinstance(r, dict)
                                  and "token_equality" in r} for k, m in result.items()}}
    if config.out:
        write(out, config)
    return out


def write(result: dict, config: CodegenConfig) -> dict[str, Path]:
    """codegen.json + codegen.png into ``config.out``; the ``codegen`` section of the report."""
    out = Path(config.out)
    paths = {"json": out / "codegen.json", "png": out / "codegen.png",
             "md": Path(config.report) if config.report else out / "RESULTS.md"}
    atomic_write(paths["json"], json.dumps(result, indent=2) + "\n")
    atomic_write(paths["png"], lambda p: _plot(result, p))
    files = ", ".join(f"`{os.path.relpath(paths[k], paths['md'].parent)}`" for k in ("json", "png"))
    write_section(paths["md"], "codegen", _markdown(result, files))
    return paths


# ---- report ----------------------------------------------------------------------------------
COLUMNS = ("peftc interpreted", "peftc compiled", "PEFT eager", "PEFT + torch.compile")
PENDING = "not yet measured"
T = TARGETS
GOALS = {  # table row -> (label, target as text)
    "decode": ("decode fp32, batch 1: ms/token (tok/s)", f"<= {T['decode_floor']}x floor; >= {T['decode_vs_eager']}x "
               "PEFT eager tok/s"),
    "decode4": ("decode 4-bit base, batch 1 (int4 = GGUF Q4_1, head included; NF4, head fp32; PEFT: fp32)",
                f">= {T['decode4_vs_eager_fp32']}x PEFT eager fp32 tok/s"),
    "decode8": ("decode fp32, batch 8: tok/s", f">= {T['decode8_vs_eager']}x PEFT eager"),
    "prefill": ("prefill 512 tokens: ms", f"<= {T['prefill_vs_eager']}x PEFT eager"),
    "decode_compile": ("first compile of the decode graphs: s", f"<= {T['decode_compile_s']:.0f} s"),
    "train": ("train step (dropout p): ms", "fuse+compile <= +10% (p=0) / +15% (p=0.05) over the compiled "
              "frozen base; <= PEFT + compile"),
    "train_compile": ("first compile of the training graph: s",
                      f"30 layers <= {T['train_compile_s']:.0f} s and <= {T['train_compile_depth']}x 4 layers"),
    "warm": ("warm start, new process to first token: s", f"<= {T['warm_s']:.0f} s"),
}


def _cells(m: dict, row: str, p: str = "") -> tuple[str, list[str], list[tuple[str, float, float, bool]]]:
    """(row label, the four cells, [(what, measured, goal, higher is better)]) of one table row."""
    get = lambda r, n: m[r]["variants"].get(n, {})
    dec = lambda v: f"{v['median_ms']:.1f} ({v['tokens_per_s']:.1f})" if v else "-"
    f1 = lambda v, k="median_ms": f"{v[k]:.1f}" if v else "-"
    label = GOALS[row][0]
    if row in ("decode", "decode8", "prefill"):
        c, e, pc = (get(row, n) for n in ("peftc compiled", "PEFT eager", "PEFT + torch.compile"))
        if row == "prefill":
            return (label.replace("512", str(m[row]["prompt"]), 1) + " (PEFT + compile: eager prefill)",
                    [f1(get(row, n)) for n in COLUMNS], [("x PEFT eager", c["median_ms"] / e["median_ms"],
                                                          T["prefill_vs_eager"], False)])
        if row == "decode8":
            return (label.replace("batch 8", f"batch {m[row]['batch']}"), [f1(get(row, n), "tokens_per_s") for n in COLUMNS],
                    [("x PEFT eager", c["tokens_per_s"] / e["tokens_per_s"], T["decode8_vs_eager"], True)])
        f = get(row, rows.FLOOR)
        return (f"{label}; floor {f['median_ms']:.1f} ms", [dec(get(row, n)) for n in COLUMNS],
                [("x floor", c["median_ms"] / f["median_ms"], T["decode_floor"], False),
                 ("x PEFT eager", c["tokens_per_s"] / e["tokens_per_s"], T["decode_vs_eager"], True)])
    if row == "decode4":
        c, n, e = get(row, "peftc int4 compiled"), get(row, "peftc nf4 compiled"), get(row, "PEFT eager")
        return (label, [f"int4 {dec(get(row, 'peftc int4 interpreted'))}", f"int4 {dec(c)}; nf4 {dec(n)}", dec(e), "-"],
                [("x PEFT eager fp32 (int4)", c["tokens_per_s"] / e["tokens_per_s"], T["decode4_vs_eager_fp32"], True),
                 ("x (nf4)", n["tokens_per_s"] / e["tokens_per_s"], None, True)])  # for information
    if row == "decode_compile":
        c, pc, d = get("decode", "peftc compiled"), get("decode", "PEFT + torch.compile"), m["decode"]
        inductor = [x.split(" in ")[-1].split(" (")[0] for x in d["compile_lines"]["peftc compiled"]]
        return (label, [f"- (capture {d['capture_s']['peftc interpreted']:.1f})",
                        f"{c['compile_s']:.1f} (inductor: {', '.join(inductor)})", "-", f"{pc['compile_s']:.1f}"],
                [("s", c["compile_s"], T["decode_compile_s"], False)])
    tr = m["train"]["variants"] if "train" in m else {}
    if row == "train":
        fc, fb, pc = tr[f"peftc fuse+compile p={p}"], tr["frozen base + torch.compile"], tr[f"PEFT + torch.compile p={p}"]
        return (label.replace("(dropout p)", f"(dropout {p})") + f"; frozen base {tr['frozen base']['median_ms']:.1f}, compiled {fb['median_ms']:.1f}",
                [f1(tr[f"peftc interpreted p={p}"]), f"fuse+compile {f1(fc)}, compile {f1(tr[f'peftc compile p={p}'])}",
                 f1(tr[f"PEFT eager p={p}"]), f1(pc)],
                [("% over compiled frozen base", 100 * (fc["median_ms"] / fb["median_ms"] - 1),
                  T["train_vs_frozen_compiled_pct"].get(float(p), 15.0), False), ("x PEFT + compile", fc["median_ms"] / pc["median_ms"], 1.0, False)])
    if row == "train_compile":
        return (f"{label} ({m['train']['layers']} layers, dropout {p})",
                ["-", f"compile {f1(tr[f'peftc compile p={p}'], 'compile_s')}, fuse+compile "
                      f"{f1(tr[f'peftc fuse+compile p={p}'], 'compile_s')}", "-",
                 f1(tr[f"PEFT + torch.compile p={p}"], "compile_s")], [])  # the depth check is under the tables
    w = m["warm"]
    return (label, ["-", f"{w['warm']['first_token_s']:.1f} (cold {w['cold']['first_token_s']:.1f})", "-", "-"],
            [("s", w["warm"]["first_token_s"], T["warm_s"], False)])


def _table(m: dict | None) -> list[str]:
    lines = [f"| row | {' | '.join(COLUMNS)} | target | measured | met |", "|---|---|---|---|---|---|---|---|"]
    if m is None:
        return lines + [f"| {label} | {PENDING} | | | | {goal} | | |" for label, goal in GOALS.values()]
    drops = [str(p) for p in m["train"]["dropouts"]] if "train" in m else []
    order = [("decode", "decode", ""), ("decode4", "decode4", ""), ("decode8", "decode8", ""), ("prefill", "prefill", ""),
             ("decode", "decode_compile", ""), *(("train", "train", p) for p in drops),
             ("train", "train_compile", drops[0] if drops else ""), ("warm", "warm", "")]
    for need, row, p in order:
        if need in m:
            label, cells, checks = _cells(m, row, p)
            ok = all((v >= g) if higher else (v <= g) for _, v, g, higher in checks if g is not None)
            got = "; ".join(f"{v:.2f} {w}" for w, v, _, _ in checks) or "-"
            lines.append(f"| {label} | {' | '.join(cells)} | {GOALS[row][1]} | {got} | "
                         f"{('yes' if ok else '**no**') if checks else '-'} |")
    return lines


def _markdown(result: dict | None, files: str) -> str:
    head = ["## Code generation: `optimize: [compile]` vs HF PEFT eager and PEFT + torch.compile", ""]
    if result is None:
        return "\n".join(head + ["Command: `python -m benchmarks.codegen` (= `peftc bench --codegen`; `--only ROWS`, "
                                 "`--models`, `--quick`)", "", f"**{PENDING}**: the command above writes the numbers "
                                 "here (run it on a quiet machine; see benchmarks/README.md for its duration).", "",
                                 *_table(None)])
    c, e = result["config"], result["environment"]
    head += [f"> **Preliminary.** {c['preliminary']}", ""] if c["preliminary"] else []
    head += [f"Command: `{c['command']}`", "",
             f"Device: {e['device']}; {e['cpu_count']} CPUs, {e['torch_threads']} torch threads; torch {e['torch']}, "
             f"transformers {e['transformers']}, peft {e['peft']}, Python {e['python']}.", "",
             f"LoRA r={c['r']}, alpha={c['alpha']} on every linear of every layer (B random, so tokens change). Decode: "
             f"{c['prompt']}-token prompt, {c['new_tokens']} greedy tokens, ms/token = (last - first token's time) / "
             f"(tokens - 1), {c['reps']} interleaved reps after {c['warmup']} warm-up call(s); floor = one GEMV per "
             "linear weight (head included), back to back. PEFT + torch.compile = " + result["peft_compile_recipe"]
             + f". Train: forward + backward + AdamW, {c['train_reps']} interleaved reps. First compile = first call "
             "- median warm call, with an empty inductor cache per row. Skipped: "
             + (", ".join(f"{k} ({v})" for k, v in result["skipped"].items()) or "nothing") + ".", ""]
    for m in result["models"].values():
        head += [f"### {m['name']} ({m['layers']} layers)", "", *_table(m), ""]
    depth = sorted((m["layers"], m["name"], m["train"]["variants"][f"peftc compile p={m['train']['dropouts'][0]}"]
                    ["compile_s"]) for m in result["models"].values() if "train" in m)
    if len(depth) == 2:
        (lb, b, sb), (la, a, sa) = depth
        ok = sa / sb <= T["train_compile_depth"]
        head += [f"Regional compile in depth: {a} ({la} layers) {sa:.1f} s vs {b} ({lb} layers) {sb:.1f} s = "
                 f"{sa / sb:.2f}x (target <= {T['train_compile_depth']}x: {'met' if ok else '**not met**'}).", ""]
    head += [f"Token equality (greedy, peftc vs PEFT eager, fp32 base): `{json.dumps(result['token_equality'])}`", ""]
    return "\n".join(head + _breakdown(result) + [f"Raw samples and plot: {files}.", ""])


def _breakdown(result: dict) -> list[str]:
    """Where the time goes: compile vs run per variant, and the top ops of one decode step."""
    out = ["### Breakdown: compile vs run, top ops of one decode step", ""]
    for m in result["models"].values():
        for row in ("decode", "decode4", "decode8"):
            for n, v in m.get(row, {}).get("variants", {}).items():
                if "first_call_s" in v:
                    out.append(f"- {m['name']} {row}, {n}: first call {v['first_call_s']:.1f} s, warm {v['warm_call_s']:.2f} s "
                               f"(compile ~{v['compile_s']:.1f} s), prefill {v['prefill_ms']:.1f} ms, "
                               f"{v['median_ms']:.2f} ms/token")
        for n, prof in m.get("decode", {}).get("profile", {}).items():
            out += ["", f"{m['name']}, {n}: self CPU time of one decode step ({prof['self_us_per_step_total'] / 1e3:.2f} "
                    f"ms in all, over {prof['steps']} steps)", "", "| op | us / step | calls / step | share |", "|---|---:|---:|---:|"]
            out += [f"| `{o['op'][:70]}` | {o['self_us_per_step']:.0f} | {o['calls_per_step']:.1f} | {100 * o['share']:.0f}% |"
                    for o in prof["ops"][:8]]
        out.append("")
    return out


def _plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    panels = [("decode", "median_ms", "decode ms/token, batch 1"), ("decode4", "median_ms", "4-bit decode ms/token"),
              ("decode8", "tokens_per_s", "batch-8 tokens/s"), ("prefill", "median_ms", "prefill ms"),
              ("train", "median_ms", "train step ms")]
    models = list(result["models"].values())
    fig, axes = plt.subplots(len(models), len(panels), figsize=(4 * len(panels), 3.6 * len(models)), squeeze=False)
    for ax_row, m in zip(axes, models):
        for ax, (row, key, title) in zip(ax_row, panels):
            v = m.get(row, {}).get("variants", {})
            names = list(v)
            ax.bar(range(len(names)), [v[n][key] for n in names],
                   color=["0.6" if "floor" in n or "frozen" in n else "C1" if "peftc" in n else "C0" for n in names],
                   hatch=["//" if "compile" in n else "" for n in names])
            ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=6)
            ax.set_title(f"{m['name']}: {title}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict | None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny Llama, 2 reps (tests; no real model)")
    ap.add_argument("--only", help=f"comma-separated rows among {','.join(ROWS)}")
    ap.add_argument("--models", help="comma-separated: smollm2, llama512 (default both), tiny")
    for flag, kind in (("reps", int), ("warmup", int), ("train-reps", int), ("new-tokens", int), ("prompt", int),
                       ("prefill", int), ("batch", int)):
        ap.add_argument(f"--{flag}", type=kind)
    ap.add_argument("--dropout", type=float, nargs="+")
    ap.add_argument("--no-profile", action="store_true")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--report", help="RESULTS.md path (default benchmarks/RESULTS.md for the default --out)")
    ap.add_argument("--note", default="", help="a 'preliminary' note on top of the section")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--placeholder", action="store_true", help="write the section with 'not yet measured' only")
    args = ap.parse_args(argv)
    argv = sys.argv[1:] if argv is None else argv
    report = args.report or ("benchmarks/RESULTS.md" if args.out == "benchmarks/results" else None)
    if args.placeholder:
        write_section(Path(report or Path(args.out) / "RESULTS.md"), "codegen", _markdown(None, ""))
        return None
    kw = {k.replace("-", "_"): v for k, v in vars(args).items()
          if k in ("reps", "warmup", "train_reps", "new_tokens", "prompt", "prefill", "batch") and v is not None}
    if args.only:
        bad = set(args.only.split(",")) - set(ROWS)
        if bad:
            ap.error(f"--only {args.only}: unknown rows {sorted(bad)}; choose from {','.join(ROWS)}")
        kw["rows"] = tuple(args.only.split(","))
    if args.models:
        kw["models"] = tuple(args.models.split(","))
    if args.dropout:
        kw["dropouts"] = tuple(args.dropout)
    base = CodegenConfig.quick() if args.quick else CodegenConfig()
    config = replace(base, out=args.out, report=report, preliminary=args.note, progress=not args.no_progress,
                     profile=not args.no_profile, command=shlex.join(["python", "-m", "benchmarks.codegen", *argv]), **kw)
    result = run(config)
    print(_markdown(result, "(files)"))
    return result


if __name__ == "__main__":
    main()
