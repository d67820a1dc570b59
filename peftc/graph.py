"""Graph utilities shared by capture and the passes: where a node belongs, attribute lookup,
linear sites, ordered node insertion, adapter modules."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import fx, nn

__all__ = ["SUMMARY_LINES", "FLAT_VIEW", "LinearSite", "as_linear_site", "linear_sites", "Inserter", "install_module", "mount_adapter", "PEFTC",
           "owning_module", "stack_owner", "fetch_attr", "has_role", "placeholder", "is_placeholder"]

aten = torch.ops.aten
PEFTC = "peftc"  # node.meta key carried by every inserted node
SUMMARY_LINES = "peftc_summary"  # gm.meta key: lines a pass adds to graph_summary() (what it did, or why not)
FLAT_VIEW = "peftc_flat_view"  # gm.meta key: the graph before a pass outlined parts of it (for inspection)


def stack_owner(node: fx.Node) -> str | None:
    """The innermost module of the node's ``nn_module_stack`` (as captured), or None."""
    stack = node.meta.get("nn_module_stack")
    return list(stack.values())[-1][0] if stack else None


def owning_module(node: fx.Node) -> str | None:
    """The module a node belongs to: its module stack, else (an inserted node) its peftc meta."""
    owner = stack_owner(node)
    if owner is not None:
        return owner
    info = node.meta.get(PEFTC)
    return info.get("module") if info else None


def fetch_attr(root: nn.Module, target: str):
    """The object at dotted ``target`` under ``root`` (a parameter, buffer or module), as a
    ``get_attr`` node reads it."""
    return functools.reduce(getattr, target.split("."), root)


def has_role(node, method: str, *roles: str) -> bool:
    """Whether ``node`` was inserted by ``method`` with one of ``roles`` (fusion matches on it)."""
    info = node.meta.get(PEFTC) if isinstance(node, fx.Node) else None
    return bool(info) and info.get("method") == method and info.get("role") in roles


@dataclass(frozen=True)
class LinearSite:
    """A linear layer call in the graph: ``out = x @ W^T (+ b)``.

    For Conv1D (``addmm(b, x2d, W)``) the weight is stored transposed; ``x`` is then the 2-D
    view the addmm reads, and ``out`` is 2-D too.
    """

    node: fx.Node
    x: fx.Node
    weight: fx.Node
    module: str
    transposed: bool


def as_linear_site(n: fx.Node) -> LinearSite | None:
    """The linear call ``n`` is, if it is one with a parameter weight (and not peftc's own)."""
    if n.op != "call_function" or PEFTC in n.meta:
        return None
    if n.target is aten.linear.default:
        x, w, transposed = n.args[0], n.args[1], False
    elif n.target is aten.addmm.default and len(n.args) >= 3:
        x, w, transposed = n.args[1], n.args[2], True
    else:
        return None
    if not (isinstance(w, fx.Node) and w.op == "get_attr"):
        return None
    path = owning_module(n) or w.target.rpartition(".")[0]
    return LinearSite(n, x, w, path, transposed)


def linear_sites(gm: fx.GraphModule) -> list[LinearSite]:
    return [s for n in gm.graph.nodes if (s := as_linear_site(n)) is not None]


class Inserter:
    """Inserts nodes in program order after ``anchor``, each tagged with peftc meta.

    ``graph.inserting_after(anchor)`` would put several new nodes in reverse order; this keeps
    a cursor at the last inserted node instead, and copies the anchor's module stack so the
    new nodes are attributed to the module they adapt.
    """

    def __init__(self, anchor: fx.Node, info: dict, *, before: bool = False):
        self.graph, self.cursor, self.info, self.anchor = anchor.graph, anchor, info, anchor
        self.before = before  # insert every node just before ``anchor`` instead of after it
        self.nodes: set[fx.Node] = set()

    def _where(self):
        return self.graph.inserting_before(self.anchor) if self.before else self.graph.inserting_after(self.cursor)

    def _tag(self, node: fx.Node, role: str) -> fx.Node:
        if "nn_module_stack" in self.anchor.meta:
            node.meta["nn_module_stack"] = dict(self.anchor.meta["nn_module_stack"])
        node.meta[PEFTC] = {**self.info, "role": role}
        self.cursor = node
        self.nodes.add(node)
        return node

    def redirect(self, old: fx.Node, new: fx.Node) -> None:
        """Every use of ``old`` outside the nodes inserted here now reads ``new``."""
        old.replace_all_uses_with(new, delete_user_cb=lambda user: user not in self.nodes)

    def get_attr(self, target: str, role: str = "param") -> fx.Node:
        with self._where():
            return self._tag(self.graph.get_attr(target), role)

    def call(self, target, args: tuple, role: str, kwargs: dict | None = None) -> fx.Node:
        with self._where():
            return self._tag(self.graph.call_function(target, args, kwargs or {}), role)


def install_module(root: nn.Module, path: str, module: nn.Module) -> None:
    """Registers ``module`` at dotted ``path`` under ``root``, creating plain parents."""
    parent = root
    *parents, leaf = path.split(".")
    for part in parents:
        child = getattr(parent, part, None)
        if child is None:
            child = nn.Module()
            parent.add_module(part, child)
        parent = child
    existing = getattr(parent, leaf, None)
    if existing is not None and existing is not module:
        raise RuntimeError(f"{path} is already taken by a {type(existing).__name__}")
    parent.add_module(leaf, module)


def mount_adapter(store: nn.Module, gm: fx.GraphModule, path: str, make) -> str:
    """Gets the adapter module at ``path`` from the store shared by every capture (creating
    it with ``make()`` the first time) and mounts it in ``gm`` so get_attr nodes resolve."""
    try:
        module = store.get_submodule(path)
    except AttributeError:
        module = make()
        install_module(store, path, module)
    try:
        gm.get_submodule(path)
    except AttributeError:
        install_module(gm, path, module)
    return path


def placeholder(like: torch.Tensor, device=None) -> torch.Tensor:
    """One zero broadcast to ``like``'s shape: what a released base weight becomes (its values live
    elsewhere, e.g. quantized or sharded) so later captures still see the shape."""
    return torch.zeros((), dtype=like.dtype, device=like.device if device is None else device).expand(like.shape)


def is_placeholder(t: torch.Tensor) -> bool:
    """Whether ``t`` holds one value for all its elements (``placeholder``): nothing to read or write in place."""
    return t.numel() > 1 and all(st == 0 for st in t.stride())
