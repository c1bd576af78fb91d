"""The Plan format: which slab slot serves each (variant, layer, expert), where each slot's weights come
from, what it costs; versioned JSON, checks against the checkpoints, a text summary."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .common import PlanError, format_size
from .fingerprint import checkpoint_fingerprint

FORMAT_VERSION = 1


@dataclass
class Plan:
    """Which slab slot serves each (variant, layer, expert) and where each slot's weights come from.

    ``slots[v][l][e]`` is an index into ``slot_sources`` / ``slot_location``. Device slots come
    first (``0 .. num_device_slots-1``, the slab's slot numbers); host slots (offload tier) follow.
    ``slot_sources[s] = {"layer", "expert", "kind": "variant"|"mean", "variants": [...]}``.
    ``status[v][l][e]`` is "anchor" | "duplicate" | "shared" | "own".
    """
    variant_names: list
    fingerprints: list
    family: str
    num_layers: int
    num_experts: int
    hidden_size: int
    intermediate_size: int
    gated: bool
    anchor: int
    dtype: str                 # slab dtype
    slot_nbytes: int           # bytes of one slot in the slab dtype (w1 + w2), from tensor shapes
    slots: list                # [V][L][E] -> slot
    slot_sources: list         # [S] dicts
    slot_location: list        # [S] "device" | "host"
    status: list               # [V][L][E]
    distance: list             # [V][L][E] of the ranking metric (0 for anchor and duplicates)
    hashes: list               # [V][L][E] expert_hash in the checkpoint dtype
    metric: str
    scope: str
    representative: str
    policy: dict               # budget_bytes, share, threshold, seed, offload, non_expert_bytes
    calibration: str | None = None
    checkpoint_bytes: list = field(default_factory=list)  # per variant, all tensors in its files
    format: int = FORMAT_VERSION

    # ---- derived numbers

    @property
    def num_variants(self) -> int:
        return len(self.variant_names)

    @property
    def num_device_slots(self) -> int:
        return sum(1 for loc in self.slot_location if loc == "device")

    @property
    def num_host_slots(self) -> int:
        return sum(1 for loc in self.slot_location if loc == "host")

    @property
    def cache_slots(self) -> int:
        """Device slots reserved for paging in host-tier experts (0 without offload)."""
        return int(self.policy.get("cache_slots", 0))

    @property
    def expert_bytes(self) -> int:
        """Device slab bytes (resident slots plus the host tier's cache slots)."""
        return (self.num_device_slots + self.cache_slots) * self.slot_nbytes

    @property
    def host_bytes(self) -> int:
        return self.num_host_slots * self.slot_nbytes

    @property
    def device_bytes(self) -> int:
        """What the budget covers: the slab plus the declared non-expert working set."""
        return self.expert_bytes + int(self.policy.get("non_expert_bytes", 0))

    @property
    def separate_expert_bytes(self) -> int:
        """Expert bytes of N separate models in the slab dtype."""
        return self.num_variants * self.num_layers * self.num_experts * self.slot_nbytes

    def sharing_fraction(self, layer: int | None = None) -> float:
        """Fraction of non-duplicate (variant != anchor) entries served by the shared copy."""
        shared = own = 0
        for v in range(self.num_variants):
            for l in range(self.num_layers) if layer is None else [layer]:
                for s in self.status[v][l]:
                    shared += s == "shared"
                    own += s == "own"
        return shared / (shared + own) if shared + own else 1.0

    # ---- checks

    def check_consistent(self) -> None:
        """Internal invariants: every entry points at a slot of its own (layer, expert)."""
        S = len(self.slot_sources)
        if len(self.slot_location) != S:
            raise PlanError(f"plan has {S} slot sources but {len(self.slot_location)} locations")
        locs = self.slot_location
        if any(loc not in ("device", "host") for loc in locs) or \
                locs != sorted(locs, key=lambda x: x != "device"):
            raise PlanError("plan slot_location must list device slots first, then host slots")
        for v in range(self.num_variants):
            for l in range(self.num_layers):
                for e in range(self.num_experts):
                    s = self.slots[v][l][e]
                    if not 0 <= s < S:
                        raise PlanError(f"plan entry (variant={v}, layer={l}, expert={e}) -> slot {s}, "
                                        f"outside [0, {S})")
                    src = self.slot_sources[s]
                    if (src["layer"], src["expert"]) != (l, e):
                        raise PlanError(f"plan entry (variant={v}, layer={l}, expert={e}) -> slot {s}, "
                                        f"which holds layer {src['layer']} expert {src['expert']}")

    def validate(self, variant_set) -> None:
        """Refuse a plan made for other (or since changed) checkpoints."""
        if self.format != FORMAT_VERSION:
            raise PlanError(f"plan format {self.format}, this code reads format {FORMAT_VERSION}")
        names = list(variant_set.names)
        if names != list(self.variant_names):
            raise PlanError(f"plan is for variants {self.variant_names}, got {names}")
        shape = (variant_set.num_layers, variant_set.num_experts, variant_set.hidden_size,
                 variant_set.intermediate_size, bool(variant_set.gated))
        mine = (self.num_layers, self.num_experts, self.hidden_size, self.intermediate_size, self.gated)
        if shape != mine:
            raise PlanError(f"plan shape (layers, experts, hidden, intermediate, gated) = {mine}, "
                            f"variant set has {shape}")
        for v, variant in enumerate(variant_set):
            fp = checkpoint_fingerprint(variant.path)
            if fp != self.fingerprints[v]:
                raise PlanError(f"stale plan: checkpoint of variant {self.variant_names[v]!r} at "
                                f"{variant.path} changed since the plan was made (fingerprint "
                                f"{fp} != {self.fingerprints[v]}); re-run `multimoe-rt plan`")
        self.check_consistent()

    # ---- JSON

    def to_json(self, path: str | os.PathLike) -> None:
        d = asdict(self)
        d["summary"] = {  # for readers of the file; recomputed on load, never trusted
            "device_slots": self.num_device_slots, "host_slots": self.num_host_slots,
            "expert_bytes": self.expert_bytes, "host_bytes": self.host_bytes,
            "device_bytes": self.device_bytes, "separate_expert_bytes": self.separate_expert_bytes,
            "sharing_fraction": self.sharing_fraction(),
            "sharing_fraction_per_layer": [self.sharing_fraction(l) for l in range(self.num_layers)],
        }
        Path(path).write_text(json.dumps(d, indent=1))

    @classmethod
    def from_json(cls, path: str | os.PathLike, variant_set=None) -> "Plan":
        try:
            d = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise PlanError(f"cannot read plan {path}: {exc}") from exc
        if d.get("format") != FORMAT_VERSION:
            raise PlanError(f"{path}: plan format {d.get('format')!r}, this code reads {FORMAT_VERSION}")
        d.pop("summary", None)
        try:
            plan = cls(**d)
        except TypeError as exc:
            raise PlanError(f"{path}: not a plan document ({exc})") from exc
        plan.check_consistent()
        if variant_set is not None:
            plan.validate(variant_set)
        return plan

    # ---- report

    def summary(self) -> str:
        V, L, E = self.num_variants, self.num_layers, self.num_experts
        rows = [f"plan: {V} variants {self.variant_names}, anchor {self.variant_names[self.anchor]!r}, "
                f"metric={self.metric}"
                + (f" ({self.calibration} calibration)" if self.calibration else "")
                + f", scope={self.scope}, representative={self.representative}, slab dtype {self.dtype}",
                f"{'layer':>5} {'dup':>5} {'shared':>6} {'own':>5} {'share%':>6} {'slots':>5} "
                f"{'host':>4} {'bytes':>12}"]
        for l in range(L):
            st = [self.status[v][l][e] for v in range(V) for e in range(E)]
            slots = {self.slots[v][l][e] for v in range(V) for e in range(E)}
            host = sum(1 for s in slots if self.slot_location[s] == "host")
            rows.append(f"{l:>5} {st.count('duplicate'):>5} {st.count('shared'):>6} {st.count('own'):>5} "
                        f"{100 * self.sharing_fraction(l):>6.1f} {len(slots):>5} {host:>4} "
                        f"{(len(slots) - host) * self.slot_nbytes:>12}")
        sep = self.separate_expert_bytes
        rows.append(f"expert slab: {self.num_device_slots} slots x {self.slot_nbytes} B = "
                    f"{format_size(self.expert_bytes)} vs {format_size(sep)} for {V} separate models' "
                    f"experts ({100 * self.expert_bytes / sep:.1f}%)")
        if self.num_host_slots:
            rows.append(f"host tier: {self.num_host_slots} slots = {format_size(self.host_bytes)} "
                        f"(offloaded: do not fit the device budget)")
        ne = int(self.policy.get("non_expert_bytes", 0))
        budget = self.policy.get("budget_bytes")
        rows.append(f"device: slab + non-expert working set {format_size(ne)} = "
                    f"{format_size(self.device_bytes)}"
                    + (f" of budget {format_size(budget)}" if budget is not None else ""))
        if self.checkpoint_bytes:
            rows.append(f"checkpoints on disk (all tensors, checkpoint dtype): "
                        f"{format_size(sum(self.checkpoint_bytes))} for {V} variants")
        rows.append(f"sharing fraction (non-duplicate entries served by the shared copy): "
                    f"{100 * self.sharing_fraction():.1f}%")
        return "\n".join(rows)
