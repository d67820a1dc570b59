"""Fusion of the scaling methods: (IA)^3 and DoRA sites become one opaque op each.

    mul(linear(x, W, b), l)              -> getitem(ia3_linear(x, W, b, l, "out"), 0)
    linear(mul(x, l), W, b)              -> getitem(ia3_linear(x, W, b, l, "in"), 0)
    add(linear(x, W, b), dora(...))      -> getitem(dora_linear(x, W, b, A, B, m, s, p, seed, train), 0)
    (addmm(b, x, W) for GPT-2's Conv1D: the op gets t(W))

With HF PEFT's dtypes (passes/dtype_policy.py) the sites carry casts, matched too and erased with
the site: IA3 ``(y * l).to(y.dtype)`` / ``linear((x.to(l.dtype) * l).to(x.dtype))``; DoRA reads
``x.to(A.dtype)`` and its add is cast back. The ops get x, W in the base dtype and the adapter
tensors (A, B, m, l) as they are (fp32).

Matching reads only ``node.meta["peftc"]`` roles (as passes/methods/ia3.py and passes/methods/dora.py write
them) and the base linear's shape; a site whose intermediate nodes have users outside it
(e.g. stacked with another adapter) is left unfused. Pre: the unfused rewrite. Post: no node
of a fused site remains; outputs and gradients equal the unfused graph's (DoRA with dropout in
training agrees in distribution: the op draws its own mask from ``seed``, as the LoRA fusion).

Called from passes/optimize/fuse.py's ``fuse``; counts go to ``ctx.counts["fuse_ia3"]`` / ``["fuse_dora"]``.
Each returns, per site it looked at (``site_key``), None when fused or why not (``fuse``'s coverage):
the matchers' rejections as reasons (``ia3_site`` / ``dora_site``; ``match_*`` give None instead).
"""

from __future__ import annotations

import operator

import torch
from torch import fx

from peftc.graph import PEFTC, has_role
from peftc.passes.context import PassContext
from peftc.passes.dtype_policy import is_cast

__all__ = ["fuse_ia3", "fuse_dora", "match_ia3", "match_dora", "ia3_site", "dora_site", "is_dora_add", "seed_for", "site_key",
           "base_linear", "STACKED", "READ_OUTSIDE", "BASE_READ", "CASTS", "NOT_LINEAR", "FORM"]

aten = torch.ops.aten

# why a site is left unfused, after its kind ("LoRA", "DoRA", "IA3"): ``graph_summary()`` reads "2 DoRA <reason>"
STACKED = "stacked on another adapter's output has no fused op"
READ_OUTSIDE = "with a node read outside its site"
BASE_READ = "whose base output is also read outside the site"
CASTS = "with only part of PEFT's dtype casts (x.to(adapter dtype) read once, the sum cast back)"
NOT_LINEAR = "on an op other than aten.linear / Conv1D's addmm"
FORM = "not in the form its rewrite inserts"


def site_key(info: dict) -> tuple:
    """One adapter site: (method, adapter, module, site) of the peftc meta of any of its nodes."""
    return info.get("method"), info.get("adapter"), info.get("module"), info.get("site")


def seed_for(x: torch.Tensor, dropout: bool) -> torch.Tensor:
    """A fused op's dropout seed: fresh from the global RNG when it may drop, else a constant."""
    from peftc.kernels.common import draw_seed, zero_seed  # kernels load on first fusion, not on import

    return draw_seed(x.device) if dropout else zero_seed(x.device)


def base_linear(node) -> dict | str:
    """x, W, bias of an un-annotated linear / Conv1D addmm node, else why not (``STACKED`` when it
    is another adapter's node, ``NOT_LINEAR``)."""
    if isinstance(node, fx.Node) and PEFTC in node.meta:
        return STACKED
    if not isinstance(node, fx.Node) or node.op != "call_function" or node.kwargs:
        return NOT_LINEAR
    if node.target is aten.linear.default:
        return {"x": node.args[0], "w": node.args[1], "bias": node.args[2] if len(node.args) > 2 else None,
                "transposed": False}
    if node.target is aten.addmm.default and len(node.args) == 3:
        return {"x": node.args[1], "w": node.args[2], "bias": node.args[0], "transposed": True}
    return NOT_LINEAR


def match_ia3(mul: fx.Node) -> dict | None:
    """The pieces of one IA3 site whose scaling ``mul`` this is, or None."""
    if mul.target is not aten.mul.Tensor or not has_role(mul, "ia3", "scale_output", "scale_input"):
        return None
    m = ia3_site(mul)
    return m if isinstance(m, dict) else None


