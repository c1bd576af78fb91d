"""The pure Scheduler (multimoe_rt/scheduler.py): plain inputs -> one step's plan, no engine, no torch."""

import random

import pytest
from hypothesis import given, settings, strategies as st

from multimoe_rt.errors import MultimoeError
from multimoe_rt.scheduler import (Chunk, Load, Scheduler, SchedulerError, SchedulerState, SeqInfo, StepPlan,
                                   WeightSets)


def seq(i, v=0, prompt=4, cached=0, generated=0, cancelled=False):
    return SeqInfo(i, v, prompt, cached, generated, cancelled)


def decoding(i, v=0, prompt=4, generated=1):
    return SeqInfo(i, v, prompt, prompt + generated - 1, generated)


def state(waiting=(), running=(), resident=None, num_sets=None, loading=(), rows=8, draining=None):
    resident = {0: 0} if resident is None else resident
    num_sets = len(resident) + len(loading) if num_sets is None else num_sets
    return SchedulerState(tuple(waiting), tuple(running), WeightSets(num_sets, dict(resident), frozenset(loading)),
                          rows, dict(draining or {}))


def test_decodes_first_then_prompt_chunks_within_the_token_budget():
    run = (seq(0, prompt=10, cached=3), decoding(1), decoding(2))
    plan = Scheduler(max_step_tokens=6).plan(state(waiting=[seq(3, prompt=5)], running=run))
    assert plan.admit == (3,)
    assert plan.chunks == (Chunk(1, 4, 1, True), Chunk(2, 4, 1, True), Chunk(0, 3, 4, False))
    assert sum(c.length for c in plan.chunks) == 6          # sequence 3 waits for the next step's budget


def test_a_long_prompt_is_chunked_across_steps_and_only_its_last_chunk_samples():
    sched, s = Scheduler(max_step_tokens=4), seq(0, prompt=10)
    plan = sched.plan(state(waiting=[s]))
    assert plan.admit == (0,) and plan.chunks == (Chunk(0, 0, 4, False),)
    starts = []
    cached = 0
    while cached < 10:
        (c,) = sched.plan(state(running=[seq(0, prompt=10, cached=cached)])).chunks
        starts.append((c.start, c.length, c.logits))
        cached += c.length
    assert starts == [(0, 4, False), (4, 4, False), (8, 2, True)]


def test_first_come_first_served_within_the_free_rows():
    w = [seq(i, v=i % 2) for i in range(5)]
    plan = Scheduler().plan(state(waiting=w, resident={0: 0, 1: 1}, rows=3))
    assert plan.admit == (0, 1, 2)
    assert Scheduler(max_seqs=2).plan(state(waiting=w, resident={0: 0, 1: 1}, rows=8)).admit == (0, 1)
    assert Scheduler().plan(state(waiting=w, resident={0: 0, 1: 1}, rows=0)).admit == ()


def test_cancelled_requests_end_and_a_cancelled_running_row_is_reused_at_once():
    plan = Scheduler().plan(state(waiting=[seq(5, cancelled=True), seq(6)], running=[decoding(1)], rows=0))
    assert plan.cancelled == (5,) and plan.admit == ()
    plan = Scheduler().plan(state(waiting=[seq(6)], running=[SeqInfo(1, 0, 4, 4, 1, True)], rows=0))
    assert plan.cancelled == (1,) and plan.admit == (6,)
    assert [c.seq for c in plan.chunks] == [6]


def test_a_missing_variant_loads_into_a_free_set_then_the_lru_idle_one():
    sched = Scheduler()
    plan = sched.plan(state(waiting=[seq(0, v=2)], resident={0: 0}, num_sets=2))
    assert plan.loads == (Load(2),) and plan.admit == () and not plan.runs
    # no free set: the least recently used set that no sequence uses is evicted
    plan = sched.plan(state(waiting=[seq(9, v=2)], running=[decoding(1, v=0)], resident={1: 1, 0: 0, 3: 2}))
    assert plan.loads == (Load(2, evict=1),) and plan.draining == {}
    # a variant already loading is not loaded twice
    plan = sched.plan(state(waiting=[seq(0, v=2), seq(1, v=2)], resident={0: 0}, loading={2}))
    assert plan.loads == () and plan.admit == ()


