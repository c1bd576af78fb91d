"""Similarity-based expert consolidation (the paper's Algorithm 1, "Initial Expert Loader").

Fine-tuned variants keep most experts close to the base. We measure how far each variant's
expert is from the anchor's (same layer, same expert index), store one shared copy per
(layer, expert), and then give the most different experts their own copy while the budget
allows. Byte-identical experts (e.g. frozen during fine-tuning) always share, at no cost.

The result is a :class:`Plan`: plain data (JSON, versioned) saying which slab slot serves each
(variant, layer, expert), where each slot's weights come from, and what it costs.
:func:`load_slab` turns a plan into an ``ExpertSlab`` + ``SlotTable``.

Everything here streams one expert at a time: host memory stays at a few experts, never the
size of the variant set.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

FORMAT_VERSION = 1
METRICS = ("l2", "cosine", "output", "random")
SCOPES = ("global", "per_layer")
REPRESENTATIVES = ("anchor", "mean")
_DTYPE_NAMES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class PlanError(ValueError):
    """A plan cannot be made, loaded or applied; the message says what was expected."""


# --------------------------------------------------------------------------------------------
# sizes


_SIZE_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3,
               "gb": 1000**3, "t": 1000**4, "tb": 1000**4, "kib": 1024, "mib": 1024**2,
               "gib": 1024**3, "tib": 1024**4}


def parse_size(text: str | int) -> int:
    """'40GiB' / '512MiB' / '1.5GB' / '123456' -> bytes (int)."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _SIZE_UNITS:
        raise ValueError(f"cannot parse size {text!r}: expected a number with an optional unit "
                         f"(B, KB, MB, GB, TB, KiB, MiB, GiB, TiB), e.g. '40GiB'")
    return int(float(m.group(1)) * _SIZE_UNITS[m.group(2).lower()])


def format_size(n: int | float) -> str:
    for unit, scale in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


# --------------------------------------------------------------------------------------------
# hashing and fingerprints


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    # uint8 view works for bfloat16 too, which numpy cannot represent directly
    return memoryview(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())


def expert_hash(w1: torch.Tensor, w2: torch.Tensor) -> str:
    """blake2b of the raw bytes (plus dtype and shapes, so equal bytes of another layout differ)."""
    h = hashlib.blake2b(digest_size=16)
    for t in (w1, w2):
        h.update(f"{t.dtype}{tuple(t.shape)};".encode())
        h.update(_tensor_bytes(t))
    return h.hexdigest()


# Files up to this size are hashed whole; larger ones are sampled (a fine-tune changes nearly
# every byte of the tensors it touches, so samples catch it; load_slab also re-hashes every
# expert it reads against the plan).
_FULL_HASH_LIMIT = 64 * 1024**2
_SAMPLE_CHUNKS, _SAMPLE_BYTES = 256, 64 * 1024


def checkpoint_fingerprint(path: str | os.PathLike) -> str:
    """A content fingerprint of an HF directory: config.json + every *.safetensors file.

    Uses contents, not mtimes, so a copied directory still matches and a rewritten one does not.
    """
    path = Path(path)
    h = hashlib.blake2b(digest_size=16)
    cfg = path / "config.json"
    if cfg.exists():
        h.update(cfg.read_bytes())
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise PlanError(f"{path}: no *.safetensors files to fingerprint")
    for f in files:
        size = f.stat().st_size
        h.update(f"{f.name}:{size};".encode())
        with open(f, "rb") as fh:
            if size <= _FULL_HASH_LIMIT:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
            else:
                header_len = int.from_bytes(fh.read(8), "little")
                h.update(fh.read(header_len))
                for i in range(_SAMPLE_CHUNKS):
                    fh.seek(i * (size - _SAMPLE_BYTES) // (_SAMPLE_CHUNKS - 1))
                    h.update(fh.read(_SAMPLE_BYTES))
    return h.hexdigest()


def _checkpoint_tensor_bytes(path: Path) -> int:
    """Bytes of all tensors stored in a directory's safetensors files (from their headers)."""
    total = 0
    for f in sorted(Path(path).glob("*.safetensors")):
        with open(f, "rb") as fh:
            header_len = int.from_bytes(fh.read(8), "little")
        total += f.stat().st_size - 8 - header_len
    return total


# --------------------------------------------------------------------------------------------
# distances


def expert_forward(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, gated: bool) -> torch.Tensor:
    """One expert on rows of ``x`` (the contract's function, one slot, weight 1)."""
    h = x @ w1.T
    if gated:
        gate, up = h.chunk(2, dim=-1)
        a = F.silu(gate) * up
    else:
        a = F.relu(h)
    return a @ w2.T


def gaussian_calibration(hidden_size: int, num_tokens: int = 256, seed: int = 0) -> torch.Tensor:
    """Fallback inputs when no recorded states are given: Gaussian rows rescaled to RMS 1.

    MoE inputs are RMS-normed (Mixtral) or layer-normed (Switch) states, so per-token RMS ~1
    before the norm's learned gain. This is a stand-in, labelled ``"gaussian"`` in the plan;
    recorded states (``record_calibration``) track quality better.
    """
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tokens, hidden_size, generator=g, dtype=torch.float32)
    return x / x.pow(2).mean(-1, keepdim=True).sqrt()


