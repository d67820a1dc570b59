"""P-tuning (Liu et al. 2021, "GPT Understands, Too") as graph nodes, with HF PEFT's numerics.

    prompt = MLP(E),  E (P, D) learned;  MLP = Linear(D, H) ReLU Linear(H, H) ReLU Linear(H, D)

then the P prompts are prepended as in prompt tuning (passes/methods/prompt.py). A PEFT P-tuning
checkpoint holds only the encoder's output ``prompt_embeddings``, not E or the MLP, so a
loaded adapter is ``encoder: none``: the saved prompts are the learned tensor. (PEFT, loading
one with ``is_trainable=True``, puts a fresh random MLP on top of them, which changes the
model's outputs; peftc keeps them.)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import fx, nn

from peftc.errors import SpecError
from peftc.graph import Inserter
from peftc.passes.context import PassContext, PassResult
from peftc.passes.methods.prompt import PromptLearning, insert_virtual_tokens, prompt_learning_config
from peftc.passes.pipeline import register_method
from peftc.spec import MethodSpec

__all__ = ["PTuningSpec", "PromptEncoder", "rewrite"]

aten = torch.ops.aten
ENCODERS = ("mlp", "none")


@register_method("ptuning", peft_type="P_TUNING", store_dir="prompt_encoder", phase="prompt")
@dataclass(frozen=True)
class PTuningSpec(PromptLearning):
    """``tokens``: P; ``encoder``: "mlp" (PEFT's prompt encoder) or "none" (prompts trained
    directly); ``hidden``: the MLP width (None = the model's embedding width, PEFT's default)."""

    inserts_tokens: ClassVar[bool] = True  # P virtual tokens ahead of the input ids
    tokens: int = 20
    encoder: str = "mlp"
    hidden: int | None = None

    def __post_init__(self):
        self.check_tokens()
        if self.encoder not in ENCODERS:
            self.reject("encoder", f"one of {list(ENCODERS)} (PEFT's LSTM encoder is not supported)")
        if self.hidden is not None and (isinstance(self.hidden, bool) or not isinstance(self.hidden, int)
                                        or self.hidden <= 0):
            self.reject("hidden", "an integer > 0, or null for the embedding width")

    @classmethod
    def from_peft(cls, cfg) -> list[MethodSpec]:
        cls.check_decoder_only(cfg)
        kind = str(cfg.get("encoder_reparameterization_type", "MLP")).upper().rpartition(".")[2]
        if kind != "MLP":
            raise SpecError("peft.encoder_reparameterization_type", kind, "MLP", "the LSTM encoder is not supported")
        return [cls(tokens=cfg["num_virtual_tokens"], hidden=cfg.get("encoder_hidden_size"))]

    @classmethod
    def to_peft(cls, entries, resolved, model) -> dict:
        (e,) = entries
        dim = model.get_input_embeddings().embedding_dim
        return {**prompt_learning_config(model, e.tokens), "peft_type": "P_TUNING",
                "encoder_reparameterization_type": "MLP", "encoder_hidden_size": e.hidden or dim,
                "encoder_num_layers": 2, "encoder_dropout": 0.0}

    def checkpoint_form(self) -> PTuningSpec:
        return dataclasses.replace(self, encoder="none")

    def make_module(self, word: nn.Embedding) -> nn.Module:
        return PromptEncoder(self.tokens, word, self.hidden, self.encoder)

    def prompt_nodes(self, ins: Inserter, path: str) -> fx.Node:
        h = ins.get_attr(f"{path}.embedding.weight")
        if self.encoder == "mlp":
            for i in (0, 2, 4):
                w, b = ins.get_attr(f"{path}.mlp_head.{i}.weight"), ins.get_attr(f"{path}.mlp_head.{i}.bias")
                h = ins.call(aten.linear.default, (h, w, b), f"mlp{i}")
                if i < 4:
                    h = ins.call(aten.relu.default, (h,), f"relu{i}")
        return h

    @classmethod
    def rewrite(cls, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        """Pre: a decoder-only graph with ``input_ids``. Post: P prompts from the encoder prepended."""
        return insert_virtual_tokens(gm, ctx, cls)


class PromptEncoder(nn.Module):
    """E (+ the MLP head), PEFT's names; its checkpoint is the prompts it produces."""

    def __init__(self, tokens: int, word: nn.Embedding, hidden: int | None, encoder: str):
        super().__init__()
        d = word.embedding_dim
        kw = {"device": word.weight.device}
        self.embedding = nn.Embedding(tokens, d, **kw)
        if encoder == "mlp":
            h = hidden or d
            self.mlp_head = nn.Sequential(nn.Linear(d, h, **kw), nn.ReLU(), nn.Linear(h, h, **kw), nn.ReLU(),
                                          nn.Linear(h, d, **kw))

    def peft_tensors(self) -> dict[str, torch.Tensor]:
        """PEFT's ``prompt_embeddings``: the encoder's output (a leaf, loadable, without MLP)."""
        e = self.embedding.weight
        return {"prompt_embeddings": self.mlp_head(e) if hasattr(self, "mlp_head") else e}


rewrite = PTuningSpec.rewrite
