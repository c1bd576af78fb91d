"""``x @ w.T`` for CPU decode with bfloat16/float16 weights: the C++ op ``multimoe_rt::lowp_linear`` where
PyTorch's own 16-bit CPU matmul is slow, else torch.

Why: on x86 CPUs without native bf16 matmul (AVX2; no AVX512_BF16 or AMX), torch 2.13's CPU matmul in bf16
runs far below its fp32 rate (AVX2 EPYC, one thread: ``x[32,1024] @ w[4096,1024].T`` 29 ms in bf16 vs 6.4 ms
in fp32), so a bf16 decode step was bound by the library, not by the bytes it reads. The op reads each 16-bit
weight once and widens it in registers (csrc/lowp_linear_cpu.cpp); measured there it is 3x (one row) to 6x
(16..256 rows) faster than torch's bf16/fp16 matmul and as fast as torch's fp32 matmul on the same shape from
16 rows up (``python -m multimoe_rt.benchmarks.lowp_linear``).

The rule (``use_op``): x and w on CPU, w bfloat16/float16, x float32/bfloat16/float16 and 2-D (longer than
``MAX_ROWS`` rows: in blocks of that many), no gradient wanted, the extension has the op, the CPU runs the op's AVX2+FMA+F16C kernel
(x86-64), and the CPU lacks native matmul support for w's dtype (bf16: AVX512_BF16 or AMX-BF16; fp16:
AVX512_FP16 or AMX-FP16), where torch's oneDNN path may well be faster: not measured, so left to torch.
``MULTIMOE_LOWP_LINEAR=off`` always takes torch; ``=on`` drops the native-support check (to measure on such
CPUs).
"""
from __future__ import annotations

import functools
import os
import platform

import torch

from . import _ext

# No crossover against torch's bf16/fp16 matmul was found up to 256 rows (op 5-6x faster at 64..256 rows,
# [4096, 1024], AVX2 EPYC); longer inputs run in blocks of this many rows.
MAX_ROWS = 256
LOWP_DTYPES = (torch.bfloat16, torch.float16)
X_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MODE = os.environ.get("MULTIMOE_LOWP_LINEAR", "auto")  # auto | on | off


def _cpu_flags() -> set[str]:
    """The CPU's feature flags: torch's own table where this torch has one (torch.cpu.get_capabilities, 2.12+),
    else /proc/cpuinfo (Linux)."""
    get = getattr(torch.cpu, "get_capabilities", None)
    if get is not None:
        try:
            caps = get()
            flags = {k for k, v in caps.items() if v is True}
            return flags | ({"fma"} if "fma3" in flags else set())
        except Exception:  # noqa: BLE001 - fall back to the kernel's table
            pass
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


@functools.lru_cache(maxsize=None)
def native_lowp_matmul(dtype: torch.dtype) -> bool:
    """Whether this CPU has matmul instructions for ``dtype`` (where torch's 16-bit path may be fast)."""
    flags = _cpu_flags()
    native = {torch.bfloat16: ("avx512_bf16", "amx_bf16"), torch.float16: ("avx512_fp16", "amx_fp16")}[dtype]
    return any(f in flags for f in native)


@functools.lru_cache(maxsize=None)
def op_has_simd() -> bool:
    """Whether the op runs its AVX2 kernel here: elsewhere it runs scalar loops, slower than torch."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    flags = _cpu_flags()
    return {"avx2", "fma", "f16c"} <= flags


def use_op(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether ``linear(x, w)`` runs the C++ op (the rule in the module docstring)."""
    if MODE == "off" or not _ext.has_lowp_linear:
        return False
    if w.dtype not in LOWP_DTYPES or x.dtype not in X_DTYPES or x.dim() != 2 or w.dim() != 2:
        return False
    if x.device.type != "cpu" or w.device.type != "cpu":
        return False
    if torch.is_grad_enabled() and (x.requires_grad or w.requires_grad):
        return False  # the op has no backward
    if MODE == "on":
        return True
    return op_has_simd() and not native_lowp_matmul(w.dtype)


def linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``x @ w.T`` (x ``[M, K]``, w ``[N, K]``) by the fastest path this machine has for it; in x's dtype either
    way (the op accumulates in float32 and rounds once, as torch's CPU matmul does)."""
    if not use_op(x, w):
        return x @ w.T
    if x.shape[0] <= MAX_ROWS:
        return _ext.lowp_linear(x, w)
    # A prefill: blocks of MAX_ROWS rows, each as fast per row as the op measured (torch's 16-bit path here is
    # 5-6x slower at 256 rows; a 512-token prompt on one variant took it before).
    return torch.cat([_ext.lowp_linear(x[i:i + MAX_ROWS], w) for i in range(0, x.shape[0], MAX_ROWS)])
