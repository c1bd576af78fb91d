"""The expert slab (one preallocated buffer per weight kind) and the variant-to-slot table.

The slab holds every stored expert once; the table is the single source of truth for which
slot serves (variant, layer, expert). Several entries may point at one slot: that is how
variants share an expert.
"""

from __future__ import annotations

from collections import OrderedDict

import torch

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class ExpertSlab:
    """Preallocated expert weights for ``num_slots`` experts.

    Gated (SwiGLU, Mixtral): ``w1[slot, 2I, H]`` holds [gate; up], ``w2[slot, H, I]`` down.
    ReLU (Switch):           ``w1[slot, I, H]``,  ``w2[slot, H, I]``.
    With ``bias`` (GPT-OSS): ``b1[slot, 2I]`` ([gate; up], like w1's rows) and ``b2[slot, H]``; else both None.
    """

    def __init__(self, num_slots: int, hidden: int, intermediate: int, gated: bool,
                 dtype: torch.dtype = torch.float32, device="cpu", bias: bool = False):
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
        self.b1 = torch.empty(num_slots, n1, dtype=dtype, device=self.device) if bias else None
        self.b2 = torch.empty(num_slots, hidden, dtype=dtype, device=self.device) if bias else None
        self.written = torch.zeros(num_slots, dtype=torch.bool)  # host-side: checked before kernels run
        self.host_tier: HostTier | None = None
        self.deltas = None  # multimoe_rt.delta.DeltaPools: ids past num_slots are base slot + compressed delta
        self._workspace, self._workspace_pairs = None, 0

    def workspace(self, tokens: int, top_k: int) -> dict:
        """Work buffers of the Triton MoE path for ``tokens`` tokens, allocated once and regrown only
        when a larger batch arrives (so decode steps allocate nothing). The output stays a fresh
        tensor: callers keep it past the next layer's call."""
        if self._workspace is None or tokens * top_k > self._workspace_pairs:
            pairs = max(tokens * top_k, 2 * self._workspace_pairs)
            if self.deltas is not None:
                from .kernels.delta_gemm import allocate_delta_workspace as allocate
            else:
                from .kernels.grouped_gemm import allocate_workspace as allocate
            ws = allocate(-(-pairs // top_k), top_k, self.hidden, self.intermediate, self.num_ids, self.dtype,
                          self.device)
            ws.pop("out")
            self._workspace, self._workspace_pairs = ws, pairs
        return self._workspace

    @property
    def has_bias(self) -> bool:
        return self.b1 is not None

    def attach_host_tier(self, tier: "HostTier") -> None:
        if self.has_bias:
            raise ValueError("a slab with expert biases cannot have a host tier (offloading biased experts is not "
                             "supported)")
        if self.deltas is not None:
            raise ValueError("a slab with deltas cannot have a host tier (deltas keep every expert on the device)")
        self.host_tier = tier

    def attach_deltas(self, pools) -> None:
        """Serve ids ``num_slots ..`` as base slot + compressed delta (``multimoe_rt.delta.DeltaPools``)."""
        if self.host_tier is not None:
            raise ValueError("a slab with a host tier cannot take deltas")
        if self.has_bias:
            raise ValueError("a slab with expert biases cannot take deltas")
        pools.check_slab(self.w1, self.w2)
        self.deltas = pools
        self._workspace, self._workspace_pairs = None, 0

    @property
    def num_ids(self) -> int:
        """Valid ids in a table: device slots, then host-tier ids or delta ids."""
        if self.deltas is not None:
            return self.deltas.num_ids
        return self.num_slots if self.host_tier is None else self.host_tier.first_host_id + self.host_tier.num_host

    @property
    def slot_nbytes(self) -> int:
        n = self.w1[0].numel() + self.w2[0].numel()
        if self.has_bias:
            n += self.b1[0].numel() + self.b2[0].numel()
        return n * self.w1.element_size()

    @property
    def nbytes(self) -> int:
        """Device bytes of the dense slots and the delta pools."""
        return self.slot_nbytes * self.num_slots + (0 if self.deltas is None else self.deltas.nbytes)

    def write(self, slot: int, w1: torch.Tensor, w2: torch.Tensor, b1: torch.Tensor | None = None,
              b2: torch.Tensor | None = None, stream=None) -> None:
        """Copy one expert into ``slot`` (with its biases ``b1``/``b2`` on a slab with ``bias``).

        On CUDA the copy goes through pinned host memory with ``non_blocking`` on ``stream``
        (so it can overlap compute); the caller synchronises the stream before using the slot.
        """
        if not 0 <= slot < self.num_slots:
            raise IndexError(f"slot {slot} out of range [0, {self.num_slots})")
        if (b1 is not None or b2 is not None) != self.has_bias or (b1 is None) != (b2 is None):
            raise ValueError(f"ExpertSlab.write: this slab {'holds' if self.has_bias else 'has no'} expert biases; "
                             f"got b1={'set' if b1 is not None else None}, b2={'set' if b2 is not None else None}")
        pairs = [("w1", w1, self.w1), ("w2", w2, self.w2)]
        if self.has_bias:
            pairs += [("b1", b1, self.b1), ("b2", b2, self.b2)]
        for name, src, dst in pairs:
            if tuple(src.shape) != tuple(dst.shape[1:]):
                raise ValueError(f"ExpertSlab.write: {name} has shape {tuple(src.shape)}, "
                                 f"expected {tuple(dst.shape[1:])}")
            if not src.is_floating_point():
                raise TypeError(f"ExpertSlab.write: {name} must be floating point, got {src.dtype}")
        if self.device.type == "cuda":
            with torch.cuda.stream(stream if stream is not None else torch.cuda.current_stream(self.device)):
                for _, src, dst in pairs:
                    if src.device.type == "cpu" and not src.is_pinned():
                        src = src.to(self.dtype).pin_memory()
                    dst[slot].copy_(src, non_blocking=True)
        else:
            for _, src, dst in pairs:
                dst[slot].copy_(src)
        self.written[slot] = True


class HostTier:
    """Experts that did not fit the device budget: kept in host memory (pinned where CUDA exists)
    and paged on use into a few cache slots of the slab, least recently used out first.

    Table entries ``>= first_host_id`` name host experts, so the table still says where every
    expert lives; ``translate`` turns resolved slot ids into slab slots, paging in what is
    missing. Knowing which experts a batch needs is a host sync: the price of offloading.
    """

    def __init__(self, slab: ExpertSlab, w1: list, w2: list, first_host_id: int, cache_slots):
        self.slab, self.first_host_id = slab, first_host_id
        pin = torch.cuda.is_available()
        self.w1 = [t.contiguous().pin_memory() if pin else t.contiguous() for t in w1]
        self.w2 = [t.contiguous().pin_memory() if pin else t.contiguous() for t in w2]
        self.num_host = len(self.w1)
        self.free = list(cache_slots)
        self.capacity = len(self.free)
        if self.capacity == 0:
            raise ValueError("HostTier needs at least one cache slot in the slab")
        self.lru: OrderedDict[int, int] = OrderedDict()  # host id -> cache slot
        # id -> slab slot: identity for device slots; a host id's entry is valid while it is cached
        self.remap = torch.arange(first_host_id + self.num_host, dtype=torch.int64, device=slab.device)
        self.stats = {"fetches": 0, "hits": 0, "bytes_copied": 0}

    def split(self, slot_ids: torch.Tensor) -> list[torch.Tensor] | None:
        """Token rows of ``slot_ids [T, K]`` in consecutive chunks whose host experts fit the cache (None: one
        call fits). A mixed batch can read variants x experts of a layer; one token reads at most K <= capacity."""
        is_host = slot_ids >= self.first_host_id
        host = slot_ids[is_host]
        if host.numel() == 0 or torch.unique(host).numel() <= self.capacity:
            return None
        chunks, current, start = [], set(), 0
        for t, row in enumerate(torch.where(is_host, slot_ids, -1).tolist()):
            need = {i for i in row if i >= 0}
            if len(current | need) > self.capacity:
                chunks.append(torch.arange(start, t, device=slot_ids.device))
                current, start = set(), t
            current |= need
        chunks.append(torch.arange(start, len(slot_ids), device=slot_ids.device))
        return chunks

    def translate(self, slot_ids: torch.Tensor) -> torch.Tensor:
        host = slot_ids[slot_ids >= self.first_host_id]
        if host.numel() == 0:
            return slot_ids
        needed = torch.unique(host).tolist()
        if len(needed) > self.capacity:
            raise RuntimeError(f"one call needs {len(needed)} host-tier experts but the cache has "
                               f"{self.capacity} slots")
        for h in needed:
            if h in self.lru:
                self.lru.move_to_end(h)
                self.stats["hits"] += 1
        for h in needed:
            if h in self.lru:
                continue
            # The needed ones were just moved to the back, so the front is never one of them.
            slot = self.free.pop() if self.free else self.lru.popitem(last=False)[1]
            i = h - self.first_host_id
            self.slab.write(slot, self.w1[i], self.w2[i])
            self.remap[h] = slot
            self.lru[h] = slot
            self.stats["fetches"] += 1
            self.stats["bytes_copied"] += self.slab.slot_nbytes
        return self.remap[slot_ids.long()]


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
        bad = (flat >= slab.num_ids).nonzero()
        if len(bad):
            v, l, e = bad[0].tolist()
            raise ValueError(f"SlotTable: entry (variant={v}, layer={l}, expert={e}) points at slot "
                             f"{int(flat[v, l, e])}, but the slab has {slab.num_ids} slots")
        if slab.deltas is not None:  # a delta id needs its base slot written
            flat = slab.deltas.desc[:, 0][flat.long()]
        on_device = flat.long().clamp(max=slab.num_slots - 1)
        if slab.host_tier is not None:  # host-tier ids are written on use, not up front
            on_device = torch.where(flat < slab.host_tier.first_host_id, on_device, 0)
        unwritten = ~slab.written[on_device] & (flat < (slab.num_slots if slab.host_tier is None
                                                        else slab.host_tier.first_host_id))
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