@torch.no_grad()
def record_calibration(model: torch.nn.Module, moe_layers: list[str], inputs: list[dict],
                       max_tokens: int = 512) -> dict[int, torch.Tensor]:
    """Record the hidden states entering each MoE block (``Variant.moe_layers`` prefixes).

    ``inputs`` is a list of keyword dicts for ``model(**kw)`` (e.g. ``{"input_ids": ...}``).
    Returns ``{layer: float32 [N, H]}`` with at most ``max_tokens`` rows per layer.
    """
    modules = dict(model.named_modules())
    missing = [p for p in moe_layers if p not in modules]
    if missing:
        raise PlanError(f"record_calibration: model has no modules {missing[:3]} "
                        f"(expected the MoE block prefixes of Variant.moe_layers)")
    out: dict[int, list[torch.Tensor]] = {i: [] for i in range(len(moe_layers))}
    hooks = []
    for i, prefix in enumerate(moe_layers):
        def hook(mod, args, kwargs, i=i):
            x = args[0] if args else next(iter(kwargs.values()))
            out[i].append(x.detach().reshape(-1, x.shape[-1]).float().cpu())
        hooks.append(modules[prefix].register_forward_pre_hook(hook, with_kwargs=True))
    try:
        for kw in inputs:
            model(**kw)
            if all(sum(len(t) for t in v) >= max_tokens for v in out.values()):
                break
    finally:
        for h in hooks:
            h.remove()
    return {i: torch.cat(v)[:max_tokens] for i, v in out.items() if v}


@torch.no_grad()
def calibration_from_text(variant, text: str, max_tokens: int = 512, seq_len: int = 128) -> dict[int, torch.Tensor]:
    """Recorded MoE-input states of ``variant`` (usually the anchor) on ``text``.

    Loads the variant with transformers (safetensors only) and byte-tokenizes the text with the
    ByteTokenizer the zoo writes next to each checkpoint; other tokenizers are not supported here
    (record states yourself with ``record_calibration``).
    """
    from .tokenizer import TOKENIZER_FILE, ByteTokenizer

    if not (Path(variant.path) / TOKENIZER_FILE).exists():
        raise PlanError(f"{variant.path}: no {TOKENIZER_FILE}; calibration_from_text needs the zoo's byte "
                        f"tokenizer (use record_calibration with your own inputs instead)")
    tok = ByteTokenizer.load(variant.path)
    ids = tok.encode(text)[:max_tokens]
    if not ids:
        raise PlanError("calibration text is empty")
    batches = [torch.tensor([ids[i:i + seq_len]]) for i in range(0, len(ids), seq_len)]
    if variant.family == "mixtral":
        from transformers import MixtralForCausalLM as cls
        inputs = [{"input_ids": b} for b in batches]
    else:
        from transformers import SwitchTransformersForConditionalGeneration as cls
        inputs = [{"input_ids": b, "decoder_input_ids": b} for b in batches]
    model = cls.from_pretrained(str(variant.path), dtype=torch.float32, use_safetensors=True).eval()
    return record_calibration(model, variant.moe_layers, inputs, max_tokens=max_tokens)


def non_expert_nbytes(variant, dtype=None) -> int:
    """Bytes of one variant's non-expert tensors (numel from the file headers) in ``dtype``
    (default: the variant's expert dtype): the size of one resident non-expert set."""
    itemsize = torch.empty((), dtype=dtype or variant.dtype).element_size()
    return sum(math.prod(variant.tensor_shape(n)) for n in variant.non_expert_names()) * itemsize


