"""A failure at any stage of an engine step fails only the requests it concerns; the loop goes on.

The injected-failure matrix: admission, set load, forward, sampling, emit, retire, and a failure that kills
the loop itself (then every waiting and later request fails at once and ``health()`` says why). In each
case the other requests of the same step still get their own tokens and the engine serves afterwards.
"""

import pytest
import torch

import multimoe_rt.engine as engine_mod
from multimoe_rt.engine import Engine
from multimoe_rt.errors import EngineDead, StepError
from tiny_models import save_variants

POISON = 61     # a prompt holding this token id is the one the injected failure concerns
WAIT = 60       # seconds: far above a step here; a hung request fails the test instead of hanging it


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    return save_variants(tmp_path_factory.mktemp("faults"), "mixtral", n=3)


PROMPTS = [[3, 4, 5], [7, 8, 9, 10], [11, 2], [5, 5, 6, 7, 8]]


@pytest.fixture(scope="module")
def expected(dirs):
    names = [d.name for d in dirs]
    with Engine.from_pretrained(dirs, max_seqs=8, max_len=64) as eng:
        return {(names[i % 3], tuple(p)): eng.generate(names[i % 3], p, max_new_tokens=5, ignore_eos=True)
                for i, p in enumerate(PROMPTS)}


def submit_together(eng, poisoned, max_new_tokens=5):
    """The healthy requests and one poisoned one, queued at once so they share the first steps."""
    names = eng.names
    with eng._cond:  # the engine thread waits: everything below is admitted in one step
        good = [(names[i % 3], p, eng.submit(names[i % 3], p, max_new_tokens=max_new_tokens, ignore_eos=True))
                for i, p in enumerate(PROMPTS)]
        bad = eng.submit(names[poisoned], [POISON, 3, 4], max_new_tokens=max_new_tokens, ignore_eos=True)
    return good, bad


def check(eng, expected, good, bad, stage):
    with pytest.raises(StepError, match=stage):
        bad.result(timeout=WAIT)
    assert bad.finish_reason == "error"
    for v, p, h in good:
        assert h.result(timeout=WAIT).tokens == expected[(v, tuple(p))], (v, p)
    assert eng.health() == (True, "ok")


def serves_after(eng, expected):
    v = eng.names[0]
    assert eng.generate(v, PROMPTS[0], max_new_tokens=5, ignore_eos=True) == expected[(v, tuple(PROMPTS[0]))]


def test_admission_failure(dirs, expected):
    with Engine.from_pretrained(dirs, max_seqs=8, max_len=64) as eng:
        lookup = eng.weights.lookup
        eng.weights.lookup = lambda v: (_ for _ in ()).throw(OSError("injected")) if v == 2 else lookup(v)
        good, bad = submit_together(eng, poisoned=2)
        good = [g for g in good if g[0] != eng.names[2]]  # every request for variant 2 is concerned
        check(eng, expected, good, bad, "admission")
        eng.weights.lookup = lookup
        serves_after(eng, expected)


def test_set_load_failure(dirs, expected):
    with Engine.from_pretrained(dirs, resident_sets=2, max_seqs=8, max_len=64) as eng:
        start = eng.weights.start_load
        eng.weights.start_load = lambda v, busy: (_ for _ in ()).throw(OSError("injected")) if v == 2 \
            else start(v, busy)
        good, bad = submit_together(eng, poisoned=2)
        good = [g for g in good if g[0] != eng.names[2]]
        check(eng, expected, good, bad, "admission")
        eng.weights.start_load = start
        serves_after(eng, expected)
        assert eng.generate(eng.names[2], [1, 2], max_new_tokens=2) is not None


def test_forward_failure_fails_only_the_sequence_that_causes_it(dirs, expected):
    with Engine.from_pretrained(dirs, max_seqs=8, max_len=64) as eng:
        forward = eng.model.forward

        def poisoned(b):
            if (b.tokens == POISON).any():
                raise RuntimeError("injected")
            return forward(b)
        eng.model.forward = poisoned
        check(eng, expected, *submit_together(eng, poisoned=1), "forward")
        serves_after(eng, expected)


def test_sampling_failure(dirs, expected, monkeypatch):
    real = engine_mod.sample_batch

    def poisoned(logits, rows):
        if any(POISON in r.prompt for r in rows):
            raise RuntimeError("injected")
        return real(logits, rows)
    monkeypatch.setattr(engine_mod, "sample_batch", poisoned)
    with Engine.from_pretrained(dirs, max_seqs=8, max_len=64) as eng:
        check(eng, expected, *submit_together(eng, poisoned=0), "sampling")
        serves_after(eng, expected)


