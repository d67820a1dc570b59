"""peftc: a compiler for parameter-efficient fine-tuning of PyTorch models.

    spec = peftc.Spec.load("examples/llama-lora.yaml")
    cm = peftc.compile(model, spec, example_inputs={"input_ids": ids})
    cm(input_ids=ids, labels=ids).loss.backward()
    cm.save_adapter("out/")
"""

from peftc import passes  # noqa: F401  (registers the methods before any spec is read)
from peftc.compiled import CompiledModel, compile, from_peft
from peftc.distributed import load_sharded
from peftc.errors import CaptureError, CheckpointError, PassError, PeftcError, SpecError
from peftc.gguf_adapter import save_gguf_adapter
from peftc.gguf_base import from_gguf
from peftc.memory import memory_report
from peftc.quant_load import load_quantized
from peftc.spec import Spec

__all__ = [
    "Spec", "compile", "from_peft", "CompiledModel", "memory_report", "load_sharded", "load_quantized",
    "from_gguf", "save_gguf_adapter",
    "PeftcError", "SpecError", "CaptureError", "CheckpointError", "PassError",
]
__version__ = "0.1.0"
