"""Per-layer benchmark: one LoRA linear, forward + backward (dx, dA, dB; frozen W, b).

    python -m benchmarks.layer                      # CPU: T=1024, d=512, r=16, fp32
    python -m benchmarks.layer --device cuda        # GPU: T=8192, d=4096, r=16, bf16 base, fp32 adapters
    python -m benchmarks.layer --dry-run --out /tmp/l   # tiny shapes, 2 reps: checks the script end to end

Variants, timed interleaved (round-robin) after warm-up, medians with p10-p90:
**frozen linear** (``F.linear`` with x requiring grad: the floor), **PEFT unfused** (HF PEFT's own
``peft.tuners.lora.Linear`` around an ``nn.Linear``, adapters in ``--adapter-dtype``, PEFT's
default fp32 on a bf16 base) and **peftc fused** (``peftc::lora_linear`` on the same weights; its
output is checked against PEFT's before timing). A per-op breakdown (base GEMMs, the six r-wide
GEMMs, mask draw / pack / unpack, custom-op dispatch on tiny inputs) says where the overhead over
the frozen linear goes. Results: ``<out>/layer_<device>.json`` and RESULTS.md section
``layer_<device>``. ``bench_lora_linear`` / ``bench_lora_siblings`` are the per-op tables of
``benchmarks.step_time`` (fused op vs unfused torch vs the frozen base).
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

from peftc.benchmarks.report import atomic_write, write_section

__all__ = ["time_backward", "time_one", "print_bench", "bench_lora_linear", "bench_lora_siblings", "layer_bench",
           "breakdown", "main"]

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
GPU_TARGETS = {"fused / frozen": 1.05, "PEFT / fused": 1.4}  # issue 12, on an H100/H200


def _sync(device):
    return torch.cuda.synchronize if str(device).startswith("cuda") else (lambda: None)


def time_backward(runs: dict, grad_outputs, dropouts, reps: int, device, base: str, warmup: int = 3) -> dict:
    """Interleaved forward + backward timings of ``runs`` (name -> (fn(p), inputs)) after ``warmup``
    rounds: ``{p: {name: {"median_ms", "p10_ms", "p90_ms", "overhead_pct" over base}}}``."""
    sync = _sync(device)
    out = {}
    for p in dropouts:
        times = {k: [] for k in runs}
        for _ in range(reps + warmup):
            for name, (fn, inputs) in runs.items():
                sync()
                t0 = time.perf_counter()
                torch.autograd.grad(fn(p), inputs, grad_outputs)
                sync()
                times[name].append((time.perf_counter() - t0) * 1e3)
        floor = statistics.median(times[base][warmup:])
        out[p] = {}
        for name, ts in times.items():
            ts = ts[warmup:]
            q = statistics.quantiles(ts, n=10) if len(ts) > 1 else [ts[0]] * 9
            med = statistics.median(ts)
            out[p][name] = {"median_ms": med, "p10_ms": q[0], "p90_ms": q[-1], "overhead_pct": 100 * (med / floor - 1)}
    return out


def time_one(fn, reps: int, device, warmup: int = 2) -> float:
    """Median ms of ``fn()`` alone."""
    sync, ts = _sync(device), []
    for i in range(reps + warmup):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        if i >= warmup:
            ts.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(ts)


def print_bench(title: str, results: dict) -> None:
    print(f"{title}, {torch.get_num_threads()} threads")
    for p, rows in results.items():
        for name, s in rows.items():
            print(f"p={p:<5} {name:22s} {s['median_ms']:7.2f} ms  (p10-p90 {s['p10_ms']:.2f}-{s['p90_ms']:.2f})"
                  f"  {s['overhead_pct']:+.0f}%")


def _weights(d_in, d_out, r, n, device, dtype=torch.float32, adapter=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g)
    ws = [(rnd(d_out, d_in) / d_in**0.5).to(device, dtype) for _ in range(n)]
    bs = [rnd(d_out).to(device, dtype) for _ in range(n)]
    As = [(rnd(r, d_in) / d_in**0.5).to(device, adapter).requires_grad_() for _ in range(n)]
    Bs = [(rnd(d_out, r) / r**0.5).to(device, adapter).requires_grad_() for _ in range(n)]
    return ws, bs, As, Bs


def bench_lora_linear(tokens=1024, d=512, r=16, reps=40, dropouts=(0.0, 0.05), device="cpu") -> dict:
    """Fused op vs unfused eager torch vs the frozen base linear alone (fp32)."""
    from peftc.kernels.lora_linear import lora_linear

    (w,), (b,), (a,), (bb,) = _weights(d, d, r, 1, device)
    x, dy = torch.randn(tokens, d, device=device, requires_grad=True), torch.randn(tokens, d, device=device)
    linear, dropout = torch.nn.functional.linear, torch.nn.functional.dropout
    runs = {"base linear (frozen)": (lambda p: linear(x, w, b), [x]),
            "unfused torch": (lambda p: linear(x, w, b) + 2.0 * ((dropout(x, p, True) @ a.t()) @ bb.t()), [x, a, bb]),
            "fused op": (lambda p: lora_linear(x, w, b, a, bb, 2.0, p, train=True), [x, a, bb])}
    return time_backward(runs, dy, dropouts, reps, device, "base linear (frozen)")


def bench_lora_siblings(tokens=1024, d=512, r=16, n=3, reps=40, dropouts=(0.0, 0.05), device="cpu") -> dict:
    """n q/k/v-like siblings: one lora_siblings op vs n lora_linear ops vs unfused torch vs the frozen bases."""
    from peftc.kernels.lora_linear import lora_linear
    from peftc.kernels.lora_siblings import lora_siblings

    ws, bs, As, Bs = _weights(d, d, r, n, device)
    x = torch.randn(tokens, d, device=device, requires_grad=True)
    dys = [torch.randn(tokens, d, device=device) for _ in range(n)]
    linear, dropout = torch.nn.functional.linear, torch.nn.functional.dropout
    leaves = [x, *As, *Bs]
    unfused = lambda p: [linear(x, w, b) + 2.0 * ((dropout(x, p, True) @ a.t()) @ bb.t())
                         for w, b, a, bb in zip(ws, bs, As, Bs)]
    runs = {"base linears (frozen)": (lambda p: [linear(x, w, b) for w, b in zip(ws, bs)], [x]),
            "unfused torch": (unfused, leaves),
            f"{n} lora_linear ops": (lambda p: [lora_linear(x, w, b, a, bb, 2.0, p, train=True)
                                                for w, b, a, bb in zip(ws, bs, As, Bs)], leaves),
            "lora_siblings op": (lambda p: lora_siblings(x, ws, bs, As, Bs, [2.0] * n, p, train=True), leaves)}
    return time_backward(runs, dys, dropouts, reps, device, "base linears (frozen)")


def _peft_layer(w, b, a, bb, alpha, p):
    """HF PEFT's LoRA Linear around an nn.Linear holding (w, b), adapters set to (a, bb)."""
    from peft import LoraConfig
    from peft.tuners.lora import Linear

    base = torch.nn.Linear(w.shape[1], w.shape[0], device=w.device, dtype=w.dtype).requires_grad_(False)
    with torch.no_grad():
        base.weight.copy_(w)
        base.bias.copy_(b)
    config = LoraConfig(r=a.shape[0], lora_alpha=alpha, lora_dropout=p)
    layer = Linear(base, "default", config, r=a.shape[0], lora_alpha=alpha, lora_dropout=p).train()
    layer.lora_A["default"].to(a.dtype)
    layer.lora_B["default"].to(bb.dtype)
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(a)
        layer.lora_B["default"].weight.copy_(bb)
    return layer, [layer.lora_A["default"].weight, layer.lora_B["default"].weight]


