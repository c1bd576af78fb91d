"""The expert slab (one preallocated buffer per weight kind) and the variant-to-slot table.

The slab holds every stored expert once; the table is the single source of truth for which
slot serves (variant, layer, expert). Several entries may point at one slot: that is how
variants share an expert.
"""

from __future__ import annotations

import torch

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class ExpertSlab:
    """Preallocated expert weights for ``num_slots`` experts.

    Gated (SwiGLU, Mixtral): ``w1[slot, 2I, H]`` holds [gate; up], ``w2[slot, H, I]`` down.
    ReLU (Switch):           ``w1[slot, I, H]``,  ``w2[slot, H, I]``.
    """

    def __init__(self, num_slots: int, hidden: int, intermediate: int, gated: bool,
                 dtype: torch.dtype = torch.float32, device="cpu"):
        if num_slots <= 0 or hidden <= 0 or intermediate <= 0:
            raise ValueError(f"ExpertSlab needs positive sizes, got num_slots={num_slots}, "
                             f"hidden={hidden}, intermediate={intermediate}")
        if dtype not in DTYPES:
            raise ValueError(f"ExpertSlab dtype must be one of {DTYPES}, got {dtype}")
        self.num_slots, self.hidden, self.intermediate, self.gated = num_slots, hidden, intermediate, gated
        self.dtype, self.device = dtype, torch.device(device)
        n1 = 2 * intermediate if gated else intermediate
        self.w1 = torch.empty(num_slots, n1, hidden, dtype=dtype, device=self.device)
        self.w2 = torch.empty(num_slots, hidden, intermediate, dtype=dtype, device=self.device)
        self.written = torch.zeros(num_slots, dtype=torch.bool)  # host-side: checked before kernels run

    @property
    def slot_nbytes(self) -> int:
        return (self.w1[0].numel() + self.w2[0].numel()) * self.w1.element_size()

    @property
    def nbytes(self) -> int:
        return self.slot_nbytes * self.num_slots

    def write(self, slot: int, w1: torch.Tensor, w2: torch.Tensor, stream=None) -> None:
        """Copy one expert into ``slot``.

        On CUDA the copy goes through pinned host memory with ``non_blocking`` on ``stream``
        (so it can overlap compute); the caller synchronises the stream before using the slot.
        """
        if not 0 <= slot < self.num_slots:
            raise IndexError(f"slot {slot} out of range [0, {self.num_slots})")
        for name, src, dst in (("w1", w1, self.w1), ("w2", w2, self.w2)):
            if tuple(src.shape) != tuple(dst.shape[1:]):
                raise ValueError(f"ExpertSlab.write: {name} has shape {tuple(src.shape)}, "
                                 f"expected {tuple(dst.shape[1:])}")
            if not src.is_floating_point():
                raise TypeError(f"ExpertSlab.write: {name} must be floating point, got {src.dtype}")
        if self.device.type == "cuda":
            with torch.cuda.stream(stream if stream is not None else torch.cuda.current_stream(self.device)):
                for src, dst in ((w1, self.w1), (w2, self.w2)):
                    if src.device.type == "cpu" and not src.is_pinned():
                        src = src.to(self.dtype).pin_memory()
                    dst[slot].copy_(src, non_blocking=True)
        else:
            self.w1[slot].copy_(w1)
            self.w2[slot].copy_(w2)
        self.written[slot] = True


class SlotTable:
    """int32 ``[num_variants, num_layers, num_experts] -> slot`` on the device; -1 means unset."""

    def __init__(self, num_variants: int, num_layers: int, num_experts: int, device="cpu"):
        self.shape = (num_variants, num_layers, num_experts)
        self.slots = torch.full(self.shape, -1, dtype=torch.int32, device=device)

    @property
    def num_variants(self) -> int:
        return self.shape[0]

    def set(self, variant: int, layer: int, expert: int, slot: int) -> None:
        for what, i, n in (("variant", variant, self.shape[0]), ("layer", layer, self.shape[1]),
                           ("expert", expert, self.shape[2])):
            if not 0 <= i < n:
                raise IndexError(f"SlotTable.set: {what} {i} out of range [0, {n})")
        self.slots[variant, layer, expert] = slot

    def validate(self, slab: ExpertSlab) -> None:
        """Every entry must point at a slot of ``slab`` that has been written."""
        flat = self.slots.cpu()
        unset = (flat < 0).nonzero()
        if len(unset):
            v, l, e = unset[0].tolist()
            raise ValueError(f"SlotTable: entry (variant={v}, layer={l}, expert={e}) is unset "
                             f"({len(unset)} unset entries in all)")
        bad = (flat >= slab.num_slots).nonzero()
        if len(bad):
            v, l, e = bad[0].tolist()
            raise ValueError(f"SlotTable: entry (variant={v}, layer={l}, expert={e}) points at slot "
                             f"{int(flat[v, l, e])}, but the slab has {slab.num_slots} slots")
        unwritten = ~slab.written[flat.long()]
        if unwritten.any():
            v, l, e = unwritten.nonzero()[0].tolist()
            raise ValueError(f"SlotTable: entry (variant={v}, layer={l}, expert={e}) points at slot "
                             f"{int(flat[v, l, e])}, which was never written")

    def resolve(self, layer: int, topk_ids: torch.Tensor, variant_ids) -> torch.Tensor:
        """Slot ids ``[T, K]`` for a layer's router output, on device with no host sync.

        ``variant_ids`` is one int (the active variant) or an int tensor ``[T]`` so one batch
        may mix variants.
        """
        if not 0 <= layer < self.shape[1]:
            raise IndexError(f"SlotTable.resolve: layer {layer} out of range [0, {self.shape[1]})")
        rows = self.slots[:, layer]  # [V, E]
        if isinstance(variant_ids, int):
            if not 0 <= variant_ids < self.shape[0]:
                raise IndexError(f"SlotTable.resolve: variant {variant_ids} out of range [0, {self.shape[0]})")
            return rows[variant_ids][topk_ids.long()]
        return rows[variant_ids.long()[:, None], topk_ids.long()]
