"""LoHa and LoKr against HF PEFT (Llama; PEFT has neither for Conv1D): logits, counts, keys,
gradients, checkpoint round trip, merge, init and shapes, factorization, spec errors."""

import copy

import pytest
import torch
from peft import LoHaConfig, LoKrConfig, PeftModel, get_peft_model, get_peft_model_state_dict
from peft.tuners.lokr.layer import factorization as peft_factorization

import peftc
from peftc import SpecError
from peftc.models import example_inputs, tiny_model
from peftc.passes.methods.lokr import factorization

NAME = "tiny-llama"
ADAPTER_METHODS = {"loha", "lokr"}


def peft_pair(cfg, tmp_path):
    base = tiny_model(NAME)
    snapshot = copy.deepcopy(base.state_dict())
    pm = get_peft_model(base, cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in pm.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    pm.save_pretrained(tmp_path / "peft")
    fresh = tiny_model(NAME)
    fresh.load_state_dict(snapshot)
    return pm.eval(), fresh, snapshot


def lm_loss(logits, ids):
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())


CASES = [
    ("loha", LoHaConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])),
    ("loha", LoHaConfig(r=4, alpha=6, target_modules=["q_proj", "up_proj", "down_proj"], init_weights=False,
                        rank_pattern={"down_proj": 2}, alpha_pattern={"q_proj": 3})),
    ("lokr", LoKrConfig(r=8, alpha=4, target_modules=["q_proj", "k_proj", "down_proj"])),  # w1, w2 whole
    ("lokr", LoKrConfig(r=2, alpha=3, decompose_both=True, target_modules=["q_proj", "v_proj", "gate_proj"])),
    ("lokr", LoKrConfig(r=1, alpha=2, decompose_factor=4, init_weights="lycoris", target_modules="all-linear")),
]


@pytest.mark.parametrize("method, cfg", CASES)
def test_from_peft_matches(tmp_path, method, cfg):
    pm, fresh, snapshot = peft_pair(cfg, tmp_path)
    cm = peftc.from_peft(fresh, tmp_path / "peft", example_inputs(NAME), trainable=True).eval()
    ex = example_inputs(NAME, 3, 13, seed=4)  # example inputs are (2, 8)
    with torch.no_grad():
        ref = pm(**ex).logits
        torch.testing.assert_close(cm(**ex).logits, ref, atol=1e-4, rtol=0)
    ref_sd, ours = get_peft_model_state_dict(pm), cm.adapter_state_dict()
    assert set(ours) == set(ref_sd) and all(torch.equal(ours[k], ref_sd[k]) for k in ref_sd)
    sites = {k.rpartition(".")[0] for k in ref_sd}
    assert cm.pass_counts[method] == len(sites) > 0
    assert cm.num_trainable_parameters() == pm.get_nb_trainable_parameters()[0]
    # training: same loss, and every trainable tensor gets PEFT's gradient
    pm.train()
    cm.train()
    losses = []
    for model in (pm, cm):  # loss from logits: a `labels` keyword would need a second capture
        loss = lm_loss(model(**ex).logits, ex["input_ids"])
        loss.backward()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(losses[1], abs=1e-5)
    peft_grads = {k: p.grad for k, p in pm.named_parameters() if p.requires_grad}
    params = cm._peft_params()
    assert {id(p) for p in params.values()} == {id(p) for p in cm.trainable_parameters()}
    for key, p in params.items():
        assert p.grad is not None and p.grad.abs().sum() > 0, key
        torch.testing.assert_close(p.grad, peft_grads[key + ".default"], atol=1e-5, rtol=1e-4)
    # save -> PeftModel.from_pretrained
    cm.eval()
    cm.save_adapter(tmp_path / "ours")
    again = tiny_model(NAME)
    again.load_state_dict(snapshot)
    pm2 = PeftModel.from_pretrained(again, tmp_path / "ours").eval()
    assert pm2.peft_config["default"].peft_type.value == method.upper()
    with torch.no_grad():
        torch.testing.assert_close(pm2(**ex).logits, ref, atol=1e-6, rtol=0)
    # merge: same logits, no adapter nodes left, weights equal PEFT's merge_and_unload
    with torch.no_grad():
        unmerged = cm(**ex).logits
        cm.merge()
        assert (cm(**ex).logits - unmerged).abs().max() <= 1e-5
    assert not [n for n in cm.graph_module.graph.nodes if n.meta.get("peftc", {}).get("method") in ADAPTER_METHODS]
    assert cm.pass_counts["merge"] == len(sites)
    merged_ref = pm2.merge_and_unload().state_dict()
    for k, v in cm.merged_state_dict().items():
        torch.testing.assert_close(v, merged_ref[k], atol=1e-6, rtol=0)
    cm.unmerge()
    with torch.no_grad():
        assert torch.equal(cm(**ex).logits, unmerged)


INIT_CASES = [  # (peftc entry, the same as a PEFT config); the module each adapts differs
    ({"loha": {"targets": ["q_proj"], "r": 4}}, LoHaConfig(r=4, target_modules=["q_proj"])),
    ({"loha": {"targets": ["o_proj"], "r": 2, "init": "random"}},
     LoHaConfig(r=2, target_modules=["o_proj"], init_weights=False)),
    ({"lokr": {"targets": ["k_proj"], "r": 2, "decompose_both": True}},
     LoKrConfig(r=2, decompose_both=True, target_modules=["k_proj"])),
    ({"lokr": {"targets": ["down_proj"], "r": 8, "init": "lycoris"}},
     LoKrConfig(r=8, target_modules=["down_proj"], init_weights="lycoris")),
    ({"lokr": {"targets": ["v_proj"], "r": 1, "decompose_factor": 4, "init": "random"}},
     LoKrConfig(r=1, decompose_factor=4, target_modules=["v_proj"], init_weights=False)),
]


