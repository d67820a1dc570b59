"""Prefix tuning (Li & Liang 2021) as graph nodes, with HF PEFT's numerics.

    E (P, L*2*D) learned  (or  E' (P, D) -> Linear Tanh Linear -> (P, L*2*D): ``projection``)
    layer l:  k -> [E_k(l) ; k],  v -> [E_v(l) ; v],  mask -> [1 ; mask],  positions -> positions + P

PEFT feeds the prefix in as ``past_key_values``: per layer P cached keys/values (not rotated),
the attention mask widened by P ones, and the queries' positions shifted by P. In the graph
that is: concatenate the prefix at every attention node's k and v inputs (where k is already
rotated and already repeated for grouped-query attention, so the prefix is repeated the same
way), widen the explicit mask by P always-visible columns, and add P to the position ids
that feed the rotary embedding or a learned position-embedding table. No model-specific code:
attention nodes, rotary nodes and position tables are found in the graph.

``gate: true`` is UniPELT's gated prefix as AdapterHub computes it (one shared gate per layer):
``E_k(l), E_v(l) -> g_l(x) E_k(l), g_l(x) E_v(l)``, ``g_l(x) = mean_seq sigmoid(x W_l^T + b_l)``
per sample, ``x`` the token states entering layer l's query projection.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import partial

import torch
from torch import fx, nn

from peftc.errors import PeftcError
from peftc.graph import PEFTC, Inserter, mount_adapter, stack_owner
from peftc.model_family import kv_geometry
from peftc.passes import dtype_policy
from peftc.passes.context import PassContext, PassResult
from peftc.passes.methods.gates import attention_input, init_gate, insert_gate
from peftc.passes.methods.prompt import PromptLearning, prompt_learning_config, prompt_learning_entry
from peftc.passes.pipeline import register_method
from peftc.spec import MethodSpec

__all__ = ["PrefixSpec", "PrefixEncoder", "rewrite"]

aten = torch.ops.aten
SDPA = aten.scaled_dot_product_attention.default


@register_method("prefix", peft_type="PREFIX_TUNING", store_dir="prompt_encoder", phase="prompt")
@dataclass(frozen=True)
class PrefixSpec(PromptLearning):
    """``tokens``: P prefix positions per layer; ``projection``: PEFT's prefix_projection MLP
    of width ``hidden`` (None = the key/value width); ``init``: "random" or "zero"."""

    tokens: int = 20
    projection: bool = False
    hidden: int | None = None
    init: str = "random"
    gate: bool = False

    def __post_init__(self):
        self.check_tokens()
        if not isinstance(self.projection, bool):
            self.reject("projection", "true or false")
        if self.hidden is not None and (isinstance(self.hidden, bool) or not isinstance(self.hidden, int)
                                        or self.hidden <= 0):
            self.reject("hidden", "an integer > 0, or null for the key/value width")
        if self.init not in ("random", "zero"):
            self.reject("init", "'random' or 'zero' (PEFT's init_weights='zero')")
        if not isinstance(self.gate, bool):
            self.reject("gate", "true or false")

    @classmethod
    def from_peft(cls, cfg) -> list[MethodSpec]:
        cls.check_decoder_only(cfg)
        return [cls(tokens=cfg["num_virtual_tokens"], projection=bool(cfg.get("prefix_projection", False)),
                    hidden=cfg.get("encoder_hidden_size"), init="zero" if cfg.get("init_weights") == "zero" else "random")]

    @classmethod
    def to_peft(cls, entries, resolved, model) -> dict:
        (e,) = entries
        if e.gate:
            raise PeftcError("a gated prefix (UniPELT) has no HF PEFT checkpoint format")
        layers, heads, head_dim = kv_geometry(model)
        return {**prompt_learning_config(model, e.tokens), "peft_type": "PREFIX_TUNING",
                "token_dim": heads * head_dim, "num_attention_heads": heads, "num_layers": layers,
                "prefix_projection": e.projection, "encoder_hidden_size": e.hidden or heads * head_dim,
                "init_weights": "zero" if e.init == "zero" else None}

    def checkpoint_form(self) -> PrefixSpec:
        """A PEFT checkpoint holds the projected prefix (P, L*2*D), not the MLP that made it."""
        return dataclasses.replace(self, projection=False)

    @classmethod
    def rewrite(cls, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        return rewrite(gm, ctx)


class PrefixEncoder(nn.Module):
    """E (+ PEFT's ``transform``), PEFT's names; its checkpoint is the prefix it produces."""

    def __init__(self, tokens: int, layers: int, width: int, projection: bool, hidden: int | None,
                 init: str, like: torch.Tensor, gate_inputs: int | None = None):
        super().__init__()
        kw = {"device": like.device}
        if projection:
            self.embedding = nn.Embedding(tokens, width, **kw)
            h = hidden or width
            self.transform = nn.Sequential(nn.Linear(width, h, **kw), nn.Tanh(), nn.Linear(h, layers * 2 * width, **kw))
            if init == "zero":
                nn.init.zeros_(self.transform[2].weight)
                nn.init.zeros_(self.transform[2].bias)
        else:
            self.embedding = nn.Embedding(tokens, layers * 2 * width, **kw)
            if init == "zero":
                nn.init.zeros_(self.embedding.weight)
        if gate_inputs:  # UniPELT: one gate per layer, AdapterHub's init
            self.gates = nn.ModuleList(nn.Linear(gate_inputs, 1, **kw) for _ in range(layers))
            for g in self.gates:
                init_gate(g, zero_bias=False)

    def prefix(self) -> torch.Tensor:
        e = self.embedding.weight
        return self.transform(e) if hasattr(self, "transform") else e

    def peft_tensors(self) -> dict[str, torch.Tensor]:
        return {"prompt_embeddings": self.prefix()}


def rewrite(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    """Pre: a decoder-only graph, one SDPA node per layer with an explicit mask.
    Post: every attention sees P learned keys/values first; query positions start at P."""
    entry = prompt_learning_entry(gm, ctx, PrefixSpec)
    if entry is None:
        return PassResult(gm, False)
    layers, kv_heads, head_dim = kv_geometry(ctx.model)
    attn = [n for n in gm.graph.nodes if n.target is SDPA]
    if len(attn) != layers:
        raise PeftcError(f"prefix tuning expects one attention node per layer ({layers}); found {len(attn)}"
                         " (encoder-decoder models are not supported)")
    p, adapter = entry.tokens, ctx.spec.adapter
    like = next(iter(ctx.model.parameters()))
    path = mount_adapter(ctx.store, gm, f"prompt_encoder.{adapter}", partial(
        PrefixEncoder, p, layers, kv_heads * head_dim, entry.projection, entry.hidden, entry.init, like,
        attention_input(attn[0]).meta["val"].shape[-1] if entry.gate else None))
    info = {"method": "prefix", "adapter": adapter, "module": "prompt_encoder"}

    ins = Inserter(attn[0], info, before=True)
    h = ins.get_attr(f"{path}.embedding.weight")
    if entry.projection:
        h = ins.call(aten.linear.default, (h, ins.get_attr(f"{path}.transform.0.weight"),
                                           ins.get_attr(f"{path}.transform.0.bias")), "proj0")
        h = ins.call(aten.tanh.default, (h,), "tanh")
        h = ins.call(aten.linear.default, (h, ins.get_attr(f"{path}.transform.2.weight"),
                                           ins.get_attr(f"{path}.transform.2.bias")), "proj2")
    h = ins.call(aten.view.default, (h, [p, layers * 2, kv_heads, head_dim]), "split_heads")
    kv = ins.call(aten.permute.default, (h, [1, 2, 0, 3]), "per_layer")  # (L*2, heads, P, Dh)

    widened: dict[fx.Node, fx.Node] = {}
    for layer, node in enumerate(attn):
        q, k, v = node.args[:3]
        mask = node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")
        if not isinstance(mask, fx.Node) or node.kwargs.get("is_causal"):
            raise PeftcError(f"attention node {node.name} has no explicit mask to widen by the prefix")
        at = Inserter(node, {**info, "module": stack_owner(node) or ""}, before=True)
        batch = at.call(aten.sym_size.int, (q, 0), "batch")
        rep = _heads(k) // kv_heads  # k arrives repeated for grouped-query attention
        if entry.gate:
            g = insert_gate(at, attention_input(node), f"{path}.gates.{layer}.weight", f"{path}.gates.{layer}.bias")
            g = at.call(aten.view.default, (g, [-1, 1, 1, 1]), "gate_view")
        new_kv = []
        for j, x in enumerate((k, v)):
            pre = at.call(aten.select.int, (kv, 0, 2 * layer + j), "prefix_k" if j == 0 else "prefix_v")
            if rep > 1:
                pre = at.call(aten.repeat_interleave.self_int, (pre, rep, 0), "repeat_kv")
            pre = at.call(aten.expand.default, (at.call(aten.unsqueeze.default, (pre, 0), "unsqueeze"),
                                                [batch, -1, -1, -1]), "expand")
            if entry.gate:
                pre = at.call(aten.mul.Tensor, (pre, g), "gated")
            pre = at.call(aten.to.dtype, (pre, _dtype(x)), "cast")
            new_kv.append(at.call(aten.cat.default, ([pre, x], 2), "concat_k" if j == 0 else "concat_v"))
        if mask not in widened:
            widened[mask] = _widen_mask(gm, mask, p, info)
        args = list(node.args)
        args[1], args[2] = new_kv
        if len(node.args) > 3:
            args[3] = widened[mask]
        else:
            node.kwargs = {**node.kwargs, "attn_mask": widened[mask]}
        node.args = tuple(args)
    shifted = _shift_positions(gm, ctx, p, info)
    if not shifted:
        raise PeftcError("prefix tuning found no position ids (rotary embedding or position table) to shift")
    ctx.counts["prefix"] += len(attn)
    dtype_policy.note(gm, ctx, prompts=True)  # float32 encoder, cast where it joins
    return PassResult(gm, True)


def _heads(node: fx.Node) -> int:
    return int(node.meta["val"].shape[1])


def _dtype(node: fx.Node) -> torch.dtype:
    return node.meta["val"].dtype if "val" in node.meta else torch.float32


def _widen_mask(gm: fx.GraphModule, mask: fx.Node, p: int, info: dict) -> fx.Node:
    """[visible]*P ++ mask along the key axis: True for a bool mask, 0 for an additive one."""
    ins = Inserter(mask, info)
    dims = [ins.call(aten.sym_size.int, (mask, d), "mask_size") for d in range(3)]
    fill = True if _dtype(mask) == torch.bool else 0.0
    pre = ins.call(aten.new_full.default, (mask, [*dims, p], fill), "mask_prefix")
    out = ins.call(aten.cat.default, ([pre, mask], -1), "widen_mask")
    return out


_INDEX_OPS = {aten.add.Tensor, aten.unsqueeze.default, aten.expand.default, aten.slice.Tensor, aten.view.default,
              aten.clamp.default,  # generation's step graph: positions = clamp(start + arange(s), 0)
              aten.reshape.default, aten.clone.default, aten._to_copy.default, aten.to.dtype}


def _from_arange(node: fx.Node, depth: int = 8) -> bool:
    """Position ids: an arange, or a ``position_ids`` buffer (BERT slices one), through index
    arithmetic only (a gather through them, as BERT's token types, is not a position)."""
    if node.target is aten.arange.default or node.target is aten.arange.start:
        return True
    if node.op == "get_attr" and str(node.target).endswith("position_ids"):
        return True
    return (depth > 0 and node.target in _INDEX_OPS
            and any(_from_arange(a, depth - 1) for a in node.all_input_nodes))


def _in_rotary(node: fx.Node) -> bool:
    return any("rotary" in str(cls).lower() for _, cls in node.meta.get("nn_module_stack", {}).values())


def _shift_positions(gm: fx.GraphModule, ctx: PassContext, p: int, info: dict) -> int:
    """positions -> positions + P where they enter a rotary embedding or a position table."""
    word = ctx.model.get_input_embeddings().weight
    uses = []
    for n in gm.graph.nodes:
        if n.op != "call_function" or PEFTC in n.meta:
            continue
        if n.target is aten.embedding.default:  # a learned position table (GPT-2's wpe)
            table, idx = n.args[:2]
            if table.op == "get_attr" and gm.get_parameter(table.target) is not word and _from_arange(idx):
                uses.append((n, idx))
        elif _in_rotary(n):
            for a in n.all_input_nodes:  # integer inputs entering the rotary module: position ids
                val = a.meta.get("val")
                if (isinstance(val, torch.Tensor) and not val.dtype.is_floating_point and not _in_rotary(a)
                        and _from_arange(a)):
                    uses.append((n, a))
    done = set()
    for user, pos in uses:
        if (user, pos) in done:
            continue
        done.add((user, pos))
        ins = Inserter(user, {**info, "module": stack_owner(user) or ""}, before=True)
        user.replace_input_with(pos, ins.call(aten.add.Tensor, (pos, p), "shift_positions"))
    return len(done)
