"""The MoE op API: ``torch.ops.multimoe_rt.fused_moe`` and ``torch.ops.multimoe_rt.align``.

Other runtimes call these on plain tensors (hidden states, slot ids, routing weights, slab
tensors); ``torch.compile`` traces through them thanks to the fake implementations. Our own
classes are thin layers over them.

Backends: ``triton`` (GPU; CPU only under ``TRITON_INTERPRET=1``), ``torch`` (pure PyTorch)
and ``reference`` (float64). Default: triton on CUDA tensors, torch otherwise; the
``MULTIMOE_BACKEND`` environment variable or the ``backend`` argument override it.
"""

from __future__ import annotations

import functools

import torch

from . import torch_moe
from .torch_moe import FLOAT_DTYPES, MoEInputTypeError, check_align_inputs, check_moe_inputs  # noqa: F401
from .config import settings

BACKENDS = ("triton", "torch", "reference")
DEFAULT_BLOCK_M = 16


@functools.cache  # whether triton imports and CUDA exists does not change within a process
def triton_status() -> tuple[bool, str]:
    """Whether the Triton backend can run here, and why not."""
    try:
        import triton  # noqa: F401
    except Exception as e:  # ImportError or a broken install
        return False, f"triton not importable: {e}"
    if torch.cuda.is_available():
        return True, "CUDA device"
    if settings().triton_interpret:
        return True, "TRITON_INTERPRET=1 (CPU interpreter, slow: for tests)"
    return False, "no CUDA device (set TRITON_INTERPRET=1 before importing triton to run it on CPU)"


def choose_backend(device: torch.device, backend: str | None = None) -> str:
    backend = backend or settings().backend or ("triton" if device.type == "cuda" else "torch")
    if backend not in BACKENDS:
        raise ValueError(f"unknown MoE backend {backend!r}; choose one of {BACKENDS}")
    if backend == "triton":
        ok, why = triton_status()
        if not ok:
            raise RuntimeError(f"the triton backend is unavailable: {why}")
    return backend


@torch.library.custom_op("multimoe_rt::fused_moe", mutates_args=())
def _fused_moe_op(hidden: torch.Tensor, slot_ids: torch.Tensor, topk_weights: torch.Tensor,
                  w1: torch.Tensor, w2: torch.Tensor, gated: bool, backend: str) -> torch.Tensor:
    if backend == "triton":
        from .kernels.grouped_gemm import fused_moe_triton
        return fused_moe_triton(hidden, slot_ids, topk_weights, w1, w2, gated)
    if backend == "reference":
        return torch_moe.moe_reference(hidden, slot_ids, topk_weights, w1, w2, gated).to(hidden.dtype)
    return torch_moe.moe_torch(hidden, slot_ids, topk_weights, w1, w2, gated)


@_fused_moe_op.register_fake
def _(hidden, slot_ids, topk_weights, w1, w2, gated, backend):
    return hidden.new_empty(hidden.shape[0], w2.shape[1])


@torch.library.custom_op("multimoe_rt::align", mutates_args=())
def _align_op(slot_ids: torch.Tensor, num_slots: int, block_m: int,
              backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if backend == "triton":
        from .kernels.align import align_triton
        return align_triton(slot_ids, num_slots, block_m)
    if backend == "cpp":
        from . import _ext
        return _ext.align_cpu(slot_ids, num_slots, block_m) if slot_ids.device.type == "cpu" \
            else _ext.align_cuda(slot_ids, num_slots, block_m)
    return torch_moe.align_torch(slot_ids, num_slots, block_m)


@_align_op.register_fake
def _(slot_ids, num_slots, block_m, backend):
    p_max = torch_moe.padded_size(slot_ids.numel(), num_slots, block_m)
    return (slot_ids.new_empty(p_max, dtype=torch.int32), slot_ids.new_empty(p_max // block_m, dtype=torch.int32),
            slot_ids.new_empty(1, dtype=torch.int32))


def fused_moe(hidden, slot_ids, topk_weights, w1, w2, gated: bool, backend: str | None = None,
              check_slots: bool = True, workspace: dict | None = None) -> torch.Tensor:
    """Route each token's top-k (slot, weight) pairs through the slab experts; returns ``[T, H]``.

    ``workspace`` (triton backend only): preallocated work buffers (``ExpertSlab.workspace``) so the
    expert path does not allocate per step; that eager path skips the custom op, which
    ``torch.compile`` traces without it.
    """
    check_moe_inputs(hidden, slot_ids, topk_weights, w1, w2, gated, check_slots)
    backend = choose_backend(hidden.device, backend)
    if workspace is not None and backend == "triton" and not torch.compiler.is_compiling():
        from .kernels.grouped_gemm import fused_moe_triton
        return fused_moe_triton(hidden.contiguous(), slot_ids.contiguous(), topk_weights.contiguous(), w1, w2,
                                gated, workspace=workspace)
    return torch.ops.multimoe_rt.fused_moe(hidden.contiguous(), slot_ids.contiguous(), topk_weights.contiguous(),
                                           w1, w2, gated, backend)


def align(slot_ids, num_slots: int, block_m: int = DEFAULT_BLOCK_M, backend: str | None = None):
    """Sort pairs by slot, pad runs to ``block_m``: ``(sorted_ids, block_slot, num_padded)``."""
    check_align_inputs(slot_ids, num_slots, block_m)
    backend = backend or ("triton" if slot_ids.device.type == "cuda" else "torch")
    if backend == "reference":
        backend = "torch"
    if backend not in ("triton", "torch", "cpp"):
        raise ValueError(f"unknown align backend {backend!r}; choose triton, torch or cpp")
    return torch.ops.multimoe_rt.align(slot_ids.contiguous(), num_slots, block_m, backend)
