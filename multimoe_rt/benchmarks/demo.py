"""`multimoe-rt demo`: the project's main job, end to end, on the tiny zoo.

1. Plan. Measure what each way of storing each expert costs (``criterion.measure_costs``: share the base's,
   base + a compressed delta, own copy; calibration loss on each variant's held-out validation text), then
   build the mixed plan (``plan.make_plan(..., codecs=, costs=)``, the quality study's call) at each device-byte
   budget of ``MIXED_RATIOS``, smallest first, and keep the first whose every variant's validation perplexity
   is within ``WITHIN`` (2%) of its own model's: the plan that saves the most bytes within 2%. Validation text
   chooses; test text reports, so the choice never sees the numbers it is judged by. If no budget passes,
   every variant keeps its own experts (exact), and the JSON says so.
2. Serve. Every variant live in one ``Engine`` over that plan, requests of all variants mixed in each batch;
   against it, transformers with every variant's full model resident (``batching.run_transformers``: batched
   ``generate`` per variant group), on the same traces: saturated (all queued at once) for tokens/s, and
   Poisson arrivals at half the engine's saturated request rate for TTFT.
3. Report per variant: the device bytes it adds (non-expert set, the slots it stores first, its deltas;
   shared slots count with the base) against one full model; own-domain test perplexity against its own
   model; tokens/s and TTFT against transformers; and whether the engine's greedy tokens equal its own
   model's on a prompt of its own domain. One JSON and one PNG in the results folder.

Perplexity is scored by ``MultiVariantModel`` over the same plan (the reference model the engine's batched
forward is tested against), with the quality study's window protocol (``lab.quality_systems.Bench``).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from . import results_dir

PAPER_SHAPE = (20, 25)   # prompt tokens, new tokens: the paper's workload
# --small: the small zoo's context is 64 tokens; fewer windows and calibration tokens keep it under a minute
SMALL = dict(max_windows=16, val_windows=8, calib_tokens=512)


# ---------------------------------------------------------------- the plan

def budget_ratios(study) -> tuple:
    """The quality study's budgets, then 0.1 steps up to 1.0: the small zoo's non-expert sets are most of a
    variant, so its floor (every expert shared) lies above the study's range."""
    return tuple(study) + tuple(r / 10 for r in range(int(10 * max(study)) + 1, 11))


def _within(ppl: dict, ref: dict, within: float) -> bool:
    return all(ppl[v] <= (1 + within) * ref[v] for v in ref)


def choose_plan(vs, bench, original, costs, codecs, ratios, log=None, progress: bool = False):
    """(plan, candidates): the mixed plan at the smallest budget ratio whose every variant's own-domain
    validation perplexity is within ``WITHIN`` of its own model's; else every variant's own experts."""
    from tqdm.auto import tqdm

    from multimoe_rt import plan as plan_mod
    from multimoe_rt.lab.quality_systems import WITHIN, mvm_runner, separate_bytes
    from multimoe_rt.model import MultiVariantModel

    log = log or (lambda *_: None)
    names = vs.names
    ref = {v: bench.score(original, v, bench.own[v], "val")["ppl"] for v in names}
    sep32 = separate_bytes(vs, torch.float32)
    ne32 = len(vs) * plan_mod.non_expert_nbytes(vs[0], torch.float32)
    candidates = []
    bar = tqdm(sorted(ratios), desc="demo: plans within 2%", unit="plan", disable=not progress)
    for ratio in bar:
        try:
            p = plan_mod.make_plan(vs, budget_bytes=int(ratio * sep32), codecs=list(codecs), costs=costs,
                                   metric="loss", non_expert_bytes=ne32, dtype=torch.float32)
        except plan_mod.PlanError as e:
            candidates.append({"budget_ratio": ratio, "within": False, "why": str(e)})
            log(f"  budget {ratio:.2f}x: no plan" + (" (under one copy of each expert plus every non-expert set)"
                                                      if "cannot hold" in str(e) else f" ({e})"))
            continue
        runner = mvm_runner(MultiVariantModel(vs, p, device="cpu", dtype=torch.float32), f"demo-{ratio}")
        ppl = {v: bench.score(runner, v, bench.own[v], "val")["ppl"] for v in names}
        ok = _within(ppl, ref, WITHIN)
        candidates.append({"budget_ratio": ratio, "within": ok, "val_ppl": ppl, "own_val_ppl": ref,
                           "deltas_by_spec": p.deltas_by_spec()})
        log(f"  budget {ratio:.2f}x: " + ", ".join(f"{v} {ppl[v] / ref[v] - 1:+.1%}" for v in names)
            + ("  -> chosen" if ok else ""))
        if ok:
            bar.close()
            return p, candidates
    log(f"  no budget in {sorted(ratios)} keeps every variant within {WITHIN:.0%}: own experts for all (exact)")
    return plan_mod.make_plan(vs, share=0.0, dtype=torch.float32), candidates


