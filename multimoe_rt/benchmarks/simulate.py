"""Discrete-event QoS simulator of the serving systems, validated against measurement on the tiny zoo.

No model executes here: every duration comes from a cost model.

* ``Roofline`` (GPU presets): one forward step of ``n`` tokens over sequences with given contexts costs
  ``max(bytes / bandwidth, FLOPs / peak) + per-step overhead``, where bytes = the non-expert weights of each
  variant in the step + the distinct expert slots the step's tokens touch (uniform top-k routing) + the KV
  cache read; experts that do not fit the device (memory limit) are copied over the host link when touched
  (bytes / link bandwidth, not overlapped, like ``HostTier``). A variant switch copies its bytes over the link,
  overlapped with compute where the system prefetches.
* ``Calibrated`` (the CPU preset): per-system prefill, per-token decode, blocking and prefetched switch costs
  and the slow-down of the partitioned lanes when k of them run at once, all measured from idle service times
  on the real engine (``calibrate``), never from a QoS sweep.

Systems (the serving systems of ``serve_qos.py`` plus continuous batching):

    ours            batch 1, FCFS, consolidated slab, partial reconfiguration with look-ahead prefetch
    ours+affinity   the same with the bounded variant-affinity policy (max wait 0.5 s)
    partitioned     MIG-like: N instances, each with 1/N of memory, bandwidth, peak and link
    swap            one model slot, a whole variant copied in per switch (blocking)
    resident        every variant's full model resident (experts that do not fit are fetched on demand)
    batching        continuous batching: one step per iteration over all running sequences (mixed variants),
                    R resident non-expert sets (LRU), a miss copies that set over the link while others run

    multimoe-rt simulate paper          # paper-scale tables + plots (A100, H200, 8 variants batching)
    multimoe-rt simulate validate       # calibration + measured sweep on the small tiny zoo + simulation
    multimoe-rt simulate validate-batching   # against batching*.json in the results folder when there is one
"""


import argparse
import bisect
import heapq
import json
import math
import random
import statistics
import sys
import textwrap
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from . import RESULTS_HELP, results_dir

GB = 1e9

# ================================================================ presets


@dataclass(frozen=True)
class Hardware:
    name: str
    mem_bytes: float          # device memory
    bandwidth: float          # device memory bandwidth, B/s (peak, data sheet)
    peak_flops: float         # dense bf16 tensor FLOP/s (data sheet)
    link: float               # host->device, B/s, one direction (effective)
    bw_eff: float = 0.8       # achievable fraction of peak bandwidth (assumption, typical for decode GEMV)
    flops_eff: float = 0.6    # achievable fraction of peak FLOPs (assumption)
    step_overhead: float = 2e-3   # per forward step (kernel launches, Python), s (assumption)
    reserve_bytes: float = 4 * GB  # CUDA context, workspace, activations (assumption)
    source: str = ""


HARDWARE = {
    # NVIDIA A100 Tensor Core GPU data sheet (PCIe 80GB column): HBM2e 1,935 GB/s, BF16 Tensor Core 312 TFLOPS
    # dense (624 with sparsity), PCIe Gen4 64 GB/s (both directions: 32 GB/s each way; ~25 GB/s reached by
    # pinned cudaMemcpy in practice, the figure used here).
    "a100-80gb-pcie": Hardware("A100-80GB PCIe Gen4", 80 * GB, 1935 * GB, 312e12, 25 * GB,
                               source="NVIDIA A100 data sheet (PCIe 80GB): 1,935 GB/s, 312 TFLOPS bf16 dense, "
                                      "PCIe Gen4 x16 32 GB/s per direction (25 GB/s effective assumed)"),
    # NVIDIA H200 Tensor Core GPU data sheet (SXM): 141 GB HBM3e, 4.8 TB/s, BF16 989 TFLOPS dense (1,979 with
    # sparsity), PCIe Gen5 128 GB/s (64 GB/s each way; ~50 GB/s effective assumed).
    "h200": Hardware("H200 SXM (PCIe Gen5 host link)", 141 * GB, 4800 * GB, 989e12, 50 * GB,
                     source="NVIDIA H200 data sheet (SXM): 141 GB, 4.8 TB/s, 989 TFLOPS bf16 dense, "
                            "PCIe Gen5 x16 64 GB/s per direction (50 GB/s effective assumed)"),
}


@dataclass(frozen=True)
class ModelSpec:
    name: str
    hidden: int
    inter: int                # expert intermediate size
    layers: int
    experts: int
    topk: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    dtype_bytes: int = 2
    gated: bool = True        # SwiGLU: 3 matrices per expert
    source: str = ""

    @property
    def expert_params(self) -> int:
        return (3 if self.gated else 2) * self.hidden * self.inter

    @property
    def expert_bytes(self) -> float:
        return self.expert_params * self.dtype_bytes

    @property
    def non_expert_params(self) -> int:
        h, d = self.hidden, self.head_dim
        attn = h * self.heads * d * 2 + h * self.kv_heads * d * 2     # q, o, k, v
        per_layer = attn + 2 * h + h * self.experts                     # + 2 norms + router
        return self.layers * per_layer + 2 * self.vocab * h + h          # + embeddings, LM head, final norm

    @property
    def non_expert_bytes(self) -> float:
        return self.non_expert_params * self.dtype_bytes

    @property
    def total_slots(self) -> int:
        return self.layers * self.experts

    @property
    def full_bytes(self) -> float:
        return self.non_expert_bytes + self.total_slots * self.expert_bytes

    @property
    def kv_bytes_per_token(self) -> float:
        return 2 * self.layers * self.kv_heads * self.head_dim * self.dtype_bytes

    @property
    def active_params(self) -> int:
        return self.non_expert_params - self.vocab * self.hidden + self.layers * self.topk * self.expert_params


MODELS = {
    # mistralai/Mixtral-8x7B-v0.1 config.json: hidden_size 4096, intermediate_size 14336, num_hidden_layers 32,
    # num_attention_heads 32, num_key_value_heads 8 (head_dim 128), num_local_experts 8, num_experts_per_tok 2,
    # vocab_size 32000, untied embeddings; bf16. 46.7 B parameters (93 GB): no single variant fits an 80 GB A100.
    "mixtral-8x7b": ModelSpec("Mixtral-8x7B", 4096, 14336, 32, 8, 2, 32, 8, 128, 32000,
                              source="mistralai/Mixtral-8x7B-v0.1 config.json"),
    # Qwen/Qwen3-30B-A3B config.json: hidden_size 2048, moe_intermediate_size 768, num_hidden_layers 48,
    # num_attention_heads 32, num_key_value_heads 4, head_dim 128, num_experts 128, num_experts_per_tok 8,
    # vocab_size 151936, untied embeddings; bf16 (30.5 B parameters).
    "qwen3-30b-a3b": ModelSpec("Qwen3-30B-A3B", 2048, 768, 48, 128, 8, 32, 4, 128, 151936,
                               source="Qwen/Qwen3-30B-A3B config.json"),
    # this project's zoo (multimoe_rt/lab/zoo.py RECIPES["mixtral-tiny"] and SMALL), byte tokenizer vocab 259,
    # fp32 on CPU.
    "mixtral-tiny": ModelSpec("mixtral-tiny", 128, 256, 4, 8, 2, 4, 2, 32, 259, dtype_bytes=4,
                              source="multimoe_rt/lab/zoo.py RECIPES['mixtral-tiny']"),
    "mixtral-tiny-small": ModelSpec("mixtral-tiny --small", 32, 64, 2, 4, 2, 2, 1, 16, 259, dtype_bytes=4,
                                    source="multimoe_rt/lab/zoo.py SMALL['mixtral-tiny']"),
}


# ================================================================ workload

@dataclass
class Req:
    arrival: float
    variant: int
    prompt: int = 20
    out: int = 25
    start: float = math.nan
    first: float = math.nan
    finish: float = math.nan


