"""Continuous batching benchmark: mixed-variant batches against every other way of serving the variants.

Systems, all in one run, on the same arrival traces:

* ``mixed``       : the continuous-batching engine (``multimoe_rt.engine``), every variant in one batch.
* ``one_variant`` : the same engine fed one variant only (what mixing costs).
* ``grouped``     : the mixed engine admitting variant by variant (``group_variants``): loaded steps hold
                    fewer variants, so they read fewer distinct experts.
* ``per_variant`` : the same engine batching one variant at a time, one resident non-expert set,
                    switching (partial reconfiguration) between batches.
* ``batch1``      : the same engine serving one sequence at a time (``max_seqs=1``) with two non-expert sets,
                    the next variant's set loaded while the current request runs (``prefetch=1``): the paper's
                    batch-1 system.
* ``transformers``: the external peer, every variant's full transformers model resident; requests grouped by
                    variant and run through batched ``generate`` (left padding), one group at a time.
* ``transformers_cb`` (``--with-cb``): transformers' own continuous batching (``generate_batch``), saturated
                    throughput only: its start-up (tens of seconds per model on CPU) rules out a Poisson sweep.

Saturated throughput = generated tokens / wall time with every request queued at t=0. Poisson sweep: TTFT and
turnaround mean/p99 per λ, λ rising to the mixed engine's saturation. Device bytes per system beside them.

    multimoe-rt bench-batch --small   (< 3 min)
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import threading
import time

import torch

from . import RESULTS_HELP, results_dir

from multimoe_rt.checkpoint import VariantSet
from multimoe_rt.engine import Engine
from multimoe_rt.lab.qos.metrics import percentile
from multimoe_rt.machine import machine_info
from multimoe_rt.plotting import NO_PLOT, pyplot

SHAPES = {"paper": (20, 25), "long": (96, 64)}   # (prompt tokens, new tokens)


class Timing:
    """Timestamps of one request, whichever system served it (perf_counter seconds)."""

    def __init__(self, arrival):
        self.arrival, self.first_token, self.finish, self.tokens = arrival, None, None, 0


# ---------------------------------------------------------------- workload

def make_trace(names, rate: float | None, n: int, prompt_len: int, vocab: int, seed: int):
    """``n`` requests ``(offset s, variant, prompt)``; offsets 0 when ``rate`` is None (saturation)."""
    rng = random.Random(seed)
    t, out = 0.0, []
    for _ in range(n):
        if rate is not None:
            t += rng.expovariate(rate)
        out.append((t, rng.choice(names), [rng.randrange(3, vocab) for _ in range(prompt_len)]))
    return out


# ---------------------------------------------------------------- systems: each replays a trace

def run_engine(engine: Engine, trace, new_tokens: int) -> list[Timing]:
    out, handles = [], []
    t0 = time.perf_counter()
    for at, v, p in trace:
        delay = t0 + at - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        handles.append(engine.submit(v, p, max_new_tokens=new_tokens, ignore_eos=True))
    for h in handles:
        h.result()
        t = Timing(h.arrival)
        t.first_token, t.finish, t.tokens = h.first_token, h.finish, len(h.tokens)
        out.append(t)
    return out


class _FirstStep:
    """A logits processor that notes when the first token's logits exist (TTFT of a batched generate)."""

    def __init__(self):
        self.at = None

    def __call__(self, input_ids, scores):
        if self.at is None:
            self.at = time.perf_counter()
        return scores


