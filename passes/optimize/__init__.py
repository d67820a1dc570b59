"""peftc.passes.optimize: one file (or a small family of files) per optimization: fuse,
quantize, recompute, shard and the mixed-batch lowering.

Importing an optimization file registers it, with its phase, its settings check and its hooks
(``peftc.spec.register_optimization``).
"""
