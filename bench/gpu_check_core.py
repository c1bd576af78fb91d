"""The gpu_check's machinery: step time limits, the JSON rewritten after every step, and subprocesses killed with
their whole process group when a step's time runs out. Nothing of the project is imported here (it may not be
installed yet)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Step time limits in seconds (GPU and dry run alike); they must add up to <= 360.
LIMITS = {"1_install": 125, "2_env": 15, "3_tests": 60, "4_kernels": 45, "5_switch": 20,
          "6_batched_forward": 15, "7_delta_codecs": 15, "8_synthetic": 65}
assert sum(LIMITS.values()) <= 360
# A loaded 2-core CI machine compiles the CPU extension slower than a 16-core GPU machine builds everything:
# CI's dry run may stretch every limit by this factor (recorded in the JSON; the GPU run uses 1).
LIMIT_SCALE = float(os.environ.get("GPU_CHECK_LIMIT_SCALE", "1"))

# The check's JSON; the driver replaces its contents (never the object: the steps hold references to it).
RESULT: dict = {"steps": {}}
OUT_PATH: Path | None = None


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

