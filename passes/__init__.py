"""peftc.passes: rewrite and optimization passes over fx GraphModules, and their pipeline.

Importing this package registers every method spec and optimization it defines.
"""

from peftc.passes import lora, train
from peftc.passes.pipeline import PassContext, PassResult, rewrite_passes, run_pipeline

__all__ = ["PassContext", "PassResult", "run_pipeline", "rewrite_passes", "lora", "train"]
