"""The continuous-batching engine: mixed variants in one batch give each request its own variant's tokens."""

import asyncio
import threading
import time

import numpy as np
import pytest
import torch

from multimoe_rt.engine import Engine, QueueFull
from multimoe_rt.errors import EngineClosed, RequestError
from tiny_models import reference, save_variants

N_VARIANTS = 4


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    return save_variants(tmp_path_factory.mktemp("eng"), "mixtral", n=N_VARIANTS)


@pytest.fixture(scope="module")
def refs(dirs):
    return {d.name: reference("mixtral", d) for d in dirs}


def own_greedy(refs, variant, prompt, n):
    out = refs[variant].generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, pad_token_id=0,
                                 eos_token_id=None)
    return out[0, len(prompt):].tolist()


def prompts(n, seed=0, lo=2, hi=14):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, 64, (int(torch.randint(lo, hi, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


@pytest.mark.parametrize("resident_sets", [N_VARIANTS, 2])
def test_mixed_requests_joining_mid_flight_equal_each_variants_own_generate(dirs, refs, resident_sets):
    names = [d.name for d in dirs]
    ps = prompts(12, seed=resident_sets)
    with Engine.from_pretrained(dirs, resident_sets=resident_sets, max_seqs=6, max_len=64, max_step_tokens=12) as eng:
        first = [(names[i % 4], p, eng.submit(names[i % 4], p, max_new_tokens=4 + i % 5, ignore_eos=True))
                 for i, p in enumerate(ps[:6])]
        next(iter(first[0][2]))  # the first batch is decoding when the rest arrive
        later = [(names[(i + 1) % 3], p, eng.submit(names[(i + 1) % 3], p, max_new_tokens=6, ignore_eos=True))
                 for i, p in enumerate(ps[6:])]
        for v, p, h in first + later:
            assert h.result(timeout=120).tokens == own_greedy(refs, v, p, len(h.tokens)), (v, p)
            assert h.finish_reason == "length"
        assert eng.stats["steps"] < sum(len(h.tokens) for _, _, h in first + later)  # it really batched
        if resident_sets < N_VARIANTS:
            assert eng.weights.stats["evictions"] > 0
        assert eng.kv.num_free == 6


def test_seeded_samples_do_not_depend_on_the_batch(dirs):
    names = [d.name for d in dirs]
    ps = prompts(6, seed=7)
    kw = dict(max_new_tokens=8, temperature=0.9, top_p=0.8, ignore_eos=True)
    with Engine.from_pretrained(dirs, max_seqs=8, max_len=64) as eng:
        alone = [eng.generate(names[i % 4], p, seed=100 + i, **kw) for i, p in enumerate(ps)]
        hs = [eng.submit(names[i % 4], p, seed=100 + i, **kw) for i, p in enumerate(ps)]
        greedy = eng.submit(names[0], ps[0], max_new_tokens=8, ignore_eos=True)
        assert [h.result(timeout=60).tokens for h in hs] == alone
        other = eng.generate(names[0], ps[0], seed=999, **kw)
    assert other != alone[0]  # the seed matters
    assert greedy.result().tokens == own_greedy({names[0]: reference("mixtral", dirs[0])}, names[0], ps[0], 8)


def test_stream_iterator_async_and_stop_sequences(dirs):
    name = dirs[1].name
    p = prompts(1, seed=8)[0]
    with Engine.from_pretrained(dirs, max_seqs=4, max_len=64) as eng:
        full = eng.generate(name, p, max_new_tokens=10, ignore_eos=True)
        assert list(eng.submit(name, p, max_new_tokens=10, ignore_eos=True)) == full

        async def consume():
            return [t async for t in eng.submit(name, p, max_new_tokens=10, ignore_eos=True)]
        assert asyncio.run(consume()) == full
        stopped = eng.submit(name, p, max_new_tokens=10, ignore_eos=True, stop=[full[3:5]]).result()
        assert stopped.tokens == full[:5] and stopped.finish_reason == "stop"
        eos = eng.submit(name, p, max_new_tokens=10, eos_token_id=full[2]).result()
        assert eos.tokens == full[:full.index(full[2]) + 1] and eos.finish_reason == "stop"


def test_cancel_frees_the_slot_and_shutdown_without_drain_cancels(dirs):
    name = dirs[0].name
    eng = Engine.from_pretrained(dirs, max_seqs=2, max_len=128)
    h = eng.submit(name, [5, 6, 7], max_new_tokens=120, ignore_eos=True)
    next(iter(h))
    h.cancel()
    h._done.wait(30)
    assert h.finish_reason == "cancelled" and len(h.tokens) < 120
    deadline = time.time() + 10
    while eng.kv.num_free != 2 and time.time() < deadline:
        time.sleep(0.01)
    assert eng.kv.num_free == 2
    long = [eng.submit(name, [5, 6], max_new_tokens=120, ignore_eos=True) for _ in range(4)]
    eng.shutdown(drain=False, timeout=30)
    assert all(x.done and x.finish_reason in ("cancelled", "length") for x in long)
    assert any(x.finish_reason == "cancelled" for x in long)
    with pytest.raises(EngineClosed):
        eng.submit(name, [1], max_new_tokens=1)


def test_bad_requests_are_rejected_at_submission(dirs):
    name = dirs[0].name
    with Engine.from_pretrained(dirs, max_seqs=2, max_len=32, max_queue=2) as eng:
        for kwargs, match in [(dict(variant="nope", prompt=[1]), "unknown variant"),
                              (dict(prompt=[]), "empty prompt"),
                              (dict(prompt="text"), "token ids"),
                              (dict(prompt=[1, 64]), r"\[0, 64\)"),
                              (dict(prompt=[1, -1]), r"\[0, 64\)"),
                              (dict(prompt=[1.5]), "not an integer"),
                              (dict(prompt=[True]), "not an integer"),
                              (dict(prompt=torch.tensor([1.0])), "dtype"),
                              (dict(prompt=[1], max_new_tokens=0), "max_new_tokens"),
                              (dict(prompt=[1], max_new_tokens=2.0), "max_new_tokens"),
                              (dict(prompt=[1] * 30, max_new_tokens=3), "exceeds the context of 32"),
                              (dict(prompt=[1], temperature=float("nan")), "temperature"),
                              (dict(prompt=[1], temperature=-0.5), "temperature"),
                              (dict(prompt=[1], top_p=0), "top_p"),
                              (dict(prompt=[1], seed=-3), "seed"),
                              (dict(prompt=[1], eos_token_id=64), "eos_token_id"),
                              (dict(prompt=[1], eos_token_id=True), "eos_token_id"),
                              (dict(prompt=[1], ignore_eos=1), "ignore_eos"),
                              (dict(prompt=[1], stop=[[]]), "stop"),
                              (dict(prompt=[1], stop=[[False]]), "not an integer"),
                              (dict(prompt=[1], stop="ab"), "stop")]:
            with pytest.raises(RequestError, match=match):
                eng.submit(**{"variant": name, **kwargs})
        assert eng.generate(name, np.array([3, 4]), max_new_tokens=np.int64(2), seed=np.int32(1)) == \
            eng.generate(name, [3, 4], max_new_tokens=2)  # numpy integers are integers
        eng.weights.copy_hook = lambda v: time.sleep(0.5)  # nothing can run while the queue fills
        with eng._cond:
            eng.submit(name, [1], max_new_tokens=1)
            eng.submit(name, [1], max_new_tokens=1)
            with pytest.raises(QueueFull):
                eng.submit(name, [1], max_new_tokens=1)


def test_failed_load_fails_only_the_requests_that_needed_it(dirs, refs):
    names = [d.name for d in dirs]
    with Engine.from_pretrained(dirs, resident_sets=2, max_seqs=4, max_len=64) as eng:
        def hook(v):
            if names[v] == names[3]:
                raise OSError("simulated copy fault")
        eng.weights.copy_hook = hook
        hs = [eng.submit(names[i], [3, 4, 5], max_new_tokens=3, ignore_eos=True) for i in range(4)]
        for i, h in enumerate(hs):
            if i == 3:
                with pytest.raises(RuntimeError, match="simulated copy fault"):
                    h.result(timeout=60)
                assert h.finish_reason == "error"
            else:
                assert h.result(timeout=60).tokens == own_greedy(refs, names[i], [3, 4, 5], 3)
        eng.weights.copy_hook = None
        assert eng.generate(names[3], [3, 4, 5], max_new_tokens=3, ignore_eos=True) == \
            own_greedy(refs, names[3], [3, 4, 5], 3)


def test_a_waiting_variant_is_not_starved_by_a_busy_one(dirs):
    """One set, a steady stream for variant A: B's request still runs once A's set drains."""
    a, b = dirs[0].name, dirs[1].name
    with Engine.from_pretrained(dirs, resident_sets=1, max_seqs=4, max_len=64) as eng:
        stop = threading.Event()

        def flood():
            while not stop.is_set():
                eng.submit(a, [1, 2, 3], max_new_tokens=6, ignore_eos=True)
                time.sleep(0.002)
        t = threading.Thread(target=flood)
        t.start()
        time.sleep(0.2)
        try:
            hb = eng.submit(b, [1, 2, 3], max_new_tokens=3, ignore_eos=True)
            assert len(hb.result(timeout=30).tokens) == 3
        finally:
            stop.set()
            t.join()


def test_submit_from_many_threads_loses_nothing(dirs, refs):
    names = [d.name for d in dirs]
    ps = prompts(4, seed=11)
    expected = {(v, i): own_greedy(refs, v, ps[i], 4) for v in names for i in range(4)}
    results, lock = {}, threading.Lock()
    with Engine.from_pretrained(dirs, resident_sets=3, max_seqs=8, max_len=64) as eng:
        def client(k):
            for j in range(6):
                v, i = names[(k + j) % 4], (k * j) % 4
                toks = eng.generate(v, ps[i], max_new_tokens=4, ignore_eos=True)
                with lock:
                    results[(k, j)] = toks == expected[(v, i)]
        threads = [threading.Thread(target=client, args=(k,)) for k in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert len(results) == 48 and all(results.values())


def test_per_variant_batching_mode_gives_the_same_tokens(dirs, refs):
    names = [d.name for d in dirs]
    ps = prompts(8, seed=12)
    with Engine.from_pretrained(dirs, resident_sets=1, mix_variants=False, max_seqs=4, max_len=64) as eng:
        hs = [(names[i % 4], p, eng.submit(names[i % 4], p, max_new_tokens=5, ignore_eos=True)) for i, p in enumerate(ps)]
        for v, p, h in hs:
            assert h.result(timeout=60).tokens == own_greedy(refs, v, p, 5)


def test_grouped_admission_takes_variants_in_order_of_their_oldest_request(dirs, refs):
    names = [d.name for d in dirs]
    with Engine.from_pretrained(dirs, max_seqs=2, max_len=64, group_variants=True) as eng:
        for v in names[:2]:  # both resident: only the admission order can differ
            eng.generate(v, [1], max_new_tokens=1)
        order = [names[0], names[1], names[0], names[1], names[0]]
        with eng._cond:  # the engine thread waits here: the queue fills before anything is admitted
            hs = [eng.submit(v, [1, 2, 3], max_new_tokens=3, ignore_eos=True) for v in order]
        for v, h in zip(order, hs):
            assert h.result(timeout=30).tokens == own_greedy(refs, v, [1, 2, 3], 3)
    admitted = [order[i] for i in sorted(range(5), key=lambda i: hs[i].admitted)]
    assert admitted == [names[0], names[0], names[1], names[1], names[0]]  # FIFO would alternate


@pytest.mark.parametrize("prefetch", [0, 1])
def test_batch1_look_ahead_copies_the_next_variant_while_the_current_request_runs(dirs, refs, prefetch):
    """max_seqs=1 with two sets: prefetch=1 starts the next request's set load while the running one decodes
    (the paper's staging set); without it the load waits until the row frees."""
    a, b = dirs[0].name, dirs[1].name
    with Engine.from_pretrained(dirs, resident_sets=2, max_seqs=1, max_len=64, prefetch=prefetch) as eng:
        eng.generate(a, [1], max_new_tokens=1)   # a's set resident, the other set free
        seen = {}
        eng.weights.copy_hook = lambda v: seen.setdefault(eng.names[v], ha.done)
        with eng._cond:
            ha = eng.submit(a, [1, 2, 3], max_new_tokens=8, ignore_eos=True)
            hb = eng.submit(b, [4, 5], max_new_tokens=3, ignore_eos=True)
        assert hb.result(timeout=60).tokens == own_greedy(refs, b, [4, 5], 3)
        assert ha.result(timeout=60).tokens == own_greedy(refs, a, [1, 2, 3], 8)
    assert seen == {b: not prefetch}   # done already when its copy ran: only without look-ahead


def _with_json(src, dst, **files):
    """A copy of checkpoint ``src`` at ``dst`` with some JSON files' fields replaced ({file: {key: value}})."""
    import json
    import shutil

    shutil.copytree(src, dst)
    for fname, fields in files.items():
        path = dst / f"{fname}.json"
        doc = json.loads(path.read_text()) if path.exists() else {}
        path.write_text(json.dumps({**doc, **fields}))
    return dst


def test_eos_as_transformers_does_it(dirs, tmp_path):
    """Old code: an EOS list in config.json never matched, generation_config.json was ignored, and a request's
    eos_token_id had to be one int."""
    p = [3, 4, 5]
    with Engine.from_pretrained([dirs[0]], max_seqs=2, max_len=64) as eng:
        full = eng.generate(dirs[0].name, p, max_new_tokens=8, ignore_eos=True)
        stop_at = full.index(full[2]) + 1
        h = eng.submit(dirs[0].name, p, max_new_tokens=8, eos_token_id=[63 if full[2] != 63 else 62, full[2]])
        assert h.result(30).tokens == full[:stop_at] and h.finish_reason == "stop"
    listed = _with_json(dirs[0], tmp_path / "listed", config={"eos_token_id": [62, full[2]]},
                        generation_config={"eos_token_id": None})
    generation = _with_json(dirs[0], tmp_path / "generation", generation_config={"eos_token_id": [full[2]]})
    for d in (listed, generation):
        with Engine.from_pretrained([d], max_seqs=2, max_len=64) as eng:
            h = eng.submit(d.name, p, max_new_tokens=8).result(30)
            assert h.tokens == full[:stop_at] and h.finish_reason == "stop", d.name


def test_max_len_never_exceeds_the_models_positions(dirs):
    """Old code: from_pretrained defaulted to max_len=512 over this model's 128 positions, without a word."""
    with Engine.from_pretrained(dirs[:1], max_seqs=1) as eng:
        assert eng.kv.max_len == 128
    with pytest.warns(UserWarning, match="max_len=512 .* 128 positions"):
        eng = Engine.from_pretrained(dirs[:1], max_seqs=1, max_len=512)
    with eng:
        assert eng.kv.max_len == 128
        with pytest.raises(RequestError, match="exceeds the context of 128 tokens"):
            eng.submit(dirs[0].name, [1] * 100, max_new_tokens=40)
