"""Serving engine and baselines: outputs equal direct generate calls under any interleaving, metrics from
timestamps, validation, failure isolation, clean shutdown, no lost requests; baselines agree with ours."""

import random
import threading
import time
from concurrent.futures import CancelledError

import pytest
import torch

from multimoe_rt.lab.baselines import PartitionedSystem, ResidentSystem, SwapSystem
from multimoe_rt.checkpoint import VariantSet
from multimoe_rt.model import MultiVariantModel
from multimoe_rt.serve import Engine, EngineClosed, OursSystem, Request, RequestError, summarize
from tiny_models import save_variants

NEW = 5  # new tokens per request: enough to exercise the KV-cache decode path, small for speed


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    return save_variants(tmp_path_factory.mktemp("serve"), "mixtral", n=3)


@pytest.fixture(scope="module")
def mv(dirs):
    return MultiVariantModel.from_pretrained(dirs, share=0.0)


def prompts(n, seed=0):
    rng = random.Random(seed)
    return [[rng.randrange(2, 64) for _ in range(rng.randrange(3, 12))] for _ in range(n)]


def direct(mv, variant, ids):
    return mv.generate(variant, torch.tensor([ids]), max_new_tokens=NEW).reshape(-1).tolist()


def engine_threads():
    return [t for t in threading.enumerate() if t.name.startswith("multimoe-engine")]


@pytest.mark.parametrize("policy", ["fcfs", "affinity"])
def test_outputs_equal_direct_generate_under_concurrent_interleaving(mv, policy):
    names = mv.names
    work = [(names[i % len(names)], p) for i, p in enumerate(prompts(18))]
    random.Random(1).shuffle(work)
    expected = [direct(mv, v, p) for v, p in work]
    engine = Engine(OursSystem(mv), policy=policy, max_wait_s=0.05)
    futures = [None] * len(work)

    def client(k):  # 3 client threads, each submitting every third request with jitter
        rng = random.Random(k)
        for i in range(k, len(work), 3):
            time.sleep(rng.random() * 0.003)
            futures[i] = engine.submit(work[i][0], work[i][1], max_new_tokens=NEW)

    clients = [threading.Thread(target=client, args=(k,)) for k in range(3)]
    for c in clients:
        c.start()
    for c in clients:
        c.join()
    got = [f.result(timeout=60) for f in futures]
    engine.shutdown()
    assert [r.tokens for r in got] == expected
    for r in got:
        assert r.arrival <= r.start <= r.first_token <= r.finish
    assert not engine_threads()


def test_text_prompt_goes_through_the_byte_tokenizer(dirs):
    # the tiny models have a 64-token vocabulary: a text prompt of bytes >= 64 is rejected by range
    system = OursSystem(MultiVariantModel.from_pretrained(dirs[:1], share=0.0))
    with Engine(system) as engine:
        with pytest.raises(RequestError, match="outside the vocabulary"):
            engine.submit(system.names[0], "hello")
        r = engine.submit(system.names[0], "!#%", max_new_tokens=2).result(timeout=30)
    assert r.input_ids == [33, 35, 37] and len(r.tokens) == 2


def test_metrics_from_a_synthetic_trace():
    def req(a, s, f1, f):
        r = Request("v", [1])
        r.arrival, r.start, r.first_token, r.finish = a, s, f1, f
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


def test_bad_requests_rejected_engine_keeps_serving(mv):
    engine = Engine(OursSystem(mv), max_new_tokens_limit=64)
    v = mv.names[0]
    with pytest.raises(RequestError, match="unknown variant"):
        engine.submit("nope", [3, 4])
    with pytest.raises(RequestError, match="empty prompt"):
        engine.submit(v, [])
    with pytest.raises(RequestError, match="over the limit|exceeds"):
        engine.submit(v, [3] * 500)
    with pytest.raises(RequestError, match="max_new_tokens"):
        engine.submit(v, [3, 4], max_new_tokens=0)
    with pytest.raises(RequestError, match="max_new_tokens"):
        engine.submit(v, [3, 4], max_new_tokens=65)
    with pytest.raises(RequestError, match="temperature"):
        engine.submit(v, [3, 4], do_sample=True, temperature=0.0)
    r = engine.submit(v, [3, 4, 5], max_new_tokens=NEW).result(timeout=30)
    assert r.tokens == direct(mv, v, [3, 4, 5])
    engine.shutdown()
    with pytest.raises(EngineClosed):
        engine.submit(v, [3, 4])
    assert not engine_threads()


