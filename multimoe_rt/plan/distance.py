"""Expert distances to the anchor: relative L2, cosine, output difference on calibration rows, and
byte-identical duplicates (hash, then an exact compare). Streams one expert at a time."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..torch_moe import expert_forward
from .calibration import gaussian_calibration
from .common import PlanError, progress_bar
from .fingerprint import expert_hash


def relative_l2(weights, reference, reference_norm=None) -> float:
    """||w - r|| / ||r|| over a tuple of tensors taken together (an expert's w1 and w2), in their dtype.

    ``reference_norm`` may pass ||r|| when the caller already has it."""
    diff_sq = sum((w - r).pow(2).sum() for w, r in zip(weights, reference))
    if reference_norm is None:
        reference_norm = sum(r.pow(2).sum() for r in reference).sqrt()
    return float(diff_sq.sqrt() / reference_norm.clamp_min(1e-30))


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
    bar = progress_bar(L * E, "expert distances", progress)
    act = (variant_set.activation, variant_set.alpha, variant_set.limit)  # the experts' own activation
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
            a = variant_set[anchor].expert_tensors(layer, e)  # (w1, w2) or, with expert biases, (w1, w2, b1, b2)
            a1, a2 = a[:2]
            w1_shape, w2_shape, ck_dtype = tuple(a1.shape), tuple(a2.shape), a1.dtype
            hashes[anchor][layer][e] = expert_hash(*a)
            af = [_float32(t) for t in a]
            a_norm = sum(t.pow(2).sum() for t in af).sqrt()
            if output:
                ya = expert_forward(x, af[0], af[1], gated, *act, *af[2:])
                ya_norm = ya.norm(dim=-1).clamp_min(1e-12)
            for v in range(V):
                if v == anchor:
                    continue
                b = variant_set[v].expert_tensors(layer, e)
                b1, b2 = b[:2]
                if tuple(b1.shape) != w1_shape or tuple(b2.shape) != w2_shape:
                    raise PlanError(f"variant {variant_set.names[v]!r} layer {layer} expert {e}: "
                                    f"shapes {tuple(b1.shape)}, {tuple(b2.shape)}; anchor has "
                                    f"{w1_shape}, {w2_shape}")
                hv = expert_hash(*b)
                hashes[v][layer][e] = hv
                # hash equality is confirmed with an exact compare: both are in memory anyway
                if hv == hashes[anchor][layer][e] and b1.dtype == a1.dtype \
                        and all(torch.equal(p, q) for p, q in zip(b, a)):
                    dup[v][layer][e] = True
                    continue
                bf = [_float32(t) for t in b]
                l2[v][layer][e] = relative_l2(bf, af, a_norm)
                dot = sum((p * q).sum() for p, q in zip(bf, af))
                b_norm = sum(t.pow(2).sum() for t in bf).sqrt()
                cos[v][layer][e] = float(1.0 - dot / (a_norm * b_norm).clamp_min(1e-30))
                if output:
                    yb = expert_forward(x, bf[0], bf[1], gated, *act, *bf[2:])
                    outd[v][layer][e] = float(((yb - ya).norm(dim=-1) / ya_norm).mean())
            bar.update(1)
    bar.close()
    return Distances(anchor=anchor, l2=l2, cosine=cos, output=outd, hashes=hashes, duplicate=dup,
                     calibration=calibration, w1_shape=w1_shape, w2_shape=w2_shape,
                     checkpoint_dtype=str(ck_dtype).replace("torch.", ""))
