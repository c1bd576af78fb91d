"""Decode-step time of the batched forward: B sequences spread over 4 variants against B of one variant.

Random weights at a Mixtral-like shape built in memory (no checkpoint files), so it runs in seconds on a
bare machine; ``gpu_check`` is the hook ``bench/gpu_check.py`` calls (step 6_batched_forward).

    python -m multimoe_rt.benchmarks.batched_forward [--dry-run]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from multimoe_rt.forward import BatchedMixtral, BatchEntry
from multimoe_rt.kv_cache import KVCache
from multimoe_rt.slab import ExpertSlab, SlotTable
from multimoe_rt.weights import VariantWeights, mixtral_tensor_names

# A Mixtral-8x7B layer at a quarter of its width (bf16 on GPU), two layers, a smaller vocabulary; tiny on CPU.
GPU_SHAPE = dict(hidden_size=1024, intermediate_size=3584, num_hidden_layers=2, num_attention_heads=8,
                 num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2, vocab_size=8192)
CPU_SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2, vocab_size=512)


def build(shape: dict, variants: int, max_seqs: int, ctx: int, device, dtype) -> BatchedMixtral:
    H, I, L, E = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"], shape["num_local_experts"]
    nh, nkv, V = shape["num_attention_heads"], shape["num_key_value_heads"], shape["vocab_size"]
    d = H // nh
    g = torch.Generator().manual_seed(0)
    sizes = {"embed": (V, H), "norm": (H,), "lm_head": (V, H)}
    for i in range(L):
        sizes.update({f"{i}.ln1": (H,), f"{i}.qkv": ((nh + 2 * nkv) * d, H), f"{i}.o": (H, nh * d),
                      f"{i}.ln2": (H,), f"{i}.router": (E, H)})
    assert set(sizes) == set(mixtral_tensor_names(L, tied=False))
    host = [{k: torch.randn(s, generator=g) * (1.0 if len(s) == 1 else s[-1] ** -0.5) for k, s in sizes.items()}
            for _ in range(variants)]
    weights = VariantWeights([f"v{i}" for i in range(variants)], host, variants, device=device, dtype=dtype)
    for v in range(variants):
        weights.start_load(v, set())
    weights.wait_loads()
    assert all(err is None for _, err in weights.poll())
    slab = ExpertSlab(variants * E, H, I, gated=True, dtype=dtype, device=device)
    gd = torch.Generator(device=slab.device).manual_seed(1)  # generated in place: no host-side GBs
    for w, fan_in in ((slab.w1, H), (slab.w2, I)):
        w.copy_(torch.randn(w.shape, generator=gd, device=slab.device, dtype=dtype).mul_(fan_in ** -0.5))
    slab.written[:] = True
    table = SlotTable(variants, L, E, device=device)
    table.slots.copy_(torch.arange(variants * L * E).view(variants, L, E) % (variants * E))
    kv = KVCache(L, max_seqs, ctx + 8, nkv, d, dtype=dtype, device=device)
    return BatchedMixtral(dict(shape, model_type="mixtral"), weights, slab, table, kv)


def step_ms(model: BatchedMixtral, batch_size: int, variants: int, ctx: int, reps: int) -> float:
    res = model.weights.resident()
    entries = sorted((BatchEntry(res[i % variants], i % variants, i, [7], ctx) for i in range(batch_size)),
                     key=lambda e: e.set)
    batch = model.batch(entries)
    cuda = model.slab.device.type == "cuda"
    for _ in range(2):
        model.forward(batch)
    times = []
    for _ in range(reps):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        model.forward(batch)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def run(device, dry: bool, deadline: float | None = None, log=print, sizes=(1, 16, 64, 256)) -> dict:
    cuda = torch.device(device).type == "cuda"
    shape = CPU_SHAPE if dry or not cuda else GPU_SHAPE
    dtype = torch.bfloat16 if cuda else torch.float32
    ctx, variants = 128, 4
    model = build(shape, variants, max(sizes), ctx, device, dtype)
    rows = []
    for b in sizes:
        if deadline is not None and time.time() > deadline:
            rows.append({"batch": b, "skipped": "time limit"})
            continue
        row = {"batch": b}
        for label, nv in (("mixed_4_variants", variants), ("one_variant", 1)):
            row[f"{label}_ms"] = step_ms(model, b, nv, ctx, reps=3 if dry else 20)
        row["mixed_over_one"] = row["mixed_4_variants_ms"] / row["one_variant_ms"]
        row["mixed_tokens_per_s"] = 1e3 * b / row["mixed_4_variants_ms"]
        log(f"  decode step, {b:>3} sequences, context {ctx}: 4 variants {row['mixed_4_variants_ms']:.3f} ms, "
            f"one variant {row['one_variant_ms']:.3f} ms ({row['mixed_over_one']:.2f}x)")
        rows.append(row)
    return {"shape": shape, "dtype": str(dtype), "context": ctx, "backend": model.backend, "rows": rows,
            "device_bytes": {"slab": model.slab.nbytes, "non_expert_sets": model.weights.device_nbytes,
                             "kv_cache": model.kv.nbytes}}


def gpu_check(device, dry, deadline, log) -> dict:
    return run(device, dry, deadline, log)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dry-run", action="store_true", help="tiny shape on CPU")
    p.add_argument("--sizes", default="1,16,64,256")
    args = p.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() and not args.dry_run else "cpu"
    out = run(device, args.dry_run or device == "cpu", sizes=[int(x) for x in args.sizes.split(",")])
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
