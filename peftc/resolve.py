"""Resolving a spec against a model: the module paths every entry adapts.

Runs before capture, so a selector that matches nothing, or two entries of one method on
the same module, fail before any capture work.
"""

from __future__ import annotations

from torch import nn

from peftc import targets
from peftc.errors import SpecError
from peftc.spec import METHODS, Sites, Spec

__all__ = ["resolve_all", "with_implied_entries"]


def with_implied_entries(spec: Spec, model: nn.Module) -> Spec:
    """The spec plus the entries it implies on ``model`` (each method's ``implied_entries``:
    PEFT trains the classification head of SEQ_CLS models whole, so does peftc)."""
    extra = [e for cls in METHODS.values() for e in cls.implied_entries(spec, model)]
    return spec.replace(methods=spec.methods + tuple(extra)) if extra else spec


def _outermost(found: list[str]) -> list[str]:
    return [p for p in found if not any(p.startswith(q + ".") for q in found)]


def resolve_all(spec: Spec, model: nn.Module) -> list[dict[str, str]]:
    """Module paths per spec entry, checked before capture: no match and overlaps are errors."""
    names = [n for n, _ in model.named_modules() if n]
    owned, out = [], []
    for m in spec.methods:
        if m.owns_modules:
            owned += _outermost(targets.match_names(m.targets, names))
    for i, m in enumerate(spec.methods):
        if m.sites is Sites.MODULE:
            sel = m.targets if m.targets is not None else m.default_targets(model)
            found = targets.match_names(sel, names)
            if not found:
                raise targets.no_match(f"methods[{i}].{m.method}.targets", sel, names)
            if getattr(m, "exclude", None):
                found = [p for p in found if not targets.matches(m.exclude, p)]
            found = _outermost(found) if m.owns_modules else found
            out.append({p: "module" for p in found})
        elif m.sites is Sites.PARAMETER:  # parameters, by full name (PEFT's target_parameters)
            out.append(targets.resolve_parameters(m, model, f"methods[{i}].{m.method}"))
        elif m.sites is Sites.GRAPH:  # acts on the graph as a whole (prompts): no module targets
            out.append({})
        else:
            out.append(targets.resolve(m, model, f"methods[{i}].{m.method}", task_type=spec.task_type,
                                       kinds=m.kinds, protected=owned))
    seen: dict[tuple[str, str], int] = {}
    for i, (m, t) in enumerate(zip(spec.methods, out)):
        for p in t:
            j = seen.setdefault((m.method, p), i)
            if j != i:
                raise SpecError(f"methods[{i}].{m.method}.targets", p, "modules no other entry of the "
                                "same method adapts", f"methods[{j}] already adapts it")
    return out
