"""What this machine can do at best, measured: memory bandwidth (a large copy, read + write bytes per second)
and the rate of a large matmul in a given dtype. The GPU check records them; the synthetic batching bench
divides by them to get a step's roofline time."""

from __future__ import annotations

import torch

from .. import cpu_linear
from .moe_layer import time_group


def measure_ceilings(device: torch.device, dry: bool = False, dtype: torch.dtype | None = None) -> dict:
    """``{copy_GBps, copy_bytes, matmul_TFLOPs, matmul_shape, matmul_dtype}``: bf16 on a GPU, else ``dtype``
    (default float32). A dry run uses small sizes (seconds, numbers meaningless)."""
    device = torch.device(device)
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if device.type == "cuda":
        n, N, budget = 2**29, 8192, 0.15  # 1 GiB of bf16 each way
    elif dry:
        n, N, budget = 2**22, 256, 0.05
    else:
        # Larger than any CPU cache, so the copy measures DRAM; the matmul at a size MKL/oneDNN runs at peak.
        n, N, budget = 2**26, 1024, 0.3
    src = torch.empty(n, dtype=dtype, device=device).normal_()
    dst = torch.empty_like(src)
    t = time_group({"copy": lambda: dst.copy_(src)}, device, budget)["copy"]["median_ms"]
    del src, dst
    # The best of a square matmul and a decode-like one (many weights, few rows) through cpu_linear, the path the
    # runtime takes: on a CPU without native bf16, torch's own bf16 matmul is not what serving runs.
    shapes = [(N, N, N)] + ([] if device.type == "cuda" or dry else [(64, 4096, 4096)])
    rates = {}
    for m, k, n_ in shapes:
        a = torch.randn(m, k, dtype=dtype, device=device)
        b = torch.randn(n_, k, dtype=dtype, device=device)
        mm = (lambda: cpu_linear.linear(a, b)) if device.type == "cpu" else (lambda: a @ b.T)
        mm()
        t_mm = time_group({"mm": mm}, device, budget, min_reps=3)["mm"]["median_ms"]
        rates[(m, k, n_)] = 2 * m * k * n_ / (t_mm / 1e3) / 1e12
        del a, b
    best = max(rates, key=rates.get)
    itemsize = torch.empty((), dtype=dtype).element_size()
    return {"copy_GBps": 2 * n * itemsize / (t / 1e3) / 1e9, "copy_bytes": 2 * n * itemsize,
            "matmul_TFLOPs": rates[best], "matmul_shape": list(best),
            "matmul_TFLOPs_by_shape": {"x".join(map(str, s)): r for s, r in rates.items()},
            "matmul_dtype": str(dtype).replace("torch.", "")}
