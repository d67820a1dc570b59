"""KV-cache cost of ``cm.generate`` (the numbers in docs/generate.md): after a 512-token prompt,
the time of 16 new tokens against 1, for cm.generate, HF PEFT's generate on the same weights, and
a cache-less greedy loop through cm(...). Run: ``.venv/bin/python docs/generate_kv_cost.py``."""

import copy
import statistics
import tempfile
import time

import torch
from peft import LoraConfig, get_peft_model

import peftc
from peftc.generation import generator
from peftc.models import tiny_model


def _median_time(fn, repeats: int) -> float:
    fn()  # warm: captures, allocations
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(prompt: int = 512, new: int = 16, repeats: int = 3) -> None:
    base = tiny_model("tiny-llama", max_position_embeddings=1024)
    snapshot = copy.deepcopy(base.state_dict())
    torch.manual_seed(0)
    config = LoraConfig(task_type="CAUSAL_LM", r=8, target_modules="all-linear", init_lora_weights=False)
    pm = get_peft_model(base, config).eval()
    path = tempfile.mkdtemp()
    pm.save_pretrained(path)
    fresh = tiny_model("tiny-llama", max_position_embeddings=1024)
    fresh.load_state_dict(snapshot)
    cm = peftc.from_peft(fresh, path, {"input_ids": torch.randint(0, 128, (2, 8))})
    ids = torch.randint(1, 128, (1, prompt))

    def cacheless():
        seq = ids
        for _ in range(new):
            seq = torch.cat([seq, cm(input_ids=seq).logits[:, -1].argmax(-1, keepdim=True)], 1)
        return seq

    with torch.no_grad():
        for label, gen in (("cm.generate", cm.generate), ("PEFT generate", pm.generate)):
            one = _median_time(lambda g=gen: g(input_ids=ids, max_new_tokens=1, do_sample=False), repeats)
            many = _median_time(lambda g=gen: g(input_ids=ids, max_new_tokens=new, do_sample=False), repeats)
            print(f"{label}: {prompt}-token prompt, 1 new token {one * 1e3:.0f} ms, {new} new tokens "
                  f"{many * 1e3:.0f} ms, ratio {many / one:.2f}")
        loop = _median_time(cacheless, 1)
        print(f"cache-less loop through cm(...): {new} new tokens {loop * 1e3:.0f} ms")
        same = torch.equal(cm.generate(input_ids=ids, max_new_tokens=new), pm.generate(input_ids=ids, max_new_tokens=new))
        print("cm.generate tokens equal PEFT's:", same)
    print("step graph stats:", dict(generator(cm).stats))


if __name__ == "__main__":
    main()
