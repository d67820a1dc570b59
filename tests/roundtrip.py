"""Shared check: an adapter peftc saved loads in HF PEFT to the same logits."""

import torch
from peft import PeftModel

from peftc.models import tiny_model


def assert_peft_loads_same(cm, name: str, snapshot: dict, path, **inputs) -> None:
    """``cm.save_adapter(path)`` -> ``PeftModel.from_pretrained`` on a fresh ``name`` base with
    ``snapshot`` weights -> the same logits as ``cm`` (eval mode) on ``inputs``."""
    cm.save_adapter(path)
    base = tiny_model(name)
    base.load_state_dict(snapshot)
    pm = PeftModel.from_pretrained(base, path).eval()
    cm.eval()
    with torch.no_grad():
        torch.testing.assert_close(pm(**inputs).logits, cm(**inputs).logits, atol=1e-4, rtol=0)
