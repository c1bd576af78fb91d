"""`multimoe-rt` command line.

To add a subcommand: write one `cmd_<name>(args) -> int` function and one parser block in `build_parser()`
that ends with `set_defaults(func=cmd_<name>)`. Import heavy modules inside the command function so that
`--help` stays fast, and check arguments (argparse `type=` functions below, or `_check_*` at the top of the
command) before any heavy work: loading, planning or training.

User errors (a missing directory, a damaged file, a bad value) print ONE line naming the problem and the fix
and exit with status 2; `--debug` (or MULTIMOE_DEBUG=1) shows the traceback instead. Anything else that goes
wrong is a bug of ours and keeps its traceback.

Results (JSON, PNG) go to one folder: `--out DIR`, else $MULTIMOE_RESULTS, else ~/.cache/multimoe_rt/results
(outside any source tree; pass `--out bench/results` to update a checkout's recorded results).
"""

from __future__ import annotations

import argparse
import os
import sys

from .args import PROG, RESULTS_ENV, _existing_dir, _model_dir, _existing_file, _finite, _fraction, _nonneg_int, _out_dir, _out_file, _pos_int, _size
from .zoo import _RECIPES, _remove_own_zoo_temp, cmd_zoo_build, cmd_zoo_clean, cmd_zoo_list, cmd_zoo_path
from .commands import _bench_module, _calib_text, _qos_args, cmd_bench_qos, cmd_bench_reliability, cmd_demo, cmd_eval, cmd_generate, cmd_plan, cmd_serve

# ---------------------------------------------------------------- parser

