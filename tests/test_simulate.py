"""The QoS simulator (multimoe_rt.benchmarks.sim_*): cost model (roofline, copy time, memory fit), the simulators, and a small validation run."""

import json
import math
from dataclasses import replace

import pytest

from multimoe_rt.benchmarks import sim_model, sim_systems, sim_validate

A100, H200 = sim_model.HARDWARE["a100-80gb-pcie"], sim_model.HARDWARE["h200"]
MIX, QWEN = sim_model.MODELS["mixtral-8x7b"], sim_model.MODELS["qwen3-30b-a3b"]


def test_model_sizes_match_published_parameter_counts():
    total = lambda m: m.non_expert_params + m.total_slots * m.expert_params  # noqa: E731
    assert total(MIX) == pytest.approx(46.7e9, rel=0.01)      # Mixtral-8x7B: 46.7 B
    assert total(QWEN) == pytest.approx(30.5e9, rel=0.01)     # Qwen3-30B-A3B: 30.5 B
    assert MIX.active_params == pytest.approx(12.9e9, rel=0.02)   # 12.9 B active
    assert MIX.non_expert_bytes == pytest.approx(3.2e9, rel=0.05)  # the "about 3 GB"


def test_roofline_decode_is_bandwidth_bound_and_prefill_sees_more_experts():
    cost = sim_model.Roofline(H200, MIX, "resident", 1)
    bytes_ = MIX.non_expert_bytes + MIX.layers * sim_model.distinct_touched(8, 2, 1) * MIX.expert_bytes \
        + 21 * MIX.kv_bytes_per_token
    expect = bytes_ / (H200.bandwidth * H200.bw_eff) + H200.step_overhead
    assert cost.step({0: 1}, [21]) == pytest.approx(expect, rel=1e-9)
    assert sim_model.distinct_touched(8, 2, 1) == pytest.approx(2.0)
    assert sim_model.distinct_touched(8, 2, 20) == pytest.approx(8 * (1 - 0.75 ** 20))
    assert cost.step({0: 20}, [20]) > 2 * cost.step({0: 1}, [21])    # a prompt touches ~all experts
    # compute-bound at a large batch: time grows with tokens
    assert cost.step({0: 4096}, [1] * 4096) > cost.step({0: 2048}, [1] * 2048) * 1.5


def test_copy_time_and_switch_bytes():
    ours = sim_model.Roofline(A100, MIX, "ours", 2)
    assert ours.copy_time(25e9) == pytest.approx(1.0)
    assert ours.switch_blocking() == pytest.approx(MIX.non_expert_bytes / A100.link)
    assert ours.switch_after_prefetch(10.0) == 0.0
    assert ours.switch_after_prefetch(0.05) == pytest.approx(ours.switch_blocking() - 0.05)
    swap = sim_model.Roofline(A100, MIX, "swap", 2)
    assert swap.switch_blocking() > 10 * ours.switch_blocking()      # whole model vs non-expert set


def test_memory_fit():
    # one bf16 Mixtral (93 GB) does not fit an 80 GB A100; ours shares everything and still offloads
    m = sim_model.plan_memory("ours", MIX, A100.mem_bytes, 2, reserve=4e9, kv=0)
    assert m.share == 1.0 and not m.fits and 0.1 < m.miss < 0.4
    # on an H200 ours fits 2 variants by keeping some private experts (Algorithm 1: share only what is needed)
    m = sim_model.plan_memory("ours", MIX, H200.mem_bytes, 2, reserve=4e9, kv=0)
    assert m.fits and 0.0 < m.share < 1.0 and m.miss == 0.0
    # MIG: half of an H200 holds ~70% of one Mixtral
    part = sim_model.Roofline(H200, MIX, "partitioned", 2, fraction=0.5)
    assert 0.2 < part.mem.miss < 0.4
    # tiny model: everything fits everywhere
    assert sim_model.plan_memory("resident", sim_model.MODELS["mixtral-tiny"], 1e9, 4, reserve=0, kv=0).miss == 0.0
    with pytest.raises(ValueError):
        sim_model.plan_memory("nope", MIX, 1e9, 2, reserve=0, kv=0)


def _cal(p=0.01, d=0.001, **kw):
    return sim_model.Calibrated(prefill_s=p, decode_s=d, **kw)