def test_emit_failure(dirs, expected):
    with Engine.from_pretrained(dirs, max_seqs=8, max_len=64) as eng:
        with eng._cond:
            good, bad = submit_together(eng, poisoned=1)
            bad._subscribe(lambda item: 1 / 0)  # a consumer that breaks, as a closed event loop does
        check(eng, expected, good, bad, "emit")
        serves_after(eng, expected)


def test_retire_failure(dirs, expected):
    with Engine.from_pretrained(dirs, max_seqs=8, max_len=64) as eng:
        rows, allocate, free = [], eng.kv.allocate, eng.kv.free
        eng.kv.allocate = lambda: rows.append(allocate()) or rows[-1]
        # admission is first come first served: the poisoned request, submitted fifth, gets the fifth row
        eng.kv.free = lambda row: (_ for _ in ()).throw(OSError("injected")) \
            if len(rows) > 4 and row == rows[4] else free(row)
        good, bad = submit_together(eng, poisoned=1)
        check(eng, expected, good, bad, "retire")
        assert len(bad.tokens) == 5
        serves_after(eng, expected)
        assert eng.kv.num_free == 7  # the slot whose free failed is never handed out again


def test_a_temperature_that_would_overflow_is_greedy(dirs, expected):
    with Engine.from_pretrained(dirs, max_seqs=8, max_len=64) as eng:
        v = eng.names[0]
        h = eng.submit(v, PROMPTS[0], max_new_tokens=5, ignore_eos=True, temperature=1e-45)
        assert h.result(timeout=WAIT).tokens == expected[(v, tuple(PROMPTS[0]))]
        serves_after(eng, expected)


class Fatal(BaseException):
    """Not an Exception: nothing inside a step catches it, so the loop itself dies."""


def test_a_dead_loop_fails_every_waiting_and_later_request_and_reports_it(dirs):
    eng = Engine.from_pretrained(dirs, max_seqs=2, max_len=64)
    try:
        eng.model.forward = lambda b: (_ for _ in ()).throw(Fatal("injected"))
        hs = [eng.submit(eng.names[i % 3], [1, 2, 3], max_new_tokens=3) for i in range(5)]  # 3 wait: 2 rows
        for h in hs:
            with pytest.raises(EngineDead, match="Fatal"):
                h.result(timeout=WAIT)
        ok, reason = eng.health()
        assert not ok and "Fatal" in reason and "injected" in reason
        with pytest.raises(EngineDead, match="Fatal"):
            eng.submit(eng.names[0], [1], max_new_tokens=1)
    finally:
        eng.shutdown(timeout=WAIT)


def test_health_is_ok_while_serving_and_not_after_shutdown(dirs):
    eng = Engine.from_pretrained(dirs, max_seqs=2, max_len=64)
    assert eng.health() == (True, "ok")
    eng.shutdown(timeout=WAIT)
    assert eng.health()[0] is False


def test_sampled_tokens_are_unchanged_for_the_others_when_one_row_fails(dirs, monkeypatch):
    """A failed batched sampler call is retried row by row; the others' seeded draws are not spent twice."""
    names = [d.name for d in dirs]
    kw = dict(max_new_tokens=5, temperature=0.9, ignore_eos=True)
    with Engine.from_pretrained(dirs, max_seqs=8, max_len=64) as eng:
        want = [eng.generate(names[i], PROMPTS[i], seed=10 + i, **kw) for i in range(3)]
    real = engine_mod.sample_batch

    def poisoned(logits, rows):
        if len(rows) > 1:
            real(logits, rows)  # draws, then fails: as a failure late in the sampler would
            raise RuntimeError("injected")
        return real(logits, rows)
    monkeypatch.setattr(engine_mod, "sample_batch", poisoned)
    with Engine.from_pretrained(dirs, max_seqs=8, max_len=64) as eng:
        with eng._cond:
            hs = [eng.submit(names[i], PROMPTS[i], seed=10 + i, **kw) for i in range(3)]
        assert [h.result(timeout=WAIT).tokens for h in hs] == want


def test_non_finite_logits_fail_only_their_request(dirs, expected):
    with Engine.from_pretrained(dirs, max_seqs=8, max_len=64) as eng:
        forward = eng.model.forward

        def nan_for_poison(b):
            return forward(b).masked_fill(poisoned_rows(eng, b)[:, None], float("nan"))
        eng.model.forward = nan_for_poison
        good, bad = submit_together(eng, poisoned=0)
        with pytest.raises(StepError, match="sampling.*non-finite"):
            bad.result(timeout=WAIT)
        for v, p, h in good:
            assert h.result(timeout=WAIT).tokens == expected[(v, tuple(p))], (v, p)


def poisoned_rows(eng, b):
    """Which logit rows of batch ``b`` belong to a running sequence whose prompt holds POISON."""
    kv_rows = {s.kv_row for s in eng.running if POISON in s.h.prompt}
    return torch.tensor([int(r) in kv_rows for r in b.token_rows[b.logit_rows].tolist()], dtype=torch.bool)
