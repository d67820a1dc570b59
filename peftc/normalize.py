"""Capture normalization: every way a model writes a linear layer becomes ``aten.linear``.

The passes read one form, ``aten.linear(x, W, b)`` with ``W`` a ``get_attr`` of a parameter
(``peftc.graph.as_linear_site``). Models also write it as (W stored (out, in) as nn.Linear does)::

    matmul(x, W.T)   x @ W.t()   mm(x2d, W.t())   bmm(x3d, W.t().expand(B, in, out))
    addmm(b, x2d, W.t())   einsum("...i,oi->...o", x, W)

and then often ``y + b`` (Falcon's ``FalconLinear``: ``x @ W.T + b``). Each becomes
``linear(x, W)``, and a following ``+ b`` with a 1-D parameter ``b`` of the same module folds
in as ``linear(x, W, b)``, so the site's output is the module's output (IA3 scales it, LoRA
adds to it, as PEFT does on the wrapped module). Both frontends are covered: aten ops
(torch.export) and the torch-level calls ``symbolic_trace`` records.

Pre: a captured graph. Post: no matched form is left; ``gm.meta[NORMALIZED]`` counts what was
rewritten per form (on the captured graph: ``cm.graphs.captured``). The result is the same function: only
the order of floating-point operations of a folded bias may change (a fused ``addmm``).
``transposed`` Conv1D weights (stored (in, out): GPT-2's ``addmm(b, x, W)``) stay as they
are: ``as_linear_site`` reads them already.
"""

from __future__ import annotations

import builtins
import operator
from collections import Counter

import torch
from torch import fx

__all__ = ["normalize_linears", "NORMALIZED"]

aten = torch.ops.aten
NORMALIZED = "peftc_normalized"  # gm.meta key: {form: count} of the linear forms rewritten

_MATMUL = {aten.matmul.default, aten.mm.default, operator.matmul, torch.matmul, torch.mm,
           torch.Tensor.matmul, torch.Tensor.mm}
_BMM = {aten.bmm.default, torch.bmm}
_ADDMM = {aten.addmm.default, torch.addmm}
_EINSUM = {aten.einsum.default, torch.einsum, torch.functional.einsum}
_ADD = {aten.add.Tensor, operator.add, torch.add}
_METHODS = {"matmul": torch.Tensor.matmul, "mm": torch.Tensor.mm, "t": torch.t, "transpose": torch.transpose,
            "permute": torch.permute, "expand": "expand", "__matmul__": operator.matmul}


def _target(node: fx.Node):
    """The callable a node runs (a ``call_method`` mapped onto its function), or None."""
    if node.op == "call_function":
        return node.target
    if node.op == "call_method":
        return _METHODS.get(node.target)
    return None


def _weight(gm: fx.GraphModule, node) -> fx.Node | None:
    """``node`` if it reads a 2-D parameter of the model (the weight of a linear)."""
    if not (isinstance(node, fx.Node) and node.op == "get_attr"):
        return None
    try:
        p = gm.get_parameter(node.target)
    except AttributeError:
        return None
    return node if p.dim() == 2 else None


def _transposed_weight(gm: fx.GraphModule, node) -> fx.Node | None:
    """The weight ``W`` if ``node`` is ``W.T`` / ``W.t()`` / ``W.transpose(0, 1)`` / ``W.permute(1, 0)``."""
    if not isinstance(node, fx.Node):
        return None
    fn, args = _target(node), node.args
    if fn in (aten.numpy_T.default, aten.t.default, torch.t):
        return _weight(gm, args[0])
    if fn is builtins.getattr and len(args) == 2 and args[1] in ("T", "mT"):
        return _weight(gm, args[0])
    if fn in (aten.transpose.int, torch.transpose) and len(args) == 3 and {args[1] % 2, args[2] % 2} == {0, 1}:
        return _weight(gm, args[0])
    if fn in (aten.permute.default, torch.permute):
        dims = args[1] if len(args) == 2 and isinstance(args[1], (list, tuple)) else args[1:]
        return _weight(gm, args[0]) if [d % 2 for d in dims] == [1, 0] else None
    return None


