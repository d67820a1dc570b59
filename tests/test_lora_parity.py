"""LoRA against HF PEFT across model families: a PEFT-saved adapter loaded by peftc gives
PEFT's logits (padded batch, a shape other than the captured one), trainable count and
checkpoint; peftc's save loads back into PEFT; peftc specs select what the equivalent
LoraConfig selects.

Not repeated here: strict-load messages on Llama (test_checkpoint.py), bias modes
(test_lora_bias.py), LoraConfig -> Spec field mapping (test_spec.py).
"""

import copy

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict
from peft.tuners.lora import LoraLayer

import peftc
from peftc import CheckpointError
from peftc.models import example_inputs, tiny_model

MODELS = [
    ("tiny-llama", {"target_modules": ["q_proj", "v_proj", "o_proj", "down_proj"]}),
    ("tiny-qwen2", {"target_modules": ["q_proj", "k_proj", "gate_proj"]}),  # q/k have biases
    ("tiny-mistral", {"target_modules": ["q_proj", "v_proj", "up_proj"]}),
    ("tiny-gpt2", {"target_modules": ["c_attn", "c_proj", "c_fc"], "fan_in_fan_out": True}),  # Conv1D
    ("tiny-bert", {"task_type": "SEQ_CLS", "target_modules": ["query", "value", "dense"]}),  # + classifier
]


