"""A failed ``peftc.compile`` leaves the user's model exactly as it was: modules, train/eval
flags, parameters (objects, storages, values) and requires_grad, whatever step failed."""

import pytest
import torch

import peftc
from peftc.errors import CaptureError, PassError, SpecError
from peftc.models import example_inputs, tiny_model
from peftc.passes import pipeline

LORA = {"methods": [{"lora": {"targets": ["q_proj", "v_proj"], "r": 4}}]}


def user_model():
    """A model as a user leaves it mid-project: embeddings frozen and in eval, the rest training."""
    model = tiny_model("tiny-llama").train()
    model.model.embed_tokens.eval()
    model.model.embed_tokens.weight.requires_grad_(False)
    return model


def state(model):
    return {
        "modules": [(n, id(m), m.training) for n, m in model.named_modules()],
        "params": [(n, id(p), p.requires_grad, p.untyped_storage().nbytes(), p.detach().clone())
                   for n, p in model.named_parameters()],
        "buffers": [(n, id(b)) for n, b in model.named_buffers()],
    }


def assert_same(before, after):
    assert after["modules"] == before["modules"] and after["buffers"] == before["buffers"]
    assert [p[:4] for p in after["params"]] == [p[:4] for p in before["params"]]
    for (n, *_, value), (_, *_, now) in zip(before["params"], after["params"]):
        assert torch.equal(value, now), n


def fail_after(monkeypatch, pass_name):
    """run_pipeline that raises once a pipeline containing ``pass_name`` has run."""
    real = pipeline.run_pipeline

    def run(gm, ctx, passes, **kwargs):
        gm = real(gm, ctx, passes, **kwargs)
        if any(name == pass_name for name, _ in passes):
            raise PassError(f"pass {pass_name!r} failed (injected)")
        return gm
    monkeypatch.setattr(pipeline, "run_pipeline", run)  # build() runs every pass through it


def test_capture_error_batch_mismatch():
    model = user_model()
    before = state(model)
    with pytest.raises(CaptureError):  # torch.export fails inside the model: masks of another batch
        peftc.compile(model, LORA, {"input_ids": torch.randint(0, 128, (2, 8)), "attention_mask": torch.ones(3, 5)})
    assert_same(before, state(model))


def test_unknown_keyword():
    model = user_model()
    before = state(model)
    with pytest.raises(SpecError, match="'ids'"):
        peftc.compile(model, LORA, {"ids": torch.randint(0, 128, (2, 8))})
    assert_same(before, state(model))


@pytest.mark.parametrize("pass_name, optimize", [("lora", None), ("quantize", {"quantize": {"release_base": True}})],
                         ids=["rewrite-pass", "after-quantize-released-the-base"])
def test_pass_error(monkeypatch, pass_name, optimize):
    model = user_model()
    before = state(model)
    fail_after(monkeypatch, pass_name)
    with pytest.raises(PassError, match="injected"):
        peftc.compile(model, LORA, example_inputs("tiny-llama"), optimize=optimize)
    assert_same(before, state(model))
    monkeypatch.undo()  # the same model compiles afterwards, and still trains its own way
    cm = peftc.compile(model, LORA, example_inputs("tiny-llama"))
    assert cm.num_trainable_parameters() > 0
