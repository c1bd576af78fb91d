"""Driver of bench/gpu_check.sh: issue 8's six steps in one call (about 6 minutes on an H200).

    python3 bench/gpu_check.py [--dry-run] [--out DIR] [--skip-build] [--skip-tests]

  1. env: GPU, driver, torch/triton/transformers versions; ceilings: device-to-device copy bandwidth
     (bytes read + written per second) and a large bf16 matmul rate.
  2. build: ``pip install --no-build-isolation --no-deps -e .`` with TORCH_CUDA_ARCH_LIST from the GPU
     (9.0 on Hopper), timed; if pip cannot install (e.g. an externally managed system python) it retries with
     --break-system-packages, then falls back to ``setup.py build_ext --inplace`` plus a symlinked package tree.
  3. tests: ``pytest -m gpu tests/`` (the align / grouped-GEMM / slab files' CUDA tests among them).
  4. kernels: bench/kernels.py's benchmark at Mixtral-8x7B (H=4096, I=14336, 8 experts, top-2) and Switch-base-8
     (H=768, I=3072, top-1, ReLU) shapes, bf16, decode M=1,4,16 and prefill M=512,2048: triton and torch
     backends on a plain stacked tensor and through slab+table, transformers eager / batched_mm / grouped_mm
     (grouped_mm = torch's grouped GEMM where available), GB/s and TFLOP/s vs the ceilings.
  5. switch: Mixtral-8x7B's non-expert weights (embeddings, attention, norms, routers, LM head: 1.6e9 params,
     bf16, or --switch-fraction of the layers) copied host(pinned)->device on a side stream, alone and
     overlapped with an expert-GEMM prefill workload (32 MoE layers at M=512, the expert part of a TTFT), and
     what that means for TTFT with and without prefetching.
  6. JSON to $OUT/gpu_check.json (default bench/results/gpu_check-<host>.json; a dry run writes to a temp dir
     unless $OUT or --out is given) and a short table printed last.

``--dry-run`` runs every step on CPU at tiny sizes in well under two minutes: what strictly needs CUDA (nvcc
build, pinned memory, streams) is skipped with a printed reason, and the same Python paths run instead on CPU
tensors (the switch copy on a worker thread, as reconfig.NonExpertStore does on CPU).
A failing step is recorded (error + traceback tail) and the remaining steps still run; exit status 1 then.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

import torch  # noqa: E402



def _load_kernel_bench():
    """bench/kernels.py under a name of its own: a top-level module called ``kernels`` belongs to another
    PyPI project that transformers probes for. It sets TRITON_INTERPRET=1 where there is no CUDA."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("multimoe_bench_kernels", Path(__file__).resolve().parent / "kernels.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


kbench = _load_kernel_bench()

RESULT: dict = {"steps": {}}


class Step:
    """Records a step's wall time, its data, and an error instead of aborting the whole check."""

    def __init__(self, name: str):
        self.name = name
        self.data = RESULT["steps"].setdefault(name, {})

    def __enter__(self):
        print(f"\n=== {self.name} ===", flush=True)
        self.t0 = time.perf_counter()
        return self.data

    def __exit__(self, typ, exc, tb):
        self.data["wall_s"] = round(time.perf_counter() - self.t0, 2)
        if exc is not None:
            self.data["error"] = f"{typ.__name__}: {exc}"
            self.data["traceback"] = traceback.format_exc()[-2000:]
            print(f"[{self.name}] FAILED: {typ.__name__}: {exc}", flush=True)
        print(f"[{self.name}] {self.data['wall_s']} s", flush=True)
        return True  # keep going


def skip(data: dict, what: str, why: str) -> None:
    data.setdefault("skipped", {})[what] = why
    print(f"  skip {what}: {why}", flush=True)


