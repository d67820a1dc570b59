"""The ``peftc`` command: demo, compile, export, inspect, methods, bench.

    peftc demo                                    # LoRA on a built-in tiny Llama, end to end
    peftc demo --model smollm2                    # a real fine-tune of SmolLM2-135M-Instruct (peftc.demo_llm)
    peftc compile --model tiny-llama --spec examples/llama-lora.yaml --out adapter/
    peftc export --aot served/ --model tiny-llama --adapter adapter/   # generate's graphs, AOTInductor
    peftc inspect --model tiny-gpt2 --spec examples/gpt2-lora.yaml --svg layer0.svg --module transformer.h.0
    peftc inspect --model tiny-llama --spec examples/llama-lora.yaml --explorer   # Model Explorer, split view
    peftc inspect --model tiny-llama --spec examples/llama-lora.yaml --optimize fuse recompute --memory
    peftc methods
    peftc bench --memory                          # saved-for-backward bytes per recompute policy vs PEFT (+GC)
    peftc bench --serving                         # mixed batches: segmented vs masked LoRA, 1-64 adapters
    peftc bench --compile                         # frozen base vs PEFT vs peftc (fused), JSON + PNG + RESULTS.md
    peftc bench --codegen --only decode,train     # optimize: [compile] vs PEFT eager / + torch.compile (SmolLM2, Llama)
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import sys
import tempfile
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

__all__ = ["main", "DEMO_SPEC", "DEMO_LR", "DEPENDENCY_WARNINGS"]

console = Console(highlight=False)

# The embedded default of `peftc demo`: LoRA on every linear layer but the head, with dropout.
DEMO_SPEC = {"adapter": "default",
             "methods": [{"lora": {"targets": "all-linear", "r": 8, "alpha": 16, "dropout": 0.05}}]}

# Paraphrase pairs for the MiniLM demo (a sentence-embedding objective needs real text).
PAIRS = [
    ("A man is playing a guitar.", "Someone plays an acoustic guitar."),
    ("The cat sleeps on the sofa.", "A kitten is napping on the couch."),
    ("It is raining heavily today.", "There is a downpour this afternoon."),
    ("She is cooking pasta for dinner.", "A woman prepares spaghetti in the kitchen."),
    ("The stock market fell sharply.", "Share prices dropped a lot."),
    ("Children are playing football.", "Kids kick a ball around the field."),
    ("He repairs an old bicycle.", "A man fixes a worn-out bike."),
    ("The train arrived late.", "The railway service was delayed."),
]


# Modules whose FutureWarnings the command hides (``warnings`` matches the module a warning is
# attributed to; torch's pytree deprecation is attributed to copyreg by its stacklevel).
DEPENDENCY_WARNINGS = (r"(torch|torchao|transformers|peft|accelerate|safetensors)(\.|$)", r"copyreg$")


def _load(args):
    from peftc.models import load_model

    try:
        return load_model(args.model, args.batch, args.seq)
    except FileNotFoundError as e:
        raise SystemExit(f"error: {e}") from None


def _spec(path: str):
    """A spec file, a PEFT adapter_config.json, or a PEFT adapter dir (as the README says)."""
    from peftc import Spec

    return Spec.from_peft(path) if Path(path).is_dir() else Spec.load(path)


def _optimize(values):
    return None if values is None else list(values)


def cmd_compile(args) -> int:
    import peftc
    from peftc.spec import optimization_hooks

    spec = _spec(args.spec)  # validated before the model is built
    model, inputs = _load(args)
    cm = peftc.compile(model, spec, inputs, optimize=_optimize(args.optimize))
    print(cm.graph_summary())
    table = Table("pass", "matches", "ms", title="passes")
    for name, ms in cm.pass_timings.items():
        table.add_row(name, str(cm.pass_counts.get(name, 0)), f"{ms * 1e3:.1f}")
    console.print(table)
    console.print(f"trainable parameters: {cm.num_trainable_parameters():,}")
    if args.out:
        compiled = bool(optimization_hooks(cm.spec, "save_artifacts"))  # e.g. compile's generated code
        if compiled:  # it is made on a call: run the training graph once, forward and backward
            out = cm.train()(**inputs)
            logits = out.logits if hasattr(out, "logits") else out[0] if isinstance(out, tuple) else out
            logits.float().sum().backward()
            cm.zero_grad(set_to_none=True)
        cm.save_adapter(args.out, artifacts=compiled)
        console.print(f"adapter written to {args.out}")
        for line in cm.notes[-1:] if compiled else ():
            console.print(line.rstrip())
    return 0


def cmd_export(args) -> int:
    """``--aot DIR``: the AOTInductor package of generate's step graphs (``peftc.aot``)."""
    import json

    import peftc

    if args.adapter:  # a trained adapter: its config is the spec, its weights are loaded
        model, inputs = _load(args)
        cm = peftc.from_peft(model, args.adapter, inputs)
    else:
        spec = _spec(args.spec)  # validated before the model is built
        model, inputs = _load(args)
        cm = peftc.compile(model, spec, inputs)
    if args.merge:
        cm.merge()
    out = cm.export_aot(args.aot, max_cache_len=args.max_cache_len)
    meta = json.loads((out / "peftc_aot.json").read_text())
    for line in meta["notes"]:
        console.print(f"note: {escape(line)}")
    secs = ", ".join(f"{k} {v['export']:.1f} s + {v['aot_compile']:.1f} s" for k, v in meta["seconds"].items())
    console.print(f"AOTInductor package written to {out} (export + AOT compile: {secs})")
    console.print(f"run it with torch alone: python {out / 'generate.py'} --ids 1,2,3 --max-new-tokens 8")
    return 0


