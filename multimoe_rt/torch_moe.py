"""Pure-PyTorch MoE backend and the float64 reference.

Both compute the function every backend must agree on (see ``ops.fused_moe``):

    a      = silu(x @ w1[s][:I].T) * (x @ w1[s][I:].T)   (gated, Mixtral)
           = relu(x @ w1[s].T)                           (ReLU, Switch)
    out[t] = sum_k topk_weights[t, k] * (a @ w2[s].T),   s = slot_ids[t, k]
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


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
