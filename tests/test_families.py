"""Every family adapter end to end (issue 17): a tiny random config per family, saved by transformers and
reloaded through the project, against transformers' own model of each variant.

Per family: logits within 1e-5 (fp32, sharing 0) and identical greedy generations from MultiVariantModel;
patch() and experts_implementation="multimoe" equal to eager; two variants switching in random order stay
exact; both checkpoint namings read the same experts; a plan at 50% sharing round-trips through JSON. The
batched mixed-variant forward (and the engine on it) for the families it covers. Unknown model types raise
naming the supported ones.
"""

import json
import random

import pytest
import torch
import transformers as T
from safetensors.torch import save_file

import multimoe_rt
from multimoe_rt import families
from multimoe_rt import plan as plan_mod
from multimoe_rt.checkpoint import CheckpointError, VariantSet, load_variant
from multimoe_rt.forward import BatchedModel, BatchEntry
from multimoe_rt.kv_cache import KVCache
from multimoe_rt.model import MultiVariantModel
from multimoe_rt.weights import VariantWeights, batched_families

TOL = 1e-5  # fp32 relative error against transformers' own model (the issue's bound)
VOCAB = 64
COMMON = dict(vocab_size=VOCAB, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=128, initializer_range=0.1, pad_token_id=0, eos_token_id=None,
              bos_token_id=None, tie_word_embeddings=False)
CONFIGS = {
    "mixtral": (T.MixtralConfig, dict(COMMON, num_hidden_layers=2, intermediate_size=24, num_local_experts=4,
                                      num_experts_per_tok=2)),
    # three layers, the middle one dense: MoE ordinals differ from decoder layers
    "qwen3_moe": (T.Qwen3MoeConfig, dict(COMMON, num_hidden_layers=3, intermediate_size=40, moe_intermediate_size=16,
                                         num_experts=4, num_experts_per_tok=2, head_dim=8, norm_topk_prob=True,
                                         mlp_only_layers=[1])),
    "olmoe": (T.OlmoeConfig, dict(COMMON, num_hidden_layers=2, intermediate_size=16, num_experts=4,
                                  num_experts_per_tok=2, clip_qkv=3.0)),
    "qwen2_moe": (T.Qwen2MoeConfig, dict(COMMON, num_hidden_layers=2, intermediate_size=40, moe_intermediate_size=16,
                                         shared_expert_intermediate_size=24, num_experts=4, num_experts_per_tok=2,
                                         norm_topk_prob=False)),
    "deepseek_v3": (T.DeepseekV3Config, dict(COMMON, num_hidden_layers=3, intermediate_size=40,
                                             moe_intermediate_size=16, n_routed_experts=8, num_experts_per_tok=2,
                                             n_group=2, topk_group=1, first_k_dense_replace=1, n_shared_experts=1,
                                             kv_lora_rank=8, q_lora_rank=16, qk_rope_head_dim=4, v_head_dim=8,
                                             qk_nope_head_dim=4)),
    "gpt_oss": (T.GptOssConfig, dict(COMMON, num_hidden_layers=2, intermediate_size=16, num_local_experts=4,
                                     num_experts_per_tok=2, head_dim=8, sliding_window=4, swiglu_limit=1.5,
                                     layer_types=["sliding_attention", "full_attention"])),
}
FAMILIES = list(CONFIGS)
EXPERT_BIAS = {"gpt_oss"}  # families whose experts carry biases


def _model(family):
    cfg_cls, kw = CONFIGS[family]
    return T.AutoModelForCausalLM.from_config(cfg_cls(**kw))