def test_serial_queueing_by_hand():
    cost = _cal()   # service = 0.01 + 24 * 0.001 = 0.034 s
    trace = [sim_model.Req(0.0, 0), sim_model.Req(0.01, 0), sim_model.Req(1.0, 0)]
    out = sim_systems.simulate_serial(trace, cost, switching=False, prefetch=False)
    # turnarounds: 0.034, (0.068 - 0.01) = 0.058, 0.034
    assert out["turnaround_mean"] == pytest.approx((0.034 + 0.058 + 0.034) / 3)
    assert out["ttft_mean"] == pytest.approx((0.01 + (0.034 + 0.01 - 0.01) + 0.01) / 3)


def test_prefetch_hides_switch_and_affinity_reorders():
    gpu = sim_model.Roofline(A100, MIX, "ours", 2)
    trace = [sim_model.Req(0.0, 0), sim_model.Req(0.1, 1)]
    pre = sim_systems.simulate_serial(trace, gpu, switching=True, prefetch=True)
    block = sim_systems.simulate_serial(trace, gpu, switching=True, prefetch=False)
    assert pre["switches"] == block["switches"] == 1
    assert block["turnaround_mean"] - pre["turnaround_mean"] == pytest.approx(gpu.switch_blocking() / 2, rel=1e-6)
    # affinity serves the queued request of the active variant first
    cost = _cal(switch_block_s=0.5, switch_prefetched_s=0.5)
    trace = [sim_model.Req(0.0, 0), sim_model.Req(0.001, 1), sim_model.Req(0.002, 0)]
    fcfs = sim_systems.simulate_serial(trace, cost, switching=True, prefetch=False)
    aff = sim_systems.simulate_serial(trace, cost, switching=True, prefetch=False, policy="affinity", max_wait=10)
    assert fcfs["switches"] == 2 and aff["switches"] == 1
    assert aff["turnaround_mean"] < fcfs["turnaround_mean"]


def test_lanes_processor_sharing():
    cost = _cal(lane_slowdown=(1.0, 2.0))
    both = sim_systems.simulate_lanes([sim_model.Req(0.0, 0), sim_model.Req(0.0, 1)], lambda lane: cost, 2)
    assert both["turnaround_mean"] == pytest.approx(0.068)       # two at half speed
    alone = sim_systems.simulate_lanes([sim_model.Req(0.0, 0), sim_model.Req(5.0, 1)], lambda lane: cost, 2)
    assert alone["turnaround_mean"] == pytest.approx(0.034)
    same_lane = sim_systems.simulate_lanes([sim_model.Req(0.0, 0), sim_model.Req(0.0, 0)], lambda lane: cost, 2)
    assert same_lane["turnaround_mean"] == pytest.approx((0.034 + 0.068) / 2)


def test_batching_beats_batch1_at_load_and_counts_copies():
    trace = sim_model.poisson_trace(8.0, 120, 8, seed=1)
    b = sim_systems.simulate_system("batching", trace, H200, QWEN, 8, resident_sets=4)
    o = sim_systems.simulate_system("ours", trace, H200, QWEN, 8)
    assert b["completed"] == o["completed"] == 120
    assert b["turnaround_mean"] < o["turnaround_mean"]
    assert b["switches"] >= 4                               # cold start + LRU misses of 8 variants over 4 sets
    all_res = sim_systems.simulate_system("batching", trace, H200, QWEN, 8, resident_sets=8)
    assert all_res["switches"] == 8 and all_res["turnaround_mean"] <= b["turnaround_mean"] * 1.01


def test_paper_headline_direction():
    """2 x Mixtral-8x7B on an A100, λ well below every system's capacity: ours beats MIG by a wide margin."""
    trace = sim_model.poisson_trace(0.02, 60, 2, seed=0)
    ours = sim_systems.simulate_system("ours", trace, A100, MIX, 2)
    mig = sim_systems.simulate_system("partitioned", trace, A100, MIX, 2)
    assert 0.6 < 1 - ours["turnaround_mean"] / mig["turnaround_mean"] < 0.99


