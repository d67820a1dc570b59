"""``cm.export_aot(dir)`` / ``peftc export --aot DIR``: ``cm.generate``'s step graphs, ahead of time.

The package serves greedy generation with torch alone (no peftc, no transformers, no Python
model code):

    DIR/prefill.pt2      the prefill step graph (prompt of s >= 2 tokens), AOTInductor-compiled
    DIR/decode.pt2       the decode step graph (one token)
    DIR/peftc_aot.json   cache geometry and dtype, special tokens, virtual tokens, adapters, ranges
    DIR/generate.py      the loop (``peftc/aot_loop.py``'s source): ``python DIR/generate.py --ids 1,2,3``

Each graph is the one ``cm.generate`` runs (``peftc.generation``: the language model over a KV
cache of input tensors, rewritten by the pipeline for the running adapters), built afresh in eval
mode, re-exported with ``torch.export`` (dynamic batch, prompt, mask and cache lengths) and
compiled by ``torch._inductor.aoti_compile_and_package``. The cache writes stay in place: the
exported programs keep them as input mutations and the AOTI model writes the caller's tensors.

- ``adapter_names=[a, b]``: a multi-adapter package. The graphs are the mixed-batch ones (each
  adapter's terms masked by its rows, the masked form: peftc's segmented op would need peftc to
  load); the per-adapter sample masks, buffers under ``MASKS`` in ``cm.generate``, become one
  input ``adapter_mask`` (A, B), row a selecting adapter a's samples.
- Model-level optimizations (``optimize``) are left out, said in the manifest's ``notes``: their
  fused ops are peftc custom ops that a torch-only process cannot run, and AOTInductor fuses the
  graph itself. Merged adapters export as merged weights.

Example::

    cm.export_aot("served/")                          # the running adapters
    cm.export_aot("multi/", adapter_names=["a", "b"])  # per-row adapters
    # any process with torch:  python served/generate.py --ids 1,2,3 --max-new-tokens 8
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
import time
import warnings
from collections import Counter
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch
from torch import fx
from torch.export import Dim, ExportedProgram
from torch.export.dynamic_shapes import refine_dynamic_shapes_from_suggested_fixes

from peftc import aot_loop
from peftc.capture import set_training
from peftc.errors import PeftcError, SpecError
from peftc.generation import generator
from peftc.graph_cache import MASKS, GraphCache
from peftc.model_family import kv_geometry
from peftc.passes import build
from peftc.peft_files import replace_dir

__all__ = ["export_aot", "step_programs", "MANIFEST", "ADAPTER_MASK"]

MANIFEST = aot_loop.MANIFEST
ADAPTER_MASK = aot_loop.ADAPTER_MASK  # the input that replaces the MASKS buffers in a multi-adapter package
_TORCH_NAMESPACES = ("aten", "prims")  # ops an AOTInductor package runs without peftc loaded


def export_aot(cm, directory: str | os.PathLike, *, example_length: int = 8, max_cache_len: int | None = None,
               adapter_names: list[str] | None = None) -> Path:
    """Writes the AOTInductor package of ``cm.generate``'s prefill and decode graphs to ``directory``
    and returns its path. The package is built in a temp dir next to it and renamed into place: an
    existing ``directory`` is replaced as a whole, and left as it was if export fails.

    ``example_length``: the prompt length the graphs are traced at (2 or more; any length runs);
    ``max_cache_len``: the longest prompt + virtual + new tokens the package accepts (default: the
    model's ``max_position_embeddings``); ``adapter_names``: a multi-adapter package, one adapter
    chosen per row at run time (LoRA-family adapters, not merged)."""
    programs, manifest = step_programs(cm, example_length=example_length, max_cache_len=max_cache_len,
                                       adapter_names=adapter_names)
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}-"))
    try:
        for kind, ep in programs.items():
            t0 = time.perf_counter()
            torch._inductor.aoti_compile_and_package(ep, package_path=str(tmp / manifest["graphs"][kind]))
            manifest["seconds"][kind]["aot_compile"] = round(time.perf_counter() - t0, 2)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        shutil.copyfile(aot_loop.__file__, tmp / "generate.py")
        replace_dir(tmp, directory)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    for note in manifest["notes"]:
        warnings.warn(note, stacklevel=2)
    return directory


def step_programs(cm, *, example_length: int = 8, max_cache_len: int | None = None,
                  adapter_names: list[str] | None = None) -> tuple[dict[str, ExportedProgram], dict]:
    """({"prefill": program, "decode": program}, the package manifest): what ``export_aot`` compiles.
    ``program.module()`` runs as the compiled package does (``aot_loop.Package(manifest, ...)``)."""
    lm = cm.get_base_model()
    if not hasattr(lm, "generate") or getattr(lm, "config", None) is None or lm.config.is_encoder_decoder:
        raise PeftcError(f"export_aot needs a decoder-only HF language model; {type(lm).__name__} is not one")
    names = _check_names(cm, adapter_names)
    gen = generator(cm)
    virtual = 0 if names else gen._virtual_tokens()
    limit = int(max_cache_len or getattr(lm.config, "max_position_embeddings", None) or 4096)
    if example_length < 2 or example_length + virtual + 4 > limit:
        raise SpecError("example_length", example_length, f"2 or more, with {virtual} virtual tokens + 4 "
                        f"within max_cache_len {limit}")
    geometry = kv_geometry(lm)
    like = next(p for p in lm.parameters() if p.is_floating_point())  # the cache's dtype, as Generator's
    programs, ranges, seconds = {}, {}, {}
    for kind, graphs in (("prefill", gen.prefill), ("decode", gen.decode)):
        inputs = _example(kind, geometry, like, example_length, virtual, names)
        t0 = time.perf_counter()
        gm = _step_graph(graphs, inputs, names)
        programs[kind], dims = _export(gm, inputs, _dims(kind, geometry[0], names, limit))
        ranges[kind] = _ranges(dims)
        seconds[kind] = {"export": round(time.perf_counter() - t0, 2)}
    notes = []
    if cm.registry.optimize:
        notes.append(f"optimize {sorted(cm.registry.optimize)} left out: the package runs the graphs without "
                     "peftc's optimizations (their ops need peftc loaded); AOTInductor fuses them itself")
    notes += _generation_notes(lm)
    eos = lm.generation_config.eos_token_id
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    pad = lm.generation_config.pad_token_id
    manifest = {
        "format": "peftc-aot/1",
        "graphs": {"prefill": "prefill.pt2", "decode": "decode.pt2"},
        "inputs": list(inputs),
        "kv_geometry": list(geometry), "cache_dtype": str(like.dtype).removeprefix("torch."),
        "device": like.device.type, "max_cache_len": limit, "ranges": ranges,
        "eos_token_id": eos, "pad_token_id": pad if pad is not None or not eos else eos[0],  # HF's fallback
        "virtual_tokens": virtual, "adapters": list(names or ()), "running": list(cm.registry.running),
        "merged": cm.registry.merged, "seconds": seconds, "notes": notes, "versions": _versions(),
    }
    return programs, manifest


def _check_names(cm, names) -> tuple[str, ...] | None:
    if names is None:
        return None
    names = tuple(names)
    known = cm.adapter_names
    if not names or len(set(names)) != len(names) or not set(names) <= set(known):
        raise SpecError("adapter_names", list(names), f"distinct names of added adapters {known}")
    if cm.registry.merged:
        raise SpecError("adapter_names", list(names), "nothing while adapters are merged (unmerge first)")
    return names


def _example(kind: str, geometry, like: torch.Tensor, length: int, virtual: int, names) -> dict:
    """Inputs as ``Generator.step`` makes them: batch 3, a prompt of ``length`` (prefill) or one token
    after it (decode), a cache with room for 4 more (sizes kept apart: export may unify equal ones)."""
    layers, heads, dim = geometry
    batch, seq = 3, length if kind == "prefill" else 1
    past = 0 if kind == "prefill" else length + virtual
    cols = length if kind == "prefill" else past + 1
    device = like.device
    inputs = {"input_ids": torch.ones(batch, seq, dtype=torch.long, device=device),
              "attention_mask": torch.ones(batch, cols, dtype=torch.long, device=device),
              "start": torch.full((batch, 1), 0 if kind == "prefill" else past, dtype=torch.long, device=device),
              "past": torch.tensor(past, device=device)}
    cache = (batch, heads, length + virtual + 4, dim)
    inputs.update({f"{k}_{i}": like.new_zeros(cache) for k in ("key", "value") for i in range(layers)})
    if names:
        inputs[ADAPTER_MASK] = torch.ones(len(names), batch, device=device)
    return inputs


def _step_graph(graphs: GraphCache, inputs: dict, names) -> fx.GraphModule:
    """A fresh step graph for ``inputs`` (the generator's capture, its cached graphs untouched):
    the running adapters' rewrites (or the mixed batch of ``names``, masked), no optimizations,
    eval mode, positional inputs named as ``inputs``."""
    step_inputs = {k: v for k, v in inputs.items() if k != ADAPTER_MASK}
    sig = graphs.resolve(step_inputs)
    plan = dataclasses.replace(graphs.plan(names, Counter(), {}, optimize=False), lower_mixed=False)
    built = build(graphs.copy_of_capture((sig, names)), plan)
    set_training(built, False)
    graph = fx.Graph()  # plain codegen: forward(input_ids, attention_mask, ...) -> logits
    leaves = graph.graph_copy(built.graph, {})
    graph.output(leaves[0] if isinstance(leaves, (list, tuple)) and len(leaves) == 1 else leaves)
    gm = fx.GraphModule(built, graph)
    if names:
        _masks_as_input(gm, names)
    foreign = sorted({str(n.target) for n in gm.graph.nodes if n.op == "call_function"
                      and isinstance(n.target, torch._ops.OpOverload) and n.target.namespace not in _TORCH_NAMESPACES})
    if foreign:
        raise PeftcError(f"the step graph calls {foreign}: an AOT package runs torch ops only (no peftc loaded)")
    return gm


def _masks_as_input(gm: fx.GraphModule, names: tuple[str, ...]) -> None:
    """``get_attr MASKS.<a>`` -> ``adapter_mask[index of a]``: the sample masks become an input (A, B)."""
    graph = gm.graph
    last = [n for n in graph.nodes if n.op == "placeholder"][-1]
    with graph.inserting_after(last):
        mask = graph.placeholder(ADAPTER_MASK)
    for node in list(graph.nodes):
        if node.op == "get_attr" and node.target.startswith(MASKS + "."):
            with graph.inserting_before(node):
                row = graph.call_function(torch.ops.aten.select.int, (mask, 0, names.index(node.target[len(MASKS) + 1:])))
            row.meta = dict(node.meta)
            node.replace_all_uses_with(row)
            graph.erase_node(node)
    graph.lint()
    gm.recompile()


def _dims(kind: str, layers: int, names, limit: int) -> dict:
    """Dynamic dims: batch, prompt length (prefill), mask columns and cache length (up to ``limit``)."""
    batch = Dim("batch", min=1)
    cache = Dim("cache", min=3, max=limit)
    dims = {"input_ids": {0: batch, 1: Dim("prompt", min=2, max=limit - 1)} if kind == "prefill" else {0: batch},
            "attention_mask": {0: batch, 1: Dim("mask", min=2, max=limit - 1)},  # at most cache - 1 columns
            "start": {0: batch}, "past": {}}
    dims.update({f"{k}_{i}": {0: batch, 2: cache} for k in ("key", "value") for i in range(layers)})
    if names:
        dims[ADAPTER_MASK] = {1: batch}
    return dims


def _export(gm: fx.GraphModule, inputs: dict, dims: dict):
    """``torch.export`` of a step graph; where the dims' ranges are wider than the graph allows, once
    more with export's suggested ranges (the manifest records the ranges used)."""
    kwargs = {k: v.clone() for k, v in inputs.items()}
    try:
        return torch.export.export(gm, (), kwargs=kwargs, dynamic_shapes=dims, strict=False), dims
    except torch._dynamo.exc.UserError as e:
        if "Suggested fixes" not in str(e):
            raise PeftcError(f"torch.export of the step graph failed: {e}") from e
        fixes = str(e).split("\n\n")[0]  # the fixes end at the first blank line
        dims = refine_dynamic_shapes_from_suggested_fixes(fixes, dims)
    try:
        return torch.export.export(gm, (), kwargs=kwargs, dynamic_shapes=dims, strict=False), dims
    except torch._dynamo.exc.UserError as e:
        raise PeftcError(f"torch.export of the step graph failed with export's suggested ranges: {e}") from e


def _ranges(dims: dict) -> dict:
    """Each named dim's [min, max] (None: unbounded), or its fixed size."""
    out = {}
    for spec in dims.values():
        for d in (spec or {}).values():
            if isinstance(d, int):
                continue
            name = getattr(d, "__name__", str(d))
            out[name] = [getattr(d, "min", None), getattr(d, "max", None)]
    return {k: [lo, None if hi is None or hi >= 2**62 else hi] for k, (lo, hi) in out.items()}


# generation settings that change HF's greedy tokens; the loop applies none of them
_NOT_APPLIED = ("do_sample", "num_beams", "repetition_penalty", "encoder_repetition_penalty", "no_repeat_ngram_size",
                "bad_words_ids", "sequence_bias", "min_length", "min_new_tokens", "suppress_tokens",
                "begin_suppress_tokens", "forced_bos_token_id", "forced_eos_token_id", "renormalize_logits",
                "exponential_decay_length_penalty")


def _generation_notes(lm) -> list[str]:
    """The model's generation settings that change greedy tokens and that the loop does not apply."""
    set_here = lm.generation_config.to_diff_dict()
    other = {k: set_here[k] for k in _NOT_APPLIED if k in set_here}
    return [f"generation_config sets {other}: the loop is plain greedy search (argmax, EOS, pad)"] if other else []


def _versions() -> dict:
    out = {"torch": torch.__version__}
    for dist in ("transformers", "peftc"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = None
    return out