def bytes_per_variant(p, vs) -> dict:
    """Device bytes each variant adds under plan ``p`` (in the plan's dtype): its non-expert set, the dense
    slots it stores first (a slot serving several variants counts once, with the first of them: the base for
    shared experts) and its deltas; the delta descriptor table counts with the anchor. Without offload they
    sum to ``memory_of_plan``'s total."""
    from multimoe_rt import plan as plan_mod
    from multimoe_rt.delta import DESC_BYTES

    out = [plan_mod.non_expert_nbytes(vs[0], plan_mod.common.to_dtype(p.dtype))] * len(vs)
    for s, src in enumerate(p.slot_sources):
        if p.slot_location[s] == "device":
            out[src["variants"][0]] += p.slot_nbytes
    for d in p.deltas:
        out[d["variants"][0]] += d["nbytes"]
    if p.deltas:
        out[p.anchor] += DESC_BYTES * len(p.slot_sources)
    return dict(zip(vs.names, out))


# ---------------------------------------------------------------- serving

def _per_variant(trace, timings, wall: float) -> dict:
    from .batching import summarize

    out = {}
    for v in dict.fromkeys(v for _, v, _ in trace):
        mine = [t for (_, u, _), t in zip(trace, timings) if u == v]
        out[v] = dict(summarize(mine, wall), tokens_per_s=sum(t.tokens for t in mine) / wall)
    return out


class _FedOnDevice:
    """A transformers model whose ``generate`` takes host tensors: ``batching.run_transformers`` builds its
    batches on the host, which a model on a GPU refuses."""

    def __init__(self, model):
        self.model = model

    def generate(self, input_ids, attention_mask=None, **kw):
        dev = self.model.device
        return self.model.generate(input_ids.to(dev), attention_mask=None if attention_mask is None else
                                   attention_mask.to(dev), **kw)


def serve(engine, models: dict, names, vocab: int, n_sat: int, n_poisson: int, shape, seed: int,
          progress: bool = False) -> dict:
    """Saturated and Poisson runs of the engine and of transformers (every model resident), same traces."""
    from tqdm.auto import tqdm

    from .batching import make_trace, run_engine, run_transformers, summarize

    prompt_len, new_tokens = shape
    hf = {v: m if m.device.type == "cpu" else _FedOnDevice(m) for v, m in models.items()}

    def trace_of(rate, n, seed_):
        # variants in turn (arrivals and prompts from make_trace): every variant gets its share of the requests
        return [(t, names[i % len(names)], p) for i, (t, _, p) in enumerate(
            make_trace(names, rate, n, prompt_len, vocab, seed_))]

    warm = trace_of(None, 2 * len(names), seed + 99)

    def replay(system, trace, n):
        t0 = time.perf_counter()
        timings = run_engine(engine, trace, n) if system == "engine" else run_transformers(hf, trace, n, n_sat)
        wall = time.perf_counter() - t0
        return dict(summarize(timings, wall), per_variant=_per_variant(trace, timings, wall))

    bar = tqdm(total=4, desc="demo: serving", unit="run", disable=not progress)
    for system in ("engine", "transformers"):  # first calls (allocations, thread pools) stay out of the timings
        replay(system, warm, 2)
    out = {"saturated": {}, "poisson": {}}
    trace = trace_of(None, n_sat, seed)
    for system in ("engine", "transformers"):
        bar.set_postfix_str(f"saturated {system}")
        out["saturated"][system] = replay(system, trace, new_tokens)
        bar.update(1)
    rate = round(0.5 * n_sat / out["saturated"]["engine"]["wall_s"], 2)
    trace = trace_of(rate, n_poisson, seed + 1)
    for system in ("engine", "transformers"):
        bar.set_postfix_str(f"Poisson λ={rate} {system}")
        out["poisson"][system] = replay(system, trace, new_tokens)
        bar.update(1)
    bar.close()
    out["poisson_rate"] = rate
    return out


