"""Driver of bench/gpu_check.sh: the one prepared GPU check, made to work the first time on a bare machine.

    python3 bench/gpu_check.py [--dry-run] [--out DIR] [--skip-build] [--skip-tests] [--force-install]

Nothing of the project is imported before step 1 has installed it: a bare GPU machine has torch and triton
preinstalled, nothing else of ours. After step 1 the driver re-executes itself (fresh interpreter, so the
new editable install is on sys.path) and carries on from the JSON. Every step has a time limit (SIGALRM;
subprocesses get the time left and are killed with their children); the limits add up to 360 s. The JSON
is rewritten after every step, so a run killed from outside still returns what it finished.

Steps (limit in seconds) and what each writes under ``steps.<name>`` in the JSON:
  1_install (125)  editable install against the preinstalled torch, offline (``pip install --no-index
        --no-build-isolation --no-deps -e .``: the GPU machine reaches no index; fastapi, uvicorn, openai and
        the other serving/plotting packages are optional there and their tests skip; torch and triton are pinned by a constraints file, so pip can never replace them),
        CUDA_HOME from the real nvcc (multimoe_rt/_cuda_home.py), TORCH_CUDA_ARCH_LIST from the GPU; build
        prerequisites (setuptools, wheel, ninja) and runtime/test dependencies installed only where missing.
        Writes: cuda_home(+how), pip (rc, seconds, tail), build_log (full pip -v output, a file beside the
        JSON), ext_build (setup.py's record: status, compiler errors), runtime_info, missing_modules.
        Fails if the package does not import, if the CPU extension did not build, or on a GPU if the CUDA
        ops did not build. A dry run installs only when this checkout is not installed yet (--force-install
        to always).
  2_env (15)  machine (GPU, driver, versions), nvidia-smi, nvcc, ceilings: D2D copy bandwidth and a large
        bf16 matmul rate (tiny CPU stand-ins in a dry run).
  3_tests (60)  ``pytest -m gpu`` over the test files that have GPU tests (the bf16/fp16 kernel cases among
        them); a dry run also runs the align / grouped-GEMM tests in the Triton interpreter. Writes rc, summary
        line, tail per run. Fails on any failed test.
  4_kernels (45)  multimoe_rt.benchmarks.kernels rows at Mixtral-8x7B and Switch-base-8 shapes (bf16; decode M=1,4,16,
        prefill 512, 2048): ours (triton, torch; plain and through slab+table) against transformers' experts
        implementations, ms, GB/s, TFLOP/s, fraction of the ceilings. Fails if any row of ours failed (raised
        or wrong against float64); cases left when the limit nears are recorded as skipped.
  5_switch (20)  Mixtral-8x7B's non-expert set copied host(pinned)->device on a side stream, alone and
        overlapped with an expert-GEMM prefill workload: copy ms and GB/s, TTFT impact prefetched/blocking.
  6_batched_forward (15)  hook: the batched mixed-variant decode step at 1, 16, 64, 256 sequences of 4
        variants against one variant. Filled by ``multimoe_rt.benchmarks.batched_forward.gpu_check(device, dry, deadline,
        log) -> dict``; skipped with the reason while that does not exist.
  7_delta_codecs (15)  hook: delta-coded experts (int4 / sign1 / lowrank) against the dense slab, filled by
        ``multimoe_rt.benchmarks.delta_codecs.gpu_check(...)`` the same way.
  8_synthetic (65)  hook: ``bench-batch --synthetic large`` in bf16 (one variant, mixed dense copies, all shared,
        sign1, int4, transformers; tokens/s, bytes read per step, roofline), by
        ``multimoe_rt.benchmarks.synthetic.gpu_check(...)``; its JSON lands in $MULTIMOE_RESULTS.
Then a short table. Exit status 1 if any step failed (a skipped hook is not a failure).

Modules beside this script (its folder is first on sys.path; none is named like an importable package):
gpu_check_core.py (limits, steps, the JSON, subprocesses), gpu_check_install.py (step 1), gpu_check_steps.py
(steps 2-8).

JSON: ``$OUT/gpu_check.json`` where $OUT is set (the device machine), else --out DIR, else
bench/results/gpu_check-<host>.json (a dry run: gpu_check-dryrun.json in a temp dir).
``--dry-run`` runs every step on CPU at tiny sizes (what strictly needs CUDA is skipped with a printed reason).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import sys
import tempfile
import time
from pathlib import Path

if "--dry-run" in sys.argv:
    # Before anything imports triton: the dry run drives the Triton backend through its CPU interpreter.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402  (preinstalled; never installed by this script)

# This folder is first on sys.path (the script's own): the step modules beside it.
import gpu_check_core as core  # noqa: E402
from gpu_check_core import LIMIT_SCALE, LIMITS, RESULT, ROOT  # noqa: E402
from gpu_check_install import step_install  # noqa: E402
from gpu_check_steps import (step_batched_forward, step_delta_codecs, step_env, step_kernels,  # noqa: E402
                             step_switch, step_synthetic, step_tests)


# ---------------------------------------------------------------------------------------- summary
def summary_table() -> str:
    s = RESULT["steps"]
    lines = ["", "=== gpu_check summary ===" + ("  (DRY RUN: tiny CPU sizes, numbers not meaningful)"
                                                if RESULT["dry_run"] else "")]
    for name, d in s.items():
        only_skipped = d.get("skipped") and not set(d) - {"skipped", "limit_s", "wall_s"}
        status = "FAIL" if "error" in d else ("skip" if only_skipped else "ok")
        note = d["error"][:140] if "error" in d else "; ".join(f"{k}: {v}"[:140] for k, v in d.get("skipped", {}).items())
        lines.append(f"{name:18s} {status:4s} {d.get('wall_s', 0):6.1f} s / {d.get('limit_s') or 0:3.0f} s  {note}")
    c = s.get("2_env", {}).get("ceilings")
    if c:
        lines.append(f"ceilings: D2D copy {c['copy_GBps']:.1f} GB/s; matmul {c['matmul_TFLOPs']:.2f} TFLOP/s "
                     f"({c['matmul_dtype']})")
    b = s.get("1_install", {})
    if "import" in b:
        lines.append(f"build: {b.get('build_s', '-')} s, extension {b['import'].get('ext')}, cuda ops "
                     f"{b['import'].get('cuda_ops')}: {str(b['import'].get('reason'))[:200]}")
    rows = s.get("4_kernels", {}).get("rows", [])
    if rows:
        lines.append(f"{'layer':8s} {'M':>5s} {'impl':20s} {'ms':>9s} {'vs hf':>6s} {'GB/s':>7s} {'TFLOP/s':>8s} "
                     f"{'%ceil':>6s} {'slab ovh':>8s}")
        for r in rows:
            if "error" in r:
                lines.append(f"{r['layer']:8s} {r['M']:5d} {r['impl']:20s} FAILED: {r['error'][:100]}")
                continue
            if "median_ms" not in r or not (r["impl"].startswith("ours") or r.get("vs_best_hf") == 1.0):
                continue
            frac = r.get("frac_copy_bw", r.get("frac_matmul"))
            frac_s = "" if frac is None else f"{frac * 100:5.0f}%"
            ovh = r.get("indirection_overhead")
            ovh_s = "" if ovh is None else f"{ovh * 100:+.1f}%"
            lines.append(f"{r['layer']:8s} {r['M']:5d} {r['impl']:20s} {r['median_ms']:9.3f} "
                         f"{r['vs_best_hf'] or 0:6.2f} {r.get('GBps', 0):7.1f} {r['TFLOPs']:8.3f} "
                         f"{frac_s:>6s} {ovh_s:>8s}")
    sw = s.get("5_switch", {})
    if "copy_alone_ms" in sw:
        lines.append(f"switch: {sw['bytes'] / 2**30:.2f} GiB in {sw['copy_alone_ms']:.1f} ms ({sw['copy_GBps']:.1f} GB/s); "
                     f"TTFT impact prefetched {sw['prefetched_ttft_impact'] * 100:+.1f}%, "
                     f"blocking {sw['blocking_ttft_impact'] * 100:+.1f}%")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="the one prepared GPU check")
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes: exercise every step's code path")
    ap.add_argument("--out", type=Path, default=None, help="output dir (default $OUT, else bench/results/)")
    ap.add_argument("--skip-build", action="store_true", help="do not pip install (check the import only)")
    ap.add_argument("--force-install", action="store_true", help="dry run: install even if already installed")
    ap.add_argument("--skip-tests", action="store_true")
    ap.add_argument("--switch-fraction", type=float, default=1.0,
                    help="fraction of Mixtral-8x7B's decoder layers in the switched non-expert set")
    ap.add_argument("--resume", type=Path, default=None, help=argparse.SUPPRESS)  # after step 1's re-exec
    args = ap.parse_args(argv)
    dry = args.dry_run
    device = torch.device("cpu" if dry or not torch.cuda.is_available() else "cuda")
    if not dry and device.type != "cuda":
        print("gpu_check: no CUDA device; run with --dry-run on a CPU machine", file=sys.stderr)
        return 2
    if dry:
        torch.set_num_threads(1)  # a shared CPU box: keep the dry run light

    if args.resume is None:
        out_dir = args.out or (Path(os.environ["OUT"]) if os.environ.get("OUT") else None)
        if out_dir is None:
            out_dir = Path(tempfile.mkdtemp(prefix="gpu_check_dry_")) if dry else ROOT / "bench" / "results"
        out_dir.mkdir(parents=True, exist_ok=True)
        name = "gpu_check-dryrun.json" if dry else (
            "gpu_check.json" if os.environ.get("OUT") and args.out is None else f"gpu_check-{socket.gethostname()}.json")
        out_path = core.OUT_PATH = out_dir / name
        # Harness results (step 8's JSON) beside the check's own, so they come back from the device machine; the
        # re-executed process after step 1 inherits it.
        os.environ.setdefault("MULTIMOE_RESULTS", str(out_dir))
        RESULT.update(dry_run=dry, started=time.strftime("%Y-%m-%dT%H:%M:%S"), t0_epoch=time.time(),
                      host=socket.gethostname(), platform=platform.platform(), argv=sys.argv[1:],
                      limits_s=LIMITS, limit_scale=LIMIT_SCALE, json=str(out_path))
        print(f"gpu_check: JSON -> {out_path} (rewritten after every step); step limits {LIMITS} "
              f"(sum {sum(LIMITS.values())} s)"
              + (f", stretched x{LIMIT_SCALE:g} (GPU_CHECK_LIMIT_SCALE)" if LIMIT_SCALE != 1 else ""), flush=True)
        step_install(device, dry, args.skip_build, args.force_install, out_dir)
        # A fresh interpreter sees the new install (its .pth finder); carry on from the JSON.
        sys.stdout.flush()
        os.execv(sys.executable, [sys.executable, str(Path(__file__).resolve()), *sys.argv[1:], "--resume", str(out_path)])

    out_path = core.OUT_PATH = args.resume
    RESULT.clear()
    RESULT.update(json.loads(args.resume.read_text()))
    if os.environ.get("TRITON_INTERPRET") == "1":
        from multimoe_rt._triton_compat import apply_interpreter_shim

        RESULT["triton_interpreter_shim"] = apply_interpreter_shim()
    step_env(device, dry)
    step_tests(device, dry, args.skip_tests)
    step_kernels(device, dry)
    step_switch(device, dry, args.switch_fraction)
    step_batched_forward(device, dry)
    step_delta_codecs(device, dry)
    step_synthetic(device, dry)

    failed = [n for n, d in RESULT["steps"].items() if "error" in d]
    RESULT["failed_steps"] = failed
    RESULT["total_s"] = round(time.time() - RESULT["t0_epoch"], 1)
    core.write_json()
    print(summary_table())
    print(f"  wrote {out_path}")
    print(f"gpu_check: {'FAILED steps: ' + ', '.join(failed) if failed else 'all steps ok'} "
          f"({RESULT['total_s']:.0f} s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