def save_family(root, family, n=2):
    """Base, then variants with every tensor perturbed (a full fine-tune). Saved by transformers (per-expert
    naming where transformers 5 writes that) and again under the fused transformers-5 names (``<dir>-fused``)."""
    torch.manual_seed(0)
    model = _model(family)
    with torch.no_grad():  # the zero-initialised parts would otherwise never matter
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if name.endswith(("e_score_correction_bias", "_bias", "sinks", ".bias")):
                t.copy_(0.1 * torch.randn(t.shape))
    base = {k: v.clone() for k, v in model.state_dict().items()}
    dirs = []
    for i in range(n):
        model.load_state_dict(base)
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for name, t in model.state_dict().items():
                if i and t.is_floating_point():
                    t.add_(0.3 * (t.std() if t.numel() > 1 else 0.1) * torch.randn(t.shape, generator=g))
        path = root / f"{family}-v{i}"
        model.save_pretrained(path)
        fused = root / f"{family}-v{i}-fused"
        fused.mkdir()
        (fused / "config.json").write_text((path / "config.json").read_text())
        save_file({k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight" or
                   not model.config.tie_word_embeddings}, fused / "model.safetensors", metadata={"format": "pt"})
        dirs.append(path)
    return dirs


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    root, made = tmp_path_factory.mktemp("families"), {}

    def get(family):
        if family not in made:
            made[family] = save_family(root, family)
        return made[family]
    return get


def reference(path):
    return T.AutoModelForCausalLM.from_pretrained(path, experts_implementation="eager").eval()


def rel_err(out, ref) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def greedy(model, ids, n=8):
    out = model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[:, ids.shape[1]:].tolist()