def randomize(params, seed=0):
    """Non-zero A and B (PEFT starts B at zero, which would hide a wrong B path)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def base_pair(name):
    """The same random base twice: one for PEFT to wrap, one fresh for peftc."""
    base = tiny_model(name)
    snapshot = copy.deepcopy(base.state_dict())
    fresh = tiny_model(name, seed=123)
    fresh.load_state_dict(snapshot)
    return base, fresh, snapshot


def capture_inputs(name):
    ex = example_inputs(name, 2, 7)
    ex["attention_mask"] = torch.ones_like(ex["input_ids"])
    return ex


def padded_inputs(name):
    """batch 3 x seq 13 (captured at 2 x 7): row 0 right-padded, row 2 left-padded."""
    ex = example_inputs(name, 3, 13, seed=7)
    mask = torch.ones_like(ex["input_ids"])
    mask[0, 9:] = 0
    mask[2, :3] = 0
    ex["attention_mask"] = mask
    return ex


def logits(model, ex):
    with torch.no_grad():
        return model(**ex).logits


@pytest.mark.parametrize("name, kw", MODELS, ids=[m for m, _ in MODELS])
def test_peft_checkpoint_round_trip(tmp_path, name, kw):
    base, fresh, snapshot = base_pair(name)
    pm = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, **kw))
    randomize([p for p in pm.parameters() if p.requires_grad])
    pm.save_pretrained(tmp_path / "peft")
    pm.eval()
    cm = peftc.from_peft(fresh, tmp_path / "peft", capture_inputs(name), trainable=True).eval()
    n_sites = sum(isinstance(m, LoraLayer) for m in pm.modules())
    assert cm.pass_counts["lora"] == n_sites > 0

    ex = padded_inputs(name)
    ref = logits(pm, ex)
    torch.testing.assert_close(logits(cm, ex), ref, atol=1e-4, rtol=0)
    assert not torch.allclose(ref, logits(cm.get_base_model(), ex), atol=1e-3)  # the adapter matters

    assert cm.num_trainable_parameters() == pm.get_nb_trainable_parameters()[0]
    ref_sd, ours = get_peft_model_state_dict(pm), cm.adapter_state_dict()
    assert set(ours) == set(ref_sd)
    for k, v in ref_sd.items():
        assert torch.equal(ours[k], v), k

    cm.save_adapter(tmp_path / "ours")
    again = tiny_model(name)
    again.load_state_dict(snapshot)
    pm2 = PeftModel.from_pretrained(again, tmp_path / "ours").eval()
    torch.testing.assert_close(logits(pm2, ex), ref, atol=1e-4, rtol=0)

    frozen = peftc.from_peft(tiny_model(name), tmp_path / "peft", capture_inputs(name))
    assert frozen.num_trainable_parameters() == 0 and not frozen.training  # PEFT's is_trainable=False


@pytest.mark.parametrize("name, kw, key_part", [
    ("tiny-bert", {"task_type": "SEQ_CLS", "target_modules": ["query"]}, "classifier.weight"),
    ("tiny-gpt2", {"target_modules": ["c_attn"], "fan_in_fan_out": True}, "c_attn.lora_B.weight"),
])
def test_load_errors_name_the_key(name, kw, key_part):
    base, fresh, _ = base_pair(name)
    pm = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, **kw))
    cm = peftc.compile(fresh, peftc.Spec.from_peft(pm.peft_config["default"]), capture_inputs(name))
    sd = get_peft_model_state_dict(pm)
    key = next(k for k in sorted(sd) if k.endswith(key_part))
    before = {k: v.clone() for k, v in cm.adapter_state_dict().items()}
    with pytest.raises(CheckpointError, match="missing keys") as e:
        cm.load_adapter_state_dict({k: v for k, v in sd.items() if k != key})
    assert repr(key) in str(e.value)
    extra = key.replace(key_part, "extra.weight")
    with pytest.raises(CheckpointError, match="unexpected keys") as e:
        cm.load_adapter_state_dict({**sd, extra: sd[key]})
    assert repr(extra) in str(e.value)
    with pytest.raises(CheckpointError, match="has shape") as e:
        cm.load_adapter_state_dict({**sd, key: torch.zeros(5, 3)})
    assert repr(key) in str(e.value) and str(tuple(sd[key].shape)) in str(e.value)
    for k, v in cm.adapter_state_dict().items():  # a refused load changes nothing
        assert torch.equal(v, before[k])


# (model, peftc lora entries, equivalent LoraConfig kwargs)
EQUIVALENT = [
    ("tiny-llama", [{"targets": ["q_proj", "v_proj"], "r": 4, "alpha": 8}],
     {"target_modules": ["q_proj", "v_proj"], "r": 4, "lora_alpha": 8}),
    ("tiny-llama", [{"targets": r"re:.*layers\.1\.self_attn\.(q|k)_proj", "r": 2, "alpha": 4}],
     {"target_modules": r".*layers\.1\.self_attn\.(q|k)_proj", "r": 2, "lora_alpha": 4}),
    ("tiny-llama", [{"targets": "all-linear", "r": 2}], {"target_modules": "all-linear", "r": 2}),
    ("tiny-llama", [{"targets": "all-linear", "exclude": ["down_proj", "o_proj"], "r": 2}],
     {"target_modules": "all-linear", "exclude_modules": ["down_proj", "o_proj"], "r": 2}),
    ("tiny-llama", [{"targets": ["q_proj", "up_proj"], "layers": [1], "layers_pattern": "layers"}],
     {"target_modules": ["q_proj", "up_proj"], "layers_to_transform": [1], "layers_pattern": "layers"}),
    ("tiny-llama", [{"targets": ["k_proj", "v_proj"], "r": 8, "alpha": 16, "rslora": True}],
     {"target_modules": ["k_proj", "v_proj"], "r": 8, "lora_alpha": 16, "use_rslora": True}),
    ("tiny-llama", [{"targets": ["q_proj"], "r": 16, "init": "gaussian"}],
     {"target_modules": ["q_proj"], "r": 16, "init_lora_weights": "gaussian"}),
    ("tiny-llama", [{"targets": ["q_proj", "o_proj"], "r": 4, "alpha": 8},
                    {"targets": ["v_proj", "up_proj"], "r": 2, "alpha": 6}],
     {"target_modules": ["q_proj", "o_proj", "v_proj", "up_proj"], "r": 4, "lora_alpha": 8,
      "rank_pattern": {"v_proj": 2, "up_proj": 2}, "alpha_pattern": {"v_proj": 6, "up_proj": 6}}),
    ("tiny-gpt2", [{"targets": "all-linear", "r": 2}],
     {"target_modules": "all-linear", "r": 2, "fan_in_fan_out": True}),
    ("tiny-bert", [{"targets": "all-linear", "r": 2}],
     {"target_modules": "all-linear", "r": 2, "task_type": "SEQ_CLS"}),
]


@pytest.mark.parametrize("name, entries, kw", EQUIVALENT, ids=[
    "list", "regex", "all-linear", "exclude", "layers", "rslora", "gaussian", "two-entries",
    "gpt2-all-linear", "bert-all-linear"])
def test_spec_equals_lora_config(tmp_path, name, entries, kw):
    base, fresh, snapshot = base_pair(name)
    pm = get_peft_model(base, LoraConfig(**kw))
    spec = {"methods": [{"lora": e} for e in entries]}
    cm = peftc.compile(fresh, spec, capture_inputs(name))

    peft_paths = {n.removeprefix("base_model.model.") for n, m in pm.named_modules() if isinstance(m, LoraLayer)}
    ours = {n.removesuffix(".lora.default") for n, _ in cm.adapters.named_modules() if n.endswith(".lora.default")}
    assert ours == peft_paths
    assert cm.pass_counts["lora"] == len(ours)
    assert cm.num_trainable_parameters() == pm.get_nb_trainable_parameters()[0]

    if entries[0].get("init") == "gaussian":  # PEFT's init: A ~ N(0, 1/r), B = 0
        a = cm.adapters.get_parameter("model.layers.0.self_attn.q_proj.lora.default.lora_A.weight")
        b = cm.adapters.get_parameter("model.layers.0.self_attn.q_proj.lora.default.lora_B.weight")
        assert torch.count_nonzero(b) == 0 and abs(a.std().item() - 1 / 16) < 0.01

    randomize([p for p in pm.parameters() if p.requires_grad], seed=1)
    cm.load_adapter_state_dict(get_peft_model_state_dict(pm))
    pm.eval()
    cm.eval()
    ex = padded_inputs(name)
    ref = logits(pm, ex)
    torch.testing.assert_close(logits(cm, ex), ref, atol=1e-4, rtol=0)
    assert not torch.allclose(ref, logits(cm.get_base_model(), ex), atol=1e-3)

    cm.save_adapter(tmp_path)  # peftc's config for the selector reads back into PEFT
    again = tiny_model(name)
    again.load_state_dict(snapshot)
    pm2 = PeftModel.from_pretrained(again, tmp_path).eval()
    assert {n.removeprefix("base_model.model.") for n, m in pm2.named_modules() if isinstance(m, LoraLayer)} == ours
    torch.testing.assert_close(logits(pm2, ex), ref, atol=1e-4, rtol=0)
