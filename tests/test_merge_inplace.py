"""In-place merge: one merged tensor per weight for any number of captured signatures, unmerge
bit for bit for every mergeable method, rollback of a failed merge, re-merge on adapter changes,
and the streamed, sharded, atomic ``save_merged`` (loaded back with transformers)."""

import json
import weakref

import pytest
import torch
from transformers import AutoModelForCausalLM

import peftc
from peftc import merging as merge_mod
from peftc.models import example_inputs, tiny_model
from peftc.passes.merge import HOLDER
from peftc.passes.methods.lora import LoraSpec

SIGS = ({}, {"attention_mask": True}, {"position_ids": True})  # three call signatures (labels share a graph)


def _inputs(name, batch=3, seq=9, seed=7, extra=None):
    ex = example_inputs(name, batch, seq, seed=seed)
    if extra and extra.get("attention_mask"):
        ex["attention_mask"] = torch.ones_like(ex["input_ids"])
    if extra and extra.get("position_ids"):
        ex["position_ids"] = torch.arange(ex["input_ids"].shape[1]).expand_as(ex["input_ids"]).contiguous()
    return ex


def _randomize(cm, scale=0.2, seed=0):
    """Non-zero adapters (PEFT's B = 0 would hide a wrong merge); vectors near 1 (scales)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in cm.trainable_parameters():
            vec = p.dim() == 1 or p.shape[0] == 1 or p.shape[-1] == 1
            p.copy_(torch.randn(p.shape, generator=g) * scale + (1.0 if vec else 0.0))


def _bits(sd):
    """State dict -> integer views, so equality is bit equality (-0.0 != 0.0, NaN == NaN)."""
    ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}
    return {k: v.detach().clone().reshape(-1).view(ints[v.element_size()]) for k, v in sd.items()}


def _assert_bit_equal(model, before):
    now = _bits(model.state_dict())
    assert now.keys() == before.keys()
    changed = [k for k in now if not torch.equal(now[k], before[k])]
    assert not changed, f"not restored bit for bit: {changed}"


def _storages_read(cm, module):
    """Storages of the weight (and bias) the linear of ``module`` reads, in every built graph."""
    from peftc.graph import linear_sites

    out = set()
    for gm in cm.graphs.rewritten.values():
        for site in linear_sites(gm):
            if site.module == module:
                args = [a for a in site.node.all_input_nodes if a.op == "get_attr"]
                for a in args:
                    t = gm
                    for part in a.target.split("."):
                        t = getattr(t, part)
                    out.add((a.target.rpartition(".")[2], t.untyped_storage().data_ptr()))
    return out


INVERSE = {"lora": "sub", "loha": "sub", "lokr": "sub", "vera": "sub", "ia3": "div", "ssf": "div"}
MERGEABLE = [
    ("tiny-llama", {"lora": {"targets": "all-linear", "r": 4, "alpha": 8}}),
    ("tiny-llama", {"lora": {"targets": ["q_proj", "down_proj"], "r": 4, "dora": True}}),
    ("tiny-llama", {"loha": {"targets": ["q_proj", "up_proj"], "r": 4}}),
    ("tiny-llama", {"lokr": {"targets": ["k_proj", "down_proj"], "r": 2, "decompose_both": True}}),
    ("tiny-llama", {"vera": {"targets": ["q_proj", "v_proj"], "r": 8}}),
    ("tiny-llama", {"ia3": {}}),
    ("tiny-llama", {"ssf": {"targets": ["q_proj", "gate_proj"]}}),
    ("tiny-gpt2", {"lora": {"targets": ["c_attn", "c_proj"], "r": 4}}),
    ("tiny-gpt2", {"ia3": {}}),
    ("tiny-gpt2", {"ssf": {"targets": ["c_fc"]}}),
    ("tiny-gpt2", {"bitfit": {"targets": ["c_fc", "c_attn"]}}),
]


@pytest.mark.parametrize("name, method", MERGEABLE, ids=lambda v: v if isinstance(v, str) else next(iter(v)))
def test_merge_in_place_and_unmerge_bit_exact(name, method):
    model = tiny_model(name).eval()
    cm = peftc.compile(model, {"methods": [method]}, example_inputs(name)).eval()
    _randomize(cm)
    ex = _inputs(name)  # a shape other than the captured one
    before = _bits(model.state_dict())
    with torch.no_grad():
        ref = cm(**ex).logits
        cm.merge()
        merged = cm(**ex).logits
    assert (merged - ref).abs().max() <= 1e-5
    assert cm.pass_counts["merge" if next(iter(method)) != "bitfit" else "bitfit"] > 0
    adapter_nodes = [n for n in cm.graph_module.graph.nodes
                     if n.meta.get("peftc", {}).get("method") in {"lora", "dora", "loha", "lokr", "vera", "ia3", "ssf"}]
    assert not adapter_nodes
    state, kind = merge_mod.merge_state(cm), next(iter(method))
    if kind != "bitfit":  # linear folds are written into the base parameters
        assert state.restores and any(not torch.equal(v, before[k]) for k, v in _bits(model.state_dict()).items())
        # the inverse used (sparse record), or W whole for DoRA (not affine in W)
        want = "whole" if method[kind].get("dora") else INVERSE[kind]
        assert {r.inverse for r in state.restores} == {want}
    sd = cm.merged_state_dict()  # materialised: still the merged weights after unmerge
    cm.unmerge()
    assert merge_mod.merge_state(cm) is None
    _assert_bit_equal(model, before)
    with torch.no_grad():
        assert torch.equal(cm(**ex).logits, ref)
    fresh = tiny_model(name).eval()
    created = set(sd) - set(fresh.state_dict())  # biases SSF creates on bias-free linears
    assert all(k.endswith(".bias") for k in created) and (not created or kind == "ssf")
    if not created:
        fresh.load_state_dict(sd)
        with torch.no_grad():
            assert (fresh(**ex).logits - merged).abs().max() <= 1e-6


def test_one_merged_tensor_per_weight_across_three_signatures():
    """LoRA on every linear, captured for 3 signatures: each merged weight is one storage, the
    base parameter itself, read by all three graphs; the merge keeps far less than the weights."""
    model = tiny_model("tiny-llama").eval()
    cm = peftc.compile(model, {"methods": [{"lora": {"targets": "all-linear", "r": 4}}]},
                       example_inputs("tiny-llama")).eval()
    _randomize(cm, scale=0.02)  # a realistic delta: small against W
    with torch.no_grad():
        for extra in SIGS:
            cm(**_inputs("tiny-llama", extra=extra))
        cm.merge()
        for extra in SIGS:
            cm(**_inputs("tiny-llama", extra=extra))
    assert len(cm.graphs.rewritten) == 3
    paths = sorted(cm.targets[0])
    assert len(paths) == 14
    params = dict(model.named_parameters())
    for path in paths:
        read = _storages_read(cm, path)
        assert read == {("weight", params[f"{path}.weight"].untyped_storage().data_ptr())}, path
    for gm in cm.graphs.rewritten.values():
        assert not hasattr(gm, HOLDER)  # no per-graph merged buffers
    state = merge_mod.merge_state(cm)
    weight_bytes = sum(params[f"{p}.weight"].nbytes for p in paths)
    adapter_bytes = sum(p.nbytes for p in cm.adapters.parameters())
    record_bytes = sum(t.nbytes for r in state.restores for t in r.tensors())
    assert {r.inverse for r in state.restores} == {"sub"} and len(state.restores) == 14
    assert record_bytes < 0.1 * weight_bytes  # a bitmask + an int8 per element the inverse misses
    assert state.nbytes() == record_bytes + adapter_bytes  # + the adapter snapshot, nothing else


def test_tied_head_and_created_bias_use_one_shared_tensor(tmp_path):
    """Cannot be written in place: an LM head tied to the embeddings, and SSF's shift on a
    bias-free linear. One merged tensor each, shared by all graphs; the embedding untouched."""
    model = tiny_model("tiny-llama", tie_word_embeddings=True).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    spec = {"methods": [{"lora": {"targets": ["lm_head"], "r": 4}}, {"ssf": {"targets": ["o_proj"]}}]}
    cm = peftc.compile(model, spec, example_inputs("tiny-llama")).eval()
    _randomize(cm)
    before = _bits(model.state_dict())
    with torch.no_grad():
        refs = [cm(**_inputs("tiny-llama", extra=e)).logits for e in SIGS]
        cm.merge()
        for e, ref in zip(SIGS, refs):
            assert (cm(**_inputs("tiny-llama", extra=e)).logits - ref).abs().max() <= 1e-5
    state = merge_mod.merge_state(cm)
    assert "lm_head.weight" in state.shared and "model.layers.0.self_attn.o_proj.bias" in state.shared
    head = _storages_read(cm, "lm_head")
    assert head == {("lm_head__weight", state.shared["lm_head.weight"].untyped_storage().data_ptr())}
    o = _storages_read(cm, "model.layers.0.self_attn.o_proj")
    assert len([s for s in o if "bias" in s[0]]) == 1  # one shared bias for 3 graphs
    assert torch.equal(_bits({"e": model.model.embed_tokens.weight})["e"], before["model.embed_tokens.weight"])
    # the tied head saves untied; the bias SSF created has no place in LlamaForCausalLM
    with pytest.raises(peftc.PeftcError, match="cannot be saved"):
        cm.save_merged(tmp_path / "m")
    assert not list(tmp_path.iterdir())  # the temp dir is gone
    cm.unmerge()
    _assert_bit_equal(model, before)


def test_tied_lm_head_saves_untied(tmp_path):
    model = tiny_model("tiny-llama", tie_word_embeddings=True).eval()
    cm = peftc.compile(model, {"methods": [{"lora": {"targets": ["lm_head", "q_proj"], "r": 4}}]},
                       example_inputs("tiny-llama")).eval()
    _randomize(cm)
    ex = _inputs("tiny-llama")
    with torch.no_grad():
        ref = cm(**ex).logits
    cm.save_merged(tmp_path / "m")  # unmerged: folds computed while streaming
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert loaded.lm_head.weight is not loaded.model.embed_tokens.weight
    with torch.no_grad():
        assert (loaded(**ex).logits - ref).abs().max() <= 1e-5
        assert torch.equal(loaded.model.embed_tokens.weight, model.model.embed_tokens.weight)


def test_failed_merge_leaves_the_model_unchanged(monkeypatch):
    model = tiny_model("tiny-llama").eval()
    cm = peftc.compile(model, {"methods": [{"lora": {"targets": "all-linear", "r": 4}}]},
                       example_inputs("tiny-llama")).eval()
    _randomize(cm)
    ex = _inputs("tiny-llama")
    before = _bits(model.state_dict())
    with torch.no_grad():
        ref = cm(**ex).logits
    calls, fold = [], LoraSpec.fold

    def failing(self, *a, **k):
        calls.append(1)
        if len(calls) == 40:  # well after the first weights were written (3 probe folds per weight)
            raise RuntimeError("injected")
        return fold(self, *a, **k)

    monkeypatch.setattr(LoraSpec, "fold", failing)
    with pytest.raises(RuntimeError, match="injected"):
        cm.merge()
    monkeypatch.undo()
    assert not cm.registry.merged and merge_mod.merge_state(cm) is None
    _assert_bit_equal(model, before)
    with torch.no_grad():
        assert torch.equal(cm(**ex).logits, ref)
    # a method that adds graph nodes cannot merge: refused before any weight changes
    cm.add_adapter({"adapter": "p", "methods": [{"prompt": {"tokens": 2}}]})
    cm.set_adapter(["default", "p"])
    with pytest.raises(peftc.PeftcError, match="cannot be merged"):
        cm.merge()
    _assert_bit_equal(model, before)


def test_adapter_changes_while_merged_remerge_and_restore_exactly():
    model = tiny_model("tiny-llama").eval()
    cm = peftc.compile(model, {"methods": [{"lora": {"targets": ["q_proj", "v_proj"], "r": 4}}]},
                       example_inputs("tiny-llama")).eval()
    # LoRA and IA3 on different linears (on one linear the unmerged graph scales only W x: not a fold)
    cm.add_adapter({"adapter": "b", "methods": [{"ia3": {"targets": ["k_proj", "o_proj"]}}]})
    _randomize(cm)
    cm.set_adapter("b")
    _randomize(cm, seed=1)
    ex = _inputs("tiny-llama")
    before = _bits(model.state_dict())
    with torch.no_grad():
        outs = {}
        for active in (["default"], ["b"], ["default", "b"]):
            cm.set_adapter(active)
            outs[tuple(active)] = cm(**ex).logits
        cm.disable_adapters()
        base = cm(**ex).logits
        cm.enable_adapters()
        cm.set_adapter("default")
        cm.merge()
        for active in (["b"], ["default", "b"], ["default"]):
            cm.set_adapter(active)  # re-merges the new set
            assert merge_mod.merge_state(cm).adapters == tuple(active)
            assert (cm(**ex).logits - outs[tuple(active)]).abs().max() <= 1e-5
        cm.disable_adapters()  # merged but disabled: the base model, bit for bit
        _assert_bit_equal(model, before)
        assert torch.equal(cm(**ex).logits, base)
        cm.enable_adapters()
        cm.delete_adapter("default")  # restored from the snapshot, then "b" merged
        assert (cm(**ex).logits - outs[("b",)]).abs().max() <= 1e-5
    cm.unmerge()
    _assert_bit_equal(model, before)


@pytest.mark.parametrize("merged", [False, True])
def test_save_merged_streams_shards_and_loads(tmp_path, monkeypatch, merged):
    """Sharded above max_shard_size with transformers' index; one folded tensor alive at a time."""
    model = tiny_model("tiny-llama").eval()
    cm = peftc.compile(model, {"methods": [{"lora": {"targets": "all-linear", "r": 4}}]},
                       example_inputs("tiny-llama")).eval()
    _randomize(cm)
    ex = _inputs("tiny-llama")
    with torch.no_grad():
        ref = cm(**ex).logits
    if merged:
        cm.merge()
    alive, stream = [], merge_mod.merged_tensors
    base_ptrs = {t.untyped_storage().data_ptr() for t in model.state_dict().values()}

    def watched(c):
        for k, t in stream(c):
            if t.untyped_storage().data_ptr() not in base_ptrs:  # a tensor computed for the export
                assert all(r() is None for r in alive), f"{k}: an earlier merged tensor is still alive"
                alive.append(weakref.ref(t))
            yield k, t
            del t

    monkeypatch.setattr(merge_mod, "merged_tensors", watched)
    out = cm.save_merged(tmp_path / "m", max_shard_size="40KB")
    assert len(alive) == (0 if merged else 14)
    files = sorted(p.name for p in out.iterdir())
    shards = [f for f in files if f.startswith("model-")]
    assert len(shards) > 2 and "model.safetensors.index.json" in files and "config.json" in files
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    assert sorted(index["weight_map"]) == sorted(model.state_dict())
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        assert (loaded(**ex).logits - ref).abs().max() <= 1e-5
    # saved again over it: one file when under the threshold, nothing left behind
    cm.save_merged(tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json", "generation_config.json",
                                                                  "model.safetensors"]
    assert [p.name for p in tmp_path.iterdir()] == ["m"]


