"""Align (token, k) pairs by slab slot for the grouped GEMM, as one Triton program.

Semantics (contract "align"): pairs p = t*K + k are sorted by slot, stable by p within a slot; each
slot's run is padded to a multiple of BLOCK_M with the sentinel T*K; block_slot[b] is the slot of block b
and -1 for blocks past num_padded; entries of sorted_ids past num_padded are the sentinel.

Why a single program: the three steps (count, exclusive scan of padded counts, stable scatter) each
depend on the previous one over all pairs; in one CTA they are separated by barriers instead of kernel
launches, which is what decode (tens of pairs) wants. Prefill (thousands of pairs) walks the pairs in
chunks of CHUNK; the per-chunk rank uses a CHUNK x CHUNK comparison, so cost is O(P * CHUNK + S).
Stability comes from walking chunks in order and ranking within a chunk by position.
"""

import torch
import triton
import triton.language as tl

from ..config import settings
from ..torch_moe import check_align_inputs, padded_size


@triton.jit
def _chunk_ranks(slot_ptr, counts_ptr, start, lane, earlier, num_pairs):
    """For the chunk of pairs at ``start``: each pair's slot, its rank among the chunk's pairs of that
    slot (earlier positions first), how many of the chunk's pairs share its slot, and the slot's counter."""
    offs = start + lane
    valid = offs < num_pairs
    slot = tl.load(slot_ptr + offs, mask=valid, other=-1).to(tl.int32)
    same = (slot[:, None] == slot[None, :]) & valid[None, :]
    rank = tl.sum((same & earlier).to(tl.int32), axis=1)
    total = tl.sum(same.to(tl.int32), axis=1)
    base = tl.load(counts_ptr + slot, mask=valid, other=0)
    return offs, valid, slot, rank, total, base