def test_serve_qos_trace_is_replayed_exactly():
    a = sim_model.serve_qos_trace(5.0, 10, 4, 0, 10)
    b = sim_model.serve_qos_trace(5.0, 10, 4, 0, 10)
    assert [(r.arrival, r.variant) for r in a] == [(r.arrival, r.variant) for r in b]
    assert all(0 <= r.variant < 4 for r in a) and a[-1].arrival > a[0].arrival
    with pytest.raises(ValueError):
        sim_model.poisson_trace(0.0, 3, 2)


def test_small_validation_run(tmp_path):
    """Calibrate on the real engine (tiny random variants), replay one trace, simulate it, compare.

    Runs the whole validation path; the accuracy itself is the bench's claim (bench/results/simulate_validation_*):
    wall-clock turnaround inside a test process that shares the machine is not a measurement (the ratio
    simulated/measured was seen anywhere from 0.25 to 1.1 here), so no accuracy bound is asserted."""
    pytest.importorskip("transformers")
    from tiny_models import save_variants

    dirs = {f"v{i}": p for i, p in enumerate(save_variants(tmp_path, "mixtral", n=2))}
    out = sim_validate.measure_and_simulate(dirs, rates=[5.0], n=12, reps=3, systems=["ours", "resident"], out_tokens=8)
    assert {r["system"] for r in out["rows"]} == {"ours", "ours+affinity", "resident"}
    for r in out["rows"]:
        assert not math.isnan(r["err_mean"])
        assert r["simulated"]["turnaround_mean"] > 0 and r["measured"]["turnaround_mean"] > 0, r
        sim_mean, meas_mean = r["simulated"]["turnaround_mean"], r["measured"]["turnaround_mean"]
        assert r["err_mean"] == pytest.approx(sim_mean / meas_mean - 1, rel=1e-6, abs=1e-6), r


def _synthetic_batching(tmp_path, a=0.002, b=2e-5, c=5e-4, slow=1.0):
    """A tiny bench/batching.py-format file whose 'measurements' come from the engine simulator itself with a
    known step model (Poisson rows scaled by ``slow``)."""
    names, step = ["x", "y", "z"], sim_validate.linear_step(a, b, c)
    shapes = {}
    for shape, (p, o) in {"paper": (20, 6), "long": (60, 8)}.items():
        sat, sweep = {}, []
        tr = sim_validate.batching_trace(names, None, 12, p, o, 0)
        for system in ("mixed", "one_variant", "batch1"):
            t = [replace(r, variant=0) for r in tr] if system == "one_variant" else tr
            s = sim_validate.simulate_batch1(t, a * o + b * (p + o)) if system == "batch1" else \
                sim_validate.simulate_engine(t, step, max_seqs=8)
            sat[system] = {"requests": 12, "wall_s": s["duration_s"], "tokens_per_s": s["tokens_per_s"]}
        for li, rate in enumerate((20.0, 80.0)):
            s = sim_validate.simulate_engine(sim_validate.batching_trace(names, rate, 10, p, o, 1 + li), step, max_seqs=8)
            sweep.append({"system": "mixed", "rate": rate, "requests": 10, "ttft_mean": s["ttft_mean"],
                          "turnaround_mean": slow * s["turnaround_mean"], "turnaround_p99": slow * s["turnaround_p99"]})
        shapes[shape] = {"prompt_len": p, "new_tokens": o, "saturated": sat, "sweep": sweep}
    d = {"variants": names, "max_seqs": 8, "shapes": shapes, "device_bytes": {}, "machine": {}}
    path = tmp_path / "batching-synth.json"
    path.write_text(json.dumps(d))
    return path


def test_validate_batching_recovers_a_known_step_model(tmp_path):
    res = sim_validate.validate_batching([_synthetic_batching(tmp_path)])
    cal = res["files"][0]["calibration"]
    assert cal["a_step_s"] == pytest.approx(0.002, rel=0.05) and cal["b_token_s"] == pytest.approx(2e-5, rel=0.1)
    assert cal["c_variant_s"] == pytest.approx(5e-4, rel=0.1)
    rows = res["rows"]
    assert len(rows) == 4 and {r["system"] for r in rows} == {"mixed"}
    assert all(abs(r["err_mean"]) < 0.02 and abs(r["err_p99"]) < 0.02 for r in rows)
    assert "mixed" in sim_validate.batching_validation_table(rows)