def test_save_merged_gpt2_conv1d_and_failure_keeps_old_dir(tmp_path, monkeypatch):
    model = tiny_model("tiny-gpt2").eval()
    spec = {"methods": [{"lora": {"targets": ["c_attn", "c_fc"], "r": 4}}, {"ia3": {"targets": ["c_proj"]}}]}
    cm = peftc.compile(model, spec, example_inputs("tiny-gpt2")).eval()
    _randomize(cm)
    ex = _inputs("tiny-gpt2")
    with torch.no_grad():
        ref = cm(**ex).logits
    cm.save_merged(tmp_path / "m")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    with torch.no_grad():
        assert (loaded(**ex).logits - ref).abs().max() <= 1e-5
    assert loaded.lm_head.weight is loaded.transformer.wte.weight  # untouched tie kept
    calls, fold = [], LoraSpec.fold

    def failing(self, *a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("injected")
        return fold(self, *a, **k)

    monkeypatch.setattr(LoraSpec, "fold", failing)
    with pytest.raises(RuntimeError, match="injected"):
        cm.save_merged(tmp_path / "m")
    assert [p.name for p in tmp_path.iterdir()] == ["m"]
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    with torch.no_grad():
        assert torch.equal(again(**ex).logits, loaded(**ex).logits)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_merge_unmerge_bit_exact_and_save(tmp_path, dtype):
    """On the GPU: restore records and CRCs cross devices; bf16 weights (int16 bit views)."""
    model = tiny_model("tiny-llama").to("cuda", dtype).eval()
    ex = {k: v.cuda() for k, v in _inputs("tiny-llama").items()}
    cm = peftc.compile(model, {"methods": [{"lora": {"targets": "all-linear", "r": 4}}]},
                       {k: v.cuda() for k, v in example_inputs("tiny-llama").items()}).eval()
    _randomize(cm, scale=0.02)
    before = _bits(model.state_dict())
    with torch.no_grad():
        ref = cm(**ex).logits.float()
        cm.merge()
        tol = 1e-5 if dtype == torch.float32 else 5e-2
        assert (cm(**ex).logits.float() - ref).abs().max() <= tol
    cm.save_merged(tmp_path / "m")
    cm.unmerge()
    _assert_bit_equal(model, before)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=dtype).cuda().eval()
    with torch.no_grad():
        assert (loaded(**ex).logits.float() - ref).abs().max() <= tol
