"""The QoS experiment's baselines: batch-1 systems the lane driver (``lanes.py``) feeds, beside "ours" (the
runtime's ``engine.Engine`` at ``max_seqs=1``).

* ``ResidentSystem``: every variant fully on the device, one plain transformers model each (the
  upper bound; only possible when memory allows).
* ``SwapSystem``: one model slot; a request for another variant copies that whole variant (experts
  included) into the slot from host memory. Host copies are read from disk once at start, so a swap
  measures the host->device copy, not the disk.
* ``PartitionedSystem``: MIG-like. N independent instances, one per variant, each with 1/N of the
  device memory budget and 1/N of the compute, each served by its own lane (worker thread and
  queue). Memory: an instance keeps its non-expert weights plus an LRU cache of
  ``(budget/N - non-expert bytes) / expert bytes`` expert slots on the device (at least one layer's
  experts); the rest of its experts stay in host memory and are copied in when the router picks them.
  Compute: on CPU each instance's worker runs with ``max(1, threads // N)`` torch threads and the
  instances run concurrently; on CUDA each instance computes on its own stream (the GPU time-slices
  them; no SM partitioning).
"""

from __future__ import annotations

import contextlib
import threading

import torch
from torch import nn

from ...checkpoint import VariantSet
from ...errors import UnknownVariant
from ...experts import ActiveVariant, SlabExperts, moe_layer_prefixes
from ...model import MODEL_CLASSES, hf_generate
from ...slab import ExpertSlab, HostTier, SlotTable


def _module_bytes(model: nn.Module) -> int:
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


def _load(path, family: str, device, dtype) -> nn.Module:
    model = MODEL_CLASSES[family][1].from_pretrained(path, dtype=dtype)
    return model.to(device).eval()


class _Base:
    lanes = 1

    def __init__(self, variant_set: VariantSet, device, dtype):
        self.variant_set, self.family = variant_set, variant_set.family
        self.names = list(variant_set.names)
        self.device, self.dtype = torch.device(device), dtype
        cfg = variant_set[0].config
        self.vocab_size = cfg.get("vocab_size")
        self.max_positions = cfg.get("max_position_embeddings")
        self.eos_token_ids = tuple(variant_set[0].eos_token_ids)   # the runtime engine's default EOS too
        self._stats = {"switches": 0, "bytes_copied": 0}

    def index(self, variant) -> int:
        if not isinstance(variant, str) or variant not in self.names:
            raise UnknownVariant(f"unknown variant {variant!r}; known: {self.names}")
        return self.names.index(variant)

    def stats(self) -> dict:
        return dict(self._stats)


class ResidentSystem(_Base):
    kind = "resident"

    def __init__(self, variant_set: VariantSet, device="cpu", dtype=torch.float32):
        super().__init__(variant_set, device, dtype)
        self.models = {v.name: _load(v.path, self.family, self.device, dtype) for v in variant_set}

    def generate(self, variant, input_ids, **kw):
        return hf_generate(self.models[self.names[self.index(variant)]], self.family, input_ids, **kw)

    def memory_footprint(self) -> dict:
        return {"total_device_bytes": sum(_module_bytes(m) for m in self.models.values())}


class SwapSystem(_Base):
    kind = "swap"

    def __init__(self, variant_set: VariantSet, device="cpu", dtype=torch.float32):
        super().__init__(variant_set, device, dtype)
        pin = self.device.type == "cuda"
        self.host = []
        for v in variant_set:
            m = _load(v.path, self.family, "cpu", dtype)
            tensors = {n: t.detach().contiguous() for n, t in list(m.named_parameters()) + list(m.named_buffers())}
            self.host.append({n: (t.pin_memory() if pin else t) for n, t in tensors.items()})
        self.model = _load(variant_set[0].path, self.family, self.device, dtype)
        self.slot_tensors = dict(list(self.model.named_parameters()) + list(self.model.named_buffers()))
        self.active = 0
        self.lock = threading.Lock()  # one model slot: a swap and a generate never overlap another request

    def _swap_in(self, v: int) -> None:
        nbytes = 0
        with torch.no_grad():
            for name, dst in self.slot_tensors.items():
                src = self.host[v][name]
                dst.copy_(src, non_blocking=self.device.type == "cuda")
                nbytes += src.numel() * src.element_size()
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()
        self.active = v
        self._stats["switches"] += 1
        self._stats["bytes_copied"] += nbytes

    def generate(self, variant, input_ids, **kw):
        v = self.index(variant)
        with self.lock:
            if v != self.active:
                self._swap_in(v)
            return hf_generate(self.model, self.family, input_ids, **kw)

    def memory_footprint(self) -> dict:
        return {"total_device_bytes": _module_bytes(self.model)}


