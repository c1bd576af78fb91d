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

JSON: ``$OUT/gpu_check.json`` where $OUT is set (the device machine), else --out DIR, else
bench/results/gpu_check-<host>.json (a dry run: gpu_check-dryrun.json in a temp dir).
``--dry-run`` runs every step on CPU at tiny sizes (what strictly needs CUDA is skipped with a printed reason).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import signal
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
DRY = "--dry-run" in sys.argv
if DRY:
    # Before anything imports triton: the dry run drives the Triton backend through its CPU interpreter.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402  (preinstalled; never installed by this script)

# Step time limits in seconds (GPU and dry run alike); they must add up to <= 360.
LIMITS = {"1_install": 125, "2_env": 15, "3_tests": 60, "4_kernels": 45, "5_switch": 20,
          "6_batched_forward": 15, "7_delta_codecs": 15, "8_synthetic": 65}
assert sum(LIMITS.values()) <= 360
# A loaded 2-core CI machine compiles the CPU extension slower than a 16-core GPU machine builds everything:
# CI's dry run may stretch every limit by this factor (recorded in the JSON; the GPU run uses 1).
LIMIT_SCALE = float(os.environ.get("GPU_CHECK_LIMIT_SCALE", "1"))

RESULT: dict = {"steps": {}}
OUT_PATH: Path | None = None
_KBENCH = None


def kbench():
    """multimoe_rt.benchmarks.kernels, imported on first use: only after step 1 installed the package."""
    import multimoe_rt.benchmarks.kernels as kb

    return kb


def write_json() -> None:
    if OUT_PATH is None:
        return
    RESULT["elapsed_s"] = round(time.time() - RESULT.get("t0_epoch", time.time()), 1)
    tmp = OUT_PATH.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(RESULT, indent=1, default=str))
    tmp.replace(OUT_PATH)


class StepTimeout(Exception):
    pass


def _alarm(signum, frame):
    raise StepTimeout("the step's time limit was reached")


class Step:
    """Runs a step under its time limit; records wall time, data, and an error instead of aborting the check.
    The JSON is rewritten when the step ends."""

    def __init__(self, name: str):
        self.name = name
        self.limit = LIMITS[name] * LIMIT_SCALE if name in LIMITS else None
        self.data = RESULT["steps"].setdefault(name, {})

    def __enter__(self):
        print(f"\n=== {self.name} (limit {self.limit} s) ===", flush=True)
        self.t0 = time.perf_counter()
        self.data["limit_s"] = self.limit
        self.data["deadline"] = time.monotonic() + (self.limit or 1e9)
        if self.limit:
            signal.signal(signal.SIGALRM, _alarm)
            signal.setitimer(signal.ITIMER_REAL, self.limit)
        return self.data

    def __exit__(self, typ, exc, tb):
        if self.limit:
            signal.setitimer(signal.ITIMER_REAL, 0)
        self.data.pop("deadline", None)
        self.data["wall_s"] = round(time.perf_counter() - self.t0, 2)
        if exc is not None:
            self.data["error"] = f"{typ.__name__}: {exc}"
            self.data["traceback"] = traceback.format_exc()[-2000:]
            print(f"[{self.name}] FAILED: {typ.__name__}: {exc}", flush=True)
        elif "error" in self.data:
            print(f"[{self.name}] FAILED: {self.data['error'][:300]}", flush=True)
        print(f"[{self.name}] {self.data['wall_s']} s", flush=True)
        write_json()
        return typ is None or issubclass(typ, Exception)  # keep going (not on KeyboardInterrupt)


def time_left(d: dict, margin: float = 2.0) -> float:
    return max(1.0, d["deadline"] - time.monotonic() - margin)


def skip(data: dict, what: str, why: str) -> None:
    data.setdefault("skipped", {})[what] = why
    print(f"  skip {what}: {why}", flush=True)


