"""The simulator against measurement on the tiny zoo: calibration from idle service times, a measured sweep, and the continuous-batching bench's results."""

from __future__ import annotations

import json
import math
import statistics
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from ..plotting import pyplot
from ..scheduler import Scheduler
from . import results_dir
from .sim_model import GB, MODELS, Calibrated, Hardware, Req, Roofline, serve_qos_trace
from .sim_systems import _summary, simulate_lanes, simulate_runtime_batch1, simulate_scheduler, simulate_serial

def fmt_ms(x: float) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{1000 * x:.1f}ms" if x < 10 else f"{x:.1f}s"


# ================================================================ calibration + validation (CPU, tiny zoo)

def calibrate(loaded: dict, names, pool, out_tokens: int = 25, reps: int = 8) -> dict:
    """Idle service times of each system on the real engines -> ``Calibrated`` parameters per system.

    ``loaded``: ``benchmarks.qos.load_systems``'s systems ("ours" is the runtime ``engine.Engine`` with
    ``max_seqs=1``). Every time is counted from the request's arrival, so a set load the runtime engine waits
    for before admitting a request is inside it. Same-variant requests one at a time (prefill = arrival -> first
    token, decode per token); variant-cycling requests one at a time (a blocking switch: nothing waits, so
    nothing is prefetched); for ours, variant-cycling requests queued back to back (the look-ahead copy overlaps
    the running request: the gap between two finishes); for partitioned, k requests on k lanes at once (lane
    slow-down). Prompts vary (as in a sweep: the partitioned instances' expert caches miss), and the systems are
    measured round-robin, one request each per round, so a load spike from elsewhere spreads over all of them.
    """
    med = statistics.median
    labels = [x for x in loaded if x != "ours+affinity"]
    same = {x: [] for x in labels}
    cyc = {x: [] for x in labels}
    b2b, conc = [], {k: [] for k in range(2, len(names) + 1)}

    def one(server, v, i):
        return server.submit(v, pool[v][i % len(pool[v])], max_new_tokens=out_tokens, ignore_eos=True)

    for i in range(reps + 1):
        for x in labels:
            with loaded[x].serving() as server:
                one(server, names[0], i).result()                 # make names[0] resident / active
                r = one(server, names[0], i + 1).result()         # same variant: no switch
                if i:
                    same[x].append((r.first_token - r.arrival, r.finish - r.arrival))
                if x in ("ours", "swap"):
                    r = one(server, names[1 + i % (len(names) - 1)], i).result()   # blocking switch
                    cyc[x].append(r.finish - r.arrival)
                if x == "partitioned":
                    for k in conc:
                        hs = [one(server, v, i) for v in names[:k]]
                        conc[k].extend(h.result().finish - h.arrival for h in hs)
                if x == "ours":   # queued back to back: each one's set is copied while the one before runs
                    hs = [one(server, names[j % len(names)], i + j) for j in range(len(names) + 1)]
                    fin = [h.result().finish for h in hs]
                    b2b.extend(b - a for a, b in zip(fin, fin[1:]))
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
    """One system on one trace with its measured costs. Ours runs through the runtime's own ``Scheduler``
    (``max_seqs=1``, look-ahead, grouped admission for ours+affinity); the baselines keep their queue models."""
    base = "ours" if label == "ours+affinity" else label
    cost = Calibrated(**cal[base])
    if label == "partitioned":
        return simulate_lanes(trace, lambda lane: cost, lanes)
    if base == "ours":
        return simulate_runtime_batch1(trace, cost, group_variants=label == "ours+affinity")
    return simulate_serial(trace, cost, switching=label != "resident", prefetch=False)


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

    from multimoe_rt.lab.qos.metrics import summarize

    from . import qos

    names = list(dirs)
    systems = systems or ["ours", "partitioned", "swap", "resident"]
    loaded, _, _ = qos.load_systems(dirs, systems, 0.5, affinity="ours" in systems, max_len=20 + out_tokens)
    try:
        pool = qos.prompt_pool(names, 20, max(8, n), seed) if set(names) <= set(qos.DOMAIN_OF) else \
            {v: [[(7 * i + j) % 50 + 3 for j in range(20)] for i in range(max(8, n))] for v in names}
        for s in loaded.values():
            with s.serving() as server:
                qos.warm_up(server, names, pool, out_tokens, rounds=1)
        t0 = time.perf_counter()
        cal = calibrate(loaded, names, pool, out_tokens=out_tokens, reps=reps)
        calib_s = time.perf_counter() - t0
        mu = 1.0 / min(Calibrated(**c).service(Req(0, 0, 20, out_tokens))[1] for c in cal.values())
        rates = rates or [round(f * mu, 2) for f in (0.3, 0.6, 0.9)]
        rows = []
        bar = tqdm(total=len(rates) * len(loaded), desc="validation sweep", disable=not progress)
        for li, rate in enumerate(rates):
            trace = qos.make_trace(names, rate, n, seed=seed * 1000 + li, pool=pool)
            sim_trace = [Req(at, names.index(v), len(ids), out_tokens) for at, v, ids in trace]
            for label, system in loaded.items():
                with system.serving() as server:
                    reqs, _ = qos.replay(server, trace, out_tokens)
                meas = summarize(reqs)
                sim = simulate_calibrated(label, sim_trace, cal, len(names))
                rows.append(_compare(label, rate, meas, sim))
                bar.update(1)
        bar.close()
    finally:
        for s in loaded.values():
            s.close()
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
    """multimoe_rt.engine.Engine as batching.py runs it (every variant's set resident), on a simulated clock: the
    runtime's own ``Scheduler`` (``group`` = ``group_variants``) plans each step. ``step_time(tokens, variants)``
    gives a step's seconds. ``stats`` (optional) collects steps, tokens and sum(variants - 1) for calibration."""
    variants = sorted({r.variant for r in trace})
    return simulate_scheduler(trace, Scheduler(step_tokens, max_seqs, group_variants=group),
                              lambda w: step_time(w.tokens, len(w.groups)), num_sets=max(1, len(variants)),
                              copy_time=0.0, preloaded=variants, stats=stats)


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


