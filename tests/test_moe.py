"""MoE: LoRA on fused 3-D expert parameters and routers (PEFT's ``target_parameters``,
passes/methods/lora_params.py) against HF PEFT on transformers 5 families: ``all-linear`` adapts what
PEFT's does (same trainable count, same checkpoint keys), PEFT-saved adapters load with PEFT's
logits, peftc's saves load back into PEFT, and the expert factors train."""

import copy

import pytest
import torch
import transformers as tf
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict

import peftc
from peftc import PassError, PeftcError, SpecError

SMALL = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256)
FAMILIES = {  # intermediate != hidden, so a swapped factor would not even load
    "mixtral": (tf.MixtralConfig, tf.MixtralForCausalLM, dict(num_local_experts=4, num_experts_per_tok=2,
                                                               intermediate_size=128)),
    "qwen3_moe": (tf.Qwen3MoeConfig, tf.Qwen3MoeForCausalLM, dict(num_experts=4, num_experts_per_tok=2,
                                                                   moe_intermediate_size=48, head_dim=16)),
    "olmoe": (tf.OlmoeConfig, tf.OlmoeForCausalLM, dict(num_experts=4, num_experts_per_tok=2, eos_token_id=0,
                                                         pad_token_id=1)),
}


def tiny(family, seed=0, **over):
    cfg_cls, model_cls, kw = FAMILIES[family] if family in FAMILIES else _QWEN2_MOE
    torch.manual_seed(seed)
    return model_cls(cfg_cls(**{**SMALL, **kw, **over})).eval()


_QWEN2_MOE = (tf.Qwen2MoeConfig, tf.Qwen2MoeForCausalLM, dict(num_experts=4, num_experts_per_tok=2,
                                                             moe_intermediate_size=48,
                                                             shared_expert_intermediate_size=32))


