"""The optional C++/CUDA extension multimoe_rt._C: whether it loaded, and thin wrappers.

``available`` / ``reason`` say whether the extension loaded and why not; ``has_cuda_ops`` whether it
was built with the CUDA sources; ``has_delta_ops`` whether it has the fused CPU delta ops; ``has_lowp_linear``
whether it has the CPU bf16/fp16-weight linear. Importing _C registers the ops torch.ops.multimoe_rt.align_cpu,
.sign1_matmul, .int4_matmul, .lowp_linear (and .align_cuda), which the wrappers call.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

# Written by setup.py at every build (in the source tree: an editable install finds it): status, the CUDA
# toolkit it used and how it found it, and on failure the compiler's own error lines.
BUILD_LOG = Path(__file__).resolve().parent.parent / "build" / "multimoe_rt_ext_build.json"


def build_info() -> dict | None:
    """The last build's record (see setup.py), or None where there is none (a wheel install)."""
    try:
        return json.loads(BUILD_LOG.read_text())
    except (OSError, ValueError):
        return None


def _build_reason(info: dict | None) -> str:
    if not info or info.get("status") == "ok":
        return ""
    why = [f"last build {info.get('status')}: {info.get('error', '?')}"]
    errs = info.get("compiler_errors") or info.get("log_tail", [])[-5:]
    if errs:
        why.append("compiler: " + " | ".join(errs[:5]))
    return "; ".join(why)


try:
    from . import _C  # noqa: F401  (registers the torch.library ops)

    available = True
    has_cuda_ops = bool(getattr(_C, "has_cuda_ops", False))
    _info = build_info()
    reason = "loaded multimoe_rt._C" + (" (CPU ops only)" if not has_cuda_ops else " (CPU and CUDA ops)")
    if torch.version.cuda and not has_cuda_ops and _info and not _info.get("with_cuda", True):
        reason += f"; CUDA sources not built: CUDA toolkit: {_info.get('cuda_home_how')}"
    if _build_reason(_info):
        reason += f"; an older build is loaded, the {_build_reason(_info)}"
except ImportError as e:  # not built (failed or skipped build), or built against another torch
    available = False
    has_cuda_ops = False
    _why = _build_reason(build_info())
    reason = (f"multimoe_rt._C not loadable ({e})" + (f"; {_why}" if _why else "")
              + "; build it with `pip install --no-build-isolation -e .` (the PyTorch/Triton paths work without it)")


def align_cpu(slot_ids: torch.Tensor, num_slots: int, block_m: int):
    """Contract align on CPU tensors in C++: (sorted_ids, block_slot, num_padded), all int32."""
    if not available:
        raise RuntimeError(f"align_cpu: {reason}")
    return torch.ops.multimoe_rt.align_cpu(slot_ids, int(num_slots), int(block_m))


def align_cuda(slot_ids: torch.Tensor, num_slots: int, block_m: int):
    """Contract align on CUDA tensors (CUDA kernel): (sorted_ids, block_slot, num_padded), all int32.
    slot_ids must lie in [0, num_slots); this is not checked on the device (it would need a sync)."""
    if not has_cuda_ops:
        raise RuntimeError("align_cuda: multimoe_rt._C was built without CUDA ops"
                           + ("" if available else f" ({reason})"))
    return torch.ops.multimoe_rt.align_cuda(slot_ids, int(num_slots), int(block_m))


def _has_op(name: str) -> bool:
    try:
        getattr(torch.ops.multimoe_rt, name)
        return True
    except (AttributeError, RuntimeError):
        return False


# The fused CPU delta ops; a _C built before they existed loads without them.
has_delta_ops = available and _has_op("sign1_matmul") and _has_op("int4_matmul")


def _need_delta_ops(what: str) -> None:
    if not has_delta_ops:
        raise RuntimeError(f"{what}: " + (f"{reason}" if not available else
                                          "the loaded multimoe_rt._C predates the fused delta ops; rebuild it "
                                          "with `pip install --no-build-isolation -e .`"))


def sign1_matmul(x: torch.Tensor, bits: torch.Tensor, scale: torch.Tensor, k: int) -> torch.Tensor:
    """``x @ D.T`` in float32 ``[M, N]`` for the sign1 delta ``D = scale[:, None] * (+-1 from bits)`` (delta.py's
    layout), read from the packed bits in C++; x ``[M, k]`` float32/bfloat16/float16 on CPU."""
    _need_delta_ops("sign1_matmul")
    return torch.ops.multimoe_rt.sign1_matmul(x, bits, scale, int(k))


def int4_matmul(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, k: int, group: int) -> torch.Tensor:
    """``x @ D.T`` in float32 ``[M, N]`` for the int4 delta ``D = (code - 8) * scales[n, col // group]``
    (delta.py's layout), dequantised in registers in C++; x ``[M, k]`` float32/bfloat16/float16 on CPU."""
    _need_delta_ops("int4_matmul")
    return torch.ops.multimoe_rt.int4_matmul(x, codes, scales, int(k), int(group))


def set_delta_cpu_kernel(name: str) -> None:
    """Force the CPU delta kernels ("auto", "scalar", "direct", "lut"), for tests and benchmarks."""
    _need_delta_ops("set_delta_cpu_kernel")
    _C.set_delta_cpu_kernel(name)


def delta_cpu_kernel() -> str:
    """The forced CPU delta kernel, or "auto"."""
    _need_delta_ops("delta_cpu_kernel")
    return _C.delta_cpu_kernel()


def delta_cpu_isa() -> str:
    """What the CPU delta ops run on "auto" here: "avx2" or "scalar"."""
    _need_delta_ops("delta_cpu_isa")
    return _C.delta_cpu_isa()


# The CPU linear with bf16/fp16 weights (csrc/lowp_linear_cpu.cpp); a _C built before it existed lacks it.
has_lowp_linear = available and _has_op("lowp_linear")


def lowp_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``x @ w.T`` in x's dtype, accumulated in float32, for CPU tensors x ``[M, K]`` (float32/bfloat16/float16)
    and w ``[N, K]`` bfloat16/float16 (rows may be strided); the weights are widened in registers. Callers
    pick it through ``cpu_linear.linear``, which knows where it beats torch."""
    if not has_lowp_linear:
        raise RuntimeError("lowp_linear: " + (f"{reason}" if not available else
                                              "the loaded multimoe_rt._C predates lowp_linear; rebuild it "
                                              "with `pip install --no-build-isolation -e .`"))
    return torch.ops.multimoe_rt.lowp_linear(x, w)
