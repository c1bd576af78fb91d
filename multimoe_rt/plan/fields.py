"""Checks of a plan document's fields: each names the field (``slot_sources[4].variants[0]``) and what it
expected, in a ``PlanError``, so a hand-edited plan fails in one clear line."""

from __future__ import annotations

import math

from .common import PlanError


def _desc(x) -> str:
    """How a JSON value looks, for messages: null, a list of 3, an object, str 'abc', 7."""
    if x is None:
        return "null"
    if isinstance(x, list):
        return f"a list of {len(x)}"
    if isinstance(x, dict):
        return "an object"
    if isinstance(x, str):
        return f"the string {x[:40]!r}"
    return f"{type(x).__name__} {x!r}"


def _fail(name: str, msg: str):
    raise PlanError(f"plan field '{name}': {msg}")


def _int(name: str, x, lo: int | None = None, hi: int | None = None) -> int:
    if isinstance(x, bool) or not isinstance(x, int):
        _fail(name, f"expected an integer, got {_desc(x)}")
    if (lo is not None and x < lo) or (hi is not None and x >= hi):
        _fail(name, f"{x} is outside [{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'})")
    return x


def _str(name: str, x, choices=None) -> str:
    if not isinstance(x, str):
        _fail(name, f"expected a string, got {_desc(x)}")
    if choices is not None and x not in choices:
        _fail(name, f"{x!r} is not one of {list(choices)}")
    return x


def _list(name: str, x, n: int | None = None, what: str = "") -> list:
    if not isinstance(x, list):
        _fail(name, f"expected a list{f' of {n} {what}' if n is not None else ''}, got {_desc(x)}")
    if n is not None and len(x) != n:
        _fail(name, f"expected a list of {n} {what}, got {_desc(x)}")
    return x


def _grid(name: str, x, V: int, L: int, E: int, check) -> None:
    """A [variant][layer][expert] table: shapes named after the fields that fix them."""
    _list(name, x, V, "variants (one per variant_names)")
    for v, row in enumerate(x):
        _list(f"{name}[{v}]", row, L, "layers (num_layers)")
        for l, cells in enumerate(row):
            _list(f"{name}[{v}][{l}]", cells, E, "experts (num_experts)")
            for e, c in enumerate(cells):
                check(f"{name}[{v}][{l}][{e}]", c)


def _finite(name: str, x) -> None:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        _fail(name, f"expected a number, got {_desc(x)}")
    if not math.isfinite(x):
        _fail(name, f"{x} is not finite (NaN/Inf weights? the checkpoints are checked for them by default)")
