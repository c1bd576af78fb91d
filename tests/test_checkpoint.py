"""checkpoint.py: our lazy loader against transformers' own loading, both Mixtral namings, sharded files,
compatibility checks and broken files. Weights are compared exactly (same bytes, no tolerance)."""

import json
import shutil

import pytest
import torch
import transformers as T
from safetensors.torch import load_file, save_file

from multimoe_rt.checkpoint import CheckpointError, VariantSet, load_variant


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _rewrite(d, fn):
    """Let fn edit the state dict in d/model.safetensors in place, then write it back."""
    sd = load_file(d / "model.safetensors")
    fn(sd)
    save_file(sd, d / "model.safetensors", metadata={"format": "pt"})


def _to_legacy(sd, num_experts):
    """transformers-5 fused Mixtral names -> the per-expert names of the published Mixtral checkpoints."""
    out = {}
    for k, v in sd.items():
        if k.endswith("mlp.experts.gate_up_proj"):
            p = k.replace("mlp.experts.gate_up_proj", "block_sparse_moe.experts")
            inter = v.shape[1] // 2
            for e in range(num_experts):
                out[f"{p}.{e}.w1.weight"] = v[e, :inter].clone()
                out[f"{p}.{e}.w3.weight"] = v[e, inter:].clone()
        elif k.endswith("mlp.experts.down_proj"):
            p = k.replace("mlp.experts.down_proj", "block_sparse_moe.experts")
            for e in range(num_experts):
                out[f"{p}.{e}.w2.weight"] = v[e].clone()
        elif k.endswith("mlp.gate.weight"):
            out[k.replace("mlp.gate.weight", "block_sparse_moe.gate.weight")] = v
        else:
            out[k] = v
    return out


def test_mixtral_round_trip_matches_transformers(small_zoo):
    path = small_zoo["mixtral"]["ptb"]
    v = load_variant(path)
    ref = T.MixtralForCausalLM.from_pretrained(path).state_dict()
    assert v.family == "mixtral" and v.gated and v.top_k == 2 and v.dtype == torch.float32
    assert v.moe_layers == [f"model.layers.{i}.mlp" for i in range(len(v.moe_layers))]
    for layer, prefix in enumerate(v.moe_layers):
        for e in range(v.num_experts):
            w1, w2 = v.expert(layer, e)
            assert w1.shape == (2 * v.intermediate_size, v.hidden_size) and w2.shape == (v.hidden_size,
                                                                                          v.intermediate_size)
            assert torch.equal(w1, ref[f"{prefix}.experts.gate_up_proj"][e])
            assert torch.equal(w2, ref[f"{prefix}.experts.down_proj"][e])
    expert_keys = {k for k in ref if ".experts." in k}
    assert set(v.non_expert_names()) == set(ref) - expert_keys
    for n in v.non_expert_names():
        assert torch.equal(v.tensor(n), ref[n]), n
    assert v.expert_nbytes == (2 * v.intermediate_size * v.hidden_size + v.hidden_size * v.intermediate_size) * 4


def test_switch_round_trip_matches_transformers(small_zoo):
    path = small_zoo["switch"]["pycode"]
    v = load_variant(path)
    ref = T.SwitchTransformersForConditionalGeneration.from_pretrained(path).state_dict()
    assert v.family == "switch" and not v.gated and v.top_k == 1
    assert v.moe_layers == ["encoder.block.0.layer.1.mlp", "decoder.block.0.layer.2.mlp"]
    for layer, prefix in enumerate(v.moe_layers):
        for e in range(v.num_experts):
            w1, w2 = v.expert(layer, e)
            assert torch.equal(w1, ref[f"{prefix}.experts.expert_{e}.wi.weight"])
            assert torch.equal(w2, ref[f"{prefix}.experts.expert_{e}.wo.weight"])
    names = v.non_expert_names()
    # tied embeddings live once in the file (shared.weight); the others are views transformers recreates
    assert "shared.weight" in names and "lm_head.weight" not in names
    assert set(names) <= set(ref)
    assert {k for k in ref if ".experts." not in k} - set(names) <= {
        "encoder.embed_tokens.weight", "decoder.embed_tokens.weight", "lm_head.weight"}
    for n in names:
        assert torch.equal(v.tensor(n), ref[n]), n


