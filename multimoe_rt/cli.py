"""`multimoe-rt` command line.

To add a subcommand: write one `cmd_<name>(args) -> int` function and one parser block in `build_parser()`
that ends with `set_defaults(func=cmd_<name>)`. Import heavy modules inside the command function so that
`--help` stays fast.
"""

from __future__ import annotations

import argparse
import os
import sys


def cmd_zoo_build(args) -> int:
    import time

    from .lab import zoo

    recipes = sorted(zoo.RECIPES) if args.recipe == "all" else [args.recipe]
    # mixtral-tiny first: it is the one most other work depends on
    recipes.sort(key=lambda r: r != "mixtral-tiny")
    for recipe in recipes:
        t0 = time.perf_counter()
        dirs = zoo.build(recipe, small=args.small, data_dir=args.data, cache_dir=args.cache,
                         progress=not args.quiet)
        entry = next(iter(dirs.values())).parent
        print(zoo.format_summary(zoo.load_manifest(entry)))
        print(f"  {entry}  ({time.perf_counter() - t0:.1f} s this run)")
        for name, path in dirs.items():
            print(f"    {name:<14} {path}")
    return 0


def cmd_plan(args) -> int:
    from pathlib import Path

    import torch

    from . import plan as plan_mod
    from .checkpoint import VariantSet

    names = args.names.split(",") if args.names else None
    vs = VariantSet.from_dirs(args.variant_dirs, names=names)
    dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[args.dtype] \
        if args.dtype else None
    if args.non_expert == "auto":
        # the active set plus the staging set a switch copies into
        non_expert = 2 * plan_mod.non_expert_nbytes(vs[args.anchor], dtype)
    else:
        non_expert = plan_mod.parse_size(args.non_expert)
    calib = None
    if args.metric == "output" and args.calib_text:
        calib = plan_mod.calibration_from_text(vs[args.anchor], Path(args.calib_text).read_text(),
                                               max_tokens=args.calib_tokens)
    try:
        plan = plan_mod.make_plan(
            vs, budget_bytes=args.budget, share=args.share, threshold=args.threshold, metric=args.metric,
            scope=args.scope, representative=args.representative, anchor=args.anchor,
            non_expert_bytes=non_expert, offload=args.offload, seed=args.seed, dtype=dtype, calib=calib,
            progress=not args.quiet)
    except plan_mod.PlanError as e:
        print(f"multimoe-rt plan: {e}", file=sys.stderr)
        return 2
    print(plan.summary())
    plan.to_json(args.output)
    print(f"plan written to {args.output}")
    if args.heatmap:
        plan_mod.heatmap(plan, args.heatmap)
        print(f"heatmap written to {args.heatmap}")
    return 0


def _bench_module(name: str):
    """bench/<name>.py from the source tree: the harnesses live with the other benchmarks, not in the package."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "bench" / f"{name}.py"
    if not path.is_file():
        raise SystemExit(f"{path} not found: this command runs from a source checkout (pip install -e .)")
    spec = importlib.util.spec_from_file_location(f"multimoe_rt_bench_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def cmd_eval(args) -> int:
    return _bench_module("quality").run_from_args(args)


def cmd_bench_qos(args) -> int:
    qos = _bench_module("serve_qos")
    out = qos.main_args(args)
    print(f"\nJSON: {out['files']['json']}")
    for k, v in out["files"].items():
        if k != "json":
            print(f"{k}: {v}")
    return 0


def cmd_demo(args) -> int:
    import time

    qos = _bench_module("serve_qos")
    t0 = time.perf_counter()
    print("multimoe-rt demo: 4 fine-tuned variants of one tiny Mixtral-style MoE (trained locally from "
          "shared/data)\nserved four ways under the paper's workload (Poisson arrivals, 20-token prompts, "
          "25 output tokens, batch 1).\n")
    out = qos.main_args(args, tag="demo")
    names = ", ".join(out["variants"])
    part = out["partition_emulation"] or ""
    best = {}
    for x in out["ratios"]:
        best.setdefault(x["baseline"], []).append(f"{x['turnaround_ratio']:.2f}")
    print(f"""