def cmd_inspect(args) -> int:
    import peftc

    explore = args.explorer or args.explorer_out
    if explore:  # a missing optional extra is said before the slow part
        from peftc.explorer import require

        require()
    spec = _spec(args.spec)
    model, inputs = _load(args)
    if args.module:
        _check_module(model, args.module)
    cm = peftc.compile(model, spec, inputs, optimize=_optimize(args.optimize))
    print(cm.graph_summary())
    if args.graph:
        print("".join(_graph_lines(cm.graph_module.graph, args.module)), end="")
    if args.diff:
        print(_diff(cm, args.module))
    if args.memory:
        print(peftc.memory_report(cm, **inputs))
    if args.svg:
        cm.draw(args.svg, module=args.module)
        console.print(f"SVG written to {args.svg}")
    if explore:
        from peftc.explorer import explore as open_explorer

        open_explorer(cm, args.explorer_out, label=args.model, module=args.module, serve_now=args.explorer)
    return 0


def _check_module(model, module: str) -> None:
    """``--module`` must name a module of the model: said with the closest names, before compiling."""
    import difflib

    names = [n for n, _ in model.named_modules() if n]
    if module in names:
        return
    depth = module.count(".") + 1
    same_depth = [n for n in names if n.count(".") + 1 == depth]
    close = difflib.get_close_matches(module, names, n=5, cutoff=0.5)
    shown = ", ".join(same_depth[:12]) + (", ..." if len(same_depth) > 12 else "")
    raise SystemExit(f"error: --module {module!r} is not a module of {type(model).__name__}"
                     + (f"; did you mean {', '.join(close)}?" if close else "")
                     + f"\nmodules at that depth: {shown or '(none)'}")


def _graph_lines(graph, module: str | None) -> list[str]:
    """``node_line`` per node, only those ``module`` (or a sub-module) owns when given."""
    from peftc.inspection import node_line, owning_module

    out = []
    for node in graph.nodes:
        owner = owning_module(node) or ""
        if not module or owner == module or owner.startswith(module + "."):
            out.append(node_line(node) + "\n")
    return out


def _diff(cm, module: str | None) -> str:
    """Captured vs rewritten graph text, restricted to ``module`` when given."""
    import difflib

    if not module:
        return cm.graph_diff()
    return "".join(difflib.unified_diff(_graph_lines(cm.captured_graph, module), _graph_lines(cm.graph_module.graph, module),
                                        fromfile=f"captured ({module})", tofile=f"rewritten ({module})"))


