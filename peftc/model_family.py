"""Model-family facts read from an HF config, under each family's spelling of the field.

    kv_geometry(model) -> (layers, key/value heads, head dim)

Llama/Qwen/Mistral say ``num_hidden_layers``, ``num_key_value_heads`` (grouped-query attention),
``head_dim``; GPT-2 ``n_layer``, ``n_head``, ``n_embd``; T5 ``num_layers``, ``d_model``. The
prefix-tuning pass sizes its learned keys/values by it; generation allocates its KV cache by it.

Example::

    layers, heads, head_dim = kv_geometry(model)   # tiny Llama: (2, 2, 16)
"""

from __future__ import annotations

from torch import nn

from peftc.errors import PeftcError

__all__ = ["kv_geometry"]


def kv_geometry(model: nn.Module) -> tuple[int, int, int]:
    """(layers, key/value heads, head dim) of the model's attention cache, as PEFT sizes a prefix
    (grouped-query attention: the key/value heads, not the query heads)."""
    cfg = getattr(model, "config", None)
    if cfg is None:
        raise PeftcError(f"{type(model).__name__} has no HF model config: its layers and heads are unknown")
    get = lambda *names: next((getattr(cfg, n) for n in names if getattr(cfg, n, None) is not None), None)
    layers, heads = get("num_hidden_layers", "n_layer", "num_layers"), get("num_attention_heads", "n_head")
    dim = get("hidden_size", "n_embd", "d_model")
    kv = get("num_key_value_heads")
    head_dim = get("head_dim") if kv is not None and get("head_dim") else dim // heads
    return layers, kv or heads, head_dim
