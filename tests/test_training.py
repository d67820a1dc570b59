"""Training through compiled graphs: AdamW steps track HF PEFT step for step (dropout
included: peftc's dropout node sits where PEFT calls it, so seeded streams line up),
gradients reach exactly the adapter, train()/eval() switch dropout like eager, and a
float64 plain-torch model matches a hand-written LoRA reference in value and gradient.
"""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

import peftc
from peftc.models import example_inputs, tiny_model

NO_DROPOUT = {"tiny-gpt2": {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}, "tiny-llama": {}}


def make_pair(name, lora_kw, overrides=None):
    """PEFT and peftc on the same base weights, peftc's adapter copied from PEFT's (B non-zero)."""
    overrides = NO_DROPOUT[name] if overrides is None else overrides
    base = tiny_model(name, **overrides)
    snapshot = copy.deepcopy(base.state_dict())
    pm = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, **lora_kw))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    fresh = tiny_model(name, seed=9, **overrides)
    fresh.load_state_dict(snapshot)
    cm = peftc.compile(fresh, peftc.Spec.from_peft(pm.peft_config["default"]), example_inputs(name, 2, 7))
    cm.load_adapter_state_dict(get_peft_model_state_dict(pm))
    return pm, cm


TRAIN_CASES = [
    ("tiny-llama", {"target_modules": ["q_proj", "v_proj", "down_proj"]}, None),
    ("tiny-gpt2", {"target_modules": ["c_attn", "c_fc"], "fan_in_fan_out": True}, None),
    ("tiny-llama", {"target_modules": ["q_proj", "v_proj", "down_proj"], "lora_dropout": 0.1}, None),
    ("tiny-gpt2", {"target_modules": ["c_attn", "c_fc"], "fan_in_fan_out": True, "lora_dropout": 0.1},
     {}),  # GPT-2's own resid/attn/embd dropout on too
]


@pytest.mark.parametrize("name, lora_kw, overrides", TRAIN_CASES,
                         ids=["llama", "gpt2", "llama-dropout", "gpt2-all-dropout"])
@pytest.mark.slow
def test_adamw_steps_match_peft(name, lora_kw, overrides):
    pm, cm = make_pair(name, lora_kw, overrides)
    assert cm.num_trainable_parameters() == pm.get_nb_trainable_parameters()[0]
    start = {k: v.clone() for k, v in cm.adapter_state_dict().items()}
    ex = example_inputs(name, 3, 11, seed=3)
    pm.train()
    cm.train()
    opts = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-3) for m in (pm, cm)]
    losses = {id(pm): [], id(cm): []}
    for step in range(20):
        for model, opt in zip((pm, cm), opts):
            opt.zero_grad()
            torch.manual_seed(step)  # the same dropout masks in both, if the streams line up
            loss = model(**ex, labels=ex["input_ids"]).loss
            loss.backward()
            if step == 0 and model is cm:
                for key, p in cm._peft_params().items():
                    assert p.grad is not None and p.grad.abs().sum() > 0, key
                assert all(p.grad is None and not p.requires_grad for p in cm.get_base_model().parameters())
            opt.step()
            losses[id(model)].append(loss.item())
    ref, ours = losses[id(pm)], losses[id(cm)]
    assert ours == pytest.approx(ref, abs=1e-3)
    assert ours[-1] < ours[0]
    final, ref_sd = cm.adapter_state_dict(), get_peft_model_state_dict(pm)
    assert set(final) == set(ref_sd)
    for k, v in ref_sd.items():
        torch.testing.assert_close(final[k], v, atol=1e-3, rtol=0)
        assert not torch.allclose(final[k], start[k], atol=1e-4), f"{k} did not train"


