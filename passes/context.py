"""What a pass receives and returns: ``fn(gm, ctx: PassContext) -> PassResult``.

A bottom module (no pass imports it back), so that method files, the merge pass and the
pipeline can all depend on it without import cycles.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import NamedTuple

from torch import fx, nn

from peftc.spec import Spec

__all__ = ["PassResult", "PassContext", "SITES", "marked_nodes"]

SITES = "peftc_sites"  # node.meta key: indices of the spec entries that adapt this node


class PassResult(NamedTuple):
    graph_module: fx.GraphModule
    modified: bool


@dataclass
class PassContext:
    """What passes read besides the graph; ``counts`` records how often each pass matched."""

    spec: Spec
    targets: list[dict[str, str]]  # per spec entry: module path -> kind ("linear", "module", ...)
    model: nn.Module  # the user's eager model, for module attributes
    store: nn.Module  # root of the adapter modules, shared by every capture
    counts: Counter = field(default_factory=Counter)
    timings: dict[str, float] = field(default_factory=dict)
    sample_mask: str | None = None  # get_attr target of a (batch,) 0/1 mask: mixed-batch adapters


def marked_nodes(gm: fx.GraphModule, ctx: PassContext, kind: type) -> Iterator[tuple[fx.Node, int, object]]:
    """(node, entry index, entry) for every node ``select`` annotated with a ``kind`` entry, in
    graph order; the node list is fixed first, so the caller may insert nodes."""
    for node in list(gm.graph.nodes):
        for i in node.meta.get(SITES, ()):
            entry = ctx.spec.methods[i]
            if isinstance(entry, kind):
                yield node, i, entry
