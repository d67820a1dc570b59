"""Decode over a quantized base, per op: which implementation should read the weights (CPU).

    python -m benchmarks.decode_gemv                 # SmolLM2-135M's 210 layer linears, batch 1
    python -m benchmarks.decode_gemv --quick --out /tmp/d   # 2 layers, 3 reps: the harness

One decode step multiplies one row by every weight of the model once, so it streams the weights
from memory: this times that for SmolLM2-135M's layer shapes (30 x q, k, v, o, gate, up, down; each
weight distinct, 424 MB in fp32, so nothing stays in cache), per format and implementation:

    fp32 / bf16 F.linear                       the full-precision floor
    dequantize + F.linear                      a dequantized temporary per call (quant_linear's path for many rows)
    inductor dequant-reduction                 torch.compile of sum(x * deq(W), -1): inductor's generated loop reads the codes
    torch packed op                            aten._weight_int8pack_mm / _weight_int4pack_mm_for_cpu (int8 / int4)
    peftc C kernel                             kernels/quant_gemv.py (what quant_linear runs for <= 16 rows)

Results: ``results/decode_gemv.json``, section ``decode_gemv`` of RESULTS.md. Not timed in tests.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from peftc.benchmarks.report import atomic_write, write_section
from peftc.benchmarks.step_time import _environment
from peftc.kernels import quant_formats as F
from peftc.kernels import quant_gemv as G

__all__ = ["run", "main", "SHAPES"]

SHAPES = ((576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536))  # SmolLM2 layer
BLOCK = {"int4": 32, "nf4": 64, "int8": 0}


def _inductor_gemv(fmt: str, block: int):
    """sum(x * deq(W), -1) compiled: inductor fuses the dequantization into the reduction (no temporary)."""
    code = torch.tensor(F.NF4_CODE)

    def gemv(x, data, qscale, qoffset):
        if fmt == "int8":
            return (x[:, None, :] * data.float()[None]).sum(-1) * qscale
        out, half = data.shape
        if fmt == "int4":
            b = data.view(out, -1, block // 2)
            q = torch.cat((b & 15, b >> 4), -1).float()
            w = q * qscale.float().view(out, -1, 1) + qoffset.float().view(out, -1, 1)
        else:  # nf4 without double quantization: the absmax is qscale
            w = code[torch.stack((data >> 4, data & 15), -1).view(out, -1, block).long()] * qscale.view(out, -1, 1)
        return (x[:, None, :] * w.view(out, 2 * half)[None]).sum(-1)

    return torch.compile(gemv, dynamic=False)


def _torch_packed(fmt: str, w: torch.Tensor):
    """torch's own packed CPU op for a weight, or None (nf4: none)."""
    if fmt == "int8":
        q = F.quantize_weight(w, "int8")
        return lambda x: torch.ops.aten._weight_int8pack_mm(x, q[0], q[1])
    if fmt == "int4":
        out, d = w.shape
        g = w.reshape(out, d // 32, 32)
        lo, hi = g.amin(-1), g.amax(-1)
        scale = ((hi - lo) / 15).clamp_min(1e-8)
        q = ((g - lo[..., None]) / scale[..., None]).round().clamp(0, 15).to(torch.int32).view(out, d)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
        zeros = lo + 8 * scale  # torch's convention: w = (q - 8) * scale + zero
        sz = torch.stack((scale, zeros), -1).transpose(0, 1).contiguous()
        return lambda x: torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, 32, sz)
    return None


def _time(fn, reps: int) -> dict:
    fn()
    ms = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        ms.append((time.perf_counter() - start) * 1e3)
    return {"median_ms": statistics.median(ms), "min_ms": min(ms)}


