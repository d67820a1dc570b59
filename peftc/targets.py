"""Target selection: which modules of a model a method entry adapts (PEFT's matching rules).

Runs on the eager model before capture, so that a selector matching nothing fails before any
capture work, with the closest module paths in the message.
"""

from __future__ import annotations

import difflib
import re
import warnings

from torch import nn

from peftc.errors import SpecError

__all__ = ["linear_kind", "module_kind", "match_names", "matches", "resolve", "seq_cls_heads", "infer_task_type",
           "no_match", "for_model_type", "SEQ_CLS_HEADS",
           "match_parameters", "resolve_parameters"]

SEQ_CLS_HEADS = ("classifier", "score")  # PEFT adds these to modules_to_save for SEQ_CLS


def linear_kind(module: nn.Module) -> str | None:
    """"linear" for nn.Linear, "conv1d" for transformers' Conv1D (weight stored in x out)."""
    if isinstance(module, nn.Linear):
        return "linear"
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
        return "conv1d"
    return None


def module_kind(module: nn.Module) -> str | None:
    """The kinds methods target: "linear", "conv1d", "norm" (LayerNorm / RMSNorm), "embedding"."""
    kind = linear_kind(module)
    if kind:
        return kind
    name = type(module).__name__
    if isinstance(module, nn.LayerNorm) or name.endswith(("LayerNorm", "RMSNorm")):
        return "norm"
    if isinstance(module, nn.Embedding):
        return "embedding"
    return None


def matches(selector, name: str) -> bool:
    """PEFT's selector semantics: exact name or dotted suffix of a list; full-match regex."""
    if isinstance(selector, str):
        return re.fullmatch(selector[3:] if selector.startswith("re:") else selector, name) is not None
    return any(name == t or name.endswith("." + t) for t in selector)


def _layer_index(name: str, pattern) -> int | None:
    pats = [pattern] if isinstance(pattern, str) else list(pattern or ())
    if not pats:
        m = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
    else:
        m = None
        for p in pats:
            m = re.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", name)
            if m:
                break
    return int(m.group("idx")) if m else None


def match_names(selector, names: list[str], *, layers=None, layers_pattern=None) -> list[str]:
    """Names selected by a PEFT selector: a list (exact name or dotted suffix) or a regex.

    ``layers`` (PEFT's layers_to_transform) keeps only modules in those layer indices; like
    PEFT it applies to list selectors only.
    """
    out = [n for n in names if n and matches(selector, n)]
    if layers is not None and not isinstance(selector, str):
        keep = {layers} if isinstance(layers, int) else set(layers)
        out = [n for n in out if _layer_index(n, layers_pattern) in keep]
    return out


def no_match(where: str, selector, names: list[str]) -> SpecError:
    wanted = [selector[3:]] if isinstance(selector, str) else list(selector)
    vocab = sorted(set(names) | {n.rsplit(".", 1)[-1] for n in names if n})
    near = sorted({c for w in wanted for c in difflib.get_close_matches(w, vocab, n=4, cutoff=0.5)})
    sample = near or vocab[:8]
    return SpecError(
        where, selector if isinstance(selector, str) else list(selector),
        "names or dotted suffixes of modules in the model",
        f"it matches no module; closest module names: {sample}",
    )


def for_model_type(model: nn.Module, table, where: str) -> tuple[str, ...]:
    """A method's default selector for the model's ``config.model_type`` (PEFT's tables)."""
    mt = getattr(getattr(model, "config", None), "model_type", None)
    if mt not in table:
        raise SpecError(where, None, f"explicit module names (no default for model type {mt!r}; "
                        f"defaults exist for {sorted(table)})")
    return tuple(table[mt])


def seq_cls_heads(model: nn.Module) -> list[str]:
    return [h for h in SEQ_CLS_HEADS if isinstance(getattr(model, h, None), nn.Module)]