def greedy_check(engine, models: dict, prompts: dict, new_tokens: int) -> dict:
    """Per variant: the engine's greedy tokens against its own transformers model's, same prompt."""
    out = {}
    for v, prompt in prompts.items():
        ours = engine.generate(v, prompt, max_new_tokens=new_tokens, ignore_eos=True)
        m = models[v]
        ids = torch.tensor([prompt], device=m.device)
        with torch.inference_mode():
            ref = m.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)[0, len(prompt):].tolist()
        same = next((i for i, (a, b) in enumerate(zip(ours, ref)) if a != b), len(ref))
        out[v] = {"equal": ours == ref, "same_prefix": same, "tokens": len(ref), "engine": ours,
                  "transformers": ref}
    return out


# ---------------------------------------------------------------- the run

def run(dirs: dict, *, ratios=None, codecs=None, n_sat: int = 64, n_poisson: int = 32, shape=PAPER_SHAPE,
        window: int | None = None, max_windows: int = 48, val_windows: int = 24, calib_tokens: int = 2048,
        test_data: dict | None = None, val_data: dict | None = None, device="cpu", seed: int = 0,
        out_dir=None, tag: str = "demo", progress: bool = True, log=print) -> dict:
    """The demo on ``dirs`` ({name: HF directory}, base first). ``test_data`` / ``val_data`` ({set key: token
    ids}) replace the shared/data text (tests use them with tiny random models). ``ratios``: the budgets tried
    (default: ``budget_ratios(MIXED_RATIOS)``); ``codecs``: the options per entry (default
    ``plan.mixed.DEFAULT_CODECS``)."""
    from multimoe_rt import criterion
    from multimoe_rt.checkpoint import VariantSet
    from multimoe_rt.engine import Engine
    from multimoe_rt.lab.evaluate import tokenize_dataset
    from multimoe_rt.lab.quality_systems import (MIXED_RATIOS, WITHIN, Bench, QualityError, causal, cost_batches,
                                                 eval_plan, hf_runner, load_hf, memory_of_plan, mvm_runner,
                                                 separate_bytes, validation_tokens, variant_info, zoo_params)
    from multimoe_rt.machine import machine_info
    from multimoe_rt.model import MultiVariantModel
    from multimoe_rt.plan.mixed import DEFAULT_CODECS

    t_start = time.perf_counter()
    log = log or (lambda *_: None)
    codecs = tuple(codecs or DEFAULT_CODECS)
    ratios = tuple(ratios or budget_ratios(MIXED_RATIOS))
    dirs = {n: Path(p) for n, p in dirs.items()}
    vs = VariantSet.from_dirs(list(dirs.values()), names=list(dirs))
    if not causal(vs.family):
        raise QualityError(f"the demo scores perplexity on text windows, which needs a decoder-only model; "
                           f"{vs.family} is an encoder-decoder")
    names, family, cfg = vs.names, vs.family, vs[0].config
    info = variant_info(dirs, family)
    sets, own = eval_plan(info, family)
    own = {v: own[v] or sets[v][0] for v in names}   # a variant without a domain is scored on the general set
    sets = {v: [own[v]] for v in names}
    positions = int(cfg.get("max_position_embeddings") or 2048)
    window = window or min(int(zoo_params(dirs, family).get("seq") or 256), positions)
    keys = sorted(set(own.values()))
    if test_data is None:
        test_data = {k: tokenize_dataset(k, "test") for k in keys}
    if val_data is None:
        val_data = {k: validation_tokens(k) for k in keys}

    bench = Bench(vs, info, sets, own, test_data, val_data, family, window, None, max_windows, val_windows,
                  16, 0, None, None, progress)
    log(f"[1/3] plan: measuring each expert's cost of sharing and of {len(codecs)} delta codecs "
        f"({', '.join(codecs)}) on held-out validation text")
    # scoring runs on the CPU (the window protocol feeds host tensors); serving runs on ``device``
    originals = {v: load_hf(p, family) for v, p in dirs.items()}
    original = hf_runner(originals, family, "original")
    costs = criterion.measure_costs(vs, cost_batches(vs, val_data, own, family, window, None, calib_tokens),
                                    codecs=codecs, progress=progress, calibration="own-domain validation text")
    log(f"      choosing the smallest device-byte budget (of {len(ratios)}) with every variant within "
        f"{WITHIN:.0%} of its own model's validation perplexity")
    plan, candidates = choose_plan(vs, bench, original, costs, codecs, ratios, log, progress)
    mvm = mvm_runner(MultiVariantModel(vs, plan, device="cpu", dtype=torch.float32), "demo-chosen")
    ppl = {v: bench.score(mvm, v, own[v])["ppl"] for v in names}
    own_ppl = {v: bench.score(original, v, own[v])["ppl"] for v in names}

    log(f"[2/3] serve: {len(names)} variants live in one engine, mixed in each batch, against transformers "
        f"with every variant's model resident")
    prompt_len, new_tokens = shape
    models = originals if torch.device(device).type == "cpu" else \
        {v: load_hf(p, family).to(device) for v, p in dirs.items()}
    engine = Engine.from_pretrained(vs, plan=plan, max_seqs=n_sat, max_len=prompt_len + new_tokens + 8,
                                    device=device, dtype=torch.float32)
    try:
        served = serve(engine, models, names, engine.vocab_size, n_sat, n_poisson, shape, seed, progress)
        prompts = {v: test_data[own[v]][:prompt_len].tolist() for v in names}
        greedy = greedy_check(engine, models, prompts, new_tokens)
        footprint = engine.memory_footprint()
    finally:
        engine.shutdown()

    log("[3/3] report")
    sep = separate_bytes(vs, torch.float32)
    full = sep // len(vs)
    mine = bytes_per_variant(plan, vs)
    hf_bytes = sum(t.numel() * t.element_size() for m in models.values() for t in m.parameters())
    sat, poi = served["saturated"], served["poisson"]
    per_variant = {}
    for v in names:
        per_variant[v] = {
            "eval_set": own[v], "device_bytes": mine[v], "full_model_bytes": full, "bytes_ratio": mine[v] / full,
            "ppl": ppl[v], "own_model_ppl": own_ppl[v], "ppl_ratio": ppl[v] / own_ppl[v],
            "tokens_per_s": sat["engine"]["per_variant"][v]["tokens_per_s"],
            "transformers_tokens_per_s": sat["transformers"]["per_variant"][v]["tokens_per_s"],
            "ttft_mean_s": poi["engine"]["per_variant"][v]["ttft_mean"],
            "transformers_ttft_mean_s": poi["transformers"]["per_variant"][v]["ttft_mean"],
            "greedy_equal": greedy[v]["equal"], "greedy_same_prefix": greedy[v]["same_prefix"]}
    mem = memory_of_plan(plan, vs)
    chosen = next((c for c in candidates if c["within"]), None)
    out = {
        "bench": "demo", "variants": names, "family": family, "dirs": {v: str(p) for v, p in dirs.items()},
        "machine": machine_info(), "device": str(device), "torch_threads": torch.get_num_threads(),
        "within": WITHIN,
        "plan": {"budget_ratio": chosen["budget_ratio"] if chosen else None, "exact_fallback": chosen is None,
                 "codecs": list(codecs), "deltas_by_spec": plan.deltas_by_spec(),
                 "sharing_fraction": plan.sharing_fraction(), "delta_fraction": plan.delta_fraction(),
                 "expert_bytes": plan.expert_bytes, "summary": plan.summary()},
        "candidates": candidates,
        "protocol": {"window": window, "max_windows": max_windows, "val_windows": val_windows,
                     "calib_tokens": calib_tokens, "prompt_tokens": prompt_len, "new_tokens": new_tokens,
                     "saturated_requests": n_sat, "poisson_requests": n_poisson,
                     "poisson_rate": served["poisson_rate"],
                     "tokens_scored": {v: bench.score(mvm, v, own[v])["tokens_scored"] for v in names}},
        "per_variant": per_variant,
        "total": {"device_bytes": mem["device_bytes"], "separate_bytes": sep, "bytes_ratio": mem["ratio"],
                  "bytes_ratio_bf16": mem["ratio_bf16"], "engine_device_bytes": footprint["total_device_bytes"],
                  "transformers_device_bytes": hf_bytes + footprint["kv_cache_bytes"],
                  "kv_cache_bytes": footprint["kv_cache_bytes"],
                  "tokens_per_s": sat["engine"]["tokens_per_s"],
                  "transformers_tokens_per_s": sat["transformers"]["tokens_per_s"],
                  "ttft_mean_s": poi["engine"]["ttft_mean"],
                  "transformers_ttft_mean_s": poi["transformers"]["ttft_mean"],
                  "ttft_p99_s": poi["engine"]["ttft_p99"], "transformers_ttft_p99_s": poi["transformers"]["ttft_p99"]},
        "serving": served, "greedy": greedy,
        "notes": ["device_bytes per variant: its non-expert set + the dense slots it stores first + its deltas "
                  "(fp32); shared slots count with the base",
                  "ppl: own-domain test text, MultiVariantModel over the chosen plan (the reference of the engine's "
                  "batched forward); own_model_ppl: the variant's own transformers model",
                  "tokens_per_s: all requests queued at once; a variant's share is its tokens over the run's wall time",
                  "ttft: Poisson arrivals at half the engine's saturated request rate, same trace for both systems"],
    }
    out["elapsed_s"] = round(time.perf_counter() - t_start, 1)
    out["files"] = write(out, out_dir, tag)
    return out


