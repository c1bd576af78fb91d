"""The batch-1 QoS experiment (multimoe_rt/lab/qos, benchmarks/qos.py): "ours" is the runtime engine at
max_seqs=1, whose outputs equal direct generate calls under any interleaving and whose request rules
(validation, burst, cancellation, shutdown) hold at batch 1; the lane driver feeds the baselines, which agree with
ours; metrics come from timestamps.

Request rules of engine.Engine already asserted in tests/test_engine.py and not repeated here: bad requests
(unknown variant, empty prompt, text prompt refused as "token ids", context, ranges) in
test_bad_requests_are_rejected_at_submission; EOS and ignore_eos in test_stream_iterator_async_and_stop_sequences
and test_eos_as_transformers_does_it; a request failing mid-run fails alone in
tests/test_engine_faults.py::test_forward_failure_fails_only_the_sequence_that_causes_it."""

import json
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from multimoe_rt.checkpoint import VariantSet
from multimoe_rt.engine import Engine
from multimoe_rt.errors import EngineClosed, RequestError
from multimoe_rt.lab.qos.lanes import LaneDriver, Request
from multimoe_rt.lab.qos.metrics import summarize
from multimoe_rt.lab.qos.systems import PartitionedSystem, ResidentSystem, SwapSystem
from multimoe_rt.model import MultiVariantModel
from multimoe_rt.sampling import SamplingParams
from tiny_models import save_variants

NEW = 5  # new tokens per request: enough to exercise the KV-cache decode path, small for speed


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    return save_variants(tmp_path_factory.mktemp("qos"), "mixtral", n=3)


@pytest.fixture(scope="module")
def mv(dirs):
    return MultiVariantModel.from_pretrained(dirs, share=0.0)


def batch1(dirs, **kw):
    """Ours in the QoS experiment: the runtime engine, one sequence at a time, two non-expert sets with look-ahead."""
    return Engine.from_pretrained(dirs, resident_sets=2, max_seqs=1, max_len=64, prefetch=1, **kw)


@pytest.fixture(scope="module")
def ours(dirs):
    eng = batch1(dirs)
    yield eng
    eng.shutdown()


def prompts(n, seed=0):
    rng = random.Random(seed)
    return [[rng.randrange(3, 64) for _ in range(rng.randrange(3, 12))] for _ in range(n)]


def direct(mv, variant, ids):
    """transformers' greedy generate, stopping at the checkpoint's EOS (the engine's default)."""
    eos = list(mv.variant_set[0].eos_token_ids) or None
    return mv.generate(variant, torch.tensor([ids]), max_new_tokens=NEW, eos_token_id=eos).reshape(-1).tolist()


def new_threads(before):
    return [t for t in threading.enumerate() if t not in before and t.is_alive()]


@pytest.mark.parametrize("group_variants", [False, True])
def test_outputs_equal_direct_generate_under_concurrent_interleaving(dirs, mv, group_variants):
    names = mv.names
    work = [(names[i % len(names)], p) for i, p in enumerate(prompts(18))]
    random.Random(1).shuffle(work)
    expected = [direct(mv, v, p) for v, p in work]
    before = set(threading.enumerate())
    engine = batch1(dirs, group_variants=group_variants)
    handles = [None] * len(work)

    def client(k):  # 3 client threads, each submitting every third request with jitter
        rng = random.Random(k)
        for i in range(k, len(work), 3):
            time.sleep(rng.random() * 0.003)
            handles[i] = engine.submit(work[i][0], work[i][1], max_new_tokens=NEW)

    clients = [threading.Thread(target=client, args=(k,)) for k in range(3)]
    for c in clients:
        c.start()
    for c in clients:
        c.join()
    got = [h.result(timeout=60) for h in handles]
    engine.shutdown()
    assert [h.tokens for h in got] == expected
    for h in got:
        assert h.arrival <= h.admitted <= h.first_token <= h.finish
    assert engine.weights.stats["loads"] >= 3   # 3 variants through 2 sets: it reconfigured
    assert not new_threads(before)


