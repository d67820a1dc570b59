"""HF PEFT's adapter dtypes (``autocast_adapter_dtype``), as explicit nodes in the graph.

What PEFT does on a bf16 / fp16 base (``tuners_utils.cast_adapter_dtype``, ``lora/layer.py``):

    parameters  created like the base weight, then every float16/bfloat16 (and float8) tensor
                of the adapter upcast to float32 (the default, ``autocast_adapter_dtype=True``)
    LoRA-like   x' = x.to(A.dtype); term = f(x') in fp32; y = (y_base + term).to(y_base.dtype)
                (the add runs after type promotion, i.e. in fp32; LoRA, DoRA, VeRA, LoHa, LoKr)
    IA3         out: (y * l).to(y.dtype)      feedforward: linear((x.to(l.dtype) * l).to(x.dtype))
    prompts     prompt / prefix / p-tuning encoders are float32 whatever the option (PEFT builds them
                in the default dtype and never casts them); their output is cast to the model's dtype
                where it joins it (passes/methods/prompt.py, passes/methods/prefix.py)

``autocast_adapter_dtype: false`` (spec field, or the same key in an adapter_config.json) keeps the
adapters of the linear methods in the base dtype: no cast node is inserted. The policy picks the
dtype an adapter is created in; the graph then casts to the adapter's dtype as it is when a call
is captured (``module_dtype``, PEFT's ``x.to(lora_A.weight.dtype)``), so ``cm.to(dtype)`` (which
re-captures) moves adapters and base together, as ``PeftModel.to`` does. On a float32 base both
policies are the same graph. The rewrites insert the casts as ``aten.to.dtype`` nodes with roles
``cast_in`` / ``cast_out`` / ``cast_weight``, so ``graph_diff()`` shows them and the fusion pass can
match through them; ``note`` writes one ``graph_summary()`` line per adapter naming the policy.
"""

from __future__ import annotations

from collections import Counter

import torch
from torch import fx, nn

from peftc.graph import PEFTC, SUMMARY_LINES, Inserter

__all__ = ["UPCAST", "UPCAST_COUNT", "adapter_dtype", "module_dtype", "upcast_module", "cast", "node_dtype", "note", "count_site",
           "is_cast", "CAST_ROLES", "FIELD"]

aten = torch.ops.aten
FIELD = "autocast_adapter_dtype"  # the spec / adapter_config.json key, PEFT's argument name
# PEFT's dtypes_to_convert_to_fp32: fp16, bf16 and the float8 types this torch has
UPCAST = frozenset({torch.float16, torch.bfloat16} | {
    d for n in ("float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz", "float8_e8m0fnu")
    if (d := getattr(torch, n, None)) is not None})
CAST_ROLES = ("cast_in", "cast_out", "cast_weight")
UPCAST_COUNT = "upcast"  # ctx.counts key: linear sites whose adapter path runs in float32 on a lower base


def adapter_dtype(base: torch.dtype, autocast: bool) -> torch.dtype:
    """The dtype adapter weights of a layer with ``base`` weights get (and compute in)."""
    return torch.float32 if autocast and base in UPCAST else base


def upcast_module(module: nn.Module, autocast: bool) -> nn.Module:
    """PEFT's ``cast_adapter_dtype`` on one new adapter module: its float16/bfloat16 parameters
    and buffers become float32 (values as created, so an init in the base dtype is kept)."""
    if not autocast:
        return module
    for owner in module.modules():
        for name, p in list(owner.named_parameters(recurse=False)):
            if p.dtype in UPCAST:
                setattr(owner, name, nn.Parameter(p.detach().to(torch.float32), requires_grad=p.requires_grad))
        for name, b in list(owner.named_buffers(recurse=False)):
            if b.dtype in UPCAST:
                owner.register_buffer(name, b.to(torch.float32), persistent=name not in owner._non_persistent_buffers_set)
    return module


def module_dtype(module: nn.Module, default: torch.dtype) -> torch.dtype:
    """The dtype an adapter module computes in: its first floating parameter's (PEFT reads
    ``lora_A.weight.dtype``), else ``default``."""
    return next((p.dtype for p in module.parameters() if p.dtype.is_floating_point), default)


def node_dtype(node, default: torch.dtype) -> torch.dtype:
    """A graph node's dtype as traced (``meta["val"]``), else ``default``."""
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return val.dtype if isinstance(val, torch.Tensor) else default


def cast(ins: Inserter, node: fx.Node, dtype: torch.dtype, role: str) -> fx.Node:
    """``node.to(dtype)`` as an inserted node (``aten.to.dtype``: a no-op when already so)."""
    return ins.call(aten.to.dtype, (node, dtype), role)


def _base_dtype(model: nn.Module) -> torch.dtype | None:
    counts = Counter(p.dtype for p in model.parameters() if p.dtype.is_floating_point)
    return counts.most_common(1)[0][0] if counts else None


def note(gm: fx.GraphModule, ctx, *, prompts: bool = False) -> None:
    """(Re)writes this adapter's dtype line in ``gm.meta[SUMMARY_LINES]`` (one per adapter):
    the policy, the base and adapter dtypes, and how many sites compute upcast."""
    adapter, autocast = ctx.spec.adapter, getattr(ctx.spec, FIELD, True)
    base = _base_dtype(ctx.model)
    mine = sorted({str(p.dtype).removeprefix("torch.") for n, p in ctx.store.named_parameters()
                   if f".{adapter}." in f".{n}"})
    name = lambda d: str(d).removeprefix("torch.")
    head = f"dtypes (adapter {adapter!r}): {FIELD}={str(autocast).lower()}"
    parts = [f"base {name(base)}", f"adapter weights {'/'.join(mine) or 'none'}"]
    sites = ctx.counts.get(f"{UPCAST_COUNT}:{adapter}", 0)  # counts are shared by every adapter of a graph
    if sites:
        parts.append(f"{sites} linear sites compute in float32 (input cast up, output cast back to {name(base)})")
    elif base in UPCAST and not autocast:
        parts.append("adapters kept in the base dtype (no casts)")
    if prompts:
        parts.append("prompt encoders float32 as in PEFT, cast to the embeddings' dtype where they join")
    line = f"{head}: " + "; ".join(parts)
    lines = [x for x in gm.meta.get(SUMMARY_LINES, []) if not x.startswith(head.split(":")[0] + ":")]
    gm.meta[SUMMARY_LINES] = [*lines, line]


def count_site(ctx) -> None:
    """One more linear site whose adapter path runs upcast (for ``note``): in all, and per adapter."""
    ctx.counts[UPCAST_COUNT] += 1
    ctx.counts[f"{UPCAST_COUNT}:{ctx.spec.adapter}"] += 1


def is_cast(node, role: str | None = None) -> bool:
    """Whether ``node`` is a dtype cast a rewrite inserted (of ``role``, if given)."""
    info = node.meta.get(PEFTC) if isinstance(node, fx.Node) else None
    return bool(info) and node.target is aten.to.dtype and (info.get("role") in CAST_ROLES if role is None
                                                             else info.get("role") == role)