def test_legacy_mixtral_naming_sharded_loads_same_experts(small_zoo, tmp_path):
    src = small_zoo["mixtral"]["shakespeare"]
    fused = load_variant(src)
    d = tmp_path / "legacy"
    d.mkdir()
    shutil.copy(src / "config.json", d / "config.json")
    legacy = _to_legacy(load_file(src / "model.safetensors"), fused.num_experts)
    # two shards plus an index, as the published Mixtral checkpoints are stored
    keys = sorted(legacy)
    shards = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2],
              "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    for fname, ks in shards.items():
        save_file({k: legacy[k] for k in ks}, d / fname, metadata={"format": "pt"})
    (d / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: f for f, ks in shards.items() for k in ks}}))

    v = load_variant(d)
    assert v.moe_layers == fused.moe_layers
    for layer in range(len(v.moe_layers)):
        for e in range(v.num_experts):
            a, b = v.expert(layer, e), fused.expert(layer, e)
            assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert sorted(v.non_expert_names()) == sorted(fused.non_expert_names())
    for n in fused.non_expert_names():
        assert torch.equal(v.tensor(n), fused.tensor(n)), n
    # transformers' own conversion of the legacy names agrees with our w13 = cat([w1, w3])
    ref = T.MixtralForCausalLM.from_pretrained(d).state_dict()
    assert torch.equal(ref["model.layers.0.mlp.experts.gate_up_proj"][1], v.expert(0, 1)[0])
    # and the legacy set is compatible with the fused one
    assert len(VariantSet([fused, load_variant(d, name="legacy")])) == 2


def test_variant_set_of_zoo(small_zoo):
    vs = VariantSet.from_dirs(list(small_zoo["mixtral"].values()), names=list(small_zoo["mixtral"]))
    assert vs.names == ["base", "ptb", "shakespeare", "pycode", "ptb-frozen"] and len(vs) == 5
    assert (vs.family, vs.gated, vs.top_k) == ("mixtral", True, 2)
    assert vs.num_layers == len(vs[0].moe_layers) and vs.num_experts == vs[0].num_experts
    assert vs["ptb"] is vs[1] and [v.name for v in vs] == vs.names
    sw = VariantSet.from_dirs(list(small_zoo["switch"].values()))
    assert sw.family == "switch" and sw.top_k == 1 and not sw.gated and len(sw) == 5


def test_family_mismatch_is_named(small_zoo):
    with pytest.raises(CheckpointError, match=r"family: expected mixtral, found switch"):
        VariantSet.from_dirs([small_zoo["mixtral"]["base"], small_zoo["switch"]["base"]], names=["m", "s"])


def test_non_expert_shape_mismatch_names_file_and_tensor(small_zoo, tmp_path):
    d = _copy(small_zoo["mixtral"]["ptb"], tmp_path / "odd")
    _rewrite(d, lambda sd: sd.__setitem__("model.norm.weight", torch.ones(sd["model.norm.weight"].numel() + 1)))
    # the variant itself is fine (model.norm is not a checked tensor); the set is not
    load_variant(d)
    h = small_zoo["mixtral"]["base"]
    with pytest.raises(CheckpointError) as ei:
        VariantSet.from_dirs([h, d])
    msg = str(ei.value)
    assert "model.norm.weight" in msg and str(d / "model.safetensors") in msg and "[32]" in msg and "[33]" in msg


