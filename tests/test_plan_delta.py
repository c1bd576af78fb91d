"""Plans with compressed deltas and the measured-loss criterion, end to end on tiny random variants.

Checks: the measured cost of sharing one expert equals the loss of a transformers model with that expert
swapped (float64 sums, fp32 models: |diff| <= 1e-6 nats); the loss metric shares the cheapest entries; the
mixed plan's knapsack against brute force; byte accounting (plan = slab = budget); JSON round trip and the
format-1 read; load_slab + the served model against a transformers model holding the effective weights
(base + decoded delta), Mixtral and Switch (logits rel err <= 1e-5 in fp32); errors for bad plans and NaN deltas.
"""
from __future__ import annotations

import itertools
import json
import random

import pytest
import torch

from multimoe_rt import criterion
from multimoe_rt.checkpoint import VariantSet
from multimoe_rt.errors import PlanError
from multimoe_rt.model import MultiVariantModel
from multimoe_rt.plan import Plan, compute_distances, heatmap, load_slab, make_plan
from multimoe_rt.plan.mixed import DEFAULT_CODECS, choose
from tiny_models import MIXTRAL, rel_err, save_variants

CODECS = ("sign1", "lowrank4", "int4", "lowrank2+sign1")


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory):
    torch.set_num_threads(1)
    dirs = save_variants(tmp_path_factory.mktemp("mix"), "mixtral", n=3)
    vs = VariantSet.from_dirs(dirs, names=["base", "v1", "v2"])
    g = torch.Generator().manual_seed(0)
    batches = {n: criterion.lm_batches(torch.randint(0, MIXTRAL["vocab_size"], (96,), generator=g), 16, 96, 4)
               for n in vs.names}
    dist = compute_distances(vs)
    costs = criterion.measure_costs(vs, batches, codecs=CODECS, distances=dist)
    return vs, dist, costs, batches


@pytest.fixture(scope="module")
def switch(tmp_path_factory):
    dirs = save_variants(tmp_path_factory.mktemp("sw"), "switch", n=3)
    return VariantSet.from_dirs(dirs, names=["base", "v1", "v2"])


def _effective_model(mvm, v: int):
    """A transformers model of variant v whose experts hold exactly what the slab serves (fp32)."""
    from multimoe_rt.model import MODEL_CLASSES

    vs, slab, table = mvm.variant_set, mvm.slab, mvm.table
    model = MODEL_CLASSES[vs.family][1].from_pretrained(str(vs[v].path), dtype=torch.float32).eval()
    with torch.no_grad():
        for l, prefix in enumerate(vs.moe_layers):
            experts = model.get_submodule(prefix).experts
            for e in range(vs.num_experts):
                i = int(table.slots[v, l, e])
                if slab.deltas is not None:
                    w1, w2 = slab.deltas.effective(slab.w1, slab.w2, i, torch.float32)
                else:
                    w1, w2 = slab.w1[i], slab.w2[i]
                if vs.family == "mixtral":
                    experts.gate_up_proj[e].copy_(w1)
                    experts.down_proj[e].copy_(w2)
                else:
                    experts[f"expert_{e}"].wi.weight.copy_(w1)
                    experts[f"expert_{e}"].wo.weight.copy_(w2)
    return model


# ---------------------------------------------------------------- the criterion


def test_share_cost_is_the_loss_with_that_expert_swapped(mixtral):
    vs, dist, costs, batches = mixtral
    from multimoe_rt.model import MODEL_CLASSES

    v, l, e = next((v, l, e) for v in (1, 2) for l in range(vs.num_layers) for e in range(vs.num_experts)
                   if not dist.duplicate[v][l][e])
    model = MODEL_CLASSES["mixtral"][1].from_pretrained(str(vs[v].path), dtype=torch.float32).eval()
    own, _ = criterion.mean_nll(model, batches[vs.names[v]])
    assert abs(own - costs.base_nll[v]) <= 1e-6
    b1, b2 = vs[0].expert(l, e)
    with torch.no_grad():
        model.model.layers[l].mlp.experts.gate_up_proj[e].copy_(b1)
        model.model.layers[l].mlp.experts.down_proj[e].copy_(b2)
    swapped, n = criterion.mean_nll(model, batches[vs.names[v]])
    assert n == costs.tokens[v]
    assert abs((swapped - own) - costs.loss[v][l][e]["share"]) <= 1e-6
    assert costs.options == ["share", "sign1", "lowrank4", "int4", "lowrank2+sign1"]
    for vv in range(3):
        for ll in range(vs.num_layers):
            for ee in range(vs.num_experts):
                measured = costs.loss[vv][ll][ee] is not None
                assert measured == (vv != 0 and not dist.duplicate[vv][ll][ee])


