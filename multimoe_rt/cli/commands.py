"""The other `multimoe-rt` commands: plan, generate, eval, bench-qos, demo, serve, bench-reliability."""

from __future__ import annotations

import sys
from pathlib import Path

from .args import _distinct_dirs, QOS_SYSTEMS, RESULTS_ENV, ZOO_QOS_VARIANTS, _check_device, _dtype, _existing_dir, _existing_file, _fraction, _out_dir, _pos_int, _rates, _results, _usage
from .zoo import _RECIPES, _zoo_dirs

# ---------------------------------------------------------------- plan

def cmd_plan(args) -> int:
    from .. import plan as plan_mod
    from ..checkpoint import VariantSet

    names = [n.strip() for n in args.names.split(",")] if args.names else None
    _distinct_dirs(args.variant_dirs, names)
    if names is not None and len(names) != len(args.variant_dirs):
        _usage(f"--names gives {len(names)} names for {len(args.variant_dirs)} directories")
    if not 0 <= args.anchor < len(args.variant_dirs):
        _usage(f"--anchor {args.anchor}: give an index in [0, {len(args.variant_dirs)})")
    if args.non_expert != "auto":
        non_expert = _size_or_usage("--non-expert", args.non_expert)
    if args.heatmap is not None:
        from ..plotting import pyplot

        pyplot(required_by="--heatmap")
    vs = VariantSet.from_dirs(args.variant_dirs, names=names, check_finite=not args.no_check_finite)
    dtype = _dtype(args.dtype)
    if args.non_expert == "auto":
        # the active set plus the staging set a switch copies into
        non_expert = 2 * plan_mod.non_expert_nbytes(vs[args.anchor], dtype)
    calib = None
    if args.metric == "output" and args.calib_text:
        calib = plan_mod.calibration_from_text(vs[args.anchor], Path(args.calib_text[0]).read_text(),
                                               max_tokens=args.calib_tokens)
    codecs = None
    if args.codecs:
        from ..plan.mixed import DEFAULT_CODECS
        codecs = list(DEFAULT_CODECS) if args.codecs == "default" else [c.strip() for c in args.codecs.split(",")]
        if args.budget is None or args.share is not None or args.threshold is not None:
            _usage("--codecs (the mixed plan) chooses under --budget: give --budget, and no --share/--threshold")
    costs = None
    if args.metric == "loss" or codecs:
        costs = _measured_costs(args, vs, codecs)
    try:
        plan = plan_mod.make_plan(
            vs, budget_bytes=args.budget, share=args.share, threshold=args.threshold,
            metric="loss" if codecs else args.metric, scope=args.scope, representative=args.representative,
            anchor=args.anchor, non_expert_bytes=non_expert, offload=args.offload, seed=args.seed, dtype=dtype,
            calib=calib, progress=not args.quiet, costs=costs, delta=args.delta, codecs=codecs)
    except plan_mod.PlanError as e:  # the library speaks Python keywords; a CLI user needs the flag
        raise plan_mod.PlanError(str(e).replace("offload=True", "--offload")) from None
    print(plan.summary())
    plan.to_json(args.output)
    print(f"plan written to {args.output}")
    if args.heatmap:
        plan_mod.heatmap(plan, args.heatmap)
        print(f"heatmap written to {args.heatmap}")
    return 0


