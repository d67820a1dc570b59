"""Quantization: frozen linear weights stored NF4, int4 or int8, read packed by the op that uses them.

    linear(x, W, b)  /  addmm(b, x, W)  (Conv1D)         -> quant_linear(x, Q(W), b)[0]
    lora_linear(x, W, b, A, B, s, p, seed, train)         -> quant_linear(x, Q(W), b, A, B, s, p, seed, train)
    lora_siblings(x, [W_i], ...)                          -> one quant_linear (or lora_linear) per sibling, same seed
    ia3_linear(x, W, b, l, "out" | "in")                  -> quant_linear(x, Q(W), b)[0] * l  |  quant_linear(x * l, ...)
    dora_linear(x, W, b, A, B, m, s, p, seed, train)      -> quant_dora_linear(x, Q(W), b, A, B, m, ...)
    add(W, s B A)  (unfused DoRA's adapted weight)        -> add(dequantize(Q(W)), s B A)     (a temporary)

Runs after ``fuse`` (phase ``quantize``), so it sees fused and unfused sites alike. Which weights:
every Linear / Conv1D of the model but ``skip`` (default: the output head and the modules a
``train`` entry trains whole; embeddings are not linears and stay as they are). A weight that some
other node reads too (a tied embedding) stays full precision and is listed in ``graph_summary()``.

Where Q(W) lives: one ``QuantizedWeight`` per weight in the adapter store at ``_quantize.<module>``,
shared by every captured graph and quantized once (the first graph built). The rewritten graph no
longer references W and the graph module drops its attribute, so the compiled model's own graphs
hold no full-precision copy. The user's model gives its quantized weights up by default
(``release_base: true``, QLoRA's point: a full-precision copy would hold 8x the bytes): once
quantized, each quantized parameter's storage is replaced by a zero-stride placeholder of the same
shape (one element), which frees the memory while later captures still see the right shapes; the
user's own forward then computes with zeros, and what would read those weights (``save_merged``,
``merge()`` without ``requantize``) refuses. ``release_base: false`` keeps them (8x the memory:
36 bits per weight held instead of 4.1 for nf4). ``quantize_base.weight_bytes(cm)`` measures both.

Settings (``optimize: {quantize: {...}}``): ``format`` (nf4 | int4 | int8 | int8g), ``block_size`` (64, nf4),
``double_quant`` (true, nf4), ``skip`` (selector list or ``re:``), ``release_base`` (true).
``ctx.counts``: ``quantize`` = weights read quantized in this graph, ``quantize_kept`` = left full
precision because another node reads them. Coverage (unit "frozen linear weights"): every Linear /
Conv1D weight the graph reads; each one skipped (the default head, a ``skip`` selector, a module
trained whole) or kept full precision is counted with why in ``graph_summary()``, e.g.
``quantize: 14 of 15 frozen linear weights: 1 output head (skipped by default)``.
"""

from __future__ import annotations

import functools
import operator

import torch
from torch import fx, nn

from peftc import targets as _targets
from peftc.errors import PeftcError, SpecError
from peftc.graph import PEFTC, install_module, mount_adapter, placeholder
from peftc.kernels.quant_formats import FORMATS, default_block, dequantize, quantize_weight
from peftc.passes.merge import STATE as MERGE_STATE
from peftc.passes.pipeline import PassContext, PassResult
from peftc.spec import check_targets

__all__ = ["quantize", "check_settings", "check_model", "plan", "QuantizedWeight", "QuantReport", "ROOT", "SETTINGS"]

aten = torch.ops.aten
ROOT = "_quantize"  # store path of the QuantizedWeight modules (and the report)
SETTINGS = {
    "format": "nf4, int4, int8 or int8g (default nf4)",
    "block_size": "an even integer >= 2 dividing every quantized layer's input width (default nf4 64, int4 32 = "
                  "GGUF's Q4_1, int8g 32 = GGUF's Q8_0; not for int8)",
    "double_quant": "true or false (default true; nf4 only): the absmax constants stored as int8",
    "skip": "module names / dotted suffixes or 're:<regex>' kept full precision (default: the output head)",
    "release_base": "true or false (default true): free the user's model's quantized parameters (false keeps "
                    "them: 8x the memory)",
    "shared_weights": "keep (default: a weight another op also reads, e.g. a head tied to the embedding, stays "
                      "full precision) or quantize (its linear reads use a quantized copy; the other reads keep "
                      "the full-precision weight, so both are held)",
}


