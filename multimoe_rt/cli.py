"""`multimoe-rt` command line.

To add a subcommand: write one `cmd_<name>(args) -> int` function and one parser block in `build_parser()`
that ends with `set_defaults(func=cmd_<name>)`. Import heavy modules inside the command function so that
`--help` stays fast.
"""

from __future__ import annotations

import argparse
import sys


def cmd_zoo_build(args) -> int:
    import time

    from . import zoo

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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="multimoe-rt", description="Serve several fine-tuned variants of one MoE LLM.")
    sub = p.add_subparsers(dest="command", required=True)

    # ---- zoo: tiny trained variants (multimoe_rt/zoo.py)
    zoo_p = sub.add_parser("zoo", help="tiny trained MoE variants built locally")
    zoo_sub = zoo_p.add_subparsers(dest="zoo_command", required=True)
    b = zoo_sub.add_parser("build", help="train (or reuse from the cache) a zoo recipe and print its summary")
    b.add_argument("--recipe", choices=["mixtral-tiny", "switch-tiny", "all"], default="all")
    b.add_argument("--small", action="store_true", help="the small set used by tests (under a minute)")
    b.add_argument("--data", default=None, help="copy of shared/data (default: $MULTIMOE_DATA or shared/data above)")
    b.add_argument("--cache", default=None, help="cache root (default: $MULTIMOE_CACHE or ~/.cache/multimoe_rt/zoo)")
    b.add_argument("--quiet", action="store_true", help="no progress bars")
    b.set_defaults(func=cmd_zoo_build)

    # ---- plan: expert consolidation (multimoe_rt/plan.py)
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

    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