def randomize(params, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def ids(batch, seq, seed):
    return torch.randint(0, 128, (batch, seq), generator=torch.Generator().manual_seed(seed))


def n_trainable(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def logits(model, x):
    with torch.no_grad():
        return model(input_ids=x).logits


@pytest.mark.parametrize("family", list(FAMILIES))
def test_all_linear_adapts_what_peft_does(family):
    layers = 2 if family == "mixtral" else 1  # the Mixtral config has 2 layers
    base = tiny(family, num_hidden_layers=layers)
    pm = get_peft_model(copy.deepcopy(base), LoraConfig(target_modules="all-linear", r=8))
    cm = peftc.compile(base, {"methods": [{"lora": {"targets": "all-linear", "r": 8, "alpha": 8}}]},
                       {"input_ids": ids(2, 7, 0)})
    assert cm.pass_counts["lora"] == 4 * layers  # q/k/v/o
    assert cm.pass_counts["lora_params"] == 3 * layers  # the router and both expert stacks
    assert cm.num_trainable_parameters() == n_trainable(pm)
    if family == "mixtral":
        assert n_trainable(pm) == 61_504  # the count measured in the issue on this config
    peft_keys = {k.replace(".default", "") for k in get_peft_model_state_dict(pm)}
    assert set(cm.adapter_state_dict()) == peft_keys
    # PEFT's factors in peftc's graph: the same logits at a shape other than the captured one
    randomize([p for p in pm.parameters() if p.requires_grad])
    cm.load_adapter_state_dict(get_peft_model_state_dict(pm), source="peft")
    x = ids(3, 11, 1)
    ref = logits(pm.eval(), x)
    assert (ref - logits(base, x)).abs().max() > 1e-2  # the adapters change the output
    torch.testing.assert_close(logits(cm.eval(), x), ref, atol=1e-4, rtol=0)
    # and PEFT's gradients, for every factor (experts and router included)
    pm(input_ids=x).logits.square().mean().backward()
    cm(input_ids=x).logits.square().mean().backward()
    live = {p.data_ptr(): p for p in cm.trainable_parameters()}
    ours = {k: live[v.data_ptr()].grad for k, v in cm.adapter_state_dict().items()}
    named = dict(pm.named_parameters())
    for k in get_peft_model_state_dict(pm):
        theirs = named[k.replace(".weight", ".default.weight")].grad
        torch.testing.assert_close(ours[k], theirs, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("family", ["mixtral", "olmoe"])
def test_peft_saved_adapter_loads_and_round_trips(tmp_path, family):
    base = tiny(family)
    pm = get_peft_model(copy.deepcopy(base), LoraConfig(target_modules="all-linear", r=4, lora_alpha=16))
    randomize([p for p in pm.parameters() if p.requires_grad], seed=2)
    pm.save_pretrained(tmp_path / "peft")
    cm = peftc.from_peft(copy.deepcopy(base), tmp_path / "peft", {"input_ids": ids(2, 7, 0)}, trainable=True).eval()
    assert cm.num_trainable_parameters() == n_trainable(pm)
    x = ids(3, 9, 3)
    torch.testing.assert_close(logits(cm, x), logits(pm.eval(), x), atol=1e-4, rtol=0)

    randomize(cm.trainable_parameters(), seed=4)  # peftc's own weights -> PEFT
    cm.save_adapter(tmp_path / "ours")
    back = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    assert n_trainable(back) == 0 and sum(p.numel() for n, p in back.named_parameters() if "lora_" in n) == \
        cm.num_trainable_parameters()
    torch.testing.assert_close(logits(back, x), logits(cm, x), atol=1e-4, rtol=0)


def test_explicit_target_parameters_on_qwen2_moe(tmp_path):
    """Qwen2-MoE: PEFT's all-linear leaves its experts alone; target_parameters reach them,
    next to the shared expert's nn.Linear layers."""
    base = tiny("qwen2_moe")
    cfg = LoraConfig(target_modules=["q_proj", "shared_expert.down_proj"], r=4, lora_alpha=8,
                     target_parameters=["experts.gate_up_proj", "experts.down_proj", "mlp.gate.weight"])
    pm = get_peft_model(copy.deepcopy(base), cfg)
    randomize([p for p in pm.parameters() if p.requires_grad], seed=5)
    pm.save_pretrained(tmp_path)
    cm = peftc.from_peft(copy.deepcopy(base), tmp_path, {"input_ids": ids(2, 7, 0)}).eval()
    assert cm.pass_counts["lora"] == 2 and cm.pass_counts["lora_params"] == 3
    assert cm.peft_config()["target_parameters"] == sorted(cfg.target_parameters)
    x = ids(2, 13, 6)
    torch.testing.assert_close(logits(cm, x), logits(pm.eval(), x), atol=1e-4, rtol=0)


def test_expert_factors_train():
    base = tiny("mixtral")
    spec = {"methods": [{"lora_params": {"targets": ["experts.gate_up_proj", "experts.down_proj"], "r": 2}}]}
    cm = peftc.compile(base, spec, {"input_ids": ids(2, 7, 0)}).train()
    assert cm.pass_counts["lora_params"] == 2
    randomize(cm.trainable_parameters(), seed=7)
    opt = torch.optim.SGD(cm.trainable_parameters(), lr=0.5)
    x = ids(3, 10, 8)
    losses = []
    for _ in range(2):
        loss = cm(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in cm.trainable_parameters())
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(not p.requires_grad for p in base.parameters())


def test_parameter_targets_are_checked():
    base = tiny("mixtral")
    with pytest.raises(SpecError, match="closest"):
        peftc.compile(base, {"methods": [{"lora_params": {"targets": ["experts.up_proj"]}}]}, {"input_ids": ids(1, 4, 0)})
    with pytest.raises(SpecError, match="2-D or 3-D"):
        peftc.compile(base, {"methods": [{"lora_params": {"targets": ["input_layernorm.weight"]}}]},
                      {"input_ids": ids(1, 4, 0)})
    with pytest.raises(SpecError, match="lora.dropout.*take no dropout"):  # PEFT's ParamWrapper refuses too
        peftc.compile(base, {"methods": [{"lora": {"targets": "all-linear", "dropout": 0.1}}]}, {"input_ids": ids(1, 4, 0)})
    with pytest.raises(SpecError, match="list of parameter names"):
        peftc.Spec.from_dict({"methods": [{"lora_params": {"targets": "all-linear"}}]})


def test_a_parameter_the_graph_never_reads_is_a_pass_error():
    base = tiny("mixtral", tie_word_embeddings=False)
    base.unused = torch.nn.Linear(4, 4)  # PEFT would wrap it; no graph reads it
    with pytest.raises(PassError, match=r"no site in the captured graph: \['unused.weight'\]"):
        peftc.compile(base, {"methods": [{"lora_params": {"targets": ["gate.weight", "unused.weight"]}}]},
                      {"input_ids": ids(1, 4, 0)})


def test_merge_refuses_before_changing_a_weight():
    base = tiny("mixtral")
    cm = peftc.compile(base, {"methods": [{"lora": {"targets": "all-linear", "r": 2}}]}, {"input_ids": ids(2, 5, 0)})
    before = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(PeftcError, match="'lora_params' cannot be merged"):
        cm.merge()
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())
    assert not cm.registry.merged  # the failed call left the flag as it was, too
    x = ids(2, 5, 1)
    with torch.no_grad():
        assert torch.isfinite(cm(input_ids=x).logits).all()


def test_gpt_oss_experts_stored_in_out(tmp_path):
    """GPT-OSS stores experts (E, in, out) (``is_transposed``): PEFT's other factor layout."""
    cfg = tf.GptOssConfig(**{**SMALL, "intermediate_size": 48}, head_dim=16, num_local_experts=4,
                          num_experts_per_tok=2, layer_types=["full_attention"])
    torch.manual_seed(0)
    base = tf.GptOssForCausalLM(cfg).eval()
    assert base.model.layers[0].mlp.experts.is_transposed
    pm = get_peft_model(copy.deepcopy(base), LoraConfig(
        target_modules=["q_proj"], r=2, target_parameters=["experts.gate_up_proj", "experts.down_proj", "router.weight"]))
    randomize([p for p in pm.parameters() if p.requires_grad], seed=9)
    pm.save_pretrained(tmp_path)
    cm = peftc.from_peft(copy.deepcopy(base), tmp_path, {"input_ids": ids(2, 7, 0)}).eval()
    assert cm.pass_counts["lora_params"] == 3
    x = ids(3, 9, 10)
    ref = logits(pm.eval(), x)
    assert (ref - logits(base, x)).abs().max() > 1e-2
    torch.testing.assert_close(logits(cm, x), ref, atol=1e-4, rtol=0)
