"""The optional C++/CUDA extension multimoe_rt._C: whether it loaded, and thin wrappers.

``available`` / ``reason`` say whether the extension loaded and why not; ``has_cuda_ops`` whether it
was built with the CUDA sources. Importing _C registers the ops torch.ops.multimoe_rt.align_cpu
(and .align_cuda), which the wrappers call.
"""
from __future__ import annotations

import torch

try:
    from . import _C  # noqa: F401  (registers the torch.library ops)

    available = True
    reason = "loaded multimoe_rt._C"
    has_cuda_ops = bool(getattr(_C, "has_cuda_ops", False))
except ImportError as e:  # not built (failed or skipped build), or built against another torch
    available = False
    reason = (f"multimoe_rt._C not loadable ({e}); build it with `pip install --no-build-isolation -e .` "
              "(the PyTorch/Triton paths work without it)")
    has_cuda_ops = False


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
