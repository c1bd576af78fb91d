"""Checks of request fields at submission, shared by the engine's SamplingParams and the lab's lane driver: each
returns the clean value or raises ``RequestError`` naming the field, so a bad request never reaches a step."""

from __future__ import annotations

import math

import numpy as np
import torch

from .errors import RequestError


def is_int(x) -> bool:
    """A Python, numpy or 0-d integer tensor value, not a bool."""
    if isinstance(x, (bool, np.bool_)):
        return False
    if torch.is_tensor(x):
        return x.dim() == 0 and not x.is_floating_point() and not x.is_complex() and x.dtype != torch.bool
    return isinstance(x, (int, np.integer))


def as_int(name: str, x, lo: int | None = None, hi: int | None = None, what: str = "") -> int:
    if not is_int(x):
        raise RequestError(f"{name} must be an integer{what}, got {type(x).__name__} {x!r}")
    x = int(x)
    if (lo is not None and x < lo) or (hi is not None and x > hi):
        raise RequestError(f"{name} must be an integer in [{lo}, {hi}]{what}, got {x}")
    return x


def as_real(name: str, x) -> float:
    if isinstance(x, (bool, np.bool_)) or not isinstance(x, (int, float, np.integer, np.floating)) \
            or not math.isfinite(float(x)):
        raise RequestError(f"{name} must be a finite number, got {type(x).__name__} {x!r}")
    return float(x)


def as_bool(name: str, x) -> bool:
    if not isinstance(x, (bool, np.bool_)):
        raise RequestError(f"{name} must be True or False, got {type(x).__name__} {x!r}")
    return bool(x)


def as_token_ids(prompt, what: str = "a prompt is a sequence of integer token ids") -> list[int]:
    """A list/tuple of integers, or a 1-D (or ``[1, T]``) integer tensor/array, as a list of ints."""
    if torch.is_tensor(prompt) or isinstance(prompt, np.ndarray):
        arr = prompt
        integral = (not arr.is_floating_point() and not arr.is_complex() and arr.dtype != torch.bool) \
            if torch.is_tensor(arr) else np.issubdtype(arr.dtype, np.integer)
        if not integral or arr.ndim > 2 or (arr.ndim == 2 and arr.shape[0] != 1) or arr.ndim == 0:
            raise RequestError(f"{what}: got a {type(arr).__name__} of dtype {arr.dtype} and shape "
                               f"{tuple(arr.shape)} (expected integers, shape [T] or [1, T])")
        return [int(i) for i in arr.reshape(-1).tolist()]
    if not isinstance(prompt, (list, tuple)):
        raise RequestError(f"{what}, got {type(prompt).__name__} {prompt!r:.60}")
    for k, i in enumerate(prompt):
        if not is_int(i):
            raise RequestError(f"{what}: prompt[{k}] is {type(i).__name__} {i!r:.40}, not an integer")
    return [int(i) for i in prompt]