class FlakySystem(OursSystem):
    """Fails inside generate, after prefill, for prompts starting with token 63."""

    def generate(self, variant, input_ids, streamer=None, **kw):
        if int(input_ids[0, 0]) != 63:
            return super().generate(variant, input_ids, streamer=streamer, **kw)

        class Boom:
            def put(self, value):
                if streamer is not None:
                    streamer.put(value)
                if value.dim() == 1:  # first new token: we are mid-run
                    raise RuntimeError("injected mid-run fault")

            def end(self):
                pass

        return super().generate(variant, input_ids, streamer=Boom(), **kw)


def test_a_request_failing_mid_run_fails_alone(mv):
    names = mv.names
    want = {n: direct(mv, n, [5, 6, 7]) for n in names}
    engine = Engine(FlakySystem(mv))
    futs = [engine.submit(names[i % 3], [63, 6, 7] if i == 1 else [5, 6, 7], max_new_tokens=NEW) for i in range(4)]
    with pytest.raises(RuntimeError, match="injected mid-run fault"):
        futs[1].result(timeout=30)
    assert [futs[i].result(timeout=30).tokens for i in (0, 2, 3)] == [want[names[0]], want[names[2]], want[names[0]]]
    engine.shutdown()
    assert not engine_threads()


def test_burst_of_concurrent_submitters_loses_nothing(mv):
    engine = Engine(OursSystem(mv), policy="affinity", max_wait_s=0.01)
    futs, lock = [], threading.Lock()
    start = threading.Barrier(8)

    def client(k):
        start.wait()
        for i in range(6):
            f = engine.submit(mv.names[(k + i) % len(mv.names)], [2 + k, 3 + i], max_new_tokens=1)
            with lock:
                futs.append(f)

    ts = [threading.Thread(target=client, args=(k,)) for k in range(8)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    engine.shutdown(drain=True)
    assert len(futs) == 48 and engine.served == 48
    ids = sorted(f.result(timeout=0).id for f in futs)
    assert ids == list(range(48))
    assert not engine_threads()


def test_shutdown_without_drain_cancels_queued(mv):
    engine = Engine(OursSystem(mv))
    futs = [engine.submit(mv.names[i % 3], [3, 4, 5], max_new_tokens=NEW) for i in range(12)]
    engine.shutdown(drain=False)
    assert not engine_threads()
    done = [f for f in futs if not f.cancelled()]
    cancelled = [f for f in futs if f.cancelled()]
    assert len(done) + len(cancelled) == 12 and cancelled  # 12 requests cannot all finish instantly
    for f in done:
        assert len(f.result(timeout=0).tokens) == NEW
    with pytest.raises(CancelledError):
        cancelled[0].result(timeout=0)


def test_ignore_eos_gives_exactly_max_new_tokens(mv):
    with Engine(OursSystem(mv)) as engine:
        ids = [3, 4, 5]
        first = direct(mv, mv.names[0], ids)[0]
        r = engine.submit(mv.names[0], ids, max_new_tokens=NEW, eos_token_id=first, ignore_eos=True).result(30)
        stop = engine.submit(mv.names[0], ids, max_new_tokens=NEW, eos_token_id=first).result(30)
    assert len(r.tokens) == NEW and stop.tokens == [first]


def test_baselines_same_greedy_tokens_as_ours(dirs, mv):
    vs = VariantSet.from_dirs(dirs)
    work = [(mv.names[i % 3], p) for i, p in enumerate(prompts(9, seed=3))]
    expected = [direct(mv, v, p) for v, p in work]
    budget = mv.memory_footprint()["total_device_bytes"]
    systems = [ResidentSystem(vs), SwapSystem(vs), PartitionedSystem(vs, budget_bytes=budget // 2)]
    part = systems[2]
    assert all(n > 0 for n in part.memory_footprint()["offloaded_experts_per_instance"])  # half of ours' bytes: it pages
    for system in systems:
        with Engine(system) as engine:
            futs = [engine.submit(v, p, max_new_tokens=NEW) for v, p in work]
            got = [f.result(timeout=60).tokens for f in futs]
        assert got == expected, system.kind
        assert system.memory_footprint()["total_device_bytes"] > 0
    assert systems[1].stats()["switches"] >= 3 and systems[1].stats()["bytes_copied"] > 0
    assert systems[0].stats()["switches"] == 0
    assert not engine_threads()


def test_partitioned_offloads_under_a_small_budget_and_runs_lanes_concurrently(dirs, mv):
    vs = VariantSet.from_dirs(dirs)
    w1, w2 = vs[0].expert(0, 0)
    slot = (w1.numel() + w2.numel()) * 4
    part = PartitionedSystem(vs, budget_bytes=3 * (45_000 + 5 * slot))  # non-expert (~43 kB) + 5 of 8 experts
    fp = part.memory_footprint()
    assert part.lanes == 3 and all(o > 0 for o in fp["offloaded_experts_per_instance"])
    assert fp["total_device_bytes"] <= 3 * (45_000 + 5 * slot)  # within the budget it was given
    work = [(mv.names[i % 3], p) for i, p in enumerate(prompts(6, seed=4))]
    with Engine(part) as engine:
        lanes = {t.name for t in engine_threads()}
        got = [f.result(timeout=60).tokens for f in [engine.submit(v, p, max_new_tokens=NEW) for v, p in work]]
    assert len(lanes) == 3
    assert got == [direct(mv, v, p) for v, p in work]
    assert part.stats()["expert_fetches"] > 0 and part.stats()["bytes_copied"] > 0


# ---- issue 16: wrong types are rejected with RequestError, cancellations say why --------------------------

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
    (([3, 4],), {"do_sample": True, "temperature": float("nan")}, "temperature"),
    (([3, 4],), {"do_sample": True, "top_p": float("nan")}, "top_p"),
    (([3, 4],), {"temperature": "hot"}, "temperature"),
    (([3, 4],), {"do_sample": "yes"}, "do_sample"),
    (([3, 4],), {"eos_token_id": "x"}, "eos_token_id"),
    (([3, 4],), {"eos_token_id": 10**9}, "eos_token_id"),
    (([3, 4],), {"seed": 1.5}, "seed"),
    (([3, 4],), {"ignore_eos": "no"}, "ignore_eos"),
])
def test_submit_rejects_wrong_types_with_request_error(mv, args, kwargs, what):
    engine = Engine(OursSystem(mv))
    try:
        with pytest.raises(RequestError, match=what):
            engine.submit(mv.names[0], *args, **kwargs)
        with pytest.raises(RequestError, match="variant"):
            engine.submit(["not", "a", "name"], [3, 4])
        assert engine.pending() == 0
    finally:
        engine.shutdown()


def test_submit_accepts_numpy_and_tensor_integers(mv):
    import numpy as np

    v = mv.names[1]
    want = direct(mv, v, [3, 4, 5])
    with Engine(OursSystem(mv)) as engine:
        for prompt, n in (([3, 4, 5], np.int64(NEW)), (np.array([3, 4, 5]), NEW), ([np.int32(3), 4, 5], NEW),
                          (torch.tensor([[3, 4, 5]]), torch.tensor(NEW))):
            r = engine.submit(v, prompt, max_new_tokens=n).result(timeout=30)
            assert r.tokens == want and r.input_ids == [3, 4, 5] and type(r.max_new_tokens) is int


def test_a_cancelled_request_says_why(mv):
    from multimoe_rt.errors import RequestCancelled

    engine = Engine(OursSystem(mv))
    futs = [engine.submit(mv.names[i % 3], [3, 4, 5], max_new_tokens=NEW) for i in range(8)]
    assert futs[-1].cancel()  # the client cancels a queued request
    with pytest.raises(RequestCancelled, match="cancelled by the client"):
        futs[-1].result(timeout=0)
    engine.shutdown(drain=False)
    cancelled = [f for f in futs[:-1] if f.cancelled()]
    assert cancelled
    with pytest.raises(CancelledError, match=r"cancelled by shutdown\(drain=False\) before it ran"):
        cancelled[0].result(timeout=0)
    with pytest.raises(RequestCancelled, match="shutdown"):
        cancelled[0].exception(timeout=0)