def check_settings(settings) -> dict:
    """``optimize: {quantize: {...}}`` with defaults; a bad setting is a SpecError naming it."""
    for key, value in settings.items():
        if key not in SETTINGS:
            raise SpecError(f"optimize.quantize.{key}", value, f"one of {sorted(SETTINGS)}", "unknown quantize setting")
    fmt = settings.get("format", "nf4")
    if fmt not in FORMATS:
        raise SpecError("optimize.quantize.format", fmt, SETTINGS["format"])
    out = {"format": fmt, "block_size": default_block(fmt), "double_quant": fmt == "nf4", "skip": None,
           "release_base": True, "shared_weights": "keep", **settings}
    if out["shared_weights"] not in ("keep", "quantize"):
        raise SpecError("optimize.quantize.shared_weights", out["shared_weights"], SETTINGS["shared_weights"])
    bs = out["block_size"]
    if isinstance(bs, bool) or not isinstance(bs, int) or bs < 2 or bs % 2:
        raise SpecError("optimize.quantize.block_size", bs, SETTINGS["block_size"])
    for key in ("double_quant", "release_base"):
        if not isinstance(out[key], bool):
            raise SpecError(f"optimize.quantize.{key}", out[key], SETTINGS[key])
    if fmt == "int8" and "block_size" in settings:
        raise SpecError("optimize.quantize.block_size", settings["block_size"], "unset for int8",
                        "int8 has one absmax per output channel")
    if fmt != "nf4" and "double_quant" in settings:
        raise SpecError("optimize.quantize.double_quant", settings["double_quant"], f"unset for {fmt}",
                        "double quantization applies to nf4's absmax constants")
    skip = out["skip"]
    if skip is not None and not (isinstance(skip, (list, tuple)) and not skip):
        out["skip"] = check_targets("optimize.quantize.skip", skip)
    elif skip is not None:
        out["skip"] = ()
    return out


def _trained_whole(spec, resolved) -> list[tuple[int, str]]:
    return [(i, p) for i, (m, t) in enumerate(zip(spec.methods, resolved)) if m.method == "train" for p in t]


def plan(model: nn.Module, settings: dict, spec, resolved) -> dict[str, str]:
    """Module path -> kind ("linear" | "conv1d") of every weight to quantize; SpecErrors as ``check_model``."""
    return _select(model, settings, spec, resolved)[0]


def _select(model: nn.Module, settings: dict, spec, resolved) -> tuple[dict[str, str], dict[str, str]]:
    """(path -> kind of every weight to quantize, path -> why of every other Linear / Conv1D)."""
    kinds = {n: k for n, m in model.named_modules() if n and (k := _targets.linear_kind(m))}
    trained = _trained_whole(spec, resolved)
    under = lambda p, q: p == q or p.startswith(q + ".")
    skip = settings["skip"]
    if skip is None:  # the output head, and what a method trains whole
        get_out = getattr(model, "get_output_embeddings", None)
        head = get_out() if callable(get_out) else None
        heads = {n for n, m in model.named_modules() if head is not None and m is head}
        heads |= set(_targets.seq_cls_heads(model))
        left = {p: "output head (skipped by default)" for p in kinds if p in heads}
        left |= {p: "trained whole by a train entry" for p in kinds
                 if p not in left and any(under(p, q) for _, q in trained)}
        return {p: k for p, k in kinds.items() if p not in left}, left
    names = [n for n, _ in model.named_modules() if n]
    matched = set(_targets.match_names(skip, names)) if skip else set()
    if skip and not matched:
        raise _targets.no_match("optimize.quantize.skip", skip, names)
    left = {p: "in optimize.quantize.skip" for p in kinds if any(under(p, q) for q in matched)}
    chosen = {p: k for p, k in kinds.items() if p not in left}
    for i, q in trained:
        hit = [p for p in chosen if under(p, q)]
        if hit:
            raise SpecError("optimize.quantize.skip", list(skip) if not isinstance(skip, str) else skip,
                            "selectors that also cover every module a method trains",
                            f"methods[{i}].train trains {q!r} whole, so its weight cannot be stored quantized; "
                            f"add {q!r} to optimize.quantize.skip")
    return chosen, left


