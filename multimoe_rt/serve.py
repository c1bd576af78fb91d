"""Serving engine: a request queue fed by any number of client threads, batch-1 workers, FCFS with
look-ahead prefetch (the paper's Algorithm 2 orchestration) or a bounded variant-affinity policy.

The engine drives a *system*: anything with

    names                      variant names it serves
    prefetch(variant)          start making ``variant`` ready in the background (may be a no-op)
    generate(variant, input_ids [1,T], max_new_tokens, eos_token_id, do_sample, temperature, top_p,
             streamer=None, **kwargs) -> new token ids [1, n]
    stats() -> dict            at least switches, bytes_copied
    memory_footprint() -> dict at least total_device_bytes
    lanes (optional, default 1), lane_of(variant) -> int, enter_lane(lane) (optional, called once in
                               each lane's worker thread): independent instances (the partitioned baseline)

``OursSystem`` wraps MultiVariantModel; baselines live in ``baselines.py``. Each lane has one queue and one
worker thread serving one request at a time. Timestamps are ``time.perf_counter()`` seconds.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
import time
from concurrent.futures import CancelledError, Future
from dataclasses import dataclass, field

import numpy as np
import torch

from .errors import EngineClosed, RequestCancelled, RequestError  # noqa: F401  (re-exported for callers)
from .request_checks import as_bool, as_int, as_real, as_token_ids
from .tokenizer import ByteTokenizer

POLICIES = ("fcfs", "affinity")


class RequestFuture(Future):
    """The Future ``Engine.submit`` returns: a cancelled one raises ``RequestCancelled`` (a CancelledError)
    that says who cancelled it, instead of a bare CancelledError."""

    def __init__(self, request: "Request | None" = None):
        super().__init__()
        self.request = request
        self.cancel_reason: str | None = None

    def _why(self) -> str:
        rid = self.request.id if self.request is not None else "?"
        return self.cancel_reason or f"request {rid} was cancelled by the client before it ran"

    def result(self, timeout=None):
        try:
            return super().result(timeout)
        except CancelledError as e:
            if isinstance(e, RequestCancelled):
                raise
            raise RequestCancelled(self._why()) from None

    def exception(self, timeout=None):
        try:
            return super().exception(timeout)
        except CancelledError as e:
            if isinstance(e, RequestCancelled):
                raise
            raise RequestCancelled(self._why()) from None


@dataclass
class Request:
    variant: str
    prompt: list | str                 # token ids, or text encoded with the byte tokenizer at submission
    max_new_tokens: int = 25
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    eos_token_id: int | None = None
    ignore_eos: bool = False           # always produce max_new_tokens (the paper's fixed 25-token outputs)
    seed: int | None = None            # torch.manual_seed before sampling (single-lane engines only)
    # filled by the engine
    id: int = -1
    input_ids: list = field(default_factory=list)
    tokens: list = field(default_factory=list)
    arrival: float | None = None
    start: float | None = None
    first_token: float | None = None
    finish: float | None = None
    error: BaseException | None = None

    @property
    def ttft(self) -> float:
        return self.first_token - self.arrival

    @property
    def turnaround(self) -> float:
        return self.finish - self.arrival

    @property
    def queue_wait(self) -> float:
        return self.start - self.arrival

    @property
    def ok(self) -> bool:
        return self.error is None and self.finish is not None


class FirstTokenStreamer:
    """transformers streamer that stamps the time of the first generated token.

    ``generate`` first puts the prompt (decoder-only) or the decoder start ids (seq2seq), then one
    tensor per step; the second put is the first new token. ``on_token`` runs after each new token
    and after the prompt put (the engine uses it for look-ahead prefetch while the request still runs).
    """

    def __init__(self, on_token=None):
        self.calls = 0
        self.first_token: float | None = None
        self.on_token = on_token

    def put(self, value):
        self.calls += 1
        if self.calls == 2 and self.first_token is None:
            self.first_token = time.perf_counter()
        if self.on_token is not None:  # from the first put on: generate has already switched variant
            self.on_token()

    def end(self):
        pass


class OursSystem:
    """MultiVariantModel as an engine system: consolidated slab + partial reconfiguration + prefetch."""

    kind = "ours"

    def __init__(self, mv):
        self.mv = mv
        self.names = list(mv.names)
        cfg = mv.model.config
        self.vocab_size = getattr(cfg, "vocab_size", None)
        self.max_positions = getattr(cfg, "max_position_embeddings", None)

    def prefetch(self, variant) -> None:
        self.mv.prefetch(variant)

    def generate(self, variant, input_ids, max_new_tokens=25, eos_token_id=None, do_sample=False, temperature=1.0,
                 top_p=1.0, streamer=None, **kwargs):
        return self.mv.generate(variant, input_ids, max_new_tokens=max_new_tokens, eos_token_id=eos_token_id,
                                do_sample=do_sample, temperature=temperature, top_p=top_p, streamer=streamer,
                                **kwargs)

    def stats(self) -> dict:
        s = self.mv.store.stats
        return {"switches": s["switches"], "bytes_copied": s["bytes_copied"],
                "bytes_discarded": s["bytes_discarded"]}  # copied by a prefetch that was then not used

    def memory_footprint(self) -> dict:
        return dict(self.mv.memory_footprint())


class Engine:
    """Queue + batch-1 worker(s) over a system. ``submit`` returns a Future resolving to the Request.

    policy "fcfs": oldest first. "affinity": oldest request of the variant just served first, unless the
    oldest queued request has waited more than ``max_wait_s`` (then it goes next: nobody starves).
    ``lookahead``: while a request runs, prefetch the variant the policy would pick next.
    """

    def __init__(self, system, policy: str = "fcfs", max_wait_s: float = 0.5, lookahead: bool = True,
                 max_prompt_tokens: int | None = None, max_new_tokens_limit: int = 1024, tokenizer=None):
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
        if max_wait_s < 0:
            raise ValueError(f"max_wait_s must be >= 0, got {max_wait_s}")
        self.system, self.policy, self.max_wait_s, self.lookahead = system, policy, max_wait_s, lookahead
        self.tokenizer = tokenizer or ByteTokenizer()
        self.max_positions = getattr(system, "max_positions", None)
        self.max_prompt_tokens = max_prompt_tokens or (self.max_positions - 1 if self.max_positions else 4096)
        self.max_new_tokens_limit = max_new_tokens_limit
        self.vocab_size = getattr(system, "vocab_size", None)
        self.names = list(system.names)
        self.num_lanes = int(getattr(system, "lanes", 1))
        self._cond = threading.Condition()
        self._queues: list[list[tuple[Request, Future]]] = [[] for _ in range(self.num_lanes)]
        self._last_variant: list[str | None] = [None] * self.num_lanes
        self._prefetched: list[str | None] = [None] * self.num_lanes
        self._ids = itertools.count()
        self._closed = False
        self._drain = True
        self.served = 0
        self._workers = [threading.Thread(target=self._work, args=(lane,), name=f"multimoe-engine-lane{lane}",
                                          daemon=True) for lane in range(self.num_lanes)]
        for w in self._workers:
            w.start()

    # -- submission ---------------------------------------------------------------------------
    def _prompt_ids(self, prompt) -> list[int]:
        """Text (byte tokenizer), or token ids: a list/tuple of integers, a 1-D (or [1, T]) integer tensor/array."""
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt)
        return as_token_ids(prompt, "a prompt is text or a sequence of integer token ids")

    def _validate(self, r: Request) -> None:
        if not isinstance(r.variant, str) or r.variant not in self.names:
            raise RequestError(f"unknown variant {r.variant!r}; this engine serves {self.names}")
        ids = self._prompt_ids(r.prompt)
        r.max_new_tokens = as_int("max_new_tokens", r.max_new_tokens, 1, self.max_new_tokens_limit)
        r.do_sample = as_bool("do_sample", r.do_sample)
        r.ignore_eos = as_bool("ignore_eos", r.ignore_eos)
        r.temperature, r.top_p = as_real("temperature", r.temperature), as_real("top_p", r.top_p)
        if r.eos_token_id is not None:
            r.eos_token_id = as_int("eos_token_id", r.eos_token_id, 0,
                                     None if self.vocab_size is None else self.vocab_size - 1)
        if r.seed is not None:
            r.seed = as_int("seed", r.seed, 0, 2**63 - 1)
        if not ids:
            raise RequestError("empty prompt: give at least one token")
        if len(ids) > self.max_prompt_tokens:
            raise RequestError(f"prompt of {len(ids)} tokens is over the limit of {self.max_prompt_tokens}")
        if self.vocab_size is not None and not all(0 <= i < self.vocab_size for i in ids):
            bad = next(i for i in ids if not 0 <= i < self.vocab_size)
            raise RequestError(f"prompt token id {bad} outside the vocabulary [0, {self.vocab_size})")
        if self.max_positions and len(ids) + r.max_new_tokens > self.max_positions:
            raise RequestError(f"prompt ({len(ids)}) + max_new_tokens ({r.max_new_tokens}) exceeds the model's "
                               f"{self.max_positions} positions")
        if r.do_sample and not (r.temperature > 0 and 0 < r.top_p <= 1):
            raise RequestError(f"sampling needs temperature > 0 and top_p in (0, 1], "
                               f"got temperature={r.temperature}, top_p={r.top_p}")
        r.input_ids = ids

    def submit(self, request: Request | str, prompt=None, **kwargs) -> Future:
        """``submit(Request(...))`` or ``submit(variant, prompt, max_new_tokens=..., ...)``."""
        if isinstance(request, Request):
            r = request
        else:
            try:
                r = Request(request, prompt, **kwargs)
            except TypeError as e:  # an unknown keyword
                raise RequestError(f"bad request: {e}") from None
        self._validate(r)  # raises RequestError; nothing was queued
        fut = RequestFuture(r)
        with self._cond:
            if self._closed:
                raise EngineClosed("the engine is shut down; submit to a new Engine")
            r.id = next(self._ids)
            r.arrival = time.perf_counter()
            self._queues[self._lane(r.variant)].append((r, fut))
            self._cond.notify_all()
        return fut

    def _lane(self, variant) -> int:
        return int(self.system.lane_of(variant)) if self.num_lanes > 1 else 0

    # -- scheduling ------------------------------------------------------------------------------
    def _pick(self, lane: int, now: float) -> int:
        """Index into the lane's queue of the request to serve next (queue non-empty)."""
        q = self._queues[lane]
        if self.policy == "fcfs" or len(q) == 1:
            return 0
        if now - q[0][0].arrival > self.max_wait_s:
            return 0
        last = self._last_variant[lane]
        return next((i for i, (r, _) in enumerate(q) if r.variant == last), 0)

    def _lookahead(self, lane: int, current: str) -> None:
        """Prefetch the variant the policy would serve next (called between decode steps)."""
        with self._cond:
            q = self._queues[lane]
            if not q:
                return
            self._last_variant[lane] = current  # _pick looks at the variant being served
            nxt = q[self._pick(lane, time.perf_counter())][0].variant
        if nxt != current and nxt != self._prefetched[lane]:
            self._prefetched[lane] = nxt
            self.system.prefetch(nxt)

    def _work(self, lane: int) -> None:
        enter = getattr(self.system, "enter_lane", None)
        ctx = enter(lane) if enter is not None else contextlib.nullcontext()
        with ctx:
            while True:
                with self._cond:
                    while not self._queues[lane] and not self._closed:
                        self._cond.wait()
                    if not self._queues[lane]:
                        return  # closed and drained
                    if self._closed and not self._drain:
                        return
                    r, fut = self._queues[lane].pop(self._pick(lane, time.perf_counter()))
                    self._last_variant[lane] = r.variant
                if not fut.set_running_or_notify_cancel():
                    continue  # the client cancelled it while queued
                self._run(lane, r, fut)

    def _run(self, lane: int, r: Request, fut: Future) -> None:
        r.start = time.perf_counter()
        self._prefetched[lane] = None
        hook = (lambda: self._lookahead(lane, r.variant)) if self.lookahead else None
        streamer = FirstTokenStreamer(on_token=hook)
        try:
            kwargs = {}
            if r.ignore_eos:
                kwargs["min_new_tokens"] = r.max_new_tokens
            if r.seed is not None:
                torch.manual_seed(r.seed)
            out = self.system.generate(r.variant, torch.tensor([r.input_ids], dtype=torch.long),
                                       max_new_tokens=r.max_new_tokens,
                                       eos_token_id=None if r.ignore_eos else r.eos_token_id,
                                       do_sample=r.do_sample, temperature=r.temperature, top_p=r.top_p,
                                       streamer=streamer, **kwargs)
            r.tokens = out.reshape(-1).tolist()
            r.finish = time.perf_counter()
            r.first_token = streamer.first_token if streamer.first_token is not None else r.finish
        except BaseException as e:  # this request fails alone; the worker keeps serving
            r.error, r.finish = e, time.perf_counter()
            fut.set_exception(e)
            return
        finally:
            with self._cond:
                self.served += 1
        fut.set_result(r)

    # -- lifecycle -------------------------------------------------------------------------------
    def pending(self) -> int:
        with self._cond:
            return sum(len(q) for q in self._queues)

    def shutdown(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stop accepting; ``drain`` serves what is queued, else cancels it. Joins every worker."""
        with self._cond:
            self._closed, self._drain = True, drain
            cancelled = []
            if not drain:
                for q in self._queues:
                    cancelled.extend(q)
                    q.clear()
            self._cond.notify_all()
        for r, fut in cancelled:
            fut.cancel_reason = f"request {r.id} cancelled by shutdown(drain=False) before it ran"
            r.error = RequestCancelled(fut.cancel_reason)
            fut.cancel()
        for w in self._workers:
            w.join(timeout)
        alive = [w.name for w in self._workers if w.is_alive()]
        if alive:
            raise TimeoutError(f"engine workers still running after {timeout} s: {alive}")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.shutdown(drain=exc[0] is None)


# -- metrics ------------------------------------------------------------------------------------

def percentile(values, q: float) -> float:
    """Linear-interpolated percentile (numpy's default); NaN for no values."""
    return float(np.percentile(np.asarray(values, dtype=np.float64), q)) if len(values) else float("nan")


def summarize(requests, duration: float | None = None) -> dict:
    """QoS numbers from request timestamps (seconds).

    Throughput = completed / ``duration``; default duration = last finish - first arrival.
    """
    done = [r for r in requests if r.ok]
    failed = sum(1 for r in requests if r.error is not None)
    if duration is None and done:
        duration = max(r.finish for r in done) - min(r.arrival for r in requests)
    ttft = [r.ttft for r in done]
    tat = [r.turnaround for r in done]
    wait = [r.queue_wait for r in done]
    return {
        "requests": len(requests), "completed": len(done), "failed": failed,
        "ttft_mean": float(np.mean(ttft)) if ttft else float("nan"),
        "ttft_p50": percentile(ttft, 50), "ttft_p99": percentile(ttft, 99),
        "turnaround_mean": float(np.mean(tat)) if tat else float("nan"),
        "turnaround_p50": percentile(tat, 50), "turnaround_p99": percentile(tat, 99),
        "queue_wait_mean": float(np.mean(wait)) if wait else float("nan"),
        "duration_s": float(duration) if duration is not None else float("nan"),
        "throughput_rps": len(done) / duration if duration else float("nan"),
    }
