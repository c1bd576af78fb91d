"""Qwen2-MoE's shared expert: a per-variant non-expert tensor, or always-routed slots in the slab?

    python bench/shared_expert.py [--reps 30] [--variants 4]

A Qwen2-MoE layer adds ``sigmoid(x @ g) * MLP_shared(x)`` to the routed experts. Two ways to serve it:

  A "non-expert": the shared MLP (and its gate) is part of each variant's non-expert set; the batched
    forward runs it as grouped linears per variant segment, beside one fused_moe call for the routed experts.
  B "slab slots": the shared MLP of intermediate size n*I is split along its intermediate axis into n
    experts of size I (exact: down(act(gate x) * up x) is a sum over intermediate units), stored in the slab
    like routed experts, and every token routes to its variant's n shared slots with weight sigmoid(x @ g):
    one fused_moe call with top-k + n.

Measured in one run, one thread, medians of ``--reps``: the MoE layer's time for a decode-sized and a
prefill-sized mixed batch (``--variants`` variants, equal shares), the relative error of each against a
float64 reference, and bytes: device bytes of the shared experts for V variants (A: one copy per resident
set; B: one slot group per distinct shared expert, so frozen or consolidated ones are stored once) and bytes
copied per variant switch (A: the shared expert travels with the non-expert set; B: nothing).
JSON to shared_expert-<host>.json in the results folder.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import time
from pathlib import Path

import torch

from . import RESULTS_HELP, results_dir

from multimoe_rt import ops
from multimoe_rt.forward import grouped_linear
from multimoe_rt.machine import machine_info
from multimoe_rt.torch_moe import apply_activation

# Qwen1.5-MoE-A2.7B's proportions (H 2048, 60 experts of I 1408, top-4, shared 4 x 1408), scaled to a CPU
SHAPE = dict(H=512, I=128, E=16, K=4, n_shared=4)


def build(V: int, g: torch.Generator):
    H, I, E, n = SHAPE["H"], SHAPE["I"], SHAPE["E"], SHAPE["n_shared"]
    s = 0.05
    routed1, routed2 = s * torch.randn(V * E, 2 * I, H, generator=g), s * torch.randn(V * E, H, I, generator=g)
    shared_gu = s * torch.randn(V, 2 * n * I, H, generator=g)     # [gate rows (nI); up rows (nI)]
    shared_down = s * torch.randn(V, H, n * I, generator=g)
    shared_gate = s * torch.randn(V, 1, H, generator=g)
    router = s * torch.randn(V, E, H, generator=g)
    # B: chunk j of variant v = gate rows j, up rows j, down columns j
    chunks1 = torch.stack([torch.cat([shared_gu[v, j * I:(j + 1) * I], shared_gu[v, n * I + j * I:n * I + (j + 1) * I]])
                           for v in range(V) for j in range(n)])
    chunks2 = torch.stack([shared_down[v, :, j * I:(j + 1) * I] for v in range(V) for j in range(n)])
    slab1, slab2 = torch.cat([routed1, chunks1]), torch.cat([routed2, chunks2])
    return dict(routed1=routed1, routed2=routed2, shared_gu=shared_gu, shared_down=shared_down,
                shared_gate=shared_gate, router=router, slab1=slab1, slab2=slab2)


def batch(V: int, T: int, g: torch.Generator, w: dict):
    H, E, K = SHAPE["H"], SHAPE["E"], SHAPE["K"]
    x = torch.randn(T, H, generator=g)
    variant = torch.arange(T) * V // T                       # sorted equal segments
    segments = [(v, int((variant == v).nonzero()[0]), int((variant == v).nonzero()[-1]) + 1) for v in range(V)]
    logits = grouped_linear(x, w["router"], segments)
    probs = torch.softmax(logits, -1)
    top_w, top_ids = torch.topk(probs, K, -1)
    slots = variant[:, None] * E + top_ids
    return x, variant, segments, top_w, slots


def layer_a(x, segments, top_w, slots, w):
    """A: routed experts in one fused_moe, the shared MLP as grouped linears per variant segment."""
    out = ops.fused_moe(x, slots, top_w, w["routed1"], w["routed2"], True, backend="torch", check_slots=False)
    gate = torch.sigmoid(grouped_linear(x, w["shared_gate"], segments))
    a = apply_activation(grouped_linear(x, w["shared_gu"], segments), True, "silu")
    return out + gate * grouped_linear(a, w["shared_down"], segments)


def layer_b(x, variant, segments, top_w, slots, w, V):
    """B: one fused_moe over top-k routed slots + the variant's n always-routed shared slots."""
    E, n = SHAPE["E"], SHAPE["n_shared"]
    gate = torch.sigmoid(grouped_linear(x, w["shared_gate"], segments))       # [T, 1]
    shared_slots = V * E + variant[:, None] * n + torch.arange(n)[None]
    all_slots = torch.cat([slots, shared_slots], 1)
    all_w = torch.cat([top_w, gate.expand(-1, n)], 1)
    return ops.fused_moe(x, all_slots, all_w, w["slab1"], w["slab2"], True, backend="torch", check_slots=False)


