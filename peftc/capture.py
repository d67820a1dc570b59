"""Capture: nn.Module + example inputs -> fx.GraphModule in peftc's normal form.

Normal form, whatever the frontend: linears are ``aten.linear(x, W, b)`` (GPT-2's Conv1D stays
``aten.addmm(b, x2d, W)``) with weights as ``get_attr`` nodes named by the parameter's FQN;
layer norms ``aten.layer_norm``; dropouts ``aten.dropout(x, p, train)``; every node has ``meta["nn_module_stack"]`` naming
its owning module. The module tree of the GraphModule is fresh (only parameters are shared
with the user's model), so peftc can register adapter modules in it without touching the
user's modules.

The graph is captured in train mode: dropout probabilities are only visible then (HF models
pass ``dropout_p=0`` to attention in eval). ``set_training`` flips them afterwards.

Also here, for the graph cache and ``peftc.compile``: the outside loss (``outside_loss``: HF's
``loss_function`` on the graph's logits, so labels need no capture of their own), removal of
export's shape guards for a checked reuse (``drop_guards``), and ``restored_on_error`` (a
failed compile leaves the user's model as it was). Deep models: ``peftc.repeat_layers``.
"""

from __future__ import annotations

import contextlib
import inspect
import logging

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.export import Dim

from peftc.errors import CaptureError
from peftc.graph import fetch_attr, owning_module
from peftc.normalize import normalize_linears
from peftc.repeat_layers import layer_list, repeat_layer, truncated

__all__ = ["capture", "set_training", "owning_module", "register_train_flag", "DROPOUT_OPS", "SDPA",
           "TRAIN_FLAGS", "drop_guards", "LOSS_KEYS", "outside_loss", "preserved_modes", "restored_on_error"]

aten = torch.ops.aten
DROPOUT_OPS = (aten.dropout.default, aten.feature_dropout.default, aten.alpha_dropout.default,
               aten.feature_alpha_dropout.default)
SDPA = aten.scaled_dot_product_attention.default
TRAIN_P = "peftc_train_dropout_p"  # meta key: attention dropout p seen in train mode
TRAIN_FLAGS: dict = {op: 2 for op in DROPOUT_OPS}  # op -> index of its ``train`` argument (set_training)


def register_train_flag(op, index: int | None = None) -> None:
    """Makes ``set_training`` flip ``op``'s boolean ``train`` argument (a fused op with dropout
    registers itself when it is defined). ``index``: the argument's position, for a plain
    function (a torch op's is read from its schema)."""
    if index is None:
        names = [a.name for a in op._schema.arguments]
        if "train" not in names:
            raise ValueError(f"{op} has no 'train' argument: {names}")
        index = names.index("train")
    TRAIN_FLAGS[op] = index


def _is_hf(model: nn.Module) -> bool:
    return hasattr(model, "config") and hasattr(model, "base_model_prefix")


def capture(model: nn.Module, kwargs: dict, *, frontend: str = "auto",
            repeat_layers: bool = True) -> tuple[fx.GraphModule, str]:
    """Captures ``model(**kwargs)``; returns (graph module, frontend used). ``repeat_layers``:
    trace three layers of a deep model and repeat the third (``peftc.repeat_layers``)."""
    if frontend not in ("auto", "export", "fx"):
        raise CaptureError(f"frontend {frontend!r}: allowed 'auto', 'export', 'fx'")
    kwargs = {k: (v.detach().clone().contiguous() if isinstance(v, torch.Tensor) else v)
              for k, v in kwargs.items()}
    with preserved_modes(model):
        model.train()
        if frontend == "fx" or (frontend == "auto" and not _is_hf(model)):
            try:
                return _capture_fx(model, kwargs), "fx"
            except Exception as e:
                if frontend == "fx":
                    raise CaptureError(f"torch.fx.symbolic_trace failed: {e}") from e
        return _capture_export(model, kwargs, repeat_layers), "export"


@contextlib.contextmanager
def preserved_modes(model: nn.Module):
    """Restores every submodule's own train/eval flag on exit (``model.train(was)`` would flatten
    a user's mix, e.g. a frozen encoder kept in eval)."""
    modes = [(m, m.training) for m in model.modules()]
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


