"""Where training memory goes: bytes saved for backward, by node kind and by module.

    report = peftc.memory_report(cm, input_ids=ids, labels=ids)
    print(report)                       # before / after the optimization passes
    report.after.by_category            # {"base": ..., "adapter": ..., "recomputed": ...}

A forward is run through an ``fx.Interpreter`` under ``saved_tensors_hooks``: every tensor autograd
keeps for backward is charged to the node running when it was saved (its op = kind, its owning
module, and base / adapter / recomputed: inserted by the recompute pass). The fused custom ops
save through ``ctx.save_for_backward`` (register_autograd's setup_context) and checkpointed
regions through ``torch.utils.checkpoint``'s input saver, so the hooks see them; a Recipe's
inputs are reported through ``peftc.recipes.LISTENERS``. Storages are counted
once: views of one storage, or a tensor saved by several ops, count once, for the first op that
saved it. Parameters and buffers are weights, reported apart (``weight_bytes``), never as
activations. What an autograd Function keeps on ``ctx`` attributes is invisible to the hooks:
``activation_rss`` measures the process instead (a child process with
``MALLOC_MMAP_THRESHOLD_=65536``, so that RSS follows live tensors).
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.utils._pytree as pytree
from torch import fx, nn

from peftc.graph import PEFTC
from peftc.recipes import LISTENERS, SaveWithRecipes

__all__ = ["SavedBytes", "MemoryReport", "memory_report", "saved_for_backward", "weight_bytes", "activation_rss"]


@dataclass
class SavedBytes:
    """Bytes saved for backward by one forward (each storage once)."""

    total: int = 0
    by_kind: dict[str, int] = field(default_factory=dict)
    by_module: dict[str, int] = field(default_factory=dict)
    by_category: dict[str, int] = field(default_factory=dict)


@dataclass
class MemoryReport:
    before: SavedBytes  # the graph with the adapters, before the optimization passes
    after: SavedBytes  # the graph as compiled
    weight_bytes: int  # parameters and buffers of the model (each storage once)
    optimizations: list[str]
    notes: list[str]

    def to_dict(self) -> dict:
        from dataclasses import asdict

        return asdict(self)

    def __str__(self) -> str:
        out = io.StringIO()
        mb = lambda b: f"{b / 2**20:9.3f} MB"
        print(f"saved for backward: {mb(self.before.total)} before optimizations -> {mb(self.after.total)} "
              f"after {self.optimizations or '(none)'}; weights {mb(self.weight_bytes)}", file=out)
        for title, attr, top in (("by category", "by_category", 0), ("by node kind", "by_kind", 12),
                                 ("by module", "by_module", 12)):
            before, after = getattr(self.before, attr), getattr(self.after, attr)
            keys = sorted(set(before) | set(after), key=lambda k: -max(before.get(k, 0), after.get(k, 0)))
            print(f"{title}:{'' if not top or len(keys) <= top else f' (top {top} of {len(keys)})'}", file=out)
            for k in keys[: top or None]:
                print(f"  {k:<48} {mb(before.get(k, 0))} -> {mb(after.get(k, 0))}", file=out)
        for line in self.notes:
            print(line, file=out)
        return out.getvalue()


def _storage(t: torch.Tensor) -> tuple[int, int]:
    s = t.untyped_storage()
    return s.data_ptr(), s.nbytes()


def weight_bytes(module: nn.Module) -> int:
    """Bytes of a module's parameters and buffers, each storage once."""
    seen = {_storage(t) for t in [*module.parameters(), *module.buffers()] if t.device.type != "meta"}
    return sum(n for _, n in seen)


class _Tally:
    def __init__(self, exclude: set[int]):
        self.exclude, self.seen, self.node = exclude, set(), None
        self.kind, self.module, self.category = Counter(), Counter(), Counter()

    def add(self, t: torch.Tensor, category: str | None = None) -> None:
        if not isinstance(t, torch.Tensor) or t.device.type == "meta":
            return
        ptr, n = _storage(t)
        if ptr in self.exclude or ptr in self.seen or n == 0:
            return
        self.seen.add(ptr)
        node = self.node
        kind = _kind(node)
        info = node.meta.get(PEFTC, {}) if node is not None else {}
        stack = node.meta.get("nn_module_stack") if node is not None else None
        module = info.get("module") or (list(stack.values())[-1][0] if stack else "") or "(model)"
        if category is None:
            category = ("recomputed" if info.get("method") == "recompute" else "adapter" if info else "base")
        self.kind[kind] += n
        self.module[module] += n
        self.category[category] += n

    def result(self) -> SavedBytes:
        return SavedBytes(sum(self.category.values()), dict(self.kind), dict(self.module), dict(self.category))