# ---------------------------------------------------------------- output

def table(out: dict) -> str:
    t = out["total"]
    p = out["plan"]
    how = ("every variant's own experts (no budget kept all within 2%)" if p["exact_fallback"] else
           f"mixed plan at {p['budget_ratio']:.2f}x the bytes of separate models: "
           + ", ".join(f"{n} {k}" for k, n in p["deltas_by_spec"].items()) + " deltas, "
           f"{100 * p['sharing_fraction']:.0f}% of fine-tuned experts shared")
    lines = [f"{len(out['variants'])} variants served live in one engine; plan: {how}",
             f"{'variant':<13}{'MiB':>7}{'vs full':>8}{'ppl':>7}{'own':>7}{'Δppl':>7}{'tok/s':>8}{'HF tok/s':>9}"
             f"{'TTFT ms':>8}{'HF ms':>7}  greedy = own model"]
    for v, r in out["per_variant"].items():
        lines.append(f"{v:<13}{r['device_bytes'] / 2**20:>7.2f}{r['bytes_ratio']:>7.2f}x{r['ppl']:>7.3f}"
                     f"{r['own_model_ppl']:>7.3f}{100 * (r['ppl_ratio'] - 1):>+6.1f}%{r['tokens_per_s']:>8.0f}"
                     f"{r['transformers_tokens_per_s']:>9.0f}{1e3 * r['ttft_mean_s']:>8.1f}"
                     f"{1e3 * r['transformers_ttft_mean_s']:>7.1f}  "
                     + ("yes" if r["greedy_equal"] else f"no: first {r['greedy_same_prefix']}/"
                        f"{out['protocol']['new_tokens']} equal"))
    lines.append(f"{'all':<13}{t['device_bytes'] / 2**20:>7.2f}{t['bytes_ratio']:>7.2f}x{'':>28}"
                 f"{t['tokens_per_s']:>8.0f}{t['transformers_tokens_per_s']:>9.0f}{1e3 * t['ttft_mean_s']:>8.1f}"
                 f"{1e3 * t['transformers_ttft_mean_s']:>7.1f}")
    lines.append(f"weights {t['bytes_ratio']:.2f}x separate models in fp32 ({t['bytes_ratio_bf16']:.2f}x in bf16); "
                 f"with the KV cache {t['engine_device_bytes'] / 2**20:.1f} MiB against transformers' "
                 f"{t['transformers_device_bytes'] / 2**20:.1f} MiB; throughput "
                 f"{t['tokens_per_s'] / t['transformers_tokens_per_s']:.2f}x transformers "
                 f"({out['protocol']['saturated_requests']} requests queued at once), TTFT at "
                 f"λ={out['protocol']['poisson_rate']} req/s {1e3 * t['ttft_mean_s']:.1f} ms vs "
                 f"{1e3 * t['transformers_ttft_mean_s']:.1f} ms")
    return "\n".join(lines)


