"""CompiledModel looks like the HF model it wraps: forward signature, config/device/dtype,
embeddings, checkpointing switches, save_pretrained; accelerate's prepare accepts it."""

import copy
import inspect
import json

import pytest
import torch

import peftc
from peftc import SpecError
from peftc.models import example_inputs, tiny_model

LORA = {"methods": [{"lora": {"targets": ["q_proj", "v_proj"], "r": 4}}]}
SPECS = {"tiny-llama": LORA, "tiny-bert": {"methods": [{"lora": {"targets": ["query", "value"], "r": 4}}]},
         "tiny-torch": {"methods": [{"lora": {"targets": ["fc1"], "r": 4}}]}}


def _compiled(name="tiny-llama"):
    cm = peftc.compile(tiny_model(name), SPECS[name], example_inputs(name))
    with torch.no_grad():  # non-zero B: a dropped adapter path would show
        for key, p in cm._peft_params().items():
            if "lora_B" in key:
                p.normal_(0, 0.05)
    return cm


@pytest.mark.parametrize("name", SPECS)
def test_forward_signature_is_the_models_plus_adapter_names(name):
    cm = _compiled(name)
    theirs = inspect.signature(cm.get_base_model().forward).parameters
    ours = inspect.signature(cm.forward).parameters
    named = [n for n, p in theirs.items() if p.kind is not p.VAR_KEYWORD]
    assert list(ours)[: len(named)] == named
    assert ours["adapter_names"].kind is inspect.Parameter.KEYWORD_ONLY
    var_kw = [n for n, p in theirs.items() if p.kind is p.VAR_KEYWORD]
    assert list(ours) == [*named, "adapter_names", *var_kw]  # **kwargs stays last
    from_class = inspect.signature(type(cm).forward).parameters  # what Trainer's find_labels reads
    assert list(from_class) == ["self", *ours]
    assert isinstance(cm, peftc.CompiledModel) and type(cm).__name__ == f"Compiled{type(cm.get_base_model()).__name__}"
    clone = copy.deepcopy(cm)
    assert type(clone) is type(cm)
    assert inspect.signature(clone.forward).parameters.keys() == ours.keys()
    assert clone.forward.__self__ is clone


def test_positional_and_keyword_calls_agree_at_a_new_shape():
    cm = _compiled()
    ids = torch.randint(0, 128, (3, 11))
    with torch.no_grad():
        torch.testing.assert_close(cm(ids).logits, cm(input_ids=ids).logits, rtol=0, atol=0)


@pytest.mark.parametrize("name,wrong,right", [("tiny-llama", "ids", "input_ids"), ("tiny-torch", "inputs", "x")])
def test_unknown_keyword_is_a_spec_error_naming_it(name, wrong, right):
    cm = _compiled(name)
    captured = len(cm.graphs.captured)
    value = example_inputs(name)[right]
    with pytest.raises(SpecError) as err:
        cm(**{wrong: value})
    text = str(err.value)
    assert repr(wrong) in text and repr(right) in text and "dynamic_shapes" not in text
    assert len(cm.graphs.captured) == captured  # said before any capture


def test_keywords_only_in_transformers_kwargs_are_named_too():
    cm = _compiled()
    with pytest.raises(SpecError, match=r"output_hidden_states.*\*\*kwargs") as err:
        cm(input_ids=torch.randint(0, 128, (2, 8)), output_hidden_states=True)
    assert "dynamic_shapes" not in str(err.value)


def test_attributes_delegate_to_the_base_model():
    cm = _compiled()
    base = cm.get_base_model()
    assert cm.config is base.config and cm.generation_config is base.generation_config
    assert cm.device == torch.device("cpu") and cm.dtype == torch.float32
    assert cm.get_input_embeddings() is base.get_input_embeddings()
    assert cm.get_output_embeddings() is base.lm_head
    assert cm.main_input_name == "input_ids" and cm.accepts_loss_kwargs is False
    plain = _compiled("tiny-torch")
    assert not hasattr(plain, "config") and getattr(plain, "generation_config", None) is None


def test_save_pretrained_takes_hf_keywords_and_writes_a_peft_adapter(tmp_path):
    import peft
    cm = _compiled().eval()
    out = cm.save_pretrained(tmp_path / "a", safe_serialization=True, state_dict=cm.state_dict(),
                             is_main_process=True, max_shard_size="5GB")
    assert json.loads((out / "adapter_config.json").read_text())["peft_type"] == "LORA"
    ref = peft.PeftModel.from_pretrained(tiny_model("tiny-llama"), out).eval()
    ids = torch.randint(0, 128, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(cm(input_ids=ids).logits, ref(input_ids=ids).logits, rtol=0, atol=1e-5)
    cm.save_pretrained(tmp_path / "b", is_main_process=False)
    assert not (tmp_path / "b").exists()
    with pytest.raises(SpecError, match="safe_serialization"):
        cm.save_pretrained(tmp_path / "c", safe_serialization=False)


def test_save_pretrained_selected_adapters_use_peft_layout(tmp_path):
    cm = _compiled()
    cm.add_adapter(LORA, name="other")
    cm.save_pretrained(tmp_path, selected_adapters=["default", "other"])
    assert (tmp_path / "adapter_model.safetensors").is_file()
    assert (tmp_path / "other" / "adapter_model.safetensors").is_file()


def _grads(cm, ids):
    cm.zero_grad()
    cm(input_ids=ids, labels=ids).loss.backward()
    return [p.grad.clone() for p in cm.trainable_parameters()]


def test_gradient_checkpointing_hf_calling_convention():
    cm = _compiled()
    ids = torch.randint(0, 128, (2, 8))
    plain = _grads(cm, ids)
    cm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert cm.is_gradient_checkpointing and cm.is_activation_checkpointing
    assert "not applied" not in cm.graph_summary()
    for a, b in zip(plain, _grads(cm, ids)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    cm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    assert "use_reentrant=True not applied" in cm.graph_summary()  # visible, never silent
    cm.activation_checkpointing_disable()
    assert not cm.is_gradient_checkpointing
    with pytest.raises(SpecError, match="every_n_layers"):
        cm.activation_checkpointing_enable(every_n_layers=2)
    with pytest.raises(SpecError, match="gradient_checkpointing_kwargs"):
        cm.gradient_checkpointing_enable(gradient_checkpointing_kwargs="use_reentrant")


def test_accelerate_prepare_accepts_it_and_trains():
    import accelerate  # installed with peft
    cm = _compiled()
    acc = accelerate.Accelerator(cpu=True)
    opt = torch.optim.AdamW(cm.trainable_parameters(), lr=1e-2)
    ids = torch.randint(0, 128, (4, 10))
    loader = torch.utils.data.DataLoader([{"input_ids": r, "labels": r} for r in ids], batch_size=4)
    model, opt, loader = acc.prepare(cm, opt, loader)
    before = [p.detach().clone() for p in cm.trainable_parameters()]
    losses = []
    for _ in range(3):
        for batch in loader:
            loss = model(**batch).loss
            acc.backward(loss)
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(not torch.equal(a, b) for a, b in zip(before, cm.trainable_parameters()))
    assert acc.unwrap_model(model) is cm