@dataclass
class Distances:
    """Per (variant, layer, expert) distances to the anchor; row ``anchor`` is all zeros."""
    anchor: int
    l2: list            # [V][L][E] relative L2  ||a - b|| / ||b||, b = anchor
    cosine: list        # [V][L][E] 1 - cos(a, b)
    output: list | None  # [V][L][E] mean relative output difference, or None if not computed
    hashes: list        # [V][L][E] expert_hash
    duplicate: list     # [V][L][E] bool: byte-identical to the anchor's expert
    calibration: str | None  # "recorded" | "gaussian" | None
    w1_shape: tuple
    w2_shape: tuple
    checkpoint_dtype: str


def _float32(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(torch.float32)


def compute_distances(variant_set, anchor: int = 0, output: bool = False,
                      calib: dict[int, torch.Tensor] | None = None, calib_tokens: int = 256,
                      seed: int = 0, progress: bool = False) -> Distances:
    """Stream every expert once, in float32, and measure it against the anchor's.

    Holds the anchor's expert and one other variant's expert at a time (plus, for the output
    metric, the anchor's outputs on the calibration rows).
    """
    V, L, E = len(variant_set), variant_set.num_layers, variant_set.num_experts
    if not 0 <= anchor < V:
        raise PlanError(f"anchor {anchor} out of range: the variant set has {V} variants")
    gated = variant_set.gated
    l2 = [[[0.0] * E for _ in range(L)] for _ in range(V)]
    cos = [[[0.0] * E for _ in range(L)] for _ in range(V)]
    outd = [[[0.0] * E for _ in range(L)] for _ in range(V)] if output else None
    hashes = [[[""] * E for _ in range(L)] for _ in range(V)]
    dup = [[[v == anchor] * E for _ in range(L)] for v in range(V)]
    calibration = None
    if output:
        calibration = "recorded" if calib is not None else "gaussian"
        if calib is None:
            fallback = gaussian_calibration(variant_set.hidden_size, calib_tokens, seed)
    bar = _progress(L * E, "expert distances", progress)
    w1_shape = w2_shape = None
    ck_dtype = None
    for layer in range(L):
        if output:
            x = fallback if calib is None else calib.get(layer)
            if x is None:
                raise PlanError(f"calibration states missing for MoE layer {layer} "
                                f"(got layers {sorted(calib)})")
            x = _float32(x).reshape(-1, variant_set.hidden_size)
        for e in range(E):
            a1, a2 = variant_set[anchor].expert(layer, e)
            w1_shape, w2_shape, ck_dtype = tuple(a1.shape), tuple(a2.shape), a1.dtype
            hashes[anchor][layer][e] = expert_hash(a1, a2)
            a1f, a2f = _float32(a1), _float32(a2)
            a_sq = a1f.pow(2).sum() + a2f.pow(2).sum()
            a_norm = a_sq.sqrt()
            if output:
                ya = expert_forward(x, a1f, a2f, gated)
                ya_norm = ya.norm(dim=-1).clamp_min(1e-12)
            for v in range(V):
                if v == anchor:
                    continue
                b1, b2 = variant_set[v].expert(layer, e)
                if tuple(b1.shape) != w1_shape or tuple(b2.shape) != w2_shape:
                    raise PlanError(f"variant {variant_set.names[v]!r} layer {layer} expert {e}: "
                                    f"shapes {tuple(b1.shape)}, {tuple(b2.shape)}; anchor has "
                                    f"{w1_shape}, {w2_shape}")
                hv = expert_hash(b1, b2)
                hashes[v][layer][e] = hv
                # hash equality is confirmed with an exact compare: both are in memory anyway
                if hv == hashes[anchor][layer][e] and b1.dtype == a1.dtype \
                        and torch.equal(b1, a1) and torch.equal(b2, a2):
                    dup[v][layer][e] = True
                    continue
                b1f, b2f = _float32(b1), _float32(b2)
                diff_sq = (b1f - a1f).pow(2).sum() + (b2f - a2f).pow(2).sum()
                l2[v][layer][e] = float(diff_sq.sqrt() / a_norm.clamp_min(1e-30))
                dot = (b1f * a1f).sum() + (b2f * a2f).sum()
                b_norm = (b1f.pow(2).sum() + b2f.pow(2).sum()).sqrt()
                cos[v][layer][e] = float(1.0 - dot / (a_norm * b_norm).clamp_min(1e-30))
                if output:
                    yb = expert_forward(x, b1f, b2f, gated)
                    outd[v][layer][e] = float(((yb - ya).norm(dim=-1) / ya_norm).mean())
            bar.update(1)
    bar.close()
    return Distances(anchor=anchor, l2=l2, cosine=cos, output=outd, hashes=hashes, duplicate=dup,
                     calibration=calibration, w1_shape=w1_shape, w2_shape=w2_shape,
                     checkpoint_dtype=str(ck_dtype).replace("torch.", ""))


def _progress(total: int, desc: str, enabled: bool):
    if enabled:
        try:
            from tqdm import tqdm
            return tqdm(total=total, desc=desc)
        except ImportError:
            pass

    class _Null:
        def update(self, n):
            pass

        def close(self):
            pass
    return _Null()


# --------------------------------------------------------------------------------------------
# the plan


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


def _dtype(name_or_dtype) -> torch.dtype:
    if isinstance(name_or_dtype, torch.dtype):
        return name_or_dtype
    name = str(name_or_dtype).replace("torch.", "")
    if name not in _DTYPE_NAMES:
        raise PlanError(f"unsupported slab dtype {name_or_dtype!r}; expected one of {list(_DTYPE_NAMES)}")
    return _DTYPE_NAMES[name]


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
              progress: bool = False) -> Plan:
    """Algorithm 1: one shared copy per (layer, expert), then own copies, most different first.

    Policy (how many own copies): ``share`` (target fraction of non-duplicate non-anchor entries
    served by the shared copy; a lower bound when byte-identical non-anchor experts travel
    together), ``threshold`` (own copy when distance > threshold), or else ``budget_bytes``
    (as many as fit). ``budget_bytes`` is also the device capacity under the first two.
    The budget covers ``slots x slot bytes + non_expert_bytes``, slot bytes from the expert
    tensors' shapes in the slab ``dtype`` (default: checkpoint dtype).
    Too little room for one copy per (layer, expert) raises PlanError, unless ``offload``: then
    slots past the capacity are placed in a host tier (shared copies first on device).
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
    if share is not None and not 0.0 <= share <= 1.0:
        raise PlanError(f"share must be in [0, 1], got {share}")
    budget = None if budget_bytes is None else parse_size(budget_bytes)
    non_expert = parse_size(non_expert_bytes)

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
    else:
        values = getattr(dist, metric)
        if values is None:
            raise PlanError(f"distances have no {metric!r} values; compute them with output=True")

    slab_dtype = _dtype(dtype if dtype is not None else dist.checkpoint_dtype)
    itemsize = torch.empty((), dtype=slab_dtype).element_size()
    slot_nbytes = (math.prod(dist.w1_shape) + math.prod(dist.w2_shape)) * itemsize
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
    chosen = []
    if share is not None:
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
    total_slots = base_slots + len(chosen)
    if capacity is not None and total_slots > capacity and not offload:
        need = total_slots * slot_nbytes + non_expert
        raise PlanError(f"the {'share' if share is not None else 'threshold'} policy asks for "
                        f"{total_slots} slots = {need} B ({format_size(need)}) with the working set, "
                        f"over the budget {budget} B; {capacity} slots fit. Raise the budget, lower "
                        f"the own copies, or pass offload=True")

    # --- assignment: shared slots first (they serve the most entries), then own copies by rank
    status = [[["anchor" if v == anchor else ("duplicate" if dist.duplicate[v][l][e] else "shared")
                for e in range(E)] for l in range(L)] for v in range(V)]
    for _, l, e, members in chosen:
        for v in members:
            status[v][l][e] = "own"
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
                "cache_slots": cache_slots},
        calibration=dist.calibration if metric == "output" else None,
        checkpoint_bytes=[_checkpoint_tensor_bytes(var.path) for var in variant_set],
    )
    plan.check_consistent()
    return plan


# --------------------------------------------------------------------------------------------
# loading


def _read_expert(plan: Plan, variant_set, v: int, l: int, e: int):
    w1, w2 = variant_set[v].expert(l, e)
    if expert_hash(w1, w2) != plan.hashes[v][l][e]:
        raise PlanError(f"stale plan: variant {plan.variant_names[v]!r} layer {l} expert {e} "
                        f"differs from when the plan was made; re-run `multimoe-rt plan`")
    return w1, w2


def source_expert(plan: Plan, variant_set, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The weights a slot holds, read from the checkpoints (mean in float32, one member at a time)."""
    src = plan.slot_sources[slot]
    l, e, members = src["layer"], src["expert"], src["variants"]
    if src["kind"] == "variant":
        return _read_expert(plan, variant_set, members[0], l, e)
    acc1 = acc2 = None
    for v in members:
        w1, w2 = _read_expert(plan, variant_set, v, l, e)
        if acc1 is None:
            acc1, acc2 = w1.to(torch.float32).clone(), w2.to(torch.float32).clone()
        else:
            acc1 += w1.to(torch.float32)
            acc2 += w2.to(torch.float32)
    return acc1 / len(members), acc2 / len(members)


