"""What the recompute pass inserts, and the graph analysis it decides with.

Runtime pieces (all exact: they change what autograd stores, never what is computed):

- ``Recipe``, ``RecipeFactory``, ``SaveWithRecipes`` (from ``peftc.recipes``, where reports read
  them too): a Recipe, made in the forward right after a tensor ``t``, holds the few tensors ``t``
  is recomputed from and a small GraphModule ``fn`` with ``fn(*inputs) == t``; an op wrapped in
  ``SaveWithRecipes`` saves the Recipe in place of ``t`` (or a view of it), and backward
  recomputes ``t`` once (shared by every op that saved it).
- ``bit_dropout(x, p, train) -> (y, bits)``: ``aten.dropout``'s CPU math and RNG draws (so the
  mask equals the unfused graph's under the same seed) with the mask kept as packed bits, 1/32
  of the fp32 noise ``aten.dropout`` saves.
- ``Checkpointed(gm)``: a region of the graph run through ``torch.utils.checkpoint`` (RNG state
  preserved, so dropout masks repeat); only the region's inputs are kept for backward.

Analysis: ``requires_grad`` and ``kept`` (which node outputs the frozen base's ops save for
backward, from a table of what each aten op saves), ``recipe_chain`` (the cheap ops that
recompute a tensor from kept ones) and ``extract_region`` (a span of nodes -> a submodule).
"""

from __future__ import annotations

import functools
import operator

import torch
from torch import fx, nn
from torch.utils.checkpoint import checkpoint

from peftc.capture import set_training
from peftc.graph import PEFTC
from peftc.recipes import Recipe, RecipeFactory, SaveWithRecipes

__all__ = ["Recipe", "RecipeFactory", "SaveWithRecipes", "bit_dropout", "Checkpointed",
           "requires_grad", "kept_by", "recipe_chain", "extract_region", "nbytes", "CHEAP", "saved_inputs",
           "frontier", "subgraph", "apply_bits", "unpack_bits"]

aten = torch.ops.aten

CHEAP = {  # recomputing these in backward costs an elementwise pass at most
    aten.mul.Tensor, aten.mul.Scalar, aten.add.Tensor, aten.add.Scalar, aten.sub.Tensor, aten.div.Tensor,
    aten.div.Scalar, aten.pow.Tensor_Scalar, aten.rsqrt.default, aten.sqrt.default, aten.mean.dim,
    aten.to.dtype, aten.to.dtype_layout, aten._to_copy.default, aten.silu.default, aten.gelu.default,
    aten.relu.default, aten.tanh.default, aten.sigmoid.default, aten.neg.default, aten.layer_norm.default,
    aten.rms_norm.default, aten.view.default, aten.reshape.default, aten.transpose.int, aten.permute.default,
    aten.contiguous.default, aten.clone.default, aten.expand.default, aten.unsqueeze.default,
    aten.squeeze.dim, aten.t.default, aten._unsafe_view.default, aten.alias.default,
}
_SAVE_OUT = {aten.rsqrt.default, aten.tanh.default, aten.sigmoid.default, aten.exp.default, aten.relu.default,
             aten._softmax.default, aten.softmax.int, aten.sqrt.default, aten.scaled_dot_product_attention.default}
_SAVE_IN0 = {aten.pow.Tensor_Scalar, aten.silu.default, aten.gelu.default, aten.sin.default, aten.cos.default,
             aten.log.default, aten.layer_norm.default, aten.native_layer_norm.default, aten.rms_norm.default,
             aten.cross_entropy_loss.default}  # cross_entropy keeps log_softmax(x): x's size
_SAVE_OUT |= {aten._log_softmax.default, aten.log_softmax.int}
_PAIR = {aten.mul.Tensor, aten.div.Tensor, aten.matmul.default, aten.bmm.default, aten.mm.default}


# ---------------------------------------------------------------- analysis


def nbytes(node) -> int:
    """Bytes of a node's tensor output at the captured example's sizes (0 if not a tensor)."""
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return _val_bytes(val)


def _val_bytes(val) -> int:
    if isinstance(val, (tuple, list)):
        return sum(map(_val_bytes, val))
    if not isinstance(val, torch.Tensor):
        return 0
    n = 1
    for s in val.shape:
        n *= int(s.node.hint) if isinstance(s, torch.SymInt) and s.node.hint is not None else int(s)
    return n * val.element_size()


def _attr(gm, target):
    return functools.reduce(getattr, target.split("."), gm)


