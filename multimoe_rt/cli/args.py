"""Argument types and checks of the `multimoe-rt` commands: each returns the clean value or ends in one
line naming the problem (exit status 2)."""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

from ..benchmarks import RESULTS_ENV, results_dir

PROG = "multimoe-rt"
QOS_SYSTEMS = ("ours", "partitioned", "swap", "resident")
ZOO_QOS_VARIANTS = "base,ptb,shakespeare,pycode"


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
    from ..plan.common import parse_size  # light: no torch work

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


def _whole(text: str, lo: int) -> int:
    try:
        x = int(text)
    except ValueError:
        x = lo - 1
    if x < lo:
        raise ValueError(f"expected a whole number >= {lo}, got {text!r}")
    return x


@_type
def _pos_int(text: str) -> int:
    return _whole(text, 1)


@_type
def _nonneg_int(text: str) -> int:
    return _whole(text, 0)


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
    return _existing_dir_check(text)


def _existing_dir_check(text: str) -> Path:
    p = Path(text)
    if not p.exists():
        raise ValueError(f"{text}: no such directory")
    if not p.is_dir():
        raise ValueError(f"{text}: not a directory")
    return p


@_type
def _model_dir(text: str) -> Path:
    """A Hugging Face model directory: it exists and holds a config.json (checked before any tokenizer)."""
    p = _existing_dir_check(text)
    if not (p / "config.json").is_file():
        raise ValueError(f"{text}: no config.json: not a Hugging Face model directory")
    return p


def _distinct_dirs(dirs, names) -> None:
    """The same directory twice is the same variant twice, unless --names tells them apart."""
    seen = {}
    for d in dirs:
        key = Path(d).resolve()
        if key in seen and not names:
            _usage(f"{d} is given twice (also as {seen[key]}): give each variant once, or name the copies with "
                   f"--names a,b,...")
        seen[key] = d


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
    from ..errors import UsageError

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
    out = results_dir(getattr(args, "out", None), create=False)
    try:
        _writable_dir_for(out)
    except ValueError as e:
        _usage(str(e))
    return out


