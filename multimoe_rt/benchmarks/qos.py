"""QoS benchmark: the paper's serving workload against every system in one run.

Poisson arrivals at rate λ (one fixed-seed trace per λ, replayed identically to every system), a uniformly
random variant per request (or a skewed mix), 20-token prompts cut from ../shared/data text of the variant's
domain (byte tokenizer), 25 output tokens (EOS ignored), batch 1. Per system and λ: TTFT mean/p50/p99,
turnaround mean/p99, completed requests/s, switches, bytes copied, device memory footprint; ours vs each
baseline as ratios. Table on stdout, JSON in the results folder, PNG plots when matplotlib is installed.

"ours" is the runtime's ``engine.Engine`` serving one sequence at a time (``max_seqs=1``) with two non-expert
sets on the device: the running request's, and the one the next request's variant is copied into while it
runs (``prefetch=1``: the paper's staging set and look-ahead). "ours+affinity" (``--affinity``) is the same
engine admitting variant by variant (``group_variants=True``). The baselines (``lab.qos.systems``) run
through the lab's lane driver (``lab.qos.lanes``), which gives them the engine's request API.

    multimoe-rt bench-qos --small
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import random
import statistics
import sys
import time

import torch

from . import RESULTS_HELP, results_dir

from multimoe_rt import plan as plan_mod
from multimoe_rt.checkpoint import VariantSet
from multimoe_rt.engine import Engine
from multimoe_rt.lab import data as data_mod
from multimoe_rt.lab.qos.lanes import LaneDriver
from multimoe_rt.lab.qos.metrics import summarize
from multimoe_rt.lab.qos.systems import build_system
from multimoe_rt.machine import machine_info
from multimoe_rt.plan import format_size
from multimoe_rt.plotting import NO_PLOT, pyplot
from multimoe_rt.tokenizer import ByteTokenizer

SYSTEMS = ("ours", "partitioned", "swap", "resident")
DOMAIN_OF = {"base": "wikitext2", "ptb": "ptb", "ptb-frozen": "ptb", "shakespeare": "shakespeare",
             "pycode": "pycode"}


# ---------------------------------------------------------------- workload

def prompt_pool(names, length: int, per_variant: int, seed: int) -> dict[str, list[list[int]]]:
    """``per_variant`` byte-token prompts of ``length`` for each variant, cut from its domain's test text."""
    tok, rng = ByteTokenizer(), random.Random(seed)
    pool = {}
    for name in names:
        domain = DOMAIN_OF.get(name, "wikitext2")
        ids = tok.encode(data_mod.read_split(domain, "test"))
        pool[name] = [ids[s:s + length] for s in (rng.randrange(0, len(ids) - length) for _ in range(per_variant))]
    return pool


def make_trace(names, rate: float, n: int, seed: int, mix: str = "uniform", prompt_len: int = 20,
               pool=None) -> list[tuple[float, str, list[int]]]:
    """``n`` requests: (arrival offset s, variant, prompt ids); exponential inter-arrivals of mean 1/rate.

    mix "uniform": each variant equally likely; "skewed": weights 1/(i+1) (Zipf-like, base most popular).
    """
    if rate <= 0:
        raise ValueError(f"arrival rate must be > 0, got {rate}")
    rng = random.Random(seed)
    weights = [1.0] * len(names) if mix == "uniform" else [1.0 / (i + 1) for i in range(len(names))]
    pool = pool or prompt_pool(names, prompt_len, max(4, n), seed)
    t, trace = 0.0, []
    for _ in range(n):
        t += rng.expovariate(rate)
        v = rng.choices(names, weights)[0]
        trace.append((t, v, rng.choice(pool[v])))
    return trace


def _wait(h) -> None:
    try:
        h.result()
    except Exception:  # noqa: BLE001 - a failed request is counted by summarize, from its handle
        pass


def replay(server, trace, max_new_tokens: int) -> tuple[list, float]:
    """Submit each request at its arrival offset from one client thread; wait for all; return their handles
    (``engine.RequestHandle`` or ``lanes.Request``) and the wall time."""
    handles = []
    t0 = time.perf_counter()
    for at, variant, ids in trace:
        delay = t0 + at - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        handles.append(server.submit(variant, list(ids), max_new_tokens=max_new_tokens, ignore_eos=True))
    for h in handles:
        _wait(h)
    return handles, time.perf_counter() - t0