def layer_bench(tokens, d, r, dtype, adapter, dropouts, reps, device, alpha=32.0) -> dict:
    """frozen linear vs PEFT unfused vs peftc fused at one shape; checks fused == PEFT (p=0) first."""
    from peftc.kernels.lora_linear import lora_linear

    (w,), (b,), (a,), (bb,) = _weights(d, d, r, 1, device, dtype, adapter)
    x = torch.randn(tokens, d, device=device, dtype=dtype, requires_grad=True)
    dy = torch.randn(tokens, d, device=device, dtype=dtype)
    scale = alpha / r
    layers = {p: _peft_layer(w, b, a.detach(), bb.detach(), alpha, p) for p in dropouts}
    with torch.no_grad():
        got, want = lora_linear(x, w, b, a, bb, scale), layers[dropouts[0]][0].eval()(x)
        tol = 1e-4 if dtype == torch.float32 else 2e-2
        if not torch.allclose(got.float(), want.float(), atol=tol, rtol=tol):
            raise RuntimeError(f"peftc fused differs from PEFT: max |diff| {(got - want).abs().max().item():.3g}")
    out = {}
    for p in dropouts:  # one PEFT layer (and its leaves) per dropout
        runs = {"frozen linear": (lambda q: torch.nn.functional.linear(x, w, b), [x]),
                "PEFT unfused": (lambda q, p=p: layers[p][0].train()(x), [x, *layers[p][1]]),
                "peftc fused": (lambda q: lora_linear(x, w, b, a, bb, scale, q, train=True), [x, a, bb])}
        out[p] = time_backward(runs, dy, [p], reps, device, "frozen linear")[p]
    return out


