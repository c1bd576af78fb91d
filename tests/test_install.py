"""A fresh checkout must not shadow a dependency: Python puts the working directory (or a script's folder) first
on sys.path, so any importable name at the root of the checkout, or beside a bench script, wins over the
installed distribution of that name. transformers >= 5.25 imports Hugging Face's `kernels` package; our old
top-level kernels/ folder broke it."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# setup.py is the build script (nothing imports a module called `setup`).
ALLOWED_TOP_LEVEL = {"multimoe_rt", "setup"}


def _importable_names(folder: Path) -> set:
    names = set()
    for p in folder.iterdir():
        if p.is_dir() and (p / "__init__.py").exists():
            names.add(p.name)
        elif p.is_file() and p.suffix in (".py", ".so", ".pyd"):
            names.add(p.name.split(".")[0])
    return names


def test_checkout_root_holds_no_importable_name_but_the_package():
    assert _importable_names(ROOT) <= ALLOWED_TOP_LEVEL, _importable_names(ROOT) - ALLOWED_TOP_LEVEL


def test_bench_scripts_do_not_shadow_what_the_package_imports():
    # A script's folder is first on sys.path when it runs: none may be named like a module we (or transformers) import.
    imported = {"kernels", "transformers", "torch", "triton", "safetensors", "numpy", "tqdm", "fastapi", "uvicorn",
                "pydantic", "multimoe_rt", "matplotlib", "httpx", "openai", "huggingface_hub"}
    assert not _importable_names(ROOT / "bench") & imported


def test_transformers_hub_kernels_and_the_package_import_from_the_checkout_root():
    code = ("import transformers.integrations.hub_kernels, multimoe_rt, importlib.util; "
            "spec = importlib.util.find_spec('kernels'); print(spec.origin if spec else None)")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    origin = r.stdout.strip().splitlines()[-1]
    if origin == "None":
        pytest.skip("Hugging Face's kernels package is not installed (transformers < 5.25): nothing to shadow")
    assert Path(origin).parent.parent.name in ("site-packages", "dist-packages"), f"`kernels` is not the installed one: {origin}"


def test_the_triton_kernels_are_a_subpackage():
    spec = importlib.util.find_spec("multimoe_rt.kernels.grouped_gemm")
    assert spec is not None and Path(spec.origin).parent.parent.name == "multimoe_rt"


def test_a_bench_script_runs_from_the_checkout_root():
    r = subprocess.run([sys.executable, "bench/moe_kernels.py", "--help"], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "--only" in r.stdout


def test_the_gpu_check_finds_its_modules_beside_it_from_the_checkout_root():
    # Its step modules come from the script's own folder, first on sys.path: nothing there may need installing.
    r = subprocess.run([sys.executable, "bench/gpu_check.py", "--help"], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "--dry-run" in r.stdout