def _measured_costs(args, vs, codecs):
    """The loss criterion's measurement: from --costs (a plan JSON that holds them), else measured on each
    variant's --calib-text (NAME=FILE, or one FILE for every variant; the zoo's byte tokenizer)."""
    from .. import criterion
    from ..plan.mixed import DEFAULT_CODECS, Costs

    if args.costs:
        import json

        doc = json.loads(Path(args.costs).read_text())
        return Costs.from_dict(doc.get("costs") or doc)
    if not args.calib_text:
        _usage("--metric loss / --codecs measure each variant's loss on its own text: give --calib-text NAME=FILE "
               "per variant (or one FILE for all), or --costs PLAN.json from an earlier run")
    files = {}
    for item in args.calib_text:
        name, eq, path = item.partition("=")
        if eq:
            files[name] = path
        else:
            files.update({n: item for n in vs.names})
    unknown = sorted(set(files) - set(vs.names))
    if unknown:
        _usage(f"--calib-text names {unknown} are not variants ({vs.names})")
    missing = [n for i, n in enumerate(vs.names) if i != args.anchor and n not in files]
    if missing:
        _usage(f"--calib-text: no text for variants {missing}")
    batches = {n: criterion.text_batches(vs[i], Path(files[n]).read_text(), max_tokens=args.calib_tokens)
               for i, n in enumerate(vs.names) if n in files and i != args.anchor}
    return criterion.measure_costs(vs, batches, codecs=codecs or DEFAULT_CODECS, anchor=args.anchor,
                                   progress=not args.quiet, calibration="--calib-text")


def _calib_text(text: str) -> str:
    name, eq, path = text.partition("=")
    _existing_file(path if eq else text)
    return text


def _size_or_usage(flag: str, text: str) -> int:
    from ..plan.common import parse_size

    try:
        return parse_size(text)
    except ValueError as e:
        _usage(f"{flag}: {e}")


# ---------------------------------------------------------------- generate

class _TerminalStreamer:
    """transformers streamer printing new tokens as text as they come (the first put is the prompt, or the
    decoder start ids for seq2seq, and is not printed)."""

    def __init__(self, decode, out=None):
        self.decode, self.out = decode, out or sys.stdout
        self.ids: list[int] = []
        self.printed = ""
        self.puts = 0

    def put(self, value):
        self.puts += 1
        if self.puts == 1:
            return
        self.ids.extend(int(i) for i in value.reshape(-1).tolist())
        text = self.decode(self.ids)
        if text.endswith("\ufffd"):  # half of a multi-byte character: wait for the rest
            return
        self.out.write(text[len(self.printed):])
        self.out.flush()
        self.printed = text

    def end(self):
        text = self.decode(self.ids)
        self.out.write(text[len(self.printed):] + "\n")
        self.out.flush()


