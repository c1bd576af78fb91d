"""Step 1 of the gpu_check: install the project on a bare machine (editable, offline, against the preinstalled torch
and triton, which a constraints file pins), and report whether it imports with its extension."""
from __future__ import annotations

import json
import os
import platform
import sys
import tempfile
from pathlib import Path

import torch  # preinstalled; never installed by this check

from gpu_check_core import ROOT, Step, sh, skip, time_left

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
        # Run as a script (stdlib only): the package is not installed yet, so it cannot be imported.
        found = sh([py, str(ROOT / "multimoe_rt" / "_cuda_home.py")], 60, label="multimoe_rt/_cuda_home.py")
        cuda_home, _, how = found["tail"].strip().rpartition("\n")[2].partition("\t")
        if found["rc"] != 0 or cuda_home in ("", "None"):
            cuda_home, how = None, how or f"_cuda_home.py failed: {found['tail'][-300:]}"
        else:
            os.environ["CUDA_HOME"] = cuda_home
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