def poisson_trace(rate: float, n: int, variants: int, seed: int = 0, prompt: int = 20, out: int = 25,
                  mix: str = "uniform") -> list[Req]:
    """``n`` requests with exponential inter-arrivals of mean 1/rate, a random variant each (serve_qos's mix)."""
    if rate <= 0:
        raise ValueError(f"arrival rate must be > 0, got {rate}")
    rng = random.Random(seed)
    w = [1.0] * variants if mix == "uniform" else [1.0 / (i + 1) for i in range(variants)]
    t, reqs = 0.0, []
    for _ in range(n):
        t += rng.expovariate(rate)
        reqs.append(Req(t, rng.choices(range(variants), w)[0], prompt, out))
    return reqs


def serve_qos_trace(rate: float, n: int, variants: int, seed: int, pool_size: int) -> list[Req]:
    """The trace ``serve_qos.make_trace`` drew (same RNG calls; prompt contents do not matter here)."""
    rng = random.Random(seed)
    names = list(range(variants))
    t, reqs = 0.0, []
    for _ in range(n):
        t += rng.expovariate(rate)
        v = rng.choices(names, [1.0] * variants)[0]
        rng.choice(range(pool_size))
        reqs.append(Req(t, v))
    return reqs


def load_trace(path) -> list[Req]:
    """A trace file: JSON list of {"arrival": s, "variant": int, "prompt": tokens, "out": tokens}."""
    return [Req(float(r["arrival"]), int(r["variant"]), int(r.get("prompt", 20)), int(r.get("out", 25)))
            for r in json.loads(Path(path).read_text())]


# ================================================================ cost models

def distinct_touched(experts: int, topk: int, tokens: float) -> float:
    """Expected distinct experts of one layer that ``tokens`` tokens touch, uniform top-k routing."""
    if tokens <= 0:
        return 0.0
    return experts * (1.0 - (1.0 - topk / experts) ** tokens)


@dataclass
class Memory:
    """What is resident: expert slots on the device vs slots the system addresses, and the share used."""
    slots_needed: float
    slots_resident: float
    share: float = 0.0
    fits: bool = True

    @property
    def miss(self) -> float:
        """Fraction of touched expert slots that live in host memory (uniform access, LRU hit rate = C/S)."""
        return max(0.0, 1.0 - self.slots_resident / self.slots_needed) if self.slots_needed else 0.0


def plan_memory(system: str, m: ModelSpec, hw_mem: float, variants: int, *, reserve: float, kv: float,
                share: float | None = None, resident_sets: int = 2) -> Memory:
    """Memory limits decide residency.

    ours / batching: ``resident_sets`` non-expert sets (active + staging, or the R-set cache), a slab of
    L*E*(1 + (V-1)(1-share)) slots; with ``share`` None the share is Algorithm 1's: keep private experts while the
    budget allows (share = the smallest that fits, 1.0 if even one copy does not fit; then the rest is offloaded).
    swap: one full model slot. resident: V full models. partitioned: one instance's view (memory already /N).
    """
    free = hw_mem - reserve - kv
    le = m.total_slots
    if system in ("ours", "ours+affinity", "batching"):
        room = (free - resident_sets * m.non_expert_bytes) / m.expert_bytes
        if share is None:
            share = 0.0 if variants == 1 else min(1.0, max(0.0, 1.0 - (room / le - 1.0) / (variants - 1)))
        need = le * (1 + (variants - 1) * (1 - share))
        return Memory(need, max(0.0, min(need, room)), share, room >= need)
    if system == "swap":
        room = (free - m.non_expert_bytes) / m.expert_bytes
        return Memory(le, max(0.0, min(le, room)), 0.0, room >= le)
    if system == "resident":
        room = (free - variants * m.non_expert_bytes) / m.expert_bytes
        return Memory(variants * le, max(0.0, min(variants * le, room)), 0.0, room >= variants * le)
    if system == "partitioned":
        room = (free - m.non_expert_bytes) / m.expert_bytes
        return Memory(le, max(float(m.experts), min(le, room)), 0.0, room >= le)
    raise ValueError(f"unknown system {system!r}")


class Roofline:
    """Step times from bytes and FLOPs against a device's bandwidth and peak; copies over its link.

    ``fraction`` scales memory, bandwidth, peak and link (a MIG instance gets 1/N of each).
    """

    def __init__(self, hw: Hardware, model: ModelSpec, system: str, variants: int, *, fraction: float = 1.0,
                 share: float | None = None, resident_sets: int = 2, max_batch: int = 1, max_ctx: int = 64):
        self.hw, self.m, self.system, self.variants = hw, model, system, variants
        self.bw = hw.bandwidth * hw.bw_eff * fraction
        self.flops = hw.peak_flops * hw.flops_eff * fraction
        self.link = hw.link * fraction
        kv = max_batch * max_ctx * model.kv_bytes_per_token
        self.mem = plan_memory(system, model, hw.mem_bytes * fraction, variants, reserve=hw.reserve_bytes * fraction,
                               kv=kv, share=share, resident_sets=resident_sets)
        self.share = self.mem.share

    # -- one forward step -------------------------------------------------------------------------
    def step(self, groups: dict[int, int], contexts: list[int] | None = None) -> float:
        """Seconds for one forward step: ``groups`` = variant -> tokens in this step; ``contexts`` = the context
        length each sequence attends over (KV read and attention FLOPs)."""
        m = self.m
        n = sum(groups.values())
        if n == 0:
            return 0.0
        contexts = contexts or []
        # distinct expert slots per layer: shared slots see every token, private ones only their variant's
        s = self.share if self.system in ("ours", "ours+affinity", "batching") else 0.0
        E, k = m.experts, m.topk
        distinct = s * distinct_touched(E, k, n) + (1 - s) * sum(distinct_touched(E, k, t) for t in groups.values())
        if self.system not in ("ours", "ours+affinity", "batching"):
            distinct = sum(distinct_touched(E, k, t) for t in groups.values())
        expert_bytes = m.layers * distinct * m.expert_bytes
        weight_bytes = len(groups) * m.non_expert_bytes + expert_bytes
        kv_bytes = sum(contexts) * m.kv_bytes_per_token
        flops = 2 * n * m.active_params + 4 * m.layers * m.heads * m.head_dim * sum(contexts)
        t = max((weight_bytes + kv_bytes) / self.bw, flops / self.flops) + self.hw.step_overhead
        return t + self.mem.miss * expert_bytes / self.link   # offloaded experts copied in when touched

    # -- batch-1 interface (shared with Calibrated) --------------------------------------------------
    def prefill(self, r: Req) -> float:
        """Prompt forward (produces the first token)."""
        return self.step({r.variant: r.prompt}, [r.prompt])

    def decode(self, r: Req, i: int) -> float:
        """The i-th decode step after the first token (i = 1 .. out-1)."""
        return self.step({r.variant: 1}, [r.prompt + i])

    def service(self, r: Req) -> tuple[float, float]:
        """(time to first token, total compute time) of one request at batch 1, no switch."""
        p = self.prefill(r)
        d = sum(self.decode(r, i) for i in range(1, r.out))
        return p, p + d

    def copy_time(self, nbytes: float) -> float:
        return nbytes / self.link

    def switch_bytes(self) -> float:
        if self.system in ("ours", "ours+affinity", "batching"):
            return self.m.non_expert_bytes                       # partial reconfiguration
        if self.system == "swap":
            return self.m.non_expert_bytes + self.mem.slots_resident * self.m.expert_bytes
        return 0.0

    def switch_blocking(self) -> float:
        return self.copy_time(self.switch_bytes())

    def switch_after_prefetch(self, overlap: float) -> float:
        """Residual wait when the copy started ``overlap`` seconds before the request starts."""
        return max(0.0, self.switch_blocking() - overlap)

    def lane_speed(self, busy: int) -> float:
        return 1.0   # MIG instances are isolated: no slow-down from the others