@triton.jit
def _align_kernel(slot_ptr, counts_ptr, sorted_ptr, block_slot_ptr, num_padded_ptr,
                  num_pairs, num_slots, p_max,
                  BLOCK_M: tl.constexpr, CHUNK: tl.constexpr, SLOT_TILE: tl.constexpr):
    sentinel = num_pairs
    lane = tl.arange(0, CHUNK)
    # Pairs (rows) x pairs (cols) in a chunk: earlier[i, j] is true when j comes before i.
    earlier = lane[None, :] < lane[:, None]

    # 0. Initialise outputs and the per-slot counters.
    for start in range(0, p_max, CHUNK):
        offs = start + lane
        tl.store(sorted_ptr + offs, tl.full([CHUNK], 0, tl.int32) + sentinel, mask=offs < p_max)
    for start in range(0, p_max // BLOCK_M, CHUNK):
        offs = start + lane
        tl.store(block_slot_ptr + offs, tl.full([CHUNK], -1, tl.int32), mask=offs < p_max // BLOCK_M)
    for start in range(0, num_slots, CHUNK):
        offs = start + lane
        tl.store(counts_ptr + offs, tl.zeros([CHUNK], tl.int32), mask=offs < num_slots)
    tl.debug_barrier()

    # 1. Count pairs per slot. Within a chunk, the last occurrence of each slot writes the new count.
    for start in range(0, num_pairs, CHUNK):
        offs, valid, slot, rank, total, base = _chunk_ranks(slot_ptr, counts_ptr, start, lane, earlier, num_pairs)
        tl.debug_barrier()  # every lane has read its base before any lane updates it
        tl.store(counts_ptr + slot, base + total, mask=valid & (rank == total - 1))
        tl.debug_barrier()

    # 2. Exclusive scan of padded counts -> start offset of each slot's run (kept in counts).
    carry = tl.zeros([], tl.int32)
    slane = tl.arange(0, SLOT_TILE)
    for start in range(0, num_slots, SLOT_TILE):
        offs = start + slane
        cnt = tl.load(counts_ptr + offs, mask=offs < num_slots, other=0)
        padded = (cnt + BLOCK_M - 1) // BLOCK_M * BLOCK_M
        incl = tl.cumsum(padded, axis=0)
        tl.debug_barrier()
        tl.store(counts_ptr + offs, carry + incl - padded, mask=offs < num_slots)
        carry += tl.sum(padded, axis=0)
    tl.store(num_padded_ptr, carry)
    tl.debug_barrier()

    # 3. Stable scatter: destination = run start + number of earlier pairs with the same slot.
    for start in range(0, num_pairs, CHUNK):
        offs, valid, slot, rank, total, base = _chunk_ranks(slot_ptr, counts_ptr, start, lane, earlier, num_pairs)
        dest = base + rank
        tl.store(sorted_ptr + dest, offs.to(tl.int32), mask=valid)
        # Every block inside num_padded holds at least one real pair, so this covers all of them.
        tl.store(block_slot_ptr + dest // BLOCK_M, slot, mask=valid)
        tl.debug_barrier()
        tl.store(counts_ptr + slot, base + total, mask=valid & (rank == total - 1))
        tl.debug_barrier()


def _buffer(workspace, name, numel, dtype, device):
    """A view of workspace[name] with at least numel elements, or a fresh tensor."""
    if workspace is not None and name in workspace:
        buf = workspace[name]
        if buf.numel() < numel or buf.dtype != dtype or buf.device != device:
            raise ValueError(f"align workspace[{name!r}]: need >= {numel} elements of {dtype} on {device}, "
                             f"got {buf.numel()} of {buf.dtype} on {buf.device}")
        return buf.view(-1)[:numel]
    return torch.empty(numel, dtype=dtype, device=device)


def interpreting(device: torch.device) -> bool:
    """True when kernels run under the Triton interpreter (CPU tensors need it)."""
    return settings().triton_interpret or device.type == "cpu"


def check_launchable(device: torch.device, what: str) -> None:
    if device.type == "cpu" and not settings().triton_interpret:
        raise RuntimeError(f"{what}: CPU tensors need the Triton interpreter; set TRITON_INTERPRET=1 "
                           "before triton is first imported, or use the torch backend")


def align_triton(slot_ids: torch.Tensor, num_slots: int, block_m: int, workspace: dict | None = None,
                 chunk: int = 128):
    """Contract align: returns (sorted_ids int32 [P_max], block_slot int32 [P_max // block_m],
    num_padded int32 [1]). slot_ids [T, K] int32/int64 with values in [0, num_slots).

    workspace (optional): preallocated int32 tensors "sorted_ids" (>= P_max), "block_slot"
    (>= P_max // block_m), "num_padded" (>= 1), "align_counts" (>= num_slots); the returned outputs are
    views of them, so nothing is allocated on the device per call.
    """
    if slot_ids.dim() != 2:
        raise ValueError(f"align_triton: slot_ids must be [T, K], got shape {tuple(slot_ids.shape)}")
    check_align_inputs(slot_ids, num_slots, block_m)
    device = slot_ids.device
    check_launchable(device, "align_triton")
    num_pairs = slot_ids.numel()
    if device.type == "cpu" and num_pairs:  # cheap on CPU; on GPU a check would need a host sync
        lo, hi = int(slot_ids.min()), int(slot_ids.max())
        if lo < 0 or hi >= num_slots:
            raise ValueError(f"align_triton: slot_ids must lie in [0, {num_slots}), found [{lo}, {hi}]")
    p_max = padded_size(num_pairs, num_slots, block_m)
    sorted_ids = _buffer(workspace, "sorted_ids", p_max, torch.int32, device)
    block_slot = _buffer(workspace, "block_slot", p_max // block_m, torch.int32, device)
    num_padded = _buffer(workspace, "num_padded", 1, torch.int32, device)
    counts = _buffer(workspace, "align_counts", num_slots, torch.int32, device)
    slots = slot_ids.reshape(-1)
    if not slots.is_contiguous():
        slots = slots.contiguous()
    slot_tile = min(1024, triton.next_power_of_2(max(num_slots, 16)))
    _align_kernel[(1,)](slots, counts, sorted_ids, block_slot, num_padded,
                        num_pairs, num_slots, p_max,
                        BLOCK_M=block_m, CHUNK=chunk, SLOT_TILE=slot_tile, num_warps=4)
    return sorted_ids, block_slot, num_padded
