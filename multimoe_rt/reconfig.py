"""Runtime partial reconfiguration (the paper's Algorithm 2): swap only the non-expert weights.

Every variant's non-expert tensors (embeddings, attention, norms, routers, LM head) live in
host memory (pinned where CUDA exists). On the device there are two rotating buffer sets, the
active one (the model's parameters point at it) and a staging one, plus one dedicated set per
*resident* variant. ``prefetch(v)`` copies v's tensors into the staging set in the
background (side CUDA stream on GPU, a worker thread on CPU); ``activate()`` waits for that copy, then
flips every parameter's storage to the staging set and selects v's row of the slot table; ``use(v)``
does both. Nothing in the expert path is copied.

A tensor whose bytes the staging or the active set already holds (same hash) is not copied, so
variants that froze their attention share it for free. A failed copy leaves the active variant untouched.

Threads. Ownership in one sentence: requests and flips hold ``lock`` (the request lock, an RLock the
model's ``forward``/``generate`` hold for a whole request), every other change of the store's state
(the pending copy, the active set, stats) happens under the short ``_cv`` lock, always taken after
``lock`` and never held while a request runs, and the one background copy writes only the staging
set, which no request reads until ``lock`` is held for the flip. So any method may be called from any
thread: ``prefetch`` from another thread starts (or queues behind the copy in flight) a copy
while a request runs and never change what it reads; ``activate``/``use`` wait for the running request.
A copy that a ``use``/``activate`` has claimed is never replaced; a finished prefetch that nobody
claimed is kept until a copy for another variant needs the staging set (its bytes are then counted in
``stats["bytes_discarded"]``). ``stats["bytes_copied"]`` counts every byte when it is copied.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import nn

from .checkpoint import tensor_digest
from .errors import SwitchError, UnknownVariant

__all__ = ["NonExpertStore", "SwitchError", "tied_aliases"]


def tied_aliases(model: nn.Module) -> dict[str, list[str]]:
    """Parameter name -> every name it is known by (tied embeddings have several)."""
    by_id = defaultdict(list)
    for name, p in model.named_parameters(remove_duplicate=False):
        by_id[id(p)].append(name)
    return {names[0]: names for names in by_id.values()}


class _Pending:
    """One copy of a variant's set into a target set. ``claimed``: a use()/activate() is waiting to flip to
    it, so nobody may replace it. Written by its copy until ``done`` is set, then read-only."""

    def __init__(self, variant: int, target: int):
        self.variant, self.target = variant, target
        self.done = threading.Event()
        self.error: BaseException | None = None
        self.cuda_event = None
        self.nbytes = 0
        self.claimed = False
        self.borrow: list[str] = []  # tensors the active set already holds: moved over at activate


class NonExpertStore:
    """Host copies of every variant's non-expert weights and the device sets they are copied into.

    ``variants`` is a VariantSet (anything with ``names`` and variants offering ``tensor(name)``
    and ``non_expert_names()``). ``on_switch(v)`` is called inside ``activate`` so the caller can
    select the slot-table row in the same critical section.
    """

    def __init__(self, model: nn.Module, variants, device, resident: int = 0, on_switch=None,
                 lock: threading.RLock | None = None):
        self.device = torch.device(device)
        self.names = list(variants.names)
        self.on_switch = on_switch or (lambda v: None)
        self.lock = lock or threading.RLock()  # the request lock: held by requests and flips
        self._cv = threading.Condition(threading.Lock())  # bookkeeping; taken after ``lock``, held for moments
        self.copy_hook = None  # tests inject delays or faults here: called as hook(variant, name)
        self.params = dict(model.named_parameters())
        aliases = tied_aliases(model)
        pin = torch.cuda.is_available()

        self.host: list[dict[str, torch.Tensor]] = []
        self.digest: list[dict[str, bytes]] = []
        for v in variants:
            available = set(v.non_expert_names())
            host, digest = {}, {}
            for name, p in self.params.items():
                source = next((a for a in aliases[name] if a in available), None)
                if source is None:
                    raise KeyError(f"{v.path}: non-expert tensor {name!r} (or a tied alias {aliases[name][1:]}) "
                                   f"is missing from variant {v.name!r}")
                t = v.tensor(source)
                if tuple(t.shape) != tuple(p.shape):
                    raise ValueError(f"{v.path}: tensor {source!r} has shape {tuple(t.shape)}, "
                                     f"the model expects {tuple(p.shape)}")
                t = t.to(p.dtype).contiguous()
                host[name] = t.pin_memory() if pin else t
                digest[name] = tensor_digest(host[name])
            self.host.append(host)
            self.digest.append(digest)

        # Device sets: 0 = the model's own parameters, 1 = staging, then one per resident variant.
        self.sets = [{n: p.data for n, p in self.params.items()},
                     {n: torch.empty_like(p.data) for n, p in self.params.items()}]
        self.holds: list[dict[str, bytes | None]] = [dict.fromkeys(self.params), dict.fromkeys(self.params)]
        self.resident_set: dict[int, int] = {}
        self.side_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        # CPU: one long-lived copy thread. A fresh thread per switch paid for a new OpenMP team on its
        # first copy (~15 ms per switch measured here, more than the copy itself).
        self._copier = ThreadPoolExecutor(1, thread_name_prefix="multimoe-switch-copy") \
            if self.side_stream is None else None
        self.stats = {"switches": 0, "bytes_copied": 0, "tensors_skipped": 0, "tensors_copied": 0,
                      "prefetches_discarded": 0, "bytes_discarded": 0, "copy_errors": 0}
        for v in range(min(resident, len(self.names))):
            self.sets.append({n: torch.empty_like(p.data) for n, p in self.params.items()})
            self.holds.append(dict.fromkeys(self.params))
            self.resident_set[v] = len(self.sets) - 1
            self._copy_now(v, self.resident_set[v])
        self.released = [None] * len(self.sets)  # CUDA events: compute is done reading a set

        self.active_set, self.active_variant = 0, None
        self.pending: _Pending | None = None
        self.prefetch(0)
        self.activate()

    # -- sizes ----------------------------------------------------------------------------
    @property
    def set_nbytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.params.values())

    @property
    def device_nbytes(self) -> int:
        return self.set_nbytes * len(self.sets)

    def index(self, variant) -> int:
        if isinstance(variant, bool) or not isinstance(variant, (int, str)):
            if hasattr(variant, "__index__") and not isinstance(variant, bool):
                variant = int(variant.__index__())
            else:
                raise UnknownVariant(f"a variant is a name or an index, got {type(variant).__name__} {variant!r}; "
                                     f"known: {self.names}")
        if isinstance(variant, int):
            if not 0 <= variant < len(self.names):
                raise UnknownVariant(f"variant index {variant} out of range: {len(self.names)} variants")
            return variant
        if variant not in self.names:
            raise UnknownVariant(f"unknown variant {variant!r}; known: {self.names}")
        return self.names.index(variant)

    # -- copying (runs outside every lock; writes only its target set) --------------------------
    def _copy_now(self, v: int, target: int, pending: _Pending | None = None) -> None:
        dst, holds = self.sets[target], self.holds[target]
        # Borrowing swaps buffers between sets, so never from a resident set (it must stay whole).
        # The active set cannot change while this copy runs: a flip waits for the pending copy.
        borrowable = pending is not None and self.active_set not in self.resident_set.values()
        active_holds = self.holds[self.active_set] if borrowable else {}
        skipped = copied = nbytes = 0
        try:
            for name, src in self.host[v].items():
                if holds[name] == self.digest[v][name]:
                    skipped += 1
                    continue
                if active_holds.get(name) == self.digest[v][name]:
                    pending.borrow.append(name)
                    skipped += 1
                    continue
                holds[name] = None  # stale until the copy has landed
                if self.copy_hook is not None:
                    self.copy_hook(v, name)
                dst[name].copy_(src, non_blocking=self.side_stream is not None)
                holds[name] = self.digest[v][name]
                copied += 1
                nbytes += src.numel() * src.element_size()
        finally:  # bytes count when they are copied, whether or not the set is ever activated
            if pending is not None:
                pending.nbytes += nbytes
            with self._cv:
                self.stats["tensors_skipped"] += skipped
                self.stats["tensors_copied"] += copied
                self.stats["bytes_copied"] += nbytes

    def _run_copy(self, pending: _Pending) -> None:
        try:
            if self.side_stream is not None:
                with torch.cuda.stream(self.side_stream):
                    if self.released[pending.target] is not None:
                        self.side_stream.wait_event(self.released[pending.target])
                    self._copy_now(pending.variant, pending.target, pending)
                    pending.cuda_event = torch.cuda.Event()
                    pending.cuda_event.record(self.side_stream)
            else:
                self._copy_now(pending.variant, pending.target, pending)
        except BaseException as e:  # reported to whoever activates
            pending.error = e
        finally:
            with self._cv:
                if pending.error is not None:
                    self.stats["copy_errors"] += 1
                pending.done.set()
                self._cv.notify_all()

    def _discard(self, pending: _Pending) -> None:
        """Drop a finished, unclaimed copy (caller holds ``_cv``); its target's ``holds`` stay accurate."""
        if pending.target not in self.resident_set.values():
            self.stats["prefetches_discarded"] += 1
            self.stats["bytes_discarded"] += pending.nbytes
        self.pending = None

    def _start(self, v: int, claim: bool) -> _Pending | None:
        """Make ``v``'s copy the pending one (reusing one in flight or done); None when ``v`` is active.

        Waits while another variant's copy is in flight (it owns the staging set) or claimed."""
        with self._cv:
            while True:
                if v == self.active_variant:
                    return None  # nothing to copy; a prefetch of another variant stays pending
                p = self.pending
                if p is not None and p.variant == v:
                    p.claimed = p.claimed or claim
                    return p
                if p is None or (p.done.is_set() and not p.claimed):
                    break
                self._cv.wait()
            if p is not None:
                self._discard(p)
            if v in self.resident_set:
                p = _Pending(v, self.resident_set[v])
                p.done.set()
            else:  # rotate: the staging set is whichever of sets 0 and 1 is not active
                p = _Pending(v, 1 if self.active_set == 0 else 0)
            p.claimed = claim
            self.pending = p
        if not p.done.is_set():
            if self.side_stream is not None:  # enqueueing CUDA copies is cheap: do it on this thread
                self._run_copy(p)
            else:
                self._copier.submit(self._run_copy, p)
        return p

    def prefetch(self, variant) -> None:
        """Start copying ``variant``'s non-expert weights into the staging set; returns once the copy is
        started (after the copy in flight for another variant, if any). Safe while a request runs."""
        self._start(self.index(variant), claim=False)

    def activate(self) -> float:
        """Wait for the pending copy (if any), then flip every parameter to it; returns seconds waited.

        Waits for a running request first: a flip never lands mid-request."""
        with self.lock:
            with self._cv:
                p = self.pending
                if p is None:
                    return 0.0
                p.claimed = True
            return self._flip(p)

    def _flip(self, pending: _Pending) -> float:
        """Caller holds ``lock`` and has claimed ``pending`` (so it is still the pending copy)."""
        t0 = time.perf_counter()
        try:
            pending.done.wait()
        except BaseException:  # interrupted while waiting (Ctrl-C): release the claim so others can go on
            with self._cv:
                pending.claimed = False
                self._cv.notify_all()
            raise
        waited = time.perf_counter() - t0
        with self._cv:
            self.pending = None
            self._cv.notify_all()
            if pending.error is not None:
                if pending.target not in self.resident_set.values():
                    self.holds[pending.target] = dict.fromkeys(self.params)
                raise SwitchError(f"switch to variant {self.names[pending.variant]!r} failed; "
                                  f"{self._active_name()!r} stays active: {pending.error}") from pending.error
            if pending.cuda_event is not None:
                torch.cuda.current_stream(self.device).wait_event(pending.cuda_event)
            if self.side_stream is not None:
                released = torch.cuda.Event()
                released.record(torch.cuda.current_stream(self.device))
                self.released[self.active_set] = released
            old, new = self.active_set, pending.target
            for name in pending.borrow:  # swap buffers instead of copying equal bytes
                self.sets[old][name], self.sets[new][name] = self.sets[new][name], self.sets[old][name]
                self.holds[old][name], self.holds[new][name] = self.holds[new][name], self.holds[old][name]
            for name, p in self.params.items():
                p.data = self.sets[new][name]
            self.active_set, self.active_variant = pending.target, pending.variant
            self.on_switch(pending.variant)
            self.stats["switches"] += 1
        return waited

    def _active_name(self):
        return None if self.active_variant is None else self.names[self.active_variant]

    def use(self, variant) -> None:
        """Blocking switch: copy what differs and activate (waits for a running request first)."""
        v = self.index(variant)
        with self.lock:
            p = self._start(v, claim=True)
            if p is not None:
                self._flip(p)
