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
from .config import settings

BACKENDS = ("triton", "torch", "reference")
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
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


def check_moe_inputs(hidden, slot_ids, topk_weights, w1, w2, gated: bool, check_slots: bool = True) -> None:
    """Validate at the boundary so bad input raises here, never inside a kernel."""
    if hidden.dim() != 2:
        raise ValueError(f"hidden must be [T, H], got shape {tuple(hidden.shape)}")
    T, H = hidden.shape
    if w1.dim() != 3 or w2.dim() != 3:
        raise ValueError(f"w1/w2 must be [S, N, H]/[S, H, I], got {tuple(w1.shape)} and {tuple(w2.shape)}")
    S, n1, h1 = w1.shape
    I = w2.shape[2]
    expected_n1 = 2 * I if gated else I
    if h1 != H or w2.shape[1] != H or w2.shape[0] != S or n1 != expected_n1:
        raise ValueError(f"expert shapes do not match: hidden H={H}, w1 {tuple(w1.shape)} (expected "
                         f"[{S}, {expected_n1}, {H}] for gated={gated}), w2 {tuple(w2.shape)} (expected [{S}, {H}, {I}])")
    if slot_ids.dim() != 2 or slot_ids.shape[0] != T or tuple(topk_weights.shape) != tuple(slot_ids.shape):
        raise ValueError(f"slot_ids and topk_weights must both be [T={T}, K], got {tuple(slot_ids.shape)} "
                         f"and {tuple(topk_weights.shape)}")
    if slot_ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"slot_ids must be int32 or int64, got {slot_ids.dtype}")
    for name, t in (("hidden", hidden), ("w1", w1), ("w2", w2), ("topk_weights", topk_weights)):
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} must be one of {FLOAT_DTYPES}, got {t.dtype}")
    if not (hidden.dtype == w1.dtype == w2.dtype):
        raise TypeError(f"hidden, w1, w2 must share a dtype, got {hidden.dtype}, {w1.dtype}, {w2.dtype}")
    devices = {t.device for t in (hidden, slot_ids, topk_weights, w1, w2)}
    if len(devices) != 1:
        raise ValueError(f"all MoE inputs must be on one device, got {sorted(map(str, devices))}")
    if check_slots and slot_ids.numel():
        lo, hi = int(slot_ids.min()), int(slot_ids.max())  # a host sync: callers with a validated table skip it
        if lo < 0 or hi >= S:
            raise IndexError(f"slot id out of range: slot_ids span [{lo}, {hi}] but the slab has {S} slots")


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
    if slot_ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"slot_ids must be int32 or int64, got {slot_ids.dtype}")
    if block_m <= 0 or num_slots <= 0:
        raise ValueError(f"block_m and num_slots must be positive, got {block_m}, {num_slots}")
    backend = backend or ("triton" if slot_ids.device.type == "cuda" else "torch")
    if backend == "reference":
        backend = "torch"
    if backend not in ("triton", "torch", "cpp"):
        raise ValueError(f"unknown align backend {backend!r}; choose triton, torch or cpp")
    return torch.ops.multimoe_rt.align(slot_ids.contiguous(), num_slots, block_m, backend)