def validation_table(rows, lead=(("λ/s", "rate", 7), ("system", "system", -14))) -> str:
    """Measured against simulated turnaround (mean, p99) per row; ``lead``: the columns that name a row, as
    (header, key, width), a negative width left-aligned."""
    def cell(text, width):
        return f"{text:<{-width}}" if width < 0 else f"{text:>{width}}"

    head = " ".join(cell(h, w) for h, _, w in lead) + (f" {'meas mean':>10} {'sim mean':>10} {'err':>6} "
                                                       f"{'meas p99':>10} {'sim p99':>10} {'err':>6}")
    lines = [head, "-" * len(head)]
    for r in rows:
        m, s = r["measured"], r["simulated"]
        lines.append(" ".join(cell(r[k], w) for _, k, w in lead) +
                     f" {fmt_ms(m['turnaround_mean']):>10} {fmt_ms(s['turnaround_mean']):>10} {100 * r['err_mean']:>+5.0f}%"
                     f" {fmt_ms(m['turnaround_p99']):>10} {fmt_ms(s['turnaround_p99']):>10} {100 * r['err_p99']:>+5.0f}%")
    return "\n".join(lines)


def batching_validation_table(rows) -> str:
    return validation_table(rows, (("file", "file", -15), ("shape", "shape", -6), ("λ/s", "rate", 7),
                                   ("system", "system", -12)))


def plot_measured_vs_simulated(ax, rows) -> None:
    """Mean turnaround against λ per system: measured (solid) and simulated (dashed, same colour), log scale."""
    for system in dict.fromkeys(r["system"] for r in rows):
        pts = [r for r in rows if r["system"] == system]
        line, = ax.plot([r["rate"] for r in pts], [1e3 * r["measured"]["turnaround_mean"] for r in pts],
                        marker="o", label=f"{system} measured")
        ax.plot([r["rate"] for r in pts], [1e3 * r["simulated"]["turnaround_mean"] for r in pts], marker="x",
                ls="--", color=line.get_color(), label=f"{system} simulated")
    ax.set_yscale("log")
    ax.set_xlabel("λ (requests/s)")
    ax.set_ylabel("mean turnaround (ms)")


def plot_batching_validation(rows, path) -> str | None:
    plt = pyplot()
    if plt is None:
        return None
    panels = list(dict.fromkeys((r["file"], r["shape"]) for r in rows))
    if not panels:
        return None
    cols = 2
    fig, axes = plt.subplots((len(panels) + cols - 1) // cols, cols, figsize=(10, 3.2 * ((len(panels) + 1) // cols)),
                             squeeze=False)
    for ax, (f, sh) in zip(axes.flat, panels):
        plot_measured_vs_simulated(ax, [r for r in rows if r["file"] == f and r["shape"] == sh])
        ax.set_title(f"{f} / {sh}", fontsize=9)
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