def test_only_idle_sets_are_evicted_and_a_just_admitted_set_is_busy():
    # variant 1's request is admitted first, so its set is busy when variant 2 needs one
    plan = Scheduler().plan(state(waiting=[seq(0, v=1), seq(1, v=2)], resident={1: 0, 0: 1}))
    assert plan.admit == (0,) and plan.loads == (Load(2, evict=0),)


def test_every_set_busy_drains_the_least_recently_used_and_then_hands_it_over():
    sched = Scheduler()
    running = [decoding(1, v=0), decoding(2, v=1)]
    plan = sched.plan(state(waiting=[seq(5, v=2)], running=running, resident={1: 1, 0: 0}))
    assert plan.loads == () and plan.draining == {1: 2}     # set 1 holds variant 1, the least recent
    # while it drains, its variant's new requests wait; the other set still admits
    plan = sched.plan(state(waiting=[seq(5, v=2), seq(6, v=1), seq(7, v=0)], running=running,
                            resident={1: 1, 0: 0}, draining=plan.draining))
    assert plan.admit == (7,) and plan.draining == {1: 2} and plan.loads == ()
    # its last sequence finished: the idle set goes to the waiting variant and the drain ends
    plan = sched.plan(state(waiting=[seq(5, v=2), seq(6, v=1)], running=[decoding(2, v=0)], resident={1: 1, 0: 0},
                            draining=plan.draining))
    assert plan.loads == (Load(2, evict=1),) and 1 not in plan.draining
    assert plan.draining == {0: 1}      # variant 1 lost its set: now it waits for the other one
    # one drain at a time; a drain nobody waits for any more ends
    plan = sched.plan(state(waiting=[seq(5, v=2), seq(6, v=3)], running=running, resident={1: 1, 0: 0},
                            draining={1: 2}))
    assert plan.draining == {1: 2}
    assert sched.plan(state(waiting=[seq(6, v=0)], running=running, resident={1: 1, 0: 0},
                            draining={1: 2})).draining == {}


def test_a_drain_stays_on_its_set_while_the_lru_order_moves():
    # set 1 began draining for variant 2; since then set 0 became the least recently used: the drain stays put
    running = [decoding(1, v=0), decoding(2, v=1)]
    plan = Scheduler().plan(state(waiting=[seq(5, v=2)], running=running, resident={0: 0, 1: 1}, draining={1: 2}))
    assert plan.draining == {1: 2} and plan.loads == ()


def test_mix_variants_false_admits_only_the_running_batchs_variant():
    w = [seq(i, v=v) for i, v in enumerate([1, 0, 1, 0])]
    plan = Scheduler(mix_variants=False).plan(state(waiting=w, running=[decoding(9, v=1)], resident={0: 0, 1: 1}))
    assert plan.admit == (0, 2)
    plan = Scheduler(mix_variants=False).plan(state(waiting=w, resident={0: 0, 1: 1}))
    assert plan.admit == (0, 2)                                 # the oldest request picks the batch's variant
    assert Scheduler().plan(state(waiting=w, resident={0: 0, 1: 1})).admit == (0, 1, 2, 3)


def test_group_variants_admits_variant_by_variant_in_order_of_the_oldest_request():
    w = [seq(i, v=v) for i, v in enumerate([1, 0, 1, 0, 2, 1])]
    plan = Scheduler(group_variants=True).plan(state(waiting=w, resident={0: 0, 1: 1, 2: 2}, rows=4))
    assert plan.admit == (0, 2, 5, 1)
    assert Scheduler().plan(state(waiting=w, resident={0: 0, 1: 1, 2: 2}, rows=4)).admit == (0, 1, 2, 3)


