"""The fused CPU delta kernels (csrc/delta_cpu.cpp) against the dense expert and the old materialising path.

    python -m multimoe_rt.benchmarks.delta_kernels [--shapes mid,large] [--dtypes bfloat16,float32] [--reps 7]

For each shape (mid: H=1024, I=2048; large: Mixtral-8x7B's H=4096, I=14336; gated, so w1 is [2I, H] and w2
[H, I]), dtype of x and M tokens, one expert's time (w1 + w2):
- dense: ``x @ W.T`` in that dtype (what a dense own copy costs),
- sign1 / int4: the delta term alone, ``_ext.sign1_matmul`` / ``_ext.int4_matmul`` (fp32 out),
- old: the torch path this replaced (decode the whole delta in x's dtype, then a matmul).
Times are medians over ``reps`` rounds; in each round every candidate runs once, interleaved, so a load
change on a shared machine hits them alike. Packed bits/codes are random (the kernels' cost does not depend
on the values); scales in x's dtype, as DeltaPools stores them. One torch thread unless --threads.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from .. import _ext
from ..delta import INT4_GROUP, int4_decode, sign1_signs
from ..machine import cpu_model

SHAPES = {"mid": (1024, 2048), "large": (4096, 14336)}
MS = (1, 4, 16, 64)


def _matrices(H: int, I: int, dtype, g):
    """Per projection (w1 [2I, H], w2 [H, I]): dense W, sign1 (bits, scale), int4 (codes, scales)."""
    out = []
    for n, k in ((2 * I, H), (H, I)):
        w = (torch.randn(n, k, generator=g) / k ** 0.5).to(dtype)
        bits = torch.randint(0, 256, (n, (k + 7) // 8), dtype=torch.uint8, generator=g)
        scale = (torch.rand(n, generator=g) * 0.01).to(dtype)
        codes = torch.randint(0, 256, (n, (k + 1) // 2), dtype=torch.uint8, generator=g)
        scales = (torch.rand(n, (k + INT4_GROUP - 1) // INT4_GROUP, generator=g) * 0.01).to(dtype)
        out.append((k, w, bits, scale, codes, scales))
    return out


def _candidates(xs, mats, old: bool):
    """name -> thunk running that candidate on both projections."""
    def both(f):
        return lambda: [f(x, *m) for x, m in zip(xs, mats)]

    c = {
        "dense": both(lambda x, k, w, b, s, q, qs: x @ w.T),
        "sign1": both(lambda x, k, w, b, s, q, qs: _ext.sign1_matmul(x, b, s, k)),
        "int4": both(lambda x, k, w, b, s, q, qs: _ext.int4_matmul(x, q, qs, k, INT4_GROUP)),
    }
    if old:
        c["old_sign1"] = both(lambda x, k, w, b, s, q, qs: (x @ sign1_signs(b, k, x.dtype).T).float() * s.float())
        c["old_int4"] = both(lambda x, k, w, b, s, q, qs: (x @ int4_decode(q, qs, k, x.dtype).T).float())
    return c


def run(shapes, dtypes, reps: int, old_ms, log=print) -> list[dict]:
    rows = []
    g = torch.Generator().manual_seed(0)
    for shape in shapes:
        H, I = SHAPES[shape]
        for dtype in dtypes:
            mats = _matrices(H, I, dtype, g)
            for M in MS:
                xs = [torch.randn(M, H, generator=g).to(dtype), torch.randn(M, I, generator=g).to(dtype)]
                cands = _candidates(xs, mats, old=M in old_ms)
                times = {name: [] for name in cands}
                for f in cands.values():  # warm-up: caches, allocator, the kernels' scratch
                    f()
                for _ in range(reps):
                    for name, f in cands.items():
                        t0 = time.perf_counter()
                        f()
                        times[name].append(time.perf_counter() - t0)
                med = {name: statistics.median(v) * 1e3 for name, v in times.items()}
                row = {"shape": shape, "dtype": str(dtype).replace("torch.", ""), "M": M,
                       **{f"{k}_ms": round(v, 4) for k, v in med.items()},
                       "sign1_vs_dense": round(med["sign1"] / med["dense"], 4),
                       "int4_vs_dense": round(med["int4"] / med["dense"], 4)}
                if "old_sign1" in med:
                    row["old_sign1_vs_dense"] = round(med["old_sign1"] / med["dense"], 4)
                    row["old_int4_vs_dense"] = round(med["old_int4"] / med["dense"], 4)
                rows.append(row)
                log(json.dumps(row))
            del mats
    return rows


def table(rows) -> str:
    head = ("| shape | dtype | M | dense ms | sign1 ms | sign1/dense | old sign1/dense | int4 ms | int4/dense "
            "| old int4/dense |\n|---|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        lines.append(f"| {r['shape']} | {r['dtype']} | {r['M']} | {r['dense_ms']:.3f} | {r['sign1_ms']:.3f} | "
                     f"{r['sign1_vs_dense']:.3f} | {r.get('old_sign1_vs_dense', float('nan')):.2f} | "
                     f"{r['int4_ms']:.3f} | {r['int4_vs_dense']:.3f} | {r.get('old_int4_vs_dense', float('nan')):.2f} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default="mid,large")
    p.add_argument("--dtypes", default="bfloat16,float32")
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--large-reps", type=int, default=3, help="rounds at the large shape (seconds per round)")
    p.add_argument("--old-ms", default="1,4,16,64", help="M values that also time the old path (mid shape)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None, help="write rows and the table as JSON here")
    a = p.parse_args(argv)
    if not _ext.has_delta_ops:
        raise SystemExit(f"the fused delta ops are not built: {_ext.reason}")
    torch.set_num_threads(a.threads)
    dtypes = [getattr(torch, d) for d in a.dtypes.split(",")]
    old_ms = {int(m) for m in a.old_ms.split(",") if m}
    rows = []
    for shape in a.shapes.split(","):
        # The old path at the large shape decodes ~0.5 GB per call: time it at M=1 only (its cost barely
        # depends on M).
        rows += run([shape], dtypes, a.large_reps if shape == "large" else a.reps,
                    old_ms if shape != "large" else {1})
    info = {"cpu": cpu_model(), "isa": _ext.delta_cpu_isa(), "threads": a.threads, "torch": torch.__version__,
            "cpu_capability": torch.backends.cpu.get_cpu_capability()}
    print(json.dumps(info))
    print(table(rows))
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"info": info, "rows": rows, "table": table(rows)}, f, indent=1)


if __name__ == "__main__":
    main()