def breakdown(tokens, d, r, dtype, adapter, p, reps, device) -> dict:
    """Median ms of each piece of one fused LoRA linear's forward + backward, as the CPU path runs them."""
    from peftc.kernels import lora_linear as L

    (w,), (b,), (a,), (bb,) = ([t.detach() for t in ts] for ts in _weights(d, d, r, 1, device, dtype, adapter))
    x, g = (torch.randn(tokens, d, device=device, dtype=dtype) for _ in range(2))
    xa, ga, h, gbs = x.to(adapter), g.to(adapter), torch.randn(tokens, r, device=device, dtype=adapter), \
        torch.randn(tokens, r, device=device, dtype=adapter)
    y, dx = torch.addmm(b, x, w.t()), torch.mm(g, w)
    seed = torch.tensor(3)
    t = lambda fn: time_one(fn, reps, device)
    rows = {"base GEMM y = x W^T + b": t(lambda: torch.addmm(b, x, w.t())),
            "base GEMM dx = g W": t(lambda: torch.mm(g, w)),
            "r-wide: h = x A^T": t(lambda: torch.mm(xa, a.t())),
            "r-wide: y + s h B^T": t(lambda: torch.addmm(y, h.to(y.dtype), bb.t().to(y.dtype), alpha=2.0)),
            "r-wide: g B": t(lambda: torch.mm(ga, bb)),
            "r-wide: dA = (gB)^T x": t(lambda: torch.mm(gbs.t(), xa)),
            "r-wide: dB = h^T g": t(lambda: torch.mm(h.t(), ga)),
            "r-wide: dx + (gB) A": t(lambda: torch.addmm(dx, gbs.to(dx.dtype), a.to(dx.dtype)))}
    if p and not str(device).startswith("cuda"):
        drop = L._drop_bits(seed, (tokens, d), p)
        bits = L.pack_bits(drop)
        rows |= {"mask: draw (16-bit lanes)": t(lambda: L._drop_bits(seed, (tokens, d), p)),
                 "mask: masked_fill x (fwd and bwd)": t(lambda: xa.masked_fill(drop, 0.0)),
                 "mask: pack bits (fwd)": t(lambda: L.pack_bits(drop)),
                 "mask: unpack bits (bwd)": t(lambda: L.unpack_bits(bits, d))}
    xs = torch.randn(1, 8, device=device, dtype=dtype, requires_grad=True)
    (ws,), (bs,), (As,), (Bs,) = _weights(8, 8, 2, 1, device, dtype, adapter)
    tiny = lambda fn: t(lambda: torch.autograd.grad(fn(), [xs, As, Bs], torch.ones(1, 8, device=device, dtype=dtype)))
    rows["dispatch: fused op fwd+bwd on 1x8"] = tiny(lambda: L.lora_linear(xs, ws, bs, As, Bs, 2.0, p, train=True))
    rows["dispatch: unfused torch fwd+bwd on 1x8"] = tiny(
        lambda: torch.nn.functional.linear(xs, ws, bs) + ((xs.to(adapter) @ As.t()) @ Bs.t() * 2.0).to(dtype))
    return rows


def _markdown(result: dict) -> str:
    c, gpu = result["config"], result["config"]["device"].startswith("cuda")
    lines = [f"# Per layer: one LoRA linear on {'GPU' if gpu else 'CPU'} ({result['environment']})", "",
             *([f"> {c['note']}", ""] if c.get("note") else []),
             f"Command: `{c['command']}`", "",
             f"T = {c['tokens']} tokens, d_in = d_out = {c['d']}, r = {c['r']}, base {c['dtype']}, adapters "
             f"{c['adapter_dtype']}; forward + backward (dx, dA, dB; W and b frozen); {c['reps']} reps "
             "interleaved; medians (p10-p90).", "",
             "| p | variant | median ms | p10-p90 ms | over the frozen linear |", "|---|---|---:|---:|---:|"]
    for p, rows in result["layers"].items():
        for n, s in rows.items():
            lines.append(f"| {p} | {n} | {s['median_ms']:.3f} | {s['p10_ms']:.3f}-{s['p90_ms']:.3f} | "
                         f"{s['overhead_pct']:+.1f}% |")
    lines += ["", "| p | fused / frozen | PEFT / fused |" + (" targets (H100/H200) |" if gpu else ""),
              "|---|---:|---:|" + ("---|" if gpu else "")]
    for p, rows in result["layers"].items():
        f_, fr, pe = (rows[k]["median_ms"] for k in ("peftc fused", "frozen linear", "PEFT unfused"))
        goal = (f" <= {GPU_TARGETS['fused / frozen']}: {'met' if f_ / fr <= 1.05 else '**not met**'}; "
                f">= {GPU_TARGETS['PEFT / fused']}: {'met' if pe / f_ >= 1.4 else '**not met**'} |") if gpu else ""
        lines.append(f"| {p} | {f_ / fr:.3f}x | {pe / f_:.3f}x |{goal}")
    lines += ["", f"Breakdown at p = {c['breakdown_p']} (each piece alone, median ms): where the overhead over "
              "the frozen linear goes.", "", "| piece | ms |", "|---|---:|"]
    lines += [f"| {k} | {v:.3f} |" for k, v in result["breakdown"].items()]
    return "\n".join(lines + [""] + _why(result["breakdown"])) + "\n"


