"""The sharing policy (the paper's Algorithm 1): one shared copy per (layer, expert), then own copies for
the most different experts, by share, threshold or byte budget; optional host-tier offload."""

from __future__ import annotations

import math
import random

import torch

from .common import METRICS, REPRESENTATIVES, SCOPES, PlanError, format_size, parse_size, to_dtype
from .distance import Distances, compute_distances
from .fingerprint import checkpoint_fingerprint, checkpoint_tensor_bytes
from .format import DELTA_DESC_BYTES, Plan
from .mixed import DENSE, SHARE, Costs, canonical_option, choose, option_nbytes

__all__ = ["METRICS", "REPRESENTATIVES", "SCOPES", "make_plan", "non_expert_nbytes"]


def _real(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def non_expert_nbytes(variant, dtype=None) -> int:
    """Bytes of one variant's non-expert tensors (numel from the file headers) in ``dtype``
    (default: the variant's expert dtype): the size of one resident non-expert set."""
    itemsize = torch.empty((), dtype=dtype or variant.dtype).element_size()
    return sum(math.prod(variant.tensor_shape(n)) for n in variant.non_expert_names()) * itemsize


def _ranked_units(dist: Distances, values, scope: str):
    """Candidates for an own copy, most different first.

    A unit is the set of non-anchor variants whose expert (layer, e) is byte-identical to each
    other but not to the anchor: they can share one own copy, so they are chosen together.
    """
    V, L, E = len(dist.hashes), len(dist.hashes[0]), len(dist.hashes[0][0])
    per_layer: list[list] = [[] for _ in range(L)]
    for l in range(L):
        for e in range(E):
            groups: dict[str, list[int]] = {}
            for v in range(V):
                if v == dist.anchor or dist.duplicate[v][l][e]:
                    continue
                groups.setdefault(dist.hashes[v][l][e], []).append(v)
            for members in groups.values():
                d = max(values[v][l][e] for v in members)
                per_layer[l].append((d, l, e, tuple(members)))
    key = lambda u: (-u[0], u[1], u[2], u[3])  # deterministic on ties
    if scope == "global":
        return sorted((u for units in per_layer for u in units), key=key)
    # per_layer: round-robin over layers, so every prefix spreads own copies evenly
    ranked = [sorted(units, key=key) for units in per_layer]
    order = []
    for i in range(max((len(r) for r in ranked), default=0)):
        order.extend(sorted((r[i] for r in ranked if i < len(r)), key=key))
    return order


def make_plan(variant_set, *, budget_bytes: int | str | None = None, share: float | None = None,
              threshold: float | None = None, metric: str = "l2", scope: str = "global",
              representative: str = "anchor", anchor: int = 0, non_expert_bytes: int | str = 0,
              offload: bool = False, seed: int = 0, dtype=None,
              calib: dict[int, torch.Tensor] | None = None, distances: Distances | None = None,
              progress: bool = False, costs: Costs | None = None, delta: str | None = None,
              codecs=None) -> Plan:
    """Algorithm 1: one shared copy per (layer, expert), then own copies, most different first.

    Policy (how many own copies): ``share`` (target fraction of non-duplicate non-anchor entries
    served by the shared copy; a lower bound when byte-identical non-anchor experts travel
    together), ``threshold`` (own copy when distance > threshold), or else ``budget_bytes``
    (as many as fit). ``budget_bytes`` is also the device capacity under the first two.
    The budget covers ``slots x slot bytes + non_expert_bytes``, slot bytes from the expert
    tensors' shapes in the slab ``dtype`` (default: checkpoint dtype).
    Too little room for one copy per (layer, expert) raises PlanError, unless ``offload``: then
    slots past the capacity are placed in a host tier (shared copies first on device).

    ``metric="loss"`` ranks by the measured cost of sharing (``costs``, from
    ``multimoe_rt.criterion.measure_costs``): the calibration-loss change of the variant's own model when
    that one expert is replaced by the anchor's.

    Deltas (``multimoe_rt.delta``): ``delta=spec`` stores every entry the policy would share as the shared
    copy plus a compressed delta of that spec instead (``share=1.0, delta="sign1"``: every non-duplicate entry
    as sign1). ``codecs=[spec, ...]`` (with ``costs`` and ``budget_bytes``, no share/threshold) is the mixed
    plan: each entry gets whichever of sharing, base + delta in one of ``codecs``, or an own dense copy
    minimises the summed measured cost within the budget (``plan.mixed.choose``). Deltas need the device
    budget (no offload).
    """
    if metric not in METRICS:
        raise PlanError(f"metric must be one of {METRICS}, got {metric!r}")
    if scope not in SCOPES:
        raise PlanError(f"scope must be one of {SCOPES}, got {scope!r}")
    if representative not in REPRESENTATIVES:
        raise PlanError(f"representative must be one of {REPRESENTATIVES}, got {representative!r}")
    if share is not None and threshold is not None:
        raise PlanError("give at most one of share / threshold (budget_bytes may accompany either)")
    if share is None and threshold is None and budget_bytes is None:
        raise PlanError("give a policy: budget_bytes, share or threshold")
    if share is not None and not (_real(share) and 0.0 <= share <= 1.0):
        raise PlanError(f"share must be a number in [0, 1], got {share!r}")
    if threshold is not None and not (_real(threshold) and math.isfinite(threshold)):
        raise PlanError(f"threshold must be a finite number (own copy when distance > threshold), got "
                        f"{threshold!r}; for 'share everything' use share=1.0")
    if isinstance(anchor, bool) or not isinstance(anchor, int) or not 0 <= anchor < len(variant_set):
        raise PlanError(f"anchor must be a variant index in [0, {len(variant_set)}), got {anchor!r}")
    budget = None if budget_bytes is None else parse_size(budget_bytes)
    non_expert = parse_size(non_expert_bytes)
    if metric == "loss" and costs is None:
        raise PlanError("metric 'loss' needs costs: measure them with multimoe_rt.criterion.measure_costs")
    if codecs is not None:
        codecs = [canonical_option(c) for c in codecs]
        if any(c in (SHARE, DENSE) for c in codecs) or not codecs:
            raise PlanError(f"codecs lists delta specs (sign1, lowrank<r>, int4, combinations), got {codecs}")
        if costs is None or budget is None or share is not None or threshold is not None or delta is not None:
            raise PlanError("the mixed plan (codecs=...) chooses by measured costs under a byte budget: give costs "
                            "and budget_bytes, and no share, threshold or delta")
        if representative != "anchor":
            raise PlanError("the mixed plan's costs are measured against the anchor's copy: representative must "
                            "be 'anchor'")
    if delta is not None:
        delta = canonical_option(delta)
        if delta in (SHARE, DENSE):
            raise PlanError(f"delta must be a codec spec (sign1, lowrank<r>, int4, ...), got {delta!r}")
    if (codecs is not None or delta is not None) and offload:
        raise PlanError("a plan with deltas keeps every expert on the device: offload is not supported with deltas")
    if costs is not None:
        if costs.anchor != anchor or len(costs.loss) != len(variant_set):
            raise PlanError(f"costs were measured for anchor {costs.anchor} and {len(costs.loss)} variants; the plan "
                            f"has anchor {anchor} and {len(variant_set)} variants")
        missing = [c for c in ([SHARE] + (codecs or [])) if c not in costs.options]
        if missing:
            raise PlanError(f"costs have no measurements of {missing} (measured: {costs.options})")

    V, L, E = len(variant_set), variant_set.num_layers, variant_set.num_experts
    if distances is None:
        distances = compute_distances(variant_set, anchor=anchor, output=metric == "output",
                                      calib=calib, seed=seed, progress=progress)
    dist = distances
    if dist.anchor != anchor:
        raise PlanError(f"distances were computed against anchor {dist.anchor}, plan asks for {anchor}")
    if metric == "random":
        rng = random.Random(seed)
        values = [[[0.0 if dist.duplicate[v][l][e] else rng.random() for e in range(E)]
                   for l in range(L)] for v in range(V)]
    elif metric == "loss":
        values = costs.share_values()
        unmeasured = [(v, l, e) for v in range(V) for l in range(L) for e in range(E)
                      if v != anchor and not dist.duplicate[v][l][e] and costs.loss[v][l][e] is None]
        if unmeasured:
            v, l, e = unmeasured[0]
            raise PlanError(f"costs have no measurement for variant {variant_set.names[v]!r} layer {l} expert {e} "
                            f"({len(unmeasured)} entries unmeasured)")
    else:
        values = getattr(dist, metric)
        if values is None:
            raise PlanError(f"distances have no {metric!r} values; compute them with output=True")
    for v in range(V):  # a NaN distance would rank arbitrarily and be written into the plan as a bare NaN
        for l in range(L):
            for e in range(E):
                x = values[v][l][e]
                if not dist.duplicate[v][l][e] and not math.isfinite(x):
                    raise PlanError(
                        f"{metric} distance of variant {variant_set.names[v]!r} layer {l} expert {e} to the "
                        f"anchor {variant_set.names[anchor]!r} is {x}: one of the two experts holds NaN/Inf "
                        f"weights (load the variants with check_finite=True, the default, to name the tensor)")

    slab_dtype = to_dtype(dtype if dtype is not None else dist.checkpoint_dtype)
    itemsize = torch.empty((), dtype=slab_dtype).element_size()
    slot_nbytes = (math.prod(dist.w1_shape) + math.prod(dist.w2_shape)) * itemsize
    if variant_set.adapter.expert_bias:  # b1 [N1] + b2 [H] per slot
        slot_nbytes += (dist.w1_shape[0] + dist.w2_shape[0]) * itemsize
    base_slots = L * E
    capacity = None if budget is None else (budget - non_expert) // slot_nbytes
    if capacity is not None and capacity < base_slots and not offload:
        need = base_slots * slot_nbytes + non_expert
        fit = max(0, budget - non_expert)
        raise PlanError(
            f"budget {budget} B ({format_size(budget)}) cannot hold one copy of each of the "
            f"{L}x{E} experts ({base_slots} x {slot_nbytes} B in {slab_dtype}) plus the non-expert "
            f"working set {non_expert} B: needs {need} B ({format_size(need)}). What fits: "
            f"{max(0, capacity)} expert slots ({fit} B after the working set); use a smaller dtype "
            f"(half the bytes per slot from float32), fewer layers/variants resident, or offload=True")

    units = _ranked_units(dist, values, scope)
    n_entries = sum(len(u[3]) for u in units)
    n1, hidden, inter = dist.w1_shape[0], dist.w1_shape[1], dist.w2_shape[1]
    chosen = []
    option_of = {}  # (l, e, members) -> option, for plans with deltas
    if codecs is not None:
        opts = [SHARE] + codecs + [DENSE]
        size = {o: option_nbytes(o, n1, hidden, inter, itemsize, slot_nbytes + DELTA_DESC_BYTES) for o in opts}
        left = budget - non_expert - base_slots * (slot_nbytes + DELTA_DESC_BYTES)
        if left < 0:
            raise PlanError(f"budget {budget} B ({format_size(budget)}) cannot hold one copy of each of the {L}x{E} "
                            f"experts plus the non-expert working set: needs {budget - left} B")
        unit_options = [[(size[o], sum(costs.cost(v, u[1], u[2], o) for v in u[3]), o) for o in opts]
                        for u in units]
        picks = choose(unit_options, left)
        for u, j in zip(units, picks):
            option_of[u[1:]] = opts[j]
        chosen = [u for u in units if option_of[u[1:]] == DENSE]
    elif delta is not None and share is None and threshold is None:
        # budget only, every entry a delta to start with: own copies in rank order while they fit
        dbytes = option_nbytes(delta, n1, hidden, inter, itemsize, slot_nbytes)
        left = budget - non_expert - base_slots * (slot_nbytes + DELTA_DESC_BYTES) - len(units) * dbytes
        if left < 0:
            raise PlanError(f"budget {budget} B ({format_size(budget)}) cannot hold the shared copies plus a "
                            f"{delta} delta for every entry: {-left} B short")
        for u in units:
            if left >= slot_nbytes + DELTA_DESC_BYTES - dbytes:
                chosen.append(u)
                left -= slot_nbytes + DELTA_DESC_BYTES - dbytes
            else:
                break
    elif share is not None:
        target_own = n_entries - round(share * n_entries)
        own = 0
        for u in units:
            if own + len(u[3]) <= target_own:
                chosen.append(u)
                own += len(u[3])
    elif threshold is not None:
        chosen = [u for u in units if u[0] > threshold]
    else:
        # budget only: a prefix of the fixed ranking, so a bigger budget never shares more
        chosen = units[:max(0, capacity - base_slots)]
    if codecs is None:
        own_units = {u[1:] for u in chosen}
        for u in units:
            option_of[u[1:]] = DENSE if u[1:] in own_units else (delta or SHARE)
    total_slots = base_slots + len(chosen)
    if any(o not in (SHARE, DENSE) for o in option_of.values()):
        need = (total_slots * (slot_nbytes + DELTA_DESC_BYTES) + non_expert
                + sum(option_nbytes(o, n1, hidden, inter, itemsize, 0) for o in option_of.values() if o != DENSE))
        if budget is not None and need > budget:
            raise PlanError(f"the plan asks for {total_slots} slots and {sum(o not in (SHARE, DENSE) for o in option_of.values())} "
                            f"deltas = {need} B ({format_size(need)}) with the working set, over the budget {budget} B")
    elif capacity is not None and total_slots > capacity and not offload:
        need = total_slots * slot_nbytes + non_expert
        raise PlanError(f"the {'share' if share is not None else 'threshold'} policy asks for "
                        f"{total_slots} slots = {need} B ({format_size(need)}) with the working set, "
                        f"over the budget {budget} B; {capacity} slots fit. Raise the budget, lower "
                        f"the own copies, or pass offload=True")

    # --- assignment: shared slots first (they serve the most entries), then own copies by rank
    status = [[["anchor" if v == anchor else ("duplicate" if dist.duplicate[v][l][e] else "shared")
                for e in range(E)] for l in range(L)] for v in range(V)]
    for _, l, e, members in units:
        for v in members:
            o = option_of[(l, e, members)]
            status[v][l][e] = "own" if o == DENSE else ("shared" if o == SHARE else "delta")
    slots = [[[-1] * E for _ in range(L)] for _ in range(V)]
    sources = []
    for l in range(L):
        for e in range(E):
            group = [v for v in range(V) if status[v][l][e] != "own"]
            distinct = {dist.hashes[v][l][e] for v in group}
            if representative == "mean" and len(distinct) > 1:
                sources.append({"layer": l, "expert": e, "kind": "mean", "variants": group})
            else:
                sources.append({"layer": l, "expert": e, "kind": "variant", "variants": [anchor]})
            for v in group:
                slots[v][l][e] = len(sources) - 1
    for _, l, e, members in chosen:
        sources.append({"layer": l, "expert": e, "kind": "variant", "variants": [members[0]]})
        for v in members:
            slots[v][l][e] = len(sources) - 1
    deltas = []
    for _, l, e, members in sorted(units, key=lambda u: (u[1], u[2], u[3])):
        o = option_of[(l, e, members)]
        if o in (SHARE, DENSE):
            continue
        deltas.append({"layer": l, "expert": e, "variants": list(members), "base": slots[members[0]][l][e],
                       "spec": o, "nbytes": option_nbytes(o, n1, hidden, inter, itemsize, 0)})
        for v in members:
            slots[v][l][e] = len(sources) + len(deltas) - 1
    n_dev, cache_slots = len(sources), 0
    if capacity is not None and len(sources) > capacity:
        # Offload: host experts are paged into a cache of one layer's worth of slots (a prefill may route
        # to every expert of a layer), reserved from the device capacity.
        cache_slots = E
        if capacity < cache_slots:
            raise PlanError(f"budget {budget} B ({format_size(budget)}) leaves room for {max(0, capacity)} "
                            f"expert slots; offloading needs at least {cache_slots} (one layer's experts) "
                            f"as the device cache for host experts: needs "
                            f"{cache_slots * slot_nbytes + non_expert} B")
        n_dev = capacity - cache_slots
    location = ["device"] * n_dev + ["host"] * (len(sources) - n_dev)

    own_dist = [[[0.0 if status[v][l][e] in ("anchor", "duplicate") else float(values[v][l][e])
                  for e in range(E)] for l in range(L)] for v in range(V)]
    choice = [[[status[v][l][e] if status[v][l][e] in ("anchor", "duplicate") else SHARE for e in range(E)]
               for l in range(L)] for v in range(V)]
    for _, l, e, members in units:
        for v in members:
            choice[v][l][e] = option_of[(l, e, members)]
    entry_cost = None
    if costs is not None:
        cells = [[[0.0 if choice[v][l][e] in ("anchor", "duplicate", DENSE) else
                   (costs.loss[v][l][e] or {}).get(choice[v][l][e]) for e in range(E)] for l in range(L)]
                 for v in range(V)]
        if all(c is not None for var in cells for row in var for c in row):
            entry_cost = [[[float(c) for c in row] for row in var] for var in cells]
    plan = Plan(
        variant_names=list(variant_set.names),
        fingerprints=[checkpoint_fingerprint(var.path) for var in variant_set],
        family=variant_set.family, num_layers=L, num_experts=E,
        hidden_size=variant_set.hidden_size, intermediate_size=variant_set.intermediate_size,
        gated=bool(variant_set.gated), anchor=anchor, dtype=str(slab_dtype).replace("torch.", ""),
        slot_nbytes=slot_nbytes, slots=slots, slot_sources=sources, slot_location=location,
        status=status, distance=own_dist, hashes=dist.hashes, metric=metric, scope=scope,
        representative=representative,
        policy={"budget_bytes": budget, "share": share, "threshold": threshold, "seed": seed,
                "offload": offload, "non_expert_bytes": non_expert,
                "cache_slots": cache_slots, "delta": delta, "codecs": codecs},
        calibration=dist.calibration if metric == "output" else (costs.calibration or "measured loss"
                                                                   if metric == "loss" else None),
        checkpoint_bytes=[checkpoint_tensor_bytes(var.path) for var in variant_set],
        deltas=deltas, choice=choice, entry_cost=entry_cost,
        costs=costs.to_dict() if costs is not None else None,
    )
    plan.check_consistent()
    return plan