class PartitionedSystem(_Base):
    """MIG-like partition; ``budget_bytes`` is the whole device budget, split evenly across instances."""

    kind = "partitioned"

    def __init__(self, variant_set: VariantSet, budget_bytes: int, device="cpu", dtype=torch.float32,
                 threads: int | None = None, backend=None):
        super().__init__(variant_set, device, dtype)
        n = len(variant_set)
        self.lanes = n
        self.budget_bytes = int(budget_bytes)
        self.instance_budget = self.budget_bytes // n
        self.total_threads = threads or torch.get_num_threads()
        self.instance_threads = max(1, self.total_threads // n)
        L, E = variant_set.num_layers, variant_set.num_experts
        self.instances, self.slabs, self.non_expert_bytes = [], [], []
        for v in variant_set:
            model = _load(v.path, self.family, "cpu", dtype)
            prefixes = moe_layer_prefixes(model)
            for i, name in enumerate(prefixes):
                model.get_submodule(name).experts = nn.Module()  # drop the stacked experts (host copy below)
            model = model.to(self.device)
            host = [v.expert(l, e) for l in range(L) for e in range(E)]  # host id l*E + e
            ne = _module_bytes(model)
            slot_nbytes = (host[0][0].numel() + host[0][1].numel()) * torch.empty((), dtype=dtype).element_size()
            slots = (self.instance_budget - ne) // slot_nbytes
            slots = int(min(L * E, max(E, slots)))  # at least one layer's experts: a prefill may route to all
            slab = ExpertSlab(slots, variant_set.hidden_size, variant_set.intermediate_size, variant_set.gated,
                              dtype=dtype, device=self.device)
            # every expert lives in the host tier; the instance's whole slab is its cache
            slab.attach_host_tier(HostTier(slab, [w1.to(dtype) for w1, _ in host], [w2.to(dtype) for _, w2 in host],
                                           first_host_id=0, cache_slots=range(slots)))
            table = SlotTable(1, L, E, device=self.device)
            table.slots.copy_(torch.arange(L * E, dtype=torch.int32).view(1, L, E))
            for i, name in enumerate(prefixes):
                model.get_submodule(name).experts = SlabExperts(slab, table, i, ActiveVariant(0), E, backend)
            self.instances.append(model.eval())
            self.slabs.append(slab)
            self.non_expert_bytes.append(ne)
        self.streams = [torch.cuda.Stream(self.device) for _ in range(n)] if self.device.type == "cuda" else None

    def stats(self) -> dict:
        tiers = [slab.host_tier.stats for slab in self.slabs]
        return {**self._stats, "bytes_copied": sum(t["bytes_copied"] for t in tiers),
                "expert_fetches": sum(t["fetches"] for t in tiers)}

    def lane_of(self, variant) -> int:
        return self.index(variant)

    @contextlib.contextmanager
    def enter_lane(self, lane: int):
        """Run in the lane's worker thread: 1/N of the threads (CPU), the instance's own stream (CUDA)."""
        torch.set_num_threads(self.instance_threads)
        if self.streams is not None:
            with torch.cuda.stream(self.streams[lane]):
                yield
        else:
            yield

    def generate(self, variant, input_ids, **kw):
        return hf_generate(self.instances[self.index(variant)], self.family, input_ids, **kw)

    def memory_footprint(self) -> dict:
        slots = [slab.num_slots for slab in self.slabs]
        total = sum(self.non_expert_bytes) + sum(slab.nbytes for slab in self.slabs)
        L, E = self.variant_set.num_layers, self.variant_set.num_experts
        return {"total_device_bytes": total, "instance_budget_bytes": self.instance_budget,
                "cache_slots_per_instance": slots, "offloaded_experts_per_instance": [L * E - s for s in slots],
                "threads_per_instance": self.instance_threads if self.device.type == "cpu" else None}


BASELINES = ("resident", "swap", "partitioned")


def build_system(kind: str, variant_set: VariantSet, device="cpu", dtype=torch.float32, budget_bytes=None, **kw):
    """One of ``BASELINES``; ``partitioned`` splits ``budget_bytes`` (the device bytes ours uses)."""
    if kind == "resident":
        return ResidentSystem(variant_set, device, dtype)
    if kind == "swap":
        return SwapSystem(variant_set, device, dtype)
    if kind == "partitioned":
        if budget_bytes is None:
            raise ValueError("the partitioned system needs the device budget it splits: pass budget_bytes=")
        return PartitionedSystem(variant_set, budget_bytes, device, dtype, **kw)
    raise ValueError(f"unknown baseline {kind!r}; known: {', '.join(BASELINES)}")