def test_prefetch_loads_the_next_requests_variant_when_rows_run_out():
    w = [seq(5, v=1), seq(6, v=2)]
    run = [decoding(1, v=0)]
    assert Scheduler().plan(state(waiting=w, running=run, num_sets=2, rows=0)).loads == ()
    plan = Scheduler(prefetch=1).plan(state(waiting=w, running=run, num_sets=2, rows=0))
    assert plan.loads == (Load(1),) and plan.admit == ()
    # the look-ahead never evicts a busy set and never drains
    plan = Scheduler(prefetch=2).plan(state(waiting=w, running=run, num_sets=1, rows=0))
    assert plan.loads == () and plan.draining == {}


def test_bad_input_is_one_scheduler_error():
    with pytest.raises(SchedulerError, match="max_step_tokens"):
        Scheduler(max_step_tokens=0)
    with pytest.raises(SchedulerError, match="max_seqs"):
        Scheduler(max_seqs=0)
    with pytest.raises(SchedulerError, match="twice"):
        Scheduler().plan(state(waiting=[seq(1)], running=[decoding(1)]))
    with pytest.raises(SchedulerError, match="not resident"):
        Scheduler().plan(state(running=[decoding(1, v=3)]))
    with pytest.raises(SchedulerError, match="cannot hold"):
        Scheduler().plan(state(resident={0: 0, 1: 1}, num_sets=1))
    assert issubclass(SchedulerError, MultimoeError) and issubclass(SchedulerError, ValueError)


def test_the_empty_state_plans_nothing():
    assert Scheduler().plan(state()) == StepPlan()


# -- a long random workload through a little world that carries the plans out ------------------------------

class World:
    """Carries plans out the way the engine does: admitted requests take rows, loads land ``copy_steps``
    steps later as the most recent set, each sampled chunk adds a token, requests finish at ``out`` tokens."""

    def __init__(self, sched, num_sets, rows, copy_steps, rng):
        self.sched, self.num_sets, self.rows, self.copy_steps, self.rng = sched, num_sets, rows, copy_steps, rng
        self.waiting, self.running, self.out = [], [], {}
        self.resident, self.loading, self.draining, self.free_ids = {}, {}, {}, list(range(num_sets))
        self.step_no, self.done, self.admitted_order, self.variant = 0, {}, [], {}

    def submit(self, i, v, prompt, out):
        self.waiting.append(SeqInfo(i, v, prompt))
        self.out[i], self.variant[i] = out, v

    def step(self):
        self.step_no += 1
        for v, at in list(self.loading.items()):
            if at[1] <= self.step_no:
                self.resident[v] = at[0]
                del self.loading[v]
        st = SchedulerState(tuple(self.waiting), tuple(self.running),
                            WeightSets(self.num_sets, dict(self.resident), frozenset(self.loading)),
                            self.rows - len(self.running), dict(self.draining))
        plan = self.sched.plan(st)
        self.check(st, plan)
        by_id = {s.id: s for s in self.waiting}
        for i in plan.admit:
            s = by_id[i]
            self.waiting.remove(s)
            self.running.append(s)
            self.admitted_order.append(i)
            self.resident[s.variant] = self.resident.pop(s.variant)   # used: most recent
        for ld in plan.loads:
            k = self.free_ids.pop() if ld.evict is None else self.resident.pop(ld.evict)
            self.loading[ld.variant] = (k, self.step_no + self.copy_steps)
        self.draining = plan.draining
        run = {s.id: s for s in self.running}
        for c in plan.chunks:
            s = run[c.seq]
            g = s.generated + (1 if c.logits else 0)
            new = SeqInfo(s.id, s.variant, s.prompt_len, s.cached + c.length, g)
            self.running[self.running.index(s)] = new
            if g >= self.out[s.id]:
                self.running.remove(new)
                self.done[s.id] = self.step_no

    def check(self, st, plan):
        used = {st.sets.resident[s.variant] for s in st.running}
        assert sum(c.length for c in plan.chunks) <= self.sched.max_step_tokens
        assert len(plan.admit) <= st.kv_rows_free
        evicted = {st.sets.resident[ld.evict] for ld in plan.loads if ld.evict is not None}
        assert not evicted & used, "a busy set was evicted"
        assert len(plan.draining) <= 1
        seen = False
        for c in plan.chunks:   # decodes first
            s = next(x for x in st.running + st.waiting if x.id == c.seq)
            seen |= s.prefilling
            assert not (seen and not s.prefilling), "a decode after a prompt chunk"
        for k in plan.draining:
            assert k in st.sets.resident.values()


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2 ** 31), num_sets=st.integers(1, 3), variants=st.integers(2, 5),
       rows=st.integers(1, 6), budget=st.integers(8, 24), group=st.booleans(), prefetch=st.integers(0, 2))
