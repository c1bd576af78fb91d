"""Continuous batching over every variant at once: the scheduler, request handles and the step loop.

Each step the engine (1) finishes weight-set loads whose copy landed, (2) admits waiting requests
whose variant is resident, while KV slots last, (3) runs ONE ``BatchedModel`` forward over every
running sequence: a decode token for each, plus prompt chunks within the step's token budget, all
variants mixed, (4) samples each sequence with its own settings and generator, streams the token,
and retires finished sequences (EOS, stop sequence, max tokens, cancel), freeing their KV slot.

A request for a variant whose non-expert set is not resident starts the paper's partial
reconfiguration: its set is copied into a free or idle device set while the batch keeps running.
If every set is busy, the least recently used one stops taking new sequences (drains), so the
waiting request gets it once that set's running sequences finish: no request waits forever.

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
from collections import deque

import torch

from .forward import BatchedModel, BatchEntry
from .kv_cache import KVCache
from .sampling import sample
from .errors import EngineClosed, RequestError
from .request_checks import as_bool, as_int, as_real, as_token_ids
from .weights import VariantWeights

log = logging.getLogger(__name__)
_END = object()


class QueueFull(RequestError):
    """The waiting queue is at ``max_queue``: try again later (HTTP 429/503)."""


class RequestHandle:
    """A submitted request: a token stream (``for t in h``, ``async for t in h``), ``cancel()``, ``result()``.

    Timestamps are ``time.perf_counter()`` seconds: ``arrival``, ``admitted``, ``first_token``, ``finish``.
    """

    def __init__(self, rid: int, variant: str, v: int, prompt: list, max_new_tokens: int, temperature: float,
                 top_p: float, seed, stop: list, eos_token_id, ignore_eos: bool):
        self.id, self.variant, self.v, self.prompt = rid, variant, v, prompt
        self.max_new_tokens, self.temperature, self.top_p, self.seed = max_new_tokens, temperature, top_p, seed
        self.stop, self.eos_token_id, self.ignore_eos = stop, eos_token_id, ignore_eos
        self.tokens: list[int] = []
        self.finish_reason: str | None = None   # "stop", "length", "cancelled", "error"
        self.error: BaseException | None = None
        self.arrival, self.admitted, self.first_token, self.finish = time.perf_counter(), None, None, None
        self.cancelled = False
        self._lock = threading.Lock()
        self._sinks: list = []
        self._done = threading.Event()

    # -- called by the engine thread ----------------------------------------------------------
    def _emit(self, token: int) -> None:
        with self._lock:
            if self.first_token is None:
                self.first_token = time.perf_counter()
            self.tokens.append(token)
            for sink in self._sinks:
                sink(token)

    def _close(self, reason: str, error: BaseException | None = None) -> None:
        with self._lock:
            if self._done.is_set():
                return
            self.finish_reason, self.error, self.finish = reason, error, time.perf_counter()
            for sink in self._sinks:
                sink(_END)
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
        """Stop generating; the sequence's KV slot is freed at the engine's next step."""
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


class _Sequence:
    def __init__(self, h: RequestHandle, weight_set: int, slot: int, device):
        self.h, self.set, self.slot = h, weight_set, slot
        self.cached = 0   # tokens whose keys are in the cache
        self.generator = None
        if h.temperature > 0:
            self.generator = torch.Generator(device=device)
            if h.seed is None:
                self.generator.seed()
            else:
                self.generator.manual_seed(h.seed)

    @property
    def prefilling(self) -> bool:
        return self.cached < len(self.h.prompt)


class Engine:
    """Continuous batching of mixed-variant requests over one ``BatchedModel`` (Mixtral, Qwen3-MoE, OLMoE, Qwen2-MoE).

    ``max_seqs``: sequences running at once (KV slots). ``max_step_tokens``: token budget of one
    step (decodes first, then prompt chunks). ``mix_variants=False`` is the per-variant batching
    baseline: a batch holds one variant; the next variant starts when the batch drains.
    ``group_variants``: admit waiting requests variant by variant (variants in the order of their oldest
    request) instead of strictly by arrival. Under load a step then holds fewer variants, so it reads
    fewer distinct experts; it stays first-come first-served at the level of variants, so nothing starves.
    """

    def __init__(self, model: BatchedModel, max_step_tokens: int = 256, max_queue: int = 4096,
                 mix_variants: bool = True, group_variants: bool = False, eos_token_id: int | None = None):
        if max_step_tokens < 1:
            raise ValueError(f"max_step_tokens must be >= 1, got {max_step_tokens}")
        self.model, self.weights, self.kv = model, model.weights, model.kv
        self.names, self.vocab_size = model.weights.names, model.weights.embed.shape[1]
        self.max_step_tokens, self.max_queue, self.mix = max_step_tokens, max_queue, mix_variants
        self.group_variants = group_variants
        self.eos_token_id = eos_token_id
        self.device = model.slab.device
        self.waiting: deque[RequestHandle] = deque()
        self.running: list[_Sequence] = []
        self.draining: dict[int, int] = {}   # weight set -> the variant waiting for it
        self.stats = {"steps": 0, "tokens": 0, "finished": 0, "failed": 0, "cancelled": 0}
        self._ids = itertools.count()
        self._cond = threading.Condition()
        self._closing, self._drain = False, True
        self._thread = threading.Thread(target=self._loop, name="multimoe-engine", daemon=True)
        self._thread.start()

    @classmethod
    def from_pretrained(cls, dirs, names=None, plan=None, share: float | None = None, budget=None,
                        resident_sets: int | None = None, max_seqs: int = 64, max_len: int = 512,
                        device="cpu", dtype=torch.float32, backend=None, **engine_kwargs) -> "Engine":
        """Load variant directories, plan the slab (``share``/``budget``/``plan`` as in ``plan.make_plan``;
        default: every variant keeps its own experts), and start the engine."""
        from . import plan as plan_mod
        from .checkpoint import VariantSet

        vs = dirs if isinstance(dirs, VariantSet) else VariantSet.from_dirs(dirs, names=names)
        if isinstance(plan, (str, bytes)) or hasattr(plan, "__fspath__"):
            plan = plan_mod.Plan.from_json(plan, vs)
        elif plan is None:
            plan = plan_mod.make_plan(vs, budget_bytes=budget, share=0.0 if budget is None and share is None
                                      else share, dtype=dtype)
        slab, table = plan_mod.load_slab(plan, vs, device=device, dtype=dtype)
        weights = VariantWeights.from_variant_set(vs, resident_sets or len(vs), device=device, dtype=dtype)
        cfg = vs[0].config
        heads = cfg["num_attention_heads"]
        kv = KVCache(cfg["num_hidden_layers"], max_seqs, max_len, cfg.get("num_key_value_heads") or heads,
                     cfg.get("head_dim") or cfg["hidden_size"] // heads, dtype=dtype, device=device)
        engine_kwargs.setdefault("eos_token_id", cfg.get("eos_token_id"))
        return cls(BatchedModel(cfg, weights, slab, table, kv, backend), **engine_kwargs)

    # -- submission (any thread) --------------------------------------------------------------
    def submit(self, variant: str, prompt, max_new_tokens: int = 16, temperature: float = 0.0, top_p: float = 1.0,
               seed: int | None = None, stop=None, eos_token_id: int | None = None,
               ignore_eos: bool = False) -> RequestHandle:
        """Queue a request; bad input raises ``RequestError`` here, a full queue ``QueueFull``."""
        if not isinstance(variant, str) or variant not in self.names:
            raise RequestError(f"unknown variant {variant!r}; this engine serves {self.names}")
        prompt = as_token_ids(prompt)
        if not prompt:
            raise RequestError("empty prompt: give at least one token")
        if min(prompt) < 0 or max(prompt) >= self.vocab_size:
            raise RequestError(f"prompt token ids must be in [0, {self.vocab_size}), got [{min(prompt)}, {max(prompt)}]")
        max_new_tokens = as_int("max_new_tokens", max_new_tokens, 1)
        if len(prompt) + max_new_tokens > self.kv.max_len:
            raise RequestError(f"prompt ({len(prompt)} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
                               f"context of {self.kv.max_len} tokens")
        temperature, top_p = as_real("temperature", temperature), as_real("top_p", top_p)
        if temperature < 0:
            raise RequestError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
        if not 0 < top_p <= 1:
            raise RequestError(f"top_p must be in (0, 1], got {top_p}")
        if seed is not None:
            seed = as_int("seed", seed, 0, 2**63 - 1)
        if eos_token_id is not None:
            eos_token_id = as_int("eos_token_id", eos_token_id, 0, self.vocab_size - 1)
        ignore_eos = as_bool("ignore_eos", ignore_eos)
        if not isinstance(stop, (list, tuple, type(None))):
            raise RequestError(f"stop must be a list of token-id sequences, got {type(stop).__name__}")
        stop = [as_token_ids(s, "each stop sequence is a list of token ids") for s in (stop or [])]
        if any(not s for s in stop):
            raise RequestError("stop sequences must not be empty")
        eos = self.eos_token_id if eos_token_id is None else eos_token_id
        with self._cond:
            if self._closing:
                raise EngineClosed("the engine is shut down")
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"{len(self.waiting)} requests already waiting (max_queue={self.max_queue})")
            h = RequestHandle(next(self._ids), variant, self.names.index(variant), prompt, max_new_tokens,
                              temperature, top_p, seed, stop, eos, ignore_eos)
            self.waiting.append(h)
            self._cond.notify()
        return h

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
    def _loop(self) -> None:
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
            if not self._step():
                self.weights.wait_loads(timeout=0.01)  # nothing to run: only weight loads are pending

    def _fail(self, handles, error: BaseException) -> None:
        for h in handles:
            h._close("error", error)
            self.stats["failed"] += 1

    def _admit(self) -> None:
        for v, error in self.weights.poll():
            if error is not None:
                with self._cond:
                    failed = [h for h in self.waiting if h.v == v]
                    for h in failed:
                        self.waiting.remove(h)
                self._fail(failed, error)
        with self._cond:
            self.draining = {k: u for k, u in self.draining.items() if any(h.v == u for h in self.waiting)}
            for h in [h for h in self.waiting if h.cancelled]:
                self.waiting.remove(h)
                h._close("cancelled")
                self.stats["cancelled"] += 1
            busy = {s.set for s in self.running}
            only = self.running[0].h.v if (not self.mix and self.running) else None
            candidates = list(self.waiting)
            if self.group_variants:  # variants in the order of their oldest request, each one's requests together
                rank = {}
                for h in candidates:
                    rank.setdefault(h.v, len(rank))
                candidates.sort(key=lambda h: rank[h.v])  # stable: arrival order within a variant
            for h in candidates:
                if self.kv.num_free == 0:
                    break
                if only is not None and h.v != only:
                    continue
                s = self.weights.lookup(h.v)
                if s is None:
                    if self.weights.start_load(h.v, busy):
                        self.draining = {k: u for k, u in self.draining.items() if u != h.v}
                    elif not self.draining and (lru := self.weights.least_recent_set()) is not None:
                        self.draining[lru] = h.v
                    continue
                if s in self.draining:
                    continue
                self.waiting.remove(h)
                h.admitted = time.perf_counter()
                self.running.append(_Sequence(h, s, self.kv.allocate(), self.device))
                busy.add(s)
                if not self.mix:
                    only = h.v

    def _step(self) -> bool:
        """One iteration; False when nothing could run (every waiting request needs a set being loaded)."""
        self._admit()
        for s in [s for s in self.running if s.h.cancelled]:
            self._retire(s, "cancelled")
        if not self.running:
            return False
        entries, fed = [], []
        budget = self.max_step_tokens
        for s in sorted(self.running, key=lambda s: s.prefilling):  # decodes first, then prompt chunks
            if budget == 0:
                break
            if s.prefilling:
                chunk = s.h.prompt[s.cached:s.cached + budget]
                done = s.cached + len(chunk) == len(s.h.prompt)
            else:
                chunk, done = [s.h.tokens[-1]], True
            budget -= len(chunk)
            entries.append(BatchEntry(s.set, s.h.v, s.slot, chunk, s.cached, logits=done))
            fed.append(s)
        order = sorted(range(len(entries)), key=lambda i: entries[i].set)
        entries, fed = [entries[i] for i in order], [fed[i] for i in order]
        try:
            logits = self.model.forward(self.model.batch(entries)).float()
        except Exception as e:  # noqa: BLE001 - the requests of this step fail; the engine keeps serving
            log.exception("engine step failed")
            for s in list(self.running):
                self._retire(s, "error", RuntimeError(f"forward failed: {e}"))
            return True
        greedy = logits.argmax(-1).tolist()  # one device sync for every greedy row of the step
        row = 0
        for e, s in zip(entries, fed):
            s.cached += len(e.tokens)
            if not e.logits:
                continue
            token = greedy[row] if s.h.temperature == 0 else \
                sample(logits[row], s.h.temperature, s.h.top_p, s.generator)
            row += 1
            s.h._emit(token)
            self.stats["tokens"] += 1
            reason = self._finished(s.h, token)
            if reason:
                self._retire(s, reason)
        self.stats["steps"] += 1
        return True

    @staticmethod
    def _finished(h: RequestHandle, token: int) -> str | None:
        if token == h.eos_token_id and not h.ignore_eos:
            return "stop"
        if any(h.tokens[-len(s):] == s for s in h.stop):
            return "stop"
        if len(h.tokens) >= h.max_new_tokens:
            return "length"
        return None

    def _retire(self, s: _Sequence, reason: str, error: BaseException | None = None) -> None:
        self.running.remove(s)
        self.kv.free(s.slot)
        s.h._close(reason, error)
        self.stats["cancelled" if reason == "cancelled" else "failed" if error is not None else "finished"] += 1