def test_loss_metric_shares_the_cheapest(mixtral):
    vs, dist, costs, _ = mixtral
    plan = make_plan(vs, share=0.5, metric="loss", costs=costs, distances=dist)
    shared = [costs.loss[v][l][e]["share"] for v in range(3) for l in range(vs.num_layers)
              for e in range(vs.num_experts) if plan.status[v][l][e] == "shared"]
    own = [costs.loss[v][l][e]["share"] for v in range(3) for l in range(vs.num_layers)
           for e in range(vs.num_experts) if plan.status[v][l][e] == "own"]
    assert shared and own and max(shared) <= min(own)
    assert plan.entry_cost is not None and plan.costs["options"] == costs.options
    with pytest.raises(PlanError, match="needs costs"):
        make_plan(vs, share=0.5, metric="loss", distances=dist)


# ---------------------------------------------------------------- the knapsack


def test_choose_matches_brute_force():
    rng = random.Random(0)
    for trial in range(60):
        units = []
        for _ in range(rng.randint(1, 4)):
            opts = [(0, rng.uniform(0.2, 1.0), "share")]
            for j in range(rng.randint(1, 3)):
                opts.append((rng.randint(1, 6), rng.uniform(0.0, 0.8), f"c{j}"))
            opts.append((8, 0.0, "dense"))
            units.append(opts)
        budget = rng.randint(0, 8 * len(units))
        picks = choose(units, budget)
        spent = sum(u[j][0] for u, j in zip(units, picks))
        assert spent <= budget
        got = sum(u[j][1] for u, j in zip(units, picks))
        best = min(sum(u[j][1] for u, j in zip(units, combo)) for combo in itertools.product(*[range(len(u)) for u in units])
                   if sum(u[j][0] for u, j in zip(units, combo)) <= budget)
        # greedy on convex hulls: optimal up to one partly-fitting step; on these sizes within 0.8 of the best
        assert got <= best + 0.8, (trial, got, best)


# ---------------------------------------------------------------- plans with deltas


def _sep(vs):
    from multimoe_rt.plan import non_expert_nbytes

    ne = len(vs) * non_expert_nbytes(vs[0])
    return len(vs) * vs.num_layers * vs.num_experts * vs[0].expert_nbytes + ne, ne


def test_mixed_plan_bytes_and_monotone(mixtral, tmp_path):
    vs, dist, costs, _ = mixtral
    sep, ne = _sep(vs)
    prev = None
    for ratio in (0.53, 0.6, 0.75, 1.0):  # all shared needs 0.505 of the bytes here
        plan = make_plan(vs, budget_bytes=int(ratio * sep), codecs=CODECS, costs=costs, metric="loss",
                         non_expert_bytes=ne, distances=dist)
        assert plan.device_bytes <= int(ratio * sep)
        slab, _ = load_slab(plan, vs)
        assert slab.nbytes == plan.expert_bytes
        pred = sum(plan.predicted_loss())
        if prev is not None:
            assert pred <= prev + 1e-12
        prev = pred
        statuses = {s for var in plan.status for row in var for s in row}
        assert statuses <= {"anchor", "duplicate", "shared", "own", "delta"}
    assert plan.deltas or any(s == "own" for var in plan.status for row in var for s in row)
    path = tmp_path / "mixed.json"
    plan.to_json(path)
    doc = json.loads(path.read_text())
    assert doc["format"] == 2 and doc["summary"]["delta_bytes"] == plan.delta_bytes
    assert Plan.from_json(path, vs) == plan
    heatmap(plan, tmp_path / "mixed.png")
    assert (tmp_path / "mixed.png").stat().st_size > 0
    with pytest.raises(PlanError, match="budget"):
        make_plan(vs, budget_bytes=int(0.05 * sep), codecs=CODECS, costs=costs, metric="loss", non_expert_bytes=ne,
                  distances=dist)


