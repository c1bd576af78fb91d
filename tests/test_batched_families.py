"""DeepSeek-V3 and GPT-OSS in the batched forward and the engine (issue 27): mixed batches of three variants with
their own random weights, prompts of different lengths joining while others decode, against each variant's own
transformers model run alone.

Tolerance: fp32 logits within 1e-4 relative (the issue's bound; measured about 1e-6), greedy tokens equal.
Configs are small and odd (hidden 36, 3 or 6 heads, 5 or 6 experts) and pick the paths that matter: a GPT-OSS
sliding window (3) shorter than the prompts, alternating with full layers; a DeepSeek config with grouped routing
(n_group 2, topk_group 1), q LoRA and attention biases; a second with q_lora_rank None, two dense first layers, yarn
rope scaling with mscale_all_dim, no renormalisation and the non-interleaved rope layout.
"""

import pytest
import torch
import transformers as T

from multimoe_rt import plan as plan_mod
from multimoe_rt.checkpoint import VariantSet
from multimoe_rt.errors import CheckpointError
from multimoe_rt.families import route_grouped_sigmoid, route_topk_softmax
from multimoe_rt.forward import BatchedModel, BatchEntry
from multimoe_rt.kv_cache import KVCache, LatentKVCache
from multimoe_rt.mla import softmax_scale
from multimoe_rt.weights import VariantWeights
from tiny_models import rel_err, save_random_variants

FP32_TOL = 1e-4
VOCAB = 67
COMMON = dict(vocab_size=VOCAB, hidden_size=36, max_position_embeddings=128, tie_word_embeddings=False, pad_token_id=0,
              eos_token_id=None, bos_token_id=None)
CONFIGS = {
    "gpt_oss": lambda: T.GptOssConfig(**COMMON, num_attention_heads=6, num_key_value_heads=2, head_dim=10,
                                      num_hidden_layers=3, intermediate_size=20, num_local_experts=5,
                                      num_experts_per_tok=2, sliding_window=3, swiglu_limit=1.5,
                                      layer_types=["sliding_attention", "full_attention", "sliding_attention"]),
    "deepseek_grouped": lambda: T.DeepseekV3Config(
        **COMMON, num_attention_heads=3, num_key_value_heads=3, num_hidden_layers=3, intermediate_size=28,
        moe_intermediate_size=12, n_routed_experts=6, num_experts_per_tok=3, n_group=2, topk_group=1,
        first_k_dense_replace=1, n_shared_experts=1, kv_lora_rank=10, q_lora_rank=12, qk_rope_head_dim=4,
        v_head_dim=5, qk_nope_head_dim=6, routed_scaling_factor=2.5, attention_bias=True),
    "deepseek_yarn": lambda: T.DeepseekV3Config(
        **COMMON, num_attention_heads=3, num_key_value_heads=3, num_hidden_layers=3, intermediate_size=28,
        moe_intermediate_size=12, n_routed_experts=6, num_experts_per_tok=2, n_group=1, topk_group=1,
        first_k_dense_replace=2, n_shared_experts=2, kv_lora_rank=10, q_lora_rank=None, qk_rope_head_dim=4,
        v_head_dim=5, qk_nope_head_dim=6, norm_topk_prob=False, rope_interleave=False,
        rope_parameters={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32,
                         "rope_theta": 10000.0, "mscale": 1.0, "mscale_all_dim": 1.0, "beta_fast": 32,
                         "beta_slow": 1}),
}


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    root, made = tmp_path_factory.mktemp("batched_families"), {}

    def get(name):
        if name not in made:
            made[name] = save_random_variants(root, CONFIGS[name](), n=3, seed=len(made))
        return made[name]
    return get


def build(dirs, max_seqs=6, max_len=64, backend=None):
    vs = VariantSet.from_dirs(dirs)
    slab, table = plan_mod.load_slab(plan_mod.make_plan(vs, share=0.0), vs)
    w = VariantWeights.from_variant_set(vs, len(vs))
    for v in range(w.num_sets):
        assert w.start_load(v, set())
    w.wait_loads()
    assert all(err is None for _, err in w.poll())
    cfg = vs[0].config
    return BatchedModel(cfg, w, slab, table, KVCache.for_config(cfg, max_seqs, max_len), backend=backend)


def reference(path):
    return T.AutoModelForCausalLM.from_pretrained(path, experts_implementation="eager").eval()


def own_logits(model, tokens):
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0, -1]


