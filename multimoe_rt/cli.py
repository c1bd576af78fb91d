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
import math
import os
import sys
from pathlib import Path

PROG = "multimoe-rt"
RESULTS_ENV = "MULTIMOE_RESULTS"
QOS_SYSTEMS = ("ours", "partitioned", "swap", "resident")
ZOO_QOS_VARIANTS = "base,ptb,shakespeare,pycode"


def default_results_dir() -> Path:
    """$MULTIMOE_RESULTS, else ~/.cache/multimoe_rt/results."""
    env = os.environ.get(RESULTS_ENV)
    return Path(env) if env else Path.home() / ".cache" / "multimoe_rt" / "results"


# ---------------------------------------------------------------- argument types: checked at parse time

def _type(fn):
    """An argparse type from ``fn``; a ValueError of ``fn`` becomes argparse's one-line error."""
    def parse(text):
        try:
            return fn(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    parse.__name__ = fn.__name__.strip("_")
    return parse


@_type
def _size(text: str) -> int:
    from .plan.common import parse_size  # light: no torch work

    return parse_size(text)


@_type
def _fraction(text: str) -> float:
    x = float(text)
    if not 0.0 <= x <= 1.0:  # also refuses nan
        raise ValueError(f"expected a number in [0, 1], got {text!r}")
    return x


@_type
def _finite(text: str) -> float:
    x = float(text)
    if not math.isfinite(x):
        raise ValueError(f"expected a finite number, got {text!r}")
    return x


@_type
def _positive(text: str) -> float:
    x = float(text)
    if not (math.isfinite(x) and x > 0):
        raise ValueError(f"expected a number > 0, got {text!r}")
    return x


@_type
def _pos_int(text: str) -> int:
    try:
        x = int(text)
    except ValueError:
        raise ValueError(f"expected a whole number >= 1, got {text!r}") from None
    if x < 1:
        raise ValueError(f"expected a whole number >= 1, got {text!r}")
    return x


@_type
def _nonneg_int(text: str) -> int:
    try:
        x = int(text)
    except ValueError:
        raise ValueError(f"expected a whole number >= 0, got {text!r}") from None
    if x < 0:
        raise ValueError(f"expected a whole number >= 0, got {text!r}")
    return x


@_type
def _rates(text: str) -> list[float]:
    out = []
    for part in text.split(","):
        part = part.strip()
        try:
            x = float(part)
        except ValueError:
            raise ValueError(f"{part!r} is not a number: give arrival rates in requests/s, e.g. 2,5,8") from None
        if not (math.isfinite(x) and x > 0):
            raise ValueError(f"arrival rate {part!r} must be > 0 requests/s, e.g. --rates 2,5,8")
        out.append(x)
    return out


@_type
def _existing_dir(text: str) -> Path:
    p = Path(text)
    if not p.exists():
        raise ValueError(f"{text}: no such directory")
    if not p.is_dir():
        raise ValueError(f"{text}: not a directory")
    return p


@_type
def _existing_file(text: str) -> Path:
    p = Path(text)
    if not p.is_file():
        raise ValueError(f"{text}: no such file")
    return p


def _writable_dir_for(path: Path) -> Path:
    """The nearest existing ancestor of ``path``, checked to be a writable directory."""
    p = path.resolve()
    while not p.exists():
        p = p.parent
    if not p.is_dir():
        raise ValueError(f"{path}: {p} is a file, not a folder")
    if not os.access(p, os.W_OK):
        raise ValueError(f"{path}: folder {p} is not writable")
    return p


@_type
def _out_file(text: str) -> Path:
    p = Path(text)
    if p.is_dir():
        raise ValueError(f"{text} is a folder: give a file name, e.g. {Path(text) / 'plan.json'}")
    if not p.parent.is_dir():
        raise ValueError(f"{text}: folder {p.parent} does not exist (create it first: mkdir -p {p.parent})")
    if not os.access(p.parent, os.W_OK):
        raise ValueError(f"{text}: folder {p.parent} is not writable")
    return p


@_type
def _out_dir(text: str) -> Path:
    p = Path(text)
    if p.exists() and not p.is_dir():
        raise ValueError(f"{text} is a file: --out takes a folder")
    _writable_dir_for(p)
    return p


def _usage(msg: str):
    from .errors import UsageError

    raise UsageError(msg)


def _check_device(device: str) -> str:
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        _usage(f"--device {device}: CUDA is not available on this machine; use --device cpu")
    try:
        torch.device(device)
    except RuntimeError:
        _usage(f"--device {device!r} is not a device torch knows (cpu, cuda, cuda:1)")
    return device


def _dtype(name):
    import torch

    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name] if name else None