def _tokenizer_for(directory: Path):
    """(encode, decode, eos id) of a checkpoint: the zoo's byte tokenizer, else its own tokenizer files."""
    from ..tokenizer import TOKENIZER_FILE, ByteTokenizer

    if (directory / TOKENIZER_FILE).is_file():
        tok = ByteTokenizer.load(directory)
        return tok.encode, tok.decode, tok.eos_id
    if any((directory / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(directory), local_files_only=True, trust_remote_code=False)
        return (lambda text: tok.encode(text)), (lambda ids: tok.decode(ids, skip_special_tokens=True)), \
            tok.eos_token_id
    return None, None, None


def cmd_generate(args) -> int:
    import torch

    device = _check_device(args.device)
    if args.plan is not None and (args.share is not None or args.budget is not None):
        _usage("give --plan or --share/--budget, not both")
    if args.prompt is None and args.prompt_ids is None:
        _usage("give the prompt: --prompt TEXT (or --prompt-ids 1,2,3)")
    ids = None
    if args.prompt_ids is not None:
        try:
            ids = [int(x) for x in args.prompt_ids.split(",") if x.strip()]
        except ValueError:
            _usage(f"--prompt-ids {args.prompt_ids!r}: expected comma-separated token ids, e.g. 1,2,3")
        if not ids:
            _usage("--prompt-ids is empty: give at least one token id")
    if args.variant_dirs:
        dirs = list(args.variant_dirs)
        _distinct_dirs(dirs, args.names)
        names = [n.strip() for n in args.names.split(",")] if args.names else [d.name for d in dirs]
        if len(names) != len(dirs):
            _usage(f"--names gives {len(names)} names for {len(dirs)} directories")
    else:
        zoo_dirs = _zoo_dirs("mixtral-tiny", args.small, quiet=args.quiet)
        names, dirs = list(zoo_dirs), list(zoo_dirs.values())
    variant = args.variant or names[0]
    if variant not in names:
        _usage(f"--variant {variant!r} is not one of the variants {names}")
    encode, decode, eos = _tokenizer_for(Path(dirs[names.index(variant)]))
    if ids is None:
        if encode is None:
            _usage(f"{dirs[names.index(variant)]} has no tokenizer file: pass token ids with --prompt-ids 1,2,3")
        ids = encode(args.prompt)
        if not ids:
            _usage("--prompt is empty")
    if decode is None:
        decode = lambda t: " ".join(map(str, t)) + " "  # noqa: E731

    from .. import from_pretrained

    mv = from_pretrained(dirs, names=names, plan=args.plan, share=args.share, budget=args.budget, device=device,
                         dtype=_dtype(args.dtype) or torch.float32, check_finite=not args.no_check_finite)
    cfg = mv.model.config
    vocab, max_pos = getattr(cfg, "vocab_size", None), getattr(cfg, "max_position_embeddings", None)
    bad = [i for i in ids if vocab is not None and not 0 <= i < vocab]
    if bad:
        _usage(f"prompt token id {bad[0]} is outside the model's vocabulary [0, {vocab})")
    if max_pos and len(ids) + args.max_new_tokens > max_pos:
        _usage(f"prompt ({len(ids)} tokens) + --max-new-tokens {args.max_new_tokens} exceeds the model's "
               f"{max_pos} positions: shorten the prompt or lower --max-new-tokens")
    if args.seed is not None:
        torch.manual_seed(args.seed)
    if not args.quiet:
        print(f"[{variant}] ", end="", flush=True)
    streamer = _TerminalStreamer(decode)
    mv.generate(variant, torch.tensor([ids]), max_new_tokens=args.max_new_tokens,
                eos_token_id=None if args.ignore_eos else eos, do_sample=args.temperature > 0,
                temperature=args.temperature if args.temperature > 0 else 1.0, top_p=args.top_p, streamer=streamer)
    return 0


# ---------------------------------------------------------------- benchmarks

def _bench_module(name: str):
    """The harness ``multimoe_rt.benchmarks.<name>`` (imported on use: they pull in torch and the models)."""
    import importlib

    return importlib.import_module(f"multimoe_rt.benchmarks.{name}")


def cmd_eval(args) -> int:
    args.out = str(_results(args))
    if args.variants:
        for d in args.variants:
            _existing_dir(d)
    return _bench_module("quality").run_from_args(args)


def _qos_inputs(args):
    """Check every serve-QoS argument, then the variants' directories (own, or the zoo, built if needed)."""
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = [s for s in systems if s not in QOS_SYSTEMS]
    if not systems or unknown:
        _usage(f"--systems: {unknown or 'none given'}; choose from {','.join(QOS_SYSTEMS)}")
    device = _check_device(args.device or ("cuda" if _cuda() else "cpu"))
    out = _results(args)
    if args.dirs:
        dirs = {Path(d).name: Path(d) for d in args.dirs}
        if len(dirs) != len(args.dirs):
            _usage("--dirs: two directories have the same name; the directory name is the variant name")
    else:
        dirs = _zoo_dirs(getattr(args, "recipe", None) or "mixtral-tiny", args.small, quiet=args.quiet)
    return _served(dirs, args.variants or (None if args.dirs else ZOO_QOS_VARIANTS)), systems, device, out


def _served(dirs: dict, variants: str | None) -> dict:
    """``dirs`` narrowed to the comma-separated ``variants`` (all when None): at least 2, each one known."""
    if variants:
        want = [v.strip() for v in variants.split(",") if v.strip()]
        missing = [v for v in want if v not in dirs]
        if missing:
            _usage(f"--variants {missing} not among {list(dirs)}")
        dirs = {v: dirs[v] for v in want}
    if len(dirs) < 2:
        _usage(f"serving needs at least 2 variants, got {list(dirs)}")
    return dirs


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def cmd_bench_qos(args) -> int:
    dirs, systems, device, out_dir = _qos_inputs(args)
    qos = _bench_module("qos")
    out = qos.run(dirs, rates=args.rates, n=args.requests, share=args.share, systems=systems, mix=args.mix,
                  seed=args.seed, device=device, affinity=args.affinity, progress=not args.quiet, out_dir=out_dir)
    print(qos.table(out))
    print(f"\nJSON: {out['files']['json']}")
    for k, v in out["files"].items():
        if k != "json":
            print(f"{k}: {v}")
    return 0


def cmd_demo(args) -> int:
    import time

    t0 = time.perf_counter()
    device = _check_device(args.device or ("cuda" if _cuda() else "cpu"))
    out_dir = _results(args)
    from ..lab import data as data_mod

    data_mod.data_dir()  # no data folder: one line now, not after the zoo's 10-minute build
    dirs = _served(_zoo_dirs(args.recipe, args.small, quiet=args.quiet), args.variants)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    demo = _bench_module("demo")
    print(f"multimoe-rt demo: {len(dirs)} fine-tuned variants of one tiny MoE ({', '.join(dirs)}), trained locally "
          f"from shared/data,\nserved live in one engine on the plan that saves the most bytes within 2% "
          f"perplexity, against separate models and transformers.\n", flush=True)
    kw = demo.SMALL if args.small else {}
    out = demo.run(dirs, n_sat=args.requests, n_poisson=max(len(dirs), args.requests // 2), device=device,
                   seed=args.seed, out_dir=out_dir, tag=f"demo_{args.recipe}{'-small' if args.small else ''}",
                   progress=not args.quiet, log=None if args.quiet else print, **kw)
    print("\n" + demo.table(out))
    print(f"\nJSON: {out['files']['json']}\nPlot: {out['files']['plot']}")
    print(f"(whole demo: {time.perf_counter() - t0:.0f} s; the paper's batch-1 QoS comparison against a MIG-like "
          f"partition: multimoe-rt bench-qos --help)")
    return 0


def cmd_serve(args) -> int:
    from ..integrations import runner

    return runner.main(args)


def cmd_bench_reliability(args) -> int:
    rel = _bench_module("reliability")
    out_dir = _results(args)
    return rel.main_args(args, out_dir)


def _qos_args(p) -> None:
    p.add_argument("--small", action="store_true", help="the small zoo (builds in about 15 s)")
    p.add_argument("--recipe", choices=[r for r in _RECIPES if r != "switch-tiny"], default="mixtral-tiny",
                   help="the zoo recipe to serve: a decoder family (default mixtral-tiny)")
    p.add_argument("--dirs", nargs="+", type=_existing_dir, default=None, metavar="DIR",
                   help="your own HF checkpoint directories instead of the zoo, base first (names = dir names)")
    p.add_argument("--variants", default=None,
                   help=f"comma-separated variants to serve (default: {ZOO_QOS_VARIANTS} of the zoo, or every --dirs)")
    p.add_argument("--rates", type=_rates, default=None,
                   help="comma-separated arrival rates λ (req/s, each > 0); default 0.3,0.7,1.1 x the fastest "
                        "system's service rate")
    p.add_argument("-n", "--requests", type=_pos_int, default=40, help="requests per λ")
    p.add_argument("--share", type=_fraction, default=0.5,
                   help="expert sharing of ours' plan, in [0, 1]; ours' footprint is the budget partitioned splits")
    p.add_argument("--systems", default="ours,partitioned,swap,resident")
    p.add_argument("--mix", choices=["uniform", "skewed"], default="uniform", help="variant mix of the requests")
    p.add_argument("--affinity", action="store_true", help="also run ours with the variant-affinity policy")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda when available)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=_out_dir, default=None,
                   help=f"results folder (default ${RESULTS_ENV}, else ~/.cache/multimoe_rt/results)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