@contextlib.contextmanager
def restored_on_error(model: nn.Module):
    """On an exception, puts the user's model back as it was: each module's children, parameters,
    buffers, hooks and train flag, each parameter's tensor (a quantized base releases it) and
    ``requires_grad``. References only, no copies of weights: an in-place write to a weight cannot be
    undone, so one is named in a note on the exception (peftc writes none before compile returns)."""
    kinds = ("_modules", "_parameters", "_buffers", "_forward_hooks", "_forward_pre_hooks")
    modules = [(m, m.training, [(k, dict(getattr(m, k))) for k in kinds]) for m in model.modules()]
    params = {id(p): (n, p, p.data, p.requires_grad, p._version)
              for n, p in model.named_parameters(remove_duplicate=False)}
    try:
        yield
    except BaseException as e:
        for m, mode, dicts in modules:
            m.training = mode
            for k, saved in dicts:
                live = getattr(m, k)
                live.clear()
                live.update(saved)
        changed = []
        for name, p, data, grad, version in params.values():
            if p._version != version:
                changed.append(name)
            p.data = data
            p.requires_grad_(grad)
        if changed:
            e.add_note(f"peftc.compile failed after writing in place to {changed[:5]}: those weights differ now")
        raise


def drop_guards(gm: fx.GraphModule) -> bool:
    """Removes the shape-guard call torch.export puts after the placeholders (``_guards_fn``);
    returns whether there was one. Used on a copy reused for shapes its guards reject (size-1
    dims), after that copy was checked against the eager model."""
    found = False
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn" and not node.users:
            gm.graph.erase_node(node)
            found = True
    if found:
        gm.recompile()
    return found


# keywords HF's loss functions take; with ``labels`` they move out of the graph (``outside_loss``)
LOSS_KEYS = ("labels", "num_items_in_batch", "ignore_index", "shift_labels")
_LOSS_CALLS = {  # loss_type -> how the model's head calls self.loss_function (transformers 5)
    "ForCausalLM": lambda m, logits, kw: m.loss_function(logits=logits, vocab_size=m.config.vocab_size, **kw),
    "ForMaskedLM": lambda m, logits, kw: m.loss_function(logits=logits, vocab_size=m.config.vocab_size, **kw),
    "ForSequenceClassification": lambda m, logits, kw: m.loss_function(
        labels=kw["labels"], pooled_logits=logits, config=m.config),
    "ForTokenClassification": lambda m, logits, kw: m.loss_function(logits, kw.pop("labels"), m.config, **kw),
}


def outside_loss(model: nn.Module):
    """``finish(output, loss_kwargs) -> output with .loss``: the model's own loss function
    applied to the graph's logits, as the model's head applies it, or None where peftc knows no
    such rule (not an HF model, encoder-decoder: labels also build the decoder inputs). The
    caller checks the rule once against the eager model before relying on it."""
    config = getattr(model, "config", None)
    if not _is_hf(model) or not hasattr(model, "loss_function") or getattr(config, "is_encoder_decoder", False):
        return None
    call = _LOSS_CALLS.get(getattr(model, "loss_type", None) or "ForCausalLM")  # transformers' own fallback
    if call is None:
        return None

    def finish(output, loss_kwargs: dict):
        loss = call(model, output.logits, dict(loss_kwargs))
        fields = {k: v for k, v in output.items() if k != "loss"}
        return type(output)(loss=loss, **fields)
    return finish


def _capture_export(model: nn.Module, kwargs: dict, repeat: bool) -> fx.GraphModule:
    path = layer_list(model) if repeat else None
    if path is not None:
        layers = len(model.get_submodule(path))
        with truncated(model, path):
            gm = _export(model, kwargs)
        if repeat_layer(gm, model, path, layers):
            return _mark_sdpa(gm)
    return _mark_sdpa(_export(model, kwargs))


def _mark_sdpa(gm: fx.GraphModule) -> fx.GraphModule:
    gm = normalize_linears(gm)  # x @ W.T, einsum, mm, ... -> aten.linear (after layers are repeated)
    for node in gm.graph.nodes:
        if node.target is SDPA:
            node.meta[TRAIN_P] = _sdpa_p(node)
    return gm


def _export(model: nn.Module, kwargs: dict) -> fx.GraphModule:
    dynamic = {k: ({i: Dim.AUTO for i in range(v.dim())} if isinstance(v, torch.Tensor) else None)
               for k, v in kwargs.items()}
    quiet = logging.getLogger("torch._export.non_strict_utils")  # 0/1 specialization notes:
    level, quiet.level = quiet.level, logging.ERROR  # size-1 dims get their own graph anyway
    try:
        ep = torch.export.export(model, (), kwargs=kwargs, dynamic_shapes=dynamic, strict=False)
    except Exception as e:
        raise CaptureError(f"torch.export failed on {type(model).__name__}: {e}") from e
    finally:
        quiet.setLevel(level)
    return ep.module()


