"""The CPU linear with bf16 weights (``_ext.lowp_linear``) against torch's bf16 and fp32 matmuls.

    python -m multimoe_rt.benchmarks.lowp_linear [--shapes 4096x1024,1024x2048,8192x1024,28672x4096]
                                                 [--ms 1,4,16,32,64] [--reps 7] [--budget 12] [--json out.json]

For each weight shape [N, K] (mid expert w1/w2, an LM head, Mixtral's w1) and M rows of x, one call of:
- torch_bf16: ``x @ w.T`` with x and w bfloat16 (what serving in bf16 ran),
- torch_fp32: the same values in float32 (w converted once, outside the timing),
- op: ``lowp_linear(x, w)`` with x and w bfloat16, output bfloat16.
Then the torch MoE backend (``torch_moe.moe_torch``, bf16, mid shape H=1024/I=2048, 8 slots, top-2) with the
op off and on. Times are medians over ``reps`` interleaved rounds (a load change on a shared machine hits
every candidate alike); a candidate stops sampling once it has spent ``budget`` seconds (torch's bf16 matmul
at Mixtral's shape takes seconds a call here). One torch thread unless --threads.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from .. import _ext, cpu_linear
from ..machine import cpu_model

SHAPES = "4096x1024,1024x2048,8192x1024,28672x4096"
MS = "1,4,16,32,64"


def _interleaved(cands: dict, reps: int, budget: float) -> dict:
    """name -> (median seconds, samples)."""
    times = {k: [] for k in cands}
    spent = dict.fromkeys(cands, 0.0)
    for f in cands.values():
        f()  # warm-up: allocator, page faults, first-touch of the weights
    for _ in range(reps):
        for name, f in cands.items():
            if times[name] and spent[name] > budget:
                continue
            t0 = time.perf_counter()
            f()
            dt = time.perf_counter() - t0
            times[name].append(dt)
            spent[name] += dt
    return {k: (statistics.median(v), len(v)) for k, v in times.items()}


def bench_linear(shapes, ms, reps, budget):
    rows = []
    g = torch.Generator().manual_seed(0)
    for shape in shapes:
        N, K = shape
        w = (torch.randn(N, K, generator=g) / K ** 0.5).bfloat16()
        wf = w.float()
        for M in ms:
            x = torch.randn(M, K, generator=g).bfloat16()
            xf = x.float()
            cands = {"torch_bf16": lambda: x @ w.T, "torch_fp32": lambda: xf @ wf.T,
                     "op": lambda: _ext.lowp_linear(x, w)}
            r = _interleaved(cands, reps, budget)
            op_s = r["op"][0]
            row = dict(N=N, K=K, M=M, **{f"{k}_ms": v[0] * 1e3 for k, v in r.items()},
                       samples={k: v[1] for k, v in r.items()},
                       bf16_over_op=r["torch_bf16"][0] / op_s, fp32_over_op=r["torch_fp32"][0] / op_s,
                       op_weight_GBps=N * K * 2 / op_s / 1e9, op_GFLOPs=2 * M * N * K / op_s / 1e9)
            rows.append(row)
            print(f"[{N:>5},{K:>4}] M={M:>2}  torch bf16 {row['torch_bf16_ms']:9.3f} ms  torch fp32 "
                  f"{row['torch_fp32_ms']:8.3f} ms  op {op_s * 1e3:8.3f} ms  | bf16/op {row['bf16_over_op']:5.1f}x"
                  f"  fp32/op {row['fp32_over_op']:4.2f}x  | op {row['op_weight_GBps']:5.1f} GB/s of weights, "
                  f"{row['op_GFLOPs']:5.1f} GFLOP/s", flush=True)
    return rows


def bench_moe(tokens, reps, budget, H=1024, I=2048, S=8, K=2):
    from .. import torch_moe

    g = torch.Generator().manual_seed(1)
    w1 = (torch.randn(S, 2 * I, H, generator=g) / H ** 0.5).bfloat16()
    w2 = (torch.randn(S, H, I, generator=g) / I ** 0.5).bfloat16()
    rows = []
    for T in tokens:
        x = torch.randn(T, H, generator=g).bfloat16()
        s = torch.randint(0, S, (T, K), generator=g)
        tw = torch.rand(T, K, generator=g)

        def run(mode):
            def f():
                before, cpu_linear.MODE = cpu_linear.MODE, mode
                try:
                    torch_moe.moe_torch(x, s, tw, w1, w2, True)
                finally:
                    cpu_linear.MODE = before
            return f

        r = _interleaved({"off": run("off"), "on": run("on")}, reps, budget)
        row = dict(T=T, off_ms=r["off"][0] * 1e3, on_ms=r["on"][0] * 1e3, speedup=r["off"][0] / r["on"][0])
        rows.append(row)
        print(f"moe_torch bf16 mid (H={H}, I={I}, {S} slots, top-{K}) T={T:>2}: op off {row['off_ms']:8.2f} ms"
              f"  on {row['on_ms']:7.2f} ms  {row['speedup']:4.1f}x", flush=True)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default=SHAPES)
    ap.add_argument("--ms", default=MS)
    ap.add_argument("--moe-tokens", default="1,4,16")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--budget", type=float, default=12.0, help="seconds a candidate may spend per case")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    if not _ext.has_lowp_linear:
        raise SystemExit(f"no lowp_linear op: {_ext.reason}")
    torch.set_num_threads(a.threads)
    shapes = [tuple(int(v) for v in s.split("x")) for s in a.shapes.split(",") if s]
    ms = [int(m) for m in a.ms.split(",") if m]
    print(f"CPU {cpu_model()}, torch {torch.__version__} ({torch.backends.cpu.get_cpu_capability()}), "
          f"{a.threads} thread(s); cpu_linear picks the op here: "
          f"{cpu_linear.use_op(torch.zeros(1, 8, dtype=torch.bfloat16), torch.zeros(1, 8, dtype=torch.bfloat16))}")
    out = dict(cpu=cpu_model(), torch=torch.__version__, threads=a.threads,
               linear=bench_linear(shapes, ms, a.reps, a.budget),
               moe=bench_moe([int(t) for t in a.moe_tokens.split(",") if t], a.reps, a.budget))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