def ia3_site(mul: fx.Node) -> dict | str:
    """The pieces of the IA3 site whose scaling ``mul`` (role scale_output / scale_input) this is, or
    why it does not fuse ("IA3 <reason>")."""
    src, vec = mul.args
    if not has_role(vec, "ia3", "flatten"):
        return f"IA3 {FORM}"
    users = list(mul.users)
    back = users[0] if len(users) == 1 and is_cast(users[0], "cast_out") else None  # PEFT's .to(base dtype)
    if has_role(mul, "ia3", "scale_output"):
        base = base_linear(src)
        if isinstance(base, str):
            return f"IA3 {base}"
        if list(src.users) != [mul]:
            return f"IA3 {BASE_READ}"
        anchor = back or mul
        return {**base, "vec": vec, "mode": "out", "anchor": anchor, "erase": [*([back] if back else []), mul, src],
                "site": src}
    up = None
    if is_cast(src, "cast_in"):  # x.to(l.dtype) * l, cast back before the linear
        if back is None or list(src.users) != [mul]:
            return f"IA3 {CASTS}"
        up, src = src, src.args[0]
    reader = back or mul
    users = list(reader.users)
    if len(users) != 1:
        return f"IA3 {READ_OUTSIDE}"
    base = base_linear(users[0])
    if isinstance(base, str):
        return f"IA3 {base}"
    if base["x"] is not reader:
        return f"IA3 {FORM}"
    return {**base, "x": src, "vec": vec, "mode": "in", "anchor": users[0],
            "erase": [users[0], *([back] if back else []), mul, *([up] if up else [])], "site": users[0]}


def is_dora_add(add: fx.Node) -> bool:
    """Whether ``add`` is a LoRA add whose term is DoRA's (``dora_site`` matches it, not fuse's LoRA matcher)."""
    return has_role(add, "lora", "add") and len(add.args) > 1 and has_role(add.args[1], "lora", "dora")


def match_dora(add: fx.Node) -> dict | None:
    """The pieces of one unfused DoRA site ending at the LoRA ``add``, or None."""
    if add.target is not aten.add.Tensor or not is_dora_add(add):
        return None
    m = dora_site(add)
    return m if isinstance(m, dict) else None


def dora_site(add: fx.Node) -> dict | str:
    """The pieces of the DoRA site ending at the LoRA ``add`` (``is_dora_add``), or why it does not
    fuse ("DoRA <reason>").

    The site: dropout? -> lora_A -> lora_B; m / detach(||W + s B A||) as a row; the base term
    (the linear itself, ``y - b``, or the recompute on the dropped input) times mn - 1; plus
    mn * lora_B * s.
    """
    form = f"DoRA {FORM}"
    y, term = add.args[:2]
    base = base_linear(y)
    if isinstance(base, str):
        return f"DoRA {base}"
    t1, t2 = term.args
    if not (has_role(t1, "lora", "dora_base") and has_role(t2, "lora", "scale")):
        return form
    minus1, base_term = t1.args
    dl, scale = t2.args
    if not (has_role(minus1, "lora", "mag_minus_one") and has_role(dl, "lora", "dora_lora")
            and isinstance(scale, (int, float))):
        return form
    mag, up = dl.args
    if not (has_role(mag, "lora", "mag_row") and has_role(up, "lora", "lora_B") and minus1.args[0] is mag):
        return form
    div = mag.args[0]
    detach = div.args[1] if has_role(div, "lora", "mag_norm_scale") else None
    norm = detach.args[0] if has_role(detach, "lora", "detach_norm") else None
    adapted = norm.args[0] if has_role(norm, "lora", "weight_norm") else None
    if adapted is None or not has_role(adapted, "lora", "adapted_weight"):
        return form
    scaled = adapted.args[1]
    delta = scaled.args[0] if has_role(scaled, "lora", "scale_delta") else None
    down, b_w = up.args
    if not (has_role(delta, "lora", "delta_weight") and has_role(down, "lora", "lora_A")):
        return form
    src, a_w = down.args
    p, train, drop = 0.0, False, None
    if has_role(src, "lora", "dropout"):
        drop, (src, p, train) = src, src.args[:3]
    up_x, back = None, None
    if is_cast(src, "cast_in"):  # PEFT's autocast: x.to(A.dtype) in, (y + term).to(y.dtype) out
        users = list(add.users)
        if len(users) != 1 or not is_cast(users[0], "cast_out"):
            return f"DoRA {CASTS}"
        up_x, back, src = src, users[0], src.args[0]
    if src is not base["x"]:
        return form
    w = adapted.args[0]  # (out, in): the weight itself, or t(W) for Conv1D
    if base["transposed"] and not (has_role(w, "lora", "weight_t") and w.args[0] is base["w"]):
        return form
    if not base["transposed"] and w is not base["w"]:
        return form
    nodes = [*([back] if back else []), add, term, t1, t2, minus1, dl, mag, div, detach, norm, adapted, scaled,
             delta, up, down, *([drop] if drop is not None else []), *([up_x] if up_x else []), y]
    if base_term is not y:
        if has_role(base_term, "lora", "base_no_bias"):
            ok = base_term.args == (y, base["bias"])
        else:
            wx = base_term.args[1]
            cast_w = wx if is_cast(wx, "cast_weight") and wx.args[0] is w else None
            ok = (has_role(base_term, "lora", "base_recompute") and base_term.args[0] is (drop or up_x or src)
                  and (wx is w or cast_w is not None))
            nodes += [cast_w] if cast_w is not None else []
        if not ok:
            return form
        nodes.append(base_term)
    inside = set(nodes) | ({w} if base["transposed"] else set())
    if any(u not in inside for n in nodes[1:] for u in n.users):  # only the add leaves the site
        return f"DoRA {BASE_READ}" if any(u not in inside for u in y.users) else f"DoRA {READ_OUTSIDE}"
    return {**base, "w": w, "a": a_w, "b": b_w, "m": div.args[0], "scale": float(scale), "p": float(p),
            "train": bool(train), "erase": nodes, "info": add.meta[PEFTC], "site": y, "anchor": nodes[0]}


