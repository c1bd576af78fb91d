"""Kernel benchmark: our fused MoE op against the experts implementations transformers itself offers.

    python bench/moe_kernels.py [--quick] [--out PATH]

Layers (same random weights and routing for every implementation in one run):
  * Mixtral-like: SwiGLU, top-2, 8 experts. CPU: H=512, I=1792 (scaled down to fit 2 shared cores);
    GPU: Mixtral-8x7B, H=4096, I=14336, bf16.
  * Switch-like: ReLU, top-1, 8 experts. CPU: H=256, I=1024; GPU: Switch-base-8, H=768, I=3072, bf16.
Token counts: decode M = 1, 4, 16; prefill M = 512, 2048 (CPU: 512 only with --quick).

Implementations timed:
  * ours, per backend: ``torch`` (pure PyTorch) everywhere; ``triton`` only on CUDA (on CPU the
    Triton interpreter is a correctness path, not a speed path, so it is listed as not timed);
    each on a plain stacked expert tensor ("plain") and through the expert slab + slot table
    ("slab": table.resolve + op on a slab holding two variants), which measures the indirection cost.
  * transformers: ``MixtralExperts`` instantiated from a MixtralConfig holding the same weights, with
    ``config._experts_implementation`` set to each of eager / batched_mm / grouped_mm (the way
    transformers dispatches them); ``SwitchTransformersExperts`` (eager only: it has no experts interface).
Before timing, every output is checked against the float64 reference (multimoe_rt.torch_moe.moe_reference)
on a sample of token rows (token outputs are independent, and the full reference needs T*K gathered expert
copies in float64); a wrong output aborts the run. Medians over repetitions after a warmup
(perf_counter on CPU, triton.testing.do_bench on GPU). Ratios are time / best transformers time (<1 = faster).
On GPU the rows also carry achieved GB/s (decode: bytes of the experts touched) and TFLOP/s (prefill)
and their fraction of the measured device ceilings (D2D copy bandwidth, large bf16 matmul).
JSON goes to kernels-<host>.json in the results folder (or --out).
A training step of each family through transformers (experts_implementation="multimoe" against eager and
grouped_mm) is ``python -m multimoe_rt.benchmarks.train_step``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from . import results_dir
from .moe_layer import check, make_inputs, make_layer, sync, time_group

if not torch.cuda.is_available():
    # Lets the test-only Triton CPU path import; this script never times it on CPU. Set before multimoe_rt
    # is imported: importing it imports triton, which reads TRITON_INTERPRET when kernels are defined.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from multimoe_rt.machine import machine_info as _machine_info  # noqa: E402

if os.environ.get("TRITON_INTERPRET") == "1":
    from multimoe_rt._triton_compat import apply_interpreter_shim

    apply_interpreter_shim()  # triton < 3.8 with numpy >= 2.4

HF_IMPLS = ("eager", "batched_mm", "grouped_mm")


# ---------------------------------------------------------------------------------------- machine
def machine_info() -> dict:
    info = _machine_info()
    info["grouped_mm_available"] = hasattr(torch.nn.functional, "grouped_mm") or hasattr(torch, "_grouped_mm")
    return info


# ---------------------------------------------------------------------------------------- layers
def build_slab(layer: dict, device):
    """A slab holding two variants of the layer: variant 0 = other weights in slots [0, E), variant 1 =
    the benchmark weights in slots [E, 2E). Timing variant 1 goes through the table like serving does."""
    from multimoe_rt.slab import ExpertSlab, SlotTable

    E = layer["E"]
    slab = ExpertSlab(2 * E, layer["H"], layer["I"], layer["gated"], layer["dtype"], device)
    table = SlotTable(2, 1, E, device)
    other = make_layer(layer["H"], layer["I"], E, layer["K"], layer["gated"], layer["dtype"], device, seed=7)
    for e in range(E):
        slab.write(e, other["w1"][e], other["w2"][e])
        slab.write(E + e, layer["w1"][e], layer["w2"][e])
        table.set(0, 0, e, e)
        table.set(1, 0, e, E + e)
    del other
    sync(torch.device(device))
    table.validate(slab)
    return slab, table


def hf_mixtral_experts(layer: dict, impl: str):
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts

    config = MixtralConfig(hidden_size=layer["H"], intermediate_size=layer["I"], num_local_experts=layer["E"],
                           num_experts_per_tok=layer["K"], hidden_act="silu")
    config._experts_implementation = impl
    with torch.device("meta"):  # no throwaway allocation of the empty parameters
        mod = MixtralExperts(config)
    mod.gate_up_proj = torch.nn.Parameter(layer["w1"], requires_grad=False)  # the same storage, no copy
    mod.down_proj = torch.nn.Parameter(layer["w2"], requires_grad=False)
    return mod.eval()


def hf_switch_experts(layer: dict):
    from transformers import SwitchTransformersConfig
    from transformers.models.switch_transformers.modeling_switch_transformers import SwitchTransformersExperts

    config = SwitchTransformersConfig(d_model=layer["H"], d_ff=layer["I"], num_experts=layer["E"],
                                      dense_act_fn="relu", dropout_rate=0.0)
    with torch.device("meta"):
        mod = SwitchTransformersExperts(config)
    for e in range(layer["E"]):
        mod[f"expert_{e}"].wi.weight = torch.nn.Parameter(layer["w1"][e], requires_grad=False)
        mod[f"expert_{e}"].wo.weight = torch.nn.Parameter(layer["w2"][e], requires_grad=False)
    return mod.eval()


def batched_mm_bytes(layer: dict, M: int) -> int:
    """batched_mm gathers one full expert copy per token-expert pair."""
    n1 = 2 * layer["I"] if layer["gated"] else layer["I"]
    return M * layer["K"] * (n1 + layer["I"]) * layer["H"] * layer["w1"].element_size()


def memory_limit_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * 0.5)
    try:
        avail_kb = int(next(l for l in Path("/proc/meminfo").read_text().splitlines()
                            if l.startswith("MemAvailable")).split()[1])
        return min(avail_kb * 1024 // 4, 2 * 2**30)  # a shared machine: stay well clear
    except (OSError, StopIteration):
        return 2 * 2**30


# ---------------------------------------------------------------------------------------- correctness
def reference_rows(layer: dict, hidden, ids, weights, rows: list[int], chunk: int) -> torch.Tensor:
    from multimoe_rt.torch_moe import moe_reference

    outs = []
    for i in range(0, len(rows), chunk):
        r = torch.tensor(rows[i:i + chunk], device=hidden.device)
        outs.append(moe_reference(hidden[r], ids[r], weights[r], layer["w1"], layer["w2"], layer["gated"]))
    return torch.cat(outs)


# ---------------------------------------------------------------------------------------- bench
def bench_layer(name: str, layer: dict, Ms: list[int], device: torch.device, backends: list[str],
                budget_s: float, ceilings: dict | None = None, log=print, rows_out: list | None = None,
                deadline: float | None = None) -> list[dict]:
    """Rows for one layer, appended to rows_out as they are made (a caller killed at its time limit keeps
    the finished ones). A row of ours that raises or is wrong gets "error" (a failure); a transformers
    implementation that cannot run here gets "skipped" (reported). Past ``deadline`` (time.monotonic())
    the remaining token counts are recorded as skipped."""
    from multimoe_rt import ops

    slab, table = build_slab(layer, device)
    gated, E = layer["gated"], layer["E"]
    expert_bytes = (layer["w1"][0].numel() + layer["w2"][0].numel()) * layer["w1"].element_size()
    mem_limit = memory_limit_bytes(device)
    hf_mods = ({impl: hf_mixtral_experts(layer, impl) for impl in HF_IMPLS} if gated
               else {"eager": hf_switch_experts(layer)})
    rows_out = [] if rows_out is None else rows_out
    for M in Ms:
        if deadline is not None and time.monotonic() > deadline:
            rows_out.append({"layer": name, "M": M, "phase": "decode" if M <= 64 else "prefill", "impl": "*",
                             "skipped": "out of time: the step's time limit was reached"})
            log(f"  {name} M={M}: skipped, out of time")
            continue
        hidden, ids, weights = make_inputs(layer, M, device)
        sample = sorted({0, M - 1, M // 2, *torch.randperm(M, generator=torch.Generator().manual_seed(M))[:5].tolist()})
        ref = reference_rows(layer, hidden, ids, weights, sample, chunk=1 if device.type == "cuda" else 4)
        touched = len(set(ids.reshape(-1).tolist()))
        flops = 2 * M * layer["K"] * ((2 if gated else 1) * layer["I"] * layer["H"] + layer["H"] * layer["I"])
        cands = {}
        for be in ("torch", "triton"):
            label = f"ours:{be}"
            if be not in backends:
                why = ("CPU: the Triton interpreter is a correctness path, not a speed path" if be == "triton"
                       else "not requested")
                cands[label + ":plain"] = cands[label + ":slab"] = why
                continue
            cands[label + ":plain"] = (lambda be=be: ops.fused_moe(hidden, ids, weights, layer["w1"], layer["w2"],
                                                                   gated, backend=be, check_slots=False))
            cands[label + ":slab"] = (lambda be=be: ops.fused_moe(hidden, table.resolve(0, ids, 1), weights, slab.w1,
                                                                  slab.w2, gated, backend=be, check_slots=False))
        for impl, mod in hf_mods.items():
            label = f"hf:{impl}"
            if impl == "batched_mm" and batched_mm_bytes(layer, M) > mem_limit:
                cands[label] = (f"needs {batched_mm_bytes(layer, M) / 2**30:.1f} GiB of gathered expert copies "
                                f"(one per token-expert pair) > {mem_limit / 2**30:.1f} GiB allowed here")
                continue
            if gated:
                cands[label] = lambda mod=mod: mod(hidden, ids, weights)
            else:  # Switch convention: one-hot dispatch mask [T,1,E] and router probability [T,1]
                onehot = torch.nn.functional.one_hot(ids, E)
                cands[label] = lambda mod=mod, onehot=onehot: mod(hidden, onehot, weights)
        ready, pending = {}, {}
        for label, fn in cands.items():
            row = {"layer": name, "M": M, "phase": "decode" if M <= 64 else "prefill", "impl": label}
            rows_out.append(row)
            if isinstance(fn, str):
                row["skipped"] = fn
                continue
            try:
                with torch.inference_mode():
                    out = fn()  # also the warmup call
                    sync(device)
                row["rel_err"] = check(f"{name} M={M} {label}", out, ref, sample, layer["dtype"])
            except SystemExit as e:
                if label.startswith("ours"):
                    row["error"] = f"wrong output, not timed: {e}"  # our backend is wrong: a failure
                    log(f"  {name} M={M:5d} {label:20s} FAILED: {row['error']}")
                else:
                    row["skipped"] = f"wrong output, not timed: {e}"  # a transformers implementation: report it
                continue
            except Exception as e:  # noqa: BLE001
                msg = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]}"
                if label.startswith("ours"):
                    row["error"] = msg  # our own backend cannot run: a failure, never a skip
                    log(f"  {name} M={M:5d} {label:20s} FAILED: {msg}")
                else:
                    row["skipped"] = msg  # a transformers implementation that cannot run here is reported
                continue
            ready[label], pending[label] = fn, row
            del out
        with torch.inference_mode():
            timings = time_group(ready, device, budget_s)
        for label, row in pending.items():
            row.update(timings[label])
            t = row["median_ms"] / 1e3
            if row["phase"] == "decode":
                row["GBps"] = touched * expert_bytes / t / 1e9
            row["TFLOPs"] = flops / t / 1e12
            if ceilings and row["phase"] == "decode" and ceilings.get("copy_GBps"):
                row["frac_copy_bw"] = row["GBps"] / ceilings["copy_GBps"]
            if ceilings and row["phase"] == "prefill" and ceilings.get("matmul_TFLOPs"):
                row["frac_matmul"] = row["TFLOPs"] / ceilings["matmul_TFLOPs"]
            log(f"  {name} M={M:5d} {label:20s} {row['median_ms']:10.3f} ms  (rel err {row['rel_err']:.1e}, "
                f"{row['reps']} reps)")
        timed = [r for r in rows_out if r["M"] == M and r["layer"] == name and "median_ms" in r]
        best_hf = min((r["median_ms"] for r in timed if r["impl"].startswith("hf:")), default=None)
        for r in timed:
            r["vs_best_hf"] = r["median_ms"] / best_hf if best_hf else None
        for be in backends:
            plain = next((r for r in timed if r["impl"] == f"ours:{be}:plain"), None)
            slabr = next((r for r in timed if r["impl"] == f"ours:{be}:slab"), None)
            if plain and slabr:
                slabr["indirection_overhead"] = slabr["median_ms"] / plain["median_ms"] - 1
    del slab, table, hf_mods
    return rows_out


def format_table(rows: list[dict]) -> str:
    lines = [f"{'layer':9s} {'M':>5s} {'phase':7s} {'impl':20s} {'median ms':>10s} {'vs best hf':>10s} "
             f"{'GB/s':>7s} {'TFLOP/s':>8s}  note"]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['layer']:9s} {r['M']:5d} {r['phase']:7s} {r['impl']:20s} {'-':>10s} {'-':>10s} "
                         f"{'-':>7s} {'-':>8s}  FAILED: {r['error']}")
            continue
        if "skipped" in r:
            lines.append(f"{r['layer']:9s} {r['M']:5d} {r['phase']:7s} {r['impl']:20s} {'-':>10s} {'-':>10s} "
                         f"{'-':>7s} {'-':>8s}  not timed: {r['skipped']}")
            continue
        ratio = f"{r['vs_best_hf']:.2f}x" if r.get("vs_best_hf") else "-"
        gbps = f"{r['GBps']:.1f}" if "GBps" in r else "-"
        note = []
        if "indirection_overhead" in r:
            note.append(f"slab vs plain {r['indirection_overhead'] * 100:+.1f}%")
        if "frac_copy_bw" in r:
            note.append(f"{r['frac_copy_bw'] * 100:.0f}% of copy BW")
        if "frac_matmul" in r:
            note.append(f"{r['frac_matmul'] * 100:.0f}% of bf16 matmul")
        lines.append(f"{r['layer']:9s} {r['M']:5d} {r['phase']:7s} {r['impl']:20s} {r['median_ms']:10.3f} {ratio:>10s} "
                     f"{gbps:>7s} {r['TFLOPs']:8.3f}  {'; '.join(note)}")
    return "\n".join(lines)


def layer_specs(device: torch.device, quick: bool = False, tiny: bool = False) -> list[tuple[str, dict, list[int]]]:
    """(name, make_layer kwargs, token counts) per layer, scaled to the device."""
    if tiny:  # the GPU check's dry run: exercise every code path in seconds
        return [("mixtral", dict(H=64, I=96, E=8, K=2, gated=True), [1, 4, 64]),
                ("switch", dict(H=48, I=80, E=8, K=1, gated=False), [1, 64])]
    if device.type == "cuda":
        Ms = [1, 4, 16, 512, 2048]
        return [("mixtral", dict(H=4096, I=14336, E=8, K=2, gated=True), Ms),
                ("switch", dict(H=768, I=3072, E=8, K=1, gated=False), Ms)]
    Ms = [1, 4, 16, 512] if quick else [1, 4, 16, 512, 2048]
    return [("mixtral", dict(H=512, I=1792, E=8, K=2, gated=True), Ms),
            ("switch", dict(H=256, I=1024, E=8, K=1, gated=False), Ms)]


def our_failures(rows: list[dict]) -> list[dict]:
    """Rows of our own backends that failed (raised, or gave a wrong output)."""
    return [r for r in rows if r["impl"].startswith("ours") and "error" in r]


def run(device: torch.device, dtype, specs, budget_s: float, ceilings: dict | None = None, log=print,
        backends: list[str] | None = None, rows: list | None = None, deadline: float | None = None) -> list[dict]:
    """Benchmark rows for every layer spec, appended to ``rows`` as they come. backends default: torch and
    triton on CUDA, torch on CPU. Past ``deadline`` (time.monotonic()) the remaining cases are skipped."""
    backends = backends or (["torch", "triton"] if device.type == "cuda" else ["torch"])
    rows = [] if rows is None else rows
    for name, kw, Ms in specs:
        if deadline is not None and time.monotonic() > deadline:
            rows.append({"layer": name, "M": 0, "phase": "-", "impl": "*",
                         "skipped": "out of time: the step's time limit was reached"})
            continue
        layer = make_layer(dtype=dtype, device=device, **kw)
        log(f"{name}: H={kw['H']} I={kw['I']} E={kw['E']} top-{kw['K']} {'SwiGLU' if kw['gated'] else 'ReLU'} "
            f"{str(dtype).replace('torch.', '')} on {device}")
        bench_layer(name, layer, Ms, device, backends, budget_s, ceilings, log, rows_out=rows, deadline=deadline)
        del layer
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer token counts and shorter timing budgets")
    ap.add_argument("--out", type=Path, default=None, help="JSON path (default kernels-<host>.json in the results folder: $MULTIMOE_RESULTS, else ~/.cache/multimoe_rt/results)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (default on CPU: 1, since on a shared 2-core machine multithreaded "
                         "OpenMP regions stall for whole scheduler slices whenever another process holds a core)")
    ap.add_argument("--only", choices=["layers", "codecs"], default=None,
                    help="run only the layer rows (ours vs transformers) or only the delta-codec rows "
                         "(default: both; codec rows go to kernels_codecs-<host>.json in the results folder)")
    args = ap.parse_args(argv)
    from . import delta_codecs

    device = torch.device(args.device)
    if args.threads or device.type == "cpu":
        torch.set_num_threads(args.threads or 1)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # CPU bf16 matmuls are not its fast path
    info = machine_info()
    print(f"machine: {info['cpu']} x{info['cpu_count']} ({info['torch_threads']} torch threads, "
          f"load {info['loadavg_1m_at_start']}), "
          f"gpu={info['gpu']}, torch {info['torch']}, triton {info['triton']}, transformers {info['transformers']}")
    ceilings = None
    if device.type == "cuda":
        from .ceilings import measure_ceilings

        ceilings = measure_ceilings(device, dry=False)
        print(f"ceilings: {ceilings}")
    if args.only == "codecs":
        return delta_codecs.main_codecs(device, dtype, info, args)
    t0 = time.perf_counter()
    rows = run(device, dtype, layer_specs(device, args.quick), 0.4 if args.quick else 1.0, ceilings)
    elapsed = time.perf_counter() - t0
    notes = []
    if device.type != "cuda":
        notes.append("CPU run: layers scaled down (Mixtral-like H=512 I=1792, Switch-like H=256 I=1024), fp32, "
                     f"{torch.get_num_threads()} torch thread(s); the triton backend is not timed (the interpreter is "
                     "a correctness path, not a speed path); medians of round-robin repetitions")
    print()
    print(format_table(rows))
    for n in notes:
        print("note:", n)
    out = args.out or results_dir() / f"kernels-{info['host']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": info, "device": str(device), "dtype": str(dtype), "ceilings": ceilings,
                               "notes": notes, "elapsed_s": round(elapsed, 1), "rows": rows}, indent=1))
    print(f"wrote {out}  ({elapsed:.0f} s)")
    failed = our_failures(rows)
    if failed:
        print(f"FAILED: {len(failed)} row(s) of ours: " + "; ".join(
            f"{r['layer']} M={r['M']} {r['impl']}: {r['error'][:120]}" for r in failed), file=sys.stderr)
        return 1
    if args.only is None:
        return delta_codecs.main_codecs(device, dtype, info, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
