"""Consolidation plan (Algorithm 1): distances, policies, budget accounting, JSON, load_slab.

Variant sets are synthetic: a tiny random Mixtral / SwitchTransformers saved as the base, and
variants made by perturbing chosen experts by known relative amounts (the rest stay
byte-identical). Distances are float32; slab contents are compared exactly (fp32 slab) and the
mean representative against a float64 mean with fp32 tolerance rel err <= 1e-5.
"""

from __future__ import annotations

import copy
import json
import os
import shutil

import pytest
import torch

from multimoe_rt.checkpoint import VariantSet
from multimoe_rt.plan import (Plan, PlanError, calibration_from_text, checkpoint_fingerprint,
                              compute_distances, heatmap, load_slab, make_plan, non_expert_nbytes,
                              parse_size, record_calibration)
from multimoe_rt.tokenizer import ByteTokenizer

H, I, L, E = 32, 48, 2, 4

# variant -> {(layer, expert): relative perturbation}; untouched experts stay byte-identical
PERTURB = {
    "a": {(0, 1): 0.01, (1, 2): 0.10},
    "b": {(0, 1): 0.05, (1, 0): 0.20, (1, 3): 0.002},
    "c": {(0, 0): 0.30, (1, 1): 0.03},
}
COPY_FROM_A = ("c", (1, 2))  # c's expert (1, 2) is byte-identical to a's: one own copy serves both


def _perturb(param_rows, r, gen):
    noise = torch.randn(param_rows.shape, generator=gen)
    param_rows += r * param_rows.norm() * noise / noise.norm()


def _mixtral_experts(model, layer):
    return model.model.layers[layer].mlp.experts


@pytest.fixture(scope="module")
def mixtral_dirs(tmp_path_factory):
    from transformers import MixtralConfig, MixtralForCausalLM

    root = tmp_path_factory.mktemp("mixtral")
    torch.manual_seed(0)
    cfg = MixtralConfig(vocab_size=ByteTokenizer().vocab_size, hidden_size=H, intermediate_size=I, num_hidden_layers=L,
                        num_attention_heads=2, num_key_value_heads=1, num_local_experts=E,
                        num_experts_per_tok=2, max_position_embeddings=64)
    base = MixtralForCausalLM(cfg).eval()
    dirs = {"base": root / "base"}
    base.save_pretrained(dirs["base"])
    ByteTokenizer().save(dirs["base"])
    gen = torch.Generator().manual_seed(1)
    models = {}
    for name, changes in PERTURB.items():
        m = copy.deepcopy(base)
        with torch.no_grad():
            for (layer, e), r in changes.items():
                ex = _mixtral_experts(m, layer)
                _perturb(ex.gate_up_proj[e], r, gen)
                _perturb(ex.down_proj[e], r, gen)
            if name == COPY_FROM_A[0]:
                layer, e = COPY_FROM_A[1]
                src = _mixtral_experts(models["a"], layer)
                _mixtral_experts(m, layer).gate_up_proj[e].copy_(src.gate_up_proj[e])
                _mixtral_experts(m, layer).down_proj[e].copy_(src.down_proj[e])
        models[name] = m
        dirs[name] = root / name
        m.save_pretrained(dirs[name])
    return dirs, base


@pytest.fixture(scope="module")
def vs(mixtral_dirs):
    dirs, _ = mixtral_dirs
    return VariantSet.from_dirs(list(dirs.values()), names=list(dirs))


@pytest.fixture(scope="module")
def dist(vs):
    return compute_distances(vs, output=True)


def _own_entries(plan):
    return {(v, l, e) for v in range(plan.num_variants) for l in range(L) for e in range(E)
            if plan.status[v][l][e] == "own"}


def _is_dup(v_name, l, e):
    if v_name == "base":
        return True
    if v_name == COPY_FROM_A[0] and (l, e) == COPY_FROM_A[1]:
        return False
    return (l, e) not in PERTURB[v_name]


# ---------------------------------------------------------------- distances


def test_duplicates_found_by_hash(vs, dist):
    for v, name in enumerate(vs.names):
        for l in range(L):
            for e in range(E):
                assert dist.duplicate[v][l][e] == _is_dup(name, l, e), (name, l, e)
    # a byte-identical pair of non-anchor experts has equal hashes
    c, a = vs.names.index("c"), vs.names.index("a")
    l, e = COPY_FROM_A[1]
    assert dist.hashes[c][l][e] == dist.hashes[a][l][e] != dist.hashes[0][l][e]


def test_l2_matches_known_perturbation(vs, dist):
    for name, changes in PERTURB.items():
        v = vs.names.index(name)
        for (l, e), r in changes.items():
            # both w1 and w2 moved by relative r, so the joint relative L2 is r
            assert abs(dist.l2[v][l][e] - r) <= 1e-4 * max(r, 1e-2), (name, l, e)
            assert dist.cosine[v][l][e] > 0


