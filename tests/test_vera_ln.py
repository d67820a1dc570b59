"""VeRA and LN tuning against HF PEFT: logits, counts, keys, gradients, round trip, merge."""

import copy
import warnings

import pytest
import torch
from peft import LNTuningConfig, PeftModel, VeraConfig, get_peft_model, get_peft_model_state_dict

import peftc
from peftc import SpecError
from peftc.models import example_inputs, tiny_model


def peft_pair(name, cfg, tmp_path):
    """A PEFT model with random non-zero trainable tensors, saved; and a fresh base copy."""
    base = tiny_model(name)
    snapshot = copy.deepcopy(base.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT warns about save_projection=False
        pm = get_peft_model(base, cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in pm.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
    pm.save_pretrained(tmp_path / "peft")
    fresh = tiny_model(name)
    fresh.load_state_dict(snapshot)
    return pm.eval(), fresh, snapshot


def check_against_peft(pm, cm, name, snapshot, tmp_path, method, peft_name):
    """Shared checks: logits at a new shape, counts, keys/values, training parity, round trip, merge."""
    ex = example_inputs(name, 3, 13, seed=4)
    base = tiny_model(name).eval()
    base.load_state_dict(snapshot)
    cm.eval()
    with torch.no_grad():
        ours = cm(**ex).logits
        torch.testing.assert_close(ours, pm(**ex).logits, atol=1e-4, rtol=0)
        assert (ours - base(**ex).logits).abs().max() > 1e-3  # the adapter is not a no-op
    assert cm.num_trainable_parameters() == pm.get_nb_trainable_parameters()[0]
    ref, sd = get_peft_model_state_dict(pm), cm.adapter_state_dict()
    assert set(sd) == set(ref)
    for k in ref:
        assert torch.equal(sd[k], ref[k]), k
    # training: same loss and gradients as PEFT (same dropout stream), on every trainable tensor
    pm.train()
    cm.train()
    losses = []
    for model in (pm, cm):
        torch.manual_seed(3)
        out = model(**ex, labels=ex["input_ids"])
        out.loss.backward()
        losses.append(out.loss.item())
    assert losses[0] == pytest.approx(losses[1], abs=1e-5)
    peft_grads = {k: p.grad for k, p in pm.named_parameters() if p.requires_grad}
    trainable = {id(p) for p in cm.trainable_parameters()}
    params = {k: p for k, p in cm._peft_params().items() if id(p) in trainable}
    assert len(params) == len(peft_grads) == len(cm.trainable_parameters())
    for key, p in params.items():
        assert p.grad is not None and p.grad.abs().sum() > 0, key
        torch.testing.assert_close(p.grad, peft_grads[peft_name(key)], atol=1e-5, rtol=1e-4)
    # save -> PeftModel.from_pretrained gives the same logits
    cm.eval()
    cm.save_adapter(tmp_path / "ours")
    again = tiny_model(name)
    again.load_state_dict(snapshot)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm2 = PeftModel.from_pretrained(again, tmp_path / "ours").eval()
    with torch.no_grad():
        torch.testing.assert_close(pm2(**ex).logits, cm(**ex).logits, atol=1e-4, rtol=0)
        # merge: folded, no adapter nodes left, reversible
        cm.merge()
        merged = cm(**ex).logits
        assert (merged - ours).abs().max() <= 1e-5
        assert not [n for n in cm.graph_module.graph.nodes if n.meta.get("peftc", {}).get("method") == method]
        assert cm.pass_counts["merge"] > 0 and cm.num_trainable_parameters() == 0
        cm.unmerge()
        assert torch.equal(cm(**ex).logits, ours)
        base.load_state_dict(cm.merged_state_dict())
        assert (base(**ex).logits - ours).abs().max() <= 1e-5


VERA_CASES = [
    ("tiny-llama", {"r": 8, "target_modules": ["q_proj", "v_proj", "down_proj"]}),
    ("tiny-llama", {"r": 4, "target_modules": ["k_proj", "up_proj"], "vera_dropout": 0.1,
                    "save_projection": False, "projection_prng_key": 7, "d_initial": 0.05}),
    ("tiny-gpt2", {"r": 8, "target_modules": ["c_attn", "c_fc", "c_proj"], "fan_in_fan_out": True}),  # Conv1D
]


@pytest.mark.filterwarnings("ignore:Specified to not save vera_A")
@pytest.mark.parametrize("name, kw", VERA_CASES)
def test_vera_matches_peft(tmp_path, name, kw):
    pm, fresh, snapshot = peft_pair(name, VeraConfig(**kw), tmp_path)
    cm = peftc.from_peft(fresh, tmp_path / "peft", example_inputs(name), trainable=True)
    ref = get_peft_model_state_dict(pm)
    assert ("base_model.vera_A" in ref) == kw.get("save_projection", True)
    assert cm.pass_counts["vera"] == sum(k.endswith("vera_lambda_b") for k in ref)
    check_against_peft(pm, cm, name, snapshot, tmp_path, "vera", lambda k: k + ".default")


def test_vera_init_matches_peft_and_is_identity():
    """A spec-built VeRA adapter: PEFT's projections (same PRNG key, max dims) and vectors."""
    targets = ["q_proj", "k_proj", "up_proj"]  # in 64/64/64, out 64/32/128
    model = tiny_model("tiny-llama").eval()
    cm = peftc.compile(model, {"methods": [{"vera": {"targets": targets, "r": 6, "prng_key": 3}}]},
                       example_inputs("tiny-llama")).eval()
    pm = get_peft_model(tiny_model("tiny-llama"), VeraConfig(r=6, target_modules=targets, projection_prng_key=3))
    sd, ref = cm.adapter_state_dict(), get_peft_model_state_dict(pm)
    assert sd["base_model.vera_A"].shape == (6, 64) and sd["base_model.vera_B"].shape == (128, 6)
    assert set(sd) == set(ref) and all(torch.equal(sd[k], ref[k]) for k in ref)
    ex = example_inputs("tiny-llama", 2, 5, seed=2)
    with torch.no_grad():
        assert torch.equal(cm(**ex).logits, model(**ex).logits)  # lambda_b starts at zero
    roles = [n.meta["peftc"]["role"] for n in cm.graph_module.graph.nodes
             if n.meta.get("peftc", {}).get("module") == "model.layers.0.self_attn.k_proj"]
    assert roles == ["projection", "slice_A", "projection", "slice_B", "param", "param",
                     "vera_A", "lambda_d", "vera_B", "lambda_b", "add"]
    assert cm.peft_config()["target_modules"] == sorted(
        f"model.layers.{i}.{m}" for i in (0, 1) for m in ("self_attn.q_proj", "self_attn.k_proj", "mlp.up_proj"))


LN_CASES = [
    ("tiny-llama", {}),  # PEFT's default norms for llama (RMSNorm): input/post-attention + final
    ("tiny-gpt2", {}),  # LayerNorm with bias: ln_1, ln_2, ln_f
    ("tiny-qwen2", {"target_modules": ["input_layernorm", "norm"]}),
    ("tiny-llama", {"exclude_modules": ["model.norm"]}),  # PEFT's defaults minus the final norm
]


@pytest.mark.parametrize("name, kw", LN_CASES)
def test_ln_tuning_matches_peft(tmp_path, name, kw):
    pm, fresh, snapshot = peft_pair(name, LNTuningConfig(**kw), tmp_path)
    cm = peftc.from_peft(fresh, tmp_path / "peft", example_inputs(name), trainable=True)
    ref = get_peft_model_state_dict(pm)
    assert cm.pass_counts["ln_tuning"] == len(ref)  # one swapped parameter read per key
    check_against_peft(pm, cm, name, snapshot, tmp_path, "ln_tuning",
                       lambda k: k.replace(".ln_tuning_layers.", ".ln_tuning_layers.default."))


def test_plain_torch_frontend():
    """fx.symbolic_trace graphs (call_module norms, linears): LN tuning equals the eager model
    with the trained copies loaded; VeRA merges exactly."""
    model = tiny_model("tiny-torch", dropout=0.0).eval()
    ex = example_inputs("tiny-torch", 3, 5, seed=1)
    cm = peftc.compile(model, {"methods": [{"ln_tuning": {"targets": ["norm1", "norm"]}}]},
                       example_inputs("tiny-torch")).eval()
    assert cm.pass_counts["ln_tuning"] == 6 and cm.num_trainable_parameters() == 3 * 2 * 64
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for p in cm.trainable_parameters():
            p.add_(torch.randn(p.shape))
        for path in ("layers.0.norm1", "layers.1.norm1", "norm"):
            ref.get_submodule(path).load_state_dict(cm.adapters.get_submodule(f"{path}.ln_tuning_layers.default").state_dict())
        torch.testing.assert_close(cm(**ex), ref(**ex), atol=1e-6, rtol=0)
    cm = peftc.compile(model, {"methods": [{"vera": {"targets": ["qkv", "fc2"], "r": 4}}]},
                       example_inputs("tiny-torch")).eval()
    assert cm.pass_counts["vera"] == 4
    with torch.no_grad():
        for p in cm.trainable_parameters():
            p.add_(torch.randn(p.shape))
        out = cm(**ex)
        assert (out - model(**ex)).abs().max() > 1e-2
        cm.merge()
        assert (cm(**ex) - out).abs().max() <= 1e-5


@pytest.mark.parametrize("method, body, field", [
    ("vera", {"targets": ["q_proj"], "r": 0}, "vera.r"),
    ("vera", {"targets": ["q_proj"], "d_initial": "small"}, "vera.d_initial"),
    ("vera", {"targets": ["q_proj"], "dropout": 1.5}, "vera.dropout"),
    ("vera", {"targets": ["q_proj"], "prng_key": -1}, "vera.prng_key"),
    ("vera", {"targets": ["q_proj"], "layers_pattern": "layers"}, "vera.layers_pattern"),
    ("ln_tuning", {"targets": "all-linear"}, "ln_tuning.targets"),
])
def test_bad_fields_are_spec_errors(method, body, field):
    with pytest.raises(SpecError) as e:
        peftc.Spec.from_dict({"methods": [{method: body}]})
    assert e.value.field == field


@pytest.mark.parametrize("cfg, field", [
    ({"peft_type": "VERA", "target_modules": ["q_proj"], "bias": "all"}, "peft.bias"),
])
def test_unsupported_peft_fields(cfg, field):
    with pytest.raises(SpecError) as e:
        peftc.Spec.from_peft(cfg)
    assert e.value.field == field


@pytest.mark.parametrize("method", ["vera", "ln_tuning"])
def test_no_default_for_unknown_model_type(method):
    with pytest.raises(SpecError, match="no default for model type"):
        peftc.compile(tiny_model("tiny-torch"), {"methods": [{method: {}}]}, example_inputs("tiny-torch"))
