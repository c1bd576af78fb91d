"""Find the CUDA toolkit directory from the real ``nvcc`` (stdlib only: setup.py loads this file by
path and bench/gpu_check.py runs it as a script, both before the package is installed).

torch guesses CUDA_HOME as the parent of the directory of the first ``nvcc`` on PATH. Where that ``nvcc`` is a
wrapper script (``/usr/local/bin/nvcc`` running ``exec /usr/local/cuda-13.0/bin/nvcc "$@"``), the guess is
``/usr/local``, ``cuda_runtime.h`` is not found there, and the CUDA extension silently does not build.
Here: an existing CUDA_HOME / CUDA_PATH that holds the headers wins; else the nvcc on PATH with symlinks
resolved; else the directory nvcc itself reports (``nvcc --dryrun`` prints ``#$ _HERE_=<its bin dir>``);
else /usr/local/cuda.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess


def is_toolkit(home: str | None) -> bool:
    return bool(home) and (os.path.isfile(os.path.join(home, "include", "cuda_runtime.h"))
                           or any(os.path.isfile(os.path.join(home, "targets", t, "include", "cuda_runtime.h"))
                                  for t in ("x86_64-linux", "sbsa-linux", "aarch64-linux")))


def find_cuda_home() -> tuple[str | None, str]:
    """(toolkit dir or None, how it was found)."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and is_toolkit(home):
            return home, f"${var}"
    nvcc = shutil.which("nvcc")
    if nvcc:
        real = os.path.realpath(nvcc)
        home = os.path.dirname(os.path.dirname(real))
        if is_toolkit(home):
            return home, f"nvcc on PATH ({nvcc}" + (f" -> {real})" if real != nvcc else ")")
        try:  # a wrapper script: ask the real nvcc where it lives
            p = subprocess.run([nvcc, "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
                               capture_output=True, text=True, timeout=30)
            m = re.search(r"^#\$ _HERE_=(.+)$", p.stdout + p.stderr, re.M)
            if m:
                home = os.path.dirname(m.group(1).strip())
                if is_toolkit(home):
                    return home, f"nvcc --dryrun (_HERE_; {nvcc} is a wrapper)"
        except (OSError, subprocess.SubprocessError):
            pass
    if is_toolkit("/usr/local/cuda"):
        return "/usr/local/cuda", "/usr/local/cuda"
    return None, "no CUDA toolkit found (no nvcc on PATH whose directory holds include/cuda_runtime.h)"


def ensure_cuda_home() -> tuple[str | None, str]:
    """Set CUDA_HOME in os.environ from find_cuda_home() (before torch.utils.cpp_extension is imported)."""
    home, how = find_cuda_home()
    if home:
        os.environ["CUDA_HOME"] = home
    return home, how


if __name__ == "__main__":
    print(*find_cuda_home(), sep="\t")