def sh(cmd: list[str], timeout: float, env: dict | None = None, log: Path | None = None, cwd=ROOT,
       label: str | None = None) -> dict:
    """Run cmd; on timeout or any interruption (the step's alarm) kill it with its whole process group
    (pip's compilers, pytest's workers). The full output goes to ``log`` when given; the dict keeps a tail."""
    t0 = time.perf_counter()
    label = label or " ".join(cmd)
    print("  $ " + label, flush=True)
    out, rc = "", None
    try:
        p = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             start_new_session=True)
    except FileNotFoundError as e:
        return {"cmd": label, "rc": "not found", "s": 0.0, "tail": str(e)}
    try:
        raw, _ = p.communicate(timeout=timeout)
        rc = p.returncode
    except BaseException as e:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except OSError:
            pass
        raw, _ = p.communicate()
        rc = "timeout" if isinstance(e, subprocess.TimeoutExpired) else f"interrupted ({type(e).__name__})"
        if not isinstance(e, subprocess.TimeoutExpired):
            out = raw.decode(errors="replace")
            if log:
                log.write_text(out)
            raise
    out = raw.decode(errors="replace")
    if log:
        log.write_text(out)
    return {"cmd": label, "rc": rc, "s": round(time.perf_counter() - t0, 1), "tail": out[-3000:]}


# ---------------------------------------------------------------------------------------- 1. install
PROBE = r"""
import json, sys
try:
    import multimoe_rt
    from multimoe_rt import _ext
    import multimoe_rt.kernels.grouped_gemm  # noqa: F401
    info = {"importable": True, "file": multimoe_rt.__file__, "ext": _ext.available, "cuda_ops": _ext.has_cuda_ops,
            "reason": _ext.reason, "ext_build": _ext.build_info(), "runtime_info": multimoe_rt.runtime_info()}
except Exception as e:
    info = {"importable": False, "error": f"{type(e).__name__}: {e}"}
import importlib.util
info["missing_modules"] = [m for m in sys.argv[1:] if importlib.util.find_spec(m) is None]
print(json.dumps(info, default=str))
"""

# Import name -> requirement, read from pyproject.toml's dependencies and test extra (torch and triton excluded:
# they are preinstalled and never installed here). The GPU image lacks the server stack and the OpenAI client:
# those are OPTIONAL here (their tests skip), everything else must be on the image.
FALLBACK_REQS = {"safetensors": "safetensors>=0.4", "transformers": "transformers>=5.0", "ninja": "ninja",
                 "tqdm": "tqdm", "numpy": "numpy", "pytest": "pytest>=8", "hypothesis": "hypothesis>=6.100",
                 "matplotlib": "matplotlib>=3.7"}


OPTIONAL = {"fastapi", "uvicorn", "pydantic", "openai", "httpx", "prometheus_client", "matplotlib"}


def project_requirements() -> dict[str, str]:
    try:
        import re
        import tomllib

        proj = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
        reqs = list(proj.get("dependencies", [])) + list(proj.get("optional-dependencies", {}).get("test", []))
        out = {}
        for r in reqs:
            name = re.match(r"[A-Za-z0-9_.\-]+", r).group(0)
            if name.lower() in ("torch", "triton"):
                continue
            out[name.lower().replace("-", "_")] = r
        return out
    except Exception:  # noqa: BLE001 - Python < 3.11 or an unreadable file
        return dict(FALLBACK_REQS)


def probe(py: str, env: dict, modules: list[str]) -> dict:
    # Run outside the checkout: from ROOT, "import multimoe_rt" would find the source tree, installed or not.
    r = sh([py, "-c", PROBE, *modules], 120, env, cwd=tempfile.gettempdir(),
           label=f"{py} -c <probe: import multimoe_rt; find {' '.join(modules) or 'nothing else'}>")
    try:
        return json.loads(r["tail"].strip().splitlines()[-1])
    except (ValueError, IndexError):
        return {"importable": False, "error": r["tail"][-800:], "missing_modules": modules}


