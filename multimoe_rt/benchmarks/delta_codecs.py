"""Experts stored as base + compressed delta (sign1, lowrank16/64, int4, lowrank8+sign1) against the same experts
as dense slots: fused_moe time for one variant's batch and for a batch mixing the base and every codec's variant,
at decode sizes and one prefill size (torch backend; triton too on CUDA). ``python bench/moe_kernels.py --only
codecs`` prints and writes the rows; ``gpu_check(device, dry, deadline, log)`` is the GPU check's step 7 (a dry
run uses a tiny layer on whatever device it is given).
"""
from __future__ import annotations

import json
import sys
import time

import torch

from . import results_dir
from .moe_layer import check, make_inputs, make_layer, sync, time_group

# Experts stored as base slot + compressed delta (multimoe_rt.delta) against the same experts as dense slots.
CODEC_SPECS = ("sign1", "lowrank16", "lowrank64", "int4", "lowrank8+sign1")


def random_delta(spec: str, n1: int, H: int, I: int, device, seed: int):
    """An EncodedDelta of ``spec`` with random content at a fine-tune's scale (timing needs the layout, not an
    SVD of a real delta; correctness is checked on whatever the pools hold)."""
    from multimoe_rt.delta import INT4_GROUP, EncodedDelta, canonical_spec, parse_spec

    g = torch.Generator(device).manual_seed(seed)
    enc = EncodedDelta(canonical_spec(spec), ((n1, H), (H, I)))
    for kind, rank in parse_spec(spec):
        parts = []
        for n, k in ((n1, H), (H, I)):
            small = 0.05 / k ** 0.5
            if kind == "sign1":
                parts += [torch.randint(0, 256, (n, -(-k // 8)), generator=g, device=device, dtype=torch.uint8),
                          small * torch.rand(n, generator=g, device=device)]
            elif kind == "int4":
                parts += [torch.randint(0, 256, (n, -(-k // 2)), generator=g, device=device, dtype=torch.uint8),
                          small / 7 * torch.rand(n, -(-k // INT4_GROUP), generator=g, device=device)]
            else:
                root = (small / rank ** 0.5) ** 0.5
                parts += [root * torch.randn(n, rank, generator=g, device=device),
                          root * torch.randn(rank, k, generator=g, device=device)]
        setattr(enc, kind, tuple(parts))
    return enc


def build_codec_slab(layer: dict, specs, device):
    """One slab holding a base (slots [0, E)), for each spec j a variant as own dense copies (slots
    [(1+j)E, (2+j)E)) and the same variant as base + delta of that spec (ids ``delta_ids[j][e]``)."""
    from multimoe_rt.delta import DeltaPools, parse_spec
    from multimoe_rt.slab import ExpertSlab

    E, H, I, gated, dtype = layer["E"], layer["H"], layer["I"], layer["gated"], layer["dtype"]
    n1 = 2 * I if gated else I
    J = len(specs)
    slab = ExpertSlab((1 + J) * E, H, I, gated, dtype, device)
    for e in range(E):
        slab.write(e, layer["w1"][e], layer["w2"][e])
    encs = {(j, e): random_delta(spec, n1, H, I, device, seed=100 * j + e) for j, spec in enumerate(specs)
            for e in range(E)}
    parts = [dict(parse_spec(s)) for s in specs]
    pools = DeltaPools((1 + J) * E, H, I, gated, dtype=dtype, device=device, entries=J * E,
                       sign1=E * sum("sign1" in p for p in parts), int4=E * sum("int4" in p for p in parts),
                       lowrank_units=E * sum(p.get("lowrank", 0) for p in parts))
    delta_ids = [[0] * E for _ in specs]
    for (j, e), enc in encs.items():
        own1, own2 = (w.to(dtype) for w in pools_effective_dense(layer, e, enc, dtype))
        slab.write((1 + j) * E + e, own1, own2)
        delta_ids[j][e] = pools.add(e, enc, sync=False)
    pools.finish()
    slab.attach_deltas(pools)
    sync(torch.device(device))
    return slab, pools, delta_ids


def pools_effective_dense(layer: dict, e: int, enc, dtype):
    """The dense copy of base expert ``e`` plus the decoded delta (what the variant's own slot holds)."""
    d1, d2 = enc.decode(torch.float32)
    return layer["w1"][e].float() + d1, layer["w2"][e].float() + d2


def bench_codecs(name: str, layer: dict, Ms: list[int], device: torch.device, backends: list[str],
                 budget_s: float, specs=CODEC_SPECS, log=print, rows_out: list | None = None,
                 deadline: float | None = None) -> list[dict]:
    """Rows: fused_moe time of experts stored as base + delta of each codec against the same variant's dense
    slots (``vs_dense``: time / dense time, <= 1.3 is the goal at decode), and a batch mixing the base and
    every codec's variant in one call against the same batch on dense slots (``vs_mixed_dense``). On the
    torch backend also the mixed batch with the base matmul once per id instead of once per base slot
    (``mixed-delta:torch:base-per-id``): the measurement behind the torch path's design."""
    from multimoe_rt import ops
    from multimoe_rt.delta import spec_nbytes
    from multimoe_rt.delta_moe import moe_reference_delta, moe_torch_delta

    E, K, gated, dtype = layer["E"], layer["K"], layer["gated"], layer["dtype"]
    n1 = 2 * layer["I"] if gated else layer["I"]
    slab, pools, delta_ids = build_codec_slab(layer, specs, device)
    dense_bytes = slab.slot_nbytes
    itemsize = layer["w1"].element_size()
    did = torch.tensor(delta_ids, device=device)  # [J, E]
    J = len(specs)
    rows_out = [] if rows_out is None else rows_out
    for M in Ms:
        if deadline is not None and time.monotonic() > deadline:
            rows_out.append({"layer": name, "M": M, "impl": "*", "skipped": "out of time"})
            continue
        hidden, topk, weights = make_inputs(layer, M, device)
        var = torch.arange(M, device=device) % (1 + J)  # mixed batch: token t belongs to variant t % (1+J)
        ids = {"dense": E + topk}                        # variant of spec 0 as own dense slots
        for j, spec in enumerate(specs):
            ids[spec] = did[j][topk]
        ids["mixed-dense"] = topk + E * var[:, None]
        ids["mixed-delta"] = torch.where(var[:, None] == 0, topk, did[(var - 1).clamp(min=0)[:, None], topk])
        sample = sorted({0, M - 1, M // 2, *torch.randperm(M, generator=torch.Generator().manual_seed(M))[:4].tolist()})
        cands = {}
        for be in backends:
            ws = slab.workspace(M, K) if be == "triton" else None
            for label, x in ids.items():
                cands[f"{label}:{be}"] = (x, lambda x=x, be=be, ws=ws: ops.fused_moe(
                    hidden, x, weights, slab.w1, slab.w2, gated, backend=be, check_slots=False, workspace=ws,
                    deltas=pools))
            if be == "torch":
                x = ids["mixed-delta"]
                cands["mixed-delta:torch:base-per-id"] = (x, lambda x=x: moe_torch_delta(
                    hidden, x, weights, slab.w1, slab.w2, gated, pools, base_once=False))
        ready, pending = {}, {}
        for label, (x, fn) in cands.items():
            codec = label.split(":")[0]
            row = {"layer": name, "M": M, "phase": "decode" if M <= 64 else "prefill", "impl": label, "codec": codec}
            if codec in specs:
                row["bytes_vs_dense"] = spec_nbytes(codec, n1, layer["H"], layer["I"], itemsize) / dense_bytes
            rows_out.append(row)
            try:
                with torch.inference_mode():
                    out = fn()
                    sync(device)
                    r = torch.tensor(sample, device=device)
                    ref = torch.cat([moe_reference_delta(hidden[i:i + 1], x[i:i + 1], weights[i:i + 1], slab.w1,
                                                         slab.w2, gated, pools) for i in r.tolist()])
                row["rel_err"] = check(f"{name} M={M} {label}", out, ref, sample, dtype)
            except SystemExit as e:
                row["error"] = f"wrong output, not timed: {e}"
                log(f"  {name} M={M:5d} {label:34s} FAILED: {row['error']}")
                continue
            except Exception as e:  # noqa: BLE001
                row["error"] = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]}"
                log(f"  {name} M={M:5d} {label:34s} FAILED: {row['error']}")
                continue
            ready[label], pending[label] = fn, row
        with torch.inference_mode():
            timings = time_group(ready, device, budget_s)
        for label, row in pending.items():
            row.update(timings[label])
        for be in backends:
            dense = pending.get(f"dense:{be}")
            mixed = pending.get(f"mixed-dense:{be}")
            for label, row in pending.items():
                if not label.endswith(f":{be}") and not label.startswith(f"mixed-delta:{be}:"):
                    continue
                if row["codec"] in specs and dense:
                    row["vs_dense"] = row["median_ms"] / dense["median_ms"]
                if row["codec"] == "mixed-delta" and mixed:
                    row["vs_mixed_dense"] = row["median_ms"] / mixed["median_ms"]
        for label, row in pending.items():
            ratio = row.get("vs_dense", row.get("vs_mixed_dense"))
            log(f"  {name} M={M:5d} {label:34s} {row['median_ms']:9.3f} ms" + (f"  {ratio:5.2f}x" if ratio else "")
                + (f"  bytes {row['bytes_vs_dense']:.3f} of dense" if "bytes_vs_dense" in row else ""))
    del slab, pools
    return rows_out


def codec_specs_for(device: torch.device, tiny: bool = False) -> list[tuple[str, dict, list[int]]]:
    """(name, make_layer kwargs, token counts) of the codec rows: decode sizes and one prefill size."""
    if tiny:
        return [("mixtral", dict(H=64, I=96, E=4, K=2, gated=True), [1, 16])]
    if device.type == "cuda":
        return [("mixtral", dict(H=4096, I=14336, E=8, K=2, gated=True), [1, 4, 16, 512])]
    return [("mixtral", dict(H=512, I=1792, E=8, K=2, gated=True), [1, 4, 16, 512])]


def run_codecs(device: torch.device, dtype, specs_, budget_s: float, log=print, backends=None, rows=None,
               deadline: float | None = None) -> list[dict]:
    backends = backends or (["torch", "triton"] if device.type == "cuda" else ["torch"])
    rows = [] if rows is None else rows
    for name, kw, Ms in specs_:
        layer = make_layer(dtype=dtype, device=device, **kw)
        log(f"delta codecs, {name}: H={kw['H']} I={kw['I']} E={kw['E']} top-{kw['K']} "
            f"{str(dtype).replace('torch.', '')} on {device}: {', '.join(CODEC_SPECS)}")
        bench_codecs(name, layer, Ms, device, backends, budget_s, log=log, rows_out=rows, deadline=deadline)
        del layer
    return rows


def main_codecs(device, dtype, info, args) -> int:
    """The delta-codec rows, printed and written to kernels_codecs-<host>.json in the results folder."""
    t0 = time.perf_counter()
    rows = run_codecs(device, dtype, codec_specs_for(device), 0.4 if args.quick else 1.0)
    elapsed = time.perf_counter() - t0
    note = ("vs_dense: time of the experts as base + delta over the same experts as dense slots (one variant's "
            "batch); vs_mixed_dense: a batch of the base and one variant per codec in one call over the same batch "
            "on dense slots. CPU: fp32, torch backend, "
            f"{torch.get_num_threads()} torch thread(s), medians of round-robin repetitions")
    out = results_dir() / f"kernels_codecs-{info['host']}.json"
    if args.out is not None and args.only == "codecs":
        out = args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": info, "device": str(device), "dtype": str(dtype), "codecs": list(CODEC_SPECS),
                               "notes": [note], "elapsed_s": round(elapsed, 1), "rows": rows}, indent=1))
    print(f"wrote {out}  ({elapsed:.0f} s)")
    failed = [r for r in rows if "error" in r]
    if failed:
        print(f"FAILED: {len(failed)} codec row(s): " + "; ".join(
            f"{r['layer']} M={r['M']} {r['impl']}: {r['error'][:120]}" for r in failed), file=sys.stderr)
        return 1
    return 0


def gpu_check(device, dry: bool, deadline: float, log=print) -> dict:
    device = torch.device(device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    backends = ["torch", "triton"] if device.type == "cuda" else ["torch"]
    mono_deadline = time.monotonic() + max(1.0, deadline - time.time())
    rows = run_codecs(device, dtype, codec_specs_for(device, tiny=dry), 0.3 if dry else 0.5, log=log,
                         backends=backends, deadline=mono_deadline)
    decode = [r for r in rows if r.get("phase") == "decode" and "vs_dense" in r]
    worst = max((r["vs_dense"] for r in decode), default=None)
    return {"rows": rows, "dtype": str(dtype), "worst_decode_vs_dense": worst,
            "goal": "delta path <= 1.3x the dense expert time at decode shapes"}
