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

__all__ = ["PassResult", "PassContext", "Coverage", "SITES", "marked_nodes"]

SITES = "peftc_sites"  # node.meta key: indices of the spec entries that adapt this node


class PassResult(NamedTuple):
    graph_module: fx.GraphModule
    modified: bool


@dataclass
class Coverage:
    """What an optimization could have rewritten and did. Every optimization pass fills one
    (``ctx.coverage(name, unit)``); after its phase the pipeline turns a partial or empty match
    into a ``graph_summary()`` line with the reasons, so an optimization never does nothing silently.

    Example: ``cov = ctx.coverage("fuse", "LoRA sites"); cov.hit(); cov.miss("gated LoRA has no fused op")``
    gives ``fuse: 1 of 2 LoRA sites: 1 gated LoRA has no fused op``."""

    unit: str  # what was counted, plural: "LoRA sites", "frozen linear weights"
    matched: int = 0
    missed: Counter = field(default_factory=Counter)  # reason -> how many were left as they were

    def hit(self, n: int = 1) -> None:
        self.matched += n

    def miss(self, reason: str, n: int = 1) -> None:
        self.missed[reason] += n

    def line(self, name: str) -> str | None:
        """The summary line, or None when every candidate was rewritten."""
        total = self.matched + sum(self.missed.values())
        if total == 0:
            return f"{name}: matched nothing: no {self.unit} in this graph"
        if not self.missed:
            return None
        why = "; ".join(f"{n} {reason}" for reason, n in self.missed.most_common())
        return f"{name}: {self.matched} of {total} {self.unit}: {why}"


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
    reports: dict[str, Coverage] = field(default_factory=dict)  # optimization -> what it matched
    graph_name: str = "graph"  # the graph being built, for humans: its call signature

    def coverage(self, name: str, unit: str) -> Coverage:
        """The Coverage record optimization ``name`` fills while it runs on this graph."""
        return self.reports.setdefault(name, Coverage(unit))


def marked_nodes(gm: fx.GraphModule, ctx: PassContext, kind: type) -> Iterator[tuple[fx.Node, int, object]]:
    """(node, entry index, entry) for every node ``select`` annotated with a ``kind`` entry, in
    graph order; the node list is fixed first, so the caller may insert nodes."""
    for node in list(gm.graph.nodes):
        for i in node.meta.get(SITES, ()):
            entry = ctx.spec.methods[i]
            if isinstance(entry, kind):
                yield node, i, entry
