"""GGUF bases (``peftc.from_gguf``) and streaming a checkpoint into the quantized store
(``peftc.load_quantized``), against independent references: the gguf package's dequantizer,
transformers' GGUF reader (its dequantized model) and a model compiled from full-precision weights."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import peftc
from peftc.errors import CheckpointError, SpecError
from peftc.models import tiny_model
from peftc.passes.optimize.quantize import ROOT, QuantizedWeight

gguf = pytest.importorskip("gguf", reason="gguf is not installed: pip install 'peftc[gguf]' (scripts/setup.sh --dev installs it)")
pytest.importorskip("accelerate", reason="accelerate is not installed: pip install 'peftc[gguf]'")

LORA = {"methods": [{"lora": {"targets": "all-linear", "r": 4, "alpha": 8, "dropout": 0.0}}]}


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's converter: q/k rows in its rotary layout."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path, model, kind: str, full_precision=("mlp.down_proj",)) -> None:
    """A llama GGUF file of ``model``: linears in ``kind`` (those named in ``full_precision`` F16),
    the embedding Q8_0 (as SmolLM2's), norms F32."""
    cfg = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"] if hasattr(cfg, "rope_parameters") else cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    for n, t in model.state_dict().items():
        g = names.get_name(n, try_suffixes=(".weight", ".bias"))
        a = t.float().numpy()
        if ".q_proj." in n:
            a = _permute(a, cfg.num_attention_heads)
        elif ".k_proj." in n:
            a = _permute(a, cfg.num_key_value_heads)
        if a.ndim == 1:
            w.add_tensor(g, a)
        elif any(f in n for f in full_precision):
            w.add_tensor(g, a.astype(np.float16))
        else:
            qtype = gguf.GGMLQuantizationType["Q8_0" if "embed" in n else kind]
            w.add_tensor(g, gguf.quants.quantize(a, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _reference(path):
    """transformers' own GGUF reader: the file dequantized by the gguf package, rows unpermuted."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()


def _random_adapters(cms, seed=0):
    g = torch.Generator().manual_seed(seed)
    sd = {k: 0.1 * torch.randn(v.shape, generator=g) for k, v in cms[0].adapter_state_dict().items()}
    for cm in cms:
        cm.load_adapter_state_dict(sd)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    base = tiny_model("tiny-llama", seed=3)
    d = tmp_path_factory.mktemp("gguf")
    out = {}
    for kind in ("Q4_0", "Q4_1", "Q8_0"):
        out[kind] = d / kind / f"tiny.{kind}.gguf"
        out[kind].parent.mkdir()
        write_gguf(out[kind], base, kind)
    return out


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1", "Q8_0"])
def test_held_blocks_equal_the_gguf_dequantizer_and_nothing_is_requantized(files, kind):
    path = files[kind]
    cm = peftc.from_gguf(path, LORA)
    ref = _reference(path)
    root = cm.adapters.get_submodule(ROOT)
    held = {n: m for n, m in root.named_modules() if isinstance(m, QuantizedWeight)}
    assert len(held) == 2 * 6 + 1  # q, k, v, o, gate, up per layer and the head; down_proj is F16 in the file
    reader = gguf.GGUFReader(path)
    raw = {t.name: t for t in reader.tensors}
    for n, qw in held.items():
        assert qw.fmt == {"Q8_0": "int8g"}.get(kind, "int4") and qw.block_size == 32
        torch.testing.assert_close(qw.dequantize(), ref.get_submodule(n).weight, atol=1e-6, rtol=0)
    # the gguf package itself, on a weight whose rows the converter did not permute
    t = raw["blk.1.ffn_up.weight"]
    direct = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type))
    torch.testing.assert_close(held["model.layers.1.mlp.up_proj"].dequantize(), direct, atol=1e-6, rtol=0)
    text = cm.graph_summary()
    assert f"13 weights {kind} held as" in text and "float32 from F16" in text
    assert "base parameters released" in text
    for n, p in cm.get_base_model().named_parameters():
        assert p.device.type == "cpu"
        if n.removesuffix(".weight") in held:  # no full-precision copy of a held weight
            assert p.untyped_storage().nbytes() == 4


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1", "Q8_0"])
def test_logits_and_training_equal_the_dequantized_model(files, kind):
    """fp32: a GGUF base with LoRA (random, non-zero) gives the logits of transformers' dequantized
    model compiled with the same adapter, and three SGD steps move the adapters alike (1e-5)."""
    path = files[kind]
    cm = peftc.from_gguf(path, LORA)
    ref = peftc.compile(_reference(path), LORA, {"input_ids": torch.randint(0, 128, (1, 8))})
    _random_adapters([cm, ref])
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 128, (2, 12), generator=g)
    with torch.no_grad():
        torch.testing.assert_close(cm(input_ids=ids).logits, ref(input_ids=ids).logits, atol=1e-5, rtol=1e-5)
    for m in (cm, ref):
        m.train()
    opts = [torch.optim.SGD(m.trainable_parameters(), lr=0.5) for m in (cm, ref)]
    for _ in range(3):
        batch = torch.randint(0, 128, (2, 12), generator=g)
        for m, opt in zip((cm, ref), opts):
            loss = m(input_ids=batch, labels=batch).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    a, b = cm.adapter_state_dict(), ref.adapter_state_dict()
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-5)


def test_generate_on_a_gguf_base_gives_the_dequantized_models_tokens(files):
    path = files["Q4_1"]
    cm = peftc.from_gguf(path, LORA)
    ref = peftc.compile(_reference(path), LORA, {"input_ids": torch.randint(0, 128, (1, 8))})
    _random_adapters([cm, ref], seed=4)
    ids = torch.randint(0, 128, (1, 6), generator=torch.Generator().manual_seed(2))
    out = cm.generate(input_ids=ids, max_new_tokens=5, do_sample=False)
    assert torch.equal(out, ref.generate(input_ids=ids, max_new_tokens=5, do_sample=False))


def _meta_llama(dtype=torch.float32):
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    cfg = tiny_model("tiny-llama").config
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    return model


@pytest.mark.parametrize("fmt", ["nf4", "int4", "int8g"])
def test_load_quantized_streams_safetensors_into_the_store(tmp_path, fmt):
    """A meta-device compile + load_quantized holds what compiling the loaded model quantizes, bit for
    bit, and computes the same; the full-precision linears never exist."""
    full = tiny_model("tiny-llama", seed=5)
    full.save_pretrained(tmp_path)
    ids = torch.randint(0, 128, (1, 8))
    quant = {"quantize": {"format": fmt}}
    want = peftc.compile(copy.deepcopy(full), LORA, {"input_ids": ids}, optimize=quant)
    cm = peftc.compile(_meta_llama(), LORA, {"input_ids": ids}, optimize=quant)
    stats = peftc.load_quantized(cm, tmp_path)
    assert stats["quantized"] == 14 and stats["full_precision"] >= 6  # norms, embedding, the head
    qa = {n: m for n, m in cm.adapters.get_submodule(ROOT).named_modules() if isinstance(m, QuantizedWeight)}
    qb = {n: m for n, m in want.adapters.get_submodule(ROOT).named_modules() if isinstance(m, QuantizedWeight)}
    assert qa.keys() == qb.keys()
    for n in qa:
        for x, y in zip(qa[n].tensors(), qb[n].tensors()):
            assert torch.equal(x, y), n
    _random_adapters([cm, want], seed=6)
    x = torch.randint(0, 128, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(cm(input_ids=x).logits, want(input_ids=x).logits, atol=1e-5, rtol=1e-5)
    assert f"14 weights float32 quantized to {fmt}" in cm.graph_summary()


def test_load_quantized_refuses_what_it_cannot_do(tmp_path, files):
    full = tiny_model("tiny-llama", seed=5)
    full.save_pretrained(tmp_path)
    ids = torch.randint(0, 128, (1, 8))
    with pytest.raises(SpecError, match="a spec with optimize: {quantize"):
        peftc.load_quantized(peftc.compile(_meta_llama(), LORA, {"input_ids": ids}), tmp_path)
    keep = peftc.compile(_meta_llama(), LORA, {"input_ids": ids}, optimize={"quantize": {"release_base": False}})
    with pytest.raises(SpecError, match="release_base"):
        peftc.load_quantized(keep, tmp_path)
    cm = peftc.compile(_meta_llama(), LORA, {"input_ids": ids}, optimize={"quantize": {}})
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        peftc.load_quantized(cm, tmp_path / "nothing")
    (tmp_path / "part").mkdir()
    from safetensors.torch import save_file

    save_file({k: v for k, v in full.state_dict().items() if "layers.1." not in k}, tmp_path / "part" / "m.safetensors")
    with pytest.raises(CheckpointError, match="missing"):
        peftc.load_quantized(cm, tmp_path / "part")
    bad = dict(full.state_dict())
    bad["model.layers.1.mlp.up_proj.weight"] = torch.randn(128, 32)
    save_file(bad, tmp_path / "part" / "m.safetensors")
    with pytest.raises(CheckpointError, match=r"up_proj.weight has shape \(128, 32\)"):
        peftc.load_quantized(cm, tmp_path / "part")
    assert all(p.device.type == "meta" for p in cm.get_base_model().parameters())  # refused before loading anything
    peftc.load_quantized(cm, tmp_path)  # and still loads from a good checkpoint
    with pytest.raises(SpecError, match="optimize.quantize.format"):
        peftc.from_gguf(files["Q4_1"], LORA, optimize={"quantize": {"format": "nf4"}})
    with pytest.raises(CheckpointError, match="no such GGUF file"):
        peftc.from_gguf(tmp_path / "none.gguf", LORA)


@pytest.mark.parametrize("kind", ["Q4_1", "Q8_0"])
def test_int4_and_int8g_are_ggufs_blocks_and_quantize_at_least_as_well(kind):
    """int4 (block 32) and int8g are Q4_1 and Q8_0: gguf's blocks read through peftc's formats give
    gguf's own dequantized weights exactly, and peftc's quantizer (codes picked against the rounded
    fp16 scales) is at least as accurate as gguf's."""
    from peftc.kernels.quant_formats import dequantize, from_gguf_blocks, quantize_weight

    w = torch.randn(48, 256, generator=torch.Generator().manual_seed(7)) * 0.05
    qtype = gguf.GGMLQuantizationType[kind]
    blocks = torch.from_numpy(gguf.quants.quantize(w.numpy(), qtype))
    fmt, theirs = from_gguf_blocks(blocks.flatten(), kind, tuple(w.shape))
    b = dequantize(*theirs, fmt, 32)
    torch.testing.assert_close(b, torch.from_numpy(gguf.quants.dequantize(blocks.numpy(), qtype)), atol=1e-6, rtol=0)
    a = dequantize(*quantize_weight(w, fmt, 32), fmt, 32)
    err, err_gguf = (a - w).abs().double(), (b - w).abs().double()
    assert err.mean() <= err_gguf.mean() * (1 + 1e-6) and err.max() <= err_gguf.max() * (1 + 1e-3)


def test_an_adapter_trained_on_a_gguf_base_loads_in_peft_on_the_dequantized_model(files, tmp_path):
    import peft  # a dev dependency: the reference must be there
    path = files["Q4_1"]
    cm = peftc.from_gguf(path, LORA)
    _random_adapters([cm], seed=8)
    cm.save_adapter(tmp_path / "a")
    pm = peft.PeftModel.from_pretrained(_reference(path), tmp_path / "a").eval()
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(cm.eval()(input_ids=ids).logits, pm(input_ids=ids).logits, atol=1e-5, rtol=1e-5)
