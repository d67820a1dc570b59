"""``cm.generate``: HF's generation loop over peftc's rewritten graphs, with a KV cache.

HF's ``GenerationMixin.generate`` of the wrapped model runs unchanged (greedy, sampling, beam
search, logits processors, stopping criteria, left-padded batches); only its model call is
peftc's: for the duration of the call the model's ``forward`` (on the instance, restored after)
is ``Generator.step``, which runs a captured *step graph*:

    step(input_ids (B, s), attention_mask (B, past+s), start (B, 1), past (), key_i, value_i (B, H, T, D))
        positions = clamp(start + arange(s), 0)
        key_i[:, :, past:past+s] = k_i   (in place: the cache is a graph input)
        -> logits of the last position (B, 1, V)

The model is captured around a static cache whose tensors are inputs (transformers' executorch
export keeps them as buffers instead), so one graph serves every batch size (size 1 apart, as for
every peftc graph), cache length and beam reordering, and the graph goes through the same rewrite
and optimization passes as training:

- site methods (LoRA, IA3, ...): the same linear sites;
- prefix tuning: its pass puts P learned keys/values before the cache's and shifts the positions
  (which come from an ``arange``) by P: PEFT's prefix in its cache, the same attention;
- prompt / P-tuning: the prefill graph widens ids and mask by P and so writes the virtual tokens
  into the cache; decode graphs are rewritten without the token insertion, their mask widened by
  P, positions counted from the cache (PEFT ignores position ids for these methods).

Two graphs run per batch shape: the prefill (once) and the decode step (every new token); each is
captured once and reused by later calls. ``stats`` counts captures and graph calls.
"""

from __future__ import annotations

import copy
import functools
import inspect
import time
from collections import Counter

import torch
from torch import fx, nn

from peftc.adapters import AdapterState
from peftc.capture import capture, set_training
from peftc.errors import PeftcError, SpecError
from peftc.graph_cache import MASKS, GraphCache
from peftc.model_family import kv_geometry

__all__ = ["Generator", "generate", "generator", "reset"]

_MODE = "peftc_generation_training"  # graph meta: the train flag its dropouts were last set to


def generator(cm) -> Generator:
    """The compiled model's generation engine (made on first use, kept on the model)."""
    gen = cm.__dict__.get("_generator")
    if gen is None:
        gen = Generator(cm)
        cm.__dict__["_generator"] = gen
    return gen


def reset(cm, *, captures: bool = False) -> None:
    """Drops the rewritten step graphs (the adapters changed); ``captures`` too (device/dtype)."""
    gen = cm.__dict__.get("_generator")
    if gen is not None:
        gen.invalidate(captures=captures)


def generate(cm, *args, adapter_names: list[str] | None = None, **kwargs):
    """HF ``generate`` with the running adapters applied, with a KV cache.

    Example::

        out = cm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=16)      # greedy
        out = cm.generate(input_ids=ids, do_sample=True, top_k=5, max_new_tokens=8)
        out = cm.generate(input_ids=ids, num_beams=3, max_new_tokens=8)
        out = cm.generate(input_ids=ids, adapter_names=["a", "__base__"], max_new_tokens=8)  # per sample
    """
    lm = cm.get_base_model()
    if (not hasattr(lm, "generate") or getattr(lm, "config", None) is None
            or getattr(lm.config, "is_encoder_decoder", False)):
        raise PeftcError(f"generate needs a decoder-only HF language model; {type(lm).__name__} is not one")
    return generator(cm).generate(*args, adapter_names=adapter_names, **kwargs)


class _DecodeView:
    """The adapter registry as decode steps see it: without the token-inserting entries, whose
    virtual tokens the prefill already wrote into the cache. Everything else is the registry's."""

    def __init__(self, registry):
        self._registry = registry

    def __getattr__(self, name):
        return getattr(self._registry, name)

    def state(self, name: str) -> AdapterState:
        s = self._registry.state(name)
        keep = [i for i, m in enumerate(s.spec.methods) if not m.inserts_tokens]
        spec = copy.copy(s.spec)  # a spec may become empty here (Spec() refuses that for users)
        object.__setattr__(spec, "methods", tuple(s.spec.methods[i] for i in keep))
        return AdapterState(spec, [s.targets[i] for i in keep], s.trainable)


