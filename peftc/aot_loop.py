"""Greedy generation over a peftc ahead-of-time package (``peftc export --aot DIR``), standalone.

``peftc.aot.export_aot`` copies this file into the package as ``DIR/generate.py``. It imports
only torch and the standard library (no peftc, no transformers): the graphs in ``prefill.pt2``
and ``decode.pt2`` are loaded with ``torch._inductor.aoti_load_package`` and fed exactly what
``peftc.generation.Generator.step`` feeds them in ``cm.generate``:

    step(input_ids (B, s), attention_mask (B, P + past + s), start (B, 1), past (),
         key_i, value_i (B, H, T, D)[, adapter_mask (A, B)]) -> logits of the last position (B, 1, V)
        positions = clamp(start + arange(s), 0); the step writes key_i/value_i[:, :, past:past+s] in place

``start`` is HF's first position, ``mask.sum(-1) - s`` (a left-padded row starts at 0), or the cache
length with P > 0 virtual tokens (prompt tuning: the prefill writes them into the cache; decode
masks carry P ones in front). The loop is HF's greedy search without logits processors
(``cm.generate(..., do_sample=False)``): argmax, finished rows padded, stop at EOS or the budget.

    python DIR/generate.py --ids 1,2,3 --max-new-tokens 8              # prints [[1, 2, 3, ...]]
    python DIR/generate.py --ids 0,0,5,6 --mask 0,0,1,1 --ids 4,5,6,7   # a left-padded batch, a row per --ids
    python DIR/generate.py --ids 1,2,3 --ids 4,5,6 --adapters a,__base__   # multi-adapter package: a name per row

Example::

    tokens = generate("served/", torch.tensor([[1, 2, 3]]), max_new_tokens=8)   # (1, 11) int64
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

__all__ = ["Package", "generate", "main", "MANIFEST", "BASE", "ADAPTER_MASK"]

MANIFEST = "peftc_aot.json"
ADAPTER_MASK = "adapter_mask"  # input (A, B) of a multi-adapter package's graphs
BASE = "__base__"  # a row of a multi-adapter package that runs no adapter


class Package:
    """The two step graphs of a package (AOTI models, or any callables taking the step's keywords)
    and its manifest (cache geometry and dtype, special tokens, virtual tokens, adapters)."""

    def __init__(self, meta: dict, prefill, decode):
        self.meta, self.prefill, self.decode = meta, prefill, decode
        self.device = torch.device(meta["device"])

    @classmethod
    def load(cls, directory: str | Path) -> Package:
        """The package written by ``peftc export --aot`` to ``directory``."""
        directory = Path(directory)
        meta = json.loads((directory / MANIFEST).read_text())
        load = torch._inductor.aoti_load_package
        return cls(meta, *(load(str(directory / meta["graphs"][kind])) for kind in ("prefill", "decode")))

    def generate(self, ids: torch.Tensor, mask: torch.Tensor | None = None, max_new_tokens: int = 16,
                 adapter_names: list[str] | None = None) -> torch.Tensor:
        """Prompt + greedy tokens (B, s + up to ``max_new_tokens``), as HF's ``generate`` returns them."""
        meta = self.meta
        ids = torch.as_tensor(ids, dtype=torch.long, device=self.device)
        ids = ids[None] if ids.dim() == 1 else ids
        batch, length = ids.shape
        mask = torch.ones_like(ids) if mask is None else torch.as_tensor(mask, dtype=torch.long, device=self.device)
        mask = mask[None] if mask.dim() == 1 else mask
        if mask.shape != ids.shape:
            raise ValueError(f"mask {tuple(mask.shape)} must have the shape of ids {tuple(ids.shape)}")
        virtual = meta["virtual_tokens"]
        total = length + max_new_tokens + virtual  # the cache: prompt, virtual tokens, new tokens
        if length < 2 or max_new_tokens < 1 or total > meta["max_cache_len"]:
            raise ValueError(f"prompt length {length} (2 or more) + {max_new_tokens} new tokens (1 or more) + "
                             f"{virtual} virtual tokens must fit max_cache_len {meta['max_cache_len']}")
        layers, heads, dim = meta["kv_geometry"]
        dtype = getattr(torch, meta["cache_dtype"])
        cache = {f"{kind}_{i}": torch.zeros(batch, heads, total, dim, dtype=dtype, device=self.device)
                 for kind in ("key", "value") for i in range(layers)}
        extra = self._adapter_mask(adapter_names, batch)
        eos = torch.tensor(meta["eos_token_id"], dtype=torch.long, device=self.device)
        pad = meta["pad_token_id"]
        unfinished = torch.ones(batch, dtype=torch.bool, device=self.device)
        logits = self._step(self.prefill, ids, mask, 0, virtual, cache, extra)
        seen, out = length + virtual, ids
        for _ in range(max_new_tokens):
            token = logits[:, -1].float().argmax(-1)
            if len(eos):  # HF: a finished row gets the pad token
                token = torch.where(unfinished, token, torch.full_like(token, pad))
            out = torch.cat([out, token[:, None]], 1)
            mask = torch.cat([mask, mask.new_ones(batch, 1)], 1)
            if len(eos):
                unfinished &= ~torch.isin(token, eos)
            if out.shape[1] == length + max_new_tokens or not unfinished.any():
                return out
            step_mask = torch.cat([mask.new_ones(batch, virtual), mask], 1) if virtual else mask
            logits = self._step(self.decode, token[:, None], step_mask, seen, virtual, cache, extra)
            seen += 1
        return out

    def _step(self, graph, ids, mask, past: int, virtual: int, cache: dict, extra: dict) -> torch.Tensor:
        if virtual:  # PEFT ignores position ids with virtual tokens: positions count the cache
            start = torch.full((ids.shape[0], 1), past, dtype=torch.long, device=self.device)
        else:  # HF's positions: cumsum(mask) - 1, so a left-padded row starts at 0
            start = mask.sum(-1, keepdim=True) - ids.shape[1]
        out = graph(input_ids=ids, attention_mask=mask, start=start,
                    past=torch.tensor(past, dtype=torch.long, device=self.device), **cache, **extra)
        return out[0] if isinstance(out, (list, tuple)) else out

    def _adapter_mask(self, names: list[str] | None, batch: int) -> dict:
        """``adapter_mask`` (A, B): row a is 1 where a sample names adapter a (multi-adapter packages)."""
        adapters = self.meta["adapters"]
        if not adapters:
            if names is not None:
                raise ValueError("adapter_names: this package runs its adapters on every row (exported "
                                 "without adapter_names); export with adapter_names=[...] to choose per row")
            return {}
        if names is None or len(names) != batch or not set(names) <= {*adapters, BASE}:
            raise ValueError(f"adapter_names {names}: one name per row ({batch}) from {[*adapters, BASE]}")
        mask = [[float(name == a) for name in names] for a in adapters]
        return {ADAPTER_MASK: torch.tensor(mask, dtype=torch.float32, device=self.device)}


def generate(directory: str | Path, ids, mask=None, max_new_tokens: int = 16,
             adapter_names: list[str] | None = None) -> torch.Tensor:
    """Loads the package in ``directory`` and returns prompt + greedy tokens (see ``Package.generate``)."""
    return Package.load(directory).generate(ids, mask, max_new_tokens, adapter_names)


def _rows(values: list[str] | None) -> list[list[int]] | None:
    return None if values is None else [[int(t) for t in v.split(",")] for v in values]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Greedy generation over a peftc AOTInductor package.")
    ap.add_argument("--dir", default=str(Path(__file__).resolve().parent), help="the package (default: this file's)")
    ap.add_argument("--ids", action="append", required=True, help="comma-separated token ids; once per row")
    ap.add_argument("--mask", action="append", help="comma-separated 0/1 attention mask; once per row")
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--adapters", help="multi-adapter package: comma-separated adapter name per row (or __base__)")
    args = ap.parse_args(argv)
    ids, mask = _rows(args.ids), _rows(args.mask)
    names = args.adapters.split(",") if args.adapters else None
    tokens = generate(args.dir, torch.tensor(ids), None if mask is None else torch.tensor(mask),
                      args.max_new_tokens, names)
    print(json.dumps(tokens.tolist()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