def run_transformers(models: dict, trace, new_tokens: int, max_batch: int) -> list[Timing]:
    """Batched ``generate`` per variant: the worker takes the oldest waiting request's variant and every waiting
    request of that variant (up to ``max_batch``), left-padded into one batch."""
    from transformers import LogitsProcessorList

    waiting, cond = [], threading.Condition()
    timings = [None] * len(trace)
    done = threading.Event()

    def worker():
        served = 0
        while served < len(trace):
            with cond:
                while not waiting:
                    cond.wait()
                v = waiting[0][1]
                group = [w for w in waiting if w[1] == v][:max_batch]
                for w in group:
                    waiting.remove(w)
            i_list = [w[0] for w in group]
            prompts = [trace[i][2] for i in i_list]
            width = max(map(len, prompts))
            ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
            first = _FirstStep()
            with torch.inference_mode():
                out = models[v].generate(ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                         do_sample=False, pad_token_id=0, logits_processor=LogitsProcessorList([first]))
            end = time.perf_counter()
            for i in i_list:
                timings[i].first_token, timings[i].finish = first.at, end
                timings[i].tokens = out.shape[1] - width
            served += len(group)
        done.set()

    th = threading.Thread(target=worker, daemon=True)
    th.start()
    t0 = time.perf_counter()
    for i, (at, v, p) in enumerate(trace):
        delay = t0 + at - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        with cond:
            timings[i] = Timing(time.perf_counter())
            waiting.append((i, v))
            cond.notify()
    done.wait()
    th.join()
    return timings