def test_metrics_from_a_synthetic_trace():
    def req(a, s, f1, f):
        r = Request(0, "v", 0, [1], SamplingParams(), ())
        r.arrival, r.admitted, r.first_token, r.finish = a, s, f1, f
        return r

    rs = [req(0.0, 0.0, 0.1, 1.0), req(0.5, 1.0, 1.2, 2.0), req(1.0, 2.0, 2.4, 3.0), req(1.5, 3.0, 3.8, 4.0)]
    bad = req(2.0, 4.0, None, 4.1)
    bad.error = RuntimeError("x")
    m = summarize(rs + [bad])
    # ttft: 0.1, 0.7, 1.4, 2.3; turnaround: 1.0, 1.5, 2.0, 2.5; waits 0, .5, 1, 1.5
    assert m["completed"] == 4 and m["failed"] == 1 and m["requests"] == 5
    assert m["ttft_mean"] == pytest.approx(1.125)
    assert m["ttft_p50"] == pytest.approx(1.05)
    assert m["ttft_p99"] == pytest.approx(1.4 + 0.97 * 0.9)  # linear: rank 0.99*3 = 2.97
    assert m["turnaround_mean"] == pytest.approx(1.75)
    assert m["turnaround_p99"] == pytest.approx(2.0 + 0.97 * 0.5)
    assert m["queue_wait_mean"] == pytest.approx(0.75)
    assert m["duration_s"] == pytest.approx(4.0) and m["throughput_rps"] == pytest.approx(1.0)
    assert summarize(rs, duration=8.0)["throughput_rps"] == pytest.approx(0.5)


def test_burst_of_concurrent_submitters_loses_nothing_at_batch_1(dirs):
    engine = batch1(dirs, group_variants=True)
    names = engine.names
    handles, lock = [], threading.Lock()
    start = threading.Barrier(8)

    def client(k):
        start.wait()
        for i in range(6):
            h = engine.submit(names[(k + i) % len(names)], [2 + k, 3 + i], max_new_tokens=1)
            with lock:
                handles.append(h)

    with ThreadPoolExecutor(8) as clients:   # 8 at once: the barrier needs every one of them
        list(clients.map(client, range(8)))
    engine.shutdown(drain=True)
    assert len(handles) == 48 and engine.stats["finished"] == 48
    assert sorted(h.result(timeout=0).id for h in handles) == list(range(48))
    assert all(len(h.tokens) == 1 for h in handles)


def test_cancel_and_shutdown_without_drain_say_why_at_batch_1(dirs):
    engine = batch1(dirs)
    names = engine.names
    hs = [engine.submit(names[i % 3], [3, 4, 5], max_new_tokens=NEW, ignore_eos=True) for i in range(12)]
    hs[-1].cancel()  # the client cancels a queued request
    assert hs[-1].result(timeout=30).finish_reason == "cancelled" and hs[-1].tokens == []
    engine.shutdown(drain=False, timeout=30)
    assert all(h.done for h in hs)
    finished = [h for h in hs if h.finish_reason == "length"]
    never_ran = [h for h in hs[:-1] if h.admitted is None]
    assert never_ran  # 11 requests at batch 1 cannot all start at once
    assert all(len(h.tokens) == NEW for h in finished)
    for h in never_ran:
        assert h.finish_reason == "cancelled"
        with pytest.raises(EngineClosed, match="shut down before the request ran"):
            h.result(timeout=0)
    with pytest.raises(EngineClosed):
        engine.submit(names[0], [3, 4])


