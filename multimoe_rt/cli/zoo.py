"""`multimoe-rt zoo build|list|path|clean`: the tiny trained variants in the cache."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from .args import _usage

# ---------------------------------------------------------------- zoo

def _zoo_entry(recipe: str, small: bool, cache=None, data=None) -> Path:
    from ..lab import zoo

    return zoo.entry_dir(recipe, small=small, data_dir=data, cache_dir=cache)


def check_zoo_entry(entry: Path) -> str | None:
    """None when a built cache entry reads back whole (manifest, every variant's config and safetensors headers
    against the file sizes), else what is wrong. Cheap: no tensor data is read."""
    import json

    from ..checkpoint import CheckpointError, load_variant

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
    from ..lab import zoo

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

    from ..lab import zoo

    root = zoo.cache_root(cache)
    gone = []
    if root.is_dir():
        for p in root.glob(f".*.tmp-{os.getpid()}"):
            shutil.rmtree(p, ignore_errors=True)
            gone.append(p)
    return gone


# zoo recipe names (lab/recipes/*.json), read without importing the lab (and torch) to build the parser
_RECIPES = sorted(p.stem for p in (Path(__file__).resolve().parents[1] / "lab" / "recipes").glob("*.json"))


def cmd_zoo_build(args) -> int:
    import time

    from ..lab import zoo

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
    from ..lab import zoo
    from ..plan.common import format_size

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
    from ..lab import zoo

    if args.root:
        print(zoo.cache_root(args.cache))
        return 0
    print(_zoo_entry(args.recipe, args.small, args.cache, args.data))
    return 0


def cmd_zoo_clean(args) -> int:
    import shutil

    from ..lab import zoo

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