def requires_grad(gm: fx.GraphModule) -> set[fx.Node]:
    """Nodes whose output requires grad: downstream of a trainable parameter."""
    req: set[fx.Node] = set()
    for n in gm.graph.nodes:
        if n.op == "get_attr":
            t = _attr(gm, n.target)
            if isinstance(t, torch.Tensor) and t.requires_grad:
                req.add(n)
        elif n.op in ("call_function", "call_module") and any(a in req for a in n.all_input_nodes):
            val = n.meta.get("val")
            if not (isinstance(val, torch.Tensor) and not val.is_floating_point()):
                req.add(n)
    return req


def _tensor_args(n: fx.Node) -> list[fx.Node]:
    return [a for a in n.args if isinstance(a, fx.Node)]


def saved_inputs(n: fx.Node, req: set[fx.Node]) -> set[fx.Node]:
    """The nodes whose outputs ``n`` saves for backward (itself included), as far as the table
    of aten ops knows; an unknown op is assumed to save nothing."""
    if n.op == "call_module" and n.meta.get(PEFTC, {}).get("role") == "recipe":
        return set(n.args[1:])  # a Recipe keeps its inputs
    if n.op != "call_function" or n not in req:
        return set()
    if isinstance(n.target, SaveWithRecipes):  # minus what its recipes stand in for
        inner = fx.Node(n.graph, n.name, n.op, n.target.op, n.args, {k: v for k, v in n.kwargs.items()
                                                                  if k != "_recipes"})
        req = req | {inner} if n in req else req
        return saved_inputs(inner, req) - {r.args[0] for r in n.kwargs["_recipes"]}
    t, args = n.target, _tensor_args(n)
    if t in _PAIR and len(n.args) >= 2:
        a, b = n.args[:2]
        return {x for x, other in ((a, b), (b, a)) if isinstance(x, fx.Node) and other in req}
    if t in (aten.linear.default, aten.addmm.default):
        x, w = (n.args[0], n.args[1]) if t is aten.linear.default else (n.args[1], n.args[2])
        return {v for v, other in ((x, w), (w, x)) if isinstance(v, fx.Node) and other in req}
    out: set[fx.Node] = set()
    if t in _SAVE_OUT:
        out.add(n)
    if t in _SAVE_IN0 and args:
        out.add(args[0])
    if t is aten.scaled_dot_product_attention.default:
        out.update(args[:4])
    if getattr(t, "namespace", None) == "peftc" and args:
        out.add(args[0])  # the fused ops save x (and their r-wide h, an output)
    return out


def kept_by(gm: fx.GraphModule, req: set[fx.Node], *, base_only: bool = True) -> set[fx.Node]:
    """Node outputs some op saves for backward (only the base model's ops when ``base_only``)."""
    kept: set[fx.Node] = set()
    for n in gm.graph.nodes:
        if base_only and PEFTC in n.meta:
            continue
        kept |= saved_inputs(n, req)
    return kept


def _free(n) -> bool:
    return not isinstance(n, fx.Node) or n.op in ("get_attr", "placeholder") or nbytes(n) == 0


def recipe_chain(target: fx.Node, kept: set[fx.Node], *, limit: int = 16) -> list[fx.Node] | None:
    """Cheap base ops that recompute ``target`` from kept tensors, parameters and constants,
    in graph order; None when there is none worth it (the inputs it needs kept would cost at
    least as much as ``target``)."""
    if target.op != "call_function" or target.target not in CHEAP or PEFTC in target.meta:
        return None
    chain, stack, extra = {target}, [target], 0
    while stack:
        n = stack.pop()
        for a in n.all_input_nodes:
            if a in chain or _free(a) or a in kept:
                continue
            if a.op == "call_function" and a.target in CHEAP and PEFTC not in a.meta and len(chain) < limit:
                chain.add(a)
                stack.append(a)
            else:
                extra += nbytes(a)  # the recipe keeps it alive
    if extra >= nbytes(target):
        return None
    return [n for n in target.graph.nodes if n in chain]


def frontier(chain: list[fx.Node]) -> list[fx.Node]:
    """Nodes a chain reads that it does not compute, in first-use order."""
    inside, out = set(chain), []
    for n in chain:
        for a in n.all_input_nodes:
            if a not in inside and a not in out:
                out.append(a)
    return out


def subgraph(gm: fx.GraphModule, chain: list[fx.Node], inputs: list[fx.Node], outputs: list[fx.Node], *,
             as_tuple: bool = False, tail=None) -> fx.GraphModule:
    """A GraphModule computing ``outputs`` (chain nodes) from ``inputs`` (a tuple, or the one
    output); ``tail(graph, out, placeholders) -> node`` appends ops after a single output."""
    g = fx.Graph()
    env = {a: g.placeholder(f"in_{i}") for i, a in enumerate(inputs)}
    phs = list(env.values())
    for n in chain:
        env[n] = g.node_copy(n, lambda a: env[a])
    if as_tuple:
        g.output(tuple(env[o] for o in outputs))
    else:
        g.output(tail(g, env[outputs[0]], phs) if tail else env[outputs[0]])
    return fx.GraphModule(gm, g)


