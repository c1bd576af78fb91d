"""QoS numbers from request timestamps: the paper's TTFT, turnaround and completed requests per second.

A request record is anything with ``arrival``, ``admitted`` (service start), ``first_token``, ``finish``
(``time.perf_counter()`` seconds, None until they happen) and ``error``: the runtime's
``engine.RequestHandle`` and the lane driver's ``lanes.Request`` both are, so "ours" and the baselines are
measured by the same code.
"""

from __future__ import annotations

import numpy as np


def percentile(values, q: float) -> float:
    """Linear-interpolated percentile (numpy's default); NaN for no values."""
    return float(np.percentile(np.asarray(values, dtype=np.float64), q)) if len(values) else float("nan")


def _mean(values) -> float:
    return float(np.mean(values)) if len(values) else float("nan")


def completed(r) -> bool:
    """Finished without an error, after at least one token (a request cancelled before it ran has none)."""
    return r.error is None and r.finish is not None and r.first_token is not None


def summarize(requests, duration: float | None = None) -> dict:
    """QoS numbers of ``requests`` (seconds). Throughput = completed / ``duration``; default duration = last
    finish - first arrival."""
    done = [r for r in requests if completed(r)]
    failed = sum(1 for r in requests if r.error is not None)
    if duration is None and done:
        duration = max(r.finish for r in done) - min(r.arrival for r in requests)
    ttft = [r.first_token - r.arrival for r in done]
    tat = [r.finish - r.arrival for r in done]
    wait = [r.admitted - r.arrival for r in done]
    return {
        "requests": len(requests), "completed": len(done), "failed": failed,
        "ttft_mean": _mean(ttft), "ttft_p50": percentile(ttft, 50), "ttft_p99": percentile(ttft, 99),
        "turnaround_mean": _mean(tat), "turnaround_p50": percentile(tat, 50), "turnaround_p99": percentile(tat, 99),
        "queue_wait_mean": _mean(wait),
        "duration_s": float(duration) if duration is not None else float("nan"),
        "throughput_rps": len(done) / duration if duration else float("nan"),
    }
