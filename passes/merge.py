"""The merge pass: a merged adapter's linears read folded weights instead of adapter nodes.

    linear(x, W, b)  ->  linear(x, W', b')     W' = fold(W, adapter), folded beforehand

Pre: ``select`` annotated the adapted linears, and the runtime (``peftc.merging``, run by
``cm.merge()``) folded the active adapters into the base weights, leaving its merge state on the
adapter store at ``STATE``: ``state.adapters`` (the merged adapter names) and ``state.shared``
(state-dict key -> merged tensor, for weights that could not be written in place: a tied LM head,
a bias a fold creates, a fold of a trained copy). Post: a linear whose weight or bias is in
``state.shared`` reads it through one ``get_attr`` under the graph submodule ``HOLDER`` (the same
tensor in every graph, not a copy); every other linear reads the base parameter, merged in place,
unchanged. Why in place and how unmerge is exact: ``peftc.merging``.

Example (run by the pipeline's ``merge`` phase for a merged plan)::

    gm, changed = merge(gm, ctx)
"""

from __future__ import annotations

from torch import fx, nn

from peftc.errors import PeftcError
from peftc.graph import PEFTC, as_linear_site, install_module
from peftc.passes.context import SITES, PassContext, PassResult

__all__ = ["merge", "HOLDER", "STATE"]

HOLDER = "_peftc_merged"  # graph submodule holding the shared merged tensors a graph reads
STATE = "_peftc_merge_state"  # attribute of the adapter store (shared by every graph): peftc.merging.MergeState


def merge(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    """Pre: adapted linears annotated (select), the base merged (``ctx.store`` has a merge state
    naming this adapter). Post: linears whose merged tensor could not be written in place read the
    shared one; ``counts["merge"]``: merged sites."""
    state = getattr(ctx.store, STATE, None)
    if state is None or ctx.spec.adapter not in state.adapters:
        raise PeftcError(f"adapter {ctx.spec.adapter!r} is not merged into the base weights (call merge())")
    n = 0
    for node in list(gm.graph.nodes):
        for i in node.meta.get(SITES, ()):
            if ctx.spec.methods[i].sites != "linear":
                continue
            site, n = as_linear_site(node), n + 1
            w_key, b_key = f"{site.module}.weight", f"{site.module}.bias"
            if w_key in state.shared:
                node.replace_input_with(site.weight, _shared(gm, node, site.weight, w_key, state, ctx))
            if b_key in state.shared:
                b_node = node.args[0] if site.transposed else (node.args[2] if len(node.args) > 2 else None)
                if b_node is None:  # the fold created a bias (SSF's shift on a bias-free linear)
                    node.args = (*node.args[:2], _shared(gm, node, None, b_key, state, ctx))
                else:
                    node.replace_input_with(b_node, _shared(gm, node, b_node, b_key, state, ctx))
    ctx.counts["merge"] += n
    return PassResult(gm, n > 0)


def _shared(gm, user, old, key, state, ctx) -> fx.Node:
    """A get_attr of the shared merged tensor for ``key`` (the same tensor in every graph)."""
    if old is not None and old.meta.get(PEFTC, {}).get("role") == "merged_weight":
        return old  # an earlier adapter's pass already points this linear at the shared tensor
    try:
        holder = gm.get_submodule(HOLDER)
    except AttributeError:
        holder = nn.Module()
        install_module(gm, HOLDER, holder)
    name = key.replace(".", "__")
    if name not in holder._buffers:
        holder.register_buffer(name, state.shared[key], persistent=False)  # shared, not cloned
    with gm.graph.inserting_before(user):
        node = gm.graph.get_attr(f"{HOLDER}.{name}")
    node.meta[PEFTC] = {"method": "merge", "adapter": ctx.spec.adapter, "module": key.rpartition(".")[0],
                        "role": "merged_weight"}
    return node
