"""Compressed expert deltas: an expert stored as a base slot of the slab plus a small delta D, W = W_base + D.

Codecs (each encodes one weight matrix ``[N, K]``, output rows by input columns, as the slab stores them):

    sign1      packed sign bits of D (1 bit per value, 8 per byte along K, bit j of byte b = column 8b + j,
               1 = positive) and one scale per output row, initialised to the row's mean |D| (BitDelta's
               initialisation; the least-squares scale for a fixed sign pattern).
               D ~= scale[n] * (2 * bit[n, k] - 1)
    lowrank<r> factors of rank r from the SVD of D, the singular values split evenly: D ~= U @ V,
               U [N, r], V [r, K]; r is chosen per expert.
    int4       4-bit symmetric codes per group of INT4_GROUP values along K (two codes per byte, low nibble =
               even column) and one scale per group: D ~= (q - 8) * scale[n, k // INT4_GROUP], q in [1, 15].

A *spec* names what one expert stores: one codec, or several joined by ``+`` (``"lowrank8+sign1"``); the
components are applied in the order lowrank, int4, sign1, each encoding what the previous ones left over.

``DeltaPools`` holds every delta of a slab in preallocated per-codec pools and a descriptor table. The slot
table's entries then are *expert ids*: ids ``0 .. num_slots-1`` are the dense slab slots themselves; ids from
``num_slots`` on are delta entries. ``desc[id] = (base slot, sign1 index, lowrank start, lowrank rank,
int4 index)`` (-1 / 0 where absent), so one fused MoE call serves a batch whose entries mix dense slots and
any codecs: the function every backend computes is the dense contract with

    w1(id) = w1[desc[id, 0]] + D1(id),   w2(id) = w2[desc[id, 0]] + D2(id)

Lowrank factors live in one flat pool per weight (``lr1``, ``lr2``), in rank units: an entry of rank r at
start p holds ``U1 = lr1[p*(N1+H) : p*(N1+H) + N1*r].view(N1, r)`` followed by ``V1 = ....view(r, H)``
(``lr2`` likewise with ``(H + I)``), so ranks vary per expert with no padding.

Backends (``delta_moe``, which imports this module, never the other way): ``moe_torch_delta`` (pure PyTorch:
one base matmul per base slot for all its pairs, whatever their variant, then each delta's small terms on its
own rows) and ``moe_reference_delta`` (float64, from the materialised effective weights, ``effective_weights``
below). The Triton kernel is ``kernels/delta_gemm.py``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .errors import MultimoeError

INT4_GROUP = 32
CODECS = ("sign1", "lowrank", "int4")
_ORDER = {"lowrank": 0, "int4": 1, "sign1": 2}
DESC_COLUMNS = ("base", "sign1", "lowrank_start", "lowrank_rank", "int4")
DESC_BYTES = 4 * len(DESC_COLUMNS) + 4  # device bytes per expert id: its descriptor row (int32) and sort key


class DeltaError(MultimoeError, ValueError):
    """A delta cannot be encoded, stored or used (non-finite values, a full pool, a bad spec or descriptor)."""


# ------------------------------------------------------------------------------------------ specs


def parse_spec(spec: str) -> tuple[tuple[str, int], ...]:
    """``"lowrank8+sign1"`` -> ``(("lowrank", 8), ("sign1", 0))`` in application order."""
    if not isinstance(spec, str) or not spec:
        raise DeltaError(f"delta spec must be a non-empty string like 'sign1', 'lowrank16', 'int4' or "
                         f"'lowrank8+sign1', got {spec!r}")
    parts = []
    for part in spec.split("+"):
        m = re.fullmatch(r"(sign1|int4|lowrank)(\d*)", part.strip())
        if not m or (m.group(1) == "lowrank") != bool(m.group(2)):
            raise DeltaError(f"delta spec {spec!r}: {part!r} is not one of sign1, int4, lowrank<rank>")
        rank = int(m.group(2) or 0)
        if m.group(1) == "lowrank" and rank <= 0:
            raise DeltaError(f"delta spec {spec!r}: rank must be positive")
        parts.append((m.group(1), rank))
    kinds = [p[0] for p in parts]
    if len(set(kinds)) != len(kinds):
        raise DeltaError(f"delta spec {spec!r}: a codec appears twice")
    return tuple(sorted(parts, key=lambda p: _ORDER[p[0]]))


def canonical_spec(spec: str) -> str:
    return "+".join(f"{k}{r if k == 'lowrank' else ''}" for k, r in parse_spec(spec))


def _matrix_nbytes(kind: str, rank: int, n: int, k: int, itemsize: int) -> int:
    if kind == "sign1":
        return n * math.ceil(k / 8) + n * itemsize
    if kind == "lowrank":
        return rank * (n + k) * itemsize
    return n * math.ceil(k / 2) + n * math.ceil(k / INT4_GROUP) * itemsize


def spec_nbytes(spec: str, n1: int, hidden: int, intermediate: int, itemsize: int) -> int:
    """Bytes one expert's delta takes on the device (both matrices; scales and factors in the slab dtype),
    plus its id's table entries (``DESC_BYTES``)."""
    total = DESC_BYTES
    for kind, rank in parse_spec(spec):
        total += _matrix_nbytes(kind, rank, n1, hidden, itemsize) + _matrix_nbytes(kind, rank, hidden, intermediate,
                                                                                   itemsize)
    return total