def test_missing_and_extra_non_expert_tensor(small_zoo, tmp_path):
    base = small_zoo["mixtral"]["base"]
    d = _copy(small_zoo["mixtral"]["ptb"], tmp_path / "missing")
    _rewrite(d, lambda sd: sd.pop("model.layers.1.input_layernorm.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensor 'model.layers.1.input_layernorm.weight'"):
        VariantSet.from_dirs([base, d])
    with pytest.raises(CheckpointError, match=r"'model.layers.1.input_layernorm.weight' is not in 'missing'"):
        VariantSet.from_dirs([d, base])


def test_config_mismatch_num_experts(small_zoo, tmp_path):
    d = _copy(small_zoo["mixtral"]["ptb"], tmp_path / "e")
    cfg = json.loads((d / "config.json").read_text())
    cfg["num_local_experts"] = cfg["num_local_experts"] * 2
    (d / "config.json").write_text(json.dumps(cfg))
    # the config now disagrees with the tensors: the variant itself is refused, naming tensor and shapes
    with pytest.raises(CheckpointError, match=r"model.safetensors: tensor 'model.layers.0.mlp.experts.gate_up_proj'"
                                              r": expected shape \[8, 128, 32\], found \[4, 128, 32\]"):
        load_variant(d)


def test_duplicate_names_refused(small_zoo):
    b = small_zoo["mixtral"]["base"]
    with pytest.raises(CheckpointError, match="used twice"):
        VariantSet.from_dirs([b, b])


def test_missing_expert_tensor(small_zoo, tmp_path):
    d = _copy(small_zoo["switch"]["base"], tmp_path / "sw")
    _rewrite(d, lambda sd: sd.pop("decoder.block.0.layer.2.mlp.experts.expert_3.wo.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensor 'decoder.block.0.layer.2.mlp.experts.expert_3.wo"
                                              r".weight' \(expected shape \[32, 64\]\)"):
        load_variant(d)


def test_missing_router(small_zoo, tmp_path):
    d = _copy(small_zoo["mixtral"]["base"], tmp_path / "r")
    _rewrite(d, lambda sd: sd.pop("model.layers.1.mlp.gate.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensor 'model.layers.1.mlp.gate.weight' \(router"):
        load_variant(d)


def test_truncated_file(small_zoo, tmp_path):
    d = _copy(small_zoo["mixtral"]["base"], tmp_path / "t")
    f = d / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[:-100])
    with pytest.raises(CheckpointError, match=r"model.safetensors: truncated safetensors file: header says tensor "
                                              rf"data ends at byte {len(data)}, file has {len(data) - 100} bytes"):
        load_variant(d)
    f.write_bytes(data[:5])
    with pytest.raises(CheckpointError, match="truncated safetensors file: 5 bytes"):
        load_variant(d)


def test_corrupt_header(small_zoo, tmp_path):
    d = _copy(small_zoo["mixtral"]["base"], tmp_path / "c")
    f = d / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:16] = b"\xff" * 8
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"model.safetensors: corrupt safetensors header \(not valid JSON"):
        load_variant(d)
    data[0:8] = (1 << 40).to_bytes(8, "little")
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt or truncated safetensors header"):
        load_variant(d)


def test_missing_config_unknown_family_and_pickles(small_zoo, tmp_path):
    d = _copy(small_zoo["mixtral"]["base"], tmp_path / "m")
    cfg = (d / "config.json").read_text()
    (d / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"config.json: missing config"):
        load_variant(d)
    (d / "config.json").write_text(cfg.replace('"mixtral"', '"llama"'))
    with pytest.raises(CheckpointError, match=r"unknown family: model_type 'llama'; supported model types: .*qwen3_moe"):
        load_variant(d)
    (d / "config.json").write_text(cfg)
    (d / "model.safetensors").rename(d / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"pickle formats are never loaded"):
        load_variant(d)


def test_nan_and_inf_refused_by_default_as_they_are_read(small_zoo, tmp_path):
    """Issue 16: NaN/Inf weights are refused by default, one pass per tensor as it is read; the error names the
    file, the tensor and the count of bad values. check_finite=False is the opt-out (old code: accepted)."""
    d = _copy(small_zoo["mixtral"]["base"], tmp_path / "n")

    def poison(sd):
        sd["model.layers.1.mlp.experts.down_proj"][2, 3, 4] = float("nan")
        sd["model.layers.1.mlp.experts.down_proj"][2, 3, 5] = float("inf")
        sd["model.layers.0.self_attn.q_proj.weight"][0, :3] = float("nan")

    _rewrite(d, poison)
    v = load_variant(d)  # headers only so far: nothing read, nothing checked yet
    v.expert(1, 1)  # a clean expert of the poisoned tensor reads fine
    with pytest.raises(CheckpointError, match=r"model.safetensors: tensor 'model.layers.1.mlp.experts.down_proj' "
                                              r"\(expert 2\): 2 non-finite values \(1 NaN, 1 Inf\)"):
        v.expert(1, 2)
    with pytest.raises(CheckpointError, match=r"tensor 'model.layers.0.self_attn.q_proj.weight': 3 non-finite "
                                              r"values \(3 NaN, 0 Inf\)"):
        v.tensor("model.layers.0.self_attn.q_proj.weight")
    with pytest.raises(CheckpointError, match="non-finite"):
        load_variant(d).check_finite()  # the whole file, now
    with pytest.raises(CheckpointError, match="non-finite"):
        VariantSet.from_dirs([small_zoo["mixtral"]["base"], d])[1].expert(1, 2)
    unchecked = load_variant(d, check_finite=False)  # the opt-out
    assert torch.isnan(unchecked.expert(1, 2)[1]).any()
    with pytest.raises(CheckpointError, match="non-finite"):
        unchecked.check_finite()