def test_no_request_starves_under_a_flood_of_one_variant(seed, num_sets, variants, rows, budget, group, prefetch):
    """Variant 0 always has ``rows`` requests waiting (its set never idles on its own), other variants' requests
    arrive now and then: each of them still finishes long before the flood ends."""
    rng = random.Random(seed)
    sched = Scheduler(max_step_tokens=budget, max_seqs=rows, group_variants=group, prefetch=prefetch)
    w = World(sched, num_sets, rows, copy_steps=rng.randint(0, 3), rng=rng)
    flood_steps, i, others = 1500, 0, {}
    while w.step_no < flood_steps:
        while sum(1 for s in w.waiting if s.variant == 0) < rows:
            w.submit(i, 0, rng.randint(1, 16), rng.randint(1, 6))
            i += 1
        if rng.random() < 0.02:
            others[i] = w.step_no
            w.submit(i, rng.randrange(1, variants), rng.randint(1, 16), rng.randint(1, 6))
            i += 1
        w.step()
    waits = [w.done[j] - at for j, at in others.items() if at < flood_steps // 2]
    assert all(j in w.done for j, at in others.items() if at < flood_steps // 2), "a request starved"
    assert max(waits, default=0) < flood_steps // 2
    for v in range(variants):   # first come first served within each variant
        mine = [j for j in w.admitted_order if w.variant[j] == v]
        assert mine == sorted(mine)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2 ** 31), num_sets=st.integers(1, 3), variants=st.integers(1, 5),
       rows=st.integers(1, 6), budget=st.integers(1, 24), group=st.booleans(), mix=st.booleans(),
       prefetch=st.integers(0, 2))
def test_a_random_workload_always_finishes(seed, num_sets, variants, rows, budget, group, mix, prefetch):
    rng = random.Random(seed)
    sched = Scheduler(max_step_tokens=budget, max_seqs=rows, mix_variants=mix, group_variants=group, prefetch=prefetch)
    w = World(sched, num_sets, rows, copy_steps=rng.randint(0, 3), rng=rng)
    n, i = 60, 0
    while len(w.done) < n:
        while i < n and rng.random() < 0.5:
            w.submit(i, rng.randrange(variants), rng.randint(1, 30), rng.randint(1, 8))
            i += 1
        w.step()
        assert w.step_no < 20000, f"stuck: {len(w.done)} of {n} finished"
    assert sorted(w.done) == list(range(n))


def test_mix_variants_false_waits_for_the_batch_to_empty():
    """The per-variant baseline: another variant's request starts only once the running batch is empty."""
    sched = Scheduler(max_step_tokens=8, max_seqs=2, mix_variants=False)
    w = World(sched, 2, 2, copy_steps=0, rng=None)
    w.submit(0, 0, 2, 3)
    w.submit(1, 1, 2, 1)
    w.submit(2, 0, 2, 3)
    w.resident, w.free_ids = {0: 0, 1: 1}, []
    while len(w.done) < 3:
        w.step()
    assert w.admitted_order == [0, 2, 1] and w.done[1] > max(w.done[0], w.done[2])


def test_the_engine_and_the_simulator_use_the_same_scheduler_class():
    import multimoe_rt.engine as engine
    import multimoe_rt.scheduler as scheduler
    from multimoe_rt.benchmarks import sim_systems, sim_validate

    assert engine.Scheduler is scheduler.Scheduler
    assert sim_systems.Scheduler is scheduler.Scheduler
    assert sim_validate.Scheduler is scheduler.Scheduler
