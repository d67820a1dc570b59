"""Prompt tuning (Lester et al. 2021) as graph nodes, with HF PEFT's numerics.

    ids -> [0]*P ++ ids,  mask -> [1]*P ++ mask,  labels -> [-100]*P ++ labels
    embed(ids)[:, :P] -> prompt (P, D), expanded over the batch

Every token-aligned input is widened by P at its placeholder, so each size the graph derives
from them (positions, causal mask, views) grows by itself; then the P placeholder
embeddings are replaced by the learned ones. Logits keep the P virtual positions, as PEFT's.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import ClassVar

import torch
from torch import fx, nn

from peftc.errors import PeftcError, SpecError
from peftc.graph import PEFTC, Inserter, fetch_attr, mount_adapter
from peftc.passes import dtype_policy
from peftc.passes.context import PassContext, PassResult
from peftc.passes.pipeline import register_method
from peftc.spec import MethodSpec, Sites

__all__ = ["PromptSpec", "PromptEmbedding", "rewrite", "insert_virtual_tokens", "prompt_learning_config", "PromptLearning",
           "prompt_learning_entry"]

aten = torch.ops.aten
PAD = {"input_ids": 0, "attention_mask": 1, "labels": -100}  # fill of the P widened positions


@dataclass(frozen=True)
class PromptLearning(MethodSpec):
    """Base of the prompt-learning methods (prompt tuning, P-tuning, prefix tuning): graph-level,
    one per adapter, saved without PEFT's tuner-layer ``.model`` in the keys."""

    sites: ClassVar[Sites] = Sites.GRAPH
    peft_prefix: ClassVar[str] = "base_model."
    widens_labels: ClassVar[bool] = True  # P virtual positions of -100 ahead of the labels

    def check_tokens(self) -> None:
        if isinstance(self.tokens, bool) or not isinstance(self.tokens, int) or self.tokens <= 0:
            self.reject("tokens", "an integer > 0")

    @staticmethod
    def check_decoder_only(cfg) -> None:
        """A PEFT config for an encoder-decoder prompt (two transformer submodules) is refused."""
        if cfg.get("num_transformer_submodules", 1) not in (1, None):
            raise SpecError("peft.num_transformer_submodules", cfg["num_transformer_submodules"], "1 (decoder-only)")