def load_slab(plan: Plan, variant_set, device="cpu", dtype=None, progress: bool = False):
    """Fill an ExpertSlab and SlotTable from the checkpoints as the plan says.

    Validates the plan against the checkpoints first (fingerprints) and every expert read
    against its recorded hash. Reads each source expert once; host memory holds one expert
    (two float32 accumulators for a mean slot). ``dtype`` overrides the plan's slab dtype
    (the plan's byte accounting then no longer applies). Host-tier slots (``offload``) go to a
    ``HostTier`` attached to the slab, paged into its ``cache_slots`` on use.
    """
    from .slab import ExpertSlab, HostTier, SlotTable

    plan.validate(variant_set)
    slab_dtype = _dtype(dtype if dtype is not None else plan.dtype)
    n_dev = plan.num_device_slots
    slab = ExpertSlab(n_dev + plan.cache_slots, plan.hidden_size, plan.intermediate_size, plan.gated,
                      dtype=slab_dtype, device=device)
    bar = _progress(len(plan.slot_location), "loading experts", progress)
    for s in range(n_dev):
        w1, w2 = source_expert(plan, variant_set, s)
        slab.write(s, w1.to(slab_dtype), w2.to(slab_dtype))
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
    table = SlotTable(plan.num_variants, plan.num_layers, plan.num_experts, device=device)
    table.slots.copy_(torch.tensor(plan.slots, dtype=torch.int32))
    table.validate(slab)
    return slab, table


