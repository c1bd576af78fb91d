"""The lane driver of the QoS experiment: it feeds the batch-1 baselines' ``generate()`` (``systems.py``).

This is the experiment's harness for the peers, not a runtime engine: "ours" in the experiment is the runtime's
``engine.Engine`` itself (``max_seqs=1``). The driver gives the baselines the engine's request API, so one
replay loop and one ``metrics.summarize`` serve every system: ``submit(variant, prompt, params=None, **fields)``
returns an ``engine.RequestHandle`` (``tokens``, ``finish_reason``, ``error``, ``arrival``/``admitted``/
``first_token``/``finish``, ``result()``, ``cancel()``; the tokens arrive at once, when ``generate`` returns), and a
request is validated by the runtime's own rules (``SamplingParams``, prompt token ids).

A system has ``names``, ``generate(variant, input_ids [1, T], max_new_tokens, eos_token_id, do_sample,
temperature, top_p, streamer=None, **generate_kwargs) -> new ids [1, n]``, ``stats()`` and
``memory_footprint()``; optionally ``vocab_size``, ``max_positions``, ``eos_token_ids`` (the model's EOS, which
a request without its own stops at), and ``lanes`` with ``lane_of(variant)`` and
``enter_lane(lane)`` (a context entered once in each lane's worker thread) for independent instances (the
partitioned baseline). Each lane has one queue, served first come first served by one worker thread, one
request at a time.
"""

from __future__ import annotations

import itertools
import threading
import time
from contextlib import nullcontext
from dataclasses import fields

import torch

from ...engine import RequestHandle
from ...errors import EngineClosed, RequestError
from ...request_checks import as_token_ids
from ...sampling import SamplingParams, eos_ids

# SamplingParams fields transformers' generate has no equivalent for: refused rather than silently ignored
UNSUPPORTED = ("presence_penalty", "frequency_penalty", "stop", "stop_token_ids", "logprobs")
_DEFAULTS = {f.name: f.default for f in fields(SamplingParams)}


def generate_kwargs(p: SamplingParams, model_eos: tuple = ()) -> dict:
    """``p`` as keyword arguments of a system's ``generate`` (transformers' generate underneath); an EOS of None
    means ``model_eos``, as in the engine."""
    for name in UNSUPPORTED:
        if getattr(p, name) != _DEFAULTS[name]:
            raise RequestError(f"{name}: the batch-1 baselines run transformers' generate, which has no "
                               f"equivalent; leave it at {_DEFAULTS[name]!r}")
    eos = eos_ids(p.eos_token_id) if p.eos_token_id is not None else tuple(model_eos)
    kw = {"max_new_tokens": p.max_new_tokens, "do_sample": not p.greedy, "temperature": p.temperature,
          "top_p": p.top_p, "eos_token_id": None if p.ignore_eos or not eos else list(eos)}
    if not p.greedy:
        kw.update(top_k=p.top_k, min_p=p.min_p or None)
    if p.repetition_penalty != 1:
        kw["repetition_penalty"] = p.repetition_penalty
    # ignore_eos: the model's own EOS must not end the request either (the paper's fixed-length outputs)
    if p.ignore_eos or p.min_tokens:
        kw["min_new_tokens"] = p.max_new_tokens if p.ignore_eos else p.min_tokens
    return kw


class Request(RequestHandle):
    """A lane's request: the runtime's request handle (its fields, ``result()``, ``cancel()``), finished by a lane
    worker instead of the engine thread."""


class FirstTokenStreamer:
    """transformers streamer that stamps the first generated token: ``generate`` first puts the prompt
    (decoder-only) or the decoder start ids (encoder-decoder), then one tensor per step."""

    def __init__(self):
        self.calls = 0
        self.first_token: float | None = None

    def put(self, value):
        self.calls += 1
        if self.calls == 2:
            self.first_token = time.perf_counter()

    def end(self):
        pass