def _why(b: dict) -> list[str]:
    """The breakdown summed into the shares that bound the fused op's overhead over the frozen linear."""
    base = sum(v for k, v in b.items() if k.startswith("base GEMM"))
    low = sum(v for k, v in b.items() if k.startswith("r-wide"))
    mask = b.get("mask: draw (16-bit lanes)", 0.0) + 2 * b.get("mask: masked_fill x (fwd and bwd)", 0.0) + \
        b.get("mask: pack bits (fwd)", 0.0) + b.get("mask: unpack bits (bwd)", 0.0)
    disp = b.get("dispatch: fused op fwd+bwd on 1x8", 0.0) - b.get("dispatch: unfused torch fwd+bwd on 1x8", 0.0)
    pct = lambda v: f"{100 * v / base:+.1f}%"
    return [f"Summed: the two frozen GEMMs {base:.3f} ms; the six r-wide GEMMs {low:.3f} ms ({pct(low)} of them: "
            "each reads or writes a whole (T, d) operand for only 2r FLOPs per element, so they run at memory "
            f"speed, not GEMM speed); the dropout mask (one draw, two fills, pack, unpack) {mask:.3f} ms "
            f"({pct(mask)}); the custom op's dispatch (fused minus unfused on 1x8 inputs) {disp:.3f} ms "
            f"({pct(disp)}). The fused op's floor over the frozen linear is about their sum."]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--tokens", type=int, help="T (default 1024 on CPU, 8192 on CUDA)")
    ap.add_argument("--d", type=int, help="in = out width (default 512 on CPU, 4096 on CUDA)")
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--dtype", choices=sorted(DTYPES), help="base dtype (default fp32 on CPU, bf16 on CUDA)")
    ap.add_argument("--adapter-dtype", choices=sorted(DTYPES), default="fp32", help="PEFT's default: fp32")
    ap.add_argument("--dropout", type=float, nargs="+", default=[0.0, 0.05])
    ap.add_argument("--reps", type=int, help="default 60 on CPU, 50 on CUDA")
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    ap.add_argument("--out", default="benchmarks/results", help="directory for the JSON")
    ap.add_argument("--report", default="benchmarks/RESULTS.md")
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes, 2 reps: the script end to end")
    ap.add_argument("--note", default="", help="a line printed on top of the report (e.g. machine load)")
    args = ap.parse_args(argv)
    cuda = args.device.startswith("cuda")
    tokens, d = args.tokens or (8192 if cuda else 1024), args.d or (4096 if cuda else 512)
    reps = args.reps or (50 if cuda else 60)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.dry_run:
        tokens, d, reps = 64, 32, 2
    dtype, adapter = DTYPES[args.dtype or ("bf16" if cuda else "fp32")], DTYPES[args.adapter_dtype]
    dropouts = [float(p) for p in args.dropout]
    bp = max(dropouts)
    env = (torch.cuda.get_device_name(args.device) if cuda else f"{torch.get_num_threads()} torch threads") + \
        f", torch {torch.__version__}"
    result = {"schema": "peftc.bench.layer/1",
              "config": {"device": args.device, "tokens": tokens, "d": d, "r": args.r, "reps": reps,
                         "dtype": str(dtype).split(".")[1], "adapter_dtype": str(adapter).split(".")[1],
                         "dropouts": dropouts, "breakdown_p": bp, "note": args.note,
                         "command": shlex.join(["python", "-m", "benchmarks.layer", *(sys.argv[1:] if argv is None
                                                                                      else argv)])},
              "environment": env,
              "layers": {str(p): rows for p, rows in layer_bench(tokens, d, args.r, dtype, adapter, dropouts, reps,
                                                                 args.device).items()},
              "breakdown": breakdown(tokens, d, args.r, dtype, adapter, bp, reps, args.device),
              "time_unix": time.time()}
    kind = "gpu" if cuda else "cpu"
    atomic_write(Path(args.out) / f"layer_{kind}.json", json.dumps(result, indent=2) + "\n")
    write_section(Path(args.report), f"layer_{kind}", _markdown(result))
    print(_markdown(result))
    return result


if __name__ == "__main__":
    main()
