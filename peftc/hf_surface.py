"""The attributes ``transformers.Trainer`` and accelerate read from a model, for CompiledModel.

Trainer picks dataset columns from ``inspect.signature(model.forward)`` (a ``(*args, **kwargs)``
forward gets an empty batch), decides from the forward's ``**kwargs`` whether to pass
``num_items_in_batch``, and reads ``config``, ``device``, ``main_input_name`` and the checkpointing
switches. ``HFSurface`` is the mixin CompiledModel takes them from; ``bind_forward`` gives each
instance a forward whose signature is the wrapped model's plus keyword-only ``adapter_names``.
Not covered: Trainer's label smoothing recognises causal LMs by class name (``CompiledX`` is
not one).

Trainer saves ``save_pretrained`` output only for ``PreTrainedModel``/``PeftModel`` instances;
for any other module it writes the full ``state_dict()``. ``adapter_checkpoints()`` is the
Trainer callback that also writes each checkpoint's adapter in PEFT format (what
``PeftModel.from_pretrained`` loads)::

    trainer = Trainer(model=cm, args=args, train_dataset=ds, callbacks=[adapter_checkpoints()])
"""

from __future__ import annotations

import functools
import inspect
import os
import typing
from pathlib import Path

import torch
from torch import nn

from peftc.errors import SpecError

__all__ = ["HFSurface", "bind_forward", "forward_keywords", "check_keywords", "checkpointing_notes",
           "adapter_checkpoints"]

_P = inspect.Parameter


def forward_keywords(model: nn.Module) -> tuple[list[str], frozenset[str] | None]:
    """The named parameters of ``model.forward`` and the keywords its ``**kwargs`` takes:
    the keys of an ``Unpack[TypedDict]`` annotation (transformers' ``TransformersKwargs``),
    ``None`` when it takes any keyword, an empty set when it has no ``**kwargs``."""
    params = inspect.signature(model.forward).parameters.values()
    named = [p.name for p in params if p.kind in (_P.POSITIONAL_OR_KEYWORD, _P.KEYWORD_ONLY)]
    var = next((p for p in params if p.kind is _P.VAR_KEYWORD), None)
    if var is None:
        return named, frozenset()
    ann = var.annotation
    if typing.get_origin(ann) is typing.Unpack or getattr(ann, "__origin__", None) is typing.Unpack:
        td = typing.get_args(ann)[0]
        return named, frozenset(getattr(td, "__required_keys__", ())) | frozenset(getattr(td, "__optional_keys__", ()))
    return named, None


def check_keywords(kwargs: dict, named: list[str], extra: frozenset[str] | None) -> None:
    """An unknown keyword (``ids=`` for ``input_ids=``) is the user's mistake: said before capture,
    where torch.export would report it as a ``dynamic_shapes`` mismatch. Keywords the model takes
    only through ``**kwargs`` (``output_hidden_states``) cannot be exported as graph inputs either."""
    unknown = sorted(k for k in kwargs if k not in named)
    if not unknown or extra is None:
        return
    through_kwargs = [k for k in unknown if k in extra]
    close = {k: [n for n in named if k in n or n in k] for k in unknown if k not in extra}
    hints = [f"did you mean {v[0]!r} for {k!r}?" for k, v in close.items() if v]
    if through_kwargs:
        hints.append(f"{through_kwargs} reach the model only through its **kwargs, which capture "
                     "(torch.export) cannot take as inputs; set them on the model's config instead")
    raise SpecError("forward keyword", unknown[0] if len(unknown) == 1 else unknown,
                    f"the model's forward parameters {named}", " ".join(hints))


def bind_forward(cm: nn.Module, model: nn.Module) -> None:
    """Makes ``cm``'s forward signature ``model.forward``'s (its parameters, ``**kwargs`` last)
    plus keyword-only ``adapter_names``. Trainer reads it from the instance (dataset columns)
    and from the class (``find_labels``: which inputs are labels, so eval reports a loss), and a
    method's signature is its class function's: so ``cm`` becomes an instance of a subclass,
    ``Compiled<ModelClass>``, whose ``forward`` carries the signature and calls CompiledModel's."""
    base = inspect.signature(model.forward)
    params = [p for p in base.parameters.values() if p.kind is not _P.VAR_POSITIONAL]
    var_kw = [p for p in params if p.kind is _P.VAR_KEYWORD]
    params = [p for p in params if p.kind is not _P.VAR_KEYWORD]
    params.append(_P("adapter_names", _P.KEYWORD_ONLY, default=None, annotation="list[str] | None"))
    cls = type(cm)
    cls_forward = cls.forward

    @functools.wraps(cls_forward)
    def forward(self, *args, **kwargs):
        return cls_forward(self, *args, **kwargs)

    forward.__signature__ = base.replace(parameters=[_P("self", _P.POSITIONAL_OR_KEYWORD), *params, *var_kw])
    name = f"Compiled{type(model).__name__}"  # Trainer reads "QuestionAnswering" etc. in the class name
    cm.__class__ = type(name, (cls,), {"forward": forward, "__module__": cls.__module__, "__qualname__": name,
                                       "__doc__": cls.__doc__})


