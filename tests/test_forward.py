"""BatchedMixtral: one forward over sequences of different variants equals each variant's own model."""

import pytest
import torch
import transformers as T
from safetensors.torch import load_file, save_file

from multimoe_rt import plan
from multimoe_rt.checkpoint import CheckpointError, VariantSet
from multimoe_rt.forward import BatchedMixtral, BatchEntry, make_batch
from multimoe_rt.kv_cache import KVCache
from multimoe_rt.model import MultiVariantModel
from multimoe_rt.weights import VariantWeights
from tiny_models import MIXTRAL, reference, rel_err, save_variants

FP32_TOL = 1e-4  # relative error of fp32 logits against the variant's own transformers model (the bound)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    return save_variants(tmp_path_factory.mktemp("fwd"), "mixtral", n=3)


def build(dirs, share=0.0, sets=None, backend=None, max_seqs=8, **plan_kwargs):
    vs = VariantSet.from_dirs(dirs)
    slab, table = plan.load_slab(plan.make_plan(vs, share=share, **plan_kwargs), vs)
    w = VariantWeights.from_variant_set(vs, sets or len(vs))
    for v in range(w.num_sets):
        assert w.start_load(v, set())
    w.wait_loads()
    assert all(err is None for _, err in w.poll())
    cfg = vs[0].config
    kv = KVCache(vs.num_layers, max_seqs, 64, cfg["num_key_value_heads"], cfg["hidden_size"] // cfg["num_attention_heads"])
    return BatchedMixtral(cfg, w, slab, table, kv, backend=backend)


def own_logits(path, tokens):
    with torch.no_grad():
        return reference("mixtral", path)(torch.tensor([tokens])).logits[0, -1]


def entries_for(model, prompts, starts=None):
    res = model.weights.resident()
    es = [BatchEntry(res[v], v, slot, p, 0 if starts is None else starts[slot])
          for slot, (v, p) in enumerate(prompts)]
    return sorted(es, key=lambda e: e.set)


def test_mixed_prefill_then_decodes_match_each_variants_own_model(dirs):
    m = build(dirs)
    g = torch.Generator().manual_seed(3)
    # two sequences of variant 1, prompts of different lengths, all three variants in one batch
    prompts = [(v, torch.randint(0, 64, (n,), generator=g).tolist()) for v, n in ((2, 7), (0, 3), (1, 11), (1, 1))]
    seqs = [list(p) for _, p in prompts]
    es = entries_for(m, prompts)
    logits = m.forward(m.batch(es))
    for step in range(4):
        for e, lg in zip(es, logits):
            ref = own_logits(dirs[e.variant], seqs[e.kv_row])
            assert rel_err(lg, ref) <= FP32_TOL, (step, e.variant)
        nxt = [BatchEntry(e.set, e.variant, e.kv_row, [int(torch.randint(0, 64, (1,), generator=g))], len(seqs[e.kv_row]))
               for e in es]
        for e in nxt:
            seqs[e.kv_row] += e.tokens
        es = nxt
        logits = m.forward(m.batch(es))


def test_prompt_in_chunks_equals_prompt_at_once(dirs):
    m = build(dirs)
    p = torch.randint(0, 64, (13,), generator=torch.Generator().manual_seed(4)).tolist()
    whole = m.forward(m.batch([BatchEntry(0, 0, 0, p, 0)]))
    m.forward(m.batch([BatchEntry(0, 0, 1, p[:5], 0, logits=False), BatchEntry(1, 1, 2, p[:2], 0)]))
    chunked = m.forward(m.batch([BatchEntry(0, 0, 1, p[5:], 5)]))
    assert rel_err(chunked, whole) <= 1e-5


@pytest.mark.parametrize("plan_kwargs", [dict(share=0.5), dict(share=1.0, delta="lowrank4+sign1")],
                         ids=["shared", "deltas"])
def test_shared_experts_follow_the_table_like_the_transformers_skeleton(dirs, plan_kwargs):
    """With experts shared (or stored as base + delta), the batched forward reads what MultiVariantModel reads."""
    m = build(dirs, **plan_kwargs)
    mv = MultiVariantModel.from_pretrained(dirs, plan=plan.make_plan(VariantSet.from_dirs(dirs), **plan_kwargs))
    g = torch.Generator().manual_seed(5)
    prompts = [(v, torch.randint(0, 64, (6 + v,), generator=g).tolist()) for v in (0, 1, 2)]
    logits = m.forward(m.batch(entries_for(m, prompts)))
    for (v, p), lg in zip(sorted(prompts, key=lambda x: m.weights.resident()[x[0]]), logits):
        assert rel_err(lg, mv.forward(v, torch.tensor([p]))[0, -1]) <= FP32_TOL
    assert rel_err(logits[1], own_logits(dirs[1], prompts[1][1])) > 1e-3  # sharing changed variant 1


@pytest.mark.parametrize("override", [{"sliding_window": 4}, {"hidden_act": "gelu"}], ids=["window", "gelu"])
def test_config_variants_match_transformers(tmp_path, override):
    torch.manual_seed(0)
    model = T.MixtralForCausalLM(T.MixtralConfig(**{**MIXTRAL, **override}))
    with torch.no_grad():  # larger weights, so the wrong activation would show in the logits
        model.model.layers[0].mlp.experts.gate_up_proj.mul_(20)
    model.save_pretrained(tmp_path / "m")
    m = build([tmp_path / "m"])
    p = torch.randint(0, 64, (11,)).tolist()
    lg = m.forward(m.batch([BatchEntry(0, 0, 0, p, 0)]))
    assert rel_err(lg[0], own_logits(tmp_path / "m", p)) <= FP32_TOL


def test_triton_backend_matches_torch_on_a_mixed_batch(dirs):
    pytest.importorskip("triton")
    from multimoe_rt.ops import triton_status

    if not triton_status()[0]:
        pytest.skip(triton_status()[1])
    g = torch.Generator().manual_seed(6)
    prompts = [(v, torch.randint(0, 64, (4 + v,), generator=g).tolist()) for v in (0, 1, 2)]
    out = {b: (m := build(dirs, backend=b)).forward(m.batch(entries_for(m, prompts))) for b in ("torch", "triton")}
    assert rel_err(out["triton"], out["torch"]) <= 1e-5  # fp32; the interpreter upcasts as the GPU does not


def test_make_batch_rejects_bad_layouts():
    with pytest.raises(ValueError, match="at least one"):
        make_batch([], "cpu")
    with pytest.raises(ValueError, match="sorted"):
        make_batch([BatchEntry(1, 0, 0, [1], 0), BatchEntry(0, 1, 1, [1], 0)], "cpu")
    with pytest.raises(ValueError, match="token"):
        make_batch([BatchEntry(0, 0, 0, [], 0)], "cpu")


def test_weights_refuse_nan_and_tensors_the_forward_would_ignore(tmp_path):
    torch.manual_seed(0)
    model = T.MixtralForCausalLM(T.MixtralConfig(**MIXTRAL))
    with torch.no_grad():
        model.model.norm.weight[3] = float("nan")
    model.save_pretrained(tmp_path / "nan")
    with pytest.raises(CheckpointError, match="NaN"):
        VariantWeights.from_variant_set(VariantSet.from_dirs([tmp_path / "nan"]), 1)
    model = T.MixtralForCausalLM(T.MixtralConfig(**MIXTRAL))
    model.save_pretrained(tmp_path / "bias")
    tensors = load_file(tmp_path / "bias" / "model.safetensors")
    tensors["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(32)
    save_file(tensors, tmp_path / "bias" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="not used by the batched"):
        VariantWeights.from_variant_set(VariantSet.from_dirs([tmp_path / "bias"]), 1)


def test_forward_refuses_a_concurrent_call(dirs):
    m = build(dirs)
    b = m.batch([BatchEntry(0, 0, 0, [1, 2], 0)])
    with m._busy:  # as if another thread were inside forward
        with pytest.raises(RuntimeError, match="another thread"):
            m.forward(b)
    assert m.forward(b).shape == (1, 64)


ROPES = {"dynamic": {"rope_type": "dynamic", "factor": 4.0, "rope_theta": 10000.0},
         "longrope": {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0, 1.1, 1.2, 1.3],
                      "long_factor": [2.0, 3.0, 5.0, 9.0], "original_max_position_embeddings": 16}}


@pytest.mark.parametrize("rope", sorted(ROPES))
def test_length_dependent_rope_is_per_sequence_in_a_mixed_batch(tmp_path, rope):
    """Old code: one rotary per step, scaled for the longest sequence in it, so a short one mixed with a long one
    got other logits than alone (rel err 0.44 in the issue)."""
    torch.manual_seed(0)
    cfg = T.MixtralConfig(**{**MIXTRAL, "head_dim": 8, "max_position_embeddings": 16, "rope_parameters": ROPES[rope]})
    T.MixtralForCausalLM(cfg).save_pretrained(tmp_path / "m")
    g = torch.Generator().manual_seed(1)
    short, long = (torch.randint(0, 64, (n,), generator=g).tolist() for n in (5, 40))
    m = build([tmp_path / "m"])
    mixed = m.forward(m.batch([BatchEntry(0, 0, 0, short, 0), BatchEntry(0, 0, 1, long, 0)]))
    alone = [m.forward(m.batch([BatchEntry(0, 0, 2 + i, p, 0)]))[0] for i, p in enumerate((short, long))]
    for i, p in enumerate((short, long)):
        assert rel_err(mixed[i], alone[i]) <= 1e-5, i
        assert rel_err(mixed[i], own_logits(tmp_path / "m", p)) <= FP32_TOL, i  # a fresh model: no rotary state
    # a decode of the short sequence next to a prefill of the long one
    step = m.forward(m.batch([BatchEntry(0, 0, 0, [7], 5), BatchEntry(0, 0, 4, long, 0)]))
    assert rel_err(step[0], own_logits(tmp_path / "m", short + [7])) <= FP32_TOL


def test_offloaded_experts_serve_a_mixed_batch_that_needs_more_than_the_cache(dirs):
    """Old code: "one call needs 8 host-tier experts but the cache has 4 slots" for a batch of several variants
    (the cache holds one layer's experts; a mixed batch reads variants x experts of a layer)."""
    vs = VariantSet.from_dirs(dirs)
    slot_bytes = plan.make_plan(vs, share=0.0).slot_nbytes
    m = build(dirs, share=0.0, budget_bytes=(vs.num_experts + 2) * slot_bytes, offload=True)
    tier = m.slab.host_tier
    assert tier is not None and tier.capacity == vs.num_experts
    g = torch.Generator().manual_seed(5)
    prompts = [(v, torch.randint(0, 64, (11,), generator=g).tolist()) for v in (0, 1, 2)]
    logits = m.forward(m.batch(entries_for(m, prompts)))
    for (v, p), lg in zip(sorted(prompts, key=lambda x: m.weights.resident()[x[0]]), logits):
        assert rel_err(lg, own_logits(dirs[v], p)) <= FP32_TOL, v
    assert tier.stats["fetches"] > tier.capacity  # it really paged more experts than fit at once
