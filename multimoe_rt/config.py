"""Configuration from the environment, read once per process.

``settings()`` reads the variables the first time it is called and caches them; the hot path (backend
choice, kernel tile configs, interpreter checks) reads the cached values. ``reload()`` re-reads them
(for tests and for programs that change the environment on purpose).

===========================  ==========================================================
``MULTIMOE_BACKEND``         default MoE backend: triton | torch | reference
``TRITON_INTERPRET``         ``1``: run Triton kernels in the CPU interpreter (set before
                             triton is imported; triton reads it once too)
``MULTIMOE_TRITON_CONFIG``   JSON file of tile sizes merged over kernels/configs/default.json
===========================  ==========================================================
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Settings:
    backend: str | None
    triton_interpret: bool
    triton_config: str | None


@functools.cache
def settings() -> Settings:
    env = os.environ
    return Settings(backend=env.get("MULTIMOE_BACKEND") or None,
                    triton_interpret=env.get("TRITON_INTERPRET") == "1",
                    triton_config=env.get("MULTIMOE_TRITON_CONFIG") or None)


def reload() -> Settings:
    """Forget the cached settings and read the environment again."""
    settings.cache_clear()
    return settings()