def check_model(spec, resolved, model: nn.Module) -> dict[str, str]:
    """Before capture: the weights to quantize, or a SpecError (skip matching nothing, a trained
    weight, a block size that does not divide a width, naming the module)."""
    settings = check_settings(dict(spec.optimize.get("quantize") or {}))
    chosen = plan(model, settings, spec, resolved)
    if settings["format"] != "int8":
        for path, kind in chosen.items():
            w = model.get_submodule(path).weight
            width = w.shape[0] if kind == "conv1d" else w.shape[1]
            if width % settings["block_size"]:
                raise SpecError("optimize.quantize.block_size", settings["block_size"],
                                "a divisor of the input width of every quantized layer",
                                f"{path} has input width {width}; choose another block size or add it to "
                                "optimize.quantize.skip")
    return chosen


class QuantizedWeight(nn.Module):
    """One quantized (out, in) weight: buffers ``data, qscale, qscale2, qoffset`` (kernels/quant_formats.py)."""

    def __init__(self, w_out_in: torch.Tensor, fmt: str, block_size: int, double_quant: bool):
        super().__init__()
        self.fmt, self.block_size, self.shape, self.dtype = fmt, block_size, tuple(w_out_in.shape), w_out_in.dtype
        for name, t in zip(("data", "qscale", "qscale2", "qoffset"), quantize_weight(w_out_in, fmt, block_size,
                                                                                   double_quant)):
            self.register_buffer(name, t)

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return self.data, self.qscale, self.qscale2, self.qoffset

    def assign(self, q: tuple[torch.Tensor, ...], fmt: str, block_size: int) -> None:
        """Holds ``q`` (already in ``fmt``: a checkpoint's own blocks, or a streamed weight quantized
        elsewhere); graphs captured before must be captured again (they bake fmt into their ops)."""
        self.fmt, self.block_size = fmt, block_size
        for name, t in zip(("data", "qscale", "qscale2", "qoffset"), q):
            self.register_buffer(name, t)

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        return dequantize(*self.tensors(), self.fmt, self.block_size, dtype)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())


class QuantReport(nn.Module):
    """Root of the quantized weights in the store; remembers what stayed full precision and merge errors."""

    def __init__(self, settings: dict):
        super().__init__()
        self.settings, self.kept, self.merge_error, self.released = dict(settings), {}, {}, set()
        self.shared = {}  # path -> the other ops that still read its full-precision weight
        self.loaded = []  # lines: how load_quantized filled the store (held blocks, requantized, ...)


def _resolve(root, target: str):
    obj = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _root(store: nn.Module, settings: dict) -> QuantReport:
    try:
        return store.get_submodule(ROOT)
    except AttributeError:
        install_module(store, ROOT, QuantReport(settings))
        return store.get_submodule(ROOT)


_FUSED = ("lora_linear", "ia3_linear", "dora_linear")


def _uses(w: fx.Node, kind: str, partial: bool = False) -> list[tuple[fx.Node, str]] | None:
    """(user, how) for every read of W as an (out, in) weight; None if some read is of another kind
    (``partial``: those reads are left out instead)."""
    out = []
    for u in w.users:
        if kind == "conv1d" and u.target is aten.addmm.default and u.args[2] is w and len(u.args) == 3 and not u.kwargs:
            out.append((u, "addmm"))
        elif kind == "conv1d" and u.target is aten.t.default:
            inner = _uses(u, "linear")
            if inner is None:
                return None
            out += inner
        elif u.target is aten.linear.default and u.args[1] is w and u.args[0] is not w:
            out.append((u, "linear"))
        elif isinstance(u.target, torch._ops.OpOverload) and u.target.namespace == "peftc" and \
                u.target._opname in _FUSED and u.args[1] is w:
            out.append((u, u.target._opname))
        elif u.target is aten.add.Tensor and (u.meta.get(PEFTC) or {}).get("role") == "adapted_weight":
            out.append((u, "dequant"))
        elif u.target is aten.to.dtype and (u.meta.get(PEFTC) or {}).get("role") == "cast_weight":
            out.append((u, "dequant"))  # DoRA's recomputed base under fp32 adapters: W.to(fp32)
        elif not partial:
            return None
    return out


