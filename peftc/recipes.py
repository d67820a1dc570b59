"""Recipes: a tensor's stand-in among the tensors autograd saves for backward.

    recipe(t, *inputs) -> Recipe             made in the forward right after t; fn(*inputs) == t
    SaveWithRecipes(op)(*args, _recipes=[r])  op saves Recipe r in place of t (or a view of t);
                                              backward recomputes t once, shared by every op that saved it

A graph op whose saved tensors are recomputed in backward instead of kept is a graph-level fact,
read by the pass that inserts recipes (``peftc.passes.optimize.recompute``) and by reports of
what a graph keeps for backward (``peftc.memory``), which must know neither each other:

- ``SaveWithRecipes.op``: the op a wrapped node runs (what a report names the node by);
- ``LISTENERS``: callables ``cb(tensors)`` told, when a Recipe is first packed, which tensors it
  keeps alive in place of the one it stands for.

Both are exact: they change what autograd stores, never what is computed.

Example::

    r = Recipe(torch.exp, (x,), y)                       # y = exp(x) saved as a recipe over x
    out = SaveWithRecipes(torch.ops.aten.mul.Tensor)(y, w, _recipes=[r])
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["Recipe", "RecipeFactory", "SaveWithRecipes", "LISTENERS"]

LISTENERS: list = []  # callables(tensors) told what a packed Recipe keeps alive (peftc.memory)


def _key(t: torch.Tensor):
    return t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()


class Recipe:
    """A tensor's stand-in in autograd's saved tensors: recomputed once in backward, then shared
    by every op that saved it until the last one has unpacked it."""

    __slots__ = ("fn", "inputs", "key", "base_offset", "value", "packs")

    def __init__(self, fn, inputs: tuple, t: torch.Tensor):
        self.fn, self.inputs, self.key, self.base_offset = fn, inputs, _key(t), t.storage_offset()
        self.value, self.packs = None, 0

    def pack(self, t: torch.Tensor):
        if self.packs == 0:
            for cb in LISTENERS:
                cb([x for x in self.inputs if isinstance(x, torch.Tensor)])
        self.packs += 1
        return self, tuple(t.shape), t.stride(), t.storage_offset() - self.base_offset

    def unpack(self, shape, stride, offset) -> torch.Tensor:
        if self.value is None:
            with torch.no_grad():
                self.value = self.fn(*self.inputs)
        v = self.value
        self.packs -= 1
        if self.packs <= 0:
            self.value = None
        return v.as_strided(shape, stride, v.storage_offset() + offset)


class RecipeFactory(nn.Module):
    """Graph node ``recipe(t, *inputs) -> Recipe``: made after t in the forward."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, t, *inputs):
        return Recipe(self.fn, inputs, t) if isinstance(t, torch.Tensor) else None


class SaveWithRecipes:
    """``op(*args, **kwargs)`` storing a Recipe for each tensor of ``_recipes`` that op saves."""

    def __init__(self, op):
        self.op = op
        self.__name__ = f"save_with_recipes_{getattr(op, '__name__', 'op')}"

    def __repr__(self):
        return self.__name__

    def __call__(self, *args, _recipes=(), **kwargs):
        recipes = {r.key: r for r in _recipes if r is not None}
        if not recipes or not torch.is_grad_enabled():
            return self.op(*args, **kwargs)

        def pack(t):
            r = recipes.get(_key(t)) if t.device.type != "meta" else None
            return r.pack(t) if r is not None else t

        def unpack(obj):
            return obj[0].unpack(*obj[1:]) if isinstance(obj, tuple) else obj

        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            return self.op(*args, **kwargs)
