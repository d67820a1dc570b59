"""peftc.kernels: fused ops, one file each: Triton kernels on CUDA, fused torch on CPU, and the
``torch.library`` custom-op registration (fake impl + autograd) that lets graphs using them
survive torch.export and torch.compile. Importing a module registers its op.

    lora_linear   torch.ops.peftc.lora_linear: y = x W^T + b + s * drop(x) A^T B^T
    lora_siblings torch.ops.peftc.lora_siblings: several lora_linear on one x, one [A_1; A_2; ...] GEMM
    ia3_linear    torch.ops.peftc.ia3_linear: y = (x W^T + b) * l ("out") or (x * l) W^T + b ("in")
    dora_linear   torch.ops.peftc.dora_linear: y = m / ||W + s B A||_row * (x W^T + s drop(x) A^T B^T) + b
                  (PEFT's DoRA; with dropout in training the base term is x W^T + (mn - 1) drop(x) W^T)
    lora_sgmv     torch.ops.peftc.lora_sgmv: a mixed batch, each sample's rows through its own adapter's A, B
    quant_linear  torch.ops.peftc.quant_linear / quant_dora_linear: W stored NF4 or int8, dequantized inside
                  the op (Triton: in the GEMM's tiles), + LoRA / DoRA; autograd saves the quantized W only

What the ops share lives in public modules, never in another op's private names: ``common`` (seeds,
dropout masks, dtype helpers, the fused-torch LoRA linear), ``gemm`` (Triton GEMM building blocks,
launch settings) and ``lora_triton`` (the LoRA-specific Triton kernels of lora_linear / lora_siblings).
"""

if __name__ == "kernels":  # found as top-level "kernels" from the repository root: not ours (peftc/toplevel.py)
    import os as _os
    import runpy as _runpy

    _runpy.run_path(_os.path.join(_os.path.dirname(__file__), _os.pardir, "peftc", "toplevel.py"))["hand_over"](
        __name__, __file__)

__all__ = ["dora_linear", "ia3_linear", "lora_linear", "lora_sgmv", "lora_siblings", "quant_linear", "common", "gemm",
           "lora_triton"]