def sh(cmd: list[str], timeout: float, env: dict | None = None) -> dict:
    t0 = time.perf_counter()
    print("  $ " + " ".join(cmd), flush=True)
    try:
        p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        rc, out = p.returncode, p.stdout + p.stderr
    except subprocess.TimeoutExpired as e:
        rc = "timeout"
        out = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
    except FileNotFoundError as e:
        rc, out = "not found", str(e)
    return {"cmd": " ".join(cmd), "rc": rc, "s": round(time.perf_counter() - t0, 1), "tail": out[-3000:]}


# ---------------------------------------------------------------------------------------- 1. env + ceilings
def measure_ceilings(device: torch.device, dry: bool) -> dict:
    """D2D copy bandwidth (read + write bytes / s) and the rate of a large matmul (bf16 on GPU)."""
    if device.type == "cuda":
        import triton.testing

        n = 2**30 // 2  # 1 GiB of bf16 each way
        src = torch.empty(n, dtype=torch.bfloat16, device=device).normal_()
        dst = torch.empty_like(src)
        ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=5, rep=200, return_mode="median")
        copy_gbps = 2 * src.numel() * 2 / (ms / 1e3) / 1e9
        del src, dst
        N = 8192
        a = torch.randn(N, N, dtype=torch.bfloat16, device=device)
        b = torch.randn(N, N, dtype=torch.bfloat16, device=device)
        ms_mm = triton.testing.do_bench(lambda: a @ b, warmup=5, rep=300, return_mode="median")
        del a, b
        torch.cuda.empty_cache()
        return {"copy_GBps": copy_gbps, "copy_bytes": 2 * n * 2, "matmul_TFLOPs": 2 * N**3 / (ms_mm / 1e3) / 1e12,
                "matmul_shape": [N, N, N], "matmul_dtype": "bfloat16"}
    n, N = (2**22, 256) if dry else (2**26, 2048)
    src = torch.randn(n)
    dst = torch.empty_like(src)
    t = kbench.time_group({"copy": lambda: dst.copy_(src)}, device, 0.2)["copy"]["median_ms"]
    a, b = torch.randn(N, N), torch.randn(N, N)
    t_mm = kbench.time_group({"mm": lambda: a @ b}, device, 0.2)["mm"]["median_ms"]
    return {"copy_GBps": 2 * n * 4 / (t / 1e3) / 1e9, "copy_bytes": 2 * n * 4,
            "matmul_TFLOPs": 2 * N**3 / (t_mm / 1e3) / 1e12, "matmul_shape": [N, N, N], "matmul_dtype": "float32"}