def _all_linear(model: nn.Module, task_type: str | None) -> list[str]:
    """PEFT's "all-linear": every Linear/Conv1D but the output head."""
    names = [n for n, m in model.named_modules() if linear_kind(m)]
    head = None
    get_out = getattr(model, "get_output_embeddings", None)
    if callable(get_out):
        head = get_out()
    excluded = {n for n, m in model.named_modules() if head is not None and m is head}
    if head is None and task_type == "SEQ_CLS":
        for h in seq_cls_heads(model)[:1]:
            excluded.add(h)
    return [n for n in names if n not in excluded]


def resolve(entry, model: nn.Module, where: str, *, task_type=None, kinds=("linear", "conv1d"),
            protected: list[str] = ()) -> dict[str, str]:
    """Module paths (-> kind) that a method entry adapts.

    ``entry`` has ``targets``, and optionally ``exclude``, ``layers``, ``layers_pattern``.
    ``protected`` are module paths trained whole (modules_to_save): never adapted, as in PEFT.
    """
    modules = dict(model.named_modules())
    names = [n for n in modules if n]
    sel = entry.targets
    if sel is None:  # the method's defaults for this model type (PEFT's tables)
        sel = entry.default_targets(model)
    if sel == "all-linear":
        found = _all_linear(model, task_type)
    else:
        found = match_names(sel, names, layers=getattr(entry, "layers", None),
                            layers_pattern=getattr(entry, "layers_pattern", None))
        if not found:
            raise no_match(f"{where}.targets", sel, names)
        if not isinstance(sel, str):
            unmatched = [t for t in sel if not match_names((t,), names)]
            if unmatched:
                warnings.warn(f"{where}.targets: {unmatched} match no module", stacklevel=3)
    exclude = getattr(entry, "exclude", None)
    if exclude:
        found = [n for n in found if not matches(exclude, n)]
    found = [n for n in found if not any(n == p or n.startswith(p + ".") for p in protected)]
    out = {}
    for n in found:
        kind = module_kind(modules[n])
        if kind not in kinds:
            if sel == "all-linear" or isinstance(sel, str):
                continue  # a regex may also match containers; keep only supported layers
            raise SpecError(f"{where}.targets", n, f"modules of kind {list(kinds)}",
                            f"{n!r} is a {type(modules[n]).__name__}")
        out[n] = kind
    if not out:
        raise no_match(f"{where}.targets", sel, names)
    return out


def match_parameters(selector, names: list[str]) -> list[str]:
    """Parameter names PEFT's ``target_parameters`` select: the full name or a dotted suffix."""
    return [n for n in names if any(n == t or n.endswith("." + t) for t in selector)]


def resolve_parameters(entry, model: nn.Module, where: str) -> dict[str, str]:
    """Full parameter names (-> "parameter") that ``entry.targets`` select; 2-D or 3-D only."""
    params = dict(model.named_parameters())
    found = match_parameters(entry.targets, list(params))
    if not found:
        raise no_match(f"{where}.targets", entry.targets, list(params))
    for n in found:
        if params[n].dim() not in (2, 3):
            raise SpecError(f"{where}.targets", n, "2-D or 3-D parameters (a weight, or fused experts)",
                            f"{n!r} has shape {tuple(params[n].shape)}")
    return {n: "parameter" for n in found}


def infer_task_type(model: nn.Module) -> str | None:
    """PEFT task type from the HF class name; None for plain modules."""
    name = type(model).__name__
    for suffix, task in (("ForCausalLM", "CAUSAL_LM"), ("LMHeadModel", "CAUSAL_LM"),
                         ("ForSequenceClassification", "SEQ_CLS"),
                         ("ForConditionalGeneration", "SEQ_2_SEQ_LM"), ("ForSeq2SeqLM", "SEQ_2_SEQ_LM"),
                         ("ForTokenClassification", "TOKEN_CLS"), ("ForQuestionAnswering", "QUESTION_ANS")):
        if name.endswith(suffix):
            return task
    return "FEATURE_EXTRACTION" if hasattr(model, "config") and hasattr(model, "base_model_prefix") else None
