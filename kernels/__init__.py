"""peftc.kernels: fused ops (Triton on CUDA, fused torch on CPU). None are registered yet."""

__all__: list[str] = []