class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: the problem and where to look, no usage block."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _version() -> str:
    from .. import __version__

    return f"{PROG} {__version__}"


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show the full traceback of an error (also MULTIMOE_DEBUG=1)")
    p = _Parser(prog=PROG, description="Serve several fine-tuned variants of one MoE LLM.", parents=[common])
    p.add_argument("--version", action="version", version=_version())
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def add(name, **kw):
        return sub.add_parser(name, parents=[common], **kw)

    # ---- zoo: tiny trained variants (multimoe_rt/lab/zoo.py, recipes in lab/recipes/*.json)
    zoo_p = add("zoo", help="tiny trained MoE variants built locally (build, list, path, clean)")
    zoo_sub = zoo_p.add_subparsers(dest="zoo_command", required=True, parser_class=_Parser)
    cache_help = "cache root (default: $MULTIMOE_CACHE or ~/.cache/multimoe_rt/zoo)"
    b = zoo_sub.add_parser("build", parents=[common],
                           help="train (or reuse from the cache) a zoo recipe and print its summary")
    b.add_argument("--recipe", choices=_RECIPES + ["all"], default="all")
    b.add_argument("--small", action="store_true", help="the small set used by tests (under a minute)")
    b.add_argument("--data", type=_existing_dir, default=None,
                   help="copy of shared/data (default: $MULTIMOE_DATA or shared/data above)")
    b.add_argument("--cache", default=None, help=cache_help)
    b.add_argument("--quiet", action="store_true", help="no progress bars")
    b.set_defaults(func=cmd_zoo_build)
    zl = zoo_sub.add_parser("list", parents=[common], help="the cache's entries, sizes and state (ok, damaged)")
    zl.add_argument("--cache", default=None, help=cache_help)
    zl.set_defaults(func=cmd_zoo_list)
    zp = zoo_sub.add_parser("path", parents=[common],
                            help="where a recipe's zoo lives (built or not; default mixtral-tiny), or --root")
    zp.add_argument("--recipe", choices=_RECIPES, default="mixtral-tiny")
    zp.add_argument("--root", action="store_true", help="print the cache root instead of the recipe's entry")
    zp.add_argument("--small", action="store_true")
    zp.add_argument("--data", type=_existing_dir, default=None, help="copy of shared/data")
    zp.add_argument("--cache", default=None, help=cache_help)
    zp.set_defaults(func=cmd_zoo_path)
    zc = zoo_sub.add_parser("clean", parents=[common],
                            help="remove temporary build folders; with --entry/--damaged/--all, entries too")
    zc.add_argument("--cache", default=None, help=cache_help)
    which = zc.add_mutually_exclusive_group()
    which.add_argument("--entry", default=None, help="one entry by name (see `multimoe-rt zoo list`)")
    which.add_argument("--damaged", action="store_true", help="entries that do not read back whole")
    which.add_argument("--all", action="store_true", help="every entry: the zoo is rebuilt on next use")
    zc.set_defaults(func=cmd_zoo_clean)

    # ---- plan: expert consolidation (multimoe_rt/plan/)
    pl = add("plan", help="decide which experts the variants share (Algorithm 1); write plan JSON")
    pl.add_argument("variant_dirs", nargs="+", type=_model_dir, metavar="VARIANT_DIR",
                    help="HF directories, anchor (base) first")
    pl.add_argument("--names", default=None, help="comma-separated variant names (default: directory names)")
    pl.add_argument("--budget", type=_size, default=None,
                    help="device bytes for slab + non-expert working set: 40GiB, 512MiB, 123456")
    pol = pl.add_mutually_exclusive_group()
    pol.add_argument("--share", type=_fraction, default=None,
                     help="target fraction in [0,1] of non-duplicate entries served by the shared copy")
    pol.add_argument("--threshold", type=_finite, default=None, help="own copy when distance > X (a finite number)")
    pl.add_argument("--metric", choices=["l2", "cosine", "output", "random", "loss"], default="l2",
                    help="ranking for own copies; 'loss': the measured calibration-loss cost of sharing each expert "
                         "(needs --calib-text per variant, or --costs)")
    pl.add_argument("--delta", default=None, metavar="SPEC",
                    help="store every entry the policy would share as the shared copy + a compressed delta: sign1, "
                         "lowrank<r>, int4 or a combination such as lowrank8+sign1")
    pl.add_argument("--codecs", default=None, metavar="LIST",
                    help="the mixed plan: per entry share / base + delta (one of these specs, or 'default') / own "
                         "copy, chosen by measured loss under --budget")
    pl.add_argument("--costs", type=_existing_file, default=None,
                    help="reuse the measured costs of an earlier plan JSON (its 'costs') instead of measuring")
    pl.add_argument("--scope", choices=["global", "per_layer"], default="global")
    pl.add_argument("--representative", choices=["anchor", "mean"], default="anchor")
    pl.add_argument("--anchor", type=_nonneg_int, default=0, help="index of the anchor variant (default 0)")
    pl.add_argument("--non-expert", default="0",
                    help="non-expert working set counted in the budget: SIZE, or 'auto' (2 x one variant's set)")
    pl.add_argument("--offload", action="store_true", help="experts past the budget go to a host tier")
    pl.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None,
                    help="slab dtype (default: checkpoint dtype)")
    pl.add_argument("--seed", type=int, default=0, help="seed for --metric random and Gaussian calibration")
    pl.add_argument("--calib-text", type=_calib_text, action="append", default=None, metavar="[NAME=]FILE",
                    help="calibration text: for --metric output one FILE (the anchor's inputs; default: Gaussian "
                         "RMS-1 inputs, labelled in the plan); for --metric loss / --codecs NAME=FILE per variant, "
                         "held apart from evaluation text (repeat the flag), or one FILE for all")
    pl.add_argument("--calib-tokens", type=_pos_int, default=512)
    pl.add_argument("-o", "--output", type=_out_file, required=True, help="plan JSON path")
    pl.add_argument("--heatmap", type=_out_file, default=None, help="PNG of the layout (needs matplotlib)")
    pl.add_argument("--no-check-finite", action="store_true",
                    help="do not refuse NaN/Inf weights (checked by default, as each tensor is read)")
    pl.add_argument("--quiet", action="store_true", help="no progress bars")
    pl.set_defaults(func=cmd_plan)

    # ---- generate: one prompt, one variant, streamed
    g = add("generate", help="generate from one prompt with one variant, streamed to the terminal")
    g.add_argument("variant_dirs", nargs="*", type=_model_dir, metavar="VARIANT_DIR",
                   help="HF directories, base first (default: the mixtral-tiny zoo, built if needed)")
    g.add_argument("-v", "--variant", default=None, help="variant to generate with (default: the first)")
    g.add_argument("-p", "--prompt", default=None, help="prompt text (the checkpoint's tokenizer encodes it)")
    g.add_argument("--prompt-ids", default=None, help="prompt as comma-separated token ids instead of text")
    g.add_argument("-n", "--max-new-tokens", type=_pos_int, default=64)
    g.add_argument("--temperature", type=_finite, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-p", type=_fraction, default=1.0)
    g.add_argument("--ignore-eos", action="store_true", help="always produce --max-new-tokens tokens")
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--names", default=None, help="comma-separated variant names (default: directory names)")
    g.add_argument("--plan", type=_existing_file, default=None, help="a plan JSON from `multimoe-rt plan`")
    g.add_argument("--share", type=_fraction, default=None, help="plan on the fly: expert sharing in [0, 1]")
    g.add_argument("--budget", type=_size, default=None, help="plan on the fly: device byte budget")
    g.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1")
    g.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None)
    g.add_argument("--small", action="store_true", help="with the zoo: the small one (about 15 s to build)")
    g.add_argument("--no-check-finite", action="store_true", help="do not refuse NaN/Inf weights")
    g.add_argument("--quiet", action="store_true")
    g.set_defaults(func=cmd_generate)

    # ---- eval: output quality vs sharing and vs merging baselines (multimoe_rt/benchmarks/quality.py)
    ev = add("eval", help="perplexity of consolidated variants vs originals and model-merging baselines")
    ev.add_argument("--recipe", choices=_RECIPES + ["both", "all"], default="mixtral-tiny",
                    help="zoo recipe to evaluate (built first if not cached: minutes); both = mixtral-tiny and "
                         "switch-tiny, all = every recipe")
    ev.add_argument("--small", action="store_true",
                    help="the small zoo (it builds in ~15 s, but the evaluation grid is the same: every sharing "
                         "level, policy, seed and merge; a session measured over 9 minutes on 2 cores)")
    ev.add_argument("--variants", nargs="+", default=None, metavar="DIR",
                    help="your own checkpoints instead of the zoo: HF directories, base first (names = dir names)")
    ev.add_argument("--window", type=_pos_int, default=None, help="tokens per window (default: the model's context)")
    ev.add_argument("--stride", type=_pos_int, default=None, help="window stride (default: the window, no overlap)")
    ev.add_argument("--max-windows", type=_pos_int, default=48, help="windows per evaluation set (same for every system)")
    ev.add_argument("--batch-size", type=_pos_int, default=16)
    ev.add_argument("--pairs", type=_pos_int, default=48, help="Switch: (input, target) pairs per evaluation set")
    ev.add_argument("--seeds", type=_pos_int, default=3, help="seeds of the random ranking control")
    ev.add_argument("--out", type=_out_dir, default=None,
                    help=f"folder for quality_<label>.json / .png (default ${RESULTS_ENV}, else "
                         f"~/.cache/multimoe_rt/results)")
    ev.add_argument("--no-plot", action="store_true")
    ev.add_argument("--threads", type=_pos_int, default=None, help="torch CPU threads (default: torch's choice)")
    ev.add_argument("--cache", default=None, help=cache_help)
    ev.add_argument("--quiet", action="store_true", help="no progress output")
    ev.set_defaults(func=cmd_eval)

    # ---- the demo: the main job (multimoe_rt/benchmarks/demo.py)
    d = add("demo", help="the zoo's variants live in one engine on the plan that saves the most bytes within 2%%: "
                         "bytes, perplexity, tokens/s and TTFT per variant against separate models and transformers "
                         "(first run trains the zoo: about 10 minutes on 2 cores; then 2-3 minutes; --small: under "
                         "a minute)",
            description="Builds (first run: about 10 minutes on 2 cores, with progress and an estimate; --small: "
                        "about 15 s) or reuses the tiny zoo, measures each expert's cost of sharing and of each delta "
                        "codec, picks the smallest device-byte budget whose every variant stays within 2% of its own "
                        "model's perplexity, serves every variant mixed in one engine against transformers with every "
                        "model resident, and prints per variant: device bytes against a full model, perplexity "
                        "against its own model, tokens/s and TTFT against transformers. One JSON and one PNG in the "
                        "results folder. The paper's batch-1 QoS comparison is `multimoe-rt bench-qos`.")
    d.add_argument("--small", action="store_true", help="the small zoo (builds in about 15 s; the demo then takes "
                                                        "about 15 s more)")
    d.add_argument("--recipe", choices=[r for r in _RECIPES if r != "switch-tiny"], default="mixtral-tiny",
                   help="the zoo recipe: a family the batching engine serves (default mixtral-tiny)")
    d.add_argument("--variants", default=None, help="comma-separated variants to serve (default: every one of the zoo)")
    d.add_argument("-n", "--requests", type=_pos_int, default=64,
                   help="requests queued at once for the throughput run (the Poisson run for TTFT takes half)")
    d.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda when available)")
    d.add_argument("--threads", type=_pos_int, default=None, help="torch CPU threads (default: torch's choice)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--out", type=_out_dir, default=None,
                   help=f"results folder (default ${RESULTS_ENV}, else ~/.cache/multimoe_rt/results)")
    d.add_argument("--quiet", action="store_true", help="no progress output")
    d.set_defaults(func=cmd_demo)

    # ---- batching and QoS benchmarks (multimoe_rt/benchmarks/batching.py, qos.py; lab/qos/)
    bb = add("bench-batch", add_help=False, help="continuous batching of mixed variants vs batch-1, "
             "per-variant batching and transformers (multimoe_rt/benchmarks/batching.py; its own --help)")
    bb.add_argument("bench_args", nargs=argparse.REMAINDER)
    bb.set_defaults(func=lambda a: _bench_module("batching").main(a.bench_args))

    q = add("bench-qos", help="the paper's QoS comparison (batch 1, Poisson arrivals, 20-token prompts, 25 new "
                              "tokens): ours vs partitioned (MIG-like), swap, resident, over arrival rates")
    _qos_args(q)
    q.set_defaults(func=cmd_bench_qos)

    # ---- serve: OpenAI-compatible HTTP server, variant = model (multimoe_rt/integrations/server.py, ray_serve.py)
    sv = add("serve", help="OpenAI-compatible HTTP server over the batching engine (variant = model)")
    from ..integrations.server_args import add_arguments as serve_arguments   # argparse only: --help stays fast

    serve_arguments(sv)
    sv.set_defaults(func=cmd_serve)

    # ---- reliability: bursts, faults, fuzzing (multimoe_rt/benchmarks/reliability.py)
    r = add("bench-reliability", help="reliability suite: bursts with bad requests, shutdown, a foreign thread submitting and "
                                     "cancelling, injected faults, reader fuzzing, RSS over set reloads; prints one table")
    r.add_argument("-n", "--requests", type=_pos_int, default=1000, help="requests per burst (default 1000)")
    r.add_argument("--threads", type=_pos_int, default=16, help="client threads of a burst")
    r.add_argument("--switches", type=_pos_int, default=1000, help="weight-set reloads for the RSS measurement")
    r.add_argument("--fuzz-files", type=_pos_int, default=500, help="mutated safetensors files")
    r.add_argument("--fuzz-plans", type=_pos_int, default=200, help="mutated plans")
    r.add_argument("--full", action="store_true", help="the full mixtral-tiny zoo (default: the small one)")
    r.add_argument("--quick", action="store_true", help="a fast pass: small counts everywhere (what CI runs)")
    r.add_argument("--out", type=_out_dir, default=None,
                   help=f"results folder (default ${RESULTS_ENV}, else ~/.cache/multimoe_rt/results)")
    r.add_argument("--quiet", action="store_true")
    r.set_defaults(func=cmd_bench_reliability)

    # ---- simulate: discrete-event QoS simulator at the paper's scale (multimoe_rt/benchmarks/simulate.py)
    sm = add("simulate", add_help=False, help="QoS simulator: paper | validate | validate-batching | run "
                                              "(multimoe_rt/benchmarks/simulate.py; its own --help)")
    sm.add_argument("sim_args", nargs=argparse.REMAINDER)
    sm.set_defaults(func=lambda a: _bench_module("simulate").main(a.sim_args))

    return p