def test_output_distance_zero_for_identical_and_ordered(vs, dist, mixtral_dirs):
    _, base = mixtral_dirs
    a, b = vs.names.index("a"), vs.names.index("b")
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(3))
    calib = record_calibration(base, vs.moe_layers, [{"input_ids": ids}])
    assert sorted(calib) == list(range(L)) and calib[0].shape == (32, H)
    rec = compute_distances(vs, output=True, calib=calib)
    assert rec.calibration == "recorded" and dist.calibration == "gaussian"
    for d in (dist, rec):
        for v in range(len(vs)):
            for l in range(L):
                for e in range(E):
                    if d.duplicate[v][l][e]:
                        assert d.output[v][l][e] == 0.0
        # expert (0, 1): a moved it by 1%, b by 5%; b must rank as more different
        assert 0 < d.output[a][0][1] < d.output[b][0][1]


def test_identical_experts_of_copied_variant_have_zero_distance(vs):
    # a variant that is a plain copy of the base: everything duplicate, nothing to rank
    from multimoe_rt.checkpoint import load_variant

    twin = VariantSet([vs[0], load_variant(vs[0].path, name="twin")])
    d = compute_distances(twin, output=True)
    assert all(d.duplicate[1][l][e] and d.output[1][l][e] == 0 for l in range(L) for e in range(E))
    plan = make_plan(twin, share=0.0, distances=d)
    assert plan.num_device_slots == L * E


# ---------------------------------------------------------------- budget policy


