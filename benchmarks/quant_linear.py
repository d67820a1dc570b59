"""Quantized frozen base: one-layer GPU timing of the fused NF4 dequant + LoRA kernel, and a CPU table of
weight bytes and dequantization error per format on a small model.

    python -m benchmarks.quant_linear            # CPU table (and the GPU layer when CUDA is present)
    python -m benchmarks.quant_linear --gpu      # only the GPU layer: T=8192, d=4096, r=16, bf16

GPU: ``peftc::quant_linear`` (Triton: W tiles dequantized in registers inside the GEMM, LoRA in the
epilogue; backward dequantizes again for dx) against a torch reference that dequantizes the whole weight
and then runs the matmul + LoRA (and torchao's NF4Tensor linear when torchao is installed): forward +
backward (dx, dA, dB), ``triton.testing.do_bench`` medians, interleaved.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

from peftc.benchmarks.report import atomic_write, write_section
from peftc.kernels import quant_linear as QL

__all__ = ["bench_layer", "format_table", "print_table"]


def bench_layer(tokens=8192, d=4096, r=16, dtype=torch.bfloat16, reps=50) -> dict:
    """Median ms (forward + backward) of the fused NF4 + LoRA op vs dequantize-then-matmul torch (CUDA)."""
    import triton

    dev = "cuda"
    g = torch.Generator(device=dev).manual_seed(0)
    w = torch.randn(d, d, device=dev, generator=g) / d**0.5
    q = QL.quantize_weight(w, "nf4", 64, True)
    x = torch.randn(tokens, d, device=dev, dtype=dtype, generator=g).requires_grad_()
    a = (torch.randn(r, d, device=dev, generator=g) / d**0.5).to(dtype).requires_grad_()
    b = (torch.randn(d, r, device=dev, generator=g) / r**0.5).to(dtype).requires_grad_()
    dy = torch.randn(tokens, d, device=dev, dtype=dtype, generator=g)

    def fused():
        return QL.quant_linear(x, q, None, a, b, 2.0, fmt="nf4", block_size=64)

    def reference():  # the whole weight dequantized, then matmul + LoRA (autograd keeps the copy)
        wd = QL.dequantize(*q, "nf4", 64, dtype)
        return x @ wd.t() + 2.0 * ((x @ a.t()) @ b.t())

    runs = {"peftc fused nf4+lora": fused, "torch dequant then matmul": reference}
    try:
        from torchao.quantization import to_nf4

        w_ao = to_nf4(w.to(dtype), 64, 256)
        runs["torchao NF4Tensor linear"] = lambda: torch.nn.functional.linear(x, w_ao) + 2.0 * ((x @ a.t()) @ b.t())
    except ImportError:
        pass
    out = {}
    for name, fn in runs.items():
        out[name] = triton.testing.do_bench(lambda fn=fn: torch.autograd.grad(fn(), (x, a, b), dy), rep=reps * 10,
                                            return_mode="median")
    return {"tokens": tokens, "d": d, "r": r, "dtype": str(dtype), "median_ms": out}


def format_table(hidden=512, layers=4, intermediate=1408) -> list[dict]:
    """Per format, on a Llama (random init) of this size: bytes of the quantized linear weights, bits per
    weight, dequantization error (max abs, relative Frobenius) and the logits' max abs change."""
    import transformers as tf

    import peftc

    cfg = tf.LlamaConfig(vocab_size=4096, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=8)
    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 4096, (2, 64))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"}
    fp32 = sum(m.weight.numel() * 4 for m in linears.values())
    rows = [{"format": "fp32 (none)", "weight_bytes": fp32, "bits": 32.0, "max_abs_err": 0.0, "rel_err": 0.0,
             "logits_max_abs_diff": 0.0}]
    spec = {"methods": [{"lora": {"targets": ["q_proj"], "r": 4}}]}
    for label, settings in (("nf4 + double quant", {}), ("nf4", {"double_quant": False}),
                            ("int8 per channel", {"format": "int8"})):
        # one model compiled three ways and compared with its weights: it keeps them (release_base: false)
        cm = peftc.compile(model, spec, {"input_ids": ids}, optimize={"quantize": {**settings, "release_base": False}})
        root = cm.adapters.get_submodule("_quantize")
        nbytes = err = num = den = 0.0
        for path, mod in linears.items():
            qw = root.get_submodule(path)
            dq = qw.dequantize()
            nbytes += qw.nbytes()
            err = max(err, (dq - mod.weight).abs().max().item())
            num += (dq - mod.weight).pow(2).sum().item()
            den += mod.weight.pow(2).sum().item()
        with torch.no_grad():
            diff = (cm.eval()(input_ids=ids).logits - ref).abs().max().item()
        rows.append({"format": label, "weight_bytes": int(nbytes), "bits": 8 * nbytes / (fp32 / 4),
                     "max_abs_err": err, "rel_err": (num / den) ** 0.5, "logits_max_abs_diff": diff})
    return rows


def print_table(rows: list[dict]) -> str:
    lines = ["| format | weight bytes (linears, head excluded) | bits / weight | max abs error | relative error "
             "(Frobenius) | logits max abs change |", "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['format']} | {r['weight_bytes']:,} | {r['bits']:.3f} | {r['max_abs_err']:.3g} | "
                     f"{r['rel_err']:.3g} | {r['logits_max_abs_diff']:.3g} |")
    text = "\n".join(lines)
    print(text)
    return text


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpu", action="store_true", help="only the one-layer GPU timing")
    ap.add_argument("--out", default=str(Path(__file__).with_name("results")))
    ap.add_argument("--report", default=str(Path(__file__).with_name("RESULTS.md")))
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    path = Path(args.out) / "quant_linear.json"
    result = json.loads(path.read_text()) if path.exists() else {}  # a --gpu run keeps the CPU table
    if not args.gpu:
        result["cpu_formats"] = format_table()
        print_table(result["cpu_formats"])
    if torch.cuda.is_available():
        result["gpu_layer"] = bench_layer()
        text = json.dumps(result["gpu_layer"], indent=2)
        print(text)
        write_section(Path(args.report), "gpu_quant_linear",
                      f"## GPU: one NF4 + LoRA layer ({torch.cuda.get_device_name()})\n\n"
                      f"Command: `bash scripts/gpu_check.sh`. Raw figures:\n\n```json\n{text}\n```")
    else:
        print("GPU: not yet measured on a GPU (no CUDA device here)")
    atomic_write(path, json.dumps(result, indent=2))
