"""Pure-PyTorch MoE backend and the float64 reference.

Both compute the function every backend must agree on (see ``ops.fused_moe``):

    a      = silu(x @ w1[s][:I].T) * (x @ w1[s][I:].T)   (gated, Mixtral)
           = relu(x @ w1[s].T)                           (ReLU, Switch)
    out[t] = sum_k topk_weights[t, k] * (a @ w2[s].T),   s = slot_ids[t, k]
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class MoEInputTypeError(TypeError, ValueError):
    """An input of the wrong dtype. A TypeError, and a ValueError for callers of the kernel entry points,
    which raised ValueError before the checks were shared."""


def check_moe_inputs(hidden, slot_ids, topk_weights, w1, w2, gated: bool, check_slots: bool = True) -> None:
    """Validate at the boundary so bad input raises here, never inside a kernel: the one check of the
    fused-MoE contract, used by ``ops.fused_moe`` and by the Triton kernel's entry point."""
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
        raise MoEInputTypeError(f"slot_ids must be int32 or int64, got {slot_ids.dtype}")
    for name, t in (("hidden", hidden), ("w1", w1), ("w2", w2), ("topk_weights", topk_weights)):
        if t.dtype not in FLOAT_DTYPES:
            raise MoEInputTypeError(f"{name} must be one of {FLOAT_DTYPES}, got {t.dtype}")
    if not (hidden.dtype == w1.dtype == w2.dtype):
        raise MoEInputTypeError(f"hidden, w1, w2 must share a dtype, got {hidden.dtype}, {w1.dtype}, {w2.dtype}")
    devices = {t.device for t in (hidden, slot_ids, topk_weights, w1, w2)}
    if len(devices) != 1:
        raise ValueError(f"all MoE inputs must be on one device, got {sorted(map(str, devices))}")
    if check_slots and slot_ids.numel():
        lo, hi = int(slot_ids.min()), int(slot_ids.max())  # a host sync: callers with a validated table skip it
        if lo < 0 or hi >= S:
            raise IndexError(f"slot id out of range: slot_ids span [{lo}, {hi}] but the slab has {S} slots")


def check_align_inputs(slot_ids: torch.Tensor, num_slots: int, block_m: int) -> None:
    """The one check of align's contract (``ops.align`` and the Triton align)."""
    if slot_ids.dtype not in (torch.int32, torch.int64):
        raise MoEInputTypeError(f"slot_ids must be int32 or int64, got {slot_ids.dtype}")
    if block_m <= 0 or num_slots <= 0:
        raise ValueError(f"block_m and num_slots must be positive, got {block_m}, {num_slots}")


def _activate(h: torch.Tensor, gated: bool) -> torch.Tensor:
    if gated:
        gate, up = h.chunk(2, dim=-1)
        return F.silu(gate) * up
    return F.relu(h)


def expert_forward(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, gated: bool) -> torch.Tensor:
    """One expert on rows of ``x`` (the contract's function for one slot, routing weight 1)."""
    return _activate(x @ w1.T, gated) @ w2.T


def padded_size(num_pairs: int, num_slots: int, block_m: int) -> int:
    """Length of align's outputs: the worst-case padded length, a multiple of ``block_m``."""
    worst = num_pairs + min(num_pairs, num_slots) * (block_m - 1)
    return -(-worst // block_m) * block_m


def align_torch(slot_ids: torch.Tensor, num_slots: int, block_m: int):
    """Sort token-expert pairs by slot and pad each slot's run to a multiple of ``block_m``.

    Returns ``(sorted_ids, block_slot, num_padded)``; padding entries hold the sentinel ``T*K``
    and blocks past ``num_padded`` have slot -1. The order inside one slot is the pair order,
    so every implementation produces identical outputs.
    """
    flat = slot_ids.reshape(-1).to(torch.int64)
    numel = flat.numel()
    device = slot_ids.device
    p_max = padded_size(numel, num_slots, block_m)
    sorted_ids = torch.full((p_max,), numel, dtype=torch.int32, device=device)
    block_slot = torch.full((p_max // block_m,), -1, dtype=torch.int32, device=device)
    if numel == 0:
        return sorted_ids, block_slot, torch.zeros(1, dtype=torch.int32, device=device)

    counts = torch.bincount(flat, minlength=num_slots)
    padded = (counts + block_m - 1) // block_m * block_m
    starts = torch.cumsum(padded, 0) - padded  # where each slot's run begins
    order = torch.sort(flat, stable=True).indices
    run_starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(numel, device=device) - run_starts[flat[order]]
    sorted_ids[starts[flat[order]] + rank] = order.to(torch.int32)

    num_padded = padded.sum()
    blocks_per_slot = padded // block_m
    block_slot[: int(num_padded) // block_m] = torch.repeat_interleave(
        torch.arange(num_slots, device=device, dtype=torch.int32), blocks_per_slot
    )
    return sorted_ids, block_slot, num_padded.to(torch.int32).reshape(1)


def moe_reference(hidden, slot_ids, topk_weights, w1, w2, gated: bool) -> torch.Tensor:
    """The float64 reference: one token-expert pair at a time, no sorting, no tricks."""
    x = hidden.double()
    out = torch.zeros(hidden.shape[0], w2.shape[1], dtype=torch.float64, device=hidden.device)
    for k in range(slot_ids.shape[1]):
        s = slot_ids[:, k].long()
        h = torch.einsum("th,tnh->tn", x, w1[s].double())
        a = _activate(h, gated)
        y = torch.einsum("ti,thi->th", a, w2[s].double())
        out += topk_weights[:, k].double()[:, None] * y
    return out


def moe_torch(hidden, slot_ids, topk_weights, w1, w2, gated: bool) -> torch.Tensor:
    """Sort pairs by slot, run one matmul per contiguous slot run, reduce over top-k in fp32.

    ``torch._grouped_mm`` would fuse the per-run matmuls but it needs CUDA (and bf16 on most
    builds); the loop here is over the slots that actually received tokens, never over tokens.
    """
    T, K = slot_ids.shape
    flat = slot_ids.reshape(-1).long()
    order = torch.sort(flat, stable=True).indices
    tokens = order // K
    counts = torch.bincount(flat, minlength=w1.shape[0]).tolist()
    x = hidden[tokens]
    pair_out = torch.empty(T * K, hidden.shape[1], dtype=torch.float32, device=hidden.device)
    start = 0
    for slot, n in enumerate(counts):
        if n == 0:
            continue
        xs = x[start : start + n]
        a = _activate(xs @ w1[slot].T, gated)
        pair_out[order[start : start + n]] = (a @ w2[slot].T).float()
        start += n
    pair_out *= topk_weights.reshape(-1, 1).float()
    return pair_out.view(T, K, -1).sum(1).to(hidden.dtype)