def plot(out: dict, path: Path) -> str:
    from multimoe_rt.plotting import NO_PLOT, pyplot

    plt = pyplot()
    if plt is None:
        return NO_PLOT
    names = out["variants"]
    pv = out["per_variant"]
    x = range(len(names))
    panels = [("device MiB", "device_bytes", "full_model_bytes", 2**-20, "ours (bytes it adds)", "full model"),
              ("own-domain test perplexity", "ppl", "own_model_ppl", 1, "ours", "own model"),
              ("tokens/s (saturated)", "tokens_per_s", "transformers_tokens_per_s", 1, "ours", "transformers"),
              ("mean TTFT, ms (Poisson)", "ttft_mean_s", "transformers_ttft_mean_s", 1e3, "ours", "transformers")]
    fig, axes = plt.subplots(1, 4, figsize=(16, 4.4))
    for ax, (title, a, b, k, la, lb) in zip(axes, panels):
        ax.bar([i - 0.2 for i in x], [k * pv[v][a] for v in names], 0.4, label=la, color="tab:blue")
        ax.bar([i + 0.2 for i in x], [k * pv[v][b] for v in names], 0.4, label=lb, color="tab:gray")
        ax.set_xticks(list(x), names, rotation=30, fontsize=8)
        ax.set_title(title, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.28), ncol=2, frameon=False)
    t = out["total"]
    fig.suptitle(f"{len(names)} variants in one engine: {t['bytes_ratio']:.2f}x the bytes of separate models, "
                 f"{t['tokens_per_s'] / t['transformers_tokens_per_s']:.2f}x transformers' tokens/s "
                 f"({out['machine'].get('cpu', out['device'])})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def write(out: dict, out_dir, tag: str) -> dict:
    out_dir = results_dir(out_dir)
    files = {"json": str(out_dir / f"{tag}.json")}
    files["plot"] = plot(out, out_dir / f"{tag}.png")
    Path(files["json"]).write_text(json.dumps(dict(out, files=files), indent=1, default=str) + "\n")
    return files