def _kind(node) -> str:
    """An op name: ``mul.Tensor``, ``peftc.lora_linear.default``, ``checkpoint`` for a region."""
    if node is None:
        return "eager"
    if node.op == "call_module":
        return (node.meta.get(PEFTC) or {}).get("role", "module")
    target = node.target.op if isinstance(node.target, SaveWithRecipes) else node.target
    name = str(target) if isinstance(target, torch._ops.OpOverload) else getattr(target, "__name__", str(target))
    return name.removeprefix("aten.")


class _Attributing(fx.Interpreter):
    def __init__(self, gm, tally: _Tally):
        super().__init__(gm, garbage_collect_values=True)
        self.tally = tally

    def run_node(self, n):
        self.tally.node = n
        return super().run_node(n)


def _exclude(*modules: nn.Module) -> set[int]:
    return {_storage(t)[0] for m in modules for t in [*m.parameters(), *m.buffers()]}


def _flat_inputs(gm: fx.GraphModule, kwargs: dict) -> list:
    info = getattr(gm.graph._codegen, "pytree_info", None)
    if info is None:
        return [kwargs[n.target] for n in gm.graph.nodes if n.op == "placeholder"]
    keys = info.in_spec.child(1).context
    return pytree.tree_flatten(((), {k: kwargs[k] for k in keys}))[0]


def _run(gm: fx.GraphModule, kwargs: dict, exclude: set[int]) -> SavedBytes:
    tally = _Tally(exclude)

    def pack(t):
        tally.add(t)
        return t

    def on_recipe(tensors):
        for t in tensors:
            tally.add(t, "recomputed")

    LISTENERS.append(on_recipe)
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = _Attributing(gm, tally).run(*_flat_inputs(gm, kwargs))
        del out
    finally:
        LISTENERS.remove(on_recipe)
    return tally.result()


def saved_for_backward(fn, *, exclude: nn.Module | None = None) -> SavedBytes:
    """Bytes autograd saves while ``fn()`` runs (any model: eager, PEFT, compiled); storages of
    ``exclude``'s parameters and buffers are not counted."""
    tally = _Tally(_exclude(exclude) if exclude is not None else set())

    def pack(t):
        tally.add(t, "saved")
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return tally.result()


def memory_report(cm, **inputs) -> MemoryReport:
    """Saved-for-backward bytes of one forward of ``cm`` on ``inputs``, by node kind, module and
    category (base / adapter / recomputed), before and after the optimization passes."""
    kwargs = cm.call_arguments(**inputs)
    after_gm = cm.graph_for_call(**kwargs)
    exclude = _exclude(cm)
    rng = torch.get_rng_state()
    before = _run(cm.graph_for_call(**kwargs, optimized=False), kwargs, exclude)
    torch.set_rng_state(rng)
    after = _run(after_gm, kwargs, exclude)
    notes = list(after_gm.meta.get("peftc_summary", []))
    if cm.spec.optimize and after.total >= before.total:
        notes.append("the optimizations did not reduce what is saved for backward")
    return MemoryReport(before, after, weight_bytes(cm), sorted(cm.spec.optimize), notes)


_CHILD = r"""
import json, os, sys, resource
import torch
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
build = json.loads(sys.argv[1])
mod, fn = build["factory"].rsplit(":", 1)
import importlib
model, inputs = getattr(importlib.import_module(mod), fn)(**build["kwargs"])
torch.manual_seed(0)
with torch.no_grad():
    model(**inputs)  # warm-up: lazy allocations happen here
before = rss()
out = model(**inputs)
after = rss()
print(json.dumps({"rss_bytes": after - before}))
"""


def activation_rss(factory: str, **kwargs) -> int:
    """Bytes a training forward keeps alive, from the RSS of a child process (no hooks: it sees
    what ``ctx`` attributes hold too). ``factory`` = "module:function" returning (model, inputs)
    given ``kwargs`` (JSON-serialisable)."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", _CHILD, json.dumps({"factory": factory, "kwargs": kwargs})],
                          env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"activation_rss child failed: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])["rss_bytes"]