@functools.cache
def _slot_layer():
    """The traced cache's layer class (made on first use: transformers is imported lazily)."""
    from transformers.cache_utils import StaticLayer

    class SlotLayer(StaticLayer):
        """``keys``/``values`` are graph inputs, written in place from slot ``past`` on; the mask
        spans their whole (symbolic) length, so one graph serves every cache length."""

        def __init__(self, keys: torch.Tensor, values: torch.Tensor, past: torch.Tensor):
            super().__init__(max_cache_len=1)
            self.keys, self.values, self.past = keys, values, past
            self.is_initialized, self.max_cache_len = True, keys.shape[2]

        def update(self, key_states, value_states, *args, **kwargs):
            slots = torch.arange(key_states.shape[-2], device=key_states.device) + self.past
            self.keys.index_copy_(2, slots, key_states.to(self.keys.dtype))
            self.values.index_copy_(2, slots, value_states.to(self.values.dtype))
            return self.keys, self.values

        def get_mask_sizes(self, query_length) -> tuple:
            return self.keys.shape[2], 0

        def get_seq_length(self):
            return self.past

        def get_max_cache_shape(self):
            return self.keys.shape[2]

    return SlotLayer


def _traced_cache(config, layers: list):
    from transformers.cache_utils import StaticCache

    cache = StaticCache(config=config, max_cache_len=1)
    cache.layers = layers
    return cache


class _Step(nn.Module):
    """What a step graph is captured from: the language model over a cache of given tensors.
    Its children are the model's (same module paths, same parameters), so passes find the sites
    and adapters they find in the training graph."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self._modules.update(lm._modules)
        self.__dict__["_lm"] = lm  # not a child: its children are ours
        self.config, self.base_model_prefix = lm.config, lm.base_model_prefix  # capture: an HF model
        self._keep = "logits_to_keep" in inspect.signature(lm.forward).parameters
        self.training = lm.training
        # export binds inputs by the forward's named parameters: name every cache tensor
        layers = kv_geometry(lm)[0]
        names = ["input_ids", "attention_mask", "start", "past",
                 *(f"{kind}_{i}" for kind in ("key", "value") for i in range(layers))]
        run = functools.partial(type(self).forward, self)
        run.__signature__ = inspect.Signature(
            [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD) for n in names])
        self.__dict__["forward"] = run

    def forward(self, input_ids, attention_mask, start, past, **kv):
        n = len(kv) // 2
        seq = input_ids.shape[1]
        positions = (torch.arange(seq, device=input_ids.device) + start).clamp(min=0)
        layers = [_slot_layer()(kv[f"key_{i}"], kv[f"value_{i}"], past) for i in range(n)]
        extra = {"logits_to_keep": 1} if self._keep else {}
        lm = self._lm  # its class's forward: the instance's is Generator.step during generate
        out = type(lm).forward(lm, input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
                               past_key_values=_traced_cache(self.config, layers), use_cache=True, **extra)
        return out.logits[:, -1:]


class _KVCache:
    """The cache HF's loop carries between steps: the step graphs' key/value inputs (allocated at
    the prefill, for its batch) and how many positions they hold. Not ``is_compileable``, so HF
    passes the 2D mask (the graph builds the 4D one)."""

    is_compileable = False

    def __init__(self, length: int):
        self.length, self.seen = length, 0
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []

    def allocate(self, batch: int, geometry: tuple[int, int, int], like: torch.Tensor) -> None:
        layers, heads, dim = geometry
        shape = (batch, heads, self.length, dim)
        self.keys = [like.new_zeros(shape) for _ in range(layers)]
        self.values = [like.new_zeros(shape) for _ in range(layers)]

    def inputs(self) -> dict[str, torch.Tensor]:
        return {**{f"key_{i}": k for i, k in enumerate(self.keys)},
                **{f"value_{i}": v for i, v in enumerate(self.values)}}

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: row b continues beam ``beam_idx[b]`` (in place: the tensors stay)."""
        for t in (*self.keys, *self.values):
            t.copy_(t.index_select(0, beam_idx.to(t.device)))


