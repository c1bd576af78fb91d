"""Output quality of consolidated variants against the original variants and model-merging baselines.

The paper's second claim: serving variants through shared experts plus each variant's own non-expert layers
keeps quality close to the original variants, better than merging them into one model. This bench measures it.

Systems, each evaluated on every variant's evaluation sets in one run:
  original             each variant's own full weights, run by transformers itself.
  ours <policy> @s     MultiVariantModel with a consolidation plan at sharing fraction s (``plan.make_plan(share=s)``)
                       for each ranking policy: l2/global, l2/per_layer, output/global (expert output distance on
                       recorded MoE inputs of the anchor, from ``calibration_from_text`` on validation text) and the
                       seeded random control (``--seeds`` seeds, reported as mean +- sample std, min/max in the JSON);
                       anchor representative for all, mean representative for l2/global. At s = 0 every variant keeps
                       its own experts whatever the policy, and at s = 1 nothing is ranked, so those two levels are one
                       system per representative.
  no-reconfig @s       what serving looks like without Algorithm 2: variant v's row of the slot table (l2/global
                       plan at s, anchor representative) but the BASE (anchor) variant's non-expert layers for every
                       variant. At s = 1 with the anchor representative this is exactly the base model for everyone;
                       "no-reconfig mean @1.00" uses the mean-expert representative with the base's non-expert layers.
  merge average / task-arithmetic / ties
                       one merged model (``multimoe_rt.lab.merge.merge_variants``, base = the anchor) for all variants;
                       the task-arithmetic and TIES scales are chosen on validation text (mean validation NLL of
                       every variant on its own domain), never on the test split.

Data. Perplexity is byte-level (ByteTokenizer) with the windowed protocol of ``multimoe_rt.lab.evaluate.perplexity``:
window = the model's context, capped window count, identical windows and scored tokens for every system (checked).
Mixtral-family sets: WikiText-2 test, PTB test, and the variant's own domain test split. Switch-family sets: the
variant's task (span corruption, or prefix continuation) rebuilt with the zoo's own data construction on test text,
seeded so every system sees the same pairs; WikiText-2 and PTB span corruption for every variant; ROUGE-1 (words) of
greedy outputs on a few examples for continuation tasks. Validation text = the zoo's held-out tail (last 5%) of each
domain's training file, which no zoo model was trained on.

This file is the harness (run the systems, write and print the report); the systems and scoring live in
``multimoe_rt.lab.quality_systems``, aggregation, findings, table and plot in ``multimoe_rt.lab.quality_report``.
"""
from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import torch

from multimoe_rt import plan as plan_mod
from multimoe_rt.checkpoint import VariantSet
from multimoe_rt.lab import merge as merge_mod
from multimoe_rt.lab import zoo as zoo_mod
from multimoe_rt.lab.evaluate import tokenize_dataset
from multimoe_rt.lab.quality_report import (  # noqa: F401  (re-exported: tests and readers use benchmarks.quality.*)
    _aggregate, _check_same_tokens, achieved, criterion_summary, findings, format_table, ours_curve, plot_memory,
    plot_result, rerender, within, within_memory)
from multimoe_rt.lab.quality_systems import (  # noqa: F401
    CALIB_TOKENS, FAST_CODECS, FAST_RATIOS, LEVELS, MIXED_RATIOS, POLICIES, SCHEMA_VERSION, TA_GRID, TIES_GRID, UNIFORM_DELTAS, Bench,
    QualityError, _calibration, causal, cost_batches, eval_plan, hf_runner, load_hf, load_merged, make_pairs,
    memory_of_models, memory_of_plan, mvm_runner, separate_bytes, seq2seq_nll, validation_tokens, variant_info,
    zoo_params)
from multimoe_rt.machine import machine_info
from multimoe_rt.model import MultiVariantModel
from multimoe_rt.tokenizer import ByteTokenizer