def prompts(seed=0, batch=2, length=9):
    return torch.randint(1, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


# ---- the adapter itself ---------------------------------------------------------------------------------
def test_unknown_model_type_names_the_supported_ones(tmp_path, zoo):
    d = tmp_path / "llama"
    d.mkdir()
    src = zoo("mixtral")[0]
    (d / "config.json").write_text(json.dumps({**json.loads((src / "config.json").read_text()), "model_type": "llama"}))
    (d / "model.safetensors").write_bytes((src / "model.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match=r"unknown family: model_type 'llama'; supported model types: "
                                              r"deepseek_v3, gpt_oss, mixtral, olmoe, qwen2_moe, qwen3_moe, "
                                              r"switch_transformers"):
        VariantSet.from_dirs([d])
    with pytest.raises(families.UnknownFamilyError, match="supported model types"):
        families.get_family("llama")
    model = T.LlamaForCausalLM(T.LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=16,
                                             num_hidden_layers=1, num_attention_heads=2))
    vs = VariantSet.from_dirs(zoo("mixtral")[:1])
    slab, table = plan_mod.load_slab(plan_mod.make_plan(vs, share=0.0), vs)
    with pytest.raises(ValueError, match="no MoE blocks of a supported family.*qwen3_moe"):
        multimoe_rt.patch(model, slab, table)


def test_every_family_has_one_adapter_with_its_classes():
    assert set(families.FAMILIES) == {"mixtral", "qwen3_moe", "olmoe", "qwen2_moe", "deepseek_v3", "gpt_oss", "switch"}
    for name, f in families.FAMILIES.items():
        config_cls, model_cls = f.classes()
        assert config_cls.model_type in f.model_types
        assert families.get_family(config_cls.model_type) is f
    assert set(batched_families()) >= {"mixtral", "qwen3_moe"}
    info = multimoe_rt.runtime_info()["families"]
    assert {n for n, f in info.items() if f["batched_forward"]} == set(batched_families())
    assert not info["gpt_oss"]["deltas"] and info["qwen3_moe"]["deltas"]


@pytest.mark.parametrize("family", FAMILIES)
def test_both_namings_read_the_same_experts_and_the_plan_hashes_agree(zoo, family):
    per_expert, fused = zoo(family)[0], zoo(family)[0].with_name(zoo(family)[0].name + "-fused")
    a, b = load_variant(per_expert), load_variant(fused)
    assert (a.moe_layers, a.num_experts, a.activation) == (b.moe_layers, b.num_experts, b.activation)
    assert sorted(a.non_expert_names()) == sorted(b.non_expert_names())
    for layer in range(len(a.moe_layers)):
        for e in range(a.num_experts):
            for x, y in zip(a.expert(layer, e), b.expert(layer, e)):
                assert torch.equal(x, y)
            if family in EXPERT_BIAS:
                for x, y in zip(a.expert_bias(layer, e), b.expert_bias(layer, e)):
                    assert torch.equal(x, y)
    expected = {"qwen3_moe": ["model.layers.0.mlp", "model.layers.2.mlp"],
                "deepseek_v3": ["model.layers.1.mlp", "model.layers.2.mlp"]}.get(family)
    if expected:
        assert a.moe_layers == expected  # dense layers are not MoE layers


@pytest.mark.parametrize("family", FAMILIES)
def test_sharded_checkpoints_read_like_single_files(zoo, family, tmp_path):
    d = zoo(family)[1]
    reference(d).save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    a, b = load_variant(d), load_variant(tmp_path / "sharded")
    assert len({e.file for e in b._entries.values()}) > 1
    assert sorted(a.non_expert_names()) == sorted(b.non_expert_names())
    for layer in range(len(a.moe_layers)):
        for e in range(a.num_experts):
            for x, y in zip(a.expert_tensors(layer, e), b.expert_tensors(layer, e)):
                assert torch.equal(x, y)


def test_gpt_oss_mxfp4_experts_are_refused_with_the_way_out(zoo, tmp_path):
    from safetensors.torch import load_file

    d = zoo("gpt_oss")[0]
    q = tmp_path / "mxfp4"
    q.mkdir()
    (q / "config.json").write_text((d / "config.json").read_text())
    sd = load_file(d / "model.safetensors")
    for k in [k for k in sd if k.endswith("experts.gate_up_proj")]:
        sd[k + "_blocks"] = torch.zeros(4, 8, 16, dtype=torch.uint8)
        del sd[k]
    save_file(sd, q / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"MXFP4-quantised experts .*dequantise them first"):
        load_variant(q)


def test_deepseek_extra_layers_are_skipped_and_fp8_checkpoints_refused(zoo, tmp_path):
    """Published DeepSeek-V3 files carry a multi-token-prediction layer past num_hidden_layers (transformers skips
    it) and FP8 weights with block scales (refused, naming the way out)."""
    from safetensors.torch import load_file

    d = zoo("deepseek_v3")[0]
    sd = load_file(d / "model.safetensors")
    n = json.loads((d / "config.json").read_text())["num_hidden_layers"]
    mtp = {k.replace(f"model.layers.{n - 1}.", f"model.layers.{n}."): v.clone() for k, v in sd.items()
           if k.startswith(f"model.layers.{n - 1}.")}
    for name, extra in (("mtp", mtp), ("fp8", {"model.layers.1.mlp.experts.0.gate_proj.weight_scale_inv":
                                                  torch.ones(1, 1)})):
        out = tmp_path / name
        out.mkdir()
        (out / "config.json").write_text((d / "config.json").read_text())
        save_file({**sd, **extra}, out / "model.safetensors")
    a, b = load_variant(d), load_variant(tmp_path / "mtp")
    assert sorted(a.non_expert_names()) == sorted(b.non_expert_names()) and a.moe_layers == b.moe_layers
    with pytest.raises(CheckpointError, match="quantised weights .*dequantise"):
        load_variant(tmp_path / "fp8")


def test_gpt_oss_experts_are_deinterleaved_and_transposed_once_at_read(zoo):
    d = zoo("gpt_oss")[0]
    v = load_variant(d)
    ref = reference(d)
    experts = ref.model.layers[1].mlp.experts
    w1, w2 = v.expert(1, 2)
    gu = experts.gate_up_proj[2].detach()   # [H, 2I], gate and up interleaved along the last axis
    assert torch.equal(w1, torch.cat([gu[:, 0::2].t(), gu[:, 1::2].t()]))
    assert torch.equal(w2, experts.down_proj[2].detach().t())
    b1, b2 = v.expert_bias(1, 2)
    bu = experts.gate_up_proj_bias[2].detach()
    assert torch.equal(b1, torch.cat([bu[0::2], bu[1::2]])) and torch.equal(b2, experts.down_proj_bias[2].detach())


# ---- MultiVariantModel, patch, ExpertsInterface ----------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_model_logits_and_greedy_generations_equal_transformers(zoo, family):
    dirs = zoo(family)
    mv = MultiVariantModel.from_pretrained(dirs, share=0.0)
    ids = prompts()
    for v, d in enumerate(dirs):
        ref = reference(d)
        with torch.no_grad():
            want = ref(ids).logits
        assert rel_err(mv.forward(v, ids), want) <= TOL, v
        assert mv.generate(v, ids[:1], max_new_tokens=8).tolist() == greedy(ref, ids[:1])


@pytest.mark.parametrize("family", FAMILIES)
def test_patch_and_multimoe_experts_implementation_equal_eager(zoo, family):
    dirs = zoo(family)
    vs = VariantSet.from_dirs(dirs)
    slab, table = plan_mod.load_slab(plan_mod.make_plan(vs, share=0.0), vs)
    ids = prompts(1)
    assert multimoe_rt.register_experts_implementation()
    for v, d in enumerate(dirs):
        eager, patched = reference(d), reference(d)
        multimoe_rt.patch(patched, slab, table, variant=v)
        assert not any(".experts." in n for n, _ in patched.named_parameters())  # weights freed
        ours = T.AutoModelForCausalLM.from_pretrained(d, experts_implementation="multimoe").eval()
        with torch.no_grad():
            want = eager(ids).logits
            assert rel_err(patched(ids).logits, want) <= TOL
            assert rel_err(ours(ids).logits, want) <= TOL
        assert greedy(patched, ids[:1]) == greedy(eager, ids[:1]) == greedy(ours, ids[:1])


@pytest.mark.parametrize("family", FAMILIES)
def test_two_variants_switching_in_random_order_stay_exact(zoo, family):
    dirs = zoo(family)
    mv = MultiVariantModel.from_pretrained(dirs, share=0.0)
    ids = prompts(2)
    with torch.no_grad():
        want = [reference(d)(ids).logits for d in dirs]
    first = {}
    order = [random.Random(family).randrange(2) for _ in range(10)]
    for v in order + [0, 1]:  # both variants at least once
        out = mv.forward(v, ids)
        first.setdefault(v, out)
        assert torch.equal(out, first[v])  # bit-identical whatever ran before
        assert rel_err(out, want[v]) <= TOL
    assert rel_err(want[0], want[1]) > 1e-2  # the variants really differ


@pytest.mark.parametrize("family", FAMILIES)
def test_plan_at_half_sharing_round_trips_and_serves(zoo, family, tmp_path):
    dirs = zoo(family)
    vs = VariantSet.from_dirs(dirs)
    p = plan_mod.make_plan(vs, share=0.5)
    assert p.family == family and p.gated
    p.to_json(tmp_path / "plan.json")
    again = plan_mod.Plan.from_json(tmp_path / "plan.json", vs)
    assert again.slots == p.slots
    mv = MultiVariantModel.from_pretrained(vs, plan=tmp_path / "plan.json")
    ids = prompts(3)
    with torch.no_grad():
        base = reference(dirs[0])(ids).logits
    assert rel_err(mv.forward(0, ids), base) <= TOL  # the anchor keeps its own experts


@pytest.mark.parametrize("family", FAMILIES)
def test_merged_checkpoint_is_written_in_the_familys_naming_and_loads_strict(zoo, family, tmp_path):
    """The merging baselines go through the adapter too: the average of two variants, written back in the family's
    transformers-5 naming (GPT-OSS: re-interleaved, transposed, with biases), equals averaging the models."""
    from multimoe_rt.lab.merge import merge_variants, save_merged

    dirs = zoo(family)
    out = save_merged(merge_variants(VariantSet.from_dirs(dirs), "average"), tmp_path / "avg", dirs[0])
    merged = T.AutoModelForCausalLM.from_pretrained(out, experts_implementation="eager").eval()
    sds = [reference(d).state_dict() for d in dirs]
    manual = reference(dirs[0])
    manual.load_state_dict({k: (sds[0][k] + sds[1][k]) / 2 for k in sds[0]})
    ids = prompts(4)
    with torch.no_grad():
        assert rel_err(merged(ids).logits, manual(ids).logits) <= TOL


# ---- the batched mixed-variant forward ------------------------------------------------------------------
def build_batched(dirs, sets=None, max_seqs=8):
    vs = VariantSet.from_dirs(dirs)
    slab, table = plan_mod.load_slab(plan_mod.make_plan(vs, share=0.0), vs)
    w = VariantWeights.from_variant_set(vs, sets or len(vs))
    for v in range(w.num_sets):
        assert w.start_load(v, set())
    w.wait_loads()
    assert all(err is None for _, err in w.poll())
    cfg = vs[0].config
    return BatchedModel(cfg, w, slab, table, KVCache.for_config(cfg, max_seqs, 64))


BATCHED = [f for f in FAMILIES if families.get_family(f).batched is not None]


@pytest.mark.parametrize("family", BATCHED)
def test_batched_forward_mixes_variants_and_equals_each_variants_own_model(zoo, family):
    dirs = zoo(family)
    m = build_batched(dirs)
    refs = [reference(d) for d in dirs]
    g = torch.Generator().manual_seed(5)
    res = m.weights.resident()
    seqs = {slot: (v, torch.randint(1, VOCAB, (n,), generator=g).tolist())
            for slot, (v, n) in enumerate([(1, 7), (0, 3), (1, 11), (0, 1)])}
    entries = sorted([BatchEntry(res[v], v, slot, list(p), 0) for slot, (v, p) in seqs.items()], key=lambda e: e.set)
    for step in range(3):
        logits = m.forward(m.batch(entries))
        for e, lg in zip(entries, logits):
            v, toks = seqs[e.kv_row]
            with torch.no_grad():
                want = refs[v](torch.tensor([toks])).logits[0, -1]
            assert rel_err(lg, want) <= TOL, (step, e.variant)
        nxt = []
        for e, lg in zip(entries, logits):
            tok = int(lg.argmax())
            seqs[e.kv_row][1].append(tok)
            nxt.append(BatchEntry(e.set, e.variant, e.kv_row, [tok], len(seqs[e.kv_row][1]) - 1))
        entries = nxt


def test_engine_serves_qwen3_moe_variants_like_their_own_generate(zoo):
    from multimoe_rt.engine import Engine

    dirs = zoo("qwen3_moe")
    engine = Engine.from_pretrained(dirs, max_seqs=4, max_len=64, resident_sets=1)
    try:
        ids = prompts(7, batch=3, length=6)
        handles = [engine.submit(dirs[v].name, ids[i].tolist(), max_new_tokens=6, ignore_eos=True)
                   for i, v in enumerate((0, 1, 0))]
        for h, (i, v) in zip(handles, enumerate((0, 1, 0))):
            assert h.result().tokens == greedy(reference(dirs[v]), ids[i:i + 1], 6)[0]
    finally:
        engine.shutdown()


def test_every_decoder_family_is_batched_and_switch_is_refused(tmp_path):
    from tiny_models import save_variants

    assert BATCHED == FAMILIES  # every decoder family of this file
    vs = VariantSet.from_dirs(save_variants(tmp_path, "switch", n=1))
    with pytest.raises(CheckpointError, match="does not cover the switch family; it covers mixtral"):
        VariantWeights.from_variant_set(vs, 1)


# ---- the qwen3-moe-tiny zoo recipe ------------------------------------------------------------------------
def test_qwen3_moe_tiny_zoo_small_builds_and_serves(tmp_path):
    from multimoe_rt.engine import Engine
    from multimoe_rt.lab import zoo

    dirs = zoo.build("qwen3-moe-tiny", small=True, cache_dir=tmp_path, progress=False)
    assert list(dirs) == ["base", "ptb", "shakespeare", "pycode"]
    manifest = zoo.load_manifest(dirs["base"].parent)
    assert manifest["params"]["family"] == "qwen3_moe"
    for name, row in manifest["summary"].items():
        if name != "base":
            assert row["ppl"] < row["base_ppl"], name  # each fine-tune moved toward its own domain
    vs = VariantSet.from_dirs(list(dirs.values()), names=list(dirs))
    assert vs.family == "qwen3_moe"
    assert "model.layers.0.mlp.experts.gate_up_proj" in load_variant(dirs["ptb"])._expert_names  # fused naming
    engine = Engine.from_pretrained(vs, share=0.5, max_seqs=4, max_len=64)
    try:
        ids = prompts(9, batch=1, length=8)
        mv = MultiVariantModel.from_pretrained(vs, share=0.5)
        want = mv.generate("shakespeare", ids, max_new_tokens=5).tolist()[0]
        assert engine.generate("shakespeare", ids[0].tolist(), max_new_tokens=5, ignore_eos=True) == want
    finally:
        engine.shutdown()
