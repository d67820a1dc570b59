"""PEFT checkpoint IO: corrupt, pickled or mismatched files get errors naming the problem;
a failed save leaves the previous files intact."""

import json

import pytest
import torch

import peftc
from peftc import CheckpointError
from peftc.models import example_inputs, tiny_model

SPEC = {"methods": [{"lora": {"targets": ["q_proj", "v_proj"], "r": 4, "alpha": 8}}]}


@pytest.fixture
def saved(tmp_path):
    cm = peftc.compile(tiny_model("tiny-llama"), SPEC, example_inputs("tiny-llama"))
    with torch.no_grad():
        for p in cm.trainable_parameters():
            p.normal_(0, 0.1)
    cm.save_adapter(tmp_path / "ad")
    return cm, tmp_path / "ad"


def load(path, **kw):
    return peftc.from_peft(tiny_model("tiny-llama"), path, example_inputs("tiny-llama"), **kw)


def test_round_trip_is_exact(saved):
    cm, path = saved
    cm2 = load(path)
    for k, v in cm.adapter_state_dict().items():
        assert torch.equal(cm2.adapter_state_dict()[k], v)
    assert sorted(p.name for p in path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_safetensors(saved, damage):
    _, path = saved
    w = path / "adapter_model.safetensors"
    data = w.read_bytes()
    w.write_bytes({"truncate": data[: len(data) // 2], "garbage": b"\x00\xff" * 64, "empty": b""}[damage])
    with pytest.raises(CheckpointError, match="adapter_model.safetensors"):
        load(path)


def test_bad_config_files(saved):
    _, path = saved
    cfg = path / "adapter_config.json"
    cfg.write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load(path)
    cfg.write_text(json.dumps({"r": 4}))
    with pytest.raises(CheckpointError, match="peft_type"):
        load(path)
    cfg.unlink()
    with pytest.raises(CheckpointError, match="no such file"):
        load(path)


def test_missing_weights(saved):
    _, path = saved
    (path / "adapter_model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="neither"):
        load(path)


def test_pickle_refused_unless_opted_in(saved):
    cm, path = saved
    w = path / "adapter_model.safetensors"
    from safetensors.torch import load_file

    torch.save(load_file(str(w)), path / "adapter_model.bin")
    w.unlink()
    with pytest.raises(CheckpointError, match="allow_pickle=True"):
        load(path)
    cm2 = load(path, allow_pickle=True)
    for k, v in cm.adapter_state_dict().items():
        assert torch.equal(cm2.adapter_state_dict()[k], v)


def test_strict_load_names_keys(saved):
    cm, _ = saved
    sd = dict(cm.adapter_state_dict())
    key = next(iter(sd))
    missing = {k: v for k, v in sd.items() if k != key}
    with pytest.raises(CheckpointError, match="missing keys") as e:
        cm.load_adapter_state_dict(missing)
    assert key in str(e.value)
    with pytest.raises(CheckpointError, match="unexpected keys.*extra.weight"):
        cm.load_adapter_state_dict({**sd, "base_model.model.extra.weight": torch.ones(1)})
    with pytest.raises(CheckpointError, match=r"has shape \(4, 3\), expected"):
        cm.load_adapter_state_dict({**sd, key: torch.ones(4, 3)})


def test_rank_mismatch_from_file(saved, tmp_path):
    _, path = saved
    cfg = json.loads((path / "adapter_config.json").read_text())
    cfg["r"] = 8
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="expected"):
        load(path)


def test_failed_save_leaves_old_files(saved, monkeypatch):
    cm, path = saved
    before = {p.name: p.read_bytes() for p in path.iterdir()}
    import safetensors.torch

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with torch.no_grad():
        next(iter(cm.trainable_parameters())).add_(1.0)
    with pytest.raises(OSError, match="disk full"):
        cm.save_adapter(path)
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before  # no temp files, no change