def run_quality(dirs, *, label: str | None = None, window: int | None = None, stride: int | None = None,
                max_windows: int = 48, val_windows: int | None = None, batch_size: int = 16, seeds: int = 3,
                levels=LEVELS, n_pairs: int = 48, n_rouge: int = 8, ta_grid=TA_GRID, ties_grid=TIES_GRID,
                ties_density: float = 0.2, out_dir=None, plot: bool = True, test_data: dict | None = None,
                val_data: dict | None = None, progress: bool = True, uniform_deltas=UNIFORM_DELTAS,
                mixed_ratios=MIXED_RATIOS, codecs=None, calib_tokens: int = CALIB_TOKENS, fast_codecs=FAST_CODECS,
                fast_ratios=FAST_RATIOS) -> dict:
    """Evaluate every system on every variant's sets; write JSON (and a PNG) under ``out_dir`` if given.

    dirs: {name: HF directory} (base/anchor first) or a list of directories (names from directory names).
    test_data / val_data: {set key: token ids (Mixtral) or pairs (Switch)} overriding the shared/data sets
    (tests use this with tiny random models).
    uniform_deltas: delta specs, each one system storing every non-duplicate entry as base + that delta.
    mixed_ratios: device-byte budgets (fraction of the variants as separate models) of the mixed plan, which
    chooses per entry among sharing, base + one of ``codecs`` (default ``plan.mixed.DEFAULT_CODECS``) and an
    own copy by the measured calibration-loss costs (``calib_tokens`` of each variant's validation text).
    fast_codecs / fast_ratios: the mixed plan again restricted to these codecs (a subset of ``codecs``: the
    same measurements), the "mixed lowrank-only" policy.
    """
    from multimoe_rt import criterion
    from multimoe_rt.plan.mixed import DEFAULT_CODECS

    codecs = tuple(codecs or DEFAULT_CODECS)
    t_start = time.perf_counter()
    if not isinstance(dirs, dict):
        dirs = {Path(d).name: Path(d) for d in dirs}
    dirs = {n: Path(p) for n, p in dirs.items()}
    vs = VariantSet.from_dirs(list(dirs.values()), names=list(dirs))
    family = vs.family
    info = variant_info(dirs, family)
    sets, own = eval_plan(info, family)
    params = zoo_params(dirs, family)
    label = label or f"{family}-{len(vs)}"
    tok = ByteTokenizer()
    cfg = vs[0].config
    if causal(family):
        window = window or int(params.get("seq") or min(int(cfg.get("max_position_embeddings", 2048)), 2048))
        stride = stride or window
    decoder_start = int(cfg.get("decoder_start_token_id") or 0) if not causal(family) else None
    eos = cfg.get("eos_token_id")
    val_windows = val_windows or max(2, max_windows // 2)

    # ---- data: identical for every system
    needed = sorted({k for ks in sets.values() for k in ks})
    log = (lambda *a: print(*a, file=sys.stderr, flush=True)) if progress else (lambda *a: None)
    if test_data is None:
        test_data = {}
        for k in needed:
            task, _, domain = k.rpartition("/")
            ids = tokenize_dataset(domain, "test", tok)
            test_data[k] = ids if causal(family) else make_pairs(ids, task, params, n_pairs, 7, tok)
    if val_data is None:
        val_data = {}
        for k in needed:
            task, _, domain = k.rpartition("/")
            ids = validation_tokens(domain)
            val_data[k] = ids if causal(family) else make_pairs(ids, task, params, n_pairs, 11, tok)
    missing = [k for k in needed if k not in test_data or k not in val_data]
    if missing:
        raise QualityError(f"no test/validation data for evaluation sets {missing}")

    bench = Bench(vs, info, sets, own, test_data, val_data, family, window, stride, max_windows, val_windows,
                  batch_size, n_rouge, decoder_start, eos, progress)
    systems: list[dict] = []
    systems_skipped: list[dict] = []

    def add(name, kind, runner, **meta):
        t0 = time.perf_counter()
        res = bench.run_system(runner)
        systems.append({"name": name, "kind": kind, **meta, "results": res})
        log(f"  {name:<36} {time.perf_counter() - t0:6.1f} s")
        return res

    # ---- 1. originals (transformers, own weights)
    log(f"[{label}] {len(vs)} variants {vs.names}; sets {needed}")
    originals = {n: load_hf(p, family) for n, p in dirs.items()}
    add("original", "original", hf_runner(originals, family, "original"), memory=memory_of_models(len(vs), vs))
    del originals

    # ---- 2./3. ours and no-reconfig
    log(f"[{label}] expert distances (+ output distance on recorded calibration states)")
    calib, calib_how = _calibration(vs, val_data, own, family)
    dist = plan_mod.compute_distances(vs, anchor=0, output=True, calib=calib)
    main_metric, main_scope = POLICIES[0]
    t_costs = time.perf_counter()
    batches = cost_batches(vs, val_data, own, family, window, decoder_start, calib_tokens)
    log(f"[{label}] measured costs: each expert replaced alone by the anchor's or base + delta "
        f"({', '.join(codecs)}), calibration loss on each variant's validation text")
    costs = criterion.measure_costs(vs, batches, codecs=codecs, distances=dist, progress=progress,
                                    calibration=f"own-domain validation text, up to {calib_tokens} tokens per variant")
    costs_s = time.perf_counter() - t_costs
    log(f"[{label}] costs measured in {costs_s:.0f} s")

    def ours(share, metric, scope, representative, seed=0):
        p = plan_mod.make_plan(vs, share=share, metric=metric, scope=scope, representative=representative,
                               seed=seed, distances=dist, dtype=torch.float32,
                               costs=costs if metric == "loss" else None)
        return MultiVariantModel(vs, p, device="cpu", dtype=torch.float32), p

    def sharing(p) -> dict:
        # the achieved fraction of each variant's non-duplicate entries served by the shared copy
        out = {}
        for v, name in enumerate(vs.names):
            st = [s for layer in p.status[v] for s in layer]
            n = st.count("shared") + st.count("own") + st.count("delta")
            out[name] = st.count("shared") / n if n else None
        return out

    for share in levels:
        edge = share in (0.0, 1.0)
        policies = [POLICIES[0]] if edge else list(POLICIES)
        for metric, scope in policies:
            reps = ["anchor"] if share == 0.0 else ["anchor", "mean"] if (metric, scope) == POLICIES[0] else ["anchor"]
            for rep in reps:
                mvm, p = ours(share, metric, scope, rep)
                pol = "any" if edge else f"{metric}/{scope}"
                tag = f"{share:.2f}"
                add(f"ours {pol} {rep} @{tag}", "ours", mvm_runner(mvm, f"ours-{pol}-{rep}-{tag}"),
                    metric=None if edge else metric, scope=None if edge else scope, representative=rep,
                    share=share, seed=None, sharing_actual=sharing(p), memory=memory_of_plan(p, vs))
                if rep == "anchor" and (metric, scope) == POLICIES[0]:
                    add(f"no-reconfig {rep} @{tag}", "no_reconfig",
                        mvm_runner(mvm, f"noreconf-{pol}-{rep}-{tag}", non_expert_of=vs.names[0]),
                        metric=None if edge else metric, scope=None if edge else scope, representative=rep,
                        share=share, sharing_actual=sharing(p))
                if rep == "mean" and share == 1.0:
                    add(f"no-reconfig {rep} @{tag}", "no_reconfig",
                        mvm_runner(mvm, f"noreconf-{pol}-{rep}-{tag}", non_expert_of=vs.names[0]),
                        metric=None, scope=None, representative=rep, share=share, sharing_actual=sharing(p))
        if not edge:
            per_seed = []
            for seed in range(seeds):
                mvm, p = ours(share, "random", "global", "anchor", seed)
                add(f"ours random seed{seed} anchor @{share:.2f}", "ours_random_seed",
                    mvm_runner(mvm, f"random-{seed}-{share}"), metric="random", scope="global",
                    representative="anchor", share=share, seed=seed, sharing_actual=sharing(p),
                    memory=memory_of_plan(p, vs))
                per_seed.append(systems[-1]["results"])
            fracs = [s_["sharing_actual"] for s_ in systems[-seeds:]]
            systems.append({"name": f"ours random ({seeds} seeds) anchor @{share:.2f}", "kind": "ours_random",
                            "metric": "random", "scope": "global", "representative": "anchor", "share": share,
                            "seeds": list(range(seeds)), "results": _aggregate(per_seed),
                            "memory": systems[-1]["memory"],
                            "sharing_actual": {v: None if fracs[0][v] is None else
                                               statistics.fmean(f[v] for f in fracs) for v in vs.names}})

    # ---- 3b. compressed deltas: every entry as base + one codec, then the mixed plan under byte budgets
    log(f"[{label}] deltas: uniform {', '.join(uniform_deltas)}; mixed plan at ratios {list(mixed_ratios)}")
    for spec in uniform_deltas:
        p = plan_mod.make_plan(vs, share=1.0, delta=spec, distances=dist, dtype=torch.float32, costs=costs)
        mvm = MultiVariantModel(vs, p, device="cpu", dtype=torch.float32)
        add(f"ours delta {spec}", "ours_delta", mvm_runner(mvm, f"delta-{spec}"), spec=spec,
            memory=memory_of_plan(p, vs), predicted_loss=dict(zip(vs.names, p.predicted_loss())))
    sep32 = separate_bytes(vs, torch.float32)
    ne32 = len(vs) * plan_mod.non_expert_nbytes(vs[0], torch.float32)
    mixed_plans = {}
    fast_codecs = tuple(c for c in fast_codecs if c in codecs)
    runs = [(r, codecs, "mixed (measured loss)", "mixed") for r in mixed_ratios]
    runs += [(r, fast_codecs, "mixed lowrank-only", "mixed lowrank-only") for r in (fast_ratios if fast_codecs else ())]
    for ratio, cs, policy, tag in runs:
        name = f"ours {tag} @{ratio:.2f}"
        try:
            p = plan_mod.make_plan(vs, budget_bytes=int(ratio * sep32), codecs=cs, costs=costs, metric="loss",
                                   non_expert_bytes=ne32, distances=dist, dtype=torch.float32)
        except plan_mod.PlanError as e:
            log(f"  {name}: no plan ({e})")
            systems_skipped.append({"name": name, "why": str(e)})
            continue
        if cs == codecs:
            mixed_plans[ratio] = p
        mvm = MultiVariantModel(vs, p, device="cpu", dtype=torch.float32)
        add(name, "ours_mixed", mvm_runner(mvm, f"{tag}-{ratio}"), budget_ratio=ratio, policy=policy, codecs=list(cs),
            memory=memory_of_plan(p, vs), deltas_by_spec=p.deltas_by_spec(),
            sharing_actual=sharing(p), predicted_loss=dict(zip(vs.names, p.predicted_loss())))

    # ---- 4. merging baselines: one model for all variants
    log(f"[{label}] merging baselines (scales chosen on validation text)")
    merges = {}
    avg = load_merged(merge_mod.merge_variants(vs, "average"), cfg, family)
    add("merge average", "merge", hf_runner({None: avg}, family, "merge-average"), method="average",
        memory=memory_of_models(1, vs))
    for method, grid, extra in (("task_arithmetic", ta_grid, {}), ("ties", ties_grid, {"density": ties_density})):
        curve = {}
        best = None
        for s in grid:
            m = load_merged(merge_mod.merge_variants(vs, method, base=0, scale=s, **extra), cfg, family)
            obj = bench.val_objective(hf_runner({None: m}, family, f"merge-{method}-{s}"))
            curve[str(s)] = obj
            if best is None or obj < best[0]:
                best = (obj, s, m)
        merges[method] = {"grid": list(grid), "val_nll": curve, "chosen_scale": best[1], **extra}
        add(f"merge {method.replace('_', '-')} x{best[1]}", "merge",
            hf_runner({None: best[2]}, family, f"merge-{method}-{best[1]}"), method=method, scale=best[1],
            memory=memory_of_models(1, vs), **extra)

    # ---- checks, summary, output
    tokens = _check_same_tokens(systems)
    result = {
        "schema": SCHEMA_VERSION, "label": label, "family": family, "variants": vs.names,
        "dirs": {n: str(p) for n, p in dirs.items()}, "variant_info": info, "eval_sets": sets, "own_set": own,
        "protocol": {"window": window, "stride": stride, "max_windows": max_windows, "val_windows": val_windows,
                     "batch_size": batch_size, "n_pairs": n_pairs if not causal(family) else None,
                     "n_rouge": n_rouge if not causal(family) else None, "levels": list(levels), "seeds": seeds,
                     "calibration": calib_how, "policies": [f"{m}/{s}" for m, s in POLICIES] + ["random/global"],
                     "metric": "byte perplexity" if causal(family) else "target perplexity (exp mean NLL)",
                     "tokens_scored": tokens, "uniform_deltas": list(uniform_deltas), "mixed_ratios": list(mixed_ratios),
                     "codecs": list(codecs), "fast_codecs": list(fast_codecs), "fast_ratios": list(fast_ratios),
                     "cost_tokens": dict(zip(vs.names, costs.tokens)),
                     "cost_calibration": costs.calibration, "costs_s": round(costs_s, 1),
                     "memory": "device bytes of every variant served at once (slab: dense slots + delta pools; plus "
                               "every variant's non-expert set) over the same variants as separate models; 'ratio' "
                               "in fp32 (the zoo's dtype, what was measured), 'ratio_bf16' the same plans in bf16"},
        "skipped_systems": systems_skipped,
        "merge": merges, "machine": machine_info(), "systems": systems, "evaluations": bench.evals,
    }
    result["within_2pct"] = within(result)
    result["within_2pct_memory_ratio"] = within_memory(result)
    result["criterion"] = criterion_summary(costs, dist, vs.names)
    result["findings"] = findings(result)
    result["elapsed_s"] = round(time.perf_counter() - t_start, 1)
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        result["json"] = str(out_dir / f"quality_{label}.json")
        if plot:
            result["plot"] = plot_result(result, out_dir / f"quality_{label}.png")
            result["plot_memory"] = plot_memory(result, out_dir / f"quality_{label}_memory.png")
        if mixed_plans:  # the mixed plan nearest 0.40 of the bytes: its JSON (choices, measured costs) and heatmap
            ratio = min(mixed_plans, key=lambda r: abs(r - 0.40))
            mp = mixed_plans[ratio]
            result["mixed_plan"] = {"budget_ratio": ratio, "json": str(out_dir / f"quality_{label}_mixed_plan.json")}
            mp.to_json(result["mixed_plan"]["json"])
            if plot:
                try:
                    plan_mod.heatmap(mp, out_dir / f"quality_{label}_mixed_plan.png")
                    result["mixed_plan"]["heatmap"] = str(out_dir / f"quality_{label}_mixed_plan.png")
                except plan_mod.PlanError as e:  # no matplotlib
                    log(f"no heatmap: {e}")
        Path(result["json"]).write_text(json.dumps(result, indent=1) + "\n")
    return result



# ---------------------------------------------------------------- command line


def zoo_dirs(recipe: str, small: bool, cache_dir=None, progress=True) -> dict[str, Path]:
    """The zoo's directories; the full zoo is built (minutes) if it is not in the cache."""
    return zoo_mod.build(recipe, small=small, cache_dir=cache_dir, progress=progress)


def run_from_args(args) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    jobs = []
    if args.variants:
        jobs.append(({Path(d).name: Path(d) for d in args.variants}, None))
    else:
        recipes = {"both": ["mixtral-tiny", "switch-tiny"], "all": ["mixtral-tiny", "qwen3-moe-tiny", "switch-tiny"]
                   }.get(args.recipe, [args.recipe])
        for r in recipes:
            jobs.append((zoo_dirs(r, args.small, args.cache, not args.quiet), f"{r}{'-small' if args.small else ''}"))
    for dirs, label in jobs:
        res = run_quality(dirs, label=label, window=args.window, stride=args.stride, max_windows=args.max_windows,
                          batch_size=args.batch_size, seeds=args.seeds, n_pairs=args.pairs, out_dir=out,
                          plot=not args.no_plot, progress=not args.quiet)
        print(format_table(res))
        print(f"JSON: {res['json']}" + (f"   plot: {res['plot']}" if res.get("plot") else "")
              + f"   ({res['evaluations']} evaluations, {res['elapsed_s']} s)")
    return 0


def main(argv=None) -> int:
    from multimoe_rt.cli import build_parser
    args = build_parser().parse_args(["eval", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
