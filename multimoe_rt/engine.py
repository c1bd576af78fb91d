"""Continuous batching over every variant at once: request handles and the step loop that carries out the
scheduler's plans.

Each step the engine (1) finishes weight-set loads whose copy landed, (2) asks ``scheduler.Scheduler`` for the
step's plan (from its waiting and running requests, the resident sets and the free KV-cache rows) and carries it
out: cancelled requests end, admitted ones take a KV-cache row, set loads start on the side (the paper's partial
reconfiguration, while the batch keeps running), (3) runs ONE ``BatchedModel`` forward over the plan's chunks (a
decode token for each running sequence, then prompt chunks within the step's token budget, all variants mixed),
(4) samples every sequence in one batched call (``sampling.sample_batch``: per-sequence ``SamplingParams`` and
generator), streams the tokens, and retires finished sequences (EOS, stop token or sequence, max tokens, cancel),
freeing their KV-cache row. The policy itself (FCFS, drains, evictions, budgets) lives in ``scheduler.py``, which
the simulator drives too.

Ownership, in one sentence: one engine thread owns every sequence, the KV cache and the forward;
other threads only enqueue requests and set cancel flags, under ``Engine._cond``.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
import warnings
from collections import deque

import torch

from .errors import EngineClosed, EngineDead, RequestError, StepError
from .families import get_family
from .forward import BatchedModel, BatchEntry
from .kv_cache import KVCache
from .request_checks import as_token_ids
from .sampling import Row, SamplingParams, eos_ids, make_generator, sample_batch
from .scheduler import Scheduler, SchedulerState, SeqInfo, WeightSets
from .weights import VariantWeights

log = logging.getLogger(__name__)
_END = object()


DEFAULT_MAX_LEN = 512  # the KV cache reserves max_seqs x max_len positions: long-context models opt in


def model_positions(config: dict) -> int | None:
    """Positions the model attends over: ``max_position_embeddings``, times the factor of dynamic NTK scaling
    (which extends past it; the other scalings' configs already state the extended length)."""
    n = config.get("max_position_embeddings")
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if n and rope.get("rope_type", rope.get("type")) == "dynamic" and rope.get("factor"):
        n = int(n * rope["factor"])
    return n


class QueueFull(RequestError):
    """The waiting queue is at ``max_queue``: try again later (HTTP 429/503)."""


class RequestHandle:
    """A submitted request: a token stream (``for t in h``, ``async for t in h``), ``cancel()``, ``result()``.

    ``params``: its ``SamplingParams``; ``eos``: the EOS ids it stops at (its own, else the model's).
    ``logprobs``: None unless ``params.logprobs`` is set; then one ``(logprob, [(token, logprob), ...])`` per
    generated token, from the log-softmax after penalties, before temperature and top-k/top-p/min-p.
    Timestamps are ``time.perf_counter()`` seconds: ``arrival``, ``admitted``, ``first_token``, ``finish``.
    """

    def __init__(self, rid: int, variant: str, v: int, prompt: list, params: SamplingParams, eos: tuple):
        self.id, self.variant, self.v, self.prompt, self.params, self.eos = rid, variant, v, prompt, params, eos
        self.tokens: list[int] = []
        self.logprobs: list | None = None if params.logprobs is None else []
        self.finish_reason: str | None = None   # "stop", "length", "cancelled", "error"
        self.error: BaseException | None = None
        self.arrival, self.admitted, self.first_token, self.finish = time.perf_counter(), None, None, None
        self.cancelled = False
        self._lock = threading.Lock()
        self._sinks: list = []
        self._done = threading.Event()

    # the pre-SamplingParams attribute names
    max_new_tokens = property(lambda self: self.params.max_new_tokens)
    temperature = property(lambda self: self.params.temperature)
    top_p = property(lambda self: self.params.top_p)
    seed = property(lambda self: self.params.seed)
    stop = property(lambda self: self.params.stop)
    ignore_eos = property(lambda self: self.params.ignore_eos)
    eos_token_id = property(lambda self: self.eos)

    # -- called by the engine thread ----------------------------------------------------------
    def _emit(self, token: int, logprob=None) -> None:
        """Append and stream a token; every sink gets it even if one raises (then this raises)."""
        with self._lock:
            if self.first_token is None:
                self.first_token = time.perf_counter()
            self.tokens.append(token)
            if self.logprobs is not None:
                self.logprobs.append(logprob)
            _call_all(self._sinks, token)

    def _close(self, reason: str, error: BaseException | None = None) -> None:
        """Finish the request; never raises, so a broken sink cannot leave a waiter hanging."""
        with self._lock:
            if self._done.is_set():
                return
            self.finish_reason, self.error, self.finish = reason, error, time.perf_counter()
            try:
                _call_all(self._sinks, _END)
            except Exception:  # noqa: BLE001 - the consumer is gone; result() still answers
                log.warning("request %s: a stream consumer failed at close", self.id, exc_info=True)
            finally:
                self._done.set()

    def _subscribe(self, sink) -> None:
        with self._lock:  # replay what came before, then follow: no token lost or doubled
            for t in self.tokens:
                sink(t)
            if self._done.is_set():
                sink(_END)
            else:
                self._sinks.append(sink)

    # -- public -----------------------------------------------------------------------------
    @property
    def done(self) -> bool:
        return self._done.is_set()

    def cancel(self) -> None:
        """Stop generating; the sequence's KV-cache row is freed at the engine's next step."""
        self.cancelled = True

    def __iter__(self):
        q: queue.Queue = queue.Queue()
        self._subscribe(q.put)
        while (item := q.get()) is not _END:
            yield item
        if self.error is not None:
            raise self.error

    async def __aiter__(self):
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        self._subscribe(lambda item: loop.call_soon_threadsafe(q.put_nowait, item))
        while (item := await q.get()) is not _END:
            yield item
        if self.error is not None:
            raise self.error

    def result(self, timeout: float | None = None) -> "RequestHandle":
        """Wait until finished; raises the request's error, if it failed."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"request {self.id} not finished after {timeout} s")
        if self.error is not None:
            raise self.error
        return self

    @property
    def ttft(self) -> float:
        return self.first_token - self.arrival

    @property
    def turnaround(self) -> float:
        return self.finish - self.arrival


def _call_all(sinks, item) -> None:
    first = None
    for sink in sinks:
        try:
            sink(item)
        except Exception as e:  # noqa: BLE001 - the other consumers still get the item
            first = first or e
    if first is not None:
        raise first


class _Sequence:
    def __init__(self, h: RequestHandle, weight_set: int, kv_row: int, device):
        self.h, self.set, self.kv_row = h, weight_set, kv_row
        self.cached = 0   # tokens whose keys are in the cache
        self.generator = make_generator(h.params, device)
        self.end_ids = (() if h.params.ignore_eos else h.eos) + h.params.stop_token_ids

    @property
    def prefilling(self) -> bool:
        return self.cached < len(self.h.prompt)

    def row(self) -> Row:
        return Row(self.h.params, self.h.prompt, self.h.tokens, self.generator, self.end_ids)


class Engine:
    """Continuous batching of mixed-variant requests over one ``BatchedModel`` (every decoder family:
    ``weights.batched_families()``); the Switch encoder-decoder, which the batched forward does not cover, runs
    through the fallback ``sequential_forward.SequentialModel`` (one sequence at a time, transformers' own model).

    ``max_seqs``: sequences running at once (KV-cache rows). ``max_step_tokens``: token budget of one
    step (decodes first, then prompt chunks). ``mix_variants=False`` is the per-variant batching
    baseline: a batch holds one variant; the next variant starts when the batch drains.
    ``group_variants``: admit waiting requests variant by variant (variants in the order of their oldest
    request) instead of strictly by arrival. Under load a step then holds fewer variants, so it reads
    fewer distinct experts; it stays first-come first-served at the level of variants, so nothing starves.
    ``prefetch``: once KV-cache rows run out, the next ``prefetch`` waiting requests may still start their
    variants' set loads into idle sets (the batch-1 system's look-ahead; ``max_seqs=1, prefetch=1`` is it).

    What a request gets, exactly. Its tokens come from its own variant's weights and its own sampling state
    (``SamplingParams``; a seeded request has its own generator). Batching is not bit-invariant: which other
    sequences share a step changes the reduction order of the matmuls, which moves fp32 logits by about 1e-7
    relative (more in bf16/fp16). So greedy tokens equal those of the request run alone unless two of its top
    logits are within about 1e-6 of each other (fp32); a seeded sample likewise, unless its uniform draw falls
    within that distance of a boundary of the cumulative distribution.

    Failures stay with the requests they concern: a stage of a step that fails (admission, set load, forward,
    sampling, emit, retire) ends those requests with a ``StepError`` naming the stage, and the loop goes on.
    If the loop dies anyway, every waiting and later request fails with ``EngineDead`` and ``health()`` is
    ``(False, reason)``.
    """

    def __init__(self, model: BatchedModel, max_step_tokens: int = 256, max_queue: int = 4096,
                 mix_variants: bool = True, group_variants: bool = False, eos_token_id: int | list | None = None,
                 prefetch: int = 0):
        self.scheduler = Scheduler(max_step_tokens, mix_variants=mix_variants, group_variants=group_variants,
                                   prefetch=prefetch)   # max_seqs: the KV cache's free rows bound admission
        self.model, self.weights, self.kv = model, model.weights, model.kv
        self.names, self.vocab_size = model.weights.names, model.weights.embed.shape[1]
        self.max_step_tokens, self.max_queue, self.mix = max_step_tokens, max_queue, mix_variants
        self.group_variants = group_variants
        self.eos_token_id, self.eos = eos_token_id, eos_ids(eos_token_id)
        self.device = model.slab.device
        self.waiting: deque[RequestHandle] = deque()
        self.running: list[_Sequence] = []
        self.draining: dict[int, int] = {}   # weight set -> the variant waiting for it (the last plan's)
        self._loading: set[int] = set()      # variants whose set load this engine started and poll has not reported
        self.stats = {"steps": 0, "tokens": 0, "finished": 0, "failed": 0, "cancelled": 0}
        self._ids = itertools.count()
        self._cond = threading.Condition()
        self._closing, self._drain = False, True
        self._dead: str | None = None   # why the loop died; then every request fails with EngineDead
        self._thread = threading.Thread(target=self._loop, name="multimoe-engine", daemon=True)
        self._thread.start()

    @classmethod
    def from_pretrained(cls, dirs, names=None, plan=None, share: float | None = None, budget=None,
                        resident_sets: int | None = None, max_seqs: int = 64, max_len: int | None = None,
                        device="cpu", dtype=torch.float32, backend=None, **engine_kwargs) -> "Engine":
        """Load variant directories, plan the slab (``share``/``budget``/``plan`` as in ``plan.make_plan``;
        default: every variant keeps its own experts), and start the engine.

        ``max_len`` (prompt + new tokens per sequence) defaults to the model's positions, at most 512; a value
        above the model's positions is clamped to them, with a warning. EOS: generation_config.json's, else
        config.json's (an id or a list), of the first variant."""
        from . import plan as plan_mod
        from .checkpoint import VariantSet

        vs = dirs if isinstance(dirs, VariantSet) else VariantSet.from_dirs(dirs, names=names)
        if isinstance(plan, (str, bytes)) or hasattr(plan, "__fspath__"):
            plan = plan_mod.Plan.from_json(plan, vs)
        elif plan is None:
            plan = plan_mod.make_plan(vs, budget_bytes=budget, share=0.0 if budget is None and share is None
                                      else share, dtype=dtype)
        cfg = vs[0].config
        positions = model_positions(cfg)
        if max_len is None:
            max_len = min(DEFAULT_MAX_LEN, positions or DEFAULT_MAX_LEN)
        elif positions is not None and max_len > positions:
            warnings.warn(f"max_len={max_len} is above the model's {positions} positions (max_position_embeddings"
                          f"{' x dynamic rope factor' if positions != cfg.get('max_position_embeddings') else ''}); "
                          f"clamped to {positions}", UserWarning, stacklevel=2)
            max_len = positions
        engine_kwargs.setdefault("eos_token_id", list(vs[0].eos_token_ids) or None)  # variants share a tokenizer
        if get_family(vs.family).batched is None:  # the fallback: one sequence at a time through transformers
            from .model import MultiVariantModel
            from .sequential_forward import SequentialModel

            mv = MultiVariantModel(vs, plan, device=device, dtype=dtype, backend=backend)
            return cls(SequentialModel(mv, max_seqs, max_len), **engine_kwargs)
        slab, table = plan_mod.load_slab(plan, vs, device=device, dtype=dtype)
        weights = VariantWeights.from_variant_set(vs, resident_sets or len(vs), device=device, dtype=dtype)
        kv = KVCache.for_config(cfg, max_seqs, max_len, dtype=dtype, device=device)
        return cls(BatchedModel(cfg, weights, slab, table, kv, backend), **engine_kwargs)

    # -- submission (any thread) --------------------------------------------------------------
    def submit(self, variant: str, prompt, params: SamplingParams | None = None, **kwargs) -> RequestHandle:
        """Queue a request. ``params`` and/or keyword fields of ``SamplingParams`` (keywords override ``params``).

        Bad input raises ``RequestError`` here (naming the field), a full queue ``QueueFull``, a shut-down
        engine ``EngineClosed`` and a dead one ``EngineDead``.
        """
        if not isinstance(variant, str) or variant not in self.names:
            raise RequestError(f"unknown variant {variant!r}; this engine serves {self.names}")
        prompt = as_token_ids(prompt)
        if not prompt:
            raise RequestError("empty prompt: give at least one token")
        if min(prompt) < 0 or max(prompt) >= self.vocab_size:
            raise RequestError(f"prompt token ids must be in [0, {self.vocab_size}), got [{min(prompt)}, {max(prompt)}]")
        if params is not None and not isinstance(params, SamplingParams):
            raise RequestError(f"params must be a SamplingParams, got {type(params).__name__}")
        params = (params or SamplingParams()).replace(self.vocab_size, **kwargs)
        if len(prompt) + params.max_new_tokens > self.kv.max_len:
            raise RequestError(f"prompt ({len(prompt)} tokens) + max_new_tokens ({params.max_new_tokens}) exceeds the "
                               f"context of {self.kv.max_len} tokens")
        eos = self.eos if params.eos_token_id is None else eos_ids(params.eos_token_id)
        with self._cond:
            if self._dead is not None:
                raise EngineDead(self._dead)
            if self._closing:
                raise EngineClosed("the engine is shut down")
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"{len(self.waiting)} requests already waiting (max_queue={self.max_queue})")
            h = RequestHandle(next(self._ids), variant, self.names.index(variant), prompt, params, eos)
            self.waiting.append(h)
            self._cond.notify()
        return h

    def health(self) -> tuple[bool, str]:
        """``(True, "ok")`` while the loop serves; else ``(False, reason)``: the loop died (and why), or the
        engine is shutting down. A server answers 503 with the reason when it is False."""
        with self._cond:
            if self._dead is not None:
                return False, self._dead
            if self._closing:
                return False, "the engine is shutting down"
        if not self._thread.is_alive():
            return False, "the engine thread is not running"
        return True, "ok"

    def generate(self, variant: str, prompt, **kwargs) -> list[int]:
        """Submit and wait: the new token ids."""
        return self.submit(variant, prompt, **kwargs).result().tokens

    def load(self) -> dict:
        """Running and waiting sequences now (for metrics and routing)."""
        with self._cond:
            return {"running": len(self.running), "waiting": len(self.waiting)}

    def memory_footprint(self) -> dict:
        slab, sets, kv = self.model.slab.nbytes, self.weights.device_nbytes, self.kv.nbytes
        return {"slab_bytes": slab, "non_expert_device_bytes": sets, "kv_cache_bytes": kv,
                "total_device_bytes": slab + sets + kv}

    def shutdown(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stop taking requests; finish (``drain``) or cancel what is queued and running, then stop."""
        with self._cond:
            self._closing, self._drain = True, drain
            self._cond.notify()
        self._thread.join(timeout)
        self.weights.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.shutdown()

    # -- the step loop (engine thread only) ---------------------------------------------------
    # Every stage of a step (admission, set load, forward, sampling, emit, retire) contains its own failures:
    # the requests a failure concerns get a StepError naming the stage, the others and the loop go on.
    def _loop(self) -> None:
        try:
            while True:
                with self._cond:
                    while not (self.waiting or self.running or self._closing):
                        self._cond.wait()
                    if self._closing and not self._drain:
                        for h in self.waiting:
                            h._close("cancelled", EngineClosed("engine shut down before the request ran"))
                        self.waiting.clear()
                        for s in self.running:
                            s.h.cancel()
                    if self._closing and not (self.waiting or self.running):
                        return
                try:
                    ran = self._step()
                except Exception as e:  # noqa: BLE001 - outside every stage's guard: fail the step's sequences
                    log.exception("engine step failed")
                    for s in list(self.running):
                        self._retire(s, "error", StepError(f"request {s.h.id}: engine step failed: {e!r}"))
                    ran = True
                if not ran:
                    self.weights.wait_loads(timeout=0.01)  # nothing to run: only weight loads are pending
        except BaseException as e:  # noqa: BLE001 - the loop is gone: nobody may wait for it
            log.critical("engine loop died", exc_info=True)
            self._die(f"the engine loop died: {type(e).__name__}: {e}")

    def _die(self, reason: str) -> None:
        with self._cond:
            self._dead = reason
            handles = list(self.waiting) + [s.h for s in self.running]
            self.waiting.clear()
            self.running.clear()
        self._fail(handles, EngineDead(reason))

    def _fail(self, handles, error: BaseException) -> None:
        for h in handles:
            h._close("error", error)
            self.stats["failed"] += 1

    def _poll_loads(self) -> None:
        try:
            done = self.weights.poll()
        except Exception as e:  # noqa: BLE001 - no load can be trusted: fail whoever waits for one
            log.exception("polling weight loads failed")
            with self._cond:
                failed = [h for h in self.waiting if self.weights.lookup(h.v) is None]
                for h in failed:
                    self.waiting.remove(h)
            self._fail(failed, StepError(f"set load failed: {e!r}"))
            return
        for v, error in done:
            self._loading.discard(v)
            if error is not None:
                self._fail(self._take_waiting(lambda h: h.v == v), error)

    def _take_waiting(self, which) -> list[RequestHandle]:
        with self._cond:
            out = [h for h in self.waiting if which(h)]
            for h in out:
                self.waiting.remove(h)
        return out

    def _state(self) -> SchedulerState:
        """The scheduler's input, read from the engine's own state (engine thread; ``_cond`` held)."""
        resident = self.weights.resident()
        loading = frozenset(v for v in self._loading if v not in resident)
        waiting = tuple(SeqInfo(h.id, h.v, len(h.prompt), cancelled=h.cancelled) for h in self.waiting)
        running = tuple(SeqInfo(s.h.id, s.h.v, len(s.h.prompt), s.cached, len(s.h.tokens), s.h.cancelled)
                        for s in self.running)
        return SchedulerState(waiting, running, WeightSets(self.weights.num_sets, resident, loading),
                              self.kv.num_free, self.draining)

    def _step(self) -> bool:
        """One iteration: ask the scheduler for the plan and carry it out; False when nothing could run
        (every waiting request needs a set being loaded)."""
        self._poll_loads()
        with self._cond:
            plan = self.scheduler.plan(self._state())
            gone = set(plan.cancelled)
            for h in [h for h in self.waiting if h.id in gone]:
                self.waiting.remove(h)
                h._close("cancelled")
                self.stats["cancelled"] += 1
        for s in [s for s in self.running if s.h.id in gone]:
            self._retire(s, "cancelled")
        self._admit(plan.admit)
        self._start_loads(plan.loads)
        self.draining = plan.draining
        if not plan.runs:
            return False
        by_id = {s.h.id: s for s in self.running}
        entries, fed = [], []
        for c in plan.chunks:
            s = by_id.get(c.seq)
            if s is None:   # its admission failed
                continue
            chunk = s.h.prompt[c.start:c.start + c.length] if s.prefilling else [s.h.tokens[-1]]
            entries.append(BatchEntry(s.set, s.h.v, s.kv_row, chunk, c.start, logits=c.logits))
            fed.append(s)
        if not entries:   # every sequence the plan fed failed its admission
            return True
        order = sorted(range(len(entries)), key=lambda i: entries[i].set)
        entries, fed = [entries[i] for i in order], [fed[i] for i in order]
        logits, sampled, failed = self._forward(entries, fed)
        for s, e in failed:
            self._retire(s, "error", StepError(f"request {s.h.id}: forward failed: {e!r}"))
        gone = {id(s) for s, _ in failed}
        for e, s in zip(entries, fed):
            if id(s) not in gone:
                s.cached += len(e.tokens)
        if sampled:
            for s, token, lp in self._sample(logits, sampled):
                self._deliver(s, token, lp)
        self.stats["steps"] += 1
        return True

    def _admit(self, ids) -> None:
        """Start the admitted requests, in the plan's order: each takes a KV-cache row and marks its variant's
        set used. A failure ends only that request."""
        with self._cond:
            by_id = {h.id: h for h in self.waiting}
        for rid in ids:
            h = by_id[rid]
            try:
                ws = self.weights.lookup(h.v)
                if ws is None:   # the plan was made from this very state: only a broken store gets here
                    raise StepError(f"variant {h.variant!r} is not resident")
                row = self.kv.allocate()
                try:
                    s = _Sequence(h, ws, row, self.device)
                except BaseException:
                    self.kv.free(row)
                    raise
            except Exception as e:  # noqa: BLE001 - this request fails, the queue goes on
                log.exception("admitting request %s failed", h.id)
                self._fail(self._take_waiting(lambda x: x is h), StepError(f"request {h.id}: admission failed: {e!r}"))
                continue
            with self._cond:
                self.waiting.remove(h)
                self.running.append(s)
            h.admitted = time.perf_counter()

    def _start_loads(self, loads) -> None:
        """Start the planned set loads; the store picks the set by the scheduler's own rule (a free one, else
        the least recently used idle one). A load that cannot start fails the requests waiting for it."""
        busy = {s.set for s in self.running}
        for load in loads:
            try:
                if self.weights.start_load(load.variant, busy):
                    self._loading.add(load.variant)
            except Exception as e:  # noqa: BLE001 - the requests for this variant fail, the others go on
                log.exception("starting the load of variant %s failed", load.variant)
                self._fail(self._take_waiting(lambda h: h.v == load.variant),
                           StepError(f"variant {self.names[load.variant]!r}: admission failed: set load: {e!r}"))

    def _forward(self, entries, fed):
        """``(logits [n, V], the n sequences they belong to, [(sequence, error)])``. A failed forward is
        retried in halves down to single sequences, so only the sequences that fail alone fail (rewriting
        a step's keys at the same positions is harmless)."""
        try:
            logits = self.model.forward(self.model.batch(entries)).float()
            return logits, [s for e, s in zip(entries, fed) if e.logits], []
        except Exception as e:  # noqa: BLE001 - isolate the sequences that cause it
            if len(entries) == 1:
                log.error("forward failed for request %s", fed[0].h.id, exc_info=True)
                return None, [], [(fed[0], e)]
            log.warning("a forward over %d sequences failed (%r); retrying in halves", len(entries), e)
        m = len(entries) // 2
        parts = [self._forward(entries[:m], fed[:m]), self._forward(entries[m:], fed[m:])]
        logits = [p[0] for p in parts if p[0] is not None]
        return (torch.cat(logits) if logits else None), parts[0][1] + parts[1][1], parts[0][2] + parts[1][2]

    def _sample(self, logits, seqs):
        """``[(sequence, token, logprob entry)]`` from one batched sampler call; if it fails, each row alone,
        so only the rows that fail alone fail."""
        rows = [s.row() for s in seqs]
        try:
            tokens, lps = sample_batch(logits, rows)
            return list(zip(seqs, tokens, lps))
        except Exception as e:  # noqa: BLE001 - isolate the rows that cause it
            log.warning("sampling %d rows failed (%r); sampling each alone", len(rows), e)
        out = []
        for i, (s, r) in enumerate(zip(seqs, rows)):
            try:
                tokens, lps = sample_batch(logits[i:i + 1], [r])
                out.append((s, tokens[0], lps[0]))
            except Exception as e:  # noqa: BLE001
                log.error("sampling failed for request %s", s.h.id, exc_info=True)
                self._retire(s, "error", StepError(f"request {s.h.id}: sampling failed: {e!r}"))
        return out

    def _deliver(self, s: _Sequence, token: int, logprob) -> None:
        try:
            s.h._emit(token, logprob)
            self.stats["tokens"] += 1
            reason = self._finished(s.h, token)
        except Exception as e:  # noqa: BLE001 - its consumer is broken: this request ends, the others go on
            log.error("emitting a token of request %s failed", s.h.id, exc_info=True)
            self._retire(s, "error", StepError(f"request {s.h.id}: emit failed: {e!r}"))
            return
        if reason:
            self._retire(s, reason)

    @staticmethod
    def _finished(h: RequestHandle, token: int) -> str | None:
        p = h.params
        if len(h.tokens) >= p.min_tokens:  # vLLM: no stop of any kind before min_tokens
            if (token in h.eos and not p.ignore_eos) or token in p.stop_token_ids:
                return "stop"
            if any(tuple(h.tokens[-len(s):]) == s for s in p.stop):
                return "stop"
        if len(h.tokens) >= p.max_new_tokens:
            return "length"
        return None

    def _retire(self, s: _Sequence, reason: str, error: BaseException | None = None) -> None:
        """Take ``s`` out of the batch and finish its request; if freeing its KV-cache row fails, the row stays out
        of the free list (never handed out twice) and the request fails."""
        if s in self.running:
            self.running.remove(s)
        try:
            self.kv.free(s.kv_row)
        except Exception as e:  # noqa: BLE001
            log.error("retiring request %s failed", s.h.id, exc_info=True)
            if error is None:
                reason, error = "error", StepError(f"request {s.h.id}: retire failed: {e!r}")
        s.h._close(reason, error)
        self.stats["cancelled" if reason == "cancelled" else "failed" if error is not None else "finished"] += 1