def reference(x, variant, top_w, slots, w):
    xd = x.double()
    out = ops.fused_moe(xd, slots, top_w.double(), w["routed1"].double(), w["routed2"].double(), True,
                        backend="reference", check_slots=False).double()
    for t in range(x.shape[0]):
        v = int(variant[t])
        a = apply_activation(xd[t:t + 1] @ w["shared_gu"][v].double().T, True, "silu")
        out[t] += torch.sigmoid(xd[t] @ w["shared_gate"][v, 0].double()) * (a @ w["shared_down"][v].double().T)[0]
    return out


def median_ms(fn, reps):
    fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(ts)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--variants", type=int, default=4)
    ap.add_argument("--out", default=None, help="JSON path (default shared_expert-<host>.json in the results folder)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    V = args.variants
    g = torch.Generator().manual_seed(0)
    w = build(V, g)
    H, I, n = SHAPE["H"], SHAPE["I"], SHAPE["n_shared"]
    rows = []
    for label, T in (("decode", 4 * V), ("prefill", 64 * V)):
        x, variant, segments, top_w, slots = batch(V, T, g, w)
        ref = reference(x, variant, top_w, slots, w)
        out_a, out_b = layer_a(x, segments, top_w, slots, w), layer_b(x, variant, segments, top_w, slots, w, V)
        err = {k: float((o.double() - ref).norm() / ref.norm()) for k, o in (("A", out_a), ("B", out_b))}
        ms_a, ms_b = [], []
        for _ in range(3):  # interleaved rounds, so load drifts hit both alike
            ms_a.append(median_ms(lambda: layer_a(x, segments, top_w, slots, w), args.reps))
            ms_b.append(median_ms(lambda: layer_b(x, variant, segments, top_w, slots, w, V), args.reps))
        rows.append({"batch": label, "tokens": T, "ms_A_non_expert": statistics.median(ms_a),
                     "ms_B_slab_slots": statistics.median(ms_b),
                     "B_over_A": statistics.median(ms_b) / statistics.median(ms_a),
                     "rel_err_A": err["A"], "rel_err_B": err["B"]})
        print(rows[-1])
    shared_bytes = 3 * H * n * I * 4 + H * 4          # fp32, gate_up + down + the gate vector, per variant
    memory = {
        "shared_expert_bytes_per_variant": shared_bytes,
        "A_device_bytes_resident_sets_R": "R x shared (every resident non-expert set holds one, frozen or not)",
        "A_bytes_copied_per_switch": shared_bytes,
        "B_device_bytes": f"distinct shared experts x {3 * H * n * I * 4} (+ gate vector per set); "
                          f"a frozen or consolidated shared expert is stored once",
        "B_bytes_copied_per_switch": H * 4,
    }
    result = {"bench": "shared_expert", "machine": machine_info(), "shape": SHAPE, "variants": V,
              "reps": args.reps, "rows": rows, "memory": memory}
    out = Path(args.out) if args.out else results_dir() / f"shared_expert-{socket.gethostname()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps(memory, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    raise SystemExit(main())