def overlay_package(py: str, env: dict, d: dict, out_dir: Path) -> None:
    """Last resort without pip: build _C in place and expose multimoe_rt through a symlinked tree on PYTHONPATH, for this process and its children."""
    d["overlay_build"] = sh([py, "setup.py", "build_ext", "--inplace"], time_left(d), env,
                            log=out_dir / "gpu_check-overlay-build.log")
    site = Path(tempfile.mkdtemp(prefix="multimoe_site_"))
    pkg = site / "multimoe_rt"
    pkg.mkdir()
    for entry in (ROOT / "multimoe_rt").iterdir():
        (pkg / entry.name).symlink_to(entry)
    os.environ["PYTHONPATH"] = str(site) + os.pathsep + os.environ.get("PYTHONPATH", "")
    env["PYTHONPATH"] = os.environ["PYTHONPATH"]
    d["overlay_site"] = str(site)


def step_install(device, dry: bool, skip_build: bool, force: bool, out_dir: Path) -> None:
    with Step("1_install") as d:
        py = sys.executable
        d["python"] = f"{py} ({platform.python_version()})"
        d["torch_preinstalled"] = torch.__version__
        # By path: the package is not installed yet (setup.py does the same).
        spec = importlib.util.spec_from_file_location("_multimoe_cuda_home", ROOT / "multimoe_rt" / "_cuda_home.py")
        cuda_mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(cuda_mod)
        cuda_home, how = cuda_mod.ensure_cuda_home()
        d["cuda_home"], d["cuda_home_how"] = cuda_home, how
        print(f"  CUDA_HOME={cuda_home} ({how})")
        # The interpreter's own bin dir first: torch's build runs `ninja` from PATH, and a pip-installed ninja
        # lands beside the interpreter (a venv that is not activated, a user install).
        os.environ["PATH"] = str(Path(py).parent) + os.pathsep + os.environ.get("PATH", "")
        env = dict(os.environ, MAX_JOBS=str(os.cpu_count() or 4))
        if device.type == "cuda":
            major, minor = torch.cuda.get_device_capability(device)
            env.setdefault("TORCH_CUDA_ARCH_LIST", f"{major}.{minor}")  # 9.0 on Hopper -> sm_90
            d["TORCH_CUDA_ARCH_LIST"] = env["TORCH_CUDA_ARCH_LIST"]
        # Pin what is preinstalled: pip may add packages, never replace torch or triton.
        pins = [f"torch=={torch.__version__}"]
        try:
            from importlib.metadata import version

            pins.append(f"triton=={version('triton')}")
        except Exception:  # noqa: BLE001 - no triton distribution
            pass
        constraints = out_dir / "gpu_check-constraints.txt"
        constraints.write_text("\n".join(pins) + "\n")
        d["pinned"] = pins
        # The GPU machine reaches no package index: install from what is there (GPU_CHECK_ONLINE=1 allows an index).
        offline = os.environ.get("GPU_CHECK_ONLINE") != "1"
        d["offline"] = offline
        pip = [py, "-m", "pip", "install", "--retries", "0", "--timeout", "15", "-c", str(constraints)] + (
            ["--no-index"] if offline else [])
        extra = []  # --break-system-packages once pip says the system python is externally managed

        def pip_install(args: list[str], what: str, log: Path | None = None) -> dict:
            r = sh(pip + extra + args, time_left(d), env, log=log)
            if r["rc"] != 0 and "externally-managed" in r["tail"] and not extra:
                extra.append("--break-system-packages")
                r = sh(pip + extra + args, time_left(d), env, log=log)
            d.setdefault("pip_runs", {})[what] = {k: r[k] for k in ("cmd", "rc", "s")} | (
                {"tail": r["tail"][-1500:]} if r["rc"] != 0 else {})
            print(f"  pip ({what}): rc={r['rc']} in {r['s']} s")
            return r

        reqs = project_requirements()
        before = probe(py, env, list(reqs))
        installed_here = before.get("importable") and Path(before["file"]).resolve().is_relative_to(ROOT)
        d["before"] = {k: before.get(k) for k in ("importable", "file", "ext", "error")}
        if skip_build:
            skip(d, "pip install", "--skip-build")
        elif dry and installed_here and before.get("ext") and not before["missing_modules"] and not force:
            skip(d, "pip install", "dry run: this checkout is already installed with its extension "
                                   "(--force-install to reinstall)")
        else:
            # Build prerequisites first (--no-build-isolation uses what is installed).
            pre = [m for m in ("setuptools", "wheel", "ninja") if m in before["missing_modules"]
                   or m not in reqs and not _has_module(py, env, m)]
            if pre:
                pip_install([{"setuptools": "setuptools>=64"}.get(m, m) for m in pre], "build prerequisites")
            log = out_dir / "gpu_check-build.log"
            r = pip_install(["--no-build-isolation", "--no-deps", "-v", "-e", "."], "project", log=log)
            d["build_s"], d["build_log"] = r["s"], str(log)
            if r["rc"] != 0 and not probe(py, env, [])["importable"]:
                print("  package not importable after pip; falling back to build_ext --inplace + symlinked tree")
                overlay_package(py, env, d, out_dir)
            missing = [m for m in probe(py, env, list(reqs))["missing_modules"] if not (offline and m in OPTIONAL)]
            if missing:  # only what is missing; offline, this fails fast and is reported
                pip_install([reqs[m] for m in missing], "missing dependencies: " + " ".join(missing))
        chk = probe(py, env, list(reqs))
        d["import"] = {k: chk.get(k) for k in ("importable", "file", "ext", "cuda_ops", "reason")}
        d["ext_build"] = chk.get("ext_build")
        d["runtime_info"] = chk.get("runtime_info")
        d["missing_modules"] = [m for m in chk.get("missing_modules") or [] if m not in OPTIONAL]
        d["optional_missing"] = [m for m in chk.get("missing_modules") or [] if m in OPTIONAL]
        if not chk.get("importable"):
            raise RuntimeError(f"multimoe_rt is not importable: {chk.get('error')}")
        print(f"  extension: loaded={chk['ext']} cuda_ops={chk['cuda_ops']}: {chk['reason']}")
        errors = []
        if not chk["ext"]:
            errors.append(f"the C++ extension did not build: {chk['reason']}")
        elif device.type == "cuda" and not chk["cuda_ops"]:
            errors.append(f"built without CUDA ops: {chk['reason']}")
        if d["missing_modules"]:
            errors.append("still missing: " + " ".join(d["missing_modules"]))
        if errors:
            d["error"] = "; ".join(errors)


