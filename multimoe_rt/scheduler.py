"""The continuous-batching policy as a pure function: the engine's and the simulator's one copy of it.

``Scheduler.plan(state) -> StepPlan`` reads plain data (the waiting and running sequences, the device's
non-expert weight sets, the free KV-cache rows and the drain map) and says what one step does: which
requests end as cancelled, which waiting ones are admitted (each takes a KV-cache row), which variants'
sets start loading and into which set, which sets drain, and the token chunk of every sequence that runs.
It uses no threads, no torch and no clock, so ``engine.Engine`` drives it with the real forward and
``benchmarks.sim_systems`` with a cost model, and what the simulator validates is the policy that serves.

The policy, in the order it decides:

1. Cancelled requests end (waiting ones leave the queue; running ones free their row before admission).
2. Admission, first come first served (or variant by variant with ``group_variants``: variants in the
   order of their oldest request, each one's requests in arrival order): a request whose variant's set is
   resident, and not draining, takes a row while rows (and ``max_seqs``) last. ``mix_variants=False`` admits
   only the running batch's variant until that batch is empty (the per-variant baseline: under a steady stream
   of the batch's variant, another variant waits until the stream pauses; the mixed modes never starve).
3. A request whose variant is not resident starts its set's load into a free set, else into the least
   recently used set that no running or just-admitted sequence uses (only idle sets are evicted). If every
   set is busy, the least recently used set drains: it takes no new sequences until its running ones finish,
   so its idle set then goes to the waiting variant and no request waits forever. One drain at a time.
4. With ``prefetch`` = k > 0, once rows run out the next k waiting requests may still start their sets'
   loads into free or idle sets (never a drain): the batch-1 system's look-ahead, which hides the copy
   behind the running request.
5. The step's tokens, within ``max_step_tokens``: one decode token for every running sequence past its
   prompt first (in admission order), then prompt chunks (in admission order) from the budget left; a
   prompt longer than the budget continues in later steps.

Recency: admitting a sequence marks its variant's set used (the engine's ``weights.lookup``); loads land as
the most recently used set.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .errors import MultimoeError


class SchedulerError(MultimoeError, ValueError):
    """A scheduler input that cannot describe a real state (a budget below 1, a sequence in two places)."""


@dataclass(frozen=True)
class SeqInfo:
    """One request as the scheduler sees it. ``cached``: tokens whose keys are in the KV cache;
    ``generated``: tokens sampled so far. A waiting request has both 0."""
    id: int
    variant: int
    prompt_len: int
    cached: int = 0
    generated: int = 0
    cancelled: bool = False

    @property
    def prefilling(self) -> bool:
        return self.cached < self.prompt_len


@dataclass(frozen=True)
class WeightSets:
    """The device's non-expert sets: ``resident`` maps variant -> set, least recently used first;
    ``loading`` holds the variants whose copy is in flight (their sets are taken); the rest are free."""
    num_sets: int
    resident: dict = field(default_factory=dict)
    loading: frozenset = frozenset()

    @property
    def free(self) -> int:
        return self.num_sets - len(self.resident) - len(self.loading)


@dataclass(frozen=True)
class SchedulerState:
    """Everything one step's decision depends on. ``waiting`` in arrival order, ``running`` in admission
    order; ``draining``: set -> the variant waiting for it (the previous plan's ``draining``)."""
    waiting: tuple
    running: tuple
    sets: WeightSets
    kv_rows_free: int
    draining: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Load:
    """Copy ``variant``'s set into a free set (``evict`` None) or into the idle set that holds ``evict``."""
    variant: int
    evict: int | None = None


@dataclass(frozen=True)
class Chunk:
    """Feed ``length`` tokens of sequence ``seq`` at positions ``start``..; ``logits``: this chunk ends the
    prompt or is a decode, so the step samples a token for it."""
    seq: int
    start: int
    length: int
    logits: bool


@dataclass(frozen=True)
class StepPlan:
    cancelled: tuple = ()   # ids of waiting or running requests to end as cancelled
    admit: tuple = ()       # ids of waiting requests to start (each takes a KV-cache row), in order
    loads: tuple = ()       # Load records, in the order to start them
    draining: dict = field(default_factory=dict)   # the drain map from now on: set -> waiting variant
    chunks: tuple = ()      # Chunk records: decodes first, then prompt chunks

    @property
    def runs(self) -> bool:
        """False when nothing can run this step (every request waits for a load)."""
        return bool(self.chunks)


class Scheduler:
    """The step policy (module docstring). ``max_seqs``: sequences running at once (None: the KV-cache rows
    alone limit it); ``max_step_tokens``: tokens of one step; ``prefetch``: waiting requests past the rows
    whose sets may start loading."""

    def __init__(self, max_step_tokens: int = 256, max_seqs: int | None = None, mix_variants: bool = True,
                 group_variants: bool = False, prefetch: int = 0):
        if max_step_tokens < 1:
            raise SchedulerError(f"max_step_tokens must be >= 1, got {max_step_tokens}")
        if max_seqs is not None and max_seqs < 1:
            raise SchedulerError(f"max_seqs must be >= 1 or None, got {max_seqs}")
        if prefetch < 0:
            raise SchedulerError(f"prefetch must be >= 0, got {prefetch}")
        self.max_step_tokens, self.max_seqs = max_step_tokens, max_seqs
        self.mix_variants, self.group_variants, self.prefetch = mix_variants, group_variants, prefetch

    def plan(self, state: SchedulerState) -> StepPlan:
        _check(state)
        cancelled = tuple(s.id for s in state.waiting + state.running if s.cancelled)
        waiting = [s for s in state.waiting if not s.cancelled]
        running = [s for s in state.running if not s.cancelled]
        sets = state.sets
        order = list(sets.resident.items())        # (variant, set), least recently used first
        loading, free = set(sets.loading), sets.free
        waiting_variants = {s.variant for s in waiting}
        draining = {k: u for k, u in state.draining.items() if u in waiting_variants and k in sets.resident.values()}
        busy = {sets.resident[s.variant] for s in running}
        rows = state.kv_rows_free + sum(1 for s in state.running if s.cancelled)
        if self.max_seqs is not None:
            rows = min(rows, self.max_seqs - len(running))
        only = running[0].variant if running and not self.mix_variants else None
        admit, loads, looked_ahead = [], [], 0

        def start_load(v: int) -> bool:
            """The set store's rule: already there or coming, else a free set, else the LRU idle one. Once
            ``v``'s set is coming, no set drains for it any more."""
            nonlocal free
            if v not in loading and all(u != v for u, _ in order):
                if free > 0:
                    free -= 1
                    loads.append(Load(v))
                else:
                    i = next((i for i, (_, k) in enumerate(order) if k not in busy), None)
                    if i is None:
                        return False
                    u, k = order.pop(i)
                    draining.pop(k, None)   # the set now goes to v: whoever waited for it asks again
                    loads.append(Load(v, evict=u))
                loading.add(v)
            for k in [k for k, u in draining.items() if u == v]:
                del draining[k]
            return True

        for s in self._candidates(waiting):
            if len(admit) >= rows:
                if looked_ahead >= self.prefetch:
                    break
                looked_ahead += 1
                if s.variant not in dict(order):
                    start_load(s.variant)
                continue
            if only is not None and s.variant != only:
                continue
            k = dict(order).get(s.variant)
            if k is None:
                if not start_load(s.variant) and not draining and order:
                    draining[order[0][1]] = s.variant
                continue
            if k in draining:
                continue
            admit.append(s)
            busy.add(k)
            order.remove((s.variant, k))
            order.append((s.variant, k))
            if not self.mix_variants:
                only = s.variant
        return StepPlan(cancelled=cancelled, admit=tuple(s.id for s in admit), loads=tuple(loads),
                        draining=draining, chunks=self._chunks(running + admit))

    def _candidates(self, waiting: list) -> list:
        if not self.group_variants:
            return waiting
        rank: dict[int, int] = {}
        for s in waiting:
            rank.setdefault(s.variant, len(rank))
        return sorted(waiting, key=lambda s: rank[s.variant])   # stable: arrival order within a variant

    def _chunks(self, seqs: list) -> tuple:
        budget, out = self.max_step_tokens, []
        for s in sorted(seqs, key=lambda s: s.prefilling):   # stable: decodes first, then prompt chunks
            if budget == 0:
                break
            if s.prefilling:
                n = min(budget, s.prompt_len - s.cached)
                out.append(Chunk(s.id, s.cached, n, s.cached + n == s.prompt_len))
            else:
                n = 1
                out.append(Chunk(s.id, s.cached, 1, True))
            budget -= n
        return tuple(out)


def _check(state: SchedulerState) -> None:
    ids = [s.id for s in state.waiting + state.running]
    if len(set(ids)) != len(ids):
        raise SchedulerError("a sequence id appears twice among the waiting and running sequences")
    if state.kv_rows_free < 0:
        raise SchedulerError(f"kv_rows_free must be >= 0, got {state.kv_rows_free}")
    if state.sets.free < 0:
        raise SchedulerError(f"{state.sets.num_sets} weight sets cannot hold {len(state.sets.resident)} resident "
                             f"and {len(state.sets.loading)} loading variants")
    for s in state.running:
        if s.variant not in state.sets.resident:
            raise SchedulerError(f"running sequence {s.id} uses variant {s.variant}, whose set is not resident")
    for s in state.waiting + state.running:
        if s.prompt_len < 1 or s.cached < 0 or s.generated < 0:
            raise SchedulerError(f"sequence {s.id}: prompt_len must be >= 1 and cached, generated >= 0")