@pytest.mark.parametrize("spec", ["sign1", "lowrank3", "int4", "lowrank2+sign1"])
def test_uniform_delta_served_exactly_mixtral(mixtral, spec):
    vs, dist, _, _ = mixtral
    plan = make_plan(vs, share=1.0, delta=spec, distances=dist, dtype=torch.float32)
    assert plan.deltas and all(d["spec"] == spec for d in plan.deltas)
    assert {plan.status[v][l][e] for v in (1, 2) for l in range(vs.num_layers) for e in range(vs.num_experts)} \
        <= {"delta", "duplicate"}
    assert plan.sharing_fraction() == 0.0 and plan.delta_fraction() == 1.0
    mvm = MultiVariantModel(vs, plan, dtype=torch.float32)
    ids = torch.randint(0, MIXTRAL["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(1))
    for v in (1, 2):
        ref = _effective_model(mvm, v)(input_ids=ids).logits
        out = mvm.forward(vs.names[v], ids)
        assert rel_err(out, ref) <= 1e-5
    # the delta brings the served expert closer to the variant's own than sharing the base's would
    d = plan.deltas[0]
    w1, w2 = vs[d["variants"][0]].expert(d["layer"], d["expert"])
    i = plan.slots[d["variants"][0]][d["layer"]][d["expert"]]
    e1, _ = mvm.slab.deltas.effective(mvm.slab.w1, mvm.slab.w2, i, torch.float32)
    assert (e1 - w1).norm() < (mvm.slab.w1[d["base"]] - w1).norm()


def test_uniform_delta_served_exactly_switch(switch):
    vs = switch
    plan = make_plan(vs, share=0.5, delta="lowrank4+sign1", dtype=torch.float32)
    assert {"own", "delta"} <= {s for var in plan.status for row in var for s in row}
    mvm = MultiVariantModel(vs, plan, dtype=torch.float32)
    g = torch.Generator().manual_seed(2)
    enc = torch.randint(2, 60, (2, 10), generator=g)
    dec = torch.randint(2, 60, (2, 6), generator=g)
    for v in (1, 2):
        ref = _effective_model(mvm, v)(input_ids=enc, decoder_input_ids=dec).logits
        assert rel_err(mvm.forward(vs.names[v], enc, decoder_input_ids=dec), ref) <= 1e-5


def test_format_1_plans_still_read(mixtral, tmp_path):
    vs, dist, _, _ = mixtral
    plan = make_plan(vs, share=0.5, distances=dist)
    path = tmp_path / "p.json"
    plan.to_json(path)
    doc = json.loads(path.read_text())
    for k in ("deltas", "choice", "entry_cost", "costs"):
        doc.pop(k)
    doc["format"] = 1
    path.write_text(json.dumps(doc))
    again = Plan.from_json(path, vs)
    assert again.slots == plan.slots and again.deltas == []


def test_tampered_delta_plans_refused(mixtral, tmp_path):
    vs, dist, _, _ = mixtral
    plan = make_plan(vs, share=1.0, delta="sign1", distances=dist)
    path = tmp_path / "p.json"
    plan.to_json(path)
    for edit, match in ((lambda d: d["deltas"][0].update(spec="sign2"), "spec"),
                        (lambda d: d["deltas"][0].update(spec="sign1+lowrank2"), "canonical"),
                        (lambda d: d["deltas"][0].update(layer=1 - d["deltas"][0]["layer"]), "delta"),
                        (lambda d: d["deltas"].pop(), "slots")):
        doc = json.loads(path.read_text())
        edit(doc)
        bad = tmp_path / "bad.json"
        bad.write_text(json.dumps(doc))
        with pytest.raises(PlanError, match=match):
            Plan.from_json(bad, vs)


def test_bad_requests(mixtral):
    vs, dist, costs, _ = mixtral
    with pytest.raises(PlanError, match="offload"):
        make_plan(vs, share=1.0, delta="sign1", offload=True, budget_bytes=10**9, distances=dist)
    with pytest.raises(PlanError, match="costs"):
        make_plan(vs, budget_bytes=10**9, codecs=["sign1"], distances=dist)
    with pytest.raises(PlanError, match="sign7"):
        make_plan(vs, share=1.0, delta="sign7", distances=dist)
    with pytest.raises(PlanError, match="no measurements"):
        make_plan(vs, budget_bytes=10**9, codecs=["lowrank64"], costs=costs, metric="loss", distances=dist)
    with pytest.raises(PlanError, match="representative"):
        make_plan(vs, budget_bytes=10**9, codecs=["sign1"], costs=costs, metric="loss", distances=dist,
                  representative="mean")
    assert set(DEFAULT_CODECS) >= {"sign1", "lowrank8", "int4"}


def test_nan_in_a_delta_source_raises(tmp_path):
    from multimoe_rt.errors import MultimoeError

    dirs = save_variants(tmp_path, "mixtral", n=2)
    from safetensors.torch import load_file, save_file

    f = dirs[1] / "model.safetensors"
    sd = load_file(f)
    name = next(k for k in sd if "experts" in k and ("gate_up_proj" in k or k.endswith("w1.weight")))
    sd[name].view(-1)[0] = float("nan")
    save_file(sd, f, metadata={"format": "pt"})
    vs = VariantSet.from_dirs(dirs, names=["base", "bad"], check_finite=False)
    dist = compute_distances(vs)
    with pytest.raises(MultimoeError, match="cosine"):  # ranking by a NaN distance is refused
        make_plan(vs, share=1.0, delta="sign1", distances=dist, metric="cosine")
    plan = make_plan(vs, share=1.0, delta="sign1", distances=dist, metric="random")
    with pytest.raises(PlanError, match="non-finite"):  # the delta of the NaN expert
        load_slab(plan, vs)


def test_cli_plan_with_codecs_and_costs(mixtral, tmp_path):
    """`multimoe-rt plan --codecs ... --costs PLAN.json` reuses the measured costs of an earlier plan."""
    from multimoe_rt.cli import main

    vs, dist, costs, _ = mixtral
    sep, ne = _sep(vs)
    first = make_plan(vs, budget_bytes=int(0.7 * sep), codecs=CODECS, costs=costs, metric="loss",
                      non_expert_bytes=ne, distances=dist)
    first.to_json(tmp_path / "first.json")
    dirs = [str(v.path) for v in vs]
    rc = main(["plan", *dirs, "--names", "base,v1,v2", "--budget", str(int(0.7 * sep)), "--non-expert", str(ne),
               "--codecs", ",".join(CODECS), "--costs", str(tmp_path / "first.json"), "-o", str(tmp_path / "p.json"),
               "--quiet"])
    assert rc == 0
    again = Plan.from_json(tmp_path / "p.json", vs)
    assert again.slots == first.slots and again.deltas == first.deltas and again.entry_cost == first.entry_cost
    text = tmp_path / "t.txt"
    text.write_text("x")
    # --codecs needs --budget: a usage error (exit 2) before any measurement
    assert main(["plan", *dirs, "--codecs", "sign1", "--calib-text", f"v1={text}", "-o", str(tmp_path / "q.json")]) == 2


def test_room_for_every_own_copy_gives_the_exact_plan():
    """A generous budget must not approximate an expert because its measured cost came out at or below zero
    (calibration noise): every unit dense. Under a tight budget the costs still decide."""
    from multimoe_rt.plan.mixed import choose

    units = [[(0, -0.01, "share"), (3, -0.02, "sign1"), (10, 0.0, "dense")],
             [(0, 0.5, "share"), (3, 0.1, "sign1"), (10, 0.0, "dense")]]
    assert choose(units, budget=1000) == [2, 2]
    assert choose(units, budget=20) == [2, 2]
    assert choose(units, budget=3) == [0, 1]