# ------------------------------------------------------------------------------------------ codecs


def _check_finite(what: str, t: torch.Tensor) -> None:
    if not bool(torch.isfinite(t).all()):
        n_nan, n_inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
        raise DeltaError(f"{what}: {n_nan + n_inf} non-finite values ({n_nan} NaN, {n_inf} Inf) of {t.numel()}; "
                         f"a delta must be finite")


_BIT_WEIGHTS = {}
_SIGN_LUT = {}


def sign1_encode(d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``d [N, K]`` -> ``(bits uint8 [N, ceil(K/8)], scale float32 [N])``; zeros count as positive."""
    n, k = d.shape
    kp = math.ceil(k / 8) * 8
    pos = torch.zeros(n, kp, dtype=torch.uint8, device=d.device)
    pos[:, :k] = (d >= 0).to(torch.uint8)
    key = d.device
    if key not in _BIT_WEIGHTS:
        _BIT_WEIGHTS[key] = (2 ** torch.arange(8, dtype=torch.int32, device=d.device))
    bits = (pos.view(n, kp // 8, 8).to(torch.int32) * _BIT_WEIGHTS[key]).sum(-1).to(torch.uint8)
    scale = d.abs().float().mean(dim=1)
    return bits, scale


def _sign_lut(dtype, device) -> torch.Tensor:
    key = (dtype, device)
    if key not in _SIGN_LUT:
        b = torch.arange(256, device=device)[:, None]
        _SIGN_LUT[key] = (((b >> torch.arange(8, device=device)) & 1) * 2 - 1).to(dtype)  # [256, 8] of +-1
    return _SIGN_LUT[key]


def sign1_signs(bits: torch.Tensor, k: int, dtype) -> torch.Tensor:
    """The +-1 matrix ``[N, K]`` of packed sign bits: one row of a [256, 8] table per byte (index_select:
    on a CPU about 8x faster than shifting and masking, or than F.embedding)."""
    n = bits.shape[0]
    rows = torch.index_select(_sign_lut(dtype, bits.device), 0, bits.reshape(-1).to(torch.int32))
    return rows.view(n, -1)[:, :k]


def sign1_decode(bits: torch.Tensor, scale: torch.Tensor, k: int, dtype=torch.float32) -> torch.Tensor:
    return sign1_signs(bits, k, dtype) * scale.to(dtype)[:, None]


def lowrank_encode(d: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``d [N, K]`` -> ``(U [N, r], V [r, K])``, float32, ``U @ V`` the best rank-r approximation (SVD),
    the singular values split as their square roots into both factors (keeps 16-bit factors in range).
    A rank above min(N, K) is padded with zero columns/rows.

    Large matrices (min(N, K) > 8 x (rank + 8)) use a randomized SVD with power iterations, seeded for
    repeatable plans: at Mixtral's shapes a full SVD per expert made loading take minutes on a CPU, and its
    approximation error stays within 1% of the exact SVD's (tests/test_lowrank.py)."""
    n, k = d.shape
    q = rank + 8
    if min(n, k) > 8 * q:
        with torch.random.fork_rng(devices=[d.device] if d.device.type == "cuda" else []):
            torch.manual_seed(0)
            u, s, v = torch.svd_lowrank(d.float(), q=q, niter=6)
        vh = v.T
    else:
        u, s, vh = torch.linalg.svd(d.float(), full_matrices=False)
    r = min(rank, s.numel())
    root = s[:r].sqrt()
    U = torch.zeros(n, rank, dtype=torch.float32, device=d.device)
    V = torch.zeros(rank, k, dtype=torch.float32, device=d.device)
    U[:, :r] = u[:, :r] * root
    V[:r] = root[:, None] * vh[:r]
    return U, V


def int4_encode(d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``d [N, K]`` -> ``(codes uint8 [N, ceil(K/2)], scales float32 [N, ceil(K/G)])``, G = INT4_GROUP;
    symmetric: scale = max |d| of the group / 7, q = round(d / scale) + 8 in [1, 15]."""
    n, k = d.shape
    g = math.ceil(k / INT4_GROUP)
    padded = torch.zeros(n, g * INT4_GROUP, dtype=torch.float32, device=d.device)
    padded[:, :k] = d.float()
    groups = padded.view(n, g, INT4_GROUP)
    scale = groups.abs().amax(-1) / 7.0
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = (torch.round(groups / safe[..., None]).clamp(-7, 7) + 8).to(torch.uint8).view(n, -1)[:, :k]
    if k % 2:
        q = torch.cat([q, torch.full((n, 1), 8, dtype=torch.uint8, device=d.device)], 1)
    codes = q[:, 0::2] | (q[:, 1::2] << 4)
    return codes.contiguous(), scale


_INT4_LUT = {}


def int4_decode(codes: torch.Tensor, scales: torch.Tensor, k: int, dtype=torch.float32) -> torch.Tensor:
    """``[N, K]`` in ``dtype``: both codes of a byte from one row of a [256, 2] table, times the group scale."""
    n, g = codes.shape[0], scales.shape[1]
    key = (dtype, codes.device)
    if key not in _INT4_LUT:
        b = torch.arange(256, device=codes.device)
        _INT4_LUT[key] = torch.stack([(b & 15) - 8, (b >> 4) - 8], 1).to(dtype)
    q = torch.index_select(_INT4_LUT[key], 0, codes.reshape(-1).to(torch.int32)).view(n, -1)
    if q.shape[1] < g * INT4_GROUP:
        q = F.pad(q, (0, g * INT4_GROUP - q.shape[1]))
    q = q[:, :g * INT4_GROUP].view(n, g, INT4_GROUP) * scales.to(dtype)[:, :, None]
    return q.view(n, -1)[:, :k]


@dataclass
class EncodedDelta:
    """One expert's delta in float32 (scales, factors) and uint8 (bits, codes); ``None`` where absent.

    sign1: (bits1, scale1, bits2, scale2); lowrank: (U1, V1, U2, V2); int4: (codes1, scales1, codes2, scales2).
    """
    spec: str
    shapes: tuple  # ((N1, H), (H, I))
    sign1: tuple | None = None
    lowrank: tuple | None = None
    int4: tuple | None = None

    @property
    def rank(self) -> int:
        return 0 if self.lowrank is None else self.lowrank[0].shape[1]

    def decode(self, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """``(D1, D2)`` in ``dtype``."""
        out = []
        for m, (n, k) in enumerate(self.shapes):
            d = torch.zeros(n, k, dtype=dtype, device=self._device())
            if self.lowrank is not None:
                d += self.lowrank[2 * m].to(dtype) @ self.lowrank[2 * m + 1].to(dtype)
            if self.int4 is not None:
                d += int4_decode(self.int4[2 * m], self.int4[2 * m + 1], k, dtype)
            if self.sign1 is not None:
                d += sign1_decode(self.sign1[2 * m], self.sign1[2 * m + 1], k, dtype)
            out.append(d)
        return out[0], out[1]

    def _device(self):
        for part in (self.sign1, self.lowrank, self.int4):
            if part is not None:
                return part[0].device
        return torch.device("cpu")


def encode_delta(d1: torch.Tensor, d2: torch.Tensor, spec: str, round_to=None) -> EncodedDelta:
    """Encode an expert's delta ``(D1 [N1, H], D2 [H, I])`` as ``spec``; each component encodes the residual
    of the ones before it. ``round_to``: the dtype the scales and factors will be stored in, so later
    components see the rounding of earlier ones. Non-finite input raises ``DeltaError``."""
    parts = parse_spec(spec)
    _check_finite("delta w1", d1)
    _check_finite("delta w2", d2)
    res = [d1.detach().float().clone(), d2.detach().float().clone()]
    enc = EncodedDelta(canonical_spec(spec), (tuple(d1.shape), tuple(d2.shape)))

    def stored(t):
        return t if round_to is None else t.to(round_to).float()

    for kind, rank in parts:
        got = []
        for m in range(2):
            n, k = res[m].shape
            if kind == "lowrank":
                U, V = lowrank_encode(res[m], rank)
                U, V = stored(U), stored(V)
                res[m] -= U @ V
                got += [U, V]
            elif kind == "int4":
                codes, scales = int4_encode(res[m])
                scales = stored(scales)
                res[m] -= int4_decode(codes, scales, k)
                got += [codes, scales]
            else:
                bits, scale = sign1_encode(res[m])
                scale = stored(scale)
                res[m] -= sign1_decode(bits, scale, k)
                got += [bits, scale]
        setattr(enc, kind, tuple(got))
    return enc


# ------------------------------------------------------------------------------------------ pools


class DeltaPools:
    """Preallocated delta pools of one slab and the descriptor table over expert ids (module docstring).

    Sized once: ``sign1`` / ``int4`` entries, ``lowrank_units`` (the sum of the ranks of all lowrank entries)
    and ``entries`` delta ids after the ``num_slots`` dense ids. ``add`` fills the next id.
    """

    def __init__(self, num_slots: int, hidden: int, intermediate: int, gated: bool, dtype=torch.float32,
                 device="cpu", entries: int = 0, sign1: int = 0, lowrank_units: int = 0, int4: int = 0):
        if min(entries, sign1, lowrank_units, int4) < 0 or num_slots <= 0:
            raise DeltaError(f"DeltaPools sizes must be >= 0 (and num_slots > 0), got num_slots={num_slots}, "
                             f"entries={entries}, sign1={sign1}, lowrank_units={lowrank_units}, int4={int4}")
        self.num_slots, self.hidden, self.intermediate, self.gated = num_slots, hidden, intermediate, gated
        self.dtype, self.device = dtype, torch.device(device)
        H, I = hidden, intermediate
        n1 = 2 * I if gated else I
        self.n1 = n1
        dev = self.device
        self.desc = torch.empty(num_slots + entries, len(DESC_COLUMNS), dtype=torch.int32)  # host copy
        self._desc_host = [(s, -1, 0, 0, -1) for s in range(num_slots)] + [(-1, -1, 0, 0, -1)] * entries
        self.sign_bits1 = torch.empty(sign1, n1, math.ceil(H / 8), dtype=torch.uint8, device=dev)
        self.sign_scale1 = torch.empty(sign1, n1, dtype=dtype, device=dev)
        self.sign_bits2 = torch.empty(sign1, H, math.ceil(I / 8), dtype=torch.uint8, device=dev)
        self.sign_scale2 = torch.empty(sign1, H, dtype=dtype, device=dev)
        self.lr1 = torch.empty(lowrank_units * (n1 + H), dtype=dtype, device=dev)
        self.lr2 = torch.empty(lowrank_units * (H + I), dtype=dtype, device=dev)
        self.q1 = torch.empty(int4, n1, math.ceil(H / 2), dtype=torch.uint8, device=dev)
        self.q_scale1 = torch.empty(int4, n1, math.ceil(H / INT4_GROUP), dtype=dtype, device=dev)
        self.q2 = torch.empty(int4, H, math.ceil(I / 2), dtype=torch.uint8, device=dev)
        self.q_scale2 = torch.empty(int4, H, math.ceil(I / INT4_GROUP), dtype=dtype, device=dev)
        self.capacity = {"entries": entries, "sign1": sign1, "lowrank_units": lowrank_units, "int4": int4}
        self.used = dict.fromkeys(self.capacity, 0)
        self.specs: list[str | None] = [None] * entries
        self.desc_sorted = self.sort_rank = None
        self._sync_desc()

    # ---- sizes
    @property
    def num_ids(self) -> int:
        return self.desc.shape[0]

    @property
    def max_rank(self) -> int:
        return max((r for _, _, _, r, _ in self._desc_host), default=0)

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """Every device tensor (``POOL_NAMES``): the two id tables, then the pools."""
        return tuple(getattr(self, n) for n in POOL_NAMES)

    @property
    def nbytes(self) -> int:
        """Device bytes: ``DESC_BYTES`` per id plus the pools (``spec_nbytes`` per entry)."""
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def describe(self, expert_id: int) -> dict:
        return dict(zip(DESC_COLUMNS, self._desc_host[expert_id]))

    # ---- filling
    def _sync_desc(self) -> None:
        """The device tables: ``desc_sorted[key]`` = descriptor of the id whose sort key is ``key``, and
        ``sort_rank[id]`` = key. Keys order ids by (base slot, id), so the pairs of one base slot are
        adjacent whatever their variant (the kernels' blocks of one base run together)."""
        self.desc.copy_(torch.tensor(self._desc_host, dtype=torch.int32).reshape(self.desc.shape))
        order = sorted(range(self.num_ids), key=lambda i: (self._desc_host[i][0], i))
        rank = [0] * self.num_ids
        for pos, i in enumerate(order):
            rank[i] = pos
        self.desc_sorted = self.desc[torch.tensor(order, dtype=torch.int64)].contiguous().to(self.device)
        self.sort_rank = torch.tensor(rank, dtype=torch.int32, device=self.device)

    def add(self, base_slot: int, enc: EncodedDelta, sync: bool = True) -> int:
        """Store ``enc`` as a delta on ``base_slot``; returns its expert id."""
        if not 0 <= base_slot < self.num_slots:
            raise DeltaError(f"base slot {base_slot} out of range [0, {self.num_slots})")
        want = ((self.n1, self.hidden), (self.hidden, self.intermediate))
        if tuple(map(tuple, enc.shapes)) != want:
            raise DeltaError(f"delta shapes {enc.shapes} do not match the slab's experts {want}")
        need = {"entries": 1, "sign1": int(enc.sign1 is not None), "lowrank_units": enc.rank,
                "int4": int(enc.int4 is not None)}
        for k, n in need.items():
            if self.used[k] + n > self.capacity[k]:
                raise DeltaError(f"delta pool '{k}' is full: {self.used[k]} of {self.capacity[k]} used, "
                                 f"entry needs {n} more (size the pools from the plan)")
        for name, part in (("sign1", enc.sign1), ("lowrank", enc.lowrank), ("int4", enc.int4)):
            for t in part or ():
                if t.is_floating_point():
                    _check_finite(f"{name} delta on base slot {base_slot}", t)
        expert_id = self.num_slots + self.used["entries"]
        si = qi = -1
        start = rank = 0
        with torch.no_grad():
            if enc.sign1 is not None:
                si = self.used["sign1"]
                b1, s1, b2, s2 = enc.sign1
                self.sign_bits1[si].copy_(b1)
                self.sign_scale1[si].copy_(s1)
                self.sign_bits2[si].copy_(b2)
                self.sign_scale2[si].copy_(s2)
            if enc.lowrank is not None:
                start, rank = self.used["lowrank_units"], enc.rank
                H, I, n1 = self.hidden, self.intermediate, self.n1
                U1, V1, U2, V2 = enc.lowrank
                o1, o2 = start * (n1 + H), start * (H + I)
                self.lr1[o1:o1 + n1 * rank].copy_(U1.reshape(-1))
                self.lr1[o1 + n1 * rank:o1 + (n1 + H) * rank].copy_(V1.reshape(-1))
                self.lr2[o2:o2 + H * rank].copy_(U2.reshape(-1))
                self.lr2[o2 + H * rank:o2 + (H + I) * rank].copy_(V2.reshape(-1))
            if enc.int4 is not None:
                qi = self.used["int4"]
                c1, q1, c2, q2 = enc.int4
                self.q1[qi].copy_(c1)
                self.q_scale1[qi].copy_(q1)
                self.q2[qi].copy_(c2)
                self.q_scale2[qi].copy_(q2)
        for k, n in need.items():
            self.used[k] += n
        self._desc_host[expert_id] = (base_slot, si, start, rank, qi)
        self.specs[expert_id - self.num_slots] = enc.spec
        if sync:
            self._sync_desc()
        return expert_id

    def finish(self) -> None:
        """After the last ``add(..., sync=False)``: copy the descriptors to the device; every id must be set."""
        unset = [i for i, d in enumerate(self._desc_host) if d[0] < 0]
        if unset:
            raise DeltaError(f"{len(unset)} delta ids were sized but never added (first: {unset[0]})")
        self._sync_desc()

    # ---- reading entries
    def view(self) -> "DeltaTensors":
        """The device tables and pools: all the kernels and the op need."""
        return DeltaTensors(*self.tensors())

    def effective(self, w1: torch.Tensor, w2: torch.Tensor, expert_id: int, dtype=torch.float64):
        """``(w1(id), w2(id))`` materialised in ``dtype``: base + decoded delta."""
        return effective_weights(self.view(), self._desc_host[expert_id], w1, w2, dtype)

    def check_slab(self, w1: torch.Tensor, w2: torch.Tensor) -> None:
        """The pools belong to a slab of these dense weights (shape, dtype, device)."""
        n1 = self.n1
        if tuple(w1.shape) != (self.num_slots, n1, self.hidden) or \
                tuple(w2.shape) != (self.num_slots, self.hidden, self.intermediate):
            raise DeltaError(f"delta pools are for a slab of {self.num_slots} slots [{n1}, {self.hidden}] / "
                             f"[{self.hidden}, {self.intermediate}], got w1 {tuple(w1.shape)}, w2 {tuple(w2.shape)}")
        if w1.dtype != self.dtype or w1.device != self.device:
            raise DeltaError(f"delta pools hold {self.dtype} on {self.device}, the slab {w1.dtype} on {w1.device}")


POOL_NAMES = ("desc_sorted", "sort_rank", "sign_bits1", "sign_scale1", "sign_bits2", "sign_scale2", "lr1", "lr2",
              "q1", "q_scale1", "q2", "q_scale2")


class DeltaTensors(NamedTuple):
    """The device side of ``DeltaPools`` (``POOL_NAMES``): what the backends read, so a custom op can carry it
    as a list of tensors. ``desc_sorted[key]`` is the descriptor row of the id whose sort key
    ``sort_rank[id]`` is ``key`` (keys order ids by base slot)."""
    desc_sorted: torch.Tensor
    sort_rank: torch.Tensor
    sign_bits1: torch.Tensor
    sign_scale1: torch.Tensor
    sign_bits2: torch.Tensor
    sign_scale2: torch.Tensor
    lr1: torch.Tensor
    lr2: torch.Tensor
    q1: torch.Tensor
    q_scale1: torch.Tensor
    q2: torch.Tensor
    q_scale2: torch.Tensor

    @property
    def num_ids(self) -> int:
        return self.sort_rank.shape[0]


# ------------------------------------------------------------------------------------------ entries


def entry_parts(t: DeltaTensors, row, n1: int, H: int, I: int) -> dict:
    """Views of one entry's parts from its descriptor ``row`` = (base, sign1 index, lowrank start, rank, int4
    index): ``{"sign1": (bits1, scale1, bits2, scale2), "lowrank": (U1, V1, U2, V2), "int4": (codes1, scales1,
    codes2, scales2)}`` for the parts it has (none for a dense id)."""
    _, si, start, rank, qi = (int(x) for x in row)
    out = {}
    if si >= 0:
        out["sign1"] = (t.sign_bits1[si], t.sign_scale1[si], t.sign_bits2[si], t.sign_scale2[si])
    if rank > 0:
        o1, o2 = start * (n1 + H), start * (H + I)
        out["lowrank"] = (t.lr1[o1:o1 + n1 * rank].view(n1, rank), t.lr1[o1 + n1 * rank:o1 + (n1 + H) * rank].view(rank, H),
                          t.lr2[o2:o2 + H * rank].view(H, rank), t.lr2[o2 + H * rank:o2 + (H + I) * rank].view(rank, I))
    if qi >= 0:
        out["int4"] = (t.q1[qi], t.q_scale1[qi], t.q2[qi], t.q_scale2[qi])
    return out


def effective_weights(t: DeltaTensors, row, w1: torch.Tensor, w2: torch.Tensor, dtype=torch.float64):
    """``(w1(id), w2(id))`` of the id with descriptor ``row``, materialised in ``dtype``."""
    n1, H, I = w1.shape[1], w2.shape[1], w2.shape[2]
    base = int(row[0])
    e1, e2 = w1[base].to(dtype).clone(), w2[base].to(dtype).clone()
    f = entry_parts(t, row, n1, H, I)
    for m, (e, k) in enumerate(((e1, H), (e2, I))):
        if "lowrank" in f:
            e += f["lowrank"][2 * m].to(dtype) @ f["lowrank"][2 * m + 1].to(dtype)
        if "int4" in f:
            e += int4_decode(f["int4"][2 * m], f["int4"][2 * m + 1], k, dtype)
        if "sign1" in f:
            e += sign1_decode(f["sign1"][2 * m], f["sign1"][2 * m + 1], k, dtype)
    return e1, e2


def as_tensors(pools) -> DeltaTensors:
    return pools.view() if isinstance(pools, DeltaPools) else DeltaTensors(*pools)


def check_ids(expert_ids: torch.Tensor, num_ids: int) -> None:
    """Every id names an entry of the pools (a host sync: callers with a validated table skip it)."""
    if expert_ids.numel():
        lo, hi = int(expert_ids.min()), int(expert_ids.max())
        if lo < 0 or hi >= num_ids:
            raise IndexError(f"expert id out of range: ids span [{lo}, {hi}] but the slab has {num_ids} ids "
                             f"(dense slots, then deltas)")
