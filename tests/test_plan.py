"""Consolidation plan (Algorithm 1): distances, policies, budget accounting, JSON, load_slab.

Variant sets are synthetic (tests/plan_variants.py; the refusals of bad plans are in test_plan_refusals.py): a
tiny random Mixtral / SwitchTransformers saved as the base, and variants made by perturbing chosen experts by known relative amounts (the rest stay
byte-identical). Distances are float32; slab contents are compared exactly (fp32 slab) and the
mean representative against a float64 mean with fp32 tolerance rel err <= 1e-5.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from multimoe_rt.checkpoint import VariantSet
from multimoe_rt.plan import (Plan, PlanError, calibration_from_text, checkpoint_fingerprint,
                              compute_distances, heatmap, load_slab, make_plan, non_expert_nbytes,
                              parse_size, record_calibration)
from multimoe_rt.tokenizer import ByteTokenizer

from plan_variants import COPY_FROM_A, E, H, L, PERTURB, dist, mixtral_dirs, vs  # noqa: F401 (fixtures)


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