What the table says
  ours        : one process; the experts of {len(out['variants'])} variants ({names}) consolidated into one slab
                of {out['plan']['device_slots']} expert slots instead of {out['plan']['separate_slots']} (sharing \
{100 * out['plan']['sharing_fraction']:.0f}% of the non-anchor experts);
                a variant switch copies only the non-expert weights (attention, norms, router, embeddings),
                prefetched while the previous request runs. Its device footprint is the budget partitioned splits.
  partitioned : MIG-like. {part}
  swap        : one model slot; switching variant copies the whole model, experts included, from host memory.
  resident    : every variant fully loaded side by side: the memory-hungry upper bound.
  TTFT = arrival -> first output token; turnaround = arrival -> last token (queueing included); req/s = completed
  requests per second of the run; 'copied' = bytes moved host->device (switches, expert fetches).
  Mean-turnaround ratio ours/baseline per λ (< 1: ours is faster): """
          + "; ".join(f"{k}: {', '.join(v)}" for k, v in best.items()))
    print(f"\nResults: {out['files']['json']}")
    for k, v in out["files"].items():
        if k != "json":
            print(f"Plot ({k}): {v}")
    print("\nThe same variants served all at once: continuous batching, every variant in one forward "
          "(multimoe_rt.engine), against the batch-1 engine above, per-variant batching and transformers' own "
          "batched generate.\n")
    batching = _bench_module("batching")
    bout = batching.run(batching.zoo_dirs(args.small, len(out["variants"]), not args.quiet), shapes=("paper",),
                        n_sat=64, n_sweep=32, progress=not args.quiet, tag="demo-batching")
    print(batching.table(bout))
    print(f"Results: {bout['files']['json']}\nPlot: {bout['files']['plot']}")
    print(f"(whole demo: {time.perf_counter() - t0:.0f} s; longer sweeps: multimoe-rt bench-qos --help, "
          f"multimoe-rt bench-batch --help)")
    return 0


def cmd_serve(args) -> int:
    from .integrations import server

    return server.main(args)


def _serve_qos_args(p, demo: bool = False) -> None:
    p.add_argument("--small", action="store_true", help="the small mixtral-tiny zoo (builds in under a minute)")
    p.add_argument("--variants", default="base,ptb,shakespeare,pycode", help="zoo variants to serve")
    p.add_argument("--rates", default=None,
                   help="comma-separated arrival rates λ (req/s); default 0.3,0.7,1.1 x the fastest system's service rate")
    p.add_argument("-n", "--requests", type=int, default=30 if demo else 40, help="requests per λ")
    p.add_argument("--share", type=float, default=0.5,
                   help="expert sharing of ours' plan; ours' footprint is the budget partitioned splits")
    p.add_argument("--systems", default="ours,partitioned,swap,resident")
    p.add_argument("--mix", choices=["uniform", "skewed"], default="uniform", help="variant mix of the requests")
    p.add_argument("--affinity", action="store_true", help="also run ours with the variant-affinity policy")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="results folder (default bench/results)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="multimoe-rt", description="Serve several fine-tuned variants of one MoE LLM.")
    sub = p.add_subparsers(dest="command", required=True)

    # ---- zoo: tiny trained variants (multimoe_rt/lab/zoo.py, recipes in lab/recipes/*.json)
    zoo_p = sub.add_parser("zoo", help="tiny trained MoE variants built locally")
    zoo_sub = zoo_p.add_subparsers(dest="zoo_command", required=True)
    b = zoo_sub.add_parser("build", help="train (or reuse from the cache) a zoo recipe and print its summary")
    b.add_argument("--recipe", choices=["mixtral-tiny", "switch-tiny", "all"], default="all")
    b.add_argument("--small", action="store_true", help="the small set used by tests (under a minute)")
    b.add_argument("--data", default=None, help="copy of shared/data (default: $MULTIMOE_DATA or shared/data above)")
    b.add_argument("--cache", default=None, help="cache root (default: $MULTIMOE_CACHE or ~/.cache/multimoe_rt/zoo)")
    b.add_argument("--quiet", action="store_true", help="no progress bars")
    b.set_defaults(func=cmd_zoo_build)

    # ---- plan: expert consolidation (multimoe_rt/plan/)
    pl = sub.add_parser("plan", help="decide which experts the variants share (Algorithm 1); write plan JSON")
    pl.add_argument("variant_dirs", nargs="+", metavar="VARIANT_DIR", help="HF directories, anchor (base) first")
    pl.add_argument("--names", default=None, help="comma-separated variant names (default: directory names)")
    pl.add_argument("--budget", default=None, help="device bytes for slab + non-expert working set: 40GiB, 512MiB, 123456")
    pol = pl.add_mutually_exclusive_group()
    pol.add_argument("--share", type=float, default=None,
                     help="target fraction in [0,1] of non-duplicate entries served by the shared copy")
    pol.add_argument("--threshold", type=float, default=None, help="own copy when distance > X")
    pl.add_argument("--metric", choices=["l2", "cosine", "output", "random"], default="l2")
    pl.add_argument("--scope", choices=["global", "per_layer"], default="global")
    pl.add_argument("--representative", choices=["anchor", "mean"], default="anchor")
    pl.add_argument("--anchor", type=int, default=0, help="index of the anchor variant (default 0)")
    pl.add_argument("--non-expert", default="0",
                    help="non-expert working set counted in the budget: SIZE, or 'auto' (2 x one variant's set)")
    pl.add_argument("--offload", action="store_true", help="experts past the budget go to a host tier")
    pl.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None,
                    help="slab dtype (default: checkpoint dtype)")
    pl.add_argument("--seed", type=int, default=0, help="seed for --metric random and Gaussian calibration")
    pl.add_argument("--calib-text", default=None,
                    help="text file for --metric output (default: Gaussian RMS-1 inputs, labelled in the plan)")
    pl.add_argument("--calib-tokens", type=int, default=512)
    pl.add_argument("-o", "--output", required=True, help="plan JSON path")
    pl.add_argument("--heatmap", default=None, help="PNG of the layout (needs matplotlib)")
    pl.add_argument("--quiet", action="store_true", help="no progress bars")
    pl.set_defaults(func=cmd_plan)

    # ---- eval: output quality vs sharing and vs merging baselines (bench/quality.py)
    ev = sub.add_parser("eval", help="perplexity of consolidated variants vs originals and model-merging baselines")
    ev.add_argument("--recipe", choices=["mixtral-tiny", "switch-tiny", "both"], default="mixtral-tiny",
                    help="zoo recipe to evaluate (built first if not cached: minutes)")
    ev.add_argument("--small", action="store_true", help="the small zoo (for a quick look)")
    ev.add_argument("--variants", nargs="+", default=None, metavar="DIR",
                    help="your own checkpoints instead of the zoo: HF directories, base first (names = dir names)")
    ev.add_argument("--window", type=int, default=None, help="tokens per window (default: the model's context)")
    ev.add_argument("--stride", type=int, default=None, help="window stride (default: the window, no overlap)")
    ev.add_argument("--max-windows", type=int, default=48, help="windows per evaluation set (same for every system)")
    ev.add_argument("--batch-size", type=int, default=16)
    ev.add_argument("--pairs", type=int, default=48, help="Switch: (input, target) pairs per evaluation set")
    ev.add_argument("--seeds", type=int, default=3, help="seeds of the random ranking control")
    ev.add_argument("--out", default="bench/results", help="directory for quality_<label>.json / .png")
    ev.add_argument("--no-plot", action="store_true")
    ev.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ev.add_argument("--cache", default=None, help="zoo cache root (default: $MULTIMOE_CACHE or ~/.cache/multimoe_rt/zoo)")
    ev.add_argument("--quiet", action="store_true", help="no progress output")
    ev.set_defaults(func=cmd_eval)


    # ---- serving QoS benchmark and the demo (multimoe_rt/serve.py, lab/baselines.py, bench/serve_qos.py)
    bb = sub.add_parser("bench-batch", add_help=False, help="continuous batching of mixed variants vs batch-1, "
                        "per-variant batching and transformers (bench/batching.py; its own --help)")
    bb.add_argument("bench_args", nargs=argparse.REMAINDER)
    bb.set_defaults(func=lambda a: _bench_module("batching").main(a.bench_args))

    q = sub.add_parser("bench-qos", help="QoS sweep over arrival rates: ours vs partitioned (MIG-like), swap, resident")
    _serve_qos_args(q)
    q.set_defaults(func=cmd_bench_qos)
    d = sub.add_parser("demo", help="build/reuse the tiny zoo and run a short QoS comparison (about 2-3 minutes)")
    _serve_qos_args(d, demo=True)
    d.set_defaults(func=cmd_demo)

    # ---- serve: OpenAI-compatible HTTP server, variant = model (multimoe_rt/integrations/server.py, ray_serve.py)
    sv = sub.add_parser("serve", help="OpenAI-compatible HTTP server over the batching engine (variant = model)")
    sv.add_argument("variant_dirs", nargs="*", help="checkpoint directories; the first is the base")
    sv.add_argument("--names", default=None, help="comma-separated model names (default: directory names)")
    how = sv.add_mutually_exclusive_group()
    how.add_argument("--plan", default=None, help="plan JSON from `multimoe-rt plan`")
    how.add_argument("--share", type=float, default=None, help="fraction of fine-tuned experts shared with the base")
    how.add_argument("--budget", default=None, help="device bytes for experts, e.g. 30MiB")
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=int, default=8000, help="0 picks a free port (printed when listening)")
    sv.add_argument("--max-batch", type=int, default=64, help="sequences running at once (KV slots)")
    sv.add_argument("--max-queue", type=int, default=4096, help="waiting requests before 429")
    sv.add_argument("--max-len", type=int, default=None, help="context per sequence (default: the model's, <= 2048)")
    sv.add_argument("--max-step-tokens", type=int, default=256, help="token budget of one batched step")
    sv.add_argument("--resident-sets", type=int, default=None, help="non-expert sets on the device (default: all)")
    sv.add_argument("--default-max-tokens", type=int, default=16, help="a completion's max_tokens when not given")
    sv.add_argument("--drain-timeout", type=float, default=30.0, help="seconds SIGTERM lets in-flight requests run")
    sv.add_argument("--device", default="cpu")
    sv.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    sv.add_argument("--log-level", default="info")
    sv.add_argument("--ray", action="store_true", help="Ray Serve: replicas hold variant groups (ray extra)")
    sv.add_argument("--group", action="append", default=None,
                    help="with --ray: a comma-separated variant group (directories); repeat per group")
    sv.add_argument("--replicas", type=int, default=None, help="with --ray: engine replicas (default: one per group)")
    sv.set_defaults(func=cmd_serve)

    # ---- simulate: discrete-event QoS simulator at the paper's scale (bench/simulate.py)
    sm = sub.add_parser("simulate", add_help=False, help="QoS simulator: paper | validate | validate-batching | run "
                                                         "(bench/simulate.py; its own --help)")
    sm.add_argument("sim_args", nargs=argparse.REMAINDER)
    sm.set_defaults(func=lambda a: _bench_module("simulate").main(a.sim_args))

    return p


PASS_THROUGH = {"bench-batch": "batching", "simulate": "simulate"}


def main(argv=None) -> int:
    # Idle OpenMP threads yield instead of spinning: on a shared, loaded machine spinning made each training
    # step ~5x slower with 2 threads. Only effective before torch starts its thread pool (commands import late).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in PASS_THROUGH:  # harnesses with their own parser, --help included
        return _bench_module(PASS_THROUGH[argv[0]]).main(argv[1:]) or 0
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
