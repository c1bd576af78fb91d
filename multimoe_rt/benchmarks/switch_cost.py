"""What a variant switch costs: blocking switch vs a forward, and how much a prefetch hides.

    python bench/switch_cost.py [--small] [--share 0.5] [--reps 20]

Per zoo family: non-expert bytes per switch, median time of a blocking ``use(v)`` (copy +
activate), median time of a 20-token forward, and the time ``activate()`` still waits when the
copy was started by ``prefetch`` before that forward (0 = fully hidden). JSON to the results folder.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from . import RESULTS_HELP, results_dir

from multimoe_rt.lab import zoo
from multimoe_rt.machine import machine_info
from multimoe_rt.model import MultiVariantModel



def measure(dirs: dict, share: float, reps: int) -> dict:
    names = list(dirs)[:4]
    mv = MultiVariantModel.from_pretrained([dirs[n] for n in names], names=names, share=share)
    ids = torch.randint(0, 256, (1, 20))
    dec = torch.randint(0, 256, (1, 4)) if mv.family == "switch" else None

    def forward(v):
        mv.forward(v, ids, decoder_input_ids=dec)

    for v in names:  # warm-up: every variant once
        forward(v)
    fwd, blocking, hidden_wait = [], [], []
    for i in range(reps):
        cur, nxt = names[i % len(names)], names[(i + 1) % len(names)]
        mv.use(cur)
        t0 = time.perf_counter()
        forward(cur)
        fwd.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        mv.use(nxt)
        blocking.append(time.perf_counter() - t0)
        mv.use(cur)
        mv.prefetch(nxt)  # Algorithm 2: copy while the current request computes
        forward(cur)
        hidden_wait.append(mv.activate())
    copied = mv.store.stats
    return {
        "family": mv.family, "variants": names, "share": share,
        "non_expert_set_bytes": mv.store.set_nbytes,
        "bytes_copied_per_switch": copied["bytes_copied"] / max(copied["switches"], 1),
        "forward_20_tokens_ms": 1e3 * statistics.median(fwd),
        "blocking_switch_ms": 1e3 * statistics.median(blocking),
        "activate_wait_after_prefetch_ms": 1e3 * statistics.median(hidden_wait),
        "memory": mv.memory_footprint(),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help="use the --small zoo")
    ap.add_argument("--share", type=float, default=0.5)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--out", default=None, help=RESULTS_HELP)
    args = ap.parse_args(argv)
    rows = [measure(zoo.build(recipe, small=args.small), args.share, args.reps)
            for recipe in ("mixtral-tiny", "switch-tiny")]
    info = machine_info()
    print(f"machine: {info['cpu']} x{info['cpu_count']}, torch {info['torch']}, {info['torch_threads']} threads")
    print(f"{'family':8} {'set bytes':>10} {'copied/switch':>13} {'forward ms':>10} {'switch ms':>9} "
          f"{'wait after prefetch ms':>22}")
    for r in rows:
        print(f"{r['family']:8} {r['non_expert_set_bytes']:>10} {r['bytes_copied_per_switch']:>13.0f} "
              f"{r['forward_20_tokens_ms']:>10.2f} {r['blocking_switch_ms']:>9.2f} "
              f"{r['activate_wait_after_prefetch_ms']:>22.3f}")
    out = results_dir(args.out) / f"switch_cost-{info['host']}{'-small' if args.small else ''}.json"
    out.write_text(json.dumps({"machine": info, "results": rows}, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