def cmd_methods(args) -> int:
    from peftc.spec import METHODS

    table = Table("method", "PEFT type", "fields (default)", title="peftc methods", show_lines=True)
    for name, cls in sorted(METHODS.items()):
        fields = []
        for f in dataclasses.fields(cls):
            if f.default is not dataclasses.MISSING:
                fields.append(f"{f.name}={f.default!r}")
            elif f.default_factory is not dataclasses.MISSING:
                fields.append(f"{f.name}={f.default_factory()!r}")
            else:
                fields.append(f"{f.name} (required)")
        doc = " ".join((cls.__doc__ or "").strip().split("\n\n")[0].split())  # first paragraph
        table.add_row(name, cls.peft_type or "-", ", ".join(fields) + (f"\n[dim]{escape(doc)}[/dim]" if doc else ""))
    console.print(table)
    return 0


def cmd_bench(rest: list[str]) -> int:
    if "--serving" in rest:  # benchmarks/serving.py: mixed-batch cost vs number of adapters
        from peftc.benchmarks import serving

        serving.main([a for a in rest if a != "--serving"])
        return 0
    if "--memory" in rest:  # benchmarks/memory.py: saved-for-backward and weight bytes per variant
        from peftc.benchmarks import memory

        memory.main([a for a in rest if a != "--memory"])
        return 0
    if "--codegen" in rest:  # benchmarks/codegen.py: optimize: [compile] vs PEFT eager / + torch.compile
        from peftc.benchmarks import codegen

        codegen.main([a for a in rest if a != "--codegen"])
        return 0
    model = next((a.split("=", 1)[1] if "=" in a else (rest[i + 1] if i + 1 < len(rest) else "")
                  for i, a in enumerate(rest) if a == "--model" or a.startswith("--model=")), None)
    if model is not None:  # a named model: the codegen table (peftc vs PEFT, interpreted and compiled) on it
        if model not in ("smollm2", "llama512", "tiny"):
            console.print(f"error: --model {model!r}: peftc bench runs on smollm2, llama512 or tiny (step_time's "
                          "512-wide Llama is the default without --model)")
            return 2
        from peftc.benchmarks import codegen

        drop = {"--model", model, f"--model={model}"}
        codegen.main(["--models", model, *[a for a in rest if a not in drop]])
        return 0
    from peftc.benchmarks import step_time

    step_time.main(rest)
    return 0