@dataclass
class Calibrated:
    """A system's costs on this CPU, measured from idle service times (``calibrate``)."""
    prefill_s: float              # start -> first token, same variant as before (no switch)
    decode_s: float               # per later token
    switch_block_s: float = 0.0   # extra service time when the variant changes and nothing was prefetched
    switch_prefetched_s: float = 0.0   # extra service time when the switch was prefetched during the last request
    lane_slowdown: tuple = (1.0,)     # service(k lanes busy) / service(1 lane), k = 1..N (partitioned)
    system: str = ""

    def prefill(self, r: Req) -> float:
        return self.prefill_s

    def decode(self, r: Req, i: int) -> float:
        return self.decode_s

    def service(self, r: Req) -> tuple[float, float]:
        return self.prefill_s, self.prefill_s + (r.out - 1) * self.decode_s

    def switch_blocking(self) -> float:
        return self.switch_block_s

    def switch_after_prefetch(self, overlap: float) -> float:
        return min(self.switch_block_s, self.switch_prefetched_s)

    def lane_speed(self, busy: int) -> float:
        sl = self.lane_slowdown
        return 1.0 / sl[min(busy, len(sl)) - 1]


# ================================================================ simulators

def _summary(reqs: list[Req]) -> dict:
    done = [r for r in reqs if not math.isnan(r.finish)]
    tat = np.array([r.finish - r.arrival for r in done])
    ttft = np.array([r.first - r.arrival for r in done])
    dur = max(r.finish for r in done) - min(r.arrival for r in reqs) if done else math.nan
    tokens = sum(r.out for r in done)
    q = lambda a, p: float(np.percentile(a, p)) if len(a) else math.nan  # noqa: E731
    return {"requests": len(reqs), "completed": len(done),
            "ttft_mean": float(ttft.mean()) if len(done) else math.nan, "ttft_p50": q(ttft, 50), "ttft_p99": q(ttft, 99),
            "turnaround_mean": float(tat.mean()) if len(done) else math.nan, "turnaround_p50": q(tat, 50),
            "turnaround_p99": q(tat, 99), "duration_s": dur, "throughput_rps": len(done) / dur if dur else math.nan,
            "tokens_per_s": tokens / dur if dur else math.nan}


def simulate_serial(trace: list[Req], cost, *, switching: bool, prefetch: bool, policy: str = "fcfs",
                    max_wait: float = 0.5) -> dict:
    """One batch-1 server (ours, ours+affinity, swap, resident).

    Policy as ``serve.Engine``: fcfs, or affinity (oldest request of the variant just served, unless the oldest
    waited more than ``max_wait``). Look-ahead prefetch: while a request runs, as soon as the queue holds a
    request, the variant the policy would pick next starts copying; its residual wait is paid at its start.
    """
    reqs = [replace(r) for r in sorted(trace, key=lambda r: r.arrival)]
    arrivals = [r.arrival for r in reqs]
    queue: list[Req] = []
    t, i, active, switches = 0.0, 0, None, 0
    prefetched: tuple | None = None   # (variant, copy start time)

    def pick(now, last):
        if policy == "fcfs" or len(queue) == 1 or now - queue[0].arrival > max_wait:
            return 0
        return next((j for j, q in enumerate(queue) if q.variant == last), 0)

    while i < len(reqs) or queue:
        if not queue:
            t = max(t, reqs[i].arrival)
        while i < len(reqs) and reqs[i].arrival <= t:
            queue.append(reqs[i])
            i += 1
        r = queue.pop(pick(t, active))
        r.start = t
        wait = 0.0
        if switching and active is not None and r.variant != active:
            switches += 1
            if prefetched and prefetched[0] == r.variant:
                wait = cost.switch_after_prefetch(t - prefetched[1])
            else:
                wait = cost.switch_blocking()
        elif switching and active is None:
            wait = 0.0
        active = r.variant
        prefetched = None
        ttft, total = cost.service(r)
        r.first = t + wait + ttft
        r.finish = t + wait + total
        if prefetch and switching:  # look-ahead: the first moment during this service the queue is non-empty
            if queue:
                at, nxt = r.start + wait, queue[pick(r.start + wait, r.variant)].variant
            else:
                j = bisect.bisect_right(arrivals, r.start)
                at, nxt = (reqs[j].arrival, reqs[j].variant) if j < len(reqs) and reqs[j].arrival < r.finish \
                    else (None, None)
            if nxt is not None and nxt != r.variant:
                prefetched = (nxt, at)
        t = r.finish
    out = _summary(reqs)
    out["switches"] = switches
    return out


def simulate_lanes(trace: list[Req], cost_of_lane, lanes: int) -> dict:
    """Partitioned: one FCFS queue and server per variant; while k lanes are busy each progresses at
    ``lane_speed(k)`` of its idle speed (processor sharing on a CPU; 1.0 for isolated MIG instances)."""
    reqs = [replace(r) for r in sorted(trace, key=lambda r: r.arrival)]
    queues = [[] for _ in range(lanes)]
    running: list[list | None] = [None] * lanes   # [req, work done, ttft work, total work]
    t, i = 0.0, 0
    cost0 = cost_of_lane(0)
    while i < len(reqs) or any(queues) or any(running):
        for lane in range(lanes):
            if running[lane] is None and queues[lane]:
                r = queues[lane].pop(0)
                r.start = t
                ttft, total = cost_of_lane(lane).service(r)
                running[lane] = [r, 0.0, ttft, total]
        busy = sum(x is not None for x in running)
        speed = cost0.lane_speed(busy) if busy else 1.0
        # next event: an arrival, a first token or a finish
        dt = reqs[i].arrival - t if i < len(reqs) else math.inf
        for x in running:
            if x is not None:
                for goal in (x[2], x[3]):
                    if x[1] < goal:
                        dt = min(dt, (goal - x[1]) / speed)
                        break
        dt = max(dt, 0.0)
        t += dt
        for lane, x in enumerate(running):
            if x is None:
                continue
            before = x[1]
            x[1] += dt * speed
            if before < x[2] <= x[1] + 1e-15:
                x[0].first = t
            if x[1] >= x[3] - 1e-15:
                x[0].finish = t
                if math.isnan(x[0].first):
                    x[0].first = t
                running[lane] = None
        while i < len(reqs) and reqs[i].arrival <= t:
            queues[reqs[i].variant % lanes].append(reqs[i])
            i += 1
    out = _summary(reqs)
    out["switches"] = 0
    return out