@register_method("prompt", peft_type="PROMPT_TUNING", store_dir="prompt_encoder", phase="prompt")
@dataclass(frozen=True)
class PromptSpec(PromptLearning):
    """``tokens``: number of virtual tokens P; ``init``: "random" or "sample_vocab"."""

    inserts_tokens: ClassVar[bool] = True  # P virtual tokens ahead of the input ids
    tokens: int = 20
    init: str = "random"

    def __post_init__(self):
        self.check_tokens()
        if self.init not in ("random", "sample_vocab"):
            self.reject("init", "'random' or 'sample_vocab' ('text' needs a tokenizer download)")

    @classmethod
    def from_peft(cls, cfg) -> list[MethodSpec]:
        cls.check_decoder_only(cfg)
        init = str(cfg.get("prompt_tuning_init", "RANDOM")).upper().rpartition(".")[2]
        if init not in ("RANDOM", "SAMPLE_VOCAB", "TEXT"):
            raise SpecError("peft.prompt_tuning_init", init, "RANDOM, SAMPLE_VOCAB or TEXT")
        # TEXT only changes the initial values, which a saved adapter overrides
        return [cls(tokens=cfg["num_virtual_tokens"], init="sample_vocab" if init == "SAMPLE_VOCAB" else "random")]

    @classmethod
    def to_peft(cls, entries, resolved, model) -> dict:
        (e,) = entries
        return {**prompt_learning_config(model, e.tokens), "peft_type": "PROMPT_TUNING",
                "prompt_tuning_init": e.init.upper(), "prompt_tuning_init_text": None,
                "tokenizer_name_or_path": None}

    def make_module(self, word: nn.Embedding) -> nn.Module:
        return PromptEmbedding(self.tokens, word, self.init)

    def prompt_nodes(self, ins: Inserter, path: str) -> fx.Node:
        return ins.get_attr(f"{path}.weight")

    @classmethod
    def rewrite(cls, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        """Pre: a captured decoder-only graph with an ``input_ids`` input. Post: P virtual tokens."""
        return insert_virtual_tokens(gm, ctx, cls)


def prompt_learning_config(model: nn.Module, tokens: int) -> dict:
    """The PEFT config fields every prompt-learning method shares (decoder-only)."""
    cfg = model.config
    return {"num_virtual_tokens": tokens, "token_dim": model.get_input_embeddings().embedding_dim,
            "num_transformer_submodules": 1, "num_attention_heads": getattr(cfg, "num_attention_heads", None),
            "num_layers": getattr(cfg, "num_hidden_layers", None)}


class PromptEmbedding(nn.Module):
    """P learned token embeddings; saved under PEFT's key ``prompt_embeddings``."""

    PEFT_KEYS = {"weight": "prompt_embeddings"}

    def __init__(self, tokens: int, word_embeddings: nn.Embedding, init: str):
        super().__init__()
        w = word_embeddings.weight
        if init == "sample_vocab":
            ids = torch.randint(0, w.shape[0], (tokens,), device=w.device)
            self.weight = nn.Parameter(w.detach()[ids].clone().float())
        else:  # nn.Embedding's default init, as PEFT's RANDOM
            self.weight = nn.Parameter(torch.randn(tokens, w.shape[1], device=w.device))


def prompt_learning_entry(gm: fx.GraphModule, ctx: PassContext, kind: type):
    """The adapter's one ``kind`` entry (None without one); prompt-learning methods share the
    ``prompt_encoder`` slot, so one per adapter and one active adapter."""
    entries = [m for m in ctx.spec.methods if isinstance(m, kind)]
    if not entries:
        return None
    if len(entries) > 1:
        raise PeftcError(f"one {entries[0].method} entry per adapter")
    if any(n.meta.get(PEFTC, {}).get("module") == "prompt_encoder" for n in gm.graph.nodes):
        raise PeftcError("only one prompt-learning adapter can be active at a time")
    return entries[0]


def insert_virtual_tokens(gm: fx.GraphModule, ctx: PassContext, kind: type) -> PassResult:
    """Widens the token inputs by P and prepends ``entry.prompt_nodes(...)`` (P, D) after the
    embedding lookup; shared by prompt tuning and P-tuning (which differ only in the source)."""
    entry = prompt_learning_entry(gm, ctx, kind)
    if entry is None:
        return PassResult(gm, False)
    p = entry.tokens
    placeholders = {n.target: n for n in gm.graph.nodes if n.op == "placeholder"}
    if "input_ids" not in placeholders:
        raise PeftcError(f"{entry.method} needs input_ids among the inputs; got {sorted(placeholders)}")
    bad = sorted(set(placeholders) & {"position_ids", "token_type_ids", "inputs_embeds", "decoder_input_ids"})
    if bad:
        raise PeftcError(f"{entry.method} does not support the inputs {bad} (PEFT ignores or refuses them)")
    word = ctx.model.get_input_embeddings()
    emb = [n for n in gm.graph.nodes if n.target is aten.embedding.default
           and n.args[0].op == "get_attr" and fetch_attr(gm, n.args[0].target) is word.weight]
    if len(emb) != 1:
        raise PeftcError(f"expected one lookup of the input embeddings, found {len(emb)}")
    adapter = ctx.spec.adapter
    path = mount_adapter(ctx.store, gm, f"prompt_encoder.{adapter}", partial(entry.make_module, word))
    info = {"method": entry.method, "adapter": adapter, "module": "prompt_encoder"}
    ids = placeholders["input_ids"]
    last_input = [n for n in gm.graph.nodes if n.op == "placeholder"][-1]
    ins = Inserter(last_input.next, info, before=True)
    batch = ins.call(aten.sym_size.int, (ids, 0), "batch")
    for name, fill in PAD.items():
        if name not in placeholders:
            continue
        ph = placeholders[name]
        pad = ins.call(aten.new_full.default, (ph, [batch, p], fill), "pad_" + name)
        wide = ins.call(aten.cat.default, ([pad, ph], 1), "widen_" + name)
        ph.replace_all_uses_with(wide, delete_user_cb=lambda u: u.op != "call_module" and u not in ins.nodes)
    (e,) = emb
    after = Inserter(e, info)
    prompt = entry.prompt_nodes(after, path)
    prompt = after.call(aten.to.dtype, (prompt, e.meta["val"].dtype if "val" in e.meta else torch.float32), "cast")
    prompt = after.call(aten.expand.default, (after.call(aten.unsqueeze.default, (prompt, 0), "unsqueeze"),
                                              [batch, -1, -1]), "expand")
    rest = after.call(aten.slice.Tensor, (e, 1, p), "drop_placeholders")
    out = after.call(aten.cat.default, ([prompt, rest], 1), "prepend")
    after.redirect(e, out)
    ctx.counts[entry.method] += 1
    dtype_policy.note(gm, ctx, prompts=True)  # float32 encoder, cast where it joins
    return PassResult(gm, True)


rewrite = PromptSpec.rewrite