def _split_siblings(gm: fx.GraphModule) -> None:
    """lora_siblings -> one lora_linear per sibling, sharing x and the seed (the same dropout mask)."""
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not torch.ops.peftc.lora_siblings.default:
            continue
        x, ws, bs, As, Bs, ss, p, seed, train = node.args
        outs = {}
        for g0 in node.users:  # getitem(op, 0) -> ys; getitem(ys, i) -> y_i
            for gi in (g0.users if g0.args[1] == 0 else ()):
                outs[gi.args[1]] = gi
        with gm.graph.inserting_before(node):
            for i in sorted(outs):
                op = gm.graph.call_function(torch.ops.peftc.lora_linear.default,
                                            (x, ws[i], bs[i], As[i], Bs[i], ss[i], p, seed, train))
                op.meta.update({k: v for k, v in outs[i].meta.items() if k in ("nn_module_stack",)})
                op.meta[PEFTC] = {**outs[i].meta[PEFTC], "role": "lora_linear"}
                y = gm.graph.call_function(operator.getitem, (op, 0))
                y.meta[PEFTC] = dict(outs[i].meta[PEFTC])
                outs[i].replace_all_uses_with(y)
        for g0 in list(node.users):
            for gi in list(g0.users):
                gm.graph.erase_node(gi)
            gm.graph.erase_node(g0)
        gm.graph.erase_node(node)


def _stamp(node: fx.Node, like: fx.Node, info: dict) -> fx.Node:
    node.meta[PEFTC] = info
    if "nn_module_stack" in like.meta:
        node.meta["nn_module_stack"] = dict(like.meta["nn_module_stack"])
    return node


def _rewrite(gm: fx.GraphModule, u: fx.Node, how: str, q: list[fx.Node], qw: QuantizedWeight, info: dict,
             dtype: torch.dtype) -> None:
    """One read of W (see the module docstring's table) -> its quantized form."""
    g, fmt, bs = gm.graph, qw.fmt, qw.block_size
    own = u.meta.get(PEFTC)
    meta = lambda role: {**(own or info), "role": role}
    call = lambda target, args, role: _stamp(g.call_function(target, args), u, meta(role))
    with g.inserting_before(u):
        if how in ("linear", "addmm"):
            x, bias = (u.args[0], u.args[2] if len(u.args) > 2 else None) if how == "linear" else u.args[1::-1]
            op = call(torch.ops.peftc.quant_linear.default,
                      (x, *q, bias, None, None, 1.0, 0.0, None, False, fmt, bs), "quant_linear")
            u.replace_all_uses_with(call(operator.getitem, (op, 0), "output"))
        elif how == "lora_linear":
            x, _, bias, a, b, s, p, seed, train = u.args
            op = call(torch.ops.peftc.quant_linear.default, (x, *q, bias, a, b, s, p, seed, train, fmt, bs),
                      "quant_lora_linear")
            u.replace_all_uses_with(op)
        elif how == "dora_linear":
            x, _, bias, a, b, m, s, p, seed, train = u.args
            op = call(torch.ops.peftc.quant_dora_linear.default,
                      (x, *q, bias, a, b, m, s, p, seed, train, fmt, bs), "quant_dora_linear")
            u.replace_all_uses_with(op)
        elif how == "ia3_linear":  # the scale moves out of the op: (x W^T + b) * l, or (x * l) W^T + b
            x, _, bias, vec, mode = u.args
            if mode == "in":
                x = call(aten.mul.Tensor, (x, vec), "scale_input")
            op = call(torch.ops.peftc.quant_linear.default, (x, *q, bias, None, None, 1.0, 0.0, None, False, fmt, bs),
                      "quant_linear")
            y = call(operator.getitem, (op, 0), "output")
            if mode == "out":
                y = call(aten.mul.Tensor, (y, vec), "scale_output")
            for gi in list(u.users):
                if gi.target is not operator.getitem or gi.args[1] != 0:
                    raise PeftcError(f"quantize: {u.name} has a use other than its output: {gi.format_node()}")
                gi.replace_all_uses_with(y)
                g.erase_node(gi)
        else:  # "dequant": a temporary weight for an op that does not keep it (DoRA's W + s B A)
            w_node = u.args[0]
            dq = call(torch.ops.peftc.dequantize.default, (*q, fmt, bs, dtype), "dequantized_weight")
            u.replace_input_with(w_node, dq)
            return
    g.erase_node(u)


def _drop_attr(gm: fx.GraphModule, target: str) -> None:
    """Removes the graph module's own reference to a tensor no node reads any more."""
    owner, _, leaf = target.rpartition(".")
    mod = gm.get_submodule(owner) if owner else gm
    if leaf in mod._parameters:
        del mod._parameters[leaf]
    elif leaf in mod._buffers:
        del mod._buffers[leaf]