def _has_module(py: str, env: dict, name: str) -> bool:
    return sh([py, "-c", f"import {name}"], 60, env, cwd=tempfile.gettempdir())["rc"] == 0


# ---------------------------------------------------------------------------------------- 2. env + ceilings
def step_env(device, dry):
    with Step("2_env") as d:
        d["machine"] = kbench().machine_info()
        smi = sh(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm", "--format=csv,noheader"],
                 min(10, time_left(d)))
        d["nvidia_smi"] = smi["tail"].strip() if smi["rc"] == 0 else f"unavailable ({smi['rc']})"
        nvcc = sh(["nvcc", "--version"], min(10, time_left(d)))
        d["nvcc"] = nvcc["tail"].strip().splitlines()[-1] if nvcc["rc"] == 0 else f"unavailable ({nvcc['rc']})"
        m = d["machine"]
        print(f"  gpu: {m['gpu']} | nvidia-smi: {d['nvidia_smi']} | torch {m['torch']} (cuda {m['cuda']}) | "
              f"triton {m['triton']} | transformers {m['transformers']} | {d['nvcc']}")
        from multimoe_rt.benchmarks.ceilings import measure_ceilings

        d["ceilings"] = measure_ceilings(device, dry)
        print(f"  ceilings: copy {d['ceilings']['copy_GBps']:.1f} GB/s, matmul {d['ceilings']['matmul_TFLOPs']:.2f} "
              f"TFLOP/s ({d['ceilings']['matmul_dtype']})")


