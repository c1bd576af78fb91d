"""What every part of the plan package shares: PlanError, byte sizes, slab dtypes, the policy names, a
progress bar."""

from __future__ import annotations

import math
import re

import torch

from ..errors import PlanError  # defined with the other error classes; re-exported here
from ..families import FAMILIES as _FAMILIES

DTYPE_NAMES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
METRICS = ("l2", "cosine", "output", "random", "loss")
SCOPES = ("global", "per_layer")
REPRESENTATIVES = ("anchor", "mean")
FAMILIES = tuple(_FAMILIES)  # every family adapter (multimoe_rt.families)


_SIZE_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3,
               "gb": 1000**3, "t": 1000**4, "tb": 1000**4, "kib": 1024, "mib": 1024**2,
               "gib": 1024**3, "tib": 1024**4}


def parse_size(text: str | int) -> int:
    """'40GiB' / '512MiB' / '1.5GB' / '123456' -> bytes (int >= 0); PlanError (a ValueError) otherwise."""
    if isinstance(text, bool):
        raise PlanError(f"cannot parse size {text!r}: expected a byte count or a string such as '40GiB'")
    if isinstance(text, int) or (hasattr(text, "__index__") and not isinstance(text, (str, bytes))):
        n = int(text.__index__())
        if n < 0:
            raise PlanError(f"size must be >= 0 bytes, got {n}")
        return n
    if isinstance(text, float):
        if not math.isfinite(text) or text < 0:
            raise PlanError(f"size must be a finite number of bytes >= 0, got {text!r}")
        return int(text)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if m and m.group(2) and not m.group(2).endswith("B"):
        # '30Mb' is megabits to most readers: refuse rather than guess bytes.
        raise PlanError(f"cannot parse size {text!r}: a size counts bytes, with a capital B "
                        f"(KB, MB, GB, TB, KiB, MiB, GiB, TiB), e.g. '{m.group(1)}MiB'")
    if not m or m.group(2).lower() not in _SIZE_UNITS:
        raise PlanError(f"cannot parse size {text!r}: expected a number with an optional unit "
                        f"(B, KB, MB, GB, TB, KiB, MiB, GiB, TiB), e.g. '40GiB'")
    return int(float(m.group(1)) * _SIZE_UNITS[m.group(2).lower()])


def format_size(n: int | float) -> str:
    for unit, scale in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


def to_dtype(name_or_dtype) -> torch.dtype:
    if isinstance(name_or_dtype, torch.dtype):
        return name_or_dtype
    name = str(name_or_dtype).replace("torch.", "")
    if name not in DTYPE_NAMES:
        raise PlanError(f"unsupported slab dtype {name_or_dtype!r}; expected one of {list(DTYPE_NAMES)}")
    return DTYPE_NAMES[name]


def progress_bar(total: int, desc: str, enabled: bool):
    if enabled:
        try:
            from tqdm import tqdm
            return tqdm(total=total, desc=desc)
        except ImportError:
            pass

    class _Null:
        def update(self, n):
            pass

        def close(self):
            pass
    return _Null()