def _results(args) -> Path:
    out = Path(args.out) if getattr(args, "out", None) else default_results_dir()
    try:
        _writable_dir_for(out)
    except ValueError as e:
        _usage(str(e))
    return out


# ---------------------------------------------------------------- zoo

def _zoo_entry(recipe: str, small: bool, cache=None, data=None) -> Path:
    from .lab import zoo

    return zoo.entry_dir(recipe, small=small, data_dir=data, cache_dir=cache)


def check_zoo_entry(entry: Path) -> str | None:
    """None when a built cache entry reads back whole (manifest, every variant's config and safetensors headers
    against the file sizes), else what is wrong. Cheap: no tensor data is read."""
    import json

    from .checkpoint import CheckpointError, load_variant

    manifest = entry / "manifest.json"
    try:
        doc = json.loads(manifest.read_text())
        variants = doc["variants"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{manifest}: unreadable ({e})"
    sums = doc.get("files_sha256") if isinstance(doc, dict) else None
    if isinstance(sums, dict):  # per-file checksums, where the manifest records them
        import hashlib

        for rel, want in sums.items():
            f = entry / rel
            try:
                got = hashlib.sha256(f.read_bytes()).hexdigest()
            except OSError as e:
                return f"{f}: unreadable ({e.strerror or e})"
            if got != want:
                return f"{f}: checksum differs from the manifest's"
    for name, meta in variants.items():
        d = entry / (meta.get("dir", name) if isinstance(meta, dict) else name)
        try:
            load_variant(d)
        except (CheckpointError, OSError) as e:
            return str(e)
    return None


def _zoo_dirs(recipe: str, small: bool, cache=None, data=None, quiet=False) -> dict:
    """The zoo's directories, built if needed; says where the zoo lives, and refuses a damaged entry with the
    exact path to delete (instead of a traceback in the middle of a benchmark)."""
    from .lab import zoo

    entry = _zoo_entry(recipe, small, cache, data)
    built = (entry / "manifest.json").is_file()
    if built:
        bad = check_zoo_entry(entry)
        if bad is not None:
            _usage(f"the zoo cache entry {entry} is damaged ({bad}); delete it (multimoe-rt zoo clean "
                   f"--entry {entry.name}, or rm -r {entry}) and run again to rebuild it")
    print(f"zoo: {entry}" + ("" if built else f"  (not built yet: training {recipe}"
                             f"{' --small, about 15 s' if small else ', about 10 minutes on 2 cores'})"),
          file=sys.stderr if quiet else sys.stdout, flush=True)
    return zoo.build(recipe, small=small, data_dir=data, cache_dir=cache, progress=not quiet)


def _remove_own_zoo_temp(cache=None) -> list[Path]:
    """Delete the temporary build folders this process left in the zoo cache (after Ctrl-C)."""
    import shutil

    from .lab import zoo

    root = zoo.cache_root(cache)
    gone = []
    if root.is_dir():
        for p in root.glob(f".*.tmp-{os.getpid()}"):
            shutil.rmtree(p, ignore_errors=True)
            gone.append(p)
    return gone


# zoo recipe names (lab/recipes/*.json), read without importing the lab (and torch) to build the parser
_RECIPES = sorted(p.stem for p in (Path(__file__).resolve().parent / "lab" / "recipes").glob("*.json"))


def cmd_zoo_build(args) -> int:
    import time

    from .lab import zoo

    recipes = sorted(zoo.RECIPES) if args.recipe == "all" else [args.recipe]
    # mixtral-tiny first: it is the one most other work depends on
    recipes.sort(key=lambda r: r != "mixtral-tiny")
    for recipe in recipes:
        t0 = time.perf_counter()
        dirs = _zoo_dirs(recipe, args.small, args.cache, args.data, quiet=args.quiet)
        entry = next(iter(dirs.values())).parent
        print(zoo.format_summary(zoo.load_manifest(entry)))
        print(f"  {entry}  ({time.perf_counter() - t0:.1f} s this run)")
        for name, path in dirs.items():
            print(f"    {name:<14} {path}")
    return 0


def _entries(root: Path):
    import re

    pat = re.compile(r"^(?P<recipe>[a-z0-9-]+?)(?P<small>-small)?-(?P<hash>[0-9a-f]{12})$")
    tmp = re.compile(r"^\.(?P<name>.+)\.tmp-(?P<pid>\d+)$")
    if not root.is_dir():
        return [], []
    entries = sorted(p for p in root.iterdir() if p.is_dir() and pat.match(p.name))
    temps = sorted(p for p in root.iterdir() if p.is_dir() and tmp.match(p.name))
    return entries, temps


def _du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def cmd_zoo_list(args) -> int:
    from .lab import zoo
    from .plan.common import format_size

    root = zoo.cache_root(args.cache)
    entries, temps = _entries(root)
    print(f"zoo cache: {root}" + ("" if root.is_dir() else "  (empty: nothing built yet)"))
    for e in entries:
        built = (e / "manifest.json").is_file()
        state = ("ok" if check_zoo_entry(e) is None else "DAMAGED: delete with multimoe-rt zoo clean --entry "
                 f"{e.name}") if built else "incomplete"
        print(f"  {e.name:<36} {format_size(_du(e)):>10}  {state}")
    for t in temps:
        print(f"  {t.name:<36} {format_size(_du(t)):>10}  temporary build folder (multimoe-rt zoo clean removes it)")
    return 0


def cmd_zoo_path(args) -> int:
    from .lab import zoo

    if args.recipe is None:
        print(zoo.cache_root(args.cache))
        return 0
    print(_zoo_entry(args.recipe, args.small, args.cache, args.data))
    return 0


def cmd_zoo_clean(args) -> int:
    import shutil

    from .lab import zoo

    root = zoo.cache_root(args.cache)
    entries, temps = _entries(root)
    doomed = list(temps)  # temporary folders of builds that did not finish
    if args.all:
        doomed += entries
    elif args.entry:
        match = [e for e in entries if e.name == args.entry]
        if not match:
            _usage(f"no zoo entry {args.entry!r} in {root}; `multimoe-rt zoo list` shows the entries")
        doomed += match
    elif args.damaged:
        doomed += [e for e in entries if not (e / "manifest.json").is_file() or check_zoo_entry(e) is not None]
    for p in doomed:
        shutil.rmtree(p)
        print(f"removed {p}")
    if not doomed:
        print(f"nothing to remove in {root}")
    return 0


# ---------------------------------------------------------------- plan

def cmd_plan(args) -> int:
    from . import plan as plan_mod
    from .checkpoint import VariantSet

    names = [n.strip() for n in args.names.split(",")] if args.names else None
    if names is not None and len(names) != len(args.variant_dirs):
        _usage(f"--names gives {len(names)} names for {len(args.variant_dirs)} directories")
    if not 0 <= args.anchor < len(args.variant_dirs):
        _usage(f"--anchor {args.anchor}: give an index in [0, {len(args.variant_dirs)})")
    if args.non_expert != "auto":
        non_expert = _size_or_usage("--non-expert", args.non_expert)
    if args.heatmap is not None:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            _usage("--heatmap needs matplotlib: pip install matplotlib (or drop --heatmap)")
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
        from .plan.mixed import DEFAULT_CODECS
        codecs = list(DEFAULT_CODECS) if args.codecs == "default" else [c.strip() for c in args.codecs.split(",")]
        if args.budget is None or args.share is not None or args.threshold is not None:
            _usage("--codecs (the mixed plan) chooses under --budget: give --budget, and no --share/--threshold")
    costs = None
    if args.metric == "loss" or codecs:
        costs = _measured_costs(args, vs, codecs)
    plan = plan_mod.make_plan(
        vs, budget_bytes=args.budget, share=args.share, threshold=args.threshold,
        metric="loss" if codecs else args.metric, scope=args.scope, representative=args.representative,
        anchor=args.anchor, non_expert_bytes=non_expert, offload=args.offload, seed=args.seed, dtype=dtype,
        calib=calib, progress=not args.quiet, costs=costs, delta=args.delta, codecs=codecs)
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
    from . import criterion
    from .plan.mixed import DEFAULT_CODECS, Costs

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
    from .plan.common import parse_size

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
    from .tokenizer import TOKENIZER_FILE, ByteTokenizer

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

    from . import from_pretrained

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
    """bench/<name>.py from the source tree: the harnesses live with the other benchmarks, not in the package."""
    import importlib.util

    path = Path(__file__).resolve().parent.parent / "bench" / f"{name}.py"
    if not path.is_file():
        _usage(f"{path} not found: `multimoe-rt {name.replace('_', '-')}` runs from a source checkout "
               f"(git clone, then pip install -e .)")
    spec = importlib.util.spec_from_file_location(f"multimoe_rt_bench_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


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
    variants = args.variants or (None if args.dirs else ZOO_QOS_VARIANTS)
    want = [v.strip() for v in variants.split(",") if v.strip()] if variants else None
    if args.dirs:
        dirs = {Path(d).name: Path(d) for d in args.dirs}
        if len(dirs) != len(args.dirs):
            _usage("--dirs: two directories have the same name; the directory name is the variant name")
    else:
        dirs = _zoo_dirs(getattr(args, "recipe", None) or "mixtral-tiny", args.small, quiet=args.quiet)
    if want:
        missing = [v for v in want if v not in dirs]
        if missing:
            _usage(f"--variants {missing} not among {list(dirs)}")
        dirs = {v: dirs[v] for v in want}
    if len(dirs) < 2:
        _usage(f"serving needs at least 2 variants, got {list(dirs)}")
    return dirs, systems, device, out


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _run_qos(args, tag: str) -> dict:
    qos = _bench_module("serve_qos")
    dirs, systems, device, out_dir = _qos_inputs(args)
    out = qos.run(dirs, rates=args.rates, n=args.requests, share=args.share, systems=systems, mix=args.mix,
                  seed=args.seed, device=device, affinity=args.affinity, progress=not args.quiet, out_dir=out_dir,
                  tag=tag)
    print(qos.table(out))
    return out


def cmd_bench_qos(args) -> int:
    out = _run_qos(args, "serve_qos")
    print(f"\nJSON: {out['files']['json']}")
    for k, v in out["files"].items():
        if k != "json":
            print(f"{k}: {v}")
    return 0


def cmd_demo(args) -> int:
    import time

    t0 = time.perf_counter()
    print("multimoe-rt demo: 4 fine-tuned variants of one tiny Mixtral-style MoE (trained locally from "
          "shared/data)\nserved four ways under the paper's workload (Poisson arrivals, 20-token prompts, "
          "25 output tokens, batch 1).\n")
    out = _run_qos(args, "demo")
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
    own = {Path(d).name: Path(d) for d in args.dirs or []}
    bdirs = {v: own[v] for v in out["variants"]} if own else \
        batching.zoo_dirs(args.small, len(out["variants"]), not args.quiet)
    bout = batching.run(bdirs, shapes=("paper",),
                        n_sat=64, n_sweep=32, progress=not args.quiet, tag="demo-batching", out_dir=_results(args))
    print(batching.table(bout))
    print(f"Results: {bout['files']['json']}\nPlot: {bout['files']['plot']}")
    print(f"(whole demo: {time.perf_counter() - t0:.0f} s; longer sweeps: multimoe-rt bench-qos --help, "
          f"multimoe-rt bench-batch --help)")
    return 0


def cmd_serve(args) -> int:
    from .integrations import server

    return server.main(args)


def cmd_bench_reliability(args) -> int:
    rel = _bench_module("reliability")
    out_dir = _results(args)
    return rel.main_args(args, out_dir)


def _serve_qos_args(p, demo: bool = False) -> None:
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
    p.add_argument("-n", "--requests", type=_pos_int, default=30 if demo else 40, help="requests per λ")
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


# ---------------------------------------------------------------- parser

class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: the problem and where to look, no usage block."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _version() -> str:
    from . import __version__

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
                            help="where the zoo lives: the cache root, or a recipe's entry (built or not)")
    zp.add_argument("--recipe", choices=_RECIPES, default=None)
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
    pl.add_argument("variant_dirs", nargs="+", type=_existing_dir, metavar="VARIANT_DIR",
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
    g.add_argument("variant_dirs", nargs="*", type=_existing_dir, metavar="VARIANT_DIR",
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

    # ---- eval: output quality vs sharing and vs merging baselines (bench/quality.py)
    ev = add("eval", help="perplexity of consolidated variants vs originals and model-merging baselines")
    ev.add_argument("--recipe", choices=_RECIPES + ["both", "all"], default="mixtral-tiny",
                    help="zoo recipe to evaluate (built first if not cached: minutes); both = mixtral-tiny and "
                         "switch-tiny, all = every recipe")
    ev.add_argument("--small", action="store_true", help="the small zoo (for a quick look)")
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

    # ---- serving QoS benchmark and the demo (multimoe_rt/serve.py, lab/baselines.py, bench/serve_qos.py)
    bb = add("bench-batch", add_help=False, help="continuous batching of mixed variants vs batch-1, "
             "per-variant batching and transformers (bench/batching.py; its own --help)")
    bb.add_argument("bench_args", nargs=argparse.REMAINDER)
    bb.set_defaults(func=lambda a: _bench_module("batching").main(a.bench_args))

    q = add("bench-qos", help="QoS sweep over arrival rates: ours vs partitioned (MIG-like), swap, resident")
    _serve_qos_args(q)
    q.set_defaults(func=cmd_bench_qos)
    d = add("demo", help="the tiny zoo served four ways under Poisson load: about 10 minutes the first time "
                         "(it trains the zoo on 2 cores; --small: about 15 s), then 2-3 minutes",
            description="Builds (first run: about 10 minutes on 2 cores; --small: about 15 s) or reuses the tiny "
                        "mixtral zoo, prints where it lives, runs a short QoS comparison (2-3 minutes) and prints "
                        "where the results went.")
    _serve_qos_args(d, demo=True)
    d.set_defaults(func=cmd_demo)

    # ---- serve: OpenAI-compatible HTTP server, variant = model (multimoe_rt/integrations/server.py, ray_serve.py)
    sv = add("serve", help="OpenAI-compatible HTTP server over the batching engine (variant = model)")
    from .integrations.serve_cli import add_arguments as serve_arguments   # argparse only: --help stays fast

    serve_arguments(sv)
    sv.set_defaults(func=cmd_serve)

    # ---- reliability: bursts, faults, fuzzing (bench/reliability.py)
    r = add("bench-reliability", help="reliability suite: bursts with bad requests, shutdown, foreign prefetch, "
                                     "injected faults, reader fuzzing, RSS over switches; prints one table")
    r.add_argument("-n", "--requests", type=_pos_int, default=1000, help="requests per burst (default 1000)")
    r.add_argument("--threads", type=_pos_int, default=16, help="client threads of a burst")
    r.add_argument("--switches", type=_pos_int, default=1000, help="switches for the RSS measurement")
    r.add_argument("--fuzz-files", type=_pos_int, default=500, help="mutated safetensors files")
    r.add_argument("--fuzz-plans", type=_pos_int, default=200, help="mutated plans")
    r.add_argument("--full", action="store_true", help="the full mixtral-tiny zoo (default: the small one)")
    r.add_argument("--quick", action="store_true", help="a fast pass: small counts everywhere (what CI runs)")
    r.add_argument("--out", type=_out_dir, default=None,
                   help=f"results folder (default ${RESULTS_ENV}, else ~/.cache/multimoe_rt/results)")
    r.add_argument("--quiet", action="store_true")
    r.set_defaults(func=cmd_bench_reliability)

    # ---- simulate: discrete-event QoS simulator at the paper's scale (bench/simulate.py)
    sm = add("simulate", add_help=False, help="QoS simulator: paper | validate | validate-batching | run "
                                              "(bench/simulate.py; its own --help)")
    sm.add_argument("sim_args", nargs=argparse.REMAINDER)
    sm.set_defaults(func=lambda a: _bench_module("simulate").main(a.sim_args))

    return p


# ---------------------------------------------------------------- main

def _user_error_types() -> tuple:
    from .errors import MultimoeError

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
