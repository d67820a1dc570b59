"""peftc.passes: rewrite and optimization passes over fx GraphModules, and their pipeline.

Importing this package registers every method spec and optimization it defines.
"""

from peftc.passes import (  # importing registers the methods
    bitfit,
    bottleneck,
    fuse,
    hybrid,
    ia3,
    ln_tuning,
    loha,
    lokr,
    lora,
    merge,
    prefix,
    prompt,
    ptuning,
    recompute,
    ssf,
    train,
    vera,
)
from peftc.passes.pipeline import PassContext, PassResult, optimize_passes, rewrite_passes, run_pipeline

__all__ = [
    "PassContext", "PassResult", "run_pipeline", "rewrite_passes", "optimize_passes",
    "bitfit", "bottleneck", "hybrid", "fuse", "ia3", "ln_tuning", "loha", "lokr", "lora", "merge", "prefix", "prompt", "ptuning", "recompute", "ssf", "train", "vera",
]