# ---------------------------------------------------------------------------------------- 3. tests
def pytest_summary(tail: str) -> str:
    lines = [l for l in tail.strip().splitlines() if l.strip()]
    return lines[-1] if lines else ""


def gpu_test_files() -> list[str]:
    """Test files that hold GPU-marked tests (collecting only those keeps the step short and independent of
    optional packages the other files import)."""
    return sorted(f"tests/{p.name}" for p in (ROOT / "tests").glob("test_*.py")
                  if "mark.gpu" in p.read_text(errors="replace"))


def step_tests(device, dry, skip_tests):
    with Step("3_tests") as d:
        if skip_tests:
            skip(d, "pytest", "--skip-tests")
            return
        base = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfE"]
        files = gpu_test_files()
        d["files"] = files
        runs = {"gpu_marked": base + ["-m", "gpu"] + files}
        if dry:
            # GPU-marked tests are all skipped on CPU; the kernel tests in the Triton interpreter exercise the
            # same kernels' Python (and the interpreter shim for triton < 3.8 with numpy >= 2.4).
            interp = [f for f in ("tests/test_align.py", "tests/test_grouped_gemm.py") if (ROOT / f).exists()]
            runs["interpreter"] = base + ["-m", "not gpu"] + interp
        env = dict(os.environ)
        if dry:
            env.setdefault("OMP_NUM_THREADS", "1")
        ok = True
        for name, cmd in runs.items():
            r = sh(cmd, time_left(d), env)
            r["summary"] = pytest_summary(r["tail"])
            d[name] = r
            ok &= r["rc"] == 0
            print(f"  {name}: rc={r['rc']} {r['summary']}")
        if not ok:
            d["error"] = "some tests failed or timed out: " + "; ".join(
                f"{n}: rc={d[n]['rc']} {d[n]['summary']}" for n in runs if d[n]["rc"] != 0)


# ---------------------------------------------------------------------------------------- 4. kernels
def step_kernels(device, dry):
    with Step("4_kernels") as d:
        kb = kbench()
        ceilings = RESULT["steps"].get("2_env", {}).get("ceilings")
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        rows = d.setdefault("rows", [])  # filled as rows finish: a timeout keeps them
        deadline = d["deadline"] - 8  # leave time to tabulate; later cases are recorded as skipped
        if dry:
            # The Triton interpreter runs the GPU backend's Python path at the tiny sizes (not a speed number).
            kb.run(device, dtype, kb.layer_specs(device, tiny=True), 0.02, ceilings, backends=["torch", "triton"],
                   rows=rows, deadline=deadline)
            d["note"] = "dry run: tiny layers on CPU, triton through its interpreter; times are not meaningful"
        else:
            kb.run(device, dtype, kb.layer_specs(device), 0.1, ceilings, rows=rows, deadline=deadline)
        print(kb.format_table(rows))
        failed = kb.our_failures(rows)
        if failed:
            d["error"] = f"{len(failed)} row(s) of ours failed: " + "; ".join(
                f"{r['layer']} M={r['M']} {r['impl']}: {r['error'][:160]}" for r in failed[:6])


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

        kb = kbench()
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
        layer = kb.make_layer(H, I, E, K, True, dtype, device)
        hidden, ids, weights = kb.make_inputs(layer, M, device)
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
                kb.sync(device)
                copier.start()
                copy_alone.append(copier.finish())
                work_alone.append(timed_work())
                kb.sync(device)
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


