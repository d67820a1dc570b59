"""Fusion: each LoRA path and the linear it adapts become one ``peftc::lora_linear`` op.

    add(linear(x, W, b), mul(linear(linear(dropout(x, p, train), A), B), s))
        -> getitem(lora_linear(x, W, b, A, B, s, p, seed, train), 0)
    add(addmm(b, x, W), ...)   (GPT-2's Conv1D, W stored (in, out))
        -> getitem(lora_linear(x, t(W), b, A, B, s, p, seed, train), 0)

Pre: LoRA nodes as passes/lora.py inserts them (DoRA and mixed-batch paths are left alone:
their term is not ``s * B(A(.))``). Post: no LoRA node of a fused site remains; the op saves x
and the r-wide ``x A^T`` for backward and regenerates the dropout mask from ``seed`` (drawn per
call from the global RNG, so ``torch.manual_seed`` repeats a run) instead of storing drop(x).
The mask differs from the unfused graph's (another generator), so fused and unfused training
agree in distribution, and exactly with dropout off or in eval.

Settings (``optimize: {fuse: {...}}``): none yet; the pass fuses every site it can.
"""

from __future__ import annotations

import operator

import torch
from torch import fx

from peftc.capture import TRAIN_ARG
from peftc.graph import PEFTC
from peftc.passes.pipeline import PassContext, PassResult
from peftc.spec import register_optimization

__all__ = ["fuse", "match_lora", "seed_for"]

aten = torch.ops.aten


def seed_for(x: torch.Tensor, dropout: bool) -> torch.Tensor:
    """The op's seed: fresh from the global RNG when it may drop, else a constant."""
    from peftc.kernels.lora_linear import draw_seed

    return draw_seed(x.device) if dropout else torch.zeros((), dtype=torch.int64, device=x.device)


def _role(node, role: str) -> bool:
    info = node.meta.get(PEFTC) if isinstance(node, fx.Node) else None
    return bool(info) and info.get("method") == "lora" and info.get("role") == role


def _only_user(node: fx.Node, user: fx.Node) -> bool:
    return list(node.users) == [user]


def match_lora(add: fx.Node) -> dict | None:
    """The pieces of one unfused LoRA site ending at ``add``, or None if it is not one."""
    if not _role(add, "add") or add.target is not aten.add.Tensor:
        return None
    base, term = add.args[:2]
    if not (_role(term, "scale") and term.target is aten.mul.Tensor and _only_user(term, add)):
        return None
    up, scale = term.args
    if not (_role(up, "lora_B") and _only_user(up, term) and isinstance(scale, (int, float))):
        return None
    down, b_w = up.args
    if not (_role(down, "lora_A") and _only_user(down, up)):
        return None
    src, a_w = down.args
    p, drop = 0.0, None
    if _role(src, "dropout"):
        drop, (src, p, _) = src, src.args[:3]
        if not _only_user(drop, down):
            return None
    if not isinstance(base, fx.Node) or list(base.users) != [add] or PEFTC in base.meta:
        return None
    if base.target is aten.linear.default and base.args[0] is src:
        w, bias, transposed = base.args[1], base.args[2] if len(base.args) > 2 else None, False
    elif base.target is aten.addmm.default and base.args[1] is src and len(base.args) == 3 and not base.kwargs:
        bias, w, transposed = base.args[0], base.args[2], True
    else:
        return None
    return {"x": src, "w": w, "bias": bias, "transposed": transposed, "a": a_w, "b": b_w, "scale": float(scale),
            "p": float(p), "erase": [add, term, up, down, *([drop] if drop is not None else []), base],
            "base": base, "info": add.meta[PEFTC]}


@register_optimization("fuse")
def fuse(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    """Replaces every matched LoRA site by the fused op (see the module docstring)."""
    from peftc.kernels import lora_linear  # noqa: F401  (registers torch.ops.peftc.lora_linear)

    op = torch.ops.peftc.lora_linear.default
    n = 0
    for add in list(gm.graph.nodes):
        m = match_lora(add)
        if m is None:
            continue
        info = {**m["info"], "method": "fuse", "role": "lora_linear"}
        stack = m["base"].meta.get("nn_module_stack")
        with gm.graph.inserting_before(add):
            new = []
            w = m["w"]
            if m["transposed"]:
                w = gm.graph.call_function(aten.t.default, (w,))
                new.append(w)
            seed = gm.graph.call_function(seed_for, (m["x"], m["p"] > 0))
            fused = gm.graph.call_function(op, (m["x"], w, m["bias"], m["a"], m["b"], m["scale"], m["p"], seed, True))
            y = gm.graph.call_function(operator.getitem, (fused, 0))
            new += [seed, fused, y]
        fused.meta[TRAIN_ARG] = 8
        for node in new:
            node.meta[PEFTC] = {**info, "role": {fused: "lora_linear", y: "output", seed: "seed"}.get(node, "weight_t")}
            if stack:
                node.meta["nn_module_stack"] = dict(stack)
        add.replace_all_uses_with(y)
        for dead in m["erase"]:
            gm.graph.erase_node(dead)
        n += 1
    ctx.counts["fuse"] += n
    return PassResult(gm, n > 0)
