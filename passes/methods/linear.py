"""The rewrite every linear-site method shares (LoRA, VeRA, LoHa, LoKr, IA3, SSF, ...).

For each linear call ``y = x W^T + b`` that ``select`` marked with an entry of the method:

    parameters  entry.make_module(target, ctx), mounted once per (module, adapter) at
                ``<module>.<store_dir>.<adapter>``, shared by every captured graph
    insert      entry.output(ins, target, path, ctx): by default ``y + delta``, where the method
                supplies ``entry.delta(...)`` (masked per sample in a mixed batch); scalings
                override ``output`` (``y * l``); the users of ``y`` then read the result
    dtypes      for methods PEFT autocasts (``autocast``), HF PEFT's policy (passes/dtype_policy.py):
                on a bf16/fp16 base the module is upcast to fp32, ``delta`` reads ``target.input(ins)``
                = ``x.to(fp32)`` and the default output is ``(y + delta).to(y.dtype)``

so a method file holds its math (the delta or the scale) and its parameters, not the loop.
Every inserted node carries peftc meta (method, adapter, module, role) and ``y``'s module stack.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

import torch
from torch import fx, nn

from peftc.graph import Inserter, LinearSite, as_linear_site, mount_adapter
from peftc.passes import dtype_policy
from peftc.passes.context import PassContext, PassResult, marked_nodes
from peftc.spec import Merging, MethodSpec, Sites

__all__ = ["LinearMethod", "LinearTarget", "sample_rows"]

aten = torch.ops.aten


@dataclass(frozen=True)
class LinearTarget:
    """One marked linear call, with its weight as stored and its feature sizes."""

    gm: fx.GraphModule
    site: LinearSite
    weight: torch.Tensor  # (out, in); (in, out) for Conv1D (``site.transposed``)
    in_features: int
    out_features: int
    dtype: torch.dtype | None = None  # the adapter's weights and compute dtype (None: the weight's)

    @property
    def module(self) -> str:
        return self.site.module

    @property
    def upcast(self) -> bool:
        """Whether the adapter path runs in another dtype than the base (PEFT's autocast)."""
        return self.dtype is not None and self.dtype != self.weight.dtype

    def input(self, ins: Inserter) -> fx.Node:
        """The adapter path's input: ``x``, cast to the adapter dtype (PEFT's ``_cast_input_dtype``)."""
        return dtype_policy.cast(ins, self.site.x, self.dtype, "cast_in") if self.upcast else self.site.x

    def output_cast(self, ins: Inserter, out: fx.Node) -> fx.Node:
        """``out`` cast back to the base output's dtype (PEFT's ``result.to(torch_result_dtype)``)."""
        if not self.upcast:
            return out
        return dtype_policy.cast(ins, out, dtype_policy.node_dtype(self.site.node, self.weight.dtype), "cast_out")


def sample_rows(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A (batch,) mask shaped to broadcast over ``like``: (B, ..., F), or (B*S, F) for the
    flattened tokens Conv1D's addmm works on."""
    if like.dim() == 2 and like.shape[0] != mask.shape[0]:
        return mask.repeat_interleave(like.shape[0] // mask.shape[0])[:, None].to(like.dtype)
    return mask.view(-1, *([1] * (like.dim() - 1))).to(like.dtype)


@dataclass(frozen=True)
class LinearMethod(MethodSpec):
    """Base of the methods that act on linear layers; subclasses supply ``make_module`` and
    ``delta`` (or ``output``) and ``fold`` for merging."""

    sites: ClassVar[Sites] = Sites.LINEAR
    merging: ClassVar[Merging] = Merging.FOLD
    autocast: ClassVar[bool] = False  # HF PEFT upcasts this method's adapters (autocast_adapter_dtype)

    def make_module(self, target: LinearTarget, ctx: PassContext) -> nn.Module:
        """The adapter's parameters on one layer (called once per layer and adapter)."""
        raise NotImplementedError

    def delta(self, ins: Inserter, target: LinearTarget, path: str, ctx: PassContext) -> fx.Node:
        """The additive term, inserted with ``ins``; ``path`` is the mounted module's."""
        raise NotImplementedError

    def output(self, ins: Inserter, target: LinearTarget, path: str, ctx: PassContext) -> fx.Node | None:
        """The node ``y``'s users read instead (None: the method rewired the linear itself)."""
        term = self.delta(ins, target, path, ctx)
        if ctx.sample_mask:  # mixed batch: this adapter only on the samples that name it
            rows = ins.call(sample_rows, (ins.get_attr(ctx.sample_mask, "mask"), term), "mask_rows")
            term = ins.call(aten.mul.Tensor, (term, rows), "mask")
        return target.output_cast(ins, ins.call(aten.add.Tensor, (target.site.node, term), "add"))

    @classmethod
    def rewrite(cls, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        """Pre: linear nodes annotated with this method's entries. Post: each one's users read
        ``entry.output(...)``; ``ctx.counts[method]`` = sites rewritten."""
        adapter, n = ctx.spec.adapter, 0
        autocast = cls.autocast and getattr(ctx.spec, dtype_policy.FIELD, True)
        for node, _, entry in marked_nodes(gm, ctx, cls):
            site = as_linear_site(node)
            weight = gm.get_parameter(site.weight.target)
            in_f, out_f = weight.shape if site.transposed else weight.shape[::-1]
            target = LinearTarget(gm, site, weight, in_f, out_f)
            path = mount_adapter(ctx.store, gm, f"{site.module}.{cls.store_dir}.{adapter}",
                                 lambda t=target, e=entry: dtype_policy.upcast_module(e.make_module(t, ctx), autocast))
            # the path computes in the adapter's dtype as it is now (PEFT's x.to(A.dtype)): the policy
            # chose it at creation; a later cm.to(dtype) moves adapters and base alike
            target = replace(target, dtype=dtype_policy.module_dtype(gm.get_submodule(path), weight.dtype))
            ins = Inserter(node, {"method": cls.method, "adapter": adapter, "module": site.module})
            out = entry.output(ins, target, path, ctx)
            if out is not None:
                ins.redirect(node, out)
            if target.upcast:
                dtype_policy.count_site(ctx)
            n += 1
        ctx.counts[cls.method] += n
        dtype_policy.note(gm, ctx)
        return PassResult(gm, n > 0)
