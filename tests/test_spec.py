"""Spec validation: every bad input names the field, the value and what is allowed,
and fails before any capture work."""

import json

import pytest
import torch

import peftc
from peftc import SpecError
from peftc.models import example_inputs, tiny_model


def lora(**fields):
    return {"methods": [{"lora": {"targets": ["q_proj"], **fields}}]}


def test_round_trip_dict_yaml_json(tmp_path):
    spec = peftc.Spec.from_dict({
        "adapter": "mine",
        "methods": [{"lora": {"targets": ["q_proj", "v_proj"], "r": 16, "alpha": 32, "dropout": 0.05,
                              "rslora": True, "layers": [0], "layers_pattern": "layers"}},
                    {"train": {"targets": ["lm_head"]}}],
    })
    assert spec.adapter == "mine" and spec.methods[0].r == 16 and spec.methods[0].targets == ("q_proj", "v_proj")
    for name in ("s.yaml", "s.json"):
        spec.save(tmp_path / name)
        assert peftc.Spec.load(tmp_path / name) == spec
    assert peftc.Spec.from_dict(spec.to_dict()) == spec


@pytest.mark.parametrize("spec, field, fragment", [
    (lora(r=0), "lora.r", "integer > 0"),
    (lora(r=2.5), "lora.r", "integer > 0"),
    (lora(alpha=-1), "lora.alpha", "> 0"),
    (lora(dropout=1.5), "lora.dropout", "[0, 1)"),
    (lora(init="pissa"), "lora.init", "gaussian"),
    (lora(bias="some"), "lora.bias", "lora_only"),
    (lora(rslora="yes"), "lora.rslora", "true or false"),
    (lora(layers=[-1]), "lora.layers", "layer indices"),
    (lora(targets=[]), "lora.targets", "all-linear"),
    (lora(targets="re:("), "lora.targets", "regular expression"),
    (lora(targets=["re:.*q"]), "lora.targets", "whole selector"),
    (lora(rank="8"), "methods[0].lora.rank", "one of the fields"),
    ({"methods": [{"loraa": {"targets": ["q"]}}]}, "methods[0]", "lora"),
    ({"methods": [{"lora": {"r": 4}}]}, "methods[0].lora.targets", "required"),
    ({"methods": []}, "methods", "non-empty"),
    ({"methods": [{"lora": {"targets": ["q"]}, "train": {"targets": ["x"]}}]}, "methods[0]", "exactly one"),
    ({"method": [{"lora": {}}]}, "method", "top-level fields"),
    ({"adapter": "a.b", **lora()}, "adapter", "letters"),
    ({"task_type": "CLASSIFY", **lora()}, "task_type", "SEQ_CLS"),
    ({"optimize": ["fusee"], **lora()}, "optimize", "unknown optimization"),
    ({"methods": [{"train": {"targets": "all-linear"}}]}, "train.targets", "adapters"),
])
def test_bad_spec_names_field_value_and_allowed(spec, field, fragment):
    with pytest.raises(SpecError) as err:
        peftc.Spec.from_dict(spec)
    msg = str(err.value)
    assert f"'{field}'" in msg and fragment in msg and "got" in msg


def test_spec_error_is_a_value_error():
    assert issubclass(SpecError, ValueError) and issubclass(SpecError, peftc.PeftcError)


def test_load_errors(tmp_path):
    with pytest.raises(SpecError, match="existing"):
        peftc.Spec.load(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("methods: [lora: {targets: [q_proj]\n")
    with pytest.raises(SpecError, match="valid YAML"):
        peftc.Spec.load(bad)


def test_optimize_override_validated_before_capture(monkeypatch):
    from peftc import compiled

    monkeypatch.setattr(compiled, "capture", lambda *a, **k: pytest.fail("captured a bad spec"))
    with pytest.raises(SpecError, match="unknown optimization"):
        peftc.compile(tiny_model("tiny-llama"), lora(), example_inputs("tiny-llama"), optimize=["nope"])


@pytest.mark.parametrize("fields, fragment", [
    ({"targets": ["q_prj"]}, "q_proj"),  # a typo lists the close match
    ({"targets": "re:.*attention\\.nothing"}, "matches no module"),
    ({"targets": ["q_proj"], "layers": [7], "layers_pattern": "layers"}, "matches no module"),
    ({"targets": ["self_attn"]}, "LlamaAttention"),  # not a linear layer
])
def test_target_errors_before_capture(monkeypatch, fields, fragment):
    from peftc import compiled

    monkeypatch.setattr(compiled, "capture", lambda *a, **k: pytest.fail("capture ran"))
    with pytest.raises(SpecError) as err:
        peftc.compile(tiny_model("tiny-llama"), {"methods": [{"lora": fields}]}, example_inputs("tiny-llama"))
    assert fragment in str(err.value) and "lora.targets" in str(err.value)


def test_overlapping_entries_rejected():
    spec = {"methods": [{"lora": {"targets": ["q_proj"]}}, {"lora": {"targets": "re:.*layers\\.0\\..*_proj"}}]}
    with pytest.raises(SpecError, match="already adapts"):
        peftc.compile(tiny_model("tiny-llama"), spec, example_inputs("tiny-llama"))


def test_bad_example_inputs():
    with pytest.raises(SpecError, match="example_inputs"):
        peftc.compile(tiny_model("tiny-llama"), lora(), {})
    with pytest.raises(SpecError, match="example_inputs"):
        peftc.compile(tiny_model("tiny-llama"), lora(), torch.zeros(2, 3))


def test_from_peft_config_object_and_file(tmp_path):
    from peft import LoraConfig

    cfg = LoraConfig(target_modules=["q_proj", "v_proj"], r=4, lora_alpha=16, lora_dropout=0.1,
                     use_rslora=True, init_lora_weights="gaussian", layers_to_transform=[1])
    spec = peftc.Spec.from_peft(cfg)
    (m,) = spec.methods
    assert (m.r, m.alpha, m.dropout, m.rslora, m.init, m.layers) == (4, 16, 0.1, True, "gaussian", (1,))
    assert m.targets == ("q_proj", "v_proj")
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg.to_dict(), default=list))
    assert peftc.Spec.from_peft(tmp_path) == peftc.Spec.load(tmp_path / "adapter_config.json") == spec
    assert peftc.Spec.from_peft(LoraConfig(target_modules=".*q_proj")).methods[0].targets == "re:.*q_proj"


def test_from_peft_rejects_unsupported_fields(tmp_path):
    from peft import LoraConfig

    with pytest.raises(SpecError, match="lora_bias"):
        peftc.Spec.from_peft(LoraConfig(target_modules=["q_proj"], lora_bias=True))
    with pytest.raises(SpecError, match="peft_type"):
        peftc.Spec.from_peft({"peft_type": "BOFT", "target_modules": ["q"]})