def step_env(device, dry):
    with Step("1_env_ceilings") as d:
        d["machine"] = kbench.machine_info()
        smi = sh(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm", "--format=csv,noheader"], 20)
        d["nvidia_smi"] = smi["tail"].strip() if smi["rc"] == 0 else f"unavailable ({smi['rc']})"
        nvcc = sh(["nvcc", "--version"], 20)
        d["nvcc"] = nvcc["tail"].strip().splitlines()[-1] if nvcc["rc"] == 0 else f"unavailable ({nvcc['rc']})"
        m = d["machine"]
        print(f"  gpu: {m['gpu']} | nvidia-smi: {d['nvidia_smi']} | torch {m['torch']} (cuda {m['cuda']}) | "
              f"triton {m['triton']} | transformers {m['transformers']} | {d['nvcc']}")
        d["ceilings"] = measure_ceilings(device, dry)
        print(f"  ceilings: copy {d['ceilings']['copy_GBps']:.1f} GB/s, matmul {d['ceilings']['matmul_TFLOPs']:.2f} "
              f"TFLOP/s ({d['ceilings']['matmul_dtype']})")


# ---------------------------------------------------------------------------------------- 2. build
IMPORT_CHECK = ("import json, multimoe_rt, multimoe_rt.kernels.grouped_gemm; from multimoe_rt import _ext; "
                "print(json.dumps({'ext': _ext.available, 'cuda_ops': _ext.has_cuda_ops, 'reason': _ext.reason, "
                "'file': multimoe_rt.__file__}))")


def overlay_package(py: str, env: dict, d: dict) -> None:
    """Last resort without pip: build _C in place and expose multimoe_rt (with kernels/ as multimoe_rt.kernels)
    through a symlinked tree on PYTHONPATH, for this process and its children."""
    d["overlay_build"] = sh([py, "setup.py", "build_ext", "--inplace"], 300, env)
    site = Path(tempfile.mkdtemp(prefix="multimoe_site_"))
    pkg = site / "multimoe_rt"
    pkg.mkdir()
    for entry in (ROOT / "multimoe_rt").iterdir():
        (pkg / entry.name).symlink_to(entry)
    (pkg / "kernels").symlink_to(ROOT / "kernels")
    sys.path.insert(0, str(site))
    os.environ["PYTHONPATH"] = str(site) + os.pathsep + os.environ.get("PYTHONPATH", "")
    d["overlay_site"] = str(site)


def step_build(device, dry, skip_build):
    with Step("2_build") as d:
        py = sys.executable
        env = dict(os.environ, MAX_JOBS=str(os.cpu_count() or 4))
        if device.type == "cuda":
            major, minor = torch.cuda.get_device_capability(device)
            env.setdefault("TORCH_CUDA_ARCH_LIST", f"{major}.{minor}")  # 9.0 on Hopper -> sm_90
            d["TORCH_CUDA_ARCH_LIST"] = env["TORCH_CUDA_ARCH_LIST"]
        cmd = [py, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "-e", "."]
        if dry or skip_build:
            why = ("dry run: the CUDA build needs nvcc and a CUDA torch; a CPU rebuild would rewrite the shared "
                   "install for minutes" if dry else "--skip-build")
            skip(d, "pip install", why)
            d["would_run"] = " ".join(cmd)
            d["pip_version"] = sh([py, "-m", "pip", "--version"], 60)["tail"].strip()
        else:
            r = sh(cmd, 420, env)
            if r["rc"] != 0 and "externally-managed" in r["tail"]:
                r = sh(cmd + ["--break-system-packages"], 420, env)
            d["pip"] = r
            d["build_s"] = r["s"]
            print(f"  pip rc={r['rc']} in {r['s']} s")
            if "WARNING: building multimoe_rt._C failed" in r["tail"]:
                d["ext_build_warning"] = r["tail"][r["tail"].index("WARNING: building"):][:1500]
        chk = sh([py, "-c", IMPORT_CHECK], 120, env)
        if chk["rc"] != 0 and not dry and not skip_build:
            print("  package not importable after pip; falling back to build_ext --inplace + symlinked tree")
            overlay_package(py, env, d)
            chk = sh([py, "-c", IMPORT_CHECK], 120, dict(env, PYTHONPATH=os.environ["PYTHONPATH"]))
        if chk["rc"] != 0:
            raise RuntimeError(f"multimoe_rt is not importable: {chk['tail'][-800:]}")
        d["import"] = json.loads(chk["tail"].strip().splitlines()[-1])
        print(f"  extension: {d['import']}")
        if device.type == "cuda" and not d["import"]["cuda_ops"]:
            d["error"] = "built without CUDA ops: " + d["import"]["reason"]


# ---------------------------------------------------------------------------------------- 3. tests
def pytest_summary(tail: str) -> str:
    lines = [l for l in tail.strip().splitlines() if l.strip()]
    return lines[-1] if lines else ""


def step_tests(device, dry, skip_tests):
    with Step("3_tests") as d:
        if skip_tests:
            skip(d, "pytest", "--skip-tests")
            return
        base = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--continue-on-collection-errors"]
        files = [f"tests/{f}" for f in ("test_align.py", "test_grouped_gemm.py", "test_slab.py")
                 if (ROOT / "tests" / f).exists()]
        if dry:
            # Only the GPU-marked tests (all skipped here): exercises collection and this step's plumbing;
            # the CPU suite is CI's own job.
            runs = {"gpu_marked": base + ["-m", "gpu"] + files}
        else:
            # Every GPU-marked test (the align, grouped-GEMM and slab files' CUDA tests among them). Their
            # CPU-tensor Triton tests are not rerun here: they need TRITON_INTERPRET=1, which CI's CPU run sets.
            runs = {"gpu_marked": base + ["-m", "gpu", "tests/"]}
        ok = True
        for name, cmd in runs.items():
            r = sh(cmd, 100 if dry else 180)
            r["summary"] = pytest_summary(r["tail"])
            d[name] = r
            ok &= r["rc"] == 0
            print(f"  {name}: rc={r['rc']} {r['summary']}")
        if not ok:
            d["error"] = "some tests failed or timed out: " + "; ".join(
                f"{n}: {d[n]['summary']}" for n in runs if d[n]["rc"] != 0)


# ---------------------------------------------------------------------------------------- 4. kernels
def step_kernels(device, dry):
    with Step("4_kernels") as d:
        ceilings = RESULT["steps"].get("1_env_ceilings", {}).get("ceilings")
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        if dry:
            # The Triton interpreter runs the GPU backend's Python path at the tiny sizes (not a speed number).
            specs = kbench.layer_specs(device, tiny=True)
            d["rows"] = kbench.run(device, dtype, specs, 0.02, ceilings, backends=["torch", "triton"])
            d["note"] = "dry run: tiny layers on CPU, triton through its interpreter; times are not meaningful"
        else:
            d["rows"] = kbench.run(device, dtype, kbench.layer_specs(device), 0.15, ceilings)
        print(kbench.format_table(d["rows"]))


# ---------------------------------------------------------------------------------------- 5. switch
def nonexpert_shapes(dry: bool, fraction: float) -> list[tuple[str, tuple[int, ...]]]:
    """Mixtral-8x7B's non-expert tensors (v5 names): 1.606e9 parameters at fraction 1."""
    V, H, KV, L, E = (512, 64, 16, 4, 8) if dry else (32000, 4096, 1024, 32, 8)
    L = max(1, round(L * fraction))
    shapes = [("model.embed_tokens.weight", (V, H)), ("lm_head.weight", (V, H)), ("model.norm.weight", (H,))]
    for l in range(L):
        p = f"model.layers.{l}."
        shapes += [(p + "self_attn.q_proj.weight", (H, H)), (p + "self_attn.k_proj.weight", (KV, H)),
                   (p + "self_attn.v_proj.weight", (KV, H)), (p + "self_attn.o_proj.weight", (H, H)),
                   (p + "input_layernorm.weight", (H,)), (p + "post_attention_layernorm.weight", (H,)),
                   (p + "mlp.gate.weight", (E, H))]
    return shapes


class Copier:
    """Host->device copy of a tensor set the way NonExpertStore.switch_to does it: pinned host tensors and
    non_blocking copies on a side CUDA stream, bracketed by events; on CPU a worker thread."""

    def __init__(self, host, dev, device):
        self.host, self.dev, self.device = host, dev, device
        self.side = torch.cuda.Stream(device) if device.type == "cuda" else None

    def start(self):
        if self.side is not None:
            self.side.wait_stream(torch.cuda.current_stream(self.device))  # start no earlier than queued work
            with torch.cuda.stream(self.side):
                self.ev0 = torch.cuda.Event(enable_timing=True)
                self.ev1 = torch.cuda.Event(enable_timing=True)
                self.ev0.record()
                for h, dv in zip(self.host, self.dev):
                    dv.copy_(h, non_blocking=True)
                self.ev1.record()
            return
        self.t = {}

        def work():
            self.t["start"] = time.perf_counter()
            for h, dv in zip(self.host, self.dev):
                dv.copy_(h)
            self.t["end"] = time.perf_counter()

        self.thread = threading.Thread(target=work)
        self.thread.start()

    def finish(self) -> float:
        """Wait for the copy; its duration in ms."""
        if self.side is not None:
            self.ev1.synchronize()
            return self.ev0.elapsed_time(self.ev1)
        self.thread.join()
        return (self.t["end"] - self.t["start"]) * 1e3


def step_switch(device, dry, fraction):
    with Step("5_switch") as d:
        from multimoe_rt import ops

        cuda = device.type == "cuda"
        dtype = torch.bfloat16 if cuda else torch.float32
        if not cuda:
            skip(d, "pinned memory + side CUDA stream", "no CUDA: the copy runs on a worker thread on CPU tensors")
        shapes = nonexpert_shapes(dry, fraction)
        numel = sum(torch.Size(s).numel() for _, s in shapes)
        d.update(num_tensors=len(shapes), params=numel, fraction=fraction, dtype=str(dtype))
        host = [torch.empty(s, dtype=dtype, pin_memory=cuda).fill_(0.01) for _, s in shapes]
        dev = [torch.empty(s, dtype=dtype, device=device) for _, s in shapes]
        nbytes = numel * host[0].element_size()
        d["bytes"] = nbytes
        print(f"  non-expert set: {len(shapes)} tensors, {numel / 1e9:.3f}e9 params, {nbytes / 2**30:.2f} GiB")

        # Expert-GEMM prefill workload: the expert part of a TTFT (L MoE layers, one layer's weights reused).
        H, I, E, K, L, M = (64, 96, 8, 2, 4, 64) if dry else (4096, 14336, 8, 2, 32, 512)
        layer = kbench.make_layer(H, I, E, K, True, dtype, device)
        hidden, ids, weights = kbench.make_inputs(layer, M, device)
        backend = "triton" if cuda else "torch"

        def workload():
            x = hidden
            for _ in range(L):
                x = ops.fused_moe(x, ids, weights, layer["w1"], layer["w2"], True, backend=backend, check_slots=False)
            return x

        def timed_work() -> float:
            if cuda:
                e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                e0.record()
                workload()
                e1.record()
                e1.synchronize()
                return e0.elapsed_time(e1)
            t0 = time.perf_counter()
            workload()
            return (time.perf_counter() - t0) * 1e3

        with torch.inference_mode():
            copier = Copier(host, dev, device)
            reps = 3 if dry else 5
            copier.start(); copier.finish(); timed_work()  # warmup (allocations, Triton compile)
            copy_alone, work_alone, copy_ov, work_ov = [], [], [], []
            for _ in range(reps):
                kbench.sync(device)
                copier.start()
                copy_alone.append(copier.finish())
                work_alone.append(timed_work())
                kbench.sync(device)
                copier.start()  # the prefetch: copy issued, then the running workload proceeds
                work_ov.append(timed_work())
                copy_ov.append(copier.finish())
            ok = all(torch.equal(h, dv.cpu()) for h, dv in zip(host[:3], dev[:3]))
        med = statistics.median
        ca, wa, co, wo = med(copy_alone), med(work_alone), med(copy_ov), med(work_ov)
        d.update(copy_alone_ms=ca, copy_GBps=nbytes / (ca / 1e3) / 1e9, workload_alone_ms=wa,
                 copy_overlapped_ms=co, workload_overlapped_ms=wo, copy_verified=ok,
                 workload=f"{L} MoE layers (H={H}, I={I}, {E} experts, top-{K}) at M={M} tokens, {backend} backend",
                 # A prefetched switch overlaps the copy with running compute: the cost is the slowdown of that
                 # compute, plus any part of the copy still outstanding when it ends.
                 prefetched_ttft_impact=(wo + max(0.0, co - wo)) / wa - 1,
                 workload_slowdown_overlapped=wo / wa - 1,
                 # A blocking switch copies first, then runs the request.
                 blocking_ttft_impact=ca / wa)
        print(f"  copy alone {ca:.2f} ms ({d['copy_GBps']:.1f} GB/s) | workload alone {wa:.2f} ms | overlapped: "
              f"workload {wo:.2f} ms, copy {co:.2f} ms | TTFT +{d['prefetched_ttft_impact'] * 100:.1f}% prefetched, "
              f"+{d['blocking_ttft_impact'] * 100:.1f}% blocking")
        if not ok:
            d["error"] = "the copied non-expert tensors differ from the host copies"
        del host, dev, layer
        if cuda:
            torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------- 6. summary
def summary_table() -> str:
    s = RESULT["steps"]
    lines = ["", "=== gpu_check summary ===" + ("  (DRY RUN: tiny CPU sizes, numbers not meaningful)"
                                                if RESULT["dry_run"] else "")]
    for name, d in s.items():
        status = "FAIL" if "error" in d else "ok"
        lines.append(f"{name:16s} {status:4s} {d.get('wall_s', 0):7.1f} s" + (f"  {d['error'][:110]}" if "error" in d else ""))
    c = s.get("1_env_ceilings", {}).get("ceilings")
    if c:
        lines.append(f"ceilings: D2D copy {c['copy_GBps']:.1f} GB/s; matmul {c['matmul_TFLOPs']:.2f} TFLOP/s "
                     f"({c['matmul_dtype']})")
    b = s.get("2_build", {})
    if "build_s" in b:
        lines.append(f"build: {b['build_s']} s, extension {b.get('import')}")
    rows = s.get("4_kernels", {}).get("rows", [])
    if rows:
        lines.append(f"{'layer':8s} {'M':>5s} {'impl':20s} {'ms':>9s} {'vs hf':>6s} {'GB/s':>7s} {'TFLOP/s':>8s} "
                     f"{'%ceil':>6s} {'slab ovh':>8s}")
        for r in rows:
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
    ap = argparse.ArgumentParser(description="the one prepared GPU check (issue 8)")
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes: exercise every step's code path")
    ap.add_argument("--out", type=Path, default=None, help="output dir (default $OUT, else bench/results/)")
    ap.add_argument("--skip-build", action="store_true")
    ap.add_argument("--skip-tests", action="store_true")
    ap.add_argument("--switch-fraction", type=float, default=1.0,
                    help="fraction of Mixtral-8x7B's decoder layers in the switched non-expert set")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    dry = args.dry_run
    device = torch.device("cpu" if dry or not torch.cuda.is_available() else "cuda")
    if not dry and device.type != "cuda":
        print("gpu_check: no CUDA device; run with --dry-run on a CPU machine", file=sys.stderr)
        return 2
    if dry:
        torch.set_num_threads(1)  # a shared CPU box: keep the dry run light
    RESULT.update(dry_run=dry, started=time.strftime("%Y-%m-%dT%H:%M:%S"), host=socket.gethostname(),
                  platform=platform.platform(), argv=sys.argv[1:])

    step_env(device, dry)
    step_build(device, dry, args.skip_build)
    step_tests(device, dry, args.skip_tests)
    step_kernels(device, dry)
    step_switch(device, dry, args.switch_fraction)

    RESULT["total_s"] = round(time.perf_counter() - t0, 1)
    with Step("6_report") as d:
        out_dir = args.out or (Path(os.environ["OUT"]) if os.environ.get("OUT") else None)
        if out_dir is None:
            out_dir = Path(tempfile.mkdtemp(prefix="gpu_check_dry_")) if dry else ROOT / "bench" / "results"
        out_dir.mkdir(parents=True, exist_ok=True)
        name = "gpu_check-dryrun.json" if dry else (
            "gpu_check.json" if os.environ.get("OUT") and args.out is None else f"gpu_check-{RESULT['host']}.json")
        path = out_dir / name
        path.write_text(json.dumps(RESULT, indent=1, default=str))
        d["path"] = str(path)
        print(f"  wrote {path}")
    print(summary_table())
    failed = [n for n, d in RESULT["steps"].items() if "error" in d]
    print(f"gpu_check: {'FAILED steps: ' + ', '.join(failed) if failed else 'all steps ok'} "
          f"({time.perf_counter() - t0:.0f} s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
