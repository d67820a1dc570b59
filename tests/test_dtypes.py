"""HF PEFT's adapter dtypes on bf16 bases (``autocast_adapter_dtype``, passes/dtype_policy.py).

Reference: HF PEFT on the same bf16 tiny Llama, adapter weights made non-zero, saved and loaded
by peftc (captured at 2 x 7, compared at 3 x 11 with a padded row). PEFT keeps LoRA / DoRA / IA3
weights in fp32 and computes their path in fp32; prompt and prefix encoders are fp32 either way.
"""

import copy

import pytest
import torch
from peft import (
    IA3Config,
    LoHaConfig,
    LoKrConfig,
    LoraConfig,
    PeftModel,
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptTuningConfig,
    VeraConfig,
    get_peft_model,
)
from safetensors.torch import load_file

import peftc
from peftc import Spec, SpecError
from peftc.models import example_inputs, tiny_model
from peftc.passes.dtype_policy import CAST_ROLES
from peftc.passes.optimize import quantize as Q

BF16 = torch.bfloat16
CONFIGS = {
    "lora": lambda: LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
    "dora": lambda: LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], use_dora=True),
    "ia3": lambda: IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]),
    "prompt": lambda: PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3),
    "prefix": lambda: PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3),
}
LINEAR = ("lora", "dora", "ia3", "vera", "loha", "lokr")
MORE = {  # the other methods PEFT autocasts (or keeps fp32): parity only
    "vera": lambda: VeraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"]),
    "loha": lambda: LoHaConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
    "lokr": lambda: LoKrConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
    "ptuning": lambda: PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=3, encoder_hidden_size=16),
}


def bf16_base(seed_from=None):
    base = tiny_model("tiny-llama").to(BF16)
    if seed_from is not None:
        base.load_state_dict(seed_from)
    return base


def randomize(pm, kind, seed=1):
    """Non-zero adapter weights (PEFT starts LoRA B at zero and IA3 at ones, which hides bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in (p for p in pm.parameters() if p.requires_grad):
            noise = torch.randn(p.shape, generator=g).to(p.dtype)
            p.copy_(1 + 0.3 * noise if kind == "ia3" else 0.1 * noise)


def capture_inputs():
    ex = example_inputs("tiny-llama", 2, 7)
    ex["attention_mask"] = torch.ones_like(ex["input_ids"])
    return ex


def other_inputs():
    """3 x 11 (captured at 2 x 7), row 0 right-padded."""
    ex = example_inputs("tiny-llama", 3, 11, seed=5)
    mask = torch.ones_like(ex["input_ids"])
    mask[0, 8:] = 0
    ex["attention_mask"] = mask
    return ex


def logits(model, ex):
    with torch.no_grad():
        return model(**ex).logits[:, -ex["input_ids"].shape[1]:].float()  # prompt tuning: PEFT adds P rows


def peft_pair(kind, tmp_path, autocast=True):
    """A bf16 PEFT model with non-zero adapter weights saved to ``tmp_path/peft``, and the base's weights."""
    base = bf16_base()
    snapshot = copy.deepcopy(base.state_dict())
    pm = get_peft_model(base, {**CONFIGS, **MORE}[kind](), autocast_adapter_dtype=autocast)
    randomize(pm, kind)
    pm.save_pretrained(tmp_path / "peft")
    return pm.eval(), snapshot


def adapter_dtypes(cm) -> set:
    return {p.dtype for p in cm.trainable_parameters()}


@pytest.mark.parametrize("kind", [*CONFIGS, *MORE])
def test_bf16_logits_equal_peft(tmp_path, kind):
    pm, snapshot = peft_pair(kind, tmp_path)
    cm = peftc.from_peft(bf16_base(snapshot), tmp_path / "peft", capture_inputs(), trainable=True).eval()
    assert adapter_dtypes(cm) == {p.dtype for p in pm.parameters() if p.requires_grad} == {torch.float32}
    ex = other_inputs()
    ref, ours = logits(pm, ex), logits(cm, ex)
    assert cm(**ex).logits.dtype == BF16
    torch.testing.assert_close(ours, ref, atol=1e-3, rtol=0)
    assert (ref - logits(cm.get_base_model(), ex)).abs().max() > 1e-2  # the adapter matters
    summary = cm.graph_summary()
    assert "autocast_adapter_dtype=true: base bfloat16; adapter weights float32" in summary
    if kind in LINEAR:  # explicit casts in the rewritten graph, visible in the diff
        roles = [n.meta["peftc"]["role"] for n in cm.graph_module.graph.nodes if "peftc" in n.meta]
        assert roles.count("cast_out") == cm.pass_counts["upcast"] == 6 and "cast_in" in roles
        assert "to.dtype" in cm.graph_diff() and "compute in float32" in summary
    else:
        assert "prompt encoders float32" in summary