def test_budget_respected_exactly_and_bytes_from_tensors(vs, dist):
    w1, w2 = vs[0].expert(0, 0)
    slot = (w1.numel() * w1.element_size()) + (w2.numel() * w2.element_size())
    base_bytes = L * E * slot
    plan_all = make_plan(vs, share=0.0, distances=dist)
    n_units = plan_all.num_device_slots - L * E
    assert n_units == 7  # 8 non-duplicate entries; c's twin of a's expert rides along
    for non_expert in (0, 1000):
        for extra in range(0, n_units + 2):
            budget = base_bytes + non_expert + extra * slot + (slot // 3 if extra % 2 else 0)
            plan = make_plan(vs, budget_bytes=budget, non_expert_bytes=non_expert, distances=dist)
            assert plan.slot_nbytes == slot
            assert plan.device_bytes <= budget
            assert plan.device_bytes == non_expert + plan.expert_bytes
            assert plan.num_device_slots == L * E + min(extra, n_units)
            if extra < n_units:  # not saturated: the next slot would not fit
                assert budget - plan.device_bytes < slot


def test_bfloat16_slab_halves_slot_bytes(vs, dist):
    plan32 = make_plan(vs, share=1.0, distances=dist)
    plan16 = make_plan(vs, share=1.0, distances=dist, dtype=torch.bfloat16)
    assert plan16.slot_nbytes * 2 == plan32.slot_nbytes and plan16.dtype == "bfloat16"


@pytest.mark.parametrize("metric", ["l2", "cosine", "output", "random"])
@pytest.mark.parametrize("scope", ["global", "per_layer"])
def test_monotone_budget(vs, dist, metric, scope):
    slot = make_plan(vs, share=1.0, distances=dist).slot_nbytes
    prev_own, prev_share = set(), 1.0
    for extra in range(0, 8):
        plan = make_plan(vs, budget_bytes=(L * E + extra) * slot, metric=metric, scope=scope,
                         distances=dist, seed=5)
        own = _own_entries(plan)
        assert own >= prev_own
        assert plan.sharing_fraction() <= prev_share
        prev_own, prev_share = own, plan.sharing_fraction()
    assert prev_share == 0.0


def test_global_ranking_most_different_first(vs, dist):
    slot = make_plan(vs, share=1.0, distances=dist).slot_nbytes
    plan = make_plan(vs, budget_bytes=(L * E + 2) * slot, metric="l2", distances=dist)
    # the two largest perturbations: c (0,0) 0.30 and b (1,0) 0.20
    c, b = vs.names.index("c"), vs.names.index("b")
    assert _own_entries(plan) == {(c, 0, 0), (b, 1, 0)}


def test_per_layer_scope_spreads_evenly(vs, dist):
    slot = make_plan(vs, share=1.0, distances=dist).slot_nbytes
    for extra in range(0, 6):
        plan = make_plan(vs, budget_bytes=(L * E + extra) * slot, scope="per_layer", distances=dist)
        per_layer = [len({plan.slots[v][l][e] for v in range(len(vs)) for e in range(E)}) - E
                     for l in range(L)]
        # layer 0 has 3 candidates (a, b at expert 1; c at expert 0), layer 1 has 4 units
        assert sum(per_layer) == extra
        assert abs(per_layer[0] - per_layer[1]) <= 1 or per_layer[0] == 3, (extra, per_layer)
        # within a layer, the most different go first
        for l in range(L):
            own = [dist.l2[v][l][e] for v, ll, e in _own_entries(plan) if ll == l]
            rest = [dist.l2[v][l][e] for v in range(1, len(vs)) for e in range(E)
                    if plan.status[v][l][e] == "shared"]
            assert not own or not rest or min(own) >= max(rest)


def test_random_metric_is_seeded(vs, dist):
    slot = make_plan(vs, share=1.0, distances=dist).slot_nbytes
    mk = lambda seed: _own_entries(make_plan(vs, budget_bytes=(L * E + 3) * slot, metric="random",
                                             seed=seed, distances=dist))
    assert mk(1) == mk(1)
    assert len({frozenset(mk(s)) for s in range(6)}) > 1


def test_share_and_threshold_policies(vs, dist):
    n = sum(not d for row in dist.duplicate[1:] for layer in row for d in layer)
    assert n == 8
    for share in (0.0, 0.25, 0.5, 0.75, 1.0):
        plan = make_plan(vs, share=share, distances=dist)
        assert plan.sharing_fraction() >= share - 1e-9
        assert plan.sharing_fraction() - share <= 1.5 / n  # within one entry (+ a travelling twin)
    plan = make_plan(vs, threshold=0.04, distances=dist)
    for v in range(1, len(vs)):
        for l in range(L):
            for e in range(E):
                big = not dist.duplicate[v][l][e] and dist.l2[v][l][e] > 0.04
                assert (plan.status[v][l][e] == "own") == big


def test_exact_duplicates_always_merge(vs, dist):
    for plan in (make_plan(vs, share=0.0, distances=dist),
                 make_plan(vs, threshold=-1.0, distances=dist, metric="random")):
        for v in range(len(vs)):
            for l in range(L):
                for e in range(E):
                    if dist.duplicate[v][l][e]:
                        assert plan.slots[v][l][e] == plan.slots[0][l][e]
                        assert plan.status[v][l][e] in ("anchor", "duplicate")
        # c's copy of a's expert rides on a's own slot
        c, a = vs.names.index("c"), vs.names.index("a")
        l, e = COPY_FROM_A[1]
        assert plan.slots[c][l][e] == plan.slots[a][l][e] != plan.slots[0][l][e]
        # unique slot contents: L*E shared + 7 own (8 non-duplicate entries, one twin pair)
        assert plan.num_device_slots == L * E + 7


def test_too_small_budget_refused_with_needed_bytes(vs, dist):
    slot = make_plan(vs, share=1.0, distances=dist).slot_nbytes
    need = L * E * slot + 5000
    with pytest.raises(PlanError, match=rf"needs {need} B") as info:
        make_plan(vs, budget_bytes=need - 1, non_expert_bytes=5000, distances=dist)
    assert f"{L * E - 1} expert slots" in str(info.value)  # what would fit
    with pytest.raises(PlanError, match="over the budget"):
        make_plan(vs, share=0.0, budget_bytes=need, non_expert_bytes=5000, distances=dist)


def test_offload_tier_counts_host_slots_and_reserves_a_cache(vs, dist, tmp_path):
    slot = make_plan(vs, share=1.0, distances=dist).slot_nbytes
    plan = make_plan(vs, budget_bytes=(L * E - 3) * slot, offload=True, distances=dist)
    # E device slots are kept back as the cache host experts are paged into
    assert plan.cache_slots == E and plan.num_device_slots == L * E - 3 - E
    assert plan.num_host_slots == 3 + E and plan.host_bytes == (3 + E) * slot
    assert plan.expert_bytes == (L * E - 3) * slot and f"host tier: {3 + E} slots" in plan.summary()
    plan = make_plan(vs, share=0.0, budget_bytes=(L * E + 2) * slot, offload=True, distances=dist)
    assert plan.num_host_slots == 5 + E and plan.expert_bytes == (L * E + 2) * slot
    slab, table = load_slab(plan, vs)
    assert slab.num_slots == L * E + 2 and slab.host_tier.num_host == 5 + E
    with pytest.raises(PlanError, match="at least 4"):
        make_plan(vs, budget_bytes=(E - 1) * slot, offload=True, distances=dist)


def test_offloaded_experts_page_in_and_compute_like_resident_ones(vs, dist):
    """Sharing 0 under a budget that forces offload: every variant's experts still come out exactly."""
    slot = make_plan(vs, share=1.0, distances=dist).slot_nbytes
    plan = make_plan(vs, share=0.0, budget_bytes=(L * E + 2) * slot, offload=True, distances=dist)
    slab, table = load_slab(plan, vs)
    tier = slab.host_tier
    for v in range(len(vs)):
        for l in range(L):
            ids = torch.arange(E).view(1, E)
            slots = tier.translate(table.resolve(l, ids, v))
            assert int(slots.max()) < slab.num_slots
            for e in range(E):
                w1, w2 = vs[v].expert(l, e)
                assert torch.equal(slab.w1[int(slots[0, e])], w1) and torch.equal(slab.w2[int(slots[0, e])], w2)
    assert tier.stats["fetches"] >= tier.num_host and tier.stats["bytes_copied"] == tier.stats["fetches"] * slot


# ---------------------------------------------------------------- plan data


def test_summary_table_consistent_with_plan(vs, dist):
    plan = make_plan(vs, share=0.5, distances=dist, scope="per_layer")
    lines = plan.summary().splitlines()
    rows = [ln.split() for ln in lines[2:2 + L]]
    for l, row in enumerate(rows):
        st = [plan.status[v][l][e] for v in range(len(vs)) for e in range(E)]
        slots = {plan.slots[v][l][e] for v in range(len(vs)) for e in range(E)}
        assert row[0] == str(l)
        assert [int(x) for x in row[1:4]] == [st.count("duplicate"), st.count("shared"), st.count("own")]
        assert int(row[5]) == len(slots) and int(row[7]) == len(slots) * plan.slot_nbytes
    assert sum(int(r[7]) for r in rows) == plan.expert_bytes


def test_json_round_trip(vs, dist, tmp_path):
    plan = make_plan(vs, share=0.25, metric="output", representative="mean", distances=dist)
    path = tmp_path / "plan.json"
    plan.to_json(path)
    doc = json.loads(path.read_text())
    assert doc["format"] == 2 and doc["summary"]["expert_bytes"] == plan.expert_bytes
    again = Plan.from_json(path, variant_set=vs)
    assert again == plan
    assert again.calibration == "gaussian"


def test_stale_plan_refused(mixtral_dirs, tmp_path):
    from safetensors.torch import load_file, save_file

    dirs, _ = mixtral_dirs
    copies = {}
    for name in ("base", "a"):
        copies[name] = tmp_path / name
        shutil.copytree(dirs[name], copies[name])
    vs2 = VariantSet.from_dirs(list(copies.values()), names=list(copies))
    plan = make_plan(vs2, share=0.5)
    plan.to_json(tmp_path / "plan.json")
    # a copied directory is still the same checkpoint (content fingerprint, not mtime)
    moved = tmp_path / "moved_a"
    shutil.copytree(copies["a"], moved)
    Plan.from_json(tmp_path / "plan.json",
                   variant_set=VariantSet.from_dirs([copies["base"], moved], names=["base", "a"]))
    # now change one expert of 'a' on disk
    f = copies["a"] / "model.safetensors"
    sd = load_file(f)
    key = next(k for k in sd if "experts.3.w2" in k)
    sd[key] = sd[key] + 1e-3
    save_file(sd, f, metadata={"format": "pt"})
    vs3 = VariantSet.from_dirs(list(copies.values()), names=list(copies))
    with pytest.raises(PlanError, match="stale plan"):
        Plan.from_json(tmp_path / "plan.json", variant_set=vs3)
    with pytest.raises(PlanError, match="stale plan"):
        load_slab(plan, vs3)
    with pytest.raises(PlanError, match="plan is for variants"):
        plan.validate(VariantSet.from_dirs([copies["base"], moved], names=["base", "other"]))


# ---------------------------------------------------------------- loading


def test_load_slab_share0_reproduces_every_variant(vs, dist):
    plan = make_plan(vs, share=0.0, distances=dist)
    slab, table = load_slab(plan, vs)
    assert slab.num_slots == plan.num_device_slots and slab.nbytes == plan.expert_bytes
    assert table.slots.tolist() == plan.slots
    for v, variant in enumerate(vs):
        for l in range(L):
            for e in range(E):
                w1, w2 = variant.expert(l, e)
                s = int(table.slots[v, l, e])
                assert torch.equal(slab.w1[s], w1) and torch.equal(slab.w2[s], w2), (v, l, e)


def test_load_slab_share1_uses_anchor(vs, dist):
    plan = make_plan(vs, share=1.0, distances=dist)
    slab, table = load_slab(plan, vs)
    assert slab.num_slots == L * E
    for v in range(len(vs)):
        for l in range(L):
            for e in range(E):
                w1, w2 = vs[0].expert(l, e)
                s = int(table.slots[v, l, e])
                assert torch.equal(slab.w1[s], w1) and torch.equal(slab.w2[s], w2)


def test_mean_representative_is_elementwise_mean(vs, dist):
    plan = make_plan(vs, share=1.0, representative="mean", distances=dist)
    slab, table = load_slab(plan, vs)
    for l in range(L):
        for e in range(E):
            ref1 = torch.stack([var.expert(l, e)[0].double() for var in vs]).mean(0)
            ref2 = torch.stack([var.expert(l, e)[1].double() for var in vs]).mean(0)
            s = int(table.slots[0, l, e])
            assert all(int(table.slots[v, l, e]) == s for v in range(len(vs)))
            for got, ref in ((slab.w1[s], ref1), (slab.w2[s], ref2)):
                assert ((got.double() - ref).norm() / ref.norm()) <= 1e-5
    # an expert nobody changed keeps the anchor's exact bytes (no averaging noise)
    assert plan.slot_sources[plan.slots[0][0][2]]["kind"] == "variant"
    # with own copies, the mean covers only the variants that still share
    plan = make_plan(vs, share=0.0, representative="mean", distances=dist)
    assert all(src["kind"] == "variant" for src in plan.slot_sources)


def test_load_slab_bfloat16(vs, dist):
    plan = make_plan(vs, share=0.5, distances=dist, dtype=torch.bfloat16)
    slab, table = load_slab(plan, vs)
    assert slab.dtype == torch.bfloat16 and slab.nbytes == plan.expert_bytes
    w1, _ = vs[1].expert(1, 2)
    s = int(table.slots[1, 1, 2])
    assert torch.equal(slab.w1[s], w1.to(torch.bfloat16))


def test_switch_family(tmp_path):
    from transformers import SwitchTransformersConfig, SwitchTransformersForConditionalGeneration

    torch.manual_seed(0)
    cfg = SwitchTransformersConfig(vocab_size=64, d_model=16, d_ff=24, num_layers=2,
                                   num_decoder_layers=2, num_heads=2, d_kv=8, num_experts=4,
                                   num_sparse_encoder_layers=1, num_sparse_decoder_layers=1)
    base = SwitchTransformersForConditionalGeneration(cfg)
    base.save_pretrained(tmp_path / "base")
    with torch.no_grad():
        ex = base.encoder.block[1].layer[1].mlp.experts.expert_2
        ex.wi.weight += 0.1 * torch.randn_like(ex.wi.weight)
    base.save_pretrained(tmp_path / "tuned")
    vs2 = VariantSet.from_dirs([tmp_path / "base", tmp_path / "tuned"])
    assert not vs2.gated and vs2.num_layers == 2
    plan = make_plan(vs2, share=0.0, metric="output")
    assert plan.status[1][0][2] == "own" and plan.num_device_slots == 2 * 4 + 1
    slab, table = load_slab(plan, vs2)
    w1, w2 = vs2[1].expert(0, 2)
    assert torch.equal(slab.w1[int(table.slots[1, 0, 2])], w1)


def test_heatmap_png(vs, dist, tmp_path):
    pytest.importorskip("matplotlib")
    slot = make_plan(vs, share=1.0, distances=dist).slot_nbytes
    plan = make_plan(vs, budget_bytes=(L * E - 1) * slot, offload=True, distances=dist)
    heatmap(plan, tmp_path / "plan.png")
    assert (tmp_path / "plan.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_parse_size():
    assert parse_size("40GiB") == 40 * 1024**3
    assert parse_size("512MiB") == 512 * 1024**2
    assert parse_size("123456") == 123456
    assert parse_size("1.5GB") == 1_500_000_000
    with pytest.raises(ValueError, match="cannot parse size"):
        parse_size("40 parsecs")


def test_fingerprint_is_content_based(mixtral_dirs, tmp_path):
    dirs, _ = mixtral_dirs
    shutil.copytree(dirs["a"], tmp_path / "a")
    assert checkpoint_fingerprint(tmp_path / "a") == checkpoint_fingerprint(dirs["a"])
    assert checkpoint_fingerprint(dirs["a"]) != checkpoint_fingerprint(dirs["b"])


def test_calibration_from_text_matches_hooks(vs, mixtral_dirs):
    _, base = mixtral_dirs
    text = "the quick brown fox jumps over the lazy dog. " * 3
    calib = calibration_from_text(vs[0], text, max_tokens=100, seq_len=40)
    assert calib[1].shape == (100, H)
    ids = torch.tensor([ByteTokenizer().encode(text)[:40]])
    direct = record_calibration(base, vs.moe_layers, [{"input_ids": ids}])
    assert torch.allclose(calib[1][:40], direct[1], rtol=1e-5, atol=1e-6)
    with pytest.raises(PlanError, match="multimoe_tokenizer.json"):
        calibration_from_text(vs[1], text)


def test_non_expert_nbytes(vs):
    v = vs[0]
    n = sum(v.tensor(name).numel() for name in v.non_expert_names())
    assert non_expert_nbytes(v) == 4 * n and non_expert_nbytes(v, torch.bfloat16) == 2 * n


def test_cli_plan(mixtral_dirs, tmp_path, capsys):
    from multimoe_rt.cli import main

    dirs, _ = mixtral_dirs
    out, png = tmp_path / "plan.json", tmp_path / "plan.png"
    argv = ["plan", *map(str, dirs.values()), "--names", ",".join(dirs), "--share", "0.5",
            "--metric", "cosine", "--scope", "per_layer", "-o", str(out), "--heatmap", str(png), "--quiet"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    vs2 = VariantSet.from_dirs(list(dirs.values()), names=list(dirs))
    plan = Plan.from_json(out, variant_set=vs2)
    assert plan.metric == "cosine" and plan.scope == "per_layer" and plan.policy["share"] == 0.5
    assert plan.summary() in printed and png.exists()
    # a budget below one copy per (layer, expert): exit code 2 and the bytes needed
    assert main(["plan", *map(str, dirs.values()), "--budget", "1KiB", "-o", str(out), "--quiet"]) == 2
    assert f"needs {L * E * plan.slot_nbytes} B" in capsys.readouterr().err


def test_other_anchor(vs):
    # anchor = variant "b": distances and sharing are measured against b's experts
    b = vs.names.index("b")
    d = compute_distances(vs, anchor=b)
    assert all(d.duplicate[b][l][e] for l in range(L) for e in range(E))
    assert not d.duplicate[0][1][0] and d.duplicate[0][0][2]  # b moved (1,0); nobody moved (0,2)
    plan = make_plan(vs, share=1.0, anchor=b, distances=d)
    slab, table = load_slab(plan, vs)
    for v in range(len(vs)):
        w1, _ = vs[b].expert(1, 0)
        assert torch.equal(slab.w1[int(table.slots[v, 1, 0])], w1)
    with pytest.raises(PlanError, match="anchor"):
        make_plan(vs, share=1.0, anchor=0, distances=d)


# ---------------------------------------------------------------- issue 16: nothing wrong comes back silently


def _doc(vs, dist, tmp_path, **kw):
    plan = make_plan(vs, distances=dist, **kw)
    path = tmp_path / "plan.json"
    plan.to_json(path)
    return plan, path, json.loads(path.read_text())


def test_nan_threshold_and_nan_distances_are_refused(vs, dist, mixtral_dirs, tmp_path):
    """Old code: threshold=nan shared 100% silently; a NaN anchor gave an arbitrary ranking and a plan file with a
    bare NaN."""
    for bad in (float("nan"), float("inf"), "0.1"):
        with pytest.raises(PlanError, match="threshold must be a finite number"):
            make_plan(vs, threshold=bad, distances=dist)
    with pytest.raises(PlanError, match="share must be a number in"):
        make_plan(vs, share=float("nan"), distances=dist)
    with pytest.raises(PlanError, match="size must be"):
        make_plan(vs, budget_bytes=float("nan"), distances=dist)
    # a NaN in the anchor's expert, loaded with the finiteness check switched off
    from safetensors.torch import load_file, save_file

    dirs, _ = mixtral_dirs
    poisoned = tmp_path / "base"
    shutil.copytree(dirs["base"], poisoned)
    sd = load_file(poisoned / "model.safetensors")
    key = next(k for k in sd if k.startswith("model.layers.1.") and ("experts.0.w2" in k or "down_proj" in k))
    sd[key].view(-1)[0] = float("nan")
    save_file(sd, poisoned / "model.safetensors", metadata={"format": "pt"})
    paths = [poisoned, dirs["a"], dirs["b"]]
    with pytest.raises(PlanError, match=r"l2 distance of variant 'a' layer 1 expert 0 .* is nan"):
        make_plan(VariantSet.from_dirs(paths, names=["base", "a", "b"], check_finite=False), share=0.5)
    from multimoe_rt.checkpoint import CheckpointError
    with pytest.raises(CheckpointError, match=rf"tensor '{key}'( \(expert 0\))?: 1 non-finite values"):
        make_plan(VariantSet.from_dirs(paths, names=["base", "a", "b"]), share=0.5)  # the default
    # and a plan never carries a NaN: neither written nor read
    plan = make_plan(vs, share=0.5, distances=dist)
    plan.distance[1][0][1] = float("nan")
    with pytest.raises(PlanError, match=r"plan field 'distance\[1\]\[0\]\[1\]': nan is not finite"):
        plan.to_json(tmp_path / "nan.json")
    plan.distance[1][0][1] = 0.5
    plan.to_json(tmp_path / "nan.json")
    (tmp_path / "nan.json").write_text((tmp_path / "nan.json").read_text().replace('"distance": [', '"distance": [NaN, ', 1))
    with pytest.raises(PlanError, match="NaN is not valid in a plan"):
        Plan.from_json(tmp_path / "nan.json")


def test_hand_edited_source_of_an_own_copy_is_refused(vs, dist, tmp_path):
    """Old code: changing an own-copy slot's source to the base loaded without error and served base weights."""
    plan, path, doc = _doc(vs, dist, tmp_path, share=0.0)
    a = vs.names.index("a")
    s = plan.slots[a][1][2]
    assert plan.status[a][1][2] == "own" and doc["slot_sources"][s]["variants"] == [a]
    doc["slot_sources"][s]["variants"] = [0]
    path.write_text(json.dumps(doc))
    with pytest.raises(PlanError, match=rf"plan field 'slot_sources\[{s}\].variants': slot {s} is copied from "
                                        r"variant 'base' layer 1 expert 2, which differs"):
        Plan.from_json(path, variant_set=vs)
    edited = copy.deepcopy(plan)  # the same edit in memory: load_slab refuses it too
    edited.slot_sources[s]["variants"] = [0]
    with pytest.raises(PlanError, match="would serve wrong weights"):
        load_slab(edited, vs)
    # status edits that would serve the wrong weights: an own entry relabelled duplicate; a shared entry moved
    # onto another variant's own copy
    doc = json.loads(json.dumps(plan.__dict__))
    doc["status"][a][1][2] = "duplicate"
    path.write_text(json.dumps(doc))
    with pytest.raises(PlanError, match=rf"status\[{a}\]\[1\]\[2\]': 'duplicate', but the hashes say"):
        Plan.from_json(path, variant_set=vs)
    shared, shared_path, sdoc = _doc(vs, dist, tmp_path, share=0.0)
    sdoc["status"][a][1][2] = "shared"  # relabelled shared: it would still be served a's own copy, not the anchor's
    shared_path.write_text(json.dumps(sdoc))
    with pytest.raises(PlanError, match="would serve wrong weights"):
        Plan.from_json(shared_path, variant_set=vs)
    sdoc["status"][a][1][2] = "own"
    b = vs.names.index("b")  # b's own entry at (0, 1) pointed at a's own copy of (0, 1)
    sdoc["slots"][b][0][1] = shared.slots[a][0][1]
    shared_path.write_text(json.dumps(sdoc))
    with pytest.raises(PlanError, match="would serve wrong weights"):
        Plan.from_json(shared_path, variant_set=vs)


@pytest.mark.parametrize("edit, field", [
    (lambda d: [d], None),                                            # a list instead of an object
    (lambda d: None, None),                                           # null
    (lambda d: dict(d, num_layers=d["num_layers"] + 1), r"slots\[0\]"),  # a layer count off by one
    (lambda d: dict(d, num_layers=d["num_layers"] - 1), r"slot_sources\[\d+\].layer"),
    (lambda d: dict(d, slot_sources=[dict(d["slot_sources"][0], variants=[42])] + d["slot_sources"][1:]),
     r"slot_sources\[0\].variants\[0\]"),                             # source variant 42
    (lambda d: dict(d, slots="abc"), "slots"),
    (lambda d: dict(d, anchor=7), "anchor"),
    (lambda d: dict(d, anchor=None), "anchor"),
    (lambda d: dict(d, policy=None), "policy"),
    (lambda d: dict(d, slot_sources=[None] + d["slot_sources"][1:]), r"slot_sources\[0\]"),
    (lambda d: dict(d, slot_sources={}), "slot_sources"),
    (lambda d: dict(d, slot_location=d["slot_location"][:-1]), "slot_location"),
    (lambda d: dict(d, status=d["status"][:1] + [[["bogus"] * E] * L] * 3),
     r"status\[1\]\[0\]\[0\]"),
    (lambda d: dict(d, hashes=[[[1] * E] * L] * 4), r"hashes\[0\]\[0\]\[0\]"),
    (lambda d: dict(d, variant_names="base"), "variant_names"),
    (lambda d: dict(d, fingerprints=[]), "fingerprints"),
    (lambda d: dict(d, dtype="float64"), "dtype"),
    (lambda d: dict(d, slot_nbytes=d["slot_nbytes"] // 2), "slot_nbytes"),
    (lambda d: dict(d, gated="yes"), "gated"),
    (lambda d: {k: v for k, v in d.items() if k != "slots"}, "slots"),
    (lambda d: dict(d, extra_field=1), "extra_field"),
    (lambda d: dict(d, metric=3), "metric"),
    (lambda d: dict(d, slots=[[[True] * E] * L] * 4), r"slots\[0\]\[0\]\[0\]"),
    (lambda d: dict(d, policy=dict(d["policy"], cache_slots=2**70)), "policy.cache_slots"),  # a huge allocation
    (lambda d: dict(d, policy=dict(d["policy"], cache_slots=1.5)), "policy.cache_slots"),
])
def test_malformed_plans_raise_plan_error_naming_the_field(vs, dist, tmp_path, edit, field):
    """Old code: AttributeError, IndexError or TypeError from deep inside loading."""
    _, path, doc = _doc(vs, dist, tmp_path, share=0.5)
    path.write_text(json.dumps(edit(doc)))
    with pytest.raises(PlanError) as info:
        Plan.from_json(path, variant_set=vs)
    msg = str(info.value)
    assert msg.startswith(str(path))
    if field is None:
        assert "expected a JSON object" in msg
    else:
        import re
        assert re.search(rf"plan field '{field}'", msg), msg


def test_fuzzed_plans_only_raise_plan_error_and_never_serve_wrong_weights(vs, dist, tmp_path_factory):
    """>= 200 mutated plans (hypothesis): each is refused with PlanError, or loads a slab that serves every
    (variant, layer, expert) its own weights, or the anchor's where the plan says shared."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from multimoe_rt.errors import MultimoeError

    tmp = tmp_path_factory.mktemp("fuzz")
    base_plan = make_plan(vs, share=0.5, distances=dist)
    base_plan.to_json(tmp / "base.json")
    text = (tmp / "base.json").read_text()
    doc = json.loads(text)
    experts = {(v, l, e): vs[v].expert(l, e) for v in range(len(vs)) for l in range(L) for e in range(E)}
    values = st.one_of(st.none(), st.booleans(), st.integers(-3, 70), st.just(2**70), st.floats(allow_nan=False),
                       st.text(max_size=4), st.just([]), st.just({}), st.lists(st.integers(-1, 5), max_size=3))

    def paths(node, prefix=()):
        yield prefix
        if isinstance(node, dict):
            for k, v in node.items():
                yield from paths(v, prefix + (k,))
        elif isinstance(node, list):
            for i, v in enumerate(node):
                yield from paths(v, prefix + (i,))

    all_paths = [p for p in paths(doc) if p]
    outcomes = {"refused": 0, "loaded": 0}

    @settings(max_examples=int(os.environ.get("MULTIMOE_FUZZ_EXAMPLES", 220)), deadline=None,
              suppress_health_check=list(HealthCheck), database=None,
              derandomize=not os.environ.get("MULTIMOE_FUZZ_EXAMPLES"))  # CI: the same cases every run
    @given(st.data())
    def one(data):
        kind = data.draw(st.sampled_from(["set", "delete", "truncate", "swap"]))
        d = json.loads(text)
        if kind == "truncate":
            raw = text[:data.draw(st.integers(0, len(text) - 1))]
        else:
            path = data.draw(st.sampled_from(all_paths))
            parent = d
            for k in path[:-1]:
                parent = parent[k]
            if kind == "set":
                parent[path[-1]] = data.draw(values)
            elif kind == "delete":
                parent.pop(path[-1]) if isinstance(parent, dict) else parent.pop(path[-1])
            else:  # swap two leaves of the same table: plausible-looking hand edits
                other = data.draw(st.sampled_from(all_paths))
                q = d
                for k in other[:-1]:
                    q = q[k]
                parent[path[-1]], q[other[-1]] = q[other[-1]], parent[path[-1]]
            raw = json.dumps(d)
        f = tmp / "fuzz.json"
        f.write_text(raw)
        try:
            plan = Plan.from_json(f, variant_set=vs)
            slab, table = load_slab(plan, vs)
        except PlanError:
            outcomes["refused"] += 1
            return
        except MultimoeError as exc:  # another of our own classes would do, but none is expected here
            raise AssertionError(f"unexpected {type(exc).__name__}: {exc}") from exc
        outcomes["loaded"] += 1
        for (v, l, e), (w1, w2) in experts.items():
            slot = int(table.slots[v, l, e])
            st_ = plan.status[v][l][e]
            s = plan.slots[v][l][e]
            if plan.slot_location[s] == "host" or plan.slot_sources[s]["kind"] == "mean":
                continue
            want = experts[(plan.anchor, l, e)] if st_ == "shared" else (w1, w2)
            assert torch.equal(slab.w1[slot], want[0]) and torch.equal(slab.w2[slot], want[1]), (v, l, e, st_)

    one()
    assert outcomes["refused"] > 0 and sum(outcomes.values()) >= 200


# ---------------------------------------------------------------- plans proven against the checkpoints


def _serves_own_weights(plan, vs, v, l, e):
    """Load the plan and say whether (v, l, e) is served exactly its own checkpoint tensor."""
    slab, table = load_slab(plan, vs)
    slot = int(table.slots[v, l, e])
    w1, w2 = vs[v].expert(l, e)
    if slab.deltas is not None:
        got1, got2 = slab.deltas.effective(slab.w1, slab.w2, slot, torch.float32)
        return torch.allclose(got1, w1, atol=1e-2) and torch.allclose(got2, w2, atol=1e-2)
    return torch.equal(slab.w1[slot], w1) and torch.equal(slab.w2[slot], w2)


def test_own_entry_pointed_at_another_variants_copy_with_its_hash_is_refused(vs, dist):
    """Old code loaded this and served variant a's expert to b (the plan's own hash list was trusted)."""
    plan = make_plan(vs, share=0.0, distances=dist)
    a, b = vs.names.index("a"), vs.names.index("b")
    assert plan.status[a][0][1] == plan.status[b][0][1] == "own"
    edited = copy.deepcopy(plan)
    edited.slots[b][0][1] = plan.slots[a][0][1]
    edited.hashes[b][0][1] = plan.hashes[a][0][1]
    edited.slot_sources[plan.slots[b][0][1]]["variants"] = [a]  # b's old copy no longer reads b's tensor
    with pytest.raises(PlanError, match=r"hashes\[2\]\[0\]\[1\].*variant 'b'.*checkpoint"):
        _serves_own_weights(edited, vs, b, 0, 1)


def test_own_entry_relabelled_duplicate_of_the_base_is_refused(vs, dist):
    plan = make_plan(vs, share=0.0, distances=dist)
    a = vs.names.index("a")
    edited = copy.deepcopy(plan)
    edited.status[a][0][1] = edited.choice[a][0][1] = "duplicate"
    edited.slots[a][0][1] = plan.slots[0][0][1]
    edited.hashes[a][0][1] = plan.hashes[0][0][1]
    edited.distance[a][0][1] = 0.0
    edited.slot_sources[plan.slots[a][0][1]]["variants"] = [0]
    with pytest.raises(PlanError, match=r"hashes\[1\]\[0\]\[1\].*variant 'a'.*checkpoint"):
        _serves_own_weights(edited, vs, a, 0, 1)


def test_delta_pointed_at_another_variants_delta_is_refused(vs, dist):
    plan = make_plan(vs, share=1.0, delta="int4", distances=dist, dtype=torch.float32)
    a, b = vs.names.index("a"), vs.names.index("b")
    assert plan.status[a][0][1] == plan.status[b][0][1] == "delta"
    S = len(plan.slot_sources)
    da, db = plan.slots[a][0][1] - S, plan.slots[b][0][1] - S
    edited = copy.deepcopy(plan)
    edited.slots[b][0][1] = plan.slots[a][0][1]
    edited.deltas[da]["variants"] = [a, b]
    edited.deltas[db]["variants"] = [a]
    edited.hashes[b][0][1] = plan.hashes[a][0][1]
    with pytest.raises(PlanError, match=r"hashes\[2\]\[0\]\[1\].*variant 'b'.*checkpoint"):
        _serves_own_weights(edited, vs, b, 0, 1)


def test_a_share_recorded_as_free_but_differing_is_refused(vs, dist):
    """A share is a known approximation: its recorded distance to the variant's own tensor must say so."""
    plan = make_plan(vs, share=1.0, distances=dist)
    a = vs.names.index("a")
    assert plan.status[a][0][1] == "shared" and plan.distance[a][0][1] > 0
    assert _serves_own_weights(plan, vs, 0, 0, 1)
    edited = copy.deepcopy(plan)
    edited.distance[a][0][1] = 0.0
    with pytest.raises(PlanError, match=r"distance\[1\]\[0\]\[1\]"):
        load_slab(edited, vs)
