"""LoRA training sharded over N ranks with ``optimize: {shard: {}}``, and the per-rank memory plan.

Train (gloo on CPU, nccl on GPUs; the global batch is split across ranks)::

    torchrun --nproc_per_node 2 examples/train_distributed.py --steps 5
    torchrun --nproc_per_node 8 examples/train_distributed.py --checkpoint /path/to/hf_model_dir

With ``--checkpoint`` the model is built on the meta device and every rank loads only its shard
(``peftc.distributed.load_sharded``). Memory plan per rank, from the compiled graph of a
meta-device model (no process group needed, nothing materialised)::

    python examples/train_distributed.py --memory-plan llama-3-8b --world 8 --seq 4096
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist

import peftc
from peftc import distributed as pd

LORA = {"lora": {"targets": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                 "r": 16, "alpha": 32, "dropout": 0.0}}
LLAMA = {  # transformers LlamaConfig fields of the published models
    "llama-3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0),
    "llama-3-70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                        num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0),
}


def saved_bytes_on_meta(cm, seq: int, **inputs) -> tuple[int, int]:
    """Bytes autograd keeps for backward over one forward, on meta tensors (each storage once),
    and the part of them in (.., seq, seq) floating tensors (attention probabilities)."""
    seen: dict[int, tuple[int, bool]] = {}
    frozen = {p.untyped_storage()._cdata for p in [*cm.parameters(), *cm.buffers()]}

    def pack(t):
        s = t.untyped_storage()
        if s._cdata not in frozen:
            square = t.dim() >= 2 and tuple(t.shape[-2:]) == (seq, seq) and t.is_floating_point()
            seen[s._cdata] = (s.nbytes(), square)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = cm(**inputs)
    del out
    return sum(n for n, _ in seen.values()), sum(n for n, sq in seen.values() if sq)


def memory_plan(name: str, world: int, seq: int, batch: int, dtype=torch.bfloat16) -> str:
    """Per-rank bytes for LoRA r=16 on every linear: weights (sharded, ``shard_range``), adapters with
    their gradients and AdamW states (replicated), the largest gathered weight (transient), and
    activations saved for backward at ``batch x seq`` tokens per rank, without and with
    ``recompute: {policy: blocks}`` — measured on the compiled graph of a meta-device model."""
    from accelerate import init_empty_weights
    from transformers import LlamaConfig, LlamaForCausalLM

    with init_empty_weights(include_buffers=False):
        model = LlamaForCausalLM(LlamaConfig(**LLAMA[name], max_position_embeddings=max(seq, 8192)))
    model.to(dtype)
    ids = torch.zeros(batch, seq, dtype=torch.long, device="meta")
    cm = peftc.compile(model, {"methods": [LORA]}, {"input_ids": ids, "labels": ids})
    frozen = [p for p in model.parameters()]
    full = sum(p.numel() * p.element_size() for p in frozen)
    sharded = sum(pd.shard_range(p.numel(), 0, world)[2] * p.element_size() for p in frozen)
    biggest = max(p.numel() * p.element_size() for p in frozen)
    adapters = sum(p.numel() * p.element_size() for p in cm.trainable_parameters())
    act, square = saved_bytes_on_meta(cm, seq, input_ids=ids, labels=ids)
    cm.gradient_checkpointing_enable()
    act_rc, _ = saved_bytes_on_meta(cm, seq, input_ids=ids, labels=ids)
    gib = lambda b: f"{b / 2**30:8.2f} GiB"
    rows = [
        (f"base weights ({dtype}, {full / 2**30:.1f} GiB in all) / {world} ranks", sharded),
        ("largest gathered weight (transient, freed after its op)", biggest),
        ("LoRA r=16 adapters + grads (replicated)", 2 * adapters),
        ("AdamW states (exp_avg, exp_avg_sq)", 2 * adapters),
        (f"activations saved for backward, {batch}x{seq} tokens", act),
        ("  of which S x S attention probabilities (SDPA math path)", square),
        ("  ... with recompute: {policy: blocks}", act_rc),
    ]
    total = sharded + biggest + 4 * adapters
    lines = [f"{name} on {world} ranks, per rank:"] + [f"  {k:<60} {gib(v)}" for k, v in rows]
    lines += [f"  {'total without recompute':<60} {gib(total + act)}",
              f"  {'total with recompute':<60} {gib(total + act_rc)}"]
    return "\n".join(lines)


def train(args) -> None:
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if backend == "nccl" else "cpu")
    spec = {"methods": [{"lora": {**LORA["lora"], "r": 8}}], "optimize": {"shard": {}}}
    if args.recompute:
        spec["optimize"]["recompute"] = {"policy": "blocks"}
    if args.checkpoint:  # meta-device start: no rank holds the full model
        from accelerate import init_empty_weights
        from transformers import AutoConfig, AutoModelForCausalLM

        with init_empty_weights():
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(args.checkpoint))
    else:
        from peftc.models import tiny_model

        model = tiny_model("tiny-llama").to(device)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (args.batch, args.seq), device=device)
    cm = peftc.compile(model, spec, {"input_ids": ids, "labels": ids})
    if args.checkpoint:
        pd.load_sharded(cm, args.checkpoint)
    opt = torch.optim.AdamW(cm.trainable_parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    for step in range(args.steps):
        batch = torch.randint(0, vocab, (args.batch * world, args.seq), generator=g).chunk(world)[rank].to(device)
        loss = cm(input_ids=batch, labels=batch).loss
        loss.backward()  # adapter gradients are averaged across ranks inside backward
        opt.step()
        opt.zero_grad()
        if rank == 0:
            print(f"step {step}: loss {loss.item():.4f}")
    if rank == 0:
        print(cm.graph_summary().splitlines()[-1])
    cm.save_adapter(args.out)  # rank 0 writes, every rank waits for it
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--memory-plan", choices=sorted(LLAMA), help="print the per-rank memory plan and exit")
    ap.add_argument("--world", type=int, default=8)
    ap.add_argument("--seq", type=int, default=16)
    ap.add_argument("--batch", type=int, default=2, help="sequences per rank")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--recompute", action="store_true")
    ap.add_argument("--checkpoint", help="HF model dir (safetensors): meta-device start, per-rank shard loading")
    ap.add_argument("--out", default="out/adapter")
    args = ap.parse_args()
    if args.memory_plan:
        print(memory_plan(args.memory_plan, args.world, args.seq, args.batch))
    else:
        train(args)


if __name__ == "__main__":
    main()