def test_train_eval_switch_dropout_like_eager():
    """GPT-2 with resid/attn/embd dropout 0.1 and LoRA dropout 0.1."""
    pm, cm = make_pair("tiny-gpt2", {"target_modules": ["c_attn"], "fan_in_fan_out": True,
                                     "lora_dropout": 0.1}, overrides={})

    def run(model, seed, **ex):
        torch.manual_seed(seed)
        with torch.no_grad():
            return model(**ex).logits

    ex = example_inputs("tiny-gpt2", 3, 11, seed=3)
    assert cm.eval() is cm and not cm.training
    pm.eval()
    torch.testing.assert_close(run(cm, 0, **ex), run(cm, 1, **ex), atol=0, rtol=0)
    torch.testing.assert_close(run(cm, 0, **ex), run(pm, 1, **ex), atol=1e-5, rtol=0)
    cm.train()
    pm.train()
    assert cm.training
    train0 = run(cm, 0, **ex)
    assert not torch.allclose(train0, run(cm, 1, **ex), atol=1e-3)  # dropout is live
    torch.testing.assert_close(train0, run(pm, 0, **ex), atol=1e-5, rtol=0)
    masked = {**ex, "attention_mask": torch.ones_like(ex["input_ids"])}  # a new signature, built in train mode
    torch.testing.assert_close(run(cm, 4, **masked), run(pm, 4, **masked), atol=1e-5, rtol=0)
    cm.eval()
    pm.eval()
    torch.testing.assert_close(run(cm, 0, **masked), run(cm, 1, **masked), atol=0, rtol=0)
    torch.testing.assert_close(run(cm, 0, **masked), run(pm, 0, **masked), atol=1e-5, rtol=0)


def reference(model, lora, x):
    """TinyTransformer written out by hand; ``lora[path] = (A, B, s)`` adds x A^T B^T s."""
    def lin(path, h):
        mod = model.get_submodule(path)
        y = h @ mod.weight.T + mod.bias
        if path in lora:
            a, b, s = lora[path]
            y = y + s * (h @ a.T @ b.T)
        return y

    def norm(path, h):
        mod = model.get_submodule(path)
        return F.layer_norm(h, mod.normalized_shape, mod.weight, mod.bias, mod.eps)

    bsz, seq, d = x.shape
    causal = torch.ones(seq, seq, dtype=torch.bool).tril()
    for i, block in enumerate(model.layers):
        heads = block.heads
        qkv = lin(f"layers.{i}.qkv", norm(f"layers.{i}.norm1", x))
        q, k, v = qkv.reshape(bsz, seq, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
        scores = (q @ k.transpose(-1, -2) / math.sqrt(d // heads)).masked_fill(~causal, float("-inf"))
        att = (scores.softmax(-1) @ v).transpose(1, 2).reshape(bsz, seq, d)
        x = x + lin(f"layers.{i}.proj", att)
        x = x + lin(f"layers.{i}.fc2", F.gelu(lin(f"layers.{i}.fc1", norm(f"layers.{i}.norm2", x))))
    return lin("head", norm("norm", x))


def test_float64_plain_torch_matches_hand_reference():
    model = tiny_model("tiny-torch", dropout=0.0).double()
    example = {"x": example_inputs("tiny-torch", 2, 8)["x"].double()}
    spec = {"methods": [{"lora": {"targets": ["qkv", "fc2"], "r": 4, "alpha": 6}}]}
    cm = peftc.compile(model, spec, example)
    assert cm.frontend_used == "fx" and cm.pass_counts["lora"] == 4
    g = torch.Generator().manual_seed(0)
    lora = {}
    with torch.no_grad():
        for path in ("layers.0.qkv", "layers.1.qkv", "layers.0.fc2", "layers.1.fc2"):
            store = cm.adapters.get_submodule(f"{path}.lora.default")
            for lin in (store.lora_A, store.lora_B):
                assert lin.weight.dtype == torch.float64
                lin.weight.copy_(torch.randn(lin.weight.shape, generator=g, dtype=torch.float64) * 0.2)
            lora[path] = (store.lora_A.weight.detach().clone().requires_grad_(),
                          store.lora_B.weight.detach().clone().requires_grad_(), 6 / 4)

    x = torch.randn(3, 5, 64, generator=g, dtype=torch.float64)
    w = torch.randn(3, 5, 10, generator=g, dtype=torch.float64)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    out = cm(x=x1)
    ref = reference(model, lora, x2)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-10)
    assert not torch.allclose(ref, model(x), atol=1e-3)  # the adapter matters
    (out * w).sum().backward()
    (ref * w).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, atol=1e-12, rtol=1e-10)
    for path, (a, b, _) in lora.items():
        store = cm.adapters.get_submodule(f"{path}.lora.default")
        torch.testing.assert_close(store.lora_A.weight.grad, a.grad, atol=1e-12, rtol=1e-10)
        torch.testing.assert_close(store.lora_B.weight.grad, b.grad, atol=1e-12, rtol=1e-10)
    assert all(p.grad is None for p in model.parameters())