def simulate_batching(trace: list[Req], cost: Roofline, *, resident_sets: int, max_batch: int = 64,
                      token_budget: int = 2048) -> dict:
    """Continuous batching: each step admits waiting requests (FCFS, within ``max_batch`` sequences and a
    ``token_budget`` of prefill + decode tokens) whose variant's non-expert set is resident, then runs one
    forward over all of them (mixed variants). A request of a non-resident variant triggers a copy of its set
    into the least recently used one not in use (serial on the link, overlapped with steps)."""
    reqs = [replace(r) for r in sorted(trace, key=lambda r: r.arrival)]
    waiting: list[Req] = []
    running: list[list] = []          # [req, tokens generated]
    resident: dict[int, float] = {}   # variant -> last use time
    ready_at: dict[int, float] = {}   # variant -> when its copy lands
    link_free, t, i, copies = 0.0, 0.0, 0, 0
    while i < len(reqs) or waiting or running:
        while i < len(reqs) and reqs[i].arrival <= t:
            waiting.append(reqs[i])
            i += 1
        if not waiting and not running:
            t = reqs[i].arrival
            continue
        in_use = {x[0].variant for x in running}
        for r in waiting:  # start copies for missing variants (paper's partial reconfiguration)
            v = r.variant
            if v in resident or v in ready_at:
                continue
            if len(resident) + len(ready_at) >= resident_sets:
                victims = [u for u in resident if u not in in_use]
                if not victims:
                    continue
                del resident[min(victims, key=resident.get)]
            start = max(t, link_free)
            link_free = start + cost.copy_time(cost.m.non_expert_bytes)
            ready_at[v] = link_free
            copies += 1
        for v, at in list(ready_at.items()):
            if at <= t:
                resident[v] = t
                del ready_at[v]
        budget = token_budget - len(running)
        admitted = []
        for r in list(waiting):
            if len(running) + len(admitted) >= max_batch or r.prompt > budget:
                break
            if r.variant not in resident:
                continue
            admitted.append(r)
            budget -= r.prompt
            waiting.remove(r)
        if not running and not admitted:  # wait for a copy to land or the next arrival
            nxt = min(list(ready_at.values()) + ([reqs[i].arrival] if i < len(reqs) else []), default=None)
            if nxt is None:
                raise RuntimeError("batching simulation stuck: no resident set can be freed")
            t = max(t, nxt)
            continue
        groups: dict[int, int] = {}
        ctx = []
        for x in running:
            groups[x[0].variant] = groups.get(x[0].variant, 0) + 1
            ctx.append(x[0].prompt + x[1])
        for r in admitted:
            r.start = t
            groups[r.variant] = groups.get(r.variant, 0) + r.prompt
            ctx.append(r.prompt)
        t += cost.step(groups, ctx)
        for v in groups:
            resident[v] = t
        for x in running:
            x[1] += 1
        for r in admitted:
            r.first = t
            running.append([r, 1])
        for x in list(running):
            if x[1] >= x[0].out:
                x[0].finish = t
                running.remove(x)
    out = _summary(reqs)
    out["switches"] = copies
    return out


# ================================================================ systems at scale

SCALE_SYSTEMS = ("ours", "ours+affinity", "partitioned", "swap", "resident")


def simulate_system(system: str, trace: list[Req], hw: Hardware, model: ModelSpec, variants: int, **kw) -> dict:
    """One roofline-costed system on one trace; adds the memory plan to the summary."""
    if system == "partitioned":
        cost = Roofline(hw, model, system, variants, fraction=1.0 / variants)
        out = simulate_lanes(trace, lambda lane: cost, variants)
    elif system == "batching":
        R = kw.get("resident_sets", variants)
        cost = Roofline(hw, model, system, variants, resident_sets=R, max_batch=kw.get("max_batch", 64))
        out = simulate_batching(trace, cost, resident_sets=R, max_batch=kw.get("max_batch", 64))
    else:
        cost = Roofline(hw, model, system, variants)
        out = simulate_serial(trace, cost, switching=system != "resident", prefetch=system.startswith("ours"),
                              policy="affinity" if system == "ours+affinity" else "fcfs")
    ttft, tot = cost.service(Req(0.0, 0))
    out.update(system=system, share=cost.mem.share, offloaded_fraction=cost.mem.miss, all_fits=cost.mem.fits,
               idle_service_s=tot, idle_ttft_s=ttft, switch_bytes=cost.switch_bytes())
    return out


def sweep(hw: Hardware, model: ModelSpec, variants: int, rates, systems=SCALE_SYSTEMS, n: int = 400,
          seed: int = 0, progress: bool = True, **kw) -> list[dict]:
    from tqdm.auto import tqdm

    rows = []
    bar = tqdm(total=len(rates) * len(systems), desc=f"{hw.name} {variants}x{model.name}", disable=not progress)
    for li, rate in enumerate(rates):
        trace = poisson_trace(rate, n, variants, seed=seed * 1000 + li)
        for s in systems:
            out = simulate_system(s, trace, hw, model, variants, **kw)
            out["rate"] = rate
            rows.append(out)
            bar.update(1)
    bar.close()
    return rows


def idle_rate(system: str, hw, model, variants) -> float:
    return 1.0 / simulate_system(system, [Req(0.0, 0)], hw, model, variants)["idle_service_s"]


def ours_vs_partitioned(rows) -> list[dict]:
    """Per λ: 1 - ours' mean turnaround / the MIG-like partition's (the paper's 85% is this number)."""
    out = []
    for rt in dict.fromkeys(r["rate"] for r in rows):
        by = {r["system"]: r for r in rows if r["rate"] == rt}
        if "ours" in by and "partitioned" in by:
            out.append({"rate": rt, "turnaround_reduction":
                        1 - by["ours"]["turnaround_mean"] / by["partitioned"]["turnaround_mean"]})
    return out


_HW = {h.name: h for h in HARDWARE.values()}
_MODEL = {m.name: m for m in MODELS.values()}


def _rates(mu: float, mu_mig: float, factors=(0.3, 0.6, 0.9)) -> list[float]:
    """λ values: ``factors`` x ours' idle service rate, plus half the MIG instances' total idle capacity when
    that is lower (so one λ leaves every system unsaturated)."""
    rates = {float(f"{f * mu:.3g}") for f in factors}
    if 0.5 * mu_mig < min(rates):
        rates.add(float(f"{0.5 * mu_mig:.3g}"))
    return sorted(rates)


def paper_scale(n: int = 400, progress: bool = True) -> dict:
    """The paper's workload at scale: 2 and 4 Mixtral-8x7B variants on an A100-80GB PCIe, the same on an
    H200, and 8 variants with continuous batching (Mixtral-8x7B and Qwen3-30B-A3B on an H200)."""
    mix, a100, h200 = MODELS["mixtral-8x7b"], HARDWARE["a100-80gb-pcie"], HARDWARE["h200"]
    cases = []
    for hw in (a100, h200):
        for V in (2, 4):
            mu, mu_mig = idle_rate("ours", hw, mix, V), V * idle_rate("partitioned", hw, mix, V)
            rates = _rates(mu, mu_mig)
            cases.append({"name": f"{hw.name}, {V} x {mix.name}, batch 1", "hardware": hw.name, "model": mix.name,
                          "variants": V, "rates": rates, "rows": sweep(hw, mix, V, rates, n=n, progress=progress)})
    for model in (mix, MODELS["qwen3-30b-a3b"]):
        V = 8
        mu, mu_mig = idle_rate("ours", h200, model, V), V * idle_rate("partitioned", h200, model, V)
        rates = _rates(mu, mu_mig, (0.5, 2.0, 8.0))
        cases.append({"name": f"{h200.name}, {V} x {model.name}, continuous batching vs batch 1",
                      "hardware": h200.name, "model": model.name, "variants": V, "rates": rates,
                      "rows": sweep(h200, model, V, rates, systems=("batching",) + SCALE_SYSTEMS, n=n,
                                    progress=progress, resident_sets=4)})
    for c in cases:
        idle = {s: simulate_system(s, [Req(0.0, 0)], _HW[c["hardware"]], _MODEL[c["model"]], c["variants"])
                for s in ("ours", "partitioned")}
        c["idle_service_s"] = {s: x["idle_service_s"] for s, x in idle.items()}
        c["idle_turnaround_reduction"] = 1 - idle["ours"]["idle_service_s"] / idle["partitioned"]["idle_service_s"]
        c["ours_vs_partitioned"] = ours_vs_partitioned(c["rows"])
    return {"paper_claim": "85% lower mean turnaround than MIG, 2 x Mixtral-8x7B, A100, Poisson, 20-token prompts, "
                           "25 new tokens, batch 1 (ICML 2025, partial runtime reconfiguration)",
            "hardware": {k: asdict(v) for k, v in HARDWARE.items()},
            "models": {k: asdict(v) | {"full_bytes": v.full_bytes, "non_expert_bytes": v.non_expert_bytes,
                                       "expert_bytes": v.expert_bytes} for k, v in MODELS.items()},
            "requests_per_rate": n, "cases": cases}


# ================================================================ calibration + validation (CPU, tiny zoo)

def _load_serve_qos():
    from . import serve_qos

    return serve_qos


