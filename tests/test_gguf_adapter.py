"""A PEFT LoRA adapter written as a llama.cpp GGUF adapter: read back with gguf's own reader.

Every delta llama.cpp would apply, ``alpha / rank * lora_b @ lora_a`` from the file, must equal
PEFT's ``get_delta_weight`` in llama.cpp's layout: q/k rows permuted as its converter permutes the
base weights (checked against transformers' GGUF reader, which undoes that permutation).
"""

import json
import shutil

import peft  # a dev dependency: the reference must be there
import pytest
import torch
import transformers as tf
from safetensors.torch import load_file, save_file
from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

gguf = pytest.importorskip("gguf", reason="gguf is not installed: pip install 'peftc[gguf]' (scripts/setup.sh --dev installs it)")

from peftc.gguf_adapter import GGUFExportError, _rope_rows, save_gguf_adapter  # noqa: E402

LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GGUF_LINEARS = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
                "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}  # llama.cpp's names
SIZES = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=128, max_position_embeddings=64)
FAMILIES = {"llama": (tf.LlamaConfig, tf.LlamaForCausalLM, True), "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM, False)}


def make_adapter(path, family="llama", seed=0, **lora):
    """A tiny base + a PEFT LoRA with every A and B random (PEFT's zero B would hide a wrong B)."""
    config_cls, model_cls, _ = FAMILIES[family]
    torch.manual_seed(seed)
    pm = peft.get_peft_model(model_cls(config_cls(**SIZES)),
                             peft.LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": LINEARS, **lora}))
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.5)
    pm.save_pretrained(path)
    return pm


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    return make_adapter(path), path


def read(path):
    r = gguf.GGUFReader(path)
    meta = {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}
    return meta, {t.name: t for t in r.tensors}


def lora_modules(pm):
    return {n.removeprefix("base_model.model."): m for n, m in pm.named_modules()
            if isinstance(m, peft.tuners.lora.LoraLayer)}


def gguf_name(module):  # model.layers.1.self_attn.q_proj -> blk.1.attn_q
    parts = module.split(".")
    return f"blk.{parts[2]}.{GGUF_LINEARS[parts[-1]]}"


def edited(src, dst, config=None, weights=None):
    """A copy of the adapter dir at ``dst`` with config fields / weight keys replaced."""
    shutil.copytree(src, dst)
    if config:
        cfg = json.loads((dst / "adapter_config.json").read_text())
        (dst / "adapter_config.json").write_text(json.dumps({**cfg, **config}))
    if weights:
        sd = weights(load_file(dst / "adapter_model.safetensors"))
        save_file(sd, dst / "adapter_model.safetensors")
    return dst


def assert_deltas(pm, tensors, alpha, permute, heads=4, kv_heads=2, atol=1e-5):
    for module, m in lora_modules(pm).items():
        a, b = (torch.from_numpy(tensors[f"{gguf_name(module)}.weight.lora_{x}"].data.copy()).float() for x in "ab")
        got = alpha / b.shape[1] * b @ a  # llama.cpp: scale = alpha / rank, rank = lora_b's ne[0]
        want = m.get_delta_weight("default")
        if permute and module.endswith(("q_proj", "k_proj")):
            n = heads if module.endswith("q_proj") else kv_heads
            reader = LlamaTensorProcessor(
                config={"num_attention_heads": heads, "num_key_value_heads": kv_heads})
            undone = reader.process(got.numpy(), f"{gguf_name(module)}.weight").weights  # transformers' inverse
            torch.testing.assert_close(torch.from_numpy(undone), want, atol=atol, rtol=1e-3)
            d = got.shape[0] // n  # rope pairs: HF's rows (i, i + d/2) of a head -> llama.cpp's (2i, 2i + 1)
            rows = [h * d + i + half * d // 2 for h in range(n) for i in range(d // 2) for half in (0, 1)]
            want = want[rows]
        torch.testing.assert_close(got, want, atol=atol, rtol=1e-3)


@pytest.mark.parametrize("family", FAMILIES)
def test_metadata_names_shapes_and_deltas(family, llama, tmp_path):
    pm, src = llama if family == "llama" else (make_adapter(tmp_path / "a", family), tmp_path / "a")
    base = pm.get_base_model().config
    out = save_gguf_adapter(src, tmp_path / "adapter.gguf", base_config=base)
    meta, tensors = read(out)
    assert meta["general.type"] == "adapter" and meta["adapter.type"] == "lora"
    assert meta["general.architecture"] == family and meta["adapter.lora.alpha"] == 8.0
    assert meta["general.file_type"] == gguf.LlamaFileType.ALL_F32
    want = {f"blk.{i}.{g}.weight.lora_{x}" for i in range(2) for g in GGUF_LINEARS.values() for x in "ab"}
    assert set(tensors) == want
    for module, m in lora_modules(pm).items():
        a, b = (tensors[f"{gguf_name(module)}.weight.lora_{x}"] for x in "ab")
        out_f, in_f = m.base_layer.weight.shape
        assert list(a.shape) == [in_f, 4] and list(b.shape) == [4, out_f]  # ggml ne: llama.cpp's check
        assert a.tensor_type == b.tensor_type == gguf.GGMLQuantizationType.F32
        torch.testing.assert_close(torch.from_numpy(a.data.copy()), m.lora_A["default"].weight)  # A as PEFT's
    assert_deltas(pm, tensors, 8.0, permute=FAMILIES[family][2])


def test_rope_permutation_is_llama_cpps(llama):
    """Applied to the base q/k weights, it is what transformers' GGUF reader undoes."""
    pm, _ = llama
    attn = pm.get_base_model().model.layers[0].self_attn
    reader = LlamaTensorProcessor(
        config={"num_attention_heads": 4, "num_key_value_heads": 2})
    for name, w, heads in (("attn_q", attn.q_proj.base_layer.weight, 4), ("attn_k", attn.k_proj.base_layer.weight, 2)):
        w = w.detach()
        permuted = _rope_rows(w, heads, name)
        assert not torch.equal(permuted, w)
        undone = reader.process(permuted.numpy(), f"blk.0.{name}.weight").weights
        torch.testing.assert_close(torch.from_numpy(undone), w, rtol=0, atol=0)


def test_f16(llama, tmp_path):
    pm, src = llama
    meta, tensors = read(save_gguf_adapter(src, tmp_path / "a.gguf", base_config=pm.config, dtype="f16"))
    assert meta["general.file_type"] == gguf.LlamaFileType.MOSTLY_F16
    assert {t.tensor_type for t in tensors.values()} == {gguf.GGMLQuantizationType.F16}
    assert_deltas(pm, tensors, 8.0, permute=True, atol=2e-2)


def test_rslora_becomes_alpha_times_sqrt_r(tmp_path):
    pm = make_adapter(tmp_path / "a", use_rslora=True)
    meta, tensors = read(save_gguf_adapter(tmp_path / "a", tmp_path / "a.gguf", base_config=pm.config))
    assert meta["adapter.lora.alpha"] == 16.0  # 8 / sqrt(4) == 16 / 4
    assert_deltas(pm, tensors, 16.0, permute=True)


def test_rank_pattern_keeps_one_alpha(tmp_path):
    """llama.cpp reads each tensor's rank from its shape: ranks may differ when alpha is one."""
    pm = make_adapter(tmp_path / "a", rank_pattern={"q_proj": 8, "down_proj": 2})
    meta, tensors = read(save_gguf_adapter(tmp_path / "a", tmp_path / "a.gguf", base_config=pm.config))
    assert tensors["blk.0.attn_q.weight.lora_b"].shape[0] == 8 and tensors["blk.1.ffn_down.weight.lora_a"].shape[1] == 2
    assert_deltas(pm, tensors, 8.0, permute=True)


def test_embeddings_and_lm_head(tmp_path):
    pm = make_adapter(tmp_path / "a", target_modules=["embed_tokens", "lm_head", "q_proj"])
    _, tensors = read(save_gguf_adapter(tmp_path / "a", tmp_path / "a.gguf", base_config=pm.config))
    assert set(tensors) == {f"{n}.weight.lora_{x}" for n in ("token_embd", "output", "blk.0.attn_q", "blk.1.attn_q")
                            for x in "ab"}
    a, b = (torch.from_numpy(tensors[f"token_embd.weight.lora_{x}"].data.copy()) for x in "ab")
    assert a.shape == (128, 4) and b.shape == (64, 4)  # llama.cpp gathers token rows of lora_a
    emb = pm.get_base_model().model.embed_tokens
    torch.testing.assert_close(2.0 * a @ b.T, emb.get_delta_weight("default"))  # (vocab, hidden)
    a, b = (torch.from_numpy(tensors[f"output.weight.lora_{x}"].data.copy()) for x in "ab")
    torch.testing.assert_close(2.0 * b @ a, pm.get_base_model().lm_head.get_delta_weight("default"))
    with pytest.raises(GGUFExportError, match="lm_head.*ties"):
        save_gguf_adapter(tmp_path / "a", tmp_path / "b.gguf", base_config={**pm.config.to_dict(),
                                                                            "tie_word_embeddings": True})


def test_base_config_from_a_local_base_model_dir(llama, tmp_path):
    pm, src = llama
    pm.config.save_pretrained(tmp_path / "base")
    d = edited(src, tmp_path / "a", config={"base_model_name_or_path": str(tmp_path / "base")})
    meta, _ = read(save_gguf_adapter(d, tmp_path / "a.gguf"))
    assert meta["general.architecture"] == "llama"
    d = edited(src, tmp_path / "b", config={"base_model_name_or_path": "meta-llama/Llama-3.2-1B"})
    with pytest.raises(GGUFExportError, match="base_config.*meta-llama/Llama-3.2-1B.*AutoConfig"):
        save_gguf_adapter(d, tmp_path / "b.gguf")


def test_alora_invocation_tokens(llama, tmp_path):
    pm, src = llama
    d = edited(src, tmp_path / "a", config={"alora_invocation_tokens": [5, 17, 3]})
    r = gguf.GGUFReader(save_gguf_adapter(d, tmp_path / "a.gguf", base_config=pm.config))
    field = r.fields["adapter.alora.invocation_tokens"]
    assert field.contents() == [5, 17, 3] and field.types == [gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.UINT32]


def _rename(old, new):
    return lambda sd: {k.replace(old, new): v for k, v in sd.items()}


@pytest.mark.parametrize("config, weights, match", [
    ({"peft_type": "IA3"}, None, "peft_type: got 'IA3'"),
    ({"use_dora": True}, None, "use_dora: got True"),
    ({"lora_bias": True}, None, "lora_bias: got True"),
    ({"init_lora_weights": "pissa_niter_4"}, None, "init_lora_weights.*path_initial_model_for_weight_conversion"),
    ({"alpha_pattern": {"q_proj": 16}}, None, "alpha_pattern.*one alpha/rank ratio"),
    ({"lora_alpha": 0}, None, "lora_alpha: got 0"),
    (None, _rename("self_attn.v_proj", "self_attn.foo_proj"), "target module: got 'model.layers.0.self_attn.foo_proj'"),
    (None, lambda sd: {**sd, "base_model.model.lm_head.weight": torch.zeros(128, 64)}, "modules_to_save"),
    (None, lambda sd: {k: v for k, v in sd.items() if "layers.1.mlp.up_proj.lora_B" not in k}, "missing one"),
], ids=["ia3", "dora", "lora_bias", "pissa", "alpha_pattern", "alpha0", "foo_proj", "full_tensor",
        "half_pair"])
def test_refusals(llama, tmp_path, config, weights, match):
    pm, src = llama
    d = edited(src, tmp_path / "a", config, weights)
    with pytest.raises(GGUFExportError, match=match):
        save_gguf_adapter(d, tmp_path / "a.gguf", base_config=pm.config)
    assert list(tmp_path.glob("*.gguf*")) == []


def test_rslora_with_varying_ranks_is_refused(tmp_path):
    pm = make_adapter(tmp_path / "a", use_rslora=True, rank_pattern={"q_proj": 8})
    with pytest.raises(GGUFExportError, match="use_rslora: got True.*one alpha/rank ratio"):
        save_gguf_adapter(tmp_path / "a", tmp_path / "a.gguf", base_config=pm.config)


def test_argument_refusals(llama, tmp_path):
    pm, src = llama
    with pytest.raises(GGUFExportError, match="dtype: got 'q4_0'; allowed: f32, f16"):
        save_gguf_adapter(src, tmp_path / "a.gguf", base_config=pm.config, dtype="q4_0")
    with pytest.raises(GGUFExportError, match="architectures: got \\['GPT2LMHeadModel'\\].*LlamaForCausalLM"):
        save_gguf_adapter(src, tmp_path / "a.gguf", base_config=tf.GPT2Config(architectures=["GPT2LMHeadModel"]))
    with pytest.raises(GGUFExportError, match="layers.1.*1 layers"):
        save_gguf_adapter(src, tmp_path / "a.gguf", base_config={**pm.config.to_dict(), "num_hidden_layers": 1})
    with pytest.raises(GGUFExportError, match="heads: got 3"):
        save_gguf_adapter(src, tmp_path / "a.gguf", base_config={**pm.config.to_dict(), "num_attention_heads": 3})


def test_write_is_atomic(llama, tmp_path, monkeypatch):
    pm, src = llama
    out = save_gguf_adapter(src, tmp_path / "a.gguf", base_config=pm.config)
    before = out.read_bytes()

    def full_disk(self, *a, **k):
        raise OSError("no space left on device")
    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", full_disk)
    with pytest.raises(OSError, match="no space"):
        save_gguf_adapter(src, out, base_config=pm.config, dtype="f16")
    assert out.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["a.gguf"]


def test_peftc_saved_adapter(tmp_path):
    """What ``cm.save_adapter`` writes exports the same as PEFT's own files."""
    import peftc
    from peftc.models import tiny_model

    model = tiny_model("tiny-llama")
    ids = torch.randint(0, 128, (1, 6))
    spec = peftc.Spec.from_dict({"methods": [{"lora": {"targets": ["q_proj", "v_proj"], "r": 4, "alpha": 8}}]})
    cm = peftc.compile(model, spec, example_inputs={"input_ids": ids, "use_cache": False})
    with torch.no_grad():
        for p in cm.trainable_parameters():
            p.normal_(0, 0.5)
    cm.save_adapter(tmp_path / "a")
    pm = peft.PeftModel.from_pretrained(tiny_model("tiny-llama"), tmp_path / "a")
    _, tensors = read(save_gguf_adapter(tmp_path / "a", tmp_path / "a.gguf", base_config=model.config))
    assert len(tensors) == 2 * 2 * 2
    assert_deltas(pm, tensors, 8.0, permute=True)