def _einsum_weight(gm: fx.GraphModule, node: fx.Node) -> tuple[fx.Node, fx.Node] | None:
    """(x, W) for ``einsum("<batch>i,oi-><batch>o", x, W)``: W stored (out, in) as nn.Linear's."""
    eq, *ops = node.args
    ops = list(ops[0]) if len(ops) == 1 and isinstance(ops[0], (list, tuple)) else ops
    if not isinstance(eq, str) or len(ops) != 2 or "->" not in eq:
        return None
    lhs, out = eq.replace(" ", "").split("->")
    terms = lhs.split(",")
    if len(terms) != 2 or len(terms[1]) != 2:
        return None
    (o, i), a = terms[1], terms[0]
    if o == i or not a.endswith(i) or o in a or out != a[:-1] + o:
        return None
    w = _weight(gm, ops[1])
    return (ops[0], w) if w is not None else None


def _linear_form(gm: fx.GraphModule, node: fx.Node) -> tuple[str, fx.Node, fx.Node, object] | None:
    """(form name, x, W, bias or None) if ``node`` computes ``x @ W^T (+ b)``."""
    fn = _target(node)
    if fn is None or node.kwargs and fn not in _EINSUM:
        return None
    args = node.args
    if fn in _MATMUL and len(args) == 2 and (w := _transposed_weight(gm, args[1])) is not None:
        return "matmul", args[0], w, None
    if fn in _BMM and len(args) == 2 and isinstance(args[1], fx.Node) and _target(args[1]) in (aten.expand.default, "expand"):
        w = _transposed_weight(gm, args[1].args[0])
        return ("bmm", args[0], w, None) if w is not None else None
    if fn in _ADDMM and len(args) == 3 and (w := _transposed_weight(gm, args[2])) is not None:
        return "addmm", args[1], w, args[0]
    if fn in _EINSUM and not node.kwargs and (found := _einsum_weight(gm, node)) is not None:
        return "einsum", found[0], found[1], None
    return None


def _bias_add(gm: fx.GraphModule, node: fx.Node, weight: fx.Node) -> fx.Node | None:
    """The single user ``node + b`` where ``b`` is a 1-D parameter beside ``weight``, if any."""
    if len(node.users) != 1:
        return None
    (user,) = node.users
    if _target(user) not in _ADD or user.kwargs or len(user.args) != 2 or node not in user.args:
        return None
    b = user.args[1] if user.args[0] is node else user.args[0]
    if not (isinstance(b, fx.Node) and b.op == "get_attr"):
        return None
    if b.target.rpartition(".")[0] != weight.target.rpartition(".")[0]:
        return None
    try:
        p, w = gm.get_parameter(b.target), gm.get_parameter(weight.target)
    except AttributeError:
        return None
    return user if p.dim() == 1 and p.shape[0] == w.shape[0] else None


def normalize_linears(gm: fx.GraphModule) -> fx.GraphModule:
    """Rewrites every linear form above into ``aten.linear`` in place; returns ``gm``.

    Example::

        gm = normalize_linears(torch.export.export(model, (x,)).module())
        # matmul(x, numpy_T(W)) + b  ->  linear(x, W, b)
    """
    counts: Counter = Counter()
    graph = gm.graph
    for node in list(graph.nodes):
        found = _linear_form(gm, node)
        if found is None:
            continue
        form, x, w, bias = found
        add = _bias_add(gm, node, w) if bias is None else None
        last = add if add is not None else node
        if add is not None:
            bias = add.args[1] if add.args[0] is node else add.args[0]
            form += "+bias"
        with graph.inserting_before(last):
            lin = graph.call_function(aten.linear.default, (x, w) if bias is None else (x, w, bias))
        lin.meta = dict(last.meta)
        if "nn_module_stack" in node.meta:
            lin.meta["nn_module_stack"] = node.meta["nn_module_stack"]
        last.replace_all_uses_with(lin)
        views = [a for a in node.all_input_nodes if a.op != "get_attr" and a is not x and a is not bias]
        for dead in (add, node, *views, *(v for v in views for v in v.all_input_nodes if v.op != "get_attr")):
            if dead is not None and not dead.users:  # W.T (and bmm's expand of it)
                graph.erase_node(dead)
        counts[form] += 1
    if counts:
        graph.lint()
        gm.recompile()
    gm.meta[NORMALIZED] = dict(counts)
    return gm