def calibrate(loaded: dict, names, pool, out_tokens: int = 25, reps: int = 8) -> dict:
    """Idle service times of each system on the real engine -> ``Calibrated`` parameters per system.

    Same-variant requests one at a time (prefill = start->first token, decode per token); variant-cycling
    requests one at a time without look-ahead (blocking switch); for ours, variant-cycling requests queued back
    to back with look-ahead (prefetched switch); for partitioned, k requests on k lanes at once (lane slow-down).
    Prompts vary (as in a sweep: the partitioned instances' expert caches miss), and the systems are measured
    round-robin, one request each per round, so a load spike from elsewhere spreads over all of them.
    """
    from multimoe_rt.serve import Engine, Request

    def req(v, i):
        return Request(v, pool[v][i % len(pool[v])], max_new_tokens=out_tokens, ignore_eos=True)

    med = statistics.median
    labels = [x for x in loaded if x != "ours+affinity"]
    engines = {x: Engine(loaded[x], lookahead=False) for x in labels}
    same = {x: [] for x in labels}
    cyc = {x: [] for x in labels}
    b2b, conc = [], {k: [] for k in range(2, len(names) + 1)}
    try:
        for i in range(reps + 1):
            for x in labels:
                eng = engines[x]
                eng.submit(req(names[0], i)).result()                 # make names[0] active
                r = eng.submit(req(names[0], i + 1)).result()         # same variant: no switch
                if i:
                    same[x].append((r.first_token - r.start, r.finish - r.start))
                if x in ("ours", "swap"):
                    r = eng.submit(req(names[1 + i % (len(names) - 1)], i)).result()   # blocking switch
                    cyc[x].append(r.finish - r.start)
                if x == "partitioned":
                    for k in conc:
                        futs = [eng.submit(req(v, i)) for v in names[:k]]
                        conc[k].extend(f.result().finish - f.result().start for f in futs)
            if "ours" in loaded:
                with Engine(loaded["ours"], lookahead=True) as eng:   # queued back to back: look-ahead prefetch
                    futs = [eng.submit(req(names[j % len(names)], i + j)) for j in range(len(names) + 1)]
                    b2b.extend(f.result().finish - f.result().start for f in futs[1:])
    finally:
        for eng in engines.values():
            eng.shutdown()
    cal = {}
    for x in labels:
        pre = med(a for a, _ in same[x])
        svc = med(b for _, b in same[x])
        c = {"prefill_s": pre, "decode_s": (svc - pre) / (out_tokens - 1), "system": x}
        if cyc[x]:
            c["switch_block_s"] = max(0.0, med(cyc[x]) - svc)
        if x == "ours" and b2b:
            c["switch_prefetched_s"] = max(0.0, med(b2b) - svc)
        if x == "partitioned":
            c["lane_slowdown"] = tuple([1.0] + [med(conc[k]) / svc for k in sorted(conc)])
        cal[x] = c
    return cal


def simulate_calibrated(label: str, trace: list[Req], cal: dict, lanes: int) -> dict:
    base = "ours" if label == "ours+affinity" else label
    cost = Calibrated(**cal[base])
    if label == "partitioned":
        return simulate_lanes(trace, lambda lane: cost, lanes)
    return simulate_serial(trace, cost, switching=label != "resident", prefetch=label.startswith("ours"),
                           policy="affinity" if label == "ours+affinity" else "fcfs")


def validate(small: bool = True, rates=None, n: int = 40, reps: int = 8, systems=None, seed: int = 0,
             progress: bool = True, threads: int = 1) -> dict:
    """Calibrate on the real engine (idle service times only), run the real QoS sweep, simulate the same
    traces, and report simulated vs measured mean / p99 turnaround per system and λ."""
    import torch

    from multimoe_rt.lab import zoo
    from multimoe_rt.machine import machine_info

    torch.set_num_threads(threads)
    dirs = zoo.build("mixtral-tiny", small=small, progress=progress)
    names = [v for v in ("base", "ptb", "shakespeare", "pycode") if v in dirs]
    out = measure_and_simulate({v: dirs[v] for v in names}, rates=rates, n=n, reps=reps, systems=systems,
                               seed=seed, progress=progress)
    return {"machine": machine_info(), "zoo": "mixtral-tiny" + (" --small" if small else ""), "threads": threads,
            **out}


def measure_and_simulate(dirs: dict, rates=None, n: int = 40, reps: int = 8, systems=None, seed: int = 0,
                         progress: bool = False, out_tokens: int = 25) -> dict:
    """The core of ``validate`` on any variant directories: load, calibrate, replay each λ's trace on the real
    engine, simulate the same trace with the calibration, compare."""
    from tqdm.auto import tqdm

    from multimoe_rt.serve import Engine, summarize

    sq = _load_serve_qos()
    names = list(dirs)
    systems = systems or ["ours", "partitioned", "swap", "resident"]
    loaded, mv, budget = sq.load_systems(dirs, systems, 0.5)
    if "ours" in loaded:
        loaded["ours+affinity"] = loaded["ours"]
    pool = sq.prompt_pool(names, 20, max(8, n), seed) if set(names) <= set(sq.DOMAIN_OF) else \
        {v: [[(7 * i + j) % 50 + 3 for j in range(20)] for i in range(max(8, n))] for v in names}
    for s in loaded.values():
        sq.warm_up(s, names, pool, out_tokens, rounds=1)
    t0 = time.perf_counter()
    cal = calibrate(loaded, names, pool, out_tokens=out_tokens, reps=reps)
    calib_s = time.perf_counter() - t0
    mu = 1.0 / min(Calibrated(**c).service(Req(0, 0, 20, out_tokens))[1] for c in cal.values())
    rates = rates or [round(f * mu, 2) for f in (0.3, 0.6, 0.9)]
    rows = []
    bar = tqdm(total=len(rates) * len(loaded), desc="validation sweep", disable=not progress)
    for li, rate in enumerate(rates):
        trace = sq.make_trace(names, rate, n, seed=seed * 1000 + li, pool=pool)
        sim_trace = [Req(at, names.index(v), len(ids), out_tokens) for at, v, ids in trace]
        for label, system in loaded.items():
            eng = Engine(system, policy="affinity" if label == "ours+affinity" else "fcfs")
            reqs, _ = sq.replay(eng, trace, out_tokens)
            eng.shutdown()
            meas = summarize(reqs)
            sim = simulate_calibrated(label, sim_trace, cal, len(names))
            rows.append(_compare(label, rate, meas, sim))
            bar.update(1)
    bar.close()
    return {"variants": names, "requests_per_rate": n, "calibration": cal, "calibration_s": calib_s,
            "rates": rates, "rows": rows}


def _compare(label, rate, meas: dict, sim: dict) -> dict:
    err = lambda s, m: (s - m) / m if m else math.nan  # noqa: E731
    return {"system": label, "rate": rate,
            "measured": {k: meas[k] for k in ("turnaround_mean", "turnaround_p99", "ttft_mean", "throughput_rps")},
            "simulated": {k: sim[k] for k in ("turnaround_mean", "turnaround_p99", "ttft_mean", "throughput_rps")},
            "err_mean": err(sim["turnaround_mean"], meas["turnaround_mean"]),
            "err_p99": err(sim["turnaround_p99"], meas["turnaround_p99"])}


def validate_archived(path) -> dict | None:
    """Re-simulate an archived serve_qos JSON from its own recorded idle service times (a cruder calibration:
    one number per system, switch included, no prefill/decode split)."""
    d = json.loads(Path(path).read_text())
    names, n = d["variants"], d["requests_per_rate"]
    idle = {r["system"]: r["idle_service_s"] for r in d["results"]}
    rows = []
    for li, rate in enumerate(d["rates"]):
        trace = serve_qos_trace(rate, n, len(names), d["seed"] * 1000 + li, max(8, n))
        for r in (x for x in d["results"] if x["rate"] == rate):
            label = r["system"]
            s = idle["ours" if label == "ours+affinity" else label]
            cost = Calibrated(prefill_s=0.1 * s, decode_s=0.9 * s / 24, system=label)
            if label == "partitioned":
                sim = simulate_lanes(trace, lambda lane: cost, len(names))
            else:
                sim = simulate_serial(trace, cost, switching=False, prefetch=False,
                                      policy="affinity" if label == "ours+affinity" else "fcfs")
            rows.append(_compare(label, rate, r, sim))
    return {"source": str(path), "rows": rows}