@pytest.mark.parametrize("kind", ["lora", "dora", "ia3"])
def test_keep_base_dtype_equals_peft_without_autocast(tmp_path, kind):
    """``autocast_adapter_dtype: false``: adapters in bf16, no casts, PEFT's
    ``get_peft_model(..., autocast_adapter_dtype=False)`` logits; the option survives a save."""
    pm, snapshot = peft_pair(kind, tmp_path, autocast=False)
    spec = Spec.from_peft(tmp_path / "peft").replace(autocast_adapter_dtype=False)
    cm = peftc.compile(bf16_base(snapshot), spec, capture_inputs())
    cm.load_adapter_state_dict(load_file(tmp_path / "peft" / "adapter_model.safetensors"))
    cm.eval()
    assert adapter_dtypes(cm) == {BF16}
    assert not any(n.meta.get("peftc", {}).get("role") in CAST_ROLES for n in cm.graph_module.graph.nodes)
    assert "autocast_adapter_dtype=false" in cm.graph_summary()
    ex = other_inputs()
    torch.testing.assert_close(logits(cm, ex), logits(pm, ex), atol=1e-3, rtol=0)

    cm.save_adapter(tmp_path / "ours")
    assert {t.dtype for t in load_file(tmp_path / "ours" / "adapter_model.safetensors").values()} == {BF16}
    assert Spec.from_peft(tmp_path / "ours").autocast_adapter_dtype is False  # read back from adapter_config.json


def test_option_is_validated():
    lora = [{"lora": {"targets": ["q_proj"]}}]
    assert Spec.from_dict({"methods": lora}).autocast_adapter_dtype is True
    spec = Spec.from_dict({"methods": lora, "autocast_adapter_dtype": False})
    assert spec.to_dict()["autocast_adapter_dtype"] is False and Spec.from_dict(spec.to_dict()) == spec
    for bad in ("yes", 1, None):
        with pytest.raises(SpecError, match="autocast_adapter_dtype") as e:
            Spec.from_dict({"methods": lora, "autocast_adapter_dtype": bad})
        assert "true or false" in str(e.value)
    cfg = LoraConfig(r=4, target_modules=["q_proj"]).to_dict()
    with pytest.raises(SpecError, match="peft.autocast_adapter_dtype"):
        Spec.from_peft({**cfg, "autocast_adapter_dtype": "no"})
    assert Spec.from_peft({**cfg, "autocast_adapter_dtype": False}).autocast_adapter_dtype is False


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_gradients_and_optimizer_state_fp32(tmp_path, kind):
    """Training: adapter gradients (and AdamW's state) fp32, equal to PEFT's within bf16 noise."""
    pm, snapshot = peft_pair(kind, tmp_path)
    cm = peftc.from_peft(bf16_base(snapshot), tmp_path / "peft", capture_inputs(), trainable=True).train()
    pm.train()
    ex = other_inputs()
    labels = ex["input_ids"].clone()
    pm(**ex, labels=labels).loss.backward()
    cm(**ex, labels=labels).loss.backward()
    ref = {k.replace(".default", "").replace("magnitude_vector.weight", "magnitude_vector"): p.grad
           for k, p in pm.named_parameters() if p.requires_grad}  # PEFT's checkpoint keys
    ours = {k.removeprefix("base_model.model."): v for k, v in cm._peft_params().items()}
    assert set(ours) == {k.removeprefix("base_model.model.") for k in ref}
    for key, p in ours.items():
        g, r = p.grad, ref["base_model.model." + key]
        assert g.dtype == r.dtype == torch.float32, key
        torch.testing.assert_close(g, r, atol=1e-3 * r.abs().max().item(), rtol=0, msg=key)  # measured: equal
    opt = torch.optim.AdamW(cm.trainable_parameters(), lr=1e-3)
    opt.step()
    assert {t.dtype for s in opt.state.values() for k, t in s.items() if k != "step"} == {torch.float32}


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_save_load_keeps_peft_dtypes(tmp_path, kind):
    """peftc saves the tensors PEFT saves, in PEFT's dtypes (fp32), and PEFT loads them to the same logits."""
    pm, snapshot = peft_pair(kind, tmp_path)
    cm = peftc.from_peft(bf16_base(snapshot), tmp_path / "peft", capture_inputs(), trainable=True).eval()
    cm.save_adapter(tmp_path / "ours")
    theirs = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    ours = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert {k: v.dtype for k, v in ours.items()} == {k: v.dtype for k, v in theirs.items()}
    assert {v.dtype for v in ours.values()} == {torch.float32}
    again = PeftModel.from_pretrained(bf16_base(snapshot), tmp_path / "ours").eval()
    ex = other_inputs()
    torch.testing.assert_close(logits(again, ex), logits(cm, ex), atol=1e-3, rtol=0)