def warm_up(server, names, pool, max_new_tokens: int, rounds: int = 2) -> list[float]:
    """Requests one at a time, cycling through the variants (switches included), so allocation and first-call
    costs stay out of the measurement; returns their service times (finish - admitted) in seconds."""
    times = []
    for _ in range(rounds):
        for v in names:
            h = server.submit(v, pool[v][0], max_new_tokens=max_new_tokens, ignore_eos=True).result()
            times.append(h.finish - h.admitted)
    return times


# ---------------------------------------------------------------- systems

class Ours:
    """The runtime engine as a system of the sweep: one engine for every λ (loading it is the slow part)."""

    def __init__(self, vs: VariantSet, plan, device, dtype, group_variants: bool = False, max_len: int = 64):
        self.engine = Engine.from_pretrained(vs, plan=plan, resident_sets=2, max_seqs=1, max_len=max_len,
                                             prefetch=1, group_variants=group_variants, device=device, dtype=dtype)

    def serving(self):
        return contextlib.nullcontext(self.engine)  # the engine outlives each run

    def stats(self) -> dict:
        s = self.engine.weights.stats
        return {"switches": s["loads"], "bytes_copied": s["bytes_copied"]}

    def memory_footprint(self) -> dict:
        return self.engine.memory_footprint()

    def close(self) -> None:
        self.engine.shutdown()


class Baseline:
    """A lab baseline as a system of the sweep: a fresh lane driver per run."""

    def __init__(self, system):
        self.system = system

    def serving(self):
        return LaneDriver(self.system)  # drains and stops its workers when the run ends

    def stats(self) -> dict:
        return self.system.stats()

    def memory_footprint(self) -> dict:
        return self.system.memory_footprint()

    def close(self) -> None:
        pass


def load_systems(dirs: dict, kinds, share: float, device="cpu", dtype=torch.float32, affinity: bool = False,
                 max_len: int = 64, progress=None):
    """``{label: system}``, the plan, and the budget: ours' slab and non-expert sets (its KV cache of one sequence
    aside, as the baselines' transformers caches are), which the partitioned baseline splits."""
    vs = VariantSet.from_dirs(list(dirs.values()), names=list(dirs))
    plan = plan_mod.make_plan(vs, share=share, dtype=dtype)
    log = progress or (lambda m: None)
    log("loading ours (the runtime engine, max_seqs=1)")
    ours = Ours(vs, plan, device, dtype, max_len=max_len)
    fp = ours.memory_footprint()
    budget = fp["slab_bytes"] + fp["non_expert_device_bytes"]
    systems = {}
    for kind in kinds:
        if kind == "ours":
            systems["ours"] = ours
            if affinity:
                log("loading ours+affinity")
                systems["ours+affinity"] = Ours(vs, plan, device, dtype, group_variants=True, max_len=max_len)
            continue
        log(f"loading {kind}")
        systems[kind] = Baseline(build_system(kind, vs, device=device, dtype=dtype, budget_bytes=budget))
    if "ours" not in systems:
        ours.close()
    return systems, plan, budget


# ---------------------------------------------------------------- the sweep