def batching_trace(names, rate: float | None, n: int, prompt_len: int, new_tokens: int, seed: int,
                   vocab: int = 272) -> list[Req]:
    """batching.py's ``make_trace`` (same ``random.Random`` draws, so the same arrivals and variants for the
    same seed and vocabulary; the mixtral-tiny zoo's is 272), as simulator requests. Kept here so that this module
    does not import torch."""
    import random

    rng = random.Random(seed)
    t, out = 0.0, []
    for _ in range(n):
        if rate is not None:
            t += rng.expovariate(rate)
        v = names.index(rng.choice(names))
        for _ in range(prompt_len):
            rng.randrange(3, vocab)
        out.append(Req(t, v, prompt_len, new_tokens))
    return out


def simulate_engine(trace: list[Req], step_time, *, max_seqs: int = 64, step_tokens: int = 256,
                    group: bool = False, stats: dict | None = None) -> dict:
    """multimoe_rt.engine.Engine's scheduler, step by step: admit waiting requests (arrival order, or variant by
    variant with ``group``) into free KV slots, then one forward over the decodes first and prompt chunks after,
    within ``step_tokens``; the step that finishes a prompt emits the first token. ``step_time(tokens, variants)``
    gives a step's seconds. ``stats`` (optional) collects steps, tokens and sum(variants - 1) for calibration."""
    reqs = [replace(r) for r in sorted(trace, key=lambda r: r.arrival)]
    waiting: list[Req] = []
    running: list[list] = []   # [req, prompt tokens cached, tokens generated]
    t, i = 0.0, 0
    st = stats if stats is not None else {}
    st.update(steps=0, tokens=0, extra_variants=0)
    while i < len(reqs) or waiting or running:
        while i < len(reqs) and reqs[i].arrival <= t:
            waiting.append(reqs[i])
            i += 1
        if not waiting and not running:
            t = reqs[i].arrival
            continue
        cand = list(waiting)
        if group:
            rank: dict[int, int] = {}
            for r in cand:
                rank.setdefault(r.variant, len(rank))
            cand.sort(key=lambda r: rank[r.variant])
        for r in cand:
            if len(running) >= max_seqs:
                break
            waiting.remove(r)
            r.start = t
            running.append([r, 0, 0])
        budget, fed = step_tokens, []
        for x in sorted(running, key=lambda x: x[1] < x[0].prompt):   # decodes first, then prompt chunks
            if budget == 0:
                break
            n = min(budget, x[0].prompt - x[1]) if x[1] < x[0].prompt else 1
            budget -= n
            fed.append((x, n))
        tokens = step_tokens - budget
        variants = len({x[0].variant for x, _ in fed})
        t += step_time(tokens, variants)
        st["steps"] += 1
        st["tokens"] += tokens
        st["extra_variants"] += variants - 1
        for x, n in fed:
            if x[1] < x[0].prompt:
                x[1] += n
                if x[1] < x[0].prompt:
                    continue
                x[0].first = t
            x[2] += 1
            if x[2] >= x[0].out:
                x[0].finish = t
                running.remove(x)
    return _summary(reqs)


def linear_step(a: float, b: float, c: float = 0.0):
    """Step seconds = a + b * tokens + c * (distinct variants in the step - 1)."""
    return lambda tokens, variants: a + b * tokens + c * (variants - 1)


