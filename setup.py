"""Build multimoe_rt with its optional C++/CUDA extension multimoe_rt._C.

    pip install --no-build-isolation -e .

The CPU ops (csrc/align_cpu.cpp, csrc/bindings.cpp) are always built; the CUDA sources
(csrc/*.cu, csrc/bindings_cuda.cpp) only when this PyTorch has CUDA and a CUDA toolkit is found.
Arch: TORCH_CUDA_ARCH_LIST if set, else sm_90 (Hopper). If the extension fails to build, the
install still succeeds with a warning and the package falls back to PyTorch/Triton
(multimoe_rt._ext.reason says why). Set MULTIMOE_NO_EXT=1 to skip the extension altogether.
"""
import glob
import importlib.util
import json
import os
import sys
import tempfile

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
# What the last extension build did and, if it failed, the compiler's own output: multimoe_rt._ext reads it,
# so runtime_info() says why _C is missing even when pip ran with -q.
BUILD_LOG = os.path.join(ROOT, "build", "multimoe_rt_ext_build.json")


def _write_build_log(**info):
    try:
        os.makedirs(os.path.dirname(BUILD_LOG), exist_ok=True)
        with open(BUILD_LOG, "w") as f:
            json.dump(info, f, indent=1)
    except OSError:
        pass


def _cuda_home():
    """CUDA_HOME from the real nvcc (multimoe_rt/_cuda_home.py, loaded by path): torch's own guess from a
    wrapper script on PATH is wrong. Must run before torch.utils.cpp_extension is imported."""
    spec = importlib.util.spec_from_file_location("_multimoe_cuda_home", os.path.join(ROOT, "multimoe_rt", "_cuda_home.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.ensure_cuda_home()


def _extensions():
    if os.environ.get("MULTIMOE_NO_EXT") == "1":
        _write_build_log(status="skipped", error="MULTIMOE_NO_EXT=1")
        return [], {}
    cuda_home, cuda_home_how = _cuda_home()
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except Exception as e:  # noqa: BLE001 - any import failure just means no extension
        print(f"multimoe_rt setup: WARNING: torch not importable ({e}); building without multimoe_rt._C",
              file=sys.stderr)
        _write_build_log(status="skipped", error=f"torch not importable at build time: {e}")
        return [], {}

    class SoftBuildExt(BuildExtension):
        """BuildExtension that turns a failed compile into a warning: the package must import anyway.
        A failed extension is dropped from the later steps (copy in place, wheel outputs)."""

        failed = set()

        def run(self):
            try:
                super().run()
            except Exception as e:  # noqa: BLE001
                _write_build_log(status="failed", error=f"{type(e).__name__}: {e}"[:2000], cuda_home=cuda_home,
                                 cuda_home_how=cuda_home_how)
                self._warn(e)

        def build_extension(self, ext):
            # The compiler writes to fds 1/2 (torch runs ninja verbosely), not into the exception: capture
            # them to a file, replay them, and keep their tail in BUILD_LOG.
            with tempfile.TemporaryFile() as cap:
                sys.stdout.flush(); sys.stderr.flush()
                saved = os.dup(1), os.dup(2)
                os.dup2(cap.fileno(), 1); os.dup2(cap.fileno(), 2)
                error = None
                try:
                    super().build_extension(ext)
                except Exception as e:  # noqa: BLE001
                    error = e
                finally:
                    sys.stdout.flush(); sys.stderr.flush()
                    os.dup2(saved[0], 1); os.dup2(saved[1], 2)
                    os.close(saved[0]); os.close(saved[1])
                cap.seek(0)
                log = cap.read().decode(errors="replace")
            sys.stdout.write(log)
            sys.stdout.flush()
            info = dict(ext=ext.name, with_cuda=with_cuda, cuda_home=cuda_home, cuda_home_how=cuda_home_how,
                        torch=torch.__version__, torch_cuda=torch.version.cuda,
                        arch=os.environ.get("TORCH_CUDA_ARCH_LIST"))
            if error is None:
                _write_build_log(status="ok", **info)
                return
            lines = [l for l in log.splitlines() if l.strip()]
            errs = [l for l in lines if "error" in l.lower() or "fatal" in l.lower()]
            _write_build_log(status="failed", error=f"{type(error).__name__}: {error}"[:2000],
                             compiler_errors=errs[:20], log_tail=lines[-60:], **info)
            self.failed.add(ext.name)
            self._warn(error)

        def _drop_failed(self):
            self.extensions = [e for e in self.extensions if e.name not in self.failed]

        def copy_extensions_to_source(self):
            self._drop_failed()
            super().copy_extensions_to_source()

        def get_outputs(self):
            self._drop_failed()
            return super().get_outputs()

        def get_output_mapping(self):
            self._drop_failed()
            return super().get_output_mapping()

        @staticmethod
        def _warn(e):
            print("\n" + "=" * 78 + f"\nmultimoe_rt setup: WARNING: building multimoe_rt._C failed:\n  {e}\n"
                  "The package installs without it and uses the PyTorch/Triton paths.\n" + "=" * 78 + "\n",
                  file=sys.stderr)

    # No -std flag: torch.utils.cpp_extension picks the standard its headers need (c++17/c++20), and nvcc
    # rejects a second -std.
    cxx = ["-O3"]
    sources = sorted(f for f in glob.glob("csrc/*.cpp") if not f.endswith("_cuda.cpp"))
    with_cuda = bool(torch.version.cuda) and CUDA_HOME is not None and os.environ.get("MULTIMOE_NO_CUDA") != "1"
    if torch.version.cuda and not with_cuda:
        print(f"multimoe_rt setup: WARNING: torch has CUDA {torch.version.cuda} but the CUDA ops are not built: "
              + ("MULTIMOE_NO_CUDA=1" if os.environ.get("MULTIMOE_NO_CUDA") == "1" else cuda_home_how),
              file=sys.stderr)
    if with_cuda:
        if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
            os.environ["TORCH_CUDA_ARCH_LIST"] = "9.0"  # -> -gencode=arch=compute_90,code=sm_90
        sources += sorted(glob.glob("csrc/*.cu")) + ["csrc/bindings_cuda.cpp"]
        ext = CUDAExtension(
            "multimoe_rt._C", sources, include_dirs=[os.path.join(ROOT, "csrc")],
            define_macros=[("MULTIMOE_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3"]})
    else:
        ext = CppExtension("multimoe_rt._C", sources, include_dirs=[os.path.join(ROOT, "csrc")],
                           extra_compile_args={"cxx": cxx})
    return [ext], {"build_ext": SoftBuildExt.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    packages=["multimoe_rt", "multimoe_rt.benchmarks", "multimoe_rt.cli", "multimoe_rt.kernels", "multimoe_rt.integrations",
              "multimoe_rt.lab", "multimoe_rt.lab.qos", "multimoe_rt.plan"],
    package_data={"multimoe_rt.kernels": ["configs/*.json"], "multimoe_rt.lab": ["recipes/*.json"]},
    include_package_data=True,
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