def run(dirs: dict, rates=None, n: int = 20, share: float = 0.5, systems=SYSTEMS, mix: str = "uniform",
        prompt_len: int = 20, max_new_tokens: int = 25, seed: int = 0, device="cpu", affinity: bool = False,
        rate_factors=(0.3, 0.7, 1.1), progress: bool = True, out_dir=None, tag: str = "qos", pool=None) -> dict:
    """Load the systems, sweep λ, write JSON/PNG; returns the result dict.

    ``pool``: ``{variant: [prompt ids]}`` to draw prompts from; default: ``prompt_pool`` (byte-tokenized text of
    each variant's domain, which fits only the zoo's byte vocabulary).

    ``rates`` default: ``rate_factors`` x the idle service rate of the fastest system (1 / its median warm
    single-request time), so the sweep reaches its saturation whatever the machine speed.
    """
    from tqdm.auto import tqdm

    names = list(dirs)
    log = (lambda m: tqdm.write(m)) if progress else (lambda m: None)
    pool = pool or prompt_pool(names, prompt_len, max(8, n), seed)
    longest = max(len(p) for prompts in pool.values() for p in prompts)
    t_load = time.perf_counter()
    loaded, plan, budget = load_systems(dirs, systems, share, device=device, affinity=affinity,
                                        max_len=longest + max_new_tokens, progress=log)
    log(f"loaded {len(loaded)} systems in {time.perf_counter() - t_load:.1f} s; device budget (ours' weights) "
        f"{format_size(budget)}")
    try:
        for s in loaded.values():  # first calls of every system before any timing (lazy init is shared)
            with s.serving() as server:
                warm_up(server, names, pool, max_new_tokens, rounds=1)
        service = {}
        for k, s in loaded.items():
            with s.serving() as server:
                service[k] = statistics.median(warm_up(server, names, pool, max_new_tokens))
        if rates is None:  # the best system's idle service rate: the sweep crosses its saturation point
            mu = 1.0 / min(service.values())
            rates = [round(f * mu, 2) for f in rate_factors]
        log("idle service time per request: " + ", ".join(f"{k} {1000 * t:.0f} ms" for k, t in service.items()))

        results = []
        bar = tqdm(total=len(rates) * len(loaded), desc="QoS sweep", unit="run", disable=not progress)
        for li, rate in enumerate(rates):
            trace = make_trace(names, rate, n, seed=seed * 1000 + li, mix=mix, pool=pool)
            for label, system in loaded.items():
                bar.set_postfix_str(f"λ={rate}/s {label}")
                before = system.stats()
                with system.serving() as server:
                    requests, wall = replay(server, trace, max_new_tokens)
                after = system.stats()
                m = summarize(requests)
                m.update(system=label, rate=rate, wall_s=wall,
                         switches=after["switches"] - before["switches"],
                         bytes_copied=after["bytes_copied"] - before["bytes_copied"],
                         memory=system.memory_footprint(), idle_service_s=service[label])
                if "expert_fetches" in after:
                    m["expert_fetches"] = after["expert_fetches"] - before.get("expert_fetches", 0)
                results.append(m)
                bar.update(1)
        bar.close()
    finally:
        for s in loaded.values():
            s.close()
    part = loaded.get("partitioned")
    out = {"machine": machine_info(), "variants": names, "share": share, "budget_bytes": budget, "mix": mix,
           "requests_per_rate": n, "prompt_len": prompt_len, "max_new_tokens": max_new_tokens, "seed": seed,
           "rates": rates, "device": str(device), "results": results, "ratios": ratios(results),
           "plan": {"device_slots": plan.num_device_slots, "separate_slots": len(names) * plan.num_layers
                    * plan.num_experts, "sharing_fraction": plan.sharing_fraction()},
           "partition_emulation": partition_note(part.system if part is not None else None)}
    out["files"] = write(out, out_dir, tag)
    return out


def partition_note(part) -> str | None:
    if part is None:
        return None
    fp = part.memory_footprint()
    compute = (f"each instance's worker thread runs with torch.set_num_threads({fp['threads_per_instance']}) "
               f"(= max(1, {part.total_threads} // {part.lanes})) and the {part.lanes} instances run concurrently"
               if fp["threads_per_instance"] is not None else
               "each instance computes on its own CUDA stream (time-sliced, no SM partitioning)")
    return (f"{part.lanes} independent instances, one per variant, each with its own queue and worker thread. "
            f"Memory: budget {format_size(part.budget_bytes)} / {part.lanes} = {format_size(part.instance_budget)} "
            f"per instance: its non-expert weights plus an LRU device cache of {fp['cache_slots_per_instance'][0]} "
            f"expert slots; {fp['offloaded_experts_per_instance'][0]} of its experts live in host memory and are "
            f"copied in when routed to. Compute: {compute}.")


def ratios(results) -> list[dict]:
    """ours / baseline for each λ: turnaround and TTFT ratios (< 1: ours is faster) and the reduction."""
    by = {(r["system"], r["rate"]): r for r in results}
    out = []
    for (system, rate), r in by.items():
        ours = by.get(("ours", rate))
        if system == "ours" or ours is None:
            continue
        tat = ours["turnaround_mean"] / r["turnaround_mean"] if r["turnaround_mean"] else float("nan")
        out.append({"rate": rate, "baseline": system, "turnaround_ratio": tat,
                    "turnaround_reduction": 1.0 - tat,
                    "ttft_ratio": ours["ttft_mean"] / r["ttft_mean"] if r["ttft_mean"] else float("nan"),
                    "throughput_ratio": ours["throughput_rps"] / r["throughput_rps"]
                    if r["throughput_rps"] else float("nan")})
    return out


# ---------------------------------------------------------------- output