def calibrate_engine_steps(d: dict, vocab: int = 272, seed: int = 0) -> dict:
    """Fit the step model from the file's *saturated* runs only (every request at t = 0, so the schedule, hence
    the step count and tokens, does not depend on the step times): ``one_variant``'s wall time over the shapes
    and the batch-1 engine's time per request (one sequence alone: the per-step overhead that big batches hide)
    give a (per step) and b (per token) by least squares on relative error; ``mixed``'s excess over that gives c (per extra
    variant in a step). The Poisson sweep rows are not used."""
    names, max_seqs = list(d["variants"]), int(d.get("max_seqs", 64))
    A, y, Vx, Vy = [], [], [], []
    for shape in d["shapes"].values():
        sat = shape["saturated"]
        p, o = int(shape["prompt_len"]), int(shape["new_tokens"])
        n = int(sat["mixed"]["requests"])
        trace = batching_trace(names, None, n, p, o, seed, vocab)
        one = [replace(r, variant=0) for r in trace]
        s1, sm = {}, {}
        simulate_engine(one, linear_step(1.0, 0.0), max_seqs=max_seqs, stats=s1)
        simulate_engine(trace, linear_step(1.0, 0.0), max_seqs=max_seqs, stats=sm)
        A.append([s1["steps"], s1["tokens"]])
        y.append(sat["one_variant"]["wall_s"])
        if "batch1" in sat:   # one request alone: anchors the per-step overhead that large batches hide
            A.append([-(-p // 256) + o - 1, p + o - 1])
            y.append(sat["batch1"]["wall_s"] / sat["batch1"]["requests"])
        Vx.append((sm["steps"], sm["tokens"], sm["extra_variants"]))
        Vy.append(sat["mixed"]["wall_s"])
    A, y = np.array(A, float), np.array(y, float)
    (a, b), *_ = np.linalg.lstsq(A / y[:, None], np.ones_like(y), rcond=None)   # relative errors
    a, b = max(float(a), 0.0), max(float(b), 0.0)
    ex = np.array([v - a * s - b * tk for (s, tk, _), v in zip(Vx, Vy)])
    ev = np.array([e for *_, e in Vx], float)
    c = max(float(ex @ ev / (ev @ ev)), 0.0) if ev.any() else 0.0
    b1 = {k: float(v["saturated"]["batch1"]["wall_s"] / v["saturated"]["batch1"]["requests"])
          for k, v in d["shapes"].items() if "batch1" in v["saturated"]}
    return {"a_step_s": a, "b_token_s": b, "c_variant_s": c, "batch1_service_s": b1,
            "source": "saturated runs of the same file (one_variant + batch1 per request -> a, b; mixed -> c; batch1 -> service time)"}


def simulate_batch1(trace: list[Req], service: float) -> dict:
    """The batch-1 engine: one request at a time, first come first served, ``service`` seconds each."""
    reqs = [replace(r) for r in sorted(trace, key=lambda r: r.arrival)]
    free = 0.0
    for r in reqs:
        r.start = max(r.arrival, free)
        r.first = r.start + service / r.out
        r.finish = free = r.start + service
    return _summary(reqs)


BATCHING_SYSTEMS = ("mixed", "one_variant", "grouped", "batch1")   # per_variant / transformers: not modelled


def _err(sim, meas):
    return (sim - meas) / meas if meas else math.nan


def validate_batching_file(d: dict, label: str = "", vocab: int = 272, seed: int = 0,
                           systems=BATCHING_SYSTEMS) -> dict:
    """Simulate every Poisson row of one batching.py result (same λ, request count, shape and, regenerated
    with the same seed, the same trace) with the step model calibrated from the file's saturated runs."""
    cal = calibrate_engine_steps(d, vocab, seed)
    step = linear_step(cal["a_step_s"], cal["b_token_s"], cal["c_variant_s"])
    names, max_seqs = list(d["variants"]), int(d.get("max_seqs", 64))
    rows, sat_rows = [], []
    for shape_name, shape in d["shapes"].items():
        p, o = int(shape["prompt_len"]), int(shape["new_tokens"])
        n_sat = int(shape["saturated"]["mixed"]["requests"])
        rates = list(dict.fromkeys(r["rate"] for r in shape["sweep"]))

        def run(system, rate, n, s):
            tr = batching_trace(names, rate, n, p, o, s, vocab)
            if system == "one_variant":
                tr = [replace(r, variant=0) for r in tr]
            if system == "batch1":
                return simulate_batch1(tr, cal["batch1_service_s"][shape_name])
            return simulate_engine(tr, step, max_seqs=max_seqs, group=system == "grouped")

        for system in systems:
            if system not in shape["saturated"]:
                continue
            sim = run(system, None, n_sat, seed)
            meas = shape["saturated"][system]
            sat_rows.append({"file": label, "shape": shape_name, "system": system,
                             "measured_tokens_per_s": meas["tokens_per_s"], "simulated_tokens_per_s": sim["tokens_per_s"],
                             "err": _err(sim["tokens_per_s"], meas["tokens_per_s"]),
                             "fitted": system in ("mixed", "one_variant", "batch1")})
        for r in shape["sweep"]:
            if r["system"] not in systems:
                continue
            li = rates.index(r["rate"])
            sim = run(r["system"], float(r["rate"]), int(r["requests"]), seed + 1 + li)
            keys = ("ttft_mean", "turnaround_mean", "turnaround_p99")
            rows.append({"file": label, "shape": shape_name, "system": r["system"], "rate": r["rate"],
                         "requests": r["requests"], "measured": {k: r[k] for k in keys},
                         "simulated": {k: sim[k] for k in keys},
                         "err_mean": _err(sim["turnaround_mean"], r["turnaround_mean"]),
                         "err_p99": _err(sim["turnaround_p99"], r["turnaround_p99"])})
    return {"file": label, "variants": len(names), "max_seqs": max_seqs, "calibration": cal,
            "saturated": sat_rows, "rows": rows}


def validate_batching(paths=None, vocab: int = 272, seed: int = 0, progress: bool = False) -> dict | None:
    """Against the continuous-batching bench (batching*.json in the results folder, batching.py's format): per file,
    calibrate the CPU step model from its saturated runs (``calibrate_engine_steps``), replay each Poisson row's
    trace through the Engine-scheduler simulator and compare mean / p99 turnaround per λ."""
    files = [Path(p) for p in (paths or sorted(results_dir().glob("batching*.json")))]
    files = [f for f in files if f.exists()]
    if not files:
        return None
    out, rows = [], []
    for f in files:
        d = json.loads(f.read_text())
        if "shapes" not in d:
            out.append({"file": f.name, "note": "not batching.py's format (no 'shapes')"})
            continue
        res = validate_batching_file(d, label=f.stem, vocab=vocab, seed=seed)
        out.append(res)
        rows += res["rows"]
    summary = {}
    for s in dict.fromkeys(r["system"] for r in rows):
        e = [r for r in rows if r["system"] == s]
        summary[s] = {"rows": len(e), "mean_abs_err_mean": float(np.mean([abs(r["err_mean"]) for r in e])),
                      "mean_abs_err_p99": float(np.mean([abs(r["err_p99"]) for r in e])),
                      "max_abs_err_mean": float(np.max([abs(r["err_mean"]) for r in e]))}
    return {"method": "step(tokens, variants) = a + b*tokens + c*(variants-1), fitted per file to its saturated runs; "
                      "Poisson traces regenerated with batching.py's make_trace draws (seed + 1 + λ index)",
            "files": out, "rows": rows, "summary": summary}


def batching_validation_table(rows) -> str:
    head = (f"{'file':<15} {'shape':<6} {'λ/s':>7} {'system':<12} {'meas mean':>10} {'sim mean':>10} {'err':>6} "
            f"{'meas p99':>10} {'sim p99':>10} {'err':>6}")
    lines = [head, "-" * len(head)]
    for r in rows:
        m, s = r["measured"], r["simulated"]
        lines.append(f"{r['file']:<15} {r['shape']:<6} {r['rate']:>7} {r['system']:<12} {fmt_ms(m['turnaround_mean']):>10} "
                     f"{fmt_ms(s['turnaround_mean']):>10} {100 * r['err_mean']:>+5.0f}% {fmt_ms(m['turnaround_p99']):>10} "
                     f"{fmt_ms(s['turnaround_p99']):>10} {100 * r['err_p99']:>+5.0f}%")
    return "\n".join(lines)


def plot_batching_validation(rows, path) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    panels = list(dict.fromkeys((r["file"], r["shape"]) for r in rows))
    if not panels:
        return None
    cols = 2
    fig, axes = plt.subplots((len(panels) + cols - 1) // cols, cols, figsize=(10, 3.2 * ((len(panels) + 1) // cols)),
                             squeeze=False)
    for ax, (f, sh) in zip(axes.flat, panels):
        sub = [r for r in rows if r["file"] == f and r["shape"] == sh]
        for s in dict.fromkeys(r["system"] for r in sub):
            pts = [r for r in sub if r["system"] == s]
            line, = ax.plot([r["rate"] for r in pts], [1e3 * r["measured"]["turnaround_mean"] for r in pts],
                            marker="o", label=f"{s} measured")
            ax.plot([r["rate"] for r in pts], [1e3 * r["simulated"]["turnaround_mean"] for r in pts], marker="x",
                    ls="--", color=line.get_color(), label=f"{s} simulated")
        ax.set_yscale("log")
        ax.set_title(f"{f} / {sh}", fontsize=9)
        ax.set_xlabel("λ (requests/s)")
        ax.set_ylabel("mean turnaround (ms)")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=6)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return str(path)


CPU_BATCH_CURVE = {1: 649.0, 4: 1975.0, 16: 4984.0, 64: 9120.0}   # tok/s, DESIGN.md "Batching headroom"


def cpu_batching_cost(variants: int) -> Roofline:
    """A roofline for this CPU fitted to CPU_BATCH_CURVE: step(B) = overhead + B * per-sequence cost."""
    xs = np.array(sorted(CPU_BATCH_CURVE), dtype=float)
    ys = xs / np.array([CPU_BATCH_CURVE[int(x)] for x in xs])
    slope, icpt = np.polyfit(xs, ys, 1)
    m = MODELS["mixtral-tiny"]
    hw = Hardware("this CPU (fitted)", 64 * GB, m.non_expert_bytes / 1e-9, 2 * m.active_params / float(slope), 10 * GB,
                  bw_eff=1.0, flops_eff=1.0, step_overhead=float(icpt), reserve_bytes=0.0,
                  source="fit to DESIGN.md batching headroom")
    return Roofline(hw, m, "batching", variants, resident_sets=variants, max_batch=64)


# ================================================================ output

def fmt_ms(x: float) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{1000 * x:.1f}ms" if x < 10 else f"{x:.1f}s"


def validation_table(rows) -> str:
    head = f"{'λ/s':>7} {'system':<14} {'meas mean':>10} {'sim mean':>10} {'err':>6} {'meas p99':>10} {'sim p99':>10} {'err':>6}"
    lines = [head, "-" * len(head)]
    for r in rows:
        m, s = r["measured"], r["simulated"]
        lines.append(f"{r['rate']:>7} {r['system']:<14} {fmt_ms(m['turnaround_mean']):>10} "
                     f"{fmt_ms(s['turnaround_mean']):>10} {100 * r['err_mean']:>+5.0f}% {fmt_ms(m['turnaround_p99']):>10} "
                     f"{fmt_ms(s['turnaround_p99']):>10} {100 * r['err_p99']:>+5.0f}%")
    return "\n".join(lines)


def scale_table(case: dict) -> str:
    head = (f"{'λ/s':>8} {'system':<14} {'TTFT mean':>10} {'TTFT p99':>10} {'turn mean':>10} {'turn p99':>10} "
            f"{'req/s':>7} {'tok/s':>7} {'share':>5} {'offload':>7} {'switch':>6}")
    lines = [f"## {case['name']}", head, "-" * len(head)]
    for r in case["rows"]:
        lines.append(f"{r['rate']:>8.3g} {r['system']:<14} {fmt_ms(r['ttft_mean']):>10} {fmt_ms(r['ttft_p99']):>10} "
                     f"{fmt_ms(r['turnaround_mean']):>10} {fmt_ms(r['turnaround_p99']):>10} "
                     f"{r['throughput_rps']:>7.3f} {r['tokens_per_s']:>7.1f} {r['share']:>5.2f} "
                     f"{100 * r['offloaded_fraction']:>6.0f}% {r['switches']:>6}")
    if "idle_turnaround_reduction" in case:
        lines.append(f"idle service (no queueing): ours {fmt_ms(case['idle_service_s']['ours'])}, partitioned "
                     f"{fmt_ms(case['idle_service_s']['partitioned'])}: "
                     f"{100 * case['idle_turnaround_reduction']:.0f}% lower")
    lines.append("ours vs partitioned (MIG), mean turnaround: " + ", ".join(
        f"λ={x['rate']:.3g}: {100 * x['turnaround_reduction']:.0f}% lower" for x in case["ours_vs_partitioned"]))
    return "\n".join(lines)


def plot_cases(cases, path, key="turnaround_mean") -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    # A grid a person can read (at most 3 panels a row), one legend for every system of every panel.
    cols = min(3, len(cases))
    rows_n = (len(cases) + cols - 1) // cols
    fig, axes = plt.subplots(rows_n, cols, figsize=(4.6 * cols, 3.6 * rows_n + 0.6), squeeze=False)
    handles = {}
    for ax, c in zip(axes.flat, cases):
        for s in dict.fromkeys(r["system"] for r in c["rows"]):
            pts = [(r["rate"], r[key]) for r in c["rows"] if r["system"] == s]
            (line,) = ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=s)
            handles.setdefault(s, line)
        ax.set_yscale("log")
        ax.set_xlabel("λ (requests/s)")
        ax.set_ylabel("mean turnaround (s)")
        ax.set_title(textwrap.fill(c["name"], 48), fontsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(cases):]:
        ax.set_visible(False)
    fig.legend(handles.values(), handles.keys(), loc="lower center", ncol=min(6, len(handles)), fontsize=8)
    fig.tight_layout(rect=(0, 0.6 / (3.6 * rows_n + 0.6), 1, 1))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def plot_validation(rows, path) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for i, s in enumerate(dict.fromkeys(r["system"] for r in rows)):
        pts = [r for r in rows if r["system"] == s]
        line, = ax.plot([r["rate"] for r in pts], [1000 * r["measured"]["turnaround_mean"] for r in pts],
                        marker="o", label=f"{s} measured")
        ax.plot([r["rate"] for r in pts], [1000 * r["simulated"]["turnaround_mean"] for r in pts], marker="x",
                ls="--", color=line.get_color(), label=f"{s} simulated")
    ax.set_yscale("log")
    ax.set_xlabel("λ (requests/s)")
    ax.set_ylabel("mean turnaround (ms)")
    ax.set_title("tiny zoo on this CPU: measured vs simulated", fontsize=9)
    ax.legend(fontsize=6)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def _dump(obj, path):
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(obj, indent=1, default=str))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="simulate", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    sp = sub.add_parser("paper", help="paper-scale tables and plots (A100, H200, 8 variants batching)")
    sp.add_argument("-n", "--requests", type=int, default=400)
    sv = sub.add_parser("validate", help="calibrate + measure on the tiny zoo, simulate the same traces")
    sv.add_argument("--full", action="store_true", help="the full mixtral-tiny zoo (default: --small zoo)")
    sv.add_argument("--rates", default=None)
    sv.add_argument("-n", "--requests", type=int, default=40)
    sv.add_argument("--reps", type=int, default=8)
    sv.add_argument("--threads", type=int, default=1)
    sv.add_argument("--archived", default=None, help="also re-simulate this archived serve_qos JSON")
    sub.add_parser("validate-batching", help="against batching*.json in the results folder when there is one")
    sr = sub.add_parser("run", help="one sweep with a preset")
    sr.add_argument("--hardware", choices=sorted(HARDWARE), default="a100-80gb-pcie")
    sr.add_argument("--model", choices=sorted(MODELS), default="mixtral-8x7b")
    sr.add_argument("--variants", type=int, default=2)
    sr.add_argument("--rates", default=None, help="λ list; default 0.3,0.6,0.9 x ours' idle service rate")
    sr.add_argument("--systems", default=",".join(("batching",) + SCALE_SYSTEMS))
    sr.add_argument("--trace", default=None, help="JSON trace file instead of Poisson arrivals")
    sr.add_argument("-n", "--requests", type=int, default=400)
    for q in (sp, sv, sr):
        q.add_argument("--out", default=None, help=RESULTS_HELP)
        q.add_argument("--quiet", action="store_true")
    a = p.parse_args(argv)
    out_dir = results_dir(getattr(a, "out", None))
    if a.cmd == "paper":
        res = paper_scale(n=a.requests, progress=not a.quiet)
        for c in res["cases"]:
            print(scale_table(c) + "\n")
        res["files"] = {"json": str(out_dir / "simulate_paper.json"),
                        "png": plot_cases(res["cases"], out_dir / "simulate_paper.png")}
        _dump(res, out_dir / "simulate_paper.json")
        print(f"\nJSON: {res['files']['json']}\nplot: {res['files']['png'] or '(no matplotlib)'}")
    elif a.cmd == "validate":
        rates = [float(x) for x in a.rates.split(",")] if a.rates else None
        res = validate(small=not a.full, rates=rates, n=a.requests, reps=a.reps, threads=a.threads,
                       progress=not a.quiet)
        print(json.dumps(res["calibration"], indent=1))
        print(validation_table(res["rows"]))
        if a.archived:
            res["archived"] = validate_archived(a.archived)
            print(f"\narchived sweep {a.archived} (one idle service time per system as calibration):")
            print(validation_table(res["archived"]["rows"]))
        tag = "simulate_validation" + ("_full" if a.full else "_small")
        res["files"] = {"json": str(out_dir / f"{tag}.json"),
                        "png": plot_validation(res["rows"], out_dir / f"{tag}.png")}
        _dump(res, out_dir / f"{tag}.json")
        print(f"\nJSON: {res['files']['json']}\nplot: {res['files']['png'] or '(no matplotlib)'}")
    elif a.cmd == "validate-batching":
        res = validate_batching()
        if res is None:
            print("no batching*.json in the results folder yet: nothing to validate against")
            return 0
        print(batching_validation_table(res["rows"]))
        print(json.dumps(res["summary"], indent=1))
        res["files_written"] = {"json": str(out_dir / "simulate_validation_batching.json"),
                                "png": plot_batching_validation(res["rows"], out_dir / "simulate_validation_batching.png")}
        _dump(res, out_dir / "simulate_validation_batching.json")
        files = res["files_written"]
        print(f"\nJSON: {files['json']}\nplot: {files['png'] or '(no matplotlib)'}")
    else:
        hw, model = HARDWARE[a.hardware], MODELS[a.model]
        systems = [s.strip() for s in a.systems.split(",") if s.strip()]
        if a.trace:
            trace = load_trace(a.trace)
            rows = [dict(simulate_system(s, trace, hw, model, a.variants), rate=float("nan")) for s in systems]
        else:
            mu = idle_rate("ours", hw, model, a.variants)
            rates = [float(x) for x in a.rates.split(",")] if a.rates else [round(f * mu, 4) for f in (0.3, 0.6, 0.9)]
            rows = sweep(hw, model, a.variants, rates, systems=systems, n=a.requests, progress=not a.quiet)
        case = {"name": f"{hw.name}, {a.variants} x {model.name}", "rows": rows,
                "ours_vs_partitioned": ours_vs_partitioned(rows)}
        print(scale_table(case))
    return 0


if __name__ == "__main__":
    sys.exit(main())