class Generator:
    """Step graphs of one compiled model and the HF generate call over them.

    ``prefill`` and ``decode`` are GraphCaches over the model captured by ``_Step`` (they share
    the captures): ``prefill`` rewrites as the compiled model does, ``decode`` leaves out token
    insertion. ``stats``: ``captures`` (and ``capture_seconds``), ``prefill`` and ``decode`` graph
    calls, ``steps`` (HF's model calls)."""

    def __init__(self, cm):
        self.cm = cm
        self.step_module = _Step(cm.get_base_model())
        self.stats: Counter = Counter()
        # no size-1 reuse: the decode step keeps a graph specialised to one token
        self.prefill = GraphCache(cm.registry, self._capture, checks=False, name="prefill: ", reference=self.step_module)
        self.decode = GraphCache(_DecodeView(cm.registry), self._capture, checks=False, name="decode step: ",
                                 reference=self.step_module)
        self.decode.captured = self.prefill.captured

    def _capture(self, kwargs: dict, repeat_layers: bool = True) -> fx.GraphModule:
        """A deep model's step graph traces three layers and repeats the third (the graph cache
        checks it once against ``_Step``, on copies of the cache)."""
        t0 = time.perf_counter()
        gm = torch.compiler.disable(capture)(self.step_module, kwargs, frontend="export", repeat_layers=repeat_layers)[0]
        self.stats["captures"] += 1
        self.stats["capture_seconds"] += time.perf_counter() - t0
        return gm

    def invalidate(self, *, captures: bool = False) -> None:
        if captures:
            self.prefill.captured.clear()
        self.prefill.invalidate()
        self.decode.invalidate()

    # ---- what the adapters need ------------------------------------------------------------
    def _virtual_tokens(self) -> int:
        """P of the running adapter whose method inserts virtual tokens (``inserts_tokens``), else 0."""
        reg = self.cm.registry
        if reg.merged:
            return 0
        return sum(m.tokens for n in reg.running for m in reg.state(n).spec.methods if m.inserts_tokens)

    # ---- the call --------------------------------------------------------------------------
    def generate(self, *args, adapter_names=None, **kwargs):
        lm = self.cm.get_base_model()
        if args:
            kwargs = {"input_ids": args[0], **kwargs} if len(args) == 1 else None
            if kwargs is None:
                raise TypeError("generate takes input_ids as its only positional argument")
        if kwargs.get("inputs") is not None:
            kwargs["input_ids"] = kwargs.pop("inputs")
        ids = kwargs.get("input_ids")
        if not isinstance(ids, torch.Tensor):
            raise SpecError("input_ids", type(ids).__name__, "a (batch, length) tensor of token ids "
                            "(inputs_embeds is not supported by cm.generate)")
        for bad in ("past_key_values", "cache_implementation", "inputs_embeds"):
            if kwargs.get(bad) is not None:
                raise SpecError(bad, type(kwargs[bad]).__name__, "unset: cm.generate runs its own static KV cache")
        if kwargs.get("use_cache") is False:
            raise SpecError("use_cache", False, "True: cm.generate always uses its KV cache")
        if self._virtual_tokens() and ids.shape[1] < 2:  # a length-1 capture fixes the length the prompt widens
            raise SpecError("input_ids", tuple(ids.shape), "a prompt of 2 tokens or more with a prompt-tuning adapter")
        self._names = self._check_names(adapter_names, ids.shape[0])
        cache = _KVCache(self._cache_length(lm, ids, kwargs) + self._virtual_tokens())
        original = lm.__dict__.get("forward")
        lm.forward = functools.wraps(type(lm).forward)(functools.partial(self.step, cache=cache))
        try:
            with torch.no_grad():
                return lm.generate(past_key_values=cache, **kwargs)
        finally:
            if original is None:
                del lm.forward
            else:
                lm.forward = original

    def _check_names(self, names, batch: int) -> list[str] | None:
        if names is None:
            return None
        names = list(names)
        known = set(self.cm.adapter_names) | {"__base__"}
        if len(names) != batch or not set(names) <= known:
            raise SpecError("adapter_names", names, f"one name per sample ({batch}) from {sorted(known)}")
        if self.cm.registry.merged:
            raise SpecError("adapter_names", names, "nothing while adapters are merged (unmerge first)")
        return names

    @staticmethod
    def _cache_length(lm, ids: torch.Tensor, kwargs: dict) -> int:
        """Prompt length + the most tokens this call can add (HF's max_new_tokens / max_length)."""
        gc = kwargs.get("generation_config") or lm.generation_config
        new = kwargs.get("max_new_tokens", None if "max_length" in kwargs else gc.max_new_tokens)
        if new is not None:
            return ids.shape[1] + int(new)
        return max(int(kwargs.get("max_length", gc.max_length)), ids.shape[1] + 1)

    def step(self, input_ids=None, attention_mask=None, *, cache: _KVCache, past_key_values=None, **ignored):
        """One model call of HF's loop: prefill (empty cache) or decode, through a step graph."""
        from transformers.modeling_outputs import CausalLMOutputWithPast

        self.stats["steps"] += 1
        batch, seq = input_ids.shape
        prefill = cache.seen == 0
        if prefill:
            like = next(p for p in self.cm.get_base_model().parameters() if p.is_floating_point())
            cache.allocate(batch, kv_geometry(self.cm.get_base_model()), like)
        if attention_mask is None:
            attention_mask = torch.ones(batch, cache.seen + seq, dtype=torch.long, device=input_ids.device)
        virtual = self._virtual_tokens()
        if virtual and not prefill:  # the P virtual tokens sit in the cache, in front
            attention_mask = torch.cat([attention_mask.new_ones(batch, virtual), attention_mask], 1)
        if virtual:  # PEFT ignores position ids here: positions count the cache
            start = torch.full((batch, 1), cache.seen, dtype=torch.long, device=input_ids.device)
        else:  # HF's positions: cumsum(mask) - 1, so a left-padded row starts at 0
            start = attention_mask.long().sum(-1, keepdim=True) - seq
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "start": start,
                  "past": torch.tensor(cache.seen, device=input_ids.device), **cache.inputs()}
        graphs = self.prefill if prefill else self.decode
        names = self._names
        if names is not None and len(names) != batch:  # beams / return sequences: rows per sample
            names = [n for n in names for _ in range(batch // len(names))]
        gm = self._graph(graphs, inputs, names)
        self.stats["prefill" if prefill else "decode"] += 1
        logits = gm(**inputs)
        cache.seen += seq + (virtual if prefill else 0)
        return CausalLMOutputWithPast(logits=logits, past_key_values=cache)

    def _graph(self, graphs: GraphCache, inputs: dict, names: list[str] | None) -> fx.GraphModule:
        training = self.cm.training
        if names is None:
            gm = graphs.graph_for(inputs, None, training)
        else:
            used = tuple(sorted(set(names) - {"__base__"}))
            gm = graphs.graph_for(inputs, used, training)
            device = inputs["input_ids"].device
            for n in used:
                mask = torch.tensor([name == n for name in names], dtype=torch.float32, device=device)
                gm.get_submodule(MASKS).register_buffer(n, mask, persistent=False)
        if gm.meta.get(_MODE) is not training:  # dropout as the compiled model's mode (HF's generate too)
            set_training(gm, training)
            gm.meta[_MODE] = training
        return gm