def _sdpa_p(node: fx.Node) -> float:
    if len(node.args) > 4:
        return float(node.args[4])
    return float(node.kwargs.get("dropout_p", 0.0))


def _capture_fx(model: nn.Module, kwargs: dict) -> fx.GraphModule:
    sig = inspect.signature(model.forward)
    concrete = {}
    for name, p in sig.parameters.items():
        if name in kwargs and not isinstance(kwargs[name], torch.Tensor):
            concrete[name] = kwargs[name]
        elif name not in kwargs and p.default is not inspect.Parameter.empty:
            concrete[name] = p.default
    traced = fx.symbolic_trace(model, concrete_args=concrete or None)
    modules = dict(model.named_modules())
    root: dict = {}
    graph = traced.graph
    for node in list(graph.nodes):
        if node.op == "get_attr":
            root[node.target] = fetch_attr(model, node.target)
            _set_stack(node, node.target.rpartition(".")[0], modules)
        elif node.op == "call_module":
            mod = modules[node.target]
            if isinstance(mod, nn.Linear):
                _replace(graph, node, aten.linear.default, root, model, modules,
                         [node.args[0], _Attr(f"{node.target}.weight")]
                         + ([_Attr(f"{node.target}.bias")] if mod.bias is not None else []))
            elif isinstance(mod, nn.LayerNorm) and mod.elementwise_affine:
                _replace(graph, node, aten.layer_norm.default, root, model, modules,
                         [node.args[0], list(mod.normalized_shape), _Attr(f"{node.target}.weight"),
                          _Attr(f"{node.target}.bias") if mod.bias is not None else None, float(mod.eps)])
            elif isinstance(mod, nn.Dropout):
                _replace(graph, node, aten.dropout.default, root, model, modules,
                         [node.args[0], float(mod.p), True])
            else:
                root[node.target] = mod
                _set_stack(node, node.target, modules)
        elif node.op == "call_function" and node.target in (F.linear, F.dropout):
            _normalize_functional(node)
    graph.lint()
    return normalize_linears(fx.GraphModule(root, graph, class_name=type(model).__name__ + "Graph"))


class _Attr(str):
    """A parameter path among a replacement op's arguments (becomes a get_attr node)."""


def _set_stack(node: fx.Node, path: str, modules: dict) -> None:
    if path in modules:
        node.meta["nn_module_stack"] = {path: (path, type(modules[path]).__qualname__)}


def _replace(graph, node, op, root, model, modules, args) -> None:
    with graph.inserting_before(node):
        real = []
        for a in args:
            if isinstance(a, _Attr):
                root[a] = fetch_attr(model, a)
                a = graph.get_attr(a)
                _set_stack(a, node.target, modules)
            real.append(a)
        new = graph.call_function(op, tuple(real))
    _set_stack(new, node.target, modules)
    node.replace_all_uses_with(new)
    graph.erase_node(node)


def _normalize_functional(node: fx.Node) -> None:
    bound = inspect.signature(node.target).bind(*node.args, **node.kwargs)
    bound.apply_defaults()
    a = bound.arguments
    if node.target is F.linear:
        node.target, node.args = aten.linear.default, (a["input"], a["weight"], a["bias"])
    else:
        node.target, node.args = aten.dropout.default, (a["input"], float(a["p"]), bool(a["training"]))
    node.kwargs = {}


def set_training(gm: fx.GraphModule, mode: bool) -> bool:
    """Sets every dropout in the graph to train/eval; returns whether the graph changed."""
    changed = False
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in TRAIN_FLAGS:
            i = TRAIN_FLAGS[node.target]
            if node.args[i] is not mode:
                node.args = (*node.args[:i], mode, *node.args[i + 1:])
                changed = True
        elif node.op == "call_function" and node.target is SDPA and TRAIN_P in node.meta:
            p = node.meta[TRAIN_P] if mode else 0.0
            if _sdpa_p(node) != p:
                if len(node.args) > 4:
                    node.args = (*node.args[:4], p, *node.args[5:])
                else:
                    node.kwargs = {**node.kwargs, "dropout_p": p}
                changed = True
        elif node.op == "call_module":
            mod = gm.get_submodule(node.target)
            if mod.training is not mode:
                nn.Module.train(mod, mode)
    if changed:
        gm.recompile()
    return changed