class LaneDriver:
    """Queues and batch-1 worker threads over a system (see the module docstring); a context manager that
    drains on exit."""

    def __init__(self, system):
        self.system = system
        self.names = list(system.names)
        self.vocab_size = getattr(system, "vocab_size", None)
        self.max_positions = getattr(system, "max_positions", None)
        self.eos = tuple(getattr(system, "eos_token_ids", ()))
        self.num_lanes = int(getattr(system, "lanes", 1))
        self.served = 0
        self._cond = threading.Condition()
        self._queues: list[list[Request]] = [[] for _ in range(self.num_lanes)]
        self._ids = itertools.count()
        self._closed, self._drain = False, True
        self._workers = [threading.Thread(target=self._work, args=(lane,), name=f"multimoe-lane{lane}", daemon=True)
                         for lane in range(self.num_lanes)]
        for w in self._workers:
            w.start()

    def submit(self, variant: str, prompt, params: SamplingParams | None = None, **kwargs) -> Request:
        """Queue a request: ``params`` and/or keyword fields of ``SamplingParams`` (keywords override). Bad input
        raises ``RequestError`` here (nothing is queued); a shut-down driver raises ``EngineClosed``."""
        if not isinstance(variant, str) or variant not in self.names:
            raise RequestError(f"unknown variant {variant!r}; this system serves {self.names}")
        ids = as_token_ids(prompt)
        if not ids:
            raise RequestError("empty prompt: give at least one token")
        if self.vocab_size is not None and not all(0 <= i < self.vocab_size for i in ids):
            raise RequestError(f"prompt token ids must be in [0, {self.vocab_size}), got [{min(ids)}, {max(ids)}]")
        if params is not None and not isinstance(params, SamplingParams):
            raise RequestError(f"params must be a SamplingParams, got {type(params).__name__}")
        params = (params or SamplingParams()).replace(self.vocab_size, **kwargs)
        generate_kwargs(params)  # refuses what generate cannot do, before anything is queued
        if self.max_positions and len(ids) + params.max_new_tokens > self.max_positions:
            raise RequestError(f"prompt ({len(ids)} tokens) + max_new_tokens ({params.max_new_tokens}) exceeds the "
                               f"model's {self.max_positions} positions")
        lane = int(self.system.lane_of(variant)) if self.num_lanes > 1 else 0
        with self._cond:
            if self._closed:
                raise EngineClosed("the lane driver is shut down")
            r = Request(next(self._ids), variant, self.names.index(variant), ids, params, self.eos)
            self._queues[lane].append(r)
            self._cond.notify_all()
        return r

    def pending(self) -> int:
        with self._cond:
            return sum(len(q) for q in self._queues)

    def _work(self, lane: int) -> None:
        enter = getattr(self.system, "enter_lane", None)
        with enter(lane) if enter is not None else nullcontext():
            while True:
                with self._cond:
                    while not self._queues[lane] and not self._closed:
                        self._cond.wait()
                    if not self._queues[lane] or (self._closed and not self._drain):
                        return
                    r = self._queues[lane].pop(0)
                if r.cancelled:
                    r._close("cancelled")
                    continue
                self._run(r)

    def _run(self, r: Request) -> None:
        r.admitted = time.perf_counter()
        streamer = FirstTokenStreamer()
        try:
            kw = generate_kwargs(r.params, self.eos)
            if r.params.seed is not None:  # transformers samples from the global generator: one lane reproduces
                torch.manual_seed(r.params.seed)
            out = self.system.generate(r.variant, torch.tensor([r.prompt], dtype=torch.long), streamer=streamer, **kw)
            r.tokens = out.reshape(-1).tolist()
        except Exception as e:  # noqa: BLE001 - this request fails alone; the worker keeps serving
            r._close("error", e)
        else:
            r.first_token = streamer.first_token
            r._close("length" if len(r.tokens) >= r.params.max_new_tokens else "stop")
        with self._cond:
            self.served += 1

    def shutdown(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stop taking requests; ``drain`` serves what is queued, else cancels it. Joins every worker."""
        with self._cond:
            self._closed, self._drain = True, drain
            dropped = []
            if not drain:
                for q in self._queues:
                    dropped += q
                    q.clear()
            self._cond.notify_all()
        for r in dropped:
            r._close("cancelled", EngineClosed("the lane driver shut down before the request ran"))
        for w in self._workers:
            w.join(timeout)
        alive = [w.name for w in self._workers if w.is_alive()]
        if alive:
            raise TimeoutError(f"lane workers still running after {timeout} s: {alive}")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.shutdown(drain=exc[0] is None)