def run(layers: int = 30, reps: int = 15, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    ws = [torch.randn(o, i, generator=g) * 0.02 for _ in range(layers) for o, i in SHAPES]
    xs = {576: torch.randn(1, 576, generator=g), 1536: torch.randn(1, 1536, generator=g)}
    x_of = [xs[w.shape[1]] for w in ws]
    numel = sum(w.numel() for w in ws)
    rows = {}

    def add(name, fmt, calls, nbytes, check=None):
        def step():
            for c, x in zip(calls, x_of):
                c(x)
        r = _time(step, reps)
        r.update(fmt=fmt, bytes=nbytes, gb_per_s=nbytes / r["median_ms"] / 1e6)
        if check is not None:
            r["max_abs_err_vs_dequantized"] = check
        rows[name] = r
        print(f"[decode_gemv] {name}: {r['median_ms']:.2f} ms", flush=True)

    with torch.no_grad():
        add("fp32 F.linear", "fp32", [lambda x, w=w: torch.nn.functional.linear(x, w) for w in ws], 4 * numel)
        wb = [w.to(torch.bfloat16) for w in ws]
        xb = [x.to(torch.bfloat16) for x in x_of]
        rows_b = [lambda x, w=w, i=i: torch.nn.functional.linear(xb[i], w) for i, w in enumerate(wb)]
        add("bf16 F.linear", "bf16", rows_b, 2 * numel)
        del wb
        for fmt in ("int4", "nf4", "int8"):
            block = BLOCK[fmt]
            qs = [F.quantize_weight(w, fmt, block, False) for w in ws]
            nbytes = sum(t.numel() * t.element_size() for q in qs for t in q)
            ref = x_of[4] @ F.dequantize(*qs[4], fmt, block).T
            add(f"{fmt}: dequantize + F.linear", fmt,
                [lambda x, q=q, f=fmt, b=block: torch.nn.functional.linear(x, F.dequantize(*q, f, b)) for q in qs], nbytes)
            torch._dynamo.reset()  # one function body for every format: its recompiles would hit dynamo's limit
            ind = _inductor_gemv(fmt, block)
            err = (ind(x_of[4], qs[4][0], qs[4][1], qs[4][3]) - ref).abs().max().item()
            add(f"{fmt}: inductor dequant-reduction", fmt, [lambda x, q=q, c=ind: c(x, q[0], q[1], q[3]) for q in qs],
                nbytes, err)
            if G.status().startswith("packed"):
                err = (G.packed_linear(x_of[4], qs[4], fmt, block)[0] - ref).abs().max().item()
                add(f"{fmt}: peftc C kernel", fmt, [lambda x, q=q, f=fmt, b=block: G.packed_linear(x, q, f, b) for q in qs],
                    nbytes, err)
            packed = [_torch_packed(fmt, w) for w in ws]
            if packed[0] is not None:
                add(f"{fmt}: torch packed op", fmt, packed, nbytes)
    return {"environment": _environment("cpu"), "layers": layers, "reps": reps, "weights": len(ws),
            "kernel": G.status(), "rows": rows}


def markdown(result: dict, command: str) -> str:
    env = result["environment"]
    fp = result["rows"]["fp32 F.linear"]["median_ms"]
    lines = ["## Decode over a quantized base, per op (CPU)", "",
             f"Command: `{command}`", "",
             f"Device: {env['device']}; {env['cpu_count']} CPUs, {env['torch_threads']} torch threads; torch {env['torch']}. "
             f"{result['weights']} distinct weights of SmolLM2-135M's layer shapes ({result['layers']} layers x "
             "q, k, v, o, gate, up, down), one row each, back to back: what one decode step streams (the head "
             f"excluded). Median of {result['reps']} reps. The C kernel: {result['kernel']}.", "",
             "| implementation | format | ms / step | x fp32 | weight bytes | GB/s | max abs err vs dequantized |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for name, r in result["rows"].items():
        err = r.get("max_abs_err_vs_dequantized")
        lines.append(f"| {name} | {r['fmt']} | {r['median_ms']:.2f} | {fp / r['median_ms']:.2f}x | {r['bytes']:,} | "
                     f"{r['gb_per_s']:.1f} | {'' if err is None else f'{err:.1e}'} |")
    lines += ["", "Chosen per op: quant_linear runs the peftc C kernel for up to 16 rows on CPU (the fastest "
              "line of each format above), and the dequantized temporary + GEMM for more rows and backward; "
              "inductor sees quant_linear as an opaque op (a kernel it schedules around) rather than its "
              "decomposition, whose generated reduction is slower than the C kernel for every format. torch's "
              "packed ops are timed with their own packing (int4: q - 8 with scale and zero per group of 32); "
              "their error column is left empty.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="2 layers, 3 reps (the harness, not a measurement)")
    ap.add_argument("--out", default=str(Path(__file__).with_name("results")))
    ap.add_argument("--report", default=None, help="RESULTS.md path (default: benchmarks/RESULTS.md for the default --out)")
    args = ap.parse_args(argv)
    torch.set_num_threads(torch.get_num_threads())
    result = run(2, 3) if args.quick else run()
    out = Path(args.out)
    atomic_write(out / "decode_gemv.json", json.dumps(result, indent=1))
    default_out = Path(args.out).resolve() == Path(__file__).with_name("results").resolve()
    report = Path(args.report) if args.report else (Path(__file__).with_name("RESULTS.md") if default_out
                                                    else out / "RESULTS.md")
    command = "python -m benchmarks.decode_gemv" + (" --quick" if args.quick else "")
    write_section(report, "decode_gemv", markdown(result, command))
    return result


if __name__ == "__main__":
    main()
