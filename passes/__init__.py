"""peftc.passes: rewrite and optimization passes over fx GraphModules, and their pipeline.

Importing this package registers every method spec and optimization it defines.
"""

from peftc.passes import (  # importing registers the methods
    bitfit,
    ia3,
    ln_tuning,
    loha,
    lokr,
    lora,
    merge,
    prefix,
    prompt,
    ptuning,
    ssf,
    train,
    vera,
)
from peftc.passes.pipeline import PassContext, PassResult, rewrite_passes, run_pipeline

__all__ = [
    "PassContext", "PassResult", "run_pipeline", "rewrite_passes",
    "bitfit", "ia3", "ln_tuning", "loha", "lokr", "lora", "merge", "prefix", "prompt", "ptuning", "ssf", "train", "vera",
]