# ---------------------------------------------------------------- main

def _user_error_types() -> tuple:
    from ..errors import MultimoeError

    types = [MultimoeError, OSError]
    for mod, name in (("multimoe_rt.lab.data", "DataError"), ("multimoe_rt.lab.zoo", "ZooError")):
        m = sys.modules.get(mod)
        if m is not None:
            types.append(getattr(m, name))
    return tuple(types)


def _one_line(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror and e.filename:
        text = f"{e.filename}: {e.strerror}"
    else:
        text = str(e) or type(e).__name__
    if isinstance(e, KeyError) and type(e).__str__ is KeyError.__str__:
        text = text.strip("'\"")
    return " ".join(text.split())


PASS_THROUGH = {"bench-batch": "batching", "simulate": "simulate"}


def main(argv=None) -> int:
    # Idle OpenMP threads yield instead of spinning: on a shared, loaded machine spinning made each training
    # step ~5x slower with 2 threads. Only effective before torch starts its thread pool (commands import late).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in PASS_THROUGH:  # harnesses with their own parser, --help included
        return _bench_module(PASS_THROUGH[argv[0]]).main(argv[1:]) or 0
    args = build_parser().parse_args(argv)
    debug = getattr(args, "debug", False) or os.environ.get("MULTIMOE_DEBUG", "") not in ("", "0")
    prog = f"{PROG} {args.command}"
    try:
        return args.func(args)
    except KeyboardInterrupt:
        gone = _remove_own_zoo_temp(getattr(args, "cache", None))
        if debug:
            raise
        print(f"{prog}: interrupted" + (f"; removed the unfinished zoo build {gone[0]}" if gone else ""),
              file=sys.stderr)
        return 130
    except SystemExit as e:
        if isinstance(e.code, str) and not debug:  # a harness's own one-line message
            print(f"{prog}: error: {_one_line(Exception(e.code))}", file=sys.stderr)
            return 2
        raise
    except Exception as e:
        if debug or not isinstance(e, _user_error_types()):
            raise
        print(f"{prog}: error: {_one_line(e)}  (--debug shows the traceback)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