def transformers_cb_throughput(models: dict, trace, new_tokens: int) -> dict:
    """transformers' continuous batching, one ``generate_batch`` per variant (its models are separate)."""
    from transformers import GenerationConfig

    cfg = GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, eos_token_id=-1,
                           pad_token_id=0)
    tokens, t0 = 0, time.perf_counter()
    for v, model in models.items():
        prompts = [p for _, u, p in trace if u == v]
        if prompts:
            out = model.generate_batch(prompts, generation_config=cfg, progress_bar=False)
            tokens += sum(len(o.generated_tokens) for o in out.values())
    wall = time.perf_counter() - t0
    return {"tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall}


def summarize(timings: list[Timing], wall: float) -> dict:
    ttft = [t.first_token - t.arrival for t in timings]
    tat = [t.finish - t.arrival for t in timings]
    tokens = sum(t.tokens for t in timings)
    return {"requests": len(timings), "tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall,
            "ttft_mean": statistics.fmean(ttft), "ttft_p99": percentile(ttft, 99),
            "turnaround_mean": statistics.fmean(tat), "turnaround_p99": percentile(tat, 99)}


# ---------------------------------------------------------------- the run

def load(dirs: dict, max_seqs: int, max_len: int, share: float, progress):
    """The engines, the transformers models, and their device bytes: weights, plus a KV cache of the same capacity
    (``max_seqs`` x ``max_len``) for every batching system (the batch-1 engine holds one sequence)."""
    from transformers import MixtralForCausalLM

    vs = VariantSet.from_dirs(list(dirs.values()), names=list(dirs))
    progress(f"loading the mixed engine (expert sharing {share})")
    mixed = Engine.from_pretrained(vs, share=share, max_seqs=max_seqs, max_len=max_len)
    progress("loading the mixed engine with grouped admission")
    grouped = Engine.from_pretrained(vs, share=share, max_seqs=max_seqs, max_len=max_len, group_variants=True)
    progress("loading the per-variant engine (one resident non-expert set)")
    per_variant = Engine.from_pretrained(vs, share=share, resident_sets=1, mix_variants=False, max_seqs=max_seqs,
                                         max_len=max_len)
    progress("loading the batch-1 engine (max_seqs=1)")
    batch1 = Engine.from_pretrained(vs, share=share, resident_sets=2, max_seqs=1, max_len=max_len, prefetch=1)
    progress("loading every variant's transformers model")
    models = {n: MixtralForCausalLM.from_pretrained(p).eval() for n, p in dirs.items()}
    kv = mixed.memory_footprint()["kv_cache_bytes"]
    hf_weights = sum(sum(t.numel() * t.element_size() for t in m.parameters()) for m in models.values())
    mem = {"mixed": mixed.memory_footprint()["total_device_bytes"],
           "one_variant": mixed.memory_footprint()["total_device_bytes"],
           "grouped": grouped.memory_footprint()["total_device_bytes"],
           "per_variant": per_variant.memory_footprint()["total_device_bytes"],
           "batch1": batch1.memory_footprint()["total_device_bytes"],
           "transformers": hf_weights + kv,
           "kv_cache": kv}
    engines = {"mixed": mixed, "one_variant": mixed, "grouped": grouped, "per_variant": per_variant, "batch1": batch1}
    return engines, models, mem


def run(dirs: dict, shapes=("paper", "long"), n_sat: int = 64, n_sweep: int = 48, rate_factors=(0.2, 0.5, 0.8),
        max_seqs: int = 64, share: float = 0.0, seed: int = 0, with_cb: bool = False, progress: bool = True, tag: str = "batching",
        out_dir=None) -> dict:
    from tqdm.auto import tqdm

    names = list(dirs)
    log = (lambda m: tqdm.write(m)) if progress else (lambda m: None)
    max_len = max(p + n for p, n in (SHAPES[s] for s in shapes)) + 8
    engines, models, mem = load(dirs, max_seqs, max_len, share, log)
    vocab = engines["mixed"].vocab_size

    def replay(system: str, trace, new_tokens: int) -> dict:
        t0 = time.perf_counter()
        if system in engines:
            timings = run_engine(engines[system], trace, new_tokens)
        else:
            timings = run_transformers(models, trace, new_tokens, max_seqs)
        return summarize(timings, time.perf_counter() - t0)

    systems = ("mixed", "one_variant", "grouped", "per_variant", "batch1", "transformers")
    out = {"machine": machine_info(), "torch_threads": torch.get_num_threads(), "variants": names,
           "max_seqs": max_seqs, "share": share, "device_bytes": mem, "shapes": {}, "ratios": {}}
    steps = len(shapes) * len(systems) * (1 + len(rate_factors))
    bar = tqdm(total=steps, desc="batching bench", unit="run", disable=not progress)
    for shape in shapes:
        prompt_len, new_tokens = SHAPES[shape]
        warm = make_trace(names, None, 2 * len(names), prompt_len, vocab, seed + 99)
        for system in systems:  # first calls (allocation, thread pools) stay out of the timings
            replay(system, [(0.0, names[0], p) for _, _, p in warm] if system == "one_variant" else warm, 2)
        sat = {}
        trace = make_trace(names, None, n_sat, prompt_len, vocab, seed)
        for system in systems:
            bar.set_postfix_str(f"{shape} saturated {system}")
            t = [(a, names[0], p) for a, _, p in trace] if system == "one_variant" else trace
            sat[system] = replay(system, t, new_tokens)
            bar.update(1)
        if with_cb:
            bar.set_postfix_str(f"{shape} saturated transformers_cb")
            sat["transformers_cb"] = transformers_cb_throughput(models, trace, new_tokens)
        sweep = []
        mixed_rps = n_sat / sat["mixed"]["wall_s"]
        for li, f in enumerate(rate_factors):
            rate = round(f * mixed_rps, 2)
            trace = make_trace(names, rate, n_sweep, prompt_len, vocab, seed + 1 + li)
            for system in systems:
                bar.set_postfix_str(f"{shape} λ={rate} {system}")
                t = [(a, names[0], p) for a, _, p in trace] if system == "one_variant" else trace
                sweep.append(dict(replay(system, t, new_tokens), system=system, rate=rate))
                bar.update(1)
        out["shapes"][shape] = {"prompt_len": prompt_len, "new_tokens": new_tokens, "saturated": sat, "sweep": sweep}
    bar.close()
    for engine in set(engines.values()):
        engine.shutdown()
    paper = out["shapes"][shapes[0]]["saturated"]
    tps = {k: v["tokens_per_s"] for k, v in paper.items()}
    out["ratios"] = {"shape": shapes[0],
                     "mixed_vs_batch1_throughput": tps["mixed"] / tps["batch1"],
                     "mixed_vs_single_variant_throughput": tps["mixed"] / tps["one_variant"],
                     "mixed_vs_per_variant_throughput": tps["mixed"] / tps["per_variant"],
                     "grouped_vs_batch1_throughput": tps["grouped"] / tps["batch1"],
                     "grouped_vs_single_variant_throughput": tps["grouped"] / tps["one_variant"],
                     "grouped_vs_transformers_throughput": tps["grouped"] / tps["transformers"],
                     "mixed_vs_transformers_throughput": tps["mixed"] / tps["transformers"],
                     "mixed_vs_transformers_device_bytes": mem["mixed"] / mem["transformers"],
                     "mixed_vs_transformers_weight_bytes": (mem["mixed"] - mem["kv_cache"])
                     / (mem["transformers"] - mem["kv_cache"])}
    if "transformers_cb" in tps:
        out["ratios"]["mixed_vs_transformers_cb_throughput"] = tps["mixed"] / tps["transformers_cb"]
    out["files"] = write(out, out_dir, tag)
    return out


def table(out: dict) -> str:
    lines = [f"{len(out['variants'])} variants ({', '.join(out['variants'])}); {out['machine'].get('cpu', '')}; "
             f"torch threads {out['torch_threads']}"]
    for shape, s in out["shapes"].items():
        lines.append(f"\n[{shape}: {s['prompt_len']}-token prompts, {s['new_tokens']} new tokens]")
        lines.append(f"{'system':<16}{'saturated tok/s':>16}{'device MiB':>12}")
        for k, v in s["saturated"].items():
            mib = out["device_bytes"].get(k)
            lines.append(f"{k:<16}{v['tokens_per_s']:>16.0f}{'' if mib is None else f'{mib / 2**20:>12.2f}'}")
        lines.append(f"{'λ (req/s)':>10} {'system':<14}{'TTFT mean':>11}{'TTFT p99':>10}{'turn mean':>11}{'turn p99':>10}  (ms)")
        for r in s["sweep"]:
            lines.append(f"{r['rate']:>10.1f} {r['system']:<14}{1e3 * r['ttft_mean']:>11.1f}{1e3 * r['ttft_p99']:>10.1f}"
                         f"{1e3 * r['turnaround_mean']:>11.1f}{1e3 * r['turnaround_p99']:>10.1f}")
    lines.append("\nratios: " + ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}"
                                          for k, v in out["ratios"].items()))
    return "\n".join(lines)


