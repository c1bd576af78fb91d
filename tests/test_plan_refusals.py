"""Plans that must be refused (issue 16: nothing wrong comes back silently): NaN thresholds and distances, hand
edits, malformed and fuzzed JSON, and entries that would serve another checkpoint's tensors. The variant set is
tests/plan_variants.py's."""

from __future__ import annotations

import copy
import json
import os
import shutil

import pytest
import torch

from multimoe_rt.checkpoint import VariantSet
from multimoe_rt.plan import Plan, PlanError, load_slab, make_plan
from plan_variants import E, L, dist, mixtral_dirs, vs  # noqa: F401 (fixtures)


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
    """>= 200 mutated plans (hypothesis; the mutator is multimoe_rt.plan.mutate, shared with the reliability bench):
    each is refused with PlanError, or loads a slab that serves every (variant, layer, expert) its own weights,
    or the anchor's where the plan says shared."""
    from hypothesis import HealthCheck, given, settings

    from multimoe_rt.errors import MultimoeError
    from multimoe_rt.plan.mutate import mutants, wrong_entries

    tmp = tmp_path_factory.mktemp("fuzz")
    make_plan(vs, share=0.5, distances=dist).to_json(tmp / "base.json")
    outcomes = {"refused": 0, "loaded": 0}

    @settings(max_examples=int(os.environ.get("MULTIMOE_FUZZ_EXAMPLES", 220)), deadline=None,
              suppress_health_check=list(HealthCheck), database=None,
              derandomize=not os.environ.get("MULTIMOE_FUZZ_EXAMPLES"))  # CI: the same cases every run
    @given(mutants((tmp / "base.json").read_text()))
    def one(mutant):
        kind, raw = mutant
        f = tmp / "fuzz.json"
        f.write_text(raw)
        try:
            plan = Plan.from_json(f, variant_set=vs)
            slab, table = load_slab(plan, vs)
        except PlanError:
            outcomes["refused"] += 1
            return
        except MultimoeError as exc:  # another of our own classes would do, but none is expected here
            raise AssertionError(f"{kind}: unexpected {type(exc).__name__}: {exc}") from exc
        outcomes["loaded"] += 1
        assert wrong_entries(plan, vs, slab, table) == [], kind

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


def test_the_fuzz_check_sees_an_entry_that_reads_another_experts_slot(vs, dist):
    """wrong_entries (the fuzz tests' judge, multimoe_rt.plan.mutate) must catch what it is there to catch."""
    from multimoe_rt.plan.mutate import wrong_entries

    plan = make_plan(vs, share=0.0, distances=dist)
    slab, table = load_slab(plan, vs)
    assert wrong_entries(plan, vs, slab, table) == []
    a = vs.names.index("a")
    assert plan.status[a][0][1] == plan.status[a][1][2] == "own"
    table.slots[a, 0, 1] = table.slots[a, 1, 2].clone()
    assert wrong_entries(plan, vs, slab, table) == [(a, 0, 1, "own")]