def _erase(gm: fx.GraphModule, nodes) -> None:
    """Erase a fused site's nodes, users first."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    for node in sorted(nodes, key=order.__getitem__, reverse=True):
        gm.graph.erase_node(node)


def _replace(gm: fx.GraphModule, m: dict, op, args_of, role: str) -> fx.Node:
    """Insert ``op`` (plus t(W) for Conv1D when the match has none) before the site's last node,
    route its users to ``getitem(op, 0)``, erase the site; new nodes get meta and module stack."""
    info = {**m["info"], "method": "fuse", "role": role}
    stack = m["site"].meta.get("nn_module_stack")
    anchor, g = m["anchor"], gm.graph
    new = []
    with g.inserting_before(anchor):
        w = m["w"]
        if m["transposed"]:  # the op takes W as (out, in): reuse the site's t(W) or add one
            w = g.call_function(aten.t.default, (w,)) if w is m.get("raw_w") else w
            new.append((w, "weight_t"))
        extra = args_of(g, new)
        fused = g.call_function(op, (m["x"], w, m["bias"], *extra))
        y = g.call_function(operator.getitem, (fused, 0))
    for node, r in [*new, (fused, role), (y, "output")]:
        node.meta[PEFTC] = {**info, "role": r}
        if stack:
            node.meta["nn_module_stack"] = dict(stack)
    anchor.replace_all_uses_with(y)
    _erase(gm, m["erase"])
    return fused


def fuse_ia3(gm: fx.GraphModule, ctx: PassContext) -> dict[tuple, str | None]:
    """Replaces every matched IA3 site by ``peftc::ia3_linear``; returns, per IA3 site (``site_key``),
    None when fused, else why not."""
    from peftc.kernels import ia3_linear  # noqa: F401  (registers torch.ops.peftc.ia3_linear)

    outcome = {}
    for node in list(gm.graph.nodes):
        if node.target is not aten.mul.Tensor or not has_role(node, "ia3", "scale_output", "scale_input"):
            continue
        info = node.meta[PEFTC]
        m = ia3_site(node)
        outcome[site_key(info)] = m if isinstance(m, str) else None
        if isinstance(m, str):
            continue
        _replace(gm, {**m, "raw_w": m["w"], "info": info}, torch.ops.peftc.ia3_linear.default,
                 lambda g, new, m=m: (m["vec"], m["mode"]), "ia3_linear")
    ctx.counts["fuse_ia3"] += sum(r is None for r in outcome.values())
    return outcome


def fuse_dora(gm: fx.GraphModule, ctx: PassContext) -> dict[tuple, str | None]:
    """Replaces every matched DoRA site by ``peftc::dora_linear``; returns, per DoRA site
    (``site_key``), None when fused, else why not.

    The op's train flag starts as the LoRA dropout node's and is flipped by ``set_training``
    (the op registers its ``train`` argument); its dropout seed is drawn per call, as for the fused LoRA op.
    """
    from peftc.kernels import dora_linear  # noqa: F401  (registers torch.ops.peftc.dora_linear)

    outcome = {}
    for node in list(gm.graph.nodes):
        if node.target is not aten.add.Tensor or not is_dora_add(node):
            continue
        m = dora_site(node)
        outcome[site_key(node.meta[PEFTC])] = m if isinstance(m, str) else None
        if isinstance(m, str):
            continue

        def args_of(g, new, m=m):
            seed = g.call_function(seed_for, (m["x"], m["p"] > 0))
            new.append((seed, "seed"))
            return m["a"], m["b"], m["m"], m["scale"], m["p"], seed, m["train"]

        _replace(gm, m, torch.ops.peftc.dora_linear.default, args_of, "dora_linear")
    ctx.counts["fuse_dora"] += sum(r is None for r in outcome.values())
    return outcome
