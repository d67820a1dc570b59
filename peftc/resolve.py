"""Resolving a spec against a model: the module paths every entry adapts.

Runs before capture, so a selector that matches nothing, or two entries of one method on
the same module, fail before any capture work.
"""

from __future__ import annotations

from torch import nn

from peftc import targets
from peftc.errors import SpecError
from peftc.spec import Spec

__all__ = ["resolve_all", "with_implied_heads"]


def with_implied_heads(spec: Spec, model: nn.Module) -> Spec:
    """PEFT trains the classification head of SEQ_CLS models whole; so does peftc."""
    if spec.task_type != "SEQ_CLS":
        return spec
    from peftc.passes.train import TrainSpec

    heads = [h for h in targets.seq_cls_heads(model)
             if not any(isinstance(m, TrainSpec) and h in m.targets for m in spec.methods)]
    return spec.replace(methods=spec.methods + (TrainSpec(targets=tuple(heads)),)) if heads else spec


def resolve_all(spec: Spec, model: nn.Module) -> list[dict[str, str]]:
    """Module paths per spec entry, checked before capture: no match and overlaps are errors."""
    names = [n for n, _ in model.named_modules() if n]
    protected, out = [], []
    for m in spec.methods:
        if getattr(m, "protects", False):
            found = targets.match_names(m.targets, names)
            protected += [p for p in found if not any(p.startswith(q + ".") for q in found)]
    for i, m in enumerate(spec.methods):
        if m.sites == "module":
            sel = m.targets if m.targets is not None else m.default_targets(model)
            found = targets.match_names(sel, names)
            if not found:
                raise targets.no_match(f"methods[{i}].{m.method}.targets", sel, names)
            if getattr(m, "exclude", None):
                found = [p for p in found if not targets.matches(m.exclude, p)]
            found = [p for p in found if not any(p.startswith(q + ".") for q in found)] if m.protects else found
            out.append({p: "module" for p in found})
        elif m.sites == "graph":  # acts on the graph as a whole (prompts): no module targets
            out.append({})
        else:
            out.append(targets.resolve(m, model, f"methods[{i}].{m.method}", task_type=spec.task_type,
                                       kinds=m.kinds, protected=protected))
    seen: dict[tuple[str, str], int] = {}
    for i, (m, t) in enumerate(zip(spec.methods, out)):
        for p in t:
            j = seen.setdefault((m.method, p), i)
            if j != i:
                raise SpecError(f"methods[{i}].{m.method}.targets", p, "modules no other entry of the "
                                "same method adapts", f"methods[{j}] already adapts it")
    return out