@pytest.mark.parametrize("kind", ["lora", "dora", "ia3"])
def test_merge_into_bf16_base(tmp_path, kind):
    """Merged weights are PEFT's (the fold in fp32, rounded to bf16 once); unmerge restores bits."""
    pm, snapshot = peft_pair(kind, tmp_path)
    cm = peftc.from_peft(bf16_base(snapshot), tmp_path / "peft", capture_inputs()).eval()
    ex = other_inputs()
    before = logits(cm, ex)
    cm.merge()
    merged = pm.merge_and_unload().eval()
    ours, theirs = cm.get_base_model().state_dict(), merged.state_dict()
    changed = [k for k in ours if not torch.equal(ours[k], snapshot[k])]
    assert changed and all(ours[k].dtype == BF16 for k in ours)
    for k in changed:  # PEFT rounds the same fp32 fold once: the same bits
        assert torch.equal(ours[k], theirs[k]), k
    torch.testing.assert_close(logits(cm, ex), logits(merged, ex), atol=1e-3, rtol=0)
    torch.testing.assert_close(logits(cm, ex), before, atol=3e-2, rtol=0)
    cm.unmerge()
    assert all(torch.equal(v, snapshot[k]) for k, v in cm.get_base_model().state_dict().items())


def _load_peft(spec_changes, tmp_path, snapshot):
    spec = Spec.from_peft(tmp_path / "peft").replace(**spec_changes)
    cm = peftc.compile(bf16_base(snapshot), spec, capture_inputs())
    cm.load_adapter_state_dict(load_file(tmp_path / "peft" / "adapter_model.safetensors"))
    return cm.eval()


FUSED_OPS = {"lora": ("lora_linear", "lora_siblings"), "dora": ("dora_linear",), "ia3": ("ia3_linear",)}


def _mixed_dtype_kernels_missing(kind) -> str | None:
    """The fused op's refusal of bf16 x/W with fp32 adapter tensors (or a wrong output dtype);
    None when it takes them and answers in the base dtype."""
    from peftc.kernels import dora_linear, ia3_linear, lora_linear

    x, w = torch.randn(2, 8, dtype=BF16), torch.randn(4, 8, dtype=BF16)
    a, b, m = torch.randn(2, 8), torch.randn(4, 2), torch.rand(4) + 1
    zero = torch.zeros((), dtype=torch.int64)
    call = {"lora": lambda: lora_linear.lora_linear(x, w, None, a, b, 2.0),
            "dora": lambda: torch.ops.peftc.dora_linear(x, w, None, a, b, m, 2.0, 0.0, zero, False),
            "ia3": lambda: torch.ops.peftc.ia3_linear(x, w, None, torch.rand(4), "out")}[kind]
    del dora_linear, ia3_linear
    try:
        out = call()
    except (ValueError, RuntimeError) as e:
        return f"{type(e).__name__}: {e}"
    y = out[0] if isinstance(out, (tuple, list)) else out
    return None if y.dtype == BF16 else f"it returns {y.dtype} for bfloat16 x and W (expected bfloat16)"


