"""transformers.Trainer trains a CompiledModel with default TrainingArguments; its checkpoint
loads in HF PEFT with the same logits."""

import json

import peft
import pytest
import torch
import transformers

import peftc
from peftc.hf_surface import adapter_checkpoints
from peftc.models import example_inputs, tiny_model

SPEC = {"methods": [{"lora": {"targets": ["q_proj", "v_proj"], "r": 4, "alpha": 8}}]}


class Rows(torch.utils.data.Dataset):
    """Dicts of tensors, as a tokenised dataset gives them (no `datasets` needed)."""

    def __init__(self, n: int, seq: int):
        g = torch.Generator().manual_seed(3)
        self.ids = torch.randint(0, 128, (n, seq), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]),
                "labels": self.ids[i].clone(), "text": "an unused column Trainer must drop"}


def _compiled():
    cm = peftc.compile(tiny_model("tiny-llama"), SPEC, example_inputs("tiny-llama"))
    with torch.no_grad():  # PEFT initialises B to zero, which would hide a wrong adapter path
        for name, p in cm._peft_params().items():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return cm


def _loss(cm, rows):
    cm.eval()
    with torch.no_grad():
        ids = rows.ids
        out = cm(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss.item()
    cm.train()
    return out


def test_trainer_default_arguments_train_and_checkpoint_loads_in_peft(tmp_path):
    cm = _compiled()
    rows = Rows(8, 12)  # 8 rows = one default batch per step; length 12, captured at 8
    before = _loss(cm, rows)
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=3, report_to="none", use_cpu=True)
    trainer = transformers.Trainer(model=cm, args=args, train_dataset=rows, callbacks=[adapter_checkpoints()])
    result = trainer.train()
    after = _loss(cm, rows)
    assert after < before, (before, after)
    assert result.global_step == 3 and result.training_loss > 0
    metrics = trainer.evaluate(rows)  # eval mode, labels in: Trainer's loss is the model's
    assert metrics["eval_loss"] == pytest.approx(after, abs=1e-5)

    ckpt = tmp_path / "checkpoint-3"
    assert (ckpt / "adapter_model.safetensors").is_file() and (ckpt / "trainer_state.json").is_file()
    assert json.loads((ckpt / "adapter_config.json").read_text())["peft_type"] == "LORA"
    ref = peft.PeftModel.from_pretrained(tiny_model("tiny-llama"), ckpt).eval()
    ids = torch.randint(0, 128, (3, 10))
    cm.eval()
    with torch.no_grad():
        ours, theirs = cm(input_ids=ids).logits, ref(input_ids=ids).logits
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    theirs_sd = ref.state_dict()
    for k, v in cm.adapter_state_dict().items():  # the checkpoint holds the trained weights, bit for bit
        assert torch.equal(v, theirs_sd[k.replace(".weight", ".default.weight")]), k


def test_trainer_without_the_callback_still_trains_and_saves(tmp_path):
    """Trainer saves a non-PreTrainedModel's state dict: it must be writable (no shared tensors)."""
    cm = _compiled()
    rows = Rows(8, 6)
    before = _loss(cm, rows)
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=2, report_to="none", use_cpu=True)
    transformers.Trainer(model=cm, args=args, train_dataset=rows).train()
    assert _loss(cm, rows) < before
    assert (tmp_path / "checkpoint-2" / "model.safetensors").is_file()


def test_trainer_activation_checkpointing_becomes_recompute(tmp_path):
    cm = _compiled()
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=1, report_to="none", use_cpu=True,
                                          activation_checkpointing=True, save_strategy="no")
    transformers.Trainer(model=cm, args=args, train_dataset=Rows(8, 6)).train()
    assert cm.is_gradient_checkpointing and cm.spec.optimize["recompute"] == {"policy": "blocks"}
    assert "gradient_checkpointing_enable()" in cm.graph_summary()