# ---- demo -------------------------------------------------------------------------------
def _objective(cm, task: str, model_ref: str, batch: int, seq: int, vocab: int):
    """A fixed batch and a loss for the model's task, so the demo trains something real."""
    import torch

    g = torch.Generator().manual_seed(1)
    if model_ref == "minilm":
        from transformers import AutoTokenizer

        from peftc.models import minilm_dir

        tok = AutoTokenizer.from_pretrained(minilm_dir(), local_files_only=True)
        a = tok([p[0] for p in PAIRS], padding=True, return_tensors="pt")
        b = tok([p[1] for p in PAIRS], padding=True, return_tensors="pt")

        def embed(enc):
            h = cm(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
            m = enc["attention_mask"][..., None].to(h.dtype)
            return torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1)

        def loss_fn():  # in-batch negatives: each sentence should be nearest its paraphrase
            sim = embed(a) @ embed(b).T / 0.5
            return torch.nn.functional.cross_entropy(sim, torch.arange(len(PAIRS)))
        return loss_fn, {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]}
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    batch_in = {"input_ids": ids}
    if task == "SEQ_CLS":
        batch_in["attention_mask"] = torch.ones_like(ids)
        labels = torch.randint(0, cm.get_base_model().config.num_labels, (batch,), generator=g)
        return (lambda: cm(**batch_in, labels=labels).loss), batch_in
    if task == "SEQ_2_SEQ_LM":  # labels are a graph input: a slice of ids would be a strided view
        labels = ids[:, : seq // 2].clone()
        return (lambda: cm(input_ids=ids, labels=labels).loss), {**batch_in, "decoder_input_ids": ids[:, :4].clone()}
    if task == "CAUSAL_LM":
        return (lambda: cm(input_ids=ids, labels=ids).loss), batch_in
    if model_ref == "tiny-torch":  # a plain module returning class scores per position: classify
        x = torch.randn(batch, seq, 64, generator=g)
        target = torch.randint(0, 10, (batch, seq), generator=g)
        return (lambda: torch.nn.functional.cross_entropy(cm(x).flatten(0, 1), target.flatten())), {"x": x}
    raise SystemExit(f"error: the demo has no objective for task type {task!r} (model {model_ref!r}); "
                     "use peftc compile, or train it in Python (README: Quick start)")


def _logits(out):
    if hasattr(out, "logits"):
        return out.logits
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out


# The demo's default learning rate per model: 1e-2 overshoots on the pretrained MiniLM (its
# contrastive loss rises); the randomly initialised tiny models need the larger step to move in 30 steps.
DEMO_LR = {"minilm": 1e-3}


def _demo_lr(args) -> float:
    return args.lr if args.lr is not None else DEMO_LR.get(args.model, 1e-2)


def cmd_demo(args) -> int:
    import torch
    from rich.progress import track

    import peftc

    if args.model == "smollm2":  # a real chat model: an instruction set, answers before and after
        from peftc import demo_llm

        return demo_llm.run(args, _spec(args.spec) if args.spec else None)
    steps = 30 if args.steps is None else args.steps
    torch.manual_seed(0)
    spec = _spec(args.spec) if args.spec else peftc.Spec.from_dict(DEMO_SPEC)
    model, inputs = _load(args)
    pristine = copy.deepcopy(model)  # the PEFT reference is built on an untouched copy
    console.rule(f"[bold]peftc demo: {args.model}")
    cm = peftc.compile(model, spec, inputs)
    print(cm.graph_summary())
    task = cm.spec.task_type
    vocab = getattr(getattr(model, "config", None), "vocab_size", 128)
    loss_fn, probe = _objective(cm, task, args.model, 4, 32, vocab)
    lr = _demo_lr(args)
    opt = torch.optim.AdamW(cm.trainable_parameters(), lr=lr)
    cm.train()
    losses = []
    for _ in track(range(steps), description=f"training {cm.num_trainable_parameters():,} adapter parameters"):
        loss = loss_fn()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    console.print(f"loss: {losses[0]:.4f} -> {losses[-1]:.4f} over {steps} AdamW steps (lr {lr:g})")
    out = Path(args.out or tempfile.mkdtemp(prefix="peftc-demo-"))
    cm.save_adapter(out)
    console.print(f"adapter (PEFT format) written to {out}")
    cm.eval()
    with torch.no_grad():
        ours = _logits(cm(**probe))
        cm.merge()
        merged = _logits(cm(**probe))
        cm.unmerge()
    ok = True
    console.print(f"merged vs unmerged: max |diff| = {(merged - ours).abs().max().item():.2e}")
    try:
        from peft import PeftModel
    except ImportError:
        console.print("peft is not installed: skipping the PEFT round trip")
        return _verdict(True, losses, lr)
    ref = PeftModel.from_pretrained(pristine, out).eval()
    with torch.no_grad():
        theirs = _logits(ref(**probe))
    diff = (ours - theirs).abs().max().item()
    ok = diff <= args.tolerance
    console.print(f"PEFT PeftModel.from_pretrained on the saved adapter: max |logit diff| = {diff:.2e} "
                  f"({'[green]match' if ok else '[red]MISMATCH'}[/], tolerance {args.tolerance:g})")
    return _verdict(ok, losses, lr)


def _verdict(matches_peft: bool, losses: list[float], lr: float) -> int:
    """Exit status 0 only if the loss fell and PEFT agreed; otherwise says which failed."""
    if not matches_peft:
        console.print("[red]failed:[/] the adapter PEFT loads gives other logits than peftc's (see above)")
    if not losses[-1] < losses[0]:
        console.print(f"[red]failed:[/] the loss did not decrease ({losses[0]:.4f} -> {losses[-1]:.4f}) at lr "
                      f"{lr:g}; try a smaller --lr or more --steps")
    return 0 if matches_peft and losses[-1] < losses[0] else 1


def _model_args(p, default=None):
    p.add_argument("--model", default=default, required=default is None,
                   help="tiny-llama, tiny-qwen2, tiny-mistral, tiny-gpt2, tiny-bert, tiny-t5, tiny-torch, "
                        "minilm, smollm2 (SmolLM2-135M-Instruct), or a local HF model directory")
    p.add_argument("--batch", type=int, default=2, help="example batch size for capture")
    p.add_argument("--seq", type=int, default=16, help="example sequence length for capture")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("peftc")
    except PackageNotFoundError:
        from peftc import __version__

        return __version__


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="peftc", description="A compiler for parameter-efficient fine-tuning.")
    ap.add_argument("--version", action="version", version=f"peftc {_version()}")
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="compile, train, save and check an adapter against HF PEFT")
    _model_args(p, "tiny-llama")
    p.add_argument("--spec", help="spec file or PEFT adapter dir (default: LoRA r=8 on all linear layers)")
    p.add_argument("--steps", type=int, help="training steps (default: 30; smollm2: 14)")
    p.add_argument("--lr", type=float, help="AdamW learning rate (default: 1e-3 for minilm, 3e-3 for smollm2, "
                   "else 1e-2)")
    p.add_argument("--out", help="adapter directory (default: a new temp dir)")
    p.add_argument("--tolerance", type=float, default=1e-4)
    p.set_defaults(fn=cmd_demo)
    for name, fn, hlp in (("compile", cmd_compile, "compile a model with a spec; print what was inserted"),
                          ("inspect", cmd_inspect, "show the rewritten graph: summary, text, diff, SVG")):
        p = sub.add_parser(name, help=hlp)
        _model_args(p)
        p.add_argument("--spec", required=True, help="YAML/JSON spec or a PEFT adapter_config.json / dir")
        p.add_argument("--optimize", nargs="*", help="optimization names (override the spec's)")
        p.set_defaults(fn=fn)
        if name == "compile":
            p.add_argument("--out", help="write the (untrained) adapter in PEFT format here")
        else:
            p.add_argument("--svg", help="write an SVG drawing, inserted nodes highlighted")
            p.add_argument("--module", help="restrict the text/SVG to this module path")
            p.add_argument("--graph", action="store_true", help="print the rewritten graph")
            p.add_argument("--diff", action="store_true", help="print a diff of captured vs rewritten graph")
            p.add_argument("--explorer", action="store_true", help="open captured and rewritten graphs side by "
                           "side in Model Explorer (peftc[explorer]); --module expands that layer")
            p.add_argument("--explorer-out", metavar="DIR", help="write the Model Explorer graphs and overlays "
                           "here (no server) and print the command that opens them")
            p.add_argument("--memory", action="store_true",
                           help="bytes saved for backward by node kind and module, before/after optimizations")
    p = sub.add_parser("export", help="write generate's prefill/decode graphs as an AOTInductor package "
                       "with a torch-only greedy loop (DIR/generate.py)")
    _model_args(p)
    p.add_argument("--aot", required=True, metavar="DIR", help="the package directory (replaced)")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--spec", help="YAML/JSON spec or a PEFT adapter_config.json / dir (untrained weights)")
    source.add_argument("--adapter", metavar="PEFT_DIR", help="a PEFT-saved adapter: its config and weights")
    p.add_argument("--merge", action="store_true", help="fold the adapter into the base weights first")
    p.add_argument("--max-cache-len", type=int, help="longest prompt + new tokens (default: the model's "
                   "max_position_embeddings)")
    p.set_defaults(fn=cmd_export)
    p = sub.add_parser("methods", help="list every method with its fields and defaults")
    p.set_defaults(fn=cmd_methods)
    p = sub.add_parser("bench", help="training-step benchmark: frozen base / PEFT / peftc unfused / fused "
                       "(+ torch.compile); flags as benchmarks/step_time.py (--quick, --compile, --reps, ...); "
                       "--memory: benchmarks/memory.py (saved-for-backward bytes per recompute policy); "
                       "--serving: benchmarks/serving.py (mixed batches, cost vs number of adapters); "
                       "--codegen: benchmarks/codegen.py (optimize: [compile] vs PEFT eager / + torch.compile)",
                       add_help=False)
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(fn=lambda args: cmd_bench(args.rest))
    return ap


def main(argv: list[str] | None = None) -> int:
    import logging
    import warnings

    from peftc.errors import PeftcError

    argv = sys.argv[1:] if argv is None else list(argv)
    for module in DEPENDENCY_WARNINGS:  # their deprecation notices are for their callers' authors, not users
        warnings.filterwarnings("ignore", category=FutureWarning, module=module)
    # torch logs (not warns) a deprecation notice per Enum that torchao registers on import
    logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)
    if argv[:1] == ["bench"]:  # its flags belong to the benchmark's own parser
        return cmd_bench(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except PeftcError as e:
        console.print(f"[red]error:[/] {escape(str(e))}", markup=True, highlight=False)
        return 2


if __name__ == "__main__":
    sys.exit(main())