def test_compile_init_and_shapes_match_peft():
    """A hand-written spec builds PEFT's parameter shapes and keys; the non-random inits leave
    the model equal to the base, the random ones do not (one capture for all entries)."""
    model = tiny_model(NAME).eval()
    cm = peftc.compile(model, {"methods": [e for e, _ in INIT_CASES]}, example_inputs(NAME)).eval()
    ours = {k: tuple(v.shape) for k, v in cm.adapter_state_dict().items()}
    ref = {}
    for entry, cfg in INIT_CASES:
        assert peftc.Spec.from_peft(cfg.to_dict()).methods[0] == peftc.Spec.from_dict({"methods": [entry]}).methods[0]
        ref.update({k: tuple(v.shape) for k, v in get_peft_model_state_dict(get_peft_model(tiny_model(NAME), cfg)).items()})
    assert ours == ref
    for entry, targets in zip(cm.spec.methods, cm.targets):
        for path in targets:
            module = cm.adapters.get_submodule(f"{path}.{entry.store_dir}.default")
            w = model.get_parameter(f"{path}.weight")
            changed = not torch.equal(entry.fold(path, module, w, None, False)[0], w)
            assert changed == (entry.init == "random"), (path, entry.init)
    ex = example_inputs(NAME, 1, 5, seed=2)
    with torch.no_grad():  # the graph reads the live parameters: zero the random entries
        for entry, targets in zip(cm.spec.methods, cm.targets):
            if entry.init == "random":
                for path in targets:
                    for p in cm.adapters.get_submodule(f"{path}.{entry.store_dir}.default").parameters():
                        p.zero_()
        assert torch.equal(cm(**ex).logits, model(**ex).logits)


def test_multiple_entries_and_mixed_batch(tmp_path):
    """Two LoKr entries with different r/alpha save as one PEFT config (rank/alpha patterns);
    a mixed batch applies the adapter to the samples that name it only."""
    model = tiny_model(NAME).eval()
    spec = {"methods": [{"lokr": {"targets": ["q_proj"], "r": 2, "alpha": 4, "decompose_both": True}},
                        {"lokr": {"targets": ["down_proj"], "r": 1, "alpha": 3, "decompose_both": True}}]}
    cm = peftc.compile(model, spec, example_inputs(NAME)).eval()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in cm.trainable_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    cfg = cm.peft_config()
    assert cfg["rank_pattern"] and cfg["alpha_pattern"]
    cm.save_adapter(tmp_path / "ours")
    again = tiny_model(NAME)
    again.load_state_dict(model.state_dict())
    pm = PeftModel.from_pretrained(again, tmp_path / "ours").eval()
    ex = example_inputs(NAME, 3, 7, seed=8)
    with torch.no_grad():
        adapted = cm(**ex).logits
        torch.testing.assert_close(pm(**ex).logits, adapted, atol=1e-5, rtol=0)
        mixed = cm(**ex, adapter_names=["default", "__base__", "default"]).logits
        base = model(**ex).logits
    torch.testing.assert_close(mixed[[0, 2]], adapted[[0, 2]], atol=1e-5, rtol=0)
    torch.testing.assert_close(mixed[1], base[1], atol=1e-5, rtol=0)
    assert (adapted[1] - base[1]).abs().max() > 1e-3


def test_factorization_matches_peft():
    for dim in range(1, 400):
        for factor in (-1, 1, 2, 3, 4, 5, 8, 16, 64):
            assert factorization(dim, factor) == peft_factorization(dim, factor), (dim, factor)


@pytest.mark.parametrize("method, fields, bad", [
    ("loha", {"r": 0}, "r"),
    ("loha", {"alpha": -1}, "alpha"),
    ("loha", {"rank_dropout": 0.1}, "rank_dropout"),
    ("lokr", {"module_dropout": 0.5}, "module_dropout"),
    ("loha", {"init": "lycoris"}, "init"),
    ("lokr", {"init": "gaussian"}, "init"),
    ("lokr", {"decompose_factor": 0}, "decompose_factor"),
    ("lokr", {"decompose_both": "yes"}, "decompose_both"),
    ("lokr", {"rank_pattern": {"q_proj": 0}}, "rank_pattern"),
])
def test_bad_field_is_spec_error(method, fields, bad):
    with pytest.raises(SpecError) as e:
        peftc.Spec.from_dict({"methods": [{method: {"targets": ["q_proj"], **fields}}]})
    assert e.value.field == f"{method}.{bad}"


def test_peft_dropout_and_conv1d_are_rejected():
    with pytest.raises(SpecError) as e:
        peftc.Spec.from_peft(LoHaConfig(target_modules=["q_proj"], rank_dropout=0.1).to_dict())
    assert e.value.field == "loha.rank_dropout"
    with pytest.raises(SpecError) as e:  # GPT-2's Conv1D: PEFT has no LoKr for it either
        peftc.compile(tiny_model("tiny-gpt2"), {"methods": [{"lokr": {"targets": ["c_attn"]}}]},
                      example_inputs("tiny-gpt2"))
    assert e.value.field == "methods[0].lokr.targets"
