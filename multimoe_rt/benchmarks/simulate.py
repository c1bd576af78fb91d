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

Systems (the serving systems of ``benchmarks/qos.py`` plus continuous batching). Ours and batching are the
runtime's own ``scheduler.Scheduler`` on a simulated clock (``sim_systems.simulate_scheduler``), so what is
validated is the policy that serves; the baselines keep their own queue models:

    ours            batch 1 (``Engine`` with max_seqs=1, prefetch=1): FCFS, consolidated slab, 2 non-expert sets,
                    the next request's set copied while the current one runs (partial reconfiguration)
    ours+affinity   the same admitting variant by variant (group_variants)
    partitioned     MIG-like: N instances, each with 1/N of memory, bandwidth, peak and link
    swap            one model slot, a whole variant copied in per switch (blocking)
    resident        every variant's full model resident (experts that do not fit are fetched on demand)
    batching        continuous batching: one step per iteration over all running sequences (mixed variants),
                    R resident non-expert sets (LRU), a miss copies that set over the link while others run

    multimoe-rt simulate paper          # paper-scale tables + plots (A100, H200, 8 variants batching)
    multimoe-rt simulate validate       # calibration + measured sweep on the small tiny zoo + simulation
    multimoe-rt simulate validate-batching   # against batching*.json in the results folder when there is one
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from pathlib import Path

from ..plotting import pyplot
from . import RESULTS_HELP, results_dir
from .sim_model import HARDWARE, MODELS, load_trace
from .sim_systems import SCALE_SYSTEMS, idle_rate, ours_vs_partitioned, paper_scale, simulate_system, sweep
from .sim_validate import (batching_validation_table, fmt_ms, plot_batching_validation, validate, validate_archived,
                           plot_measured_vs_simulated, validate_batching, validation_table)


# ================================================================ output

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
    plt = pyplot()
    if plt is None:
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
    plt = pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    plot_measured_vs_simulated(ax, rows)
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
    presets = "\n".join(f"  {k:<20} {m.name}: {m.moe_layers} MoE layers x {m.experts} experts (top-{m.topk}), "
                         f"{m.full_bytes / 1e9:.1f} GB, KV {m.kv_bytes_per_token / 1e3:.1f} kB/token"
                         for k, m in MODELS.items())
    p = argparse.ArgumentParser(prog="simulate", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=f"model presets (run --model):\n{presets}\nhardware presets (run --hardware): "
                                       + ", ".join(HARDWARE))
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
