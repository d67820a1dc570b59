"""peftc.kernels: fused ops, one file each: Triton kernels on CUDA, fused torch on CPU, and the
``torch.library`` custom-op registration (fake impl + autograd) that lets graphs using them
survive torch.export and torch.compile. Importing a module registers its op.

    lora_linear   torch.ops.peftc.lora_linear: y = x W^T + b + s * drop(x) A^T B^T
"""

__all__ = ["lora_linear"]