def quantize(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    """Every read of a chosen frozen weight -> the quantized op (see the module docstring).
    Coverage: every Linear / Conv1D weight the graph reads, quantized or left out and why."""
    from peftc.kernels import lora_linear, lora_siblings, quant_linear  # noqa: F401  (register the ops)

    settings = check_settings(dict(ctx.spec.optimize.get("quantize") or {}))
    chosen, left = _select(ctx.model, settings, ctx.spec, ctx.targets)
    cov = ctx.coverage("quantize", "frozen linear weights")
    root = _root(ctx.store, settings)
    by_id = {id(ctx.model.get_submodule(p).weight): p for p in [*chosen, *left]}
    _split_siblings(gm)
    done = kept = 0
    missed, quantized = {}, set()  # path -> why it stays full precision (one entry though read twice: tied)
    base_merged = getattr(ctx.store, MERGE_STATE, None) is not None  # merge() folded the adapters
    for w in [n for n in gm.graph.nodes if n.op == "get_attr"]:
        info = w.meta.get(PEFTC) or {}
        shared = info.get("role") == "merged_weight" and (info.get("module") in chosen or info.get("module") in left)
        path = info["module"] if shared else by_id.get(id(_resolve(gm, w.target)))
        if path is None or (shared and _resolve(gm, w.target).dim() != 2) or not w.users:
            continue
        if path in left:
            missed[path] = left[path]
            continue
        kind = chosen[path]
        uses = _uses(w, kind)
        if uses is None and settings["shared_weights"] == "quantize":
            uses = _uses(w, kind, partial=True) or None
        if uses is None:
            root.kept[path] = "also read by " + ", ".join(sorted({str(u.target) for u in w.users}))
            missed[path] = f"kept full precision: {root.kept[path]}"
            kept += 1
            continue
        if not uses:
            continue
        base = root.get_submodule(path) if _has(root, path) else None
        merged = shared or (base_merged and base is not None and hasattr(base, "merged"))
        if merged:
            if base is None or not hasattr(base, "merged"):
                raise PeftcError(f"quantize: {path} is merged into a quantized base; use merge(requantize=True)")
            qpath = f"{ROOT}.{path}.merged"
            mount_adapter(ctx.store, gm, qpath, lambda: None)
        else:
            weight = _resolve(gm, w.target).detach()
            weight = weight.t() if kind == "conv1d" else weight
            make = functools.partial(QuantizedWeight, weight, settings["format"], settings["block_size"],
                                     settings["double_quant"])
            qpath = mount_adapter(ctx.store, gm, f"{ROOT}.{path}", make)
        qw = gm.get_submodule(qpath)
        dtype = _resolve(gm, w.target).dtype
        info = {"method": "quantize", "adapter": ctx.spec.adapter, "module": path}
        for u, how in uses:
            with gm.graph.inserting_before(u):
                q = [_stamp(gm.graph.get_attr(f"{qpath}.{b}"), u, {**info, "role": "quantized"})
                     for b in ("data", "qscale", "qscale2", "qoffset")]
            _rewrite(gm, u, how, q, qw, info, dtype)
        for dead in [t for t in w.users if not t.users] + [w]:
            if not dead.users:
                gm.graph.erase_node(dead)
        if w.users:  # shared_weights: quantize: the other reads keep the full-precision weight
            root.shared[path] = ", ".join(sorted({str(u.target) for u in w.users}))
        elif not any(n.op == "get_attr" and n.target == w.target for n in gm.graph.nodes):
            _drop_attr(gm, w.target)
        done += 1
        cov.hit()
        quantized.add(path)
        if settings["release_base"] and not merged and path not in root.shared:
            _release(ctx.model.get_submodule(path), root, path)
    for path in missed.keys() - quantized:
        cov.miss(missed[path])
    ctx.counts["quantize"] += done
    ctx.counts["quantize_kept"] += kept
    return PassResult(gm, done > 0)


def _has(root: nn.Module, path: str) -> bool:
    try:
        root.get_submodule(path)
    except AttributeError:
        return False
    return True


def _release(module: nn.Module, root: QuantReport, path: str) -> None:
    """The base parameter's storage -> a one-element zero-stride placeholder of the same shape."""
    p = module.weight
    if path not in root.released:
        p.data = placeholder(p)
        root.released.add(path)