def write(out: dict, out_dir, tag: str) -> dict:
    out_dir = results_dir(out_dir)
    files = {"json": str(out_dir / f"{tag}.json")}
    plt = pyplot()
    if plt is None:
        files["plot"] = NO_PLOT
    else:
        shapes = list(out["shapes"])
        fig, axes = plt.subplots(2, len(shapes), figsize=(5.5 * len(shapes), 7.5), squeeze=False)
        for j, shape in enumerate(shapes):
            s = out["shapes"][shape]
            ax = axes[0][j]
            keys = list(s["saturated"])
            ax.bar(keys, [s["saturated"][k]["tokens_per_s"] for k in keys], color="tab:blue")
            ax.set_ylabel("saturated tokens/s")
            ax.set_title(f"{shape}: {s['prompt_len']}-token prompts, {s['new_tokens']} new")
            ax.tick_params(axis="x", rotation=30)
            ax = axes[1][j]
            for system in dict.fromkeys(r["system"] for r in s["sweep"]):
                pts = [(r["rate"], 1e3 * r["turnaround_mean"]) for r in s["sweep"] if r["system"] == system]
                ax.plot(*zip(*pts), marker="o", label=system)
            ax.set_xlabel("arrival rate λ (requests/s)")
            ax.set_ylabel("mean turnaround (ms)")
            ax.set_yscale("log")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        fig.suptitle(f"{len(out['variants'])} variants, {out['machine'].get('cpu', 'this machine')}", fontsize=9)
        fig.tight_layout()
        files["plot"] = str(out_dir / f"{tag}.png")
        fig.savefig(files["plot"], dpi=110)
        plt.close(fig)
    with open(files["json"], "w") as f:
        json.dump(dict(out, files=files), f, indent=2, default=str)
    return files


