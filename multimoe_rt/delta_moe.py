"""The MoE over expert ids whose experts may be base + compressed delta (``delta.DeltaPools``): the torch
backend (one base matmul per base slot for every pair that reads it, then each delta's small terms) and
the float64 reference. ``ops.fused_moe(..., deltas=...)`` dispatches here; the Triton kernel is
``kernels/delta_gemm.py``."""

from __future__ import annotations

import torch

from . import _ext, cpu_linear
from .delta import INT4_GROUP, DeltaTensors, as_tensors, effective_weights, entry_parts, int4_decode, sign1_signs
from .torch_moe import SWIGLU_ALPHA, SWIGLU_LIMIT, apply_activation, moe_reference


_FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _delta_terms(x: torch.Tensor, parts: dict, m: int, k: int, acc) -> torch.Tensor | None:
    """``x @ D_m.T`` (``m`` = 0: w1, 1: w2) in ``acc`` without materialising the lowrank product.

    On CPU in 16/32-bit, sign1 and int4 run the C++ kernels, which read the packed bits/codes and never
    decode a whole delta (decode is bound by bytes; unpacking one per call cost up to 26x a dense expert).
    Elsewhere (GPU tensors, float64 references, no extension) they are decoded and multiplied in torch."""
    out = None

    def add(t):
        nonlocal out
        out = t if out is None else out + t

    # The C++ ops have no backward: a graph that needs one takes the torch path.
    fused = (_ext.has_delta_ops and x.device.type == "cpu" and x.dtype in _FUSED_DTYPES and acc == torch.float32
             and not x.requires_grad)
    if "lowrank" in parts:
        U, V = parts["lowrank"][2 * m], parts["lowrank"][2 * m + 1]
        add(((x @ V.T) @ U.T).to(acc))
    if "int4" in parts:
        codes, scales = parts["int4"][2 * m], parts["int4"][2 * m + 1]
        if fused:
            add(_ext.int4_matmul(x, codes, scales, k, INT4_GROUP))
        else:
            add((x @ int4_decode(codes, scales, k, x.dtype).T).to(acc))
    if "sign1" in parts:
        bits, scale = parts["sign1"][2 * m], parts["sign1"][2 * m + 1]
        if fused:
            add(_ext.sign1_matmul(x, bits, scale, k))
        else:
            add((x @ sign1_signs(bits, k, x.dtype).T).to(acc) * scale.to(acc))
    return out


def _runs(expert_ids: torch.Tensor, t: DeltaTensors, base_once: bool):
    """Pairs sorted by sort key (base slot, then id): ``(order, tokens, [(base, start, n, [(row, start, n), ...])])``
    with each used id's descriptor row; one host sync (the used keys, their counts and rows)."""
    K = expert_ids.shape[1]
    keys = t.sort_rank[expert_ids.reshape(-1).long()].long()
    order = torch.sort(keys, stable=True).indices
    used, counts = torch.unique_consecutive(keys[order], return_counts=True)
    rows = torch.cat([t.desc_sorted[used].long(), counts[:, None]], 1).tolist()
    groups, start = [], 0
    for *row, n in rows:
        base = row[0]
        if base_once and groups and groups[-1][0] == base:
            b, s0, total, subs = groups[-1]
            subs.append((row, start, n))
            groups[-1] = (b, s0, total + n, subs)
        else:
            groups.append((base, start, n, [(row, start, n)]))
        start += n
    return order, order // K, groups


def moe_torch_delta(hidden, expert_ids, topk_weights, w1, w2, gated: bool, pools,
                    activation: str | None = None, alpha: float = SWIGLU_ALPHA, limit: float = SWIGLU_LIMIT,
                    base_once: bool = True) -> torch.Tensor:
    """The dense contract with deltas (module docstring), pure PyTorch; ``pools`` a DeltaPools or its tensors.

    ``base_once`` (default): one base matmul per base slot over every pair that reads it, whatever its id,
    then each delta's terms on its own rows (the "base GEMM + segmented delta GEMM" design); False runs the
    base matmul once per id (each variant's rows on their own), the design bench/kernels.py compares it with.
    Delta terms: lowrank as two thin matmuls, sign1 as a matmul with the +-1 matrix unpacked by table
    lookup and scaled per row, int4 dequantised. The up projection and the deltas are summed in fp32.
    """
    t = as_tensors(pools)
    T, K = expert_ids.shape
    H, I, n1 = w2.shape[1], w2.shape[2], w1.shape[1]
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    out = torch.empty(T * K, H, dtype=acc, device=hidden.device)
    if T == 0:
        return out.view(T, K, H).sum(1).to(hidden.dtype)
    order, tokens, groups = _runs(expert_ids, t, base_once)
    x = hidden[tokens]
    for base, start, n, subs in groups:
        xs = x[start:start + n]
        h = cpu_linear.linear(xs, w1[base]).to(acc)
        parts_of = []
        for row, s0, m in subs:
            parts = entry_parts(t, row, n1, H, I)
            if parts:
                a0 = s0 - start
                parts_of.append((parts, a0, m))
                h[a0:a0 + m] += _delta_terms(xs[a0:a0 + m], parts, 0, H, acc)
        a = apply_activation(h, gated, activation, alpha, limit).to(hidden.dtype)
        y = cpu_linear.linear(a, w2[base]).to(acc)
        for parts, a0, m in parts_of:
            y[a0:a0 + m] += _delta_terms(a[a0:a0 + m], parts, 1, I, acc)
        out[order[start:start + n]] = y
    out *= topk_weights.reshape(-1, 1).to(acc)
    return out.view(T, K, H).sum(1).to(hidden.dtype)


def moe_reference_delta(hidden, expert_ids, topk_weights, w1, w2, gated: bool, pools,
                        activation: str | None = None, alpha: float = SWIGLU_ALPHA, limit: float = SWIGLU_LIMIT
                        ) -> torch.Tensor:
    """The float64 reference: each used id's effective weights materialised in float64 (base + decoded delta),
    then one token-expert pair at a time as ``torch_moe.moe_reference``."""
    t = as_tensors(pools)
    ids = expert_ids.long()
    used = torch.unique(ids).tolist()
    rows = t.desc_sorted[t.sort_rank[torch.tensor(used, dtype=torch.long, device=ids.device)].long()].tolist() \
        if used else []
    e1 = torch.zeros(max(1, len(used)), w1.shape[1], w1.shape[2], dtype=torch.float64, device=hidden.device)
    e2 = torch.zeros(max(1, len(used)), w2.shape[1], w2.shape[2], dtype=torch.float64, device=hidden.device)
    remap = torch.zeros(t.num_ids, dtype=torch.long, device=ids.device)
    for j, (i, row) in enumerate(zip(used, rows)):
        e1[j], e2[j] = effective_weights(t, row, w1, w2, torch.float64)
        remap[i] = j
    return moe_reference(hidden, remap[ids], topk_weights, e1, e2, gated, activation, alpha, limit)