def table(out: dict) -> str:
    head = (f"{'λ/s':>6} {'system':<14} {'done':>5} {'TTFT mean':>9} {'p50':>7} {'p99':>7} {'turn mean':>9} "
            f"{'p99':>7} {'req/s':>6} {'switch':>6} {'copied':>9} {'memory':>9}")
    lines = [head, "-" * len(head)]
    for r in out["results"]:
        ms = lambda x: f"{1000 * x:.0f}ms" if not math.isnan(x) else "-"  # noqa: E731
        lines.append(f"{r['rate']:>6} {r['system']:<14} {r['completed']:>2}/{r['requests']:<2} {ms(r['ttft_mean']):>9} "
                     f"{ms(r['ttft_p50']):>7} {ms(r['ttft_p99']):>7} {ms(r['turnaround_mean']):>9} "
                     f"{ms(r['turnaround_p99']):>7} {r['throughput_rps']:>6.2f} {r['switches']:>6} "
                     f"{format_size(r['bytes_copied']):>9} {format_size(r['memory']['total_device_bytes']):>9}")
    lines.append("")
    lines.append("ours vs baseline: mean turnaround ratio (< 1 = ours faster), and ours' turnaround change:")
    for rate in out["rates"]:
        cells = [f"{x['baseline']} {x['turnaround_ratio']:.2f} ({-100 * x['turnaround_reduction']:+.0f}%)"
                 for x in out["ratios"] if x["rate"] == rate]
        lines.append(f"  λ={rate}/s: " + ", ".join(cells))
    return "\n".join(lines)


def write(out: dict, out_dir, tag: str) -> dict:
    out_dir = results_dir(out_dir)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    files = {"json": str(out_dir / f"{tag}-{stamp}.json")}
    plt = pyplot()
    if plt is None:
        files["plots"] = NO_PLOT
    else:
        for key, what in (("turnaround_mean", "mean turnaround"), ("ttft_mean", "mean TTFT")):
            fig, ax = plt.subplots(figsize=(5.5, 3.8))
            for system in dict.fromkeys(r["system"] for r in out["results"]):
                pts = [(r["rate"], r[key]) for r in out["results"] if r["system"] == system]
                ax.plot([p[0] for p in pts], [1000 * p[1] for p in pts], marker="o", label=system)
            ax.set_xlabel("arrival rate λ (requests/s)")
            ax.set_ylabel(f"{what} (ms)")
            ax.set_yscale("log")
            ax.set_title(f"{what} vs λ, {len(out['variants'])} variants, batch 1")
            ax.legend()
            ax.grid(alpha=0.3)
            fig.tight_layout()
            path = out_dir / f"{tag}-{stamp}-{key.split('_')[0]}.png"
            fig.savefig(path, dpi=120)
            plt.close(fig)
            files[key.split("_")[0] + "_png"] = str(path)
    with open(files["json"], "w") as f:
        json.dump(dict(out, files=files), f, indent=2, default=str)
    return files


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--small", action="store_true", help="the small zoo (quick)")
    p.add_argument("--recipe", default="mixtral-tiny", choices=["mixtral-tiny", "qwen3-moe-tiny"],
                   help="zoo recipe (a decoder family)")
    p.add_argument("--variants", default="base,ptb,shakespeare,pycode", help="zoo variants to serve")
    p.add_argument("--rates", default=None, help="comma-separated λ values (req/s); default: 0.3,0.7,1.1 x "
                                                 "the fastest system's idle service rate")
    p.add_argument("-n", "--requests", type=int, default=20, help="requests per λ")
    p.add_argument("--share", type=float, default=0.5, help="expert sharing of ours' plan (its footprint is "
                                                             "the budget partitioned splits)")
    p.add_argument("--systems", default=",".join(SYSTEMS))
    p.add_argument("--mix", choices=["uniform", "skewed"], default="uniform")
    p.add_argument("--affinity", action="store_true", help="also run ours with the variant-affinity policy")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help=RESULTS_HELP)
    p.add_argument("--quiet", action="store_true")


def main_args(args, tag="qos") -> dict:
    from multimoe_rt.lab import zoo

    dirs = zoo.build(getattr(args, "recipe", "mixtral-tiny"), small=args.small, progress=not args.quiet)
    want = [v.strip() for v in args.variants.split(",") if v.strip()]
    missing = [v for v in want if v not in dirs]
    if missing:
        raise SystemExit(f"variants {missing} are not in the zoo (has {list(dirs)})")
    rates = [float(x) for x in args.rates.split(",")] if args.rates else None
    device = "cuda" if torch.cuda.is_available() else "cpu"
    out = run({v: dirs[v] for v in want}, rates=rates, n=args.requests, share=args.share,
              systems=[s.strip() for s in args.systems.split(",")], mix=args.mix, seed=args.seed, device=device,
              affinity=args.affinity, progress=not args.quiet, out_dir=args.out, tag=tag)
    print(table(out))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(p)
    out = main_args(p.parse_args(argv))
    print(f"\nJSON: {out['files']['json']}")
    for k, v in out["files"].items():
        if k != "json":
            print(f"{k}: {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