@pytest.mark.parametrize("kind", ["lora", "dora", "ia3"])
def test_fused_bf16_takes_fp32_adapters(tmp_path, kind):
    """``fuse`` on a bf16 base fuses the upcast sites whole: the ops get x, W in bf16 and the
    adapter tensors in fp32 (never cast down), no cast node is left; logits equal PEFT's."""
    pm, snapshot = peft_pair(kind, tmp_path)
    cm = _load_peft({"optimize": {"fuse": {}}}, tmp_path, snapshot)
    ex = other_inputs()
    gm = cm.graph_for_call(**ex)
    fused = [n for n in gm.graph.nodes if n.op == "call_function" and
             getattr(n.target, "_opname", None) in FUSED_OPS[kind]]
    sites = cm.pass_counts.get("fuse", 0) + cm.pass_counts.get("fuse_dora", 0) + cm.pass_counts.get("fuse_ia3", 0)
    assert fused and sites == 6
    assert not any(n.meta.get("peftc", {}).get("role") in CAST_ROLES for n in gm.graph.nodes)
    def attrs(n):  # the parameters an op reads, directly, in a list (siblings) or through IA3's flatten
        args = [a for arg in n.args for a in (arg if isinstance(arg, list) else [arg]) if isinstance(a, torch.fx.Node)]
        args = [a.args[0] if a.op == "call_function" and a.target is torch.ops.aten.reshape.default else a
                for a in args]
        return [a for a in args if a.op == "get_attr"]

    dtypes = {gm.get_parameter(a.target).dtype for n in fused for a in attrs(n) if ".default." in a.target}
    assert dtypes == {torch.float32}  # adapter tensors (..., "<method>.default.<name>") handed over in fp32
    refusal = _mixed_dtype_kernels_missing(kind)
    assert refusal is None, refusal
    torch.testing.assert_close(logits(cm, ex), logits(pm, ex), atol=1e-3, rtol=0)


def test_quantized_base_keeps_fp32_lora(tmp_path):
    """QLoRA-style: NF4 base, LoRA in fp32 (unfused path); equals PEFT on the dequantized bf16 weights."""
    pm, snapshot = peft_pair("lora", tmp_path)
    cm = _load_peft({"optimize": {"quantize": {}}}, tmp_path, snapshot)
    ex = other_inputs()
    out = cm(**ex).logits
    assert out.dtype == BF16 and cm.pass_counts["quantize"] > 0 and adapter_dtypes(cm) == {torch.float32}
    deq = bf16_base(snapshot)
    for path, qw in cm.adapters.get_submodule(Q.ROOT).named_modules():
        if isinstance(qw, Q.QuantizedWeight):
            deq.get_submodule(path).weight.data = qw.dequantize(BF16)
    ref = PeftModel.from_pretrained(deq, tmp_path / "peft").eval()
    torch.testing.assert_close(logits(cm, ex), logits(ref, ex), atol=1e-3, rtol=0)
    cm.train()
    cm(**ex, labels=ex["input_ids"]).loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in cm.trainable_parameters())


def test_moving_the_model_follows_the_adapters_dtype():
    """As PEFT casts x to the adapter's *current* dtype: an fp32 model compiled, then moved to bf16
    (adapters too, as ``PeftModel.to``), re-captures without casts and runs in bf16; moved back
    to fp32 it matches its own first output."""
    cm = peftc.compile(tiny_model("tiny-llama"), {"methods": [{"lora": {"targets": ["q_proj", "v_proj"],
                                                                        "init": "random"}}]}, capture_inputs()).eval()
    ex = other_inputs()
    first = logits(cm, ex)
    cm.to(BF16)
    out = cm(**ex).logits
    assert out.dtype == BF16 and adapter_dtypes(cm) == {BF16} and "upcast" not in cm.pass_counts
    torch.testing.assert_close(out.float(), first, atol=0.1, rtol=0)
    cm.to(torch.float32)
    torch.testing.assert_close(logits(cm, ex), first, atol=0.05, rtol=0)  # weights went through bf16


def test_quantized_dora_with_dropout_reads_every_weight_quantized(tmp_path):
    """DoRA with dropout recomputes its base on ``W.to(fp32)``: that read is dequantized too (no
    weight kept full precision); eval logits near PEFT's on the dequantized weights (PEFT
    subtracts the bias from the bf16 output in eval where the graph recomputes in fp32)."""
    base = bf16_base()
    snapshot = copy.deepcopy(base.state_dict())
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_dora=True, lora_dropout=0.1)
    pm = get_peft_model(base, cfg)
    randomize(pm, "dora")
    pm.save_pretrained(tmp_path / "peft")
    cm = _load_peft({"optimize": {"quantize": {}}}, tmp_path, snapshot)
    ex = other_inputs()
    out = logits(cm, ex)
    assert cm.pass_counts["quantize"] > 0 and cm.pass_counts.get("quantize_kept", 0) == 0
    assert adapter_dtypes(cm) == {torch.float32}
    deq = bf16_base(snapshot)
    for path, qw in cm.adapters.get_submodule(Q.ROOT).named_modules():
        if isinstance(qw, Q.QuantizedWeight):
            deq.get_submodule(path).weight.data = qw.dequantize(BF16)
    ref = PeftModel.from_pretrained(deq, tmp_path / "peft").eval()
    torch.testing.assert_close(out, logits(ref, ex), atol=3e-2, rtol=0)