def run_schedule(m, refs, prompts, schedule, steps):
    """Drive ``m`` step by step. ``prompts``: row -> (variant, prompt); ``schedule``: step -> rows that join then,
    each with its prompt in chunks ``[(row, n)]`` (n tokens of the prompt per step). Every step checks every
    returned logit row against the variant's own model on the sequence so far; returns the largest error."""
    res = m.weights.resident()
    seqs, fed, worst = {}, {}, 0.0
    for step in range(steps):
        for row in schedule.get(step, []):
            seqs[row], fed[row] = list(prompts[row][1]), 0
        entries = []
        for row, toks in seqs.items():
            v = prompts[row][0]
            if fed[row] < len(prompts[row][1]):  # still prefilling: a chunk, logits only after the last one
                n = min(len(toks) - fed[row], 4 if len(toks) > 6 else len(toks))
                e = BatchEntry(res[v], v, row, toks[fed[row]:fed[row] + n], fed[row],
                               logits=fed[row] + n == len(toks))
            else:
                e = BatchEntry(res[v], v, row, [toks[-1]], len(toks) - 1)
            entries.append(e)
        entries.sort(key=lambda e: e.set)
        logits = m.forward(m.batch(entries))
        for e, lg in zip([e for e in entries if e.logits], logits):
            toks = seqs[e.kv_row]
            err = rel_err(lg, own_logits(refs[e.variant], toks[:e.start + len(e.tokens)]))
            assert err <= FP32_TOL, (step, e.kv_row, e.variant, err)
            worst = max(worst, err)
            toks.append(int(lg.argmax()))
        for e in entries:
            fed[e.kv_row] = e.start + len(e.tokens)
    return worst


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_mixed_batches_with_joins_equal_each_variants_own_model(zoo, name):
    dirs = zoo(name)
    m = build(dirs)
    refs = [reference(d) for d in dirs]
    g = torch.Generator().manual_seed(11)
    # rows 0 and 1 start together; 2 joins at step 2 and 3 at step 4, while the others decode; lengths 1 to 11
    prompts = {row: (v, torch.randint(1, VOCAB, (n,), generator=g).tolist())
               for row, (v, n) in enumerate([(2, 9), (0, 5), (1, 11), (0, 1)])}
    assert run_schedule(m, refs, prompts, {0: [0, 1], 2: [2], 4: [3]}, steps=9) <= FP32_TOL
    with torch.no_grad():
        ids = torch.tensor([prompts[1][1]])
        assert rel_err(refs[0](ids).logits, refs[1](ids).logits) > 0.1  # the variants really differ


def test_gpt_oss_window_and_sinks_matter_in_these_configs(zoo):
    """The test configs exercise what they claim: without the sliding window, or without the sinks, the batched
    forward no longer equals transformers on a prompt longer than the window."""
    dirs = zoo("gpt_oss")
    ref = reference(dirs[0])
    p = torch.randint(1, VOCAB, (10,), generator=torch.Generator().manual_seed(2)).tolist()
    want = own_logits(ref, p)
    m = build(dirs[:1])
    assert rel_err(m.forward(m.batch([BatchEntry(0, 0, 0, p, 0)]))[0], want) <= FP32_TOL
    m.attention.windows = [None] * len(m.attention.windows)
    assert rel_err(m.forward(m.batch([BatchEntry(0, 0, 1, p, 0)]))[0], want) > 1e-3
    m = build(dirs[:1])
    for L in m.weights.layers:
        L.pop("sinks")
    assert rel_err(m.forward(m.batch([BatchEntry(0, 0, 0, p, 0)]))[0], want) > 1e-3


def test_deepseek_yarn_scale_and_routing_groups_matter_in_these_configs():
    yarn, grouped = CONFIGS["deepseek_yarn"](), CONFIGS["deepseek_grouped"]()
    assert softmax_scale(yarn) == pytest.approx(10 ** -0.5 * (0.1 * torch.log(torch.tensor(4.0)).item() + 1) ** 2)
    assert softmax_scale(grouped) == pytest.approx(10 ** -0.5)
    # grouped routing restricts the choice: with every group allowed, some tokens pick other experts
    logits, bias = torch.randn(64, 6, generator=torch.Generator().manual_seed(0)), torch.zeros(64, 6)
    _, ids = route_grouped_sigmoid(logits, bias, 3, 2, 1, True, 2.5)
    _, free = route_grouped_sigmoid(logits, bias, 3, 2, 2, True, 2.5)
    assert not torch.equal(ids.sort(-1)[0], free.sort(-1)[0])


