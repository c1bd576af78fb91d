"""GPU-check hook for the delta codecs: ``gpu_check(device, dry, deadline, log) -> dict`` (the GPU check's
step 7). The rows come from ``kernels.py``'s codec section (``bench_codecs``): fused_moe time of experts
stored as base + compressed delta (sign1, lowrank16/64, int4, lowrank8+sign1) against the same experts as dense
slots, one variant's batch and a batch mixing the base and every codec's variant, at decode sizes and one
prefill size; triton and torch backends on CUDA. A dry run uses a tiny layer on whatever device it is given.
"""
from __future__ import annotations

import time

import torch

from . import kernels as kb


def gpu_check(device, dry: bool, deadline: float, log=print) -> dict:
    device = torch.device(device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    backends = ["torch", "triton"] if device.type == "cuda" else ["torch"]
    mono_deadline = time.monotonic() + max(1.0, deadline - time.time())
    rows = kb.run_codecs(device, dtype, kb.codec_specs_for(device, tiny=dry), 0.3 if dry else 0.5, log=log,
                         backends=backends, deadline=mono_deadline)
    decode = [r for r in rows if r.get("phase") == "decode" and "vs_dense" in r]
    worst = max((r["vs_dense"] for r in decode), default=None)
    return {"rows": rows, "dtype": str(dtype), "worst_decode_vs_dense": worst,
            "goal": "delta path <= 1.3x the dense expert time at decode shapes"}