# ---------------------------------------------------------------------------------------- 6, 7. hooks
def run_hook(d: dict, device, dry: bool, bench_file: str, needs: list[str], what: str) -> None:
    """A step filled by ``multimoe_rt.benchmarks.<module>``'s ``gpu_check(device, dry, deadline, log) -> dict`` (deadline: a
    time.time() value, the step's limit less 2 s): its dict goes into the step's JSON ("error" in it, or in
    one of its "rows", fails the step). Skipped, with the reason, while the feature's
    modules do not import or the bench file has no gpu_check() yet."""
    import importlib

    for mod in needs:
        try:
            importlib.import_module(mod)
        except Exception as e:  # noqa: BLE001
            skip(d, what, f"not available yet: {mod} is not importable ({type(e).__name__}: {e})")
            return
    fn = getattr(importlib.import_module(f"multimoe_rt.benchmarks.{bench_file}"), "gpu_check", None)
    if fn is None:
        skip(d, what, f"not available yet: multimoe_rt.benchmarks.{bench_file} has no gpu_check(device, dry, deadline, log) "
                      f"({', '.join(needs)} import{'s' if len(needs) == 1 else ''})")
        return
    wall_deadline = time.time() + (d["deadline"] - time.monotonic()) - 2  # a time.time() value
    d.update(fn(device, dry, wall_deadline, print) or {})
    rows = d.get("rows") or []
    if any("error" in r for r in rows if isinstance(r, dict)):
        d.setdefault("error", "a row failed: " + "; ".join(str(r["error"])[:160] for r in rows if "error" in r)[:400])


def step_batched_forward(device, dry):
    """Decode step of the batched mixed-variant forward at 1, 16, 64 and 256 sequences spread over 4
    variants, against the same batch all of one variant (ms per step, tokens/s, device bytes)."""
    with Step("6_batched_forward") as d:
        run_hook(d, device, dry, "batched_forward", ["multimoe_rt.forward"],
                 "batched mixed-variant forward")


def step_delta_codecs(device, dry):
    """Experts stored as base + compressed delta (int4 / sign1 / lowrank) against the dense slab: fused_moe
    time at decode and prefill sizes, bytes per expert, error against the dense expert."""
    with Step("7_delta_codecs") as d:
        run_hook(d, device, dry, "delta_codecs", ["multimoe_rt.delta"], "delta codecs vs dense slab")


def step_synthetic(device, dry):
    """``bench-batch --synthetic large`` in bf16 (a test shape in a dry run): one variant, mixed dense copies,
    every expert shared, the sign1 and int4 plans and transformers, tokens/s and bytes against the roofline."""
    with Step("8_synthetic") as d:
        run_hook(d, device, dry, "synthetic", ["multimoe_rt.benchmarks.synthetic"], "batching at real layer shapes")


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
    global OUT_PATH, RESULT
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
        OUT_PATH = out_dir / name
        # Harness results (step 8's JSON) beside the check's own, so they come back from the device machine; the
        # re-executed process after step 1 inherits it.
        os.environ.setdefault("MULTIMOE_RESULTS", str(out_dir))
        RESULT.update(dry_run=dry, started=time.strftime("%Y-%m-%dT%H:%M:%S"), t0_epoch=time.time(),
                      host=socket.gethostname(), platform=platform.platform(), argv=sys.argv[1:],
                      limits_s=LIMITS, limit_scale=LIMIT_SCALE, json=str(OUT_PATH))
        print(f"gpu_check: JSON -> {OUT_PATH} (rewritten after every step); step limits {LIMITS} "
              f"(sum {sum(LIMITS.values())} s)"
              + (f", stretched x{LIMIT_SCALE:g} (GPU_CHECK_LIMIT_SCALE)" if LIMIT_SCALE != 1 else ""), flush=True)
        step_install(device, dry, args.skip_build, args.force_install, out_dir)
        # A fresh interpreter sees the new install (its .pth finder); carry on from the JSON.
        sys.stdout.flush()
        os.execv(sys.executable, [sys.executable, str(Path(__file__).resolve()), *sys.argv[1:], "--resume", str(OUT_PATH)])

    OUT_PATH = args.resume
    RESULT = json.loads(OUT_PATH.read_text())
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
    write_json()
    print(summary_table())
    print(f"  wrote {OUT_PATH}")
    print(f"gpu_check: {'FAILED steps: ' + ', '.join(failed) if failed else 'all steps ok'} "
          f"({RESULT['total_s']:.0f} s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
