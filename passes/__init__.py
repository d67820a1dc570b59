"""peftc.passes: rewrite and optimization passes over fx GraphModules, and their pipeline.

Importing this package registers every method spec and optimization it defines.
"""

from peftc.passes import bitfit, ia3, lora, merge, prompt, ssf, train  # importing registers the methods
from peftc.passes.pipeline import PassContext, PassResult, rewrite_passes, run_pipeline

__all__ = ["PassContext", "PassResult", "run_pipeline", "rewrite_passes", "bitfit", "ia3", "lora", "merge", "prompt", "ssf", "train"]