def test_validate_batching_reports_a_mismatch(tmp_path):
    # the Poisson rows are not used for calibration: measurements 50% slower show up as about -33% error
    res = sim_validate.validate_batching([_synthetic_batching(tmp_path, slow=1.5)])
    assert all(r["err_mean"] == pytest.approx(-1 / 3, abs=0.02) for r in res["rows"])


def test_deepseek_and_gpt_oss_presets_match_published_sizes():
    oss, moon = sim_model.MODELS["gpt-oss-20b"], sim_model.MODELS["moonlight-16b-a3b"]
    total = lambda m: m.non_expert_params + m.total_slots * m.expert_params  # noqa: E731
    assert total(oss) == pytest.approx(20.9e9, rel=0.01) and oss.active_params == pytest.approx(3.6e9, rel=0.02)
    assert total(moon) == pytest.approx(16.0e9, rel=0.01)
    assert moon.total_slots == 26 * 64                                     # the first layer is dense
    # MLA caches one compressed latent (+ the shared rope key) per token and layer, not keys and values per head
    assert moon.kv_bytes_per_token == 27 * (512 + 64) * 2
    assert moon.kv_bytes(300) == pytest.approx(300 * moon.kv_bytes_per_token)
    # GPT-OSS: half the layers hold at most 128 positions
    per_layer_token = 2 * 8 * 64 * 2
    assert oss.kv_bytes(100) == pytest.approx(100 * 24 * per_layer_token)
    assert oss.kv_bytes(4096) == pytest.approx((12 * 4096 + 12 * 128) * per_layer_token)


@pytest.mark.parametrize("name", ["gpt-oss-20b", "moonlight-16b-a3b"])
def test_the_simulator_serves_both_new_families(name):
    model, trace = sim_model.MODELS[name], sim_model.poisson_trace(4.0, 60, 4, seed=2)
    for system in ("batching", "ours", "partitioned", "swap", "resident"):
        out = sim_systems.simulate_system(system, trace, H200, model, 4, resident_sets=2)
        assert out["completed"] == 60 and out["turnaround_mean"] > 0, system
    # a long context costs more, and less with GPT-OSS's windows than it would with every layer full
    cost = sim_model.Roofline(H200, model, "resident", 1)
    assert cost.step({0: 1}, [8000]) > cost.step({0: 1}, [10])
    full = sim_model.Roofline(H200, replace(model, sliding_layers=0), "resident", 1)
    assert (cost.step({0: 1}, [8000]) < full.step({0: 1}, [8000])) == (model.sliding_layers > 0)


def test_the_batch1_system_runs_the_runtime_scheduler_with_look_ahead():
    """ours = the Scheduler with max_seqs=1, prefetch=1: the copy of the next request's set overlaps the running
    request, as the hand-written batch-1 model (copy started at the next arrival) says, to within one step."""
    gpu = sim_model.Roofline(A100, MIX, "ours", 2)
    trace = [sim_model.Req(0.0, 0), sim_model.Req(0.1, 1)]
    sched = sim_systems.simulate_runtime_batch1(trace, gpu)
    hand = sim_systems.simulate_serial(trace, gpu, switching=True, prefetch=True)
    decode = gpu.step({0: 1}, [30])
    assert sched["switches"] == 1
    assert sched["turnaround_mean"] == pytest.approx(hand["turnaround_mean"], abs=decode)
    # with nothing to look ahead at (one request at a time) the copy is paid in full
    alone = [sim_model.Req(0.0, 0), sim_model.Req(100.0, 1)]
    service = gpu.service(sim_model.Req(0.0, 0))[1]
    assert sim_systems.simulate_runtime_batch1(alone, gpu)["turnaround_mean"] == \
        pytest.approx(service + gpu.switch_blocking() / 2, rel=1e-6)


def test_batching_chunks_a_prompt_longer_than_the_step_budget():
    trace = [sim_model.Req(0.0, 0, prompt=300, out=3), sim_model.Req(0.0, 1, prompt=5, out=3)]
    stats = {}
    out = sim_systems.simulate_scheduler(trace, sim_systems.Scheduler(128, 8), lambda w: 0.01, num_sets=2,
                                         copy_time=0.0, preloaded=[0, 1], stats=stats)
    assert out["completed"] == 2
    assert stats["steps"] == 3 + 2 and stats["tokens"] == 300 + 5 + 2 * 2   # 128 + 128 + 49 prompt, 2 decodes
