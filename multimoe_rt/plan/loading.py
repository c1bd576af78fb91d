"""Slab loading: fill an ExpertSlab and SlotTable from the checkpoints as a plan says, re-hashing every
expert read against the plan."""

from __future__ import annotations

import torch

from .common import PlanError, progress_bar, to_dtype
from .fingerprint import expert_hash
from .format import Plan


def _read_expert(plan: Plan, variant_set, v: int, l: int, e: int) -> tuple:
    tensors = variant_set[v].expert_tensors(l, e)  # (w1, w2) or, with expert biases, (w1, w2, b1, b2)
    if expert_hash(*tensors) != plan.hashes[v][l][e]:
        raise PlanError(f"stale plan: variant {plan.variant_names[v]!r} layer {l} expert {e} "
                        f"differs from when the plan was made; re-run `multimoe-rt plan`")
    return tensors


def source_expert(plan: Plan, variant_set, slot: int) -> tuple:
    """The weights a slot holds, read from the checkpoints (mean in float32, one member at a time):
    ``(w1, w2)``, or ``(w1, w2, b1, b2)`` for families with expert biases."""
    src = plan.slot_sources[slot]
    l, e, members = src["layer"], src["expert"], src["variants"]
    if src["kind"] == "variant":
        return _read_expert(plan, variant_set, members[0], l, e)
    acc = None
    for v in members:
        tensors = _read_expert(plan, variant_set, v, l, e)
        if acc is None:
            acc = [t.to(torch.float32).clone() for t in tensors]
        else:
            for a, t in zip(acc, tensors):
                a += t.to(torch.float32)
    return tuple(a / len(members) for a in acc)


def _load_deltas(plan: Plan, variant_set, slab, progress: bool):
    """Encode every delta of the plan against its base slot as the slab stores it (slab dtype), into
    preallocated pools sized from the plan; attach them to the slab."""
    from ..delta import DeltaError, DeltaPools, encode_delta, parse_spec

    parts = [dict(parse_spec(d["spec"])) for d in plan.deltas]
    pools = DeltaPools(slab.num_slots, plan.hidden_size, plan.intermediate_size, plan.gated, dtype=slab.dtype,
                       device=slab.device, entries=len(plan.deltas), sign1=sum("sign1" in p for p in parts),
                       lowrank_units=sum(p.get("lowrank", 0) for p in parts), int4=sum("int4" in p for p in parts))
    bar = progress_bar(len(plan.deltas), "encoding deltas", progress)
    for i, d in enumerate(plan.deltas):
        l, e, v, base = d["layer"], d["expert"], d["variants"][0], d["base"]
        w1, w2 = _read_expert(plan, variant_set, v, l, e)
        b1, b2 = slab.w1[base].float(), slab.w2[base].float()
        try:
            enc = encode_delta(w1.to(slab.device).float() - b1, w2.to(slab.device).float() - b2, d["spec"],
                               round_to=slab.dtype)
            got = pools.add(base, enc, sync=False)
        except DeltaError as exc:
            raise PlanError(f"plan field 'deltas[{i}]' (variant {plan.variant_names[v]!r} layer {l} expert {e}, "
                            f"{d['spec']}): {exc}") from exc
        if got != len(plan.slot_sources) + i:
            raise PlanError(f"plan field 'deltas[{i}]': stored as expert id {got}, the table says "
                            f"{len(plan.slot_sources) + i}")
        bar.update(1)
    bar.close()
    pools.finish()
    slab.attach_deltas(pools)


def load_slab(plan: Plan, variant_set, device="cpu", dtype=None, progress: bool = False):
    """Fill an ExpertSlab and SlotTable from the checkpoints as the plan says.

    Validates the plan against the checkpoints first (fingerprints) and every expert read
    against its recorded hash. Reads each source expert once; host memory holds one expert
    (two float32 accumulators for a mean slot). ``dtype`` overrides the plan's slab dtype
    (the plan's byte accounting then no longer applies). Host-tier slots (``offload``) go to a
    ``HostTier`` attached to the slab, paged into its ``cache_slots`` on use. Deltas are encoded
    against their base slot as stored (``slab.deltas``, a ``DeltaPools``); the table then holds expert ids.
    """
    from ..slab import ExpertSlab, HostTier, SlotTable

    plan.validate(variant_set)
    bias = variant_set.adapter.expert_bias  # the slab then holds b1/b2 per slot too
    if bias and (plan.num_host_slots or plan.deltas):
        raise PlanError(f"the {variant_set.family} family's experts carry biases: its plans can share and keep "
                        f"experts, but neither offload them (host tier) nor store deltas")
    slab_dtype = to_dtype(dtype if dtype is not None else plan.dtype)
    n_dev = plan.num_device_slots
    slab = ExpertSlab(n_dev + plan.cache_slots, plan.hidden_size, plan.intermediate_size, plan.gated,
                      dtype=slab_dtype, device=device, bias=bias)
    bar = progress_bar(len(plan.slot_location), "loading experts", progress)
    for s in range(n_dev):
        slab.write(s, *(t.to(slab_dtype) for t in source_expert(plan, variant_set, s)))
        bar.update(1)
    if plan.num_host_slots:
        host = [source_expert(plan, variant_set, s) for s in range(n_dev, len(plan.slot_location))]
        bar.update(len(host))
        slab.attach_host_tier(HostTier(slab, [w1.to(slab_dtype) for w1, _ in host],
                                       [w2.to(slab_dtype) for _, w2 in host], first_host_id=n_dev,
                                       cache_slots=range(n_dev, n_dev + plan.cache_slots)))
    bar.close()
    if slab.device.type == "cuda":
        torch.cuda.synchronize(slab.device)  # slab.write copies non_blocking from pinned memory
    if plan.deltas:
        _load_deltas(plan, variant_set, slab, progress)
    table = SlotTable(plan.num_variants, plan.num_layers, plan.num_experts, device=device)
    table.slots.copy_(torch.tensor(plan.slots, dtype=torch.int32))
    table.validate(slab)
    return slab, table
