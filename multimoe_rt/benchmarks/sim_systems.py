"""The simulated serving systems and the paper-scale sweeps: the runtime's ``Scheduler`` on a simulated clock (ours
at batch 1, continuous batching), and the baselines' own queue models (partitioned lanes, swap, resident)."""

from __future__ import annotations

import bisect
import math
from dataclasses import asdict, dataclass, replace

import numpy as np

from ..scheduler import Scheduler, SchedulerState, SeqInfo, WeightSets
from .sim_model import HARDWARE, Hardware, MODELS, ModelSpec, Req, Roofline, poisson_trace

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
    """One batch-1 server with one active variant (the swap and resident baselines; ``simulate_runtime_batch1``
    is ours).

    Policy: fcfs, or affinity (oldest request of the variant just served, unless the oldest waited more than
    ``max_wait``; the retired batch-1 engine's policy, kept for what-if runs). Look-ahead prefetch: while a
    request runs, as soon as the queue holds a request, the variant the policy would pick next starts copying;
    its residual wait is paid at its start.
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


@dataclass(frozen=True)
class StepWork:
    """What one planned step computes, for a cost model: ``groups`` = variant -> tokens, ``contexts`` = the
    positions each fed sequence attends over, ``prompt_tokens`` = how many of the tokens are prompt."""
    groups: dict
    contexts: list
    prompt_tokens: int

    @property
    def tokens(self) -> int:
        return sum(self.groups.values())


def simulate_scheduler(trace: list[Req], scheduler: Scheduler, step_time, *, num_sets: int, copy_time: float,
                       preloaded=(), stats: dict | None = None) -> dict:
    """The runtime's ``Scheduler`` on a simulated clock: each iteration lands the set copies that are done, asks
    the scheduler for a plan from the same kind of state the engine builds, starts the planned copies (one at a
    time on the host link, ``copy_time`` seconds each, overlapped with steps), then advances by
    ``step_time(StepWork)``. The step that ends a prompt gives the first token; a request ends at ``out`` tokens.
    ``preloaded``: variants resident at t = 0 (at most ``num_sets``). ``stats`` (optional) collects steps,
    tokens and sum(variants - 1) over steps."""
    reqs = [replace(r) for r in sorted(trace, key=lambda r: r.arrival)]
    info: dict[int, SeqInfo] = {}
    waiting: list[int] = []
    running: list[int] = []
    resident: dict[int, int] = {v: k for k, v in enumerate(list(dict.fromkeys(preloaded))[:num_sets])}
    free = list(range(len(resident), num_sets))
    loading: dict[int, tuple[int, float]] = {}   # variant -> (set, when its copy lands)
    draining: dict[int, int] = {}
    st = stats if stats is not None else {}
    st.update(steps=0, tokens=0, extra_variants=0)
    t, i, link_free, copies = 0.0, 0, 0.0, 0
    while i < len(reqs) or waiting or running:
        while i < len(reqs) and reqs[i].arrival <= t:
            info[i] = SeqInfo(i, reqs[i].variant, reqs[i].prompt)
            waiting.append(i)
            i += 1
        for v, (k, at) in sorted(loading.items(), key=lambda x: x[1][1]):
            if at <= t:
                resident[v] = k
                del loading[v]
        if not waiting and not running:
            t = reqs[i].arrival
            continue
        plan = scheduler.plan(SchedulerState(tuple(info[j] for j in waiting), tuple(info[j] for j in running),
                                             WeightSets(num_sets, dict(resident), frozenset(loading)),
                                             (scheduler.max_seqs or len(reqs)) - len(running), draining))
        for j in plan.admit:
            waiting.remove(j)
            running.append(j)
            reqs[j].start = t
            resident[reqs[j].variant] = resident.pop(reqs[j].variant)   # used: most recent
        for ld in plan.loads:
            k = free.pop() if ld.evict is None else resident.pop(ld.evict)
            link_free = max(t, link_free) + copy_time
            loading[ld.variant] = (k, link_free)
            copies += 1
        draining = plan.draining
        if not plan.runs:   # every request waits for a copy: jump to the next landing or arrival
            nxt = min([at for _, at in loading.values()] + ([reqs[i].arrival] if i < len(reqs) else []), default=None)
            if nxt is None:
                raise RuntimeError("scheduler simulation stuck: nothing runs, loads or arrives")
            t = max(t, nxt)
            continue
        groups: dict[int, int] = {}
        for c in plan.chunks:
            groups[info[c.seq].variant] = groups.get(info[c.seq].variant, 0) + c.length
        work = StepWork(groups, [c.start + c.length for c in plan.chunks],
                        sum(c.length for c in plan.chunks if info[c.seq].prefilling))
        t += step_time(work)
        st["steps"] += 1
        st["tokens"] += work.tokens
        st["extra_variants"] += len(groups) - 1
        for c in plan.chunks:
            s = info[c.seq]
            info[c.seq] = s = replace(s, cached=s.cached + c.length, generated=s.generated + c.logits)
            if c.logits and s.generated == 1:
                reqs[c.seq].first = t
            if s.generated >= reqs[c.seq].out:
                reqs[c.seq].finish = t
                running.remove(c.seq)
    out = _summary(reqs)
    out["switches"] = copies
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
    """Continuous batching as the runtime engine schedules it (``scheduler.Scheduler``: FCFS admission within
    ``max_batch`` sequences, decodes then prompt chunks within ``token_budget`` tokens a step, mixed variants),
    with ``resident_sets`` non-expert sets: a miss copies that variant's set over the link into a free or idle
    set (serial on the link, overlapped with steps), and the LRU set drains when every set is busy."""
    return simulate_scheduler(trace, Scheduler(token_budget, max_batch), lambda w: cost.step(w.groups, w.contexts),
                              num_sets=resident_sets, copy_time=cost.copy_time(cost.m.non_expert_bytes))


def simulate_runtime_batch1(trace: list[Req], cost, *, resident_sets: int = 2, group_variants: bool = False) -> dict:
    """The batch-1 system as the runtime serves it (``engine.Engine`` with ``max_seqs=1, prefetch=1``, and
    ``group_variants`` for ours+affinity): one request at a time, ``resident_sets`` sets (active + staging);
    while a request runs, the next waiting one's variant is copied into the idle set, so a request waits only
    for what is left of its copy. The first request's variant is resident at the start. ``cost``: a
    ``Roofline`` or a ``Calibrated`` (measured prefill and per-token decode times)."""
    if isinstance(cost, Roofline):
        step = lambda w: cost.step(w.groups, w.contexts)  # noqa: E731
    else:
        step = lambda w: cost.prefill_s if w.prompt_tokens else cost.decode_s  # noqa: E731
    first = min(trace, key=lambda r: r.arrival).variant if trace else 0
    sched = Scheduler(1 << 30, max_seqs=1, group_variants=group_variants, prefetch=1)
    return simulate_scheduler(trace, sched, step, num_sets=resident_sets, copy_time=cost.switch_blocking(),
                              preloaded=[first])


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
    elif system in ("ours", "ours+affinity"):
        cost = Roofline(hw, model, system, variants)
        out = simulate_runtime_batch1(trace, cost, group_variants=system == "ours+affinity")
    else:
        cost = Roofline(hw, model, system, variants)
        out = simulate_serial(trace, cost, switching=system != "resident", prefetch=False)
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
