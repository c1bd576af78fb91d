"""The Plan format: which slab slot serves each (variant, layer, expert), where each slot's weights come
from, what it costs; versioned JSON, checks against the checkpoints, a text summary."""

from __future__ import annotations

import json
import os
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path

from ..delta import DeltaError, canonical_spec
from ..families import get_family
from .common import DTYPE_NAMES, FAMILIES, METRICS, REPRESENTATIVES, SCOPES, PlanError, format_size
from .fields import _desc, _fail, _finite, _grid, _int, _list, _str
from .fingerprint import checkpoint_expert_hashes, checkpoint_fingerprint

FORMAT_VERSION = 2
READABLE_FORMATS = (1, 2)  # format 1: no deltas, costs or entry_cost (they default to empty)
STATUSES = ("anchor", "duplicate", "shared", "own", "delta")
from ..delta import DESC_BYTES as DELTA_DESC_BYTES  # device bytes per expert id of a slab with deltas


@dataclass
class Plan:
    """Which slab slot serves each (variant, layer, expert) and where each slot's weights come from.

    ``slots[v][l][e]`` is an index into ``slot_sources`` / ``slot_location``. Device slots come
    first (``0 .. num_device_slots-1``, the slab's slot numbers); host slots (offload tier) follow.
    ``slot_sources[s] = {"layer", "expert", "kind": "variant"|"mean", "variants": [...]}``.
    ``status[v][l][e]`` is "anchor" | "duplicate" | "shared" | "own" | "delta".

    Deltas (``multimoe_rt.delta``): an entry with status "delta" holds the expert id ``S + d`` (S =
    ``len(slot_sources)``), served as the shared slot ``deltas[d]["base"]`` plus a compressed delta:
    ``deltas[d] = {"layer", "expert", "variants": [...], "base": slot, "spec": "sign1"|"lowrank16"|...,
    "nbytes"}`` (variants: the byte-identical experts it serves). ``choice[v][l][e]`` names how each entry is
    stored ("anchor", "duplicate", "share", a delta spec, "dense"); ``entry_cost[v][l][e]`` is the measured
    calibration-loss change of that choice (``metric="loss"``; 0 for own copies, anchor and duplicates), and
    ``costs`` the whole measurement (every option of every entry, ``plan.mixed.Costs``).
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
    slot_nbytes: int           # bytes of one slot in the slab dtype (w1 + w2, + b1 + b2 with expert biases)
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
    deltas: list = field(default_factory=list)      # [D] dicts (see above)
    choice: list | None = None                      # [V][L][E] how each entry is stored
    entry_cost: list | None = None                  # [V][L][E] measured cost of the choice, or None
    costs: dict | None = None                       # plan.mixed.Costs.to_dict() when measured
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
    def num_ids(self) -> int:
        """Valid expert ids in the table: slots (device and host), then deltas."""
        return len(self.slot_sources) + len(self.deltas)

    @property
    def delta_bytes(self) -> int:
        """Device bytes of the delta pools and descriptor table (0 without deltas)."""
        if not self.deltas:
            return 0
        return sum(d["nbytes"] for d in self.deltas) + DELTA_DESC_BYTES * len(self.slot_sources)

    @property
    def expert_bytes(self) -> int:
        """Device slab bytes (resident slots plus the host tier's cache slots, plus the delta pools)."""
        return (self.num_device_slots + self.cache_slots) * self.slot_nbytes + self.delta_bytes

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
                    own += s in ("own", "delta")
        return shared / (shared + own) if shared + own else 1.0

    def delta_fraction(self, layer: int | None = None) -> float:
        """Fraction of non-duplicate (variant != anchor) entries served as base + delta."""
        n = d = 0
        for v in range(self.num_variants):
            for l in range(self.num_layers) if layer is None else [layer]:
                for s in self.status[v][l]:
                    n += s in ("shared", "own", "delta")
                    d += s == "delta"
        return d / n if n else 0.0

    def deltas_by_spec(self) -> dict:
        out: dict = {}
        for d in self.deltas:
            out[d["spec"]] = out.get(d["spec"], 0) + 1
        return out

    def predicted_loss(self) -> list:
        """Per variant, the sum of the measured costs of its entries' choices (0 without measurements)."""
        if self.entry_cost is None:
            return [0.0] * self.num_variants
        return [sum(c for row in self.entry_cost[v] for c in row) for v in range(self.num_variants)]

    # ---- checks

    def check_fields(self) -> None:
        """Every field has the type, range and shape the format says; PlanError names the first that does not.

        A hand-edited or damaged plan stops here, not as an AttributeError/IndexError deep in loading."""
        names = _list("variant_names", self.variant_names)
        if not names:
            _fail("variant_names", "expected at least one variant")
        for i, n in enumerate(names):
            _str(f"variant_names[{i}]", n)
        if len(set(names)) != len(names):
            _fail("variant_names", f"names must be distinct, got {names}")
        V = len(names)
        for i, fp in enumerate(_list("fingerprints", self.fingerprints, V, "fingerprints (one per variant_names)")):
            _str(f"fingerprints[{i}]", fp)
        _str("family", self.family, FAMILIES)
        L = _int("num_layers", self.num_layers, 1)
        E = _int("num_experts", self.num_experts, 1)
        H = _int("hidden_size", self.hidden_size, 1)
        inter = _int("intermediate_size", self.intermediate_size, 1)
        if not isinstance(self.gated, bool):
            _fail("gated", f"expected true or false, got {_desc(self.gated)}")
        if self.gated != get_family(self.family).gated:
            _fail("gated", f"{self.gated} does not match family {self.family!r}")
        _int("anchor", self.anchor, 0, V)
        _str("dtype", self.dtype, DTYPE_NAMES)
        itemsize = DTYPE_NAMES[self.dtype].itemsize
        n1 = 2 * inter if self.gated else inter
        want = (n1 * H + H * inter + ((n1 + H) if get_family(self.family).expert_bias else 0)) * itemsize
        if _int("slot_nbytes", self.slot_nbytes, 1) != want:
            _fail("slot_nbytes", f"{self.slot_nbytes} B, but one {self.dtype} expert of hidden_size {H} and "
                                 f"intermediate_size {inter} is {want} B")
        S = len(_list("slot_sources", self.slot_sources))
        if S == 0:
            _fail("slot_sources", "expected at least one slot")
        for s, src in enumerate(self.slot_sources):
            name = f"slot_sources[{s}]"
            if not isinstance(src, dict):
                _fail(name, f"expected an object {{layer, expert, kind, variants}}, got {_desc(src)}")
            missing = [k for k in ("layer", "expert", "kind", "variants") if k not in src]
            if missing:
                _fail(name, f"missing key(s) {missing}")
            _int(f"{name}.layer", src["layer"], 0, L)
            _int(f"{name}.expert", src["expert"], 0, E)
            _str(f"{name}.kind", src["kind"], ("variant", "mean"))
            members = _list(f"{name}.variants", src["variants"])
            if not members or (src["kind"] == "variant" and len(members) != 1):
                need = "exactly one variant" if src["kind"] == "variant" else "at least one variant"
                _fail(f"{name}.variants", f"a {src['kind']!r} slot needs {need}, got {_desc(members)}")
            for i, v in enumerate(members):
                _int(f"{name}.variants[{i}]", v, 0, V)
        locs = _list("slot_location", self.slot_location, S, "locations (one per slot_sources)")
        for i, loc in enumerate(locs):
            _str(f"slot_location[{i}]", loc, ("device", "host"))
        if locs != sorted(locs, key=lambda x: x != "device"):
            _fail("slot_location", "device slots must come first, then host slots")
        D = len(_list("deltas", self.deltas))
        for d, delta in enumerate(self.deltas):
            name = f"deltas[{d}]"
            if not isinstance(delta, dict):
                _fail(name, f"expected an object {{layer, expert, variants, base, spec, nbytes}}, got {_desc(delta)}")
            missing = [k for k in ("layer", "expert", "variants", "base", "spec", "nbytes") if k not in delta]
            if missing:
                _fail(name, f"missing key(s) {missing}")
            _int(f"{name}.layer", delta["layer"], 0, L)
            _int(f"{name}.expert", delta["expert"], 0, E)
            _int(f"{name}.base", delta["base"], 0, S)
            _int(f"{name}.nbytes", delta["nbytes"], 1)
            _str(f"{name}.spec", delta["spec"])
            try:
                if canonical_spec(delta["spec"]) != delta["spec"]:
                    _fail(f"{name}.spec", f"{delta['spec']!r} is not canonical ({canonical_spec(delta['spec'])!r})")
            except DeltaError as exc:
                _fail(f"{name}.spec", str(exc))
            members = _list(f"{name}.variants", delta["variants"])
            if not members:
                _fail(f"{name}.variants", "a delta serves at least one variant")
            for i, v in enumerate(members):
                _int(f"{name}.variants[{i}]", v, 0, V)
        _grid("slots", self.slots, V, L, E, lambda n, x: _int(n, x, 0, S + D))
        _grid("status", self.status, V, L, E, lambda n, x: _str(n, x, STATUSES))
        _grid("distance", self.distance, V, L, E, _finite)
        _grid("hashes", self.hashes, V, L, E, _str)
        _str("metric", self.metric, METRICS)
        _str("scope", self.scope, SCOPES)
        _str("representative", self.representative, REPRESENTATIVES)
        if not isinstance(self.policy, dict):
            _fail("policy", f"expected an object, got {_desc(self.policy)}")
        for key in ("cache_slots", "non_expert_bytes"):
            if key in self.policy:
                _int(f"policy.{key}", self.policy[key], 0)
        if self.policy.get("budget_bytes") is not None:
            _int("policy.budget_bytes", self.policy["budget_bytes"], 0)
        for key in ("share", "threshold"):
            if self.policy.get(key) is not None:
                _finite(f"policy.{key}", self.policy[key])
        if "host" in locs and not E <= self.cache_slots <= L * E:
            _fail("policy.cache_slots", f"{self.cache_slots}: host-tier slots need a device cache of one layer's "
                                        f"experts ({E}) up to every expert ({L * E})")
        if "host" not in locs and self.cache_slots != 0:
            _fail("policy.cache_slots", f"{self.cache_slots}: a plan without host-tier slots has no device cache for "
                                        f"them (0)")
        if self.calibration is not None:
            _str("calibration", self.calibration)
        if self.choice is not None:
            _grid("choice", self.choice, V, L, E, _str)
        if self.entry_cost is not None:
            _grid("entry_cost", self.entry_cost, V, L, E, _finite)
        if self.costs is not None and not isinstance(self.costs, dict):
            _fail("costs", f"expected an object, got {_desc(self.costs)}")
        if D and "host" in locs:
            _fail("deltas", "a plan with deltas cannot offload slots to the host tier")
        for i, b in enumerate(_list("checkpoint_bytes", self.checkpoint_bytes)):
            _int(f"checkpoint_bytes[{i}]", b, 0)
        _int("format", self.format)

    def check_consistent(self) -> None:
        """Fields well-formed (``check_fields``), and every (variant, layer, expert) is served the weights the
        plan's own per-expert hashes say it should get: a slot of its own (layer, expert) whose source is
        byte-identical to it (own copy, anchor, duplicate), or the anchor's / the mean copy (shared)."""
        self.check_fields()
        V, L, E, S = self.num_variants, self.num_layers, self.num_experts, len(self.slot_sources)
        h, names, a = self.hashes, self.variant_names, self.anchor
        users: list[list[int]] = [[] for _ in range(S)]
        for v in range(V):
            for l in range(L):
                for e in range(E):
                    s, st = self.slots[v][l][e], self.status[v][l][e]
                    if (s >= S) != (st == "delta"):
                        _fail(f"slots[{v}][{l}][{e}]", f"{s} with status {st!r}: ids >= {S} (the slots) are deltas, "
                                                       f"and only they")
                    if (st in ("shared", "delta") and self.metric == "l2" and h[v][l][e] != h[a][l][e]
                            and not self.distance[v][l][e] > 0):
                        _fail(f"distance[{v}][{l}][{e}]", f"{self.distance[v][l][e]}: variant {names[v]!r} is served "
                                                          f"an approximation ({st}) of an expert that differs from "
                                                          f"the anchor's, so its recorded L2 distance must be > 0")
                    if st == "delta":
                        delta = self.deltas[s - S]
                        if (delta["layer"], delta["expert"]) != (l, e) or v not in delta["variants"]:
                            _fail(f"slots[{v}][{l}][{e}]", f"delta {s - S} is for layer {delta['layer']} expert "
                                                           f"{delta['expert']} variants {delta['variants']}")
                        if h[delta["variants"][0]][l][e] != h[v][l][e]:
                            _fail(f"deltas[{s - S}].variants", f"variant {names[v]!r} differs (per the plan's "
                                                               f"hashes) from the expert the delta encodes")
                        s = delta["base"]
                        st = "shared"  # the base is the layer's shared copy
                    src = self.slot_sources[s]
                    if (src["layer"], src["expert"]) != (l, e):
                        _fail(f"slots[{v}][{l}][{e}]", f"slot {s}, which holds layer {src['layer']} expert "
                                                       f"{src['expert']}, not layer {l} expert {e}")
                    if (st == "anchor") != (v == a):
                        _fail(f"status[{v}][{l}][{e}]", f"{st!r}, but the anchor is variant {a} ({names[a]!r})")
                    if st == "duplicate" and h[v][l][e] != h[a][l][e]:
                        _fail(f"status[{v}][{l}][{e}]", f"'duplicate', but the hashes say variant {names[v]!r} "
                                                        f"differs from the anchor here")
                    users[s].append(v)
        for s, src in enumerate(self.slot_sources):
            l, e, members = src["layer"], src["expert"], src["variants"]
            for v in users[s]:
                st = self.status[v][l][e]
                st = "shared" if st == "delta" else st  # a delta's base is the shared copy
                if src["kind"] == "mean":
                    if st == "own" or v not in members:
                        _fail(f"slot_sources[{s}].variants",
                              f"slot {s} holds the mean of variants {[names[u] for u in members]} at layer {l} "
                              f"expert {e}, but {names[v]!r} ({st}) is served from it")
                    continue
                u = members[0]
                want = h[a][l][e] if st == "shared" else h[v][l][e]
                if h[u][l][e] != want:
                    whose = (f"the anchor {names[a]!r}'s expert (shared)" if st == "shared"
                             else f"its own expert ({st})")
                    _fail(f"slot_sources[{s}].variants",
                          f"slot {s} is copied from variant {names[u]!r} layer {l} expert {e}, which differs "
                          f"(per the plan's hashes) from what {names[v]!r} must be served there: {whose}. "
                          f"The plan would serve wrong weights; re-run `multimoe-rt plan` instead of editing it")
            if src["kind"] == "mean" and sorted(set(members)) != sorted(set(users[s])):
                _fail(f"slot_sources[{s}].variants",
                      f"slot {s} is the mean of variants {[names[u] for u in members]}, but variants "
                      f"{[names[u] for u in users[s]]} are served from it: the mean must be over exactly those")

    def validate(self, variant_set) -> None:
        """Refuse a malformed plan, or one made for other (or since changed) checkpoints."""
        self.check_fields()
        if self.format not in READABLE_FORMATS:
            raise PlanError(f"plan format {self.format}, this code reads formats {READABLE_FORMATS}")
        names = list(variant_set.names)
        if names != list(self.variant_names):
            raise PlanError(f"plan is for variants {self.variant_names}, got {names}")
        shape = (variant_set.num_layers, variant_set.num_experts, variant_set.hidden_size,
                 variant_set.intermediate_size, bool(variant_set.gated))
        mine = (self.num_layers, self.num_experts, self.hidden_size, self.intermediate_size, self.gated)
        if shape != mine:
            raise PlanError(f"plan fields (num_layers, num_experts, hidden_size, intermediate_size, gated) = "
                            f"{mine}, the variant set has {shape}")
        if self.family != variant_set.family:
            raise PlanError(f"plan field 'family': {self.family!r}, the variant set is {variant_set.family!r}")
        for v, variant in enumerate(variant_set):
            fp = checkpoint_fingerprint(variant.path)
            if fp != self.fingerprints[v]:
                raise PlanError(f"stale plan: checkpoint of variant {self.variant_names[v]!r} at "
                                f"{variant.path} changed since the plan was made (fingerprint "
                                f"{fp} != {self.fingerprints[v]}); re-run `multimoe-rt plan`")
            # Every entry, served or not: check_consistent proves what each entry gets from these hashes, so
            # they must be the checkpoints' own, not whatever a hand edit wrote into the plan.
            actual = checkpoint_expert_hashes(variant, self.num_layers, self.num_experts, fp)
            for l in range(self.num_layers):
                for e in range(self.num_experts):
                    if self.hashes[v][l][e] != actual[l][e]:
                        raise PlanError(f"plan field 'hashes[{v}][{l}][{e}]' does not match variant "
                                        f"{self.variant_names[v]!r}'s checkpoint at layer {l} expert {e}: the plan "
                                        f"was edited or made for other weights; re-run `multimoe-rt plan`")
        self.check_consistent()

    # ---- JSON

    def to_json(self, path: str | os.PathLike) -> None:
        self.check_fields()  # never write what from_json would refuse (a bare NaN, a wrong shape)
        d = asdict(self)
        d["summary"] = {  # for readers of the file; recomputed on load, never trusted
            "device_slots": self.num_device_slots, "host_slots": self.num_host_slots,
            "expert_bytes": self.expert_bytes, "host_bytes": self.host_bytes,
            "device_bytes": self.device_bytes, "separate_expert_bytes": self.separate_expert_bytes,
            "sharing_fraction": self.sharing_fraction(),
            "sharing_fraction_per_layer": [self.sharing_fraction(l) for l in range(self.num_layers)],
            "delta_bytes": self.delta_bytes, "delta_fraction": self.delta_fraction(),
            "deltas_by_spec": self.deltas_by_spec(),
        }
        text = json.dumps(d, indent=1, allow_nan=False)
        try:
            Path(path).write_text(text)
        except OSError as exc:
            raise PlanError(f"cannot write plan {path}: {exc.strerror or exc}") from exc

    @classmethod
    def from_json(cls, path: str | os.PathLike, variant_set=None) -> "Plan":
        """Read and check a plan: every field (type, range, shape), every slot's source against the plan's
        per-expert hashes, and, with ``variant_set``, the checkpoints' fingerprints. PlanError names the field."""
        def no_constant(name):
            raise PlanError(f"{path}: the number {name} is not valid in a plan (JSON has no NaN or Infinity)")

        try:
            d = json.loads(Path(path).read_text(), parse_constant=no_constant)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise PlanError(f"cannot read plan {path}: {exc}") from exc
        if not isinstance(d, dict):
            raise PlanError(f"{path}: not a plan: expected a JSON object, got {_desc(d)}")
        if d.get("format") not in READABLE_FORMATS:
            raise PlanError(f"{path}: plan field 'format': {d.get('format')!r}, this code reads {READABLE_FORMATS}")
        d.pop("summary", None)
        known = {f.name for f in fields(cls)}
        required = {f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING}
        unknown = sorted(set(d) - known)
        if unknown:
            raise PlanError(f"{path}: plan field '{unknown[0]}' is not part of plan format {d['format']}")
        missing = sorted(required - set(d))
        if missing:
            raise PlanError(f"{path}: plan field '{missing[0]}' is missing")
        plan = cls(**d)
        try:
            plan.check_consistent()
            if variant_set is not None:
                plan.validate(variant_set)
        except PlanError as exc:
            raise PlanError(f"{path}: {exc}") from None
        return plan

    # ---- report

    def summary(self) -> str:
        V, L, E = self.num_variants, self.num_layers, self.num_experts
        rows = [f"plan: {V} variants {self.variant_names}, anchor {self.variant_names[self.anchor]!r}, "
                f"metric={self.metric}"
                + (f" ({self.calibration} calibration)" if self.calibration else "")
                + f", scope={self.scope}, representative={self.representative}, slab dtype {self.dtype}",
                f"{'layer':>5} {'dup':>5} {'shared':>6} {'own':>5} {'share%':>6} {'slots':>5} "
                f"{'host':>4} {'bytes':>12} {'delta':>5}"]
        S = len(self.slot_sources)
        for l in range(L):
            st = [self.status[v][l][e] for v in range(V) for e in range(E)]
            ids = {self.slots[v][l][e] for v in range(V) for e in range(E)}
            slots = {i for i in ids if i < S}
            host = sum(1 for s in slots if self.slot_location[s] == "host")
            dbytes = sum(self.deltas[i - S]["nbytes"] for i in ids if i >= S)
            rows.append(f"{l:>5} {st.count('duplicate'):>5} {st.count('shared'):>6} {st.count('own'):>5} "
                        f"{100 * self.sharing_fraction(l):>6.1f} {len(slots):>5} {host:>4} "
                        f"{(len(slots) - host) * self.slot_nbytes + dbytes:>12} {st.count('delta'):>5}")
        sep = self.separate_expert_bytes
        rows.append(f"expert slab: {self.num_device_slots} slots x {self.slot_nbytes} B"
                    + (f" + {len(self.deltas)} deltas {format_size(self.delta_bytes)} "
                       f"({', '.join(f'{k} x{n}' for k, n in self.deltas_by_spec().items())})" if self.deltas else "")
                    + f" = {format_size(self.expert_bytes)} vs {format_size(sep)} for {V} separate models' "
                    f"experts ({100 * self.expert_bytes / sep:.1f}%)")
        if self.entry_cost is not None:
            pred = self.predicted_loss()
            rows.append("predicted calibration-loss change per variant (sum of measured single-entry costs, nats): "
                        + ", ".join(f"{n} {pred[v]:+.4f}" for v, n in enumerate(self.variant_names) if v != self.anchor))
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