def zoo_dirs(small: bool, count: int, progress: bool) -> dict:
    """``count`` variants of the mixtral-tiny zoo; beyond the zoo's own, copies under new names."""
    from multimoe_rt.lab import zoo

    dirs = zoo.build("mixtral-tiny", small=small, progress=progress)
    own = [n for n in ("base", "ptb", "shakespeare", "pycode", "ptb-frozen") if n in dirs]
    names = own[:count]
    i = 0
    while len(names) < count:
        names.append(f"{own[i % len(own)]}-copy{i // len(own) + 1}")
        i += 1
    return {n: dirs[n.split("-copy")[0]] for n in names}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--small", action="store_true", help="small zoo, fewer requests: under 3 minutes")
    p.add_argument("--variants", type=int, default=None, help="how many variants (default 4; --small: 4)")
    p.add_argument("--shapes", default="paper,long", help=f"request shapes among {sorted(SHAPES)}")
    p.add_argument("--max-seqs", type=int, default=64, help="sequences per batch (KV-cache rows)")
    p.add_argument("--share", type=float, default=0.0,
                   help="expert sharing of the plan (0: every variant keeps its own experts: exact outputs)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 keeps runs comparable on a shared machine)")
    p.add_argument("--with-cb", action="store_true", help="also time transformers' generate_batch (slow start-up)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help=RESULTS_HELP)
    p.add_argument("--quiet", action="store_true")
    s = p.add_argument_group("realistic layer shapes (synthetic random-init variants; multimoe_rt/benchmarks/synthetic.py)")
    s.add_argument("--synthetic", choices=["mid", "large"], default=None,
                   help="Mixtral: mid H=1024 I=2048, 2 layers; large: Mixtral-8x7B's layer (H=4096 I=14336), 1 layer "
                        "(the other families' shapes: multimoe_rt/benchmarks/synthetic_models.py). "
                        "Compares one variant, mixed dense copies, every expert shared, each codec plan, the mixed "
                        "plan and transformers; writes batching-synthetic-<shape>-<dtype>[-<family>].json (mid: ~5 min "
                        "on 2 CPU cores)")
    from .synthetic_models import FAMILIES

    s.add_argument("--family", choices=FAMILIES, default="mixtral",
                   help="the architecture at real per-layer shapes: Mixtral; DeepSeek-V3 (Moonlight-16B-A3B's layout: "
                        "latent attention, shared experts, grouped routing, a dense first layer); GPT-OSS (gpt-oss-20b's: "
                        "sinks, sliding/full layers, biases). Codecs the plan refuses for a family are skipped, with the "
                        "reason in the JSON")
    s.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    s.add_argument("--seqs", type=int, default=32, help="sequences, all queued at once (saturated)")
    s.add_argument("--prompt-tokens", type=int, default=16)
    s.add_argument("--new-tokens", type=int, default=16)
    s.add_argument("--reps", type=int, default=2, help="interleaved repetitions (each system once per repetition)")
    s.add_argument("--systems", default=None, help="comma-separated subset of the systems (default: all)")
    s.add_argument("--device", default="cpu")


def main_synthetic(args) -> dict:
    from . import synthetic

    systems = tuple(x.strip() for x in args.systems.split(",")) if args.systems else synthetic.SYSTEMS
    out = synthetic.run(args.synthetic, getattr(torch, args.dtype), args.variants or 4, args.seqs, args.prompt_tokens,
                        args.new_tokens, args.reps, systems, args.device, args.seed, out_dir=args.out,
                        log=None if args.quiet else print, family=args.family)
    print(synthetic.table(out))
    print(f"\nJSON: {out['files']['json']}\nplot: {out['files']['plot']}")
    return out


def main_args(args) -> dict:
    torch.set_num_threads(args.threads)
    if args.synthetic:
        return main_synthetic(args)
    count = args.variants or 4
    dirs = zoo_dirs(args.small, count, not args.quiet)
    tag = "batching-small" if args.small else f"batching-{count}v"
    kw = dict(n_sat=48, n_sweep=32) if args.small else dict(n_sat=128, n_sweep=64)
    out = run(dirs, shapes=[s.strip() for s in args.shapes.split(",")], max_seqs=args.max_seqs, share=args.share, seed=args.seed,
              with_cb=args.with_cb, progress=not args.quiet, tag=tag, out_dir=args.out, **kw)
    print(table(out))
    print(f"\nJSON: {out['files']['json']}\nplot: {out['files']['plot']}")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(p)
    main_args(p.parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