# --------------------------------------------------------------------------------------------
# picture

_STATUS_CODE = {"anchor": 0, "duplicate": 1, "shared": 2, "own": 3}
_COLOURS = ["#4c72b0", "#8c8c8c", "#55a868", "#dd8452", "#c44e52"]
_LABELS = ["anchor variant", "exact duplicate (merged, free)", "shared (merged)", "own copy",
           "host tier (offloaded)"]


def heatmap(plan: Plan, path: str | os.PathLike) -> None:
    """PNG of the layout: per variant a layers x experts grid coloured by who serves it."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.colors import ListedColormap
        from matplotlib.patches import Patch
    except ImportError as exc:
        raise PlanError("heatmap needs matplotlib: pip install 'multimoe_rt[plot]'") from exc
    V, L, E = plan.num_variants, plan.num_layers, plan.num_experts
    # fixed inches for title and legend so they never overlap the grids, whatever L is
    height = 1.4 + 0.8 + 0.3 * L
    fig, axes = plt.subplots(1, V, figsize=(max(6.0, 1.2 + 0.5 * E * V), height), squeeze=False)
    cmap = ListedColormap(_COLOURS)
    for v, ax in enumerate(axes[0]):
        grid = [[4 if plan.slot_location[plan.slots[v][l][e]] == "host"
                 else _STATUS_CODE[plan.status[v][l][e]] for e in range(E)] for l in range(L)]
        ax.imshow(grid, cmap=cmap, vmin=-0.5, vmax=len(_COLOURS) - 0.5, aspect="auto",
                  interpolation="nearest")
        ax.set_title(f"{plan.variant_names[v]}", fontsize=9)
        ax.set_xlabel("expert")
        ax.set_xticks(range(E))
        ax.set_yticks(range(L))
        if v == 0:
            ax.set_ylabel("MoE layer")
    fig.suptitle(f"{plan.metric} / {plan.scope} / {plan.representative}: slab "
                 f"{format_size(plan.expert_bytes)} vs {format_size(plan.separate_expert_bytes)} "
                 f"separate; sharing {100 * plan.sharing_fraction():.0f}%", fontsize=9)
    fig.legend(handles=[Patch(color=c, label=t) for c, t in zip(_COLOURS, _LABELS)],
               loc="lower center", ncol=3, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.8 / height, 1, 1 - 0.4 / height))
    fig.savefig(path, dpi=120)
    plt.close(fig)