def checkpointing_notes(kwargs) -> list[str]:
    """``gradient_checkpointing_kwargs`` (HF passes them to ``torch.utils.checkpoint``): peftc's
    recompute is always non-reentrant, so each one it does not apply is a ``graph_summary()`` line."""
    if kwargs is None:
        return []
    if not isinstance(kwargs, dict):
        raise SpecError("gradient_checkpointing_kwargs", kwargs, "a dict of torch.utils.checkpoint options or None")
    return [f"gradient_checkpointing_kwargs {k}={v!r} not applied: peftc's recompute is non-reentrant"
            for k, v in kwargs.items() if not (k == "use_reentrant" and v is False)]


class HFSurface:
    """The PreTrainedModel attributes Trainer and accelerate use, delegated to the bare model (``get_base_model()``)."""

    # Trainer passes ``num_items_in_batch`` to a model whose forward takes **kwargs; as a graph
    # input it would re-capture per value. Off, Trainer averages the per-batch mean loss itself.
    accepts_loss_kwargs = False

    @property
    def config(self):
        cfg = getattr(self.model, "config", None)
        if cfg is None:
            raise AttributeError(f"{type(self.model).__name__} has no config")
        return cfg

    @property
    def generation_config(self):
        gen = getattr(self.model, "generation_config", None)
        if gen is None:
            raise AttributeError(f"{type(self.model).__name__} has no generation_config")
        return gen

    @property
    def main_input_name(self) -> str:
        return getattr(self.model, "main_input_name", "input_ids")

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(p.dtype for p in self.model.parameters() if p.is_floating_point())

    def get_input_embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()

    def get_output_embeddings(self) -> nn.Module | None:
        return self.model.get_output_embeddings()

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs=None, every_n_layers: int = 1,
                                        offload: bool = False) -> None:
        """transformers 5's name for ``gradient_checkpointing_enable`` (what Trainer calls)."""
        if every_n_layers != 1 or offload:
            raise SpecError("activation_checkpointing", {"every_n_layers": every_n_layers, "offload": offload},
                            "every_n_layers=1 and offload=False", "peftc's recompute policy is per block; "
                            "see optimize: {recompute: ...} for other policies")
        self.gradient_checkpointing_enable(gradient_checkpointing_kwargs=activation_checkpointing_kwargs)

    def activation_checkpointing_disable(self) -> None:
        self.gradient_checkpointing_disable()

    @property
    def is_activation_checkpointing(self) -> bool:
        return self.is_gradient_checkpointing

    def save_pretrained(self, save_directory: str | os.PathLike, *, is_main_process: bool = True,
                        selected_adapters: list[str] | None = None, state_dict=None,
                        safe_serialization: bool = True, **ignored) -> Path:
        """The adapters in PEFT's format (``save_adapter``), as ``PeftModel.save_pretrained``:
        ``state_dict`` (Trainer's full one) and HF's serialization options are accepted and
        not used; ``is_main_process=False`` writes nothing."""
        if not safe_serialization:
            raise SpecError("safe_serialization", False, "True", "peftc writes safetensors only")
        if not is_main_process:
            return Path(save_directory)
        if selected_adapters is None:
            return self.save_adapter(save_directory)
        for name in selected_adapters:  # PEFT's layout: "default" at the root, others in <dir>/<name>
            self.save_adapter(Path(save_directory) / name if name != "default" else save_directory, name)
        return Path(save_directory)


def adapter_checkpoints():
    """A ``transformers.TrainerCallback`` that writes the model's adapter (PEFT format) into each
    checkpoint dir Trainer saves, next to its state dict; ``PeftModel.from_pretrained`` loads it."""
    from accelerate.utils import extract_model_from_parallel
    from transformers import TrainerCallback
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    class AdapterCheckpoints(TrainerCallback):
        def on_save(self, args, state, control, model=None, **kwargs):
            if state.is_world_process_zero and model is not None:
                extract_model_from_parallel(model).save_pretrained(Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")

    return AdapterCheckpoints()
