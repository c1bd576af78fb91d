"""The simulated serving systems: one event loop per system (batch 1, partitioned lanes, swap, resident, continuous batching) and the paper-scale sweeps."""

from __future__ import annotations

import bisect
import math
from dataclasses import asdict, replace

import numpy as np

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