@pytest.mark.parametrize("tokens", [0, 1, 37])
def test_routers_equal_transformers_router_modules(tokens):
    """Both routers against transformers' own modules, random weights and biases (odd sizes, empty batch): GPT-OSS's
    in float64; DeepSeek's module computes in fp32 whatever its dtype, so it is held to fp32 rounding (1e-6)."""
    g = torch.Generator().manual_seed(tokens)
    cfg = CONFIGS["deepseek_grouped"]()
    cfg.n_routed_experts, cfg.n_group, cfg.topk_group, cfg.num_experts_per_tok = 9, 3, 2, 4
    ds = T.models.deepseek_v3.modeling_deepseek_v3.DeepseekV3TopkRouter(cfg).double()
    oss = T.models.gpt_oss.modeling_gpt_oss.GptOssTopKRouter(CONFIGS["gpt_oss"]()).double()
    with torch.no_grad():
        for t in (ds.weight, ds.e_score_correction_bias, oss.weight, oss.bias):
            t.copy_(torch.randn(t.shape, generator=g, dtype=torch.float64))
    h = torch.randn(tokens, 36, generator=g, dtype=torch.float64)
    _, want_w, want_ids = ds(h)
    correction = ds.e_score_correction_bias.float().expand(tokens, 9)
    w, ids = route_grouped_sigmoid(h.float() @ ds.weight.float().t(), correction, 4, 3, 2, cfg.norm_topk_prob,
                                   cfg.routed_scaling_factor)
    order, want_order = ids.argsort(-1), want_ids.argsort(-1)  # both pick unsorted top-k: compare as sets
    assert torch.equal(ids.gather(1, order), want_ids.gather(1, want_order))
    assert torch.allclose(w.gather(1, order), want_w.gather(1, want_order), rtol=1e-6, atol=0)
    _, want_w, want_ids = oss(h)
    w, ids = route_topk_softmax(h @ oss.weight.t() + oss.bias, 2)
    assert torch.equal(ids, want_ids) and torch.allclose(w, want_w, rtol=1e-12, atol=0)


def test_mla_cache_holds_what_transformers_caches(zoo):
    """The latent cache layout: per token the normalised latent and the rotated shared key, as transformers'
    DeepSeek-V3 cache holds them (versions that cache expanded keys instead skip the comparison)."""
    dirs = zoo("deepseek_grouped")
    cfg = CONFIGS["deepseek_grouped"]()
    kv = KVCache.for_config(cfg.to_dict(), 3, 20)
    assert isinstance(kv, LatentKVCache) and kv.latent.shape == (3, 3, 20, 10 + 4)
    assert kv.nbytes == 3 * 3 * 20 * 14 * 4
    m = build(dirs)
    p = torch.randint(1, VOCAB, (7,), generator=torch.Generator().manual_seed(4)).tolist()
    m.forward(m.batch([BatchEntry(1, 1, 2, p, 0)]))
    with torch.no_grad():
        out = reference(dirs[1])(torch.tensor([p]), use_cache=True)
    layer = out.past_key_values.layers[1]
    if layer.keys.shape[-1] != cfg.kv_lora_rank:
        pytest.skip(f"this transformers caches expanded keys {tuple(layer.keys.shape)}, not the latent")
    ours = m.kv.latent[1, 2, :7]
    assert rel_err(ours[:, :10], layer.keys[0, 0]) <= 1e-6
    # rope_interleave: transformers' rotated key is in the evens-then-odds layout too
    assert rel_err(ours[:, 10:], layer.values[0, 0]) <= 1e-6