# ---------------------------------------------------------------- runtime: dropout as bits

_BITS = 1 << torch.arange(8, dtype=torch.uint8)


def _pack_bits(mask: torch.Tensor) -> torch.Tensor:
    flat = mask.reshape(-1).to(torch.uint8)
    flat = torch.nn.functional.pad(flat, (0, -flat.numel() % 8))
    return (flat.view(-1, 8) * _BITS.to(flat.device)).sum(-1, dtype=torch.uint8)


def unpack_bits(bits: torch.Tensor, like: torch.Tensor, p: float) -> torch.Tensor:
    """The noise ``aten.dropout`` multiplies by (keep / (1 - p)), in ``like``'s shape and dtype."""
    keep = (bits.unsqueeze(-1) & _BITS.to(bits.device)).ne(0).reshape(-1)[: like.numel()]
    return keep.view(like.shape).to(like.dtype).div_(1 - p)


class _BitDropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, p):
        noise = torch.empty_like(x).bernoulli_(1 - p)  # aten.dropout's CPU draws, in its order
        noise.div_(1 - p)
        bits = _pack_bits(noise.ne(0))
        ctx.save_for_backward(bits)
        ctx.p = p
        ctx.mark_non_differentiable(bits)
        return x * noise, bits

    @staticmethod
    def backward(ctx, grad, _gbits):
        (bits,) = ctx.saved_tensors
        return grad * unpack_bits(bits, grad, ctx.p), None


def bit_dropout(x: torch.Tensor, p: float, train: bool):
    """``aten.dropout(x, p, train)`` (same mask for the same RNG state on CPU), plus the mask as
    packed bits (None when nothing is dropped)."""
    if not train or p == 0:
        return x, None
    return _BitDropout.apply(x, p)


def apply_bits(x: torch.Tensor, bits, p: float) -> torch.Tensor:
    """Recomputes bit_dropout's output from its input and bits."""
    return x if bits is None else x * unpack_bits(bits, x, p)


# ---------------------------------------------------------------- runtime: checkpointed regions


class Checkpointed(nn.Module):
    """A region of the graph run under non-reentrant ``torch.utils.checkpoint``: in backward it
    runs again from its inputs (RNG state restored). ``train()`` reaches its dropouts."""

    def __init__(self, gm: fx.GraphModule, name: str):
        super().__init__()
        self.region = gm
        self.name = name
        self._synced = None

    def forward(self, *args):
        if self._synced is not self.training:
            set_training(self.region, self.training)
            self._synced = self.training
        if not torch.is_grad_enabled():
            return self.region(*args)
        return checkpoint(self.region, *args, use_reentrant=False, preserve_rng_state=True)


def extract_region(gm: fx.GraphModule, span: list[fx.Node], name: str) -> fx.Node | None:
    """Replaces a contiguous span of nodes (graph order) by ``call_module(name)`` on a
    ``Checkpointed`` submodule; get_attr nodes in the span are hoisted before it and passed in.
    Returns the new node (None when the span has no output used after it)."""
    for n in [n for n in span if n.op == "get_attr"]:
        span[0].prepend(n)
    nodes = [n for n in span if n.op != "get_attr"]
    inside = set(nodes)
    inputs = frontier(nodes)
    outputs = [n for n in nodes if any(u not in inside for u in n.users)]
    if not outputs:
        return None
    sub = subgraph(gm, nodes, inputs, outputs, as_tuple=True)
    gm.add_submodule(name, Checkpointed(sub, name))
    last = nodes[-1]
    with gm.graph.inserting_after(last):
        call = gm.graph.call_module(name, tuple(inputs))
    call.meta[PEFTC] = {"method": "recompute", "adapter": "*", "module": name, "role": "checkpoint"}
    prev = call
    for i, o in enumerate(outputs):
        with gm.graph.inserting_after(prev):
            prev = gm.graph.call_function(operator.getitem, (call, i))
        prev.meta.update({k: o.meta[k] for k in ("val", "nn_module_stack") if k in o.meta})
        o.replace_all_uses_with(prev, delete_user_cb=lambda u: u not in inside)
    for n in reversed(nodes):
        gm.graph.erase_node(n)
    return call