def test_baselines_same_greedy_tokens_as_ours(dirs, mv, ours):
    vs = VariantSet.from_dirs(dirs)
    work = [(mv.names[i % 3], p) for i, p in enumerate(prompts(9, seed=3))]
    expected = [direct(mv, v, p) for v, p in work]
    assert [ours.submit(v, p, max_new_tokens=NEW).result(timeout=60).tokens for v, p in work] == expected
    budget = ours.memory_footprint()["slab_bytes"] + ours.memory_footprint()["non_expert_device_bytes"]
    systems = [ResidentSystem(vs), SwapSystem(vs), PartitionedSystem(vs, budget_bytes=budget // 2)]
    part = systems[2]
    assert all(n > 0 for n in part.memory_footprint()["offloaded_experts_per_instance"])  # half of ours' bytes: it pages
    before = set(threading.enumerate())
    for system in systems:
        with LaneDriver(system) as driver:
            hs = [driver.submit(v, p, max_new_tokens=NEW) for v, p in work]
            got = [h.result(timeout=60).tokens for h in hs]
        assert got == expected, system.kind
        assert all(h.arrival <= h.admitted <= h.first_token <= h.finish for h in hs)
        assert system.memory_footprint()["total_device_bytes"] > 0
    assert systems[1].stats()["switches"] >= 3 and systems[1].stats()["bytes_copied"] > 0
    assert systems[0].stats()["switches"] == 0
    assert not new_threads(before)


def test_partitioned_offloads_under_a_small_budget_and_runs_lanes_concurrently(dirs, mv):
    vs = VariantSet.from_dirs(dirs)
    w1, w2 = vs[0].expert(0, 0)
    slot = (w1.numel() + w2.numel()) * 4
    part = PartitionedSystem(vs, budget_bytes=3 * (45_000 + 5 * slot))  # non-expert (~43 kB) + 5 of 8 experts
    fp = part.memory_footprint()
    assert part.lanes == 3 and all(o > 0 for o in fp["offloaded_experts_per_instance"])
    assert fp["total_device_bytes"] <= 3 * (45_000 + 5 * slot)  # within the budget it was given
    work = [(mv.names[i % 3], p) for i, p in enumerate(prompts(6, seed=4))]
    before = set(threading.enumerate())
    with LaneDriver(part) as driver:
        lanes = {t.name for t in new_threads(before)}
        got = [h.result(timeout=60).tokens for h in [driver.submit(v, p, max_new_tokens=NEW) for v, p in work]]
    assert lanes == {"multimoe-lane0", "multimoe-lane1", "multimoe-lane2"}
    assert got == [direct(mv, v, p) for v, p in work]
    assert part.stats()["expert_fetches"] > 0 and part.stats()["bytes_copied"] > 0


def test_lane_driver_maps_the_request_onto_generate_and_isolates_failures(dirs, mv):
    """ignore_eos yields exactly max_new_tokens (the model's EOS cannot end it), an EOS ends the request, fields
    generate has no equivalent for are refused, and a generate that raises fails only its request."""
    vs = VariantSet.from_dirs(dirs)

    class Flaky(ResidentSystem):
        def generate(self, variant, input_ids, **kw):
            if int(input_ids[0, 0]) == 63:
                raise RuntimeError("injected mid-run fault")
            return super().generate(variant, input_ids, **kw)

    v, ids = mv.names[0], [3, 4, 5]
    first = direct(mv, v, ids)[0]
    with LaneDriver(Flaky(vs)) as driver:
        r = driver.submit(v, ids, max_new_tokens=NEW, eos_token_id=first, ignore_eos=True).result(30)
        stop = driver.submit(v, ids, max_new_tokens=NEW, eos_token_id=first).result(30)
        for field, value in (("stop", [[3]]), ("logprobs", 2), ("presence_penalty", 0.5)):
            with pytest.raises(RequestError, match=field):
                driver.submit(v, ids, **{field: value})
        with pytest.raises(RequestError, match="unknown variant"):
            driver.submit("nope", ids)
        hs = [driver.submit(v, [63, 6, 7] if i == 1 else [5, 6, 7], max_new_tokens=NEW) for i in range(3)]
        with pytest.raises(RuntimeError, match="injected mid-run fault"):
            hs[1].result(timeout=30)
        assert hs[1].finish_reason == "error"
        assert [hs[i].result(timeout=30).tokens for i in (0, 2)] == [direct(mv, v, [5, 6, 7])] * 2
    assert len(r.tokens) == NEW and r.finish_reason == "length"
    assert stop.tokens == [first] and stop.finish_reason == "stop"
    assert driver.served == 5
    with pytest.raises(EngineClosed):
        driver.submit(v, ids)


def test_the_sweep_serves_one_trace_to_every_system_and_writes_the_ratios(dirs, tmp_path):
    from multimoe_rt.benchmarks import qos

    names = [d.name for d in dirs]
    pool = {v: prompts(4, seed=20 + i) for i, v in enumerate(names)}
    out = qos.run({d.name: d for d in dirs}, rates=[50.0], n=6, share=0.5, affinity=True, prompt_len=6,
                  max_new_tokens=3, pool=pool, progress=False, out_dir=tmp_path, tag="t")
    labels = ["ours", "ours+affinity", "partitioned", "swap", "resident"]
    assert [r["system"] for r in out["results"]] == labels
    for r in out["results"]:
        assert r["completed"] == r["requests"] == 6 and r["failed"] == 0, r["system"]
        assert 0 < r["ttft_mean"] <= r["turnaround_mean"] and r["memory"]["total_device_bytes"] > 0
    assert {x["baseline"] for x in out["ratios"]} == set(labels[1:])
    assert out["budget_bytes"] < out["results"][-1]["memory"]["total_device_bytes"]  # resident holds more
    assert out["plan"]["device_slots"] < out["plan"]["separate_slots"]               # share 0.5 saves slots
    assert json.loads(open(out["files"]["json"]).read())["rates"] == [50.0]
    assert all(f"{label} " in qos.table(out) for label in labels)


# ---- issue 16: wrong types are rejected with RequestError naming the field, at batch 1 as everywhere ------

@pytest.mark.parametrize("args, kwargs, what", [
    ((None,), {}, "prompt"),
    ((["a", "b"],), {}, "prompt"),
    (([3.7, 4],), {}, "prompt"),                       # old code: silently truncated to [3, 4]
    (([3, True],), {}, "prompt"),
    (([[3, 4], [5]],), {}, "prompt"),
    ((torch.tensor([3.0, 4.0]),), {}, "prompt"),
    ((object(),), {}, "prompt"),
    (([3, 4],), {"max_new_tokens": True}, "max_new_tokens"),   # old code: accepted as 1
    (([3, 4],), {"max_new_tokens": 2.0}, "max_new_tokens"),
    (([3, 4],), {"max_new_tokens": "2"}, "max_new_tokens"),
    (([3, 4],), {"max_new_tokens": None}, "max_new_tokens"),
    (([3, 4],), {"temperature": float("nan")}, "temperature"),
    (([3, 4],), {"temperature": 0.7, "top_p": float("nan")}, "top_p"),
    (([3, 4],), {"temperature": "hot"}, "temperature"),
    (([3, 4],), {"do_sample": True}, "do_sample"),             # not a field: temperature > 0 samples
    (([3, 4],), {"eos_token_id": "x"}, "eos_token_id"),
    (([3, 4],), {"eos_token_id": 10**9}, "eos_token_id"),
    (([3, 4],), {"seed": 1.5}, "seed"),
    (([3, 4],), {"ignore_eos": "no"}, "ignore_eos"),
])
def test_submit_rejects_wrong_types_with_request_error(ours, args, kwargs, what):
    with pytest.raises(RequestError, match=what):
        ours.submit(ours.names[0], *args, **kwargs)
    with pytest.raises(RequestError, match="variant"):
        ours.submit(["not", "a", "name"], [3, 4])
    assert ours.load() == {"running": 0, "waiting": 0}


def test_submit_accepts_numpy_and_tensor_integers(ours, mv):
    v = mv.names[1]
    want = direct(mv, v, [3, 4, 5])
    for prompt, n in (([3, 4, 5], np.int64(NEW)), (np.array([3, 4, 5]), NEW), ([np.int32(3), 4, 5], NEW),
                      (torch.tensor([[3, 4, 5]]), torch.tensor(NEW))):
        h = ours.submit(v, prompt, max_new_tokens=n).result(timeout=30)
        assert h.tokens == want and h.prompt == [3, 4, 5] and type(h.params.max_new_tokens) is int