def test_a_cache_of_the_wrong_layout_is_refused(zoo):
    dirs = zoo("deepseek_grouped")
    vs = VariantSet.from_dirs(dirs[:1])
    slab, table = plan_mod.load_slab(plan_mod.make_plan(vs, share=0.0), vs)
    w = VariantWeights.from_variant_set(vs, 1)
    with pytest.raises(CheckpointError, match="needs a LatentKVCache"):
        BatchedModel(vs[0].config, w, slab, table, KVCache(3, 2, 16, 3, 10))
    with pytest.raises(CheckpointError, match="kv_lora_rank"):
        BatchedModel(vs[0].config, w, slab, table, LatentKVCache(3, 2, 16, 8, 4))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_engine_serves_three_variants_joining_mid_flight_like_their_own_generate(zoo, name):
    """Through ``Engine``: two requests start; two more are submitted from inside the engine's fourth forward, so
    they join while the first two decode (prompts chunked by a small step budget)."""
    from multimoe_rt.engine import Engine

    dirs = zoo(name)
    engine = Engine.from_pretrained(dirs, max_seqs=4, max_len=48, max_step_tokens=8)
    g = torch.Generator().manual_seed(21)
    reqs = [(v, torch.randint(1, VOCAB, (n,), generator=g).tolist(), k)
            for v, n, k in ((1, 9, 12), (2, 3, 12), (0, 6, 5), (1, 13, 6))]
    handles, calls = [], [0]
    forward = engine.model.forward

    def forward_then_join(batch):
        calls[0] += 1
        if calls[0] == 4:
            handles.extend(engine.submit(dirs[v].name, p, max_new_tokens=k, ignore_eos=True) for v, p, k in reqs[2:])
        return forward(batch)
    engine.model.forward = forward_then_join
    try:
        handles[:0] = [engine.submit(dirs[v].name, p, max_new_tokens=k, ignore_eos=True) for v, p, k in reqs[:2]]
        for h, (v, p, k) in zip([h.result(timeout=120) for h in handles], reqs):
            ref = reference(dirs[v])
            want = ref.generate(torch.tensor([p]), max_new_tokens=k, do_sample=False, pad_token_id=0)[0, len(p):]
            assert h.tokens == want.tolist(), (v, len(p))
        assert all(h.arrival > handles[0].first_token and h.first_token < handles[0].finish for h in handles[2:])
    finally:
        engine.shutdown()


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_bf16_batched_forward_stays_within_bf16_rounding_of_fp32(tmp_path, name):
    """bf16 weights, slab and cache against the variant's fp32 transformers model: within 2e-2 relative, or within
    1.5x the distance of transformers' own bf16 model where that is larger (on one of these configs it is 2.3e-2;
    ours measured 0.8-2.9e-2 where transformers' bf16 measured 0.7-2.3e-2). Weights of std 0.1: at the other
    tests' 0.2 near-tied expert choices flip under bf16 and both land 2-5e-2 away."""
    dirs = save_random_variants(tmp_path, CONFIGS[name](), n=1, seed=7, scale=0.1)
    vs = VariantSet.from_dirs(dirs)
    dt = torch.bfloat16
    slab, table = plan_mod.load_slab(plan_mod.make_plan(vs, share=0.0, dtype=dt), vs, dtype=dt)
    w = VariantWeights.from_variant_set(vs, 1, dtype=dt)
    assert w.start_load(0, set())
    w.wait_loads()
    w.poll()
    m = BatchedModel(vs[0].config, w, slab, table, KVCache.for_config(vs[0].config, 2, 32, dtype=dt))
    p = torch.randint(1, VOCAB, (9,), generator=torch.Generator().manual_seed(8)).tolist()
    ours = m.forward(m.batch([BatchEntry(0, 0, 0, p, 0)]))[0]
    assert ours.dtype == dt
    want = own_logits(reference(dirs[0]), p)
    theirs = own_logits(T.AutoModelForCausalLM.from_pretrained(dirs[0], experts_implementation="eager",
                                                               dtype=dt).eval(), p)
    assert rel_err(ours, want) <= max(2e-2, 1.5 * rel_err(theirs, want))


def test_qwen2_moe_with_sliding_and_full_layers_equals_transformers(tmp_path):
    """Per-layer windows come from ``layer_types`` for every family: a Qwen2-MoE config that mixes sliding and full
    layers (refused before, "applies one attention window to every layer") is served, and its window matters."""
    cfg = T.Qwen2MoeConfig(**COMMON, num_attention_heads=6, num_key_value_heads=2, num_hidden_layers=3,
                           intermediate_size=20, moe_intermediate_size=12, shared_expert_intermediate_size=16,
                           num_experts=5, num_experts_per_tok=2, use_sliding_window=True, sliding_window=3,
                           max_window_layers=1)
    assert len(set(cfg.layer_types)) == 2
    dirs = save_random_variants(tmp_path, cfg, n=1)
    m = build(dirs)
    p = torch.randint(1, VOCAB, (9,), generator=torch.Generator().manual_seed(8)).tolist()
    want = own_logits(reference(dirs[0]), p)
    assert rel_err(m.forward(m.batch([BatchEntry(0, 0, 0, p, 0)]))[0], want) <= FP32_TOL
    m.attention.windows = [None] * len(m.attention.windows)
    assert rel_err(m.forward(m.batch([BatchEntry(0, 0, 1, p, 0)]))[0], want) > 1e-3


@pytest.mark.parametrize("name", ["gpt_oss", "deepseek_grouped"])
def test_triton_backend_matches_torch_on_a_mixed_batch(zoo, name):
    """The one experts call hands the Triton path what it hands torch: GPT-OSS's expert biases and clamped SwiGLU
    (alpha, limit), DeepSeek's fp32 routing weights. fp32, 1e-5 (the interpreter upcasts as the GPU does not)."""
    pytest.importorskip("triton")
    from multimoe_rt.ops import triton_status

    if not triton_status()[0]:
        pytest.skip(triton_status()[1])
    dirs = zoo(name)
    g = torch.Generator().manual_seed(6)
    prompts = [(v, torch.randint(1, VOCAB, (4 + 2 * v,), generator=g).tolist()) for v in (0, 1, 2)]
    out = {}
    for backend in ("torch", "triton"):
        m = build(dirs, backend=backend)
        res = m.weights.resident()
        entries = sorted([BatchEntry(res[v], v, v, p, 0) for v, p in prompts], key=lambda e: e.set)
        out[backend] = m.forward(m.batch(entries))
    assert rel_err(out["triton"], out["torch"]) <= 1e-5
