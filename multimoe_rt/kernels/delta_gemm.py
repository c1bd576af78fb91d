"""Fused MoE over expert ids that are dense slab slots or base slots plus compressed deltas
(``multimoe_rt.delta``), in one call per layer whatever mix of codecs the batch holds.

    fused_moe_delta_triton(hidden [T,H], expert_ids [T,K], topk_weights [T,K], w1 [S,N1,H], w2 [S,H,I], gated,
                           pools: DeltaPools, activation=..., alpha, limit)

Design: the delta is computed inside the tile loop of the grouped GEMM ("dequantise into the tile"), not by
a second segmented GEMM. Each block of BLOCK_M pairs belongs to one expert id; it reads its descriptor
(base slot, sign1 index, lowrank start/rank, int4 index) and, per K step, multiplies the token rows by
the base tile and adds the delta's contribution:

  * sign1: the packed bits of the tile are expanded to +-1 and multiplied into a second accumulator, which
    is scaled per output row in the epilogue (one extra tl.dot per step; bits are 1/16 of a bf16 tile);
  * int4: codes and group scales are dequantised into a tile that goes into the same accumulator;
  * lowrank: x @ V.T ([BLOCK_M, BLOCK_R], the rank padded to a power of two) is accumulated along the same
    K loop, and x @ V.T @ U.T is added in the epilogue with one more tl.dot.

Why not the "base GEMM + segmented delta GEMM" design: it needs the up projection before the activation
written out and read back (fp32, [T*K, 2I]) and two more kernel launches per layer; here one launch per
GEMM serves dense and delta ids alike, and the extra bytes per block are only the delta's. Its advantage,
reading a base tile once for the pairs of all variants that share it, is approached here by sorting pairs
by (base slot, id) (``DeltaPools.sort_rank``): the blocks of one base are adjacent in the grid, whose
fastest axis is the block, so they request the same base tiles at about the same time and the repeats
come from L2. The torch backend (``delta_moe.moe_torch_delta``) does the opposite, one base matmul per base
slot, because on a CPU that is what the measurement in bench/kernels.py favoured; the GPU check times
this kernel against the dense slab (``bench/kernels.py``, delta section).

Pools with no entries compile their branch out (HAS_SIGN / HAS_LR / HAS_INT4 constexprs); a block whose id
has no such part skips it with a uniform branch. Numerics: fp32 accumulation; the +-1 tile is exact in any
dtype; the lowrank product x @ V.T is rounded to the input dtype before the second dot (as the torch
backend's two matmuls do).
"""
import torch
import triton
import triton.language as tl

from ..delta import INT4_GROUP, DeltaError, DeltaPools, as_tensors
from ..torch_moe import SWIGLU_ALPHA, SWIGLU_LIMIT, check_moe_inputs
from .align import align_triton
from .grouped_gemm import _work, launch_params
from .tiles import block_tile, gate_up_dot, gated_activation, load_tile, reduce_k, store_rows, \
    store_weighted_rows

DESC_WIDTH = 5


@triton.jit
def _sign_tile(bits_ptr, rows, kk, stride_row, mask):
    """+-1 (fp32) tile [BLOCK_K, BLOCK_N] of the packed sign bits of matrix rows ``rows`` at columns ``kk``."""
    b = tl.load(bits_ptr + rows[None, :] * stride_row + (kk[:, None] // 8), mask=mask, other=0).to(tl.int32)
    return (((b >> (kk[:, None] % 8)) & 1) * 2 - 1).to(tl.float32)


@triton.jit
def _int4_tile(codes_ptr, scales_ptr, rows, kk, stride_row, stride_srow, mask, GROUP: tl.constexpr):
    """Dequantised (fp32) tile [BLOCK_K, BLOCK_N] of int4 codes of matrix rows ``rows`` at columns ``kk``."""
    c = tl.load(codes_ptr + rows[None, :] * stride_row + (kk[:, None] // 2), mask=mask, other=0).to(tl.int32)
    q = ((c >> ((kk[:, None] % 2) * 4)) & 15).to(tl.float32) - 8.0
    s = tl.load(scales_ptr + rows[None, :] * stride_srow + (kk[:, None] // GROUP), mask=mask, other=0.0)
    return q * s.to(tl.float32)


@triton.jit
def _descriptor(desc_ptr, key):
    """An expert id's descriptor (``DeltaPools``): base slot, sign1 index, lowrank start and rank, int4 index."""
    d = desc_ptr + key.to(tl.int64) * 5
    return tl.load(d), tl.load(d + 1), tl.load(d + 2).to(tl.int64), tl.load(d + 3), tl.load(d + 4)


@triton.jit
def _entry_pools(sb_ptr, q_ptr, qs_ptr, si, qi, rank, stride_sbe, stride_qe, stride_qse, BLOCK_R: tl.constexpr):
    """The entry's rows in the sign1 and int4 pools, and its lowrank rank lanes (and which of them exist)."""
    offs_r = tl.arange(0, BLOCK_R)
    return (offs_r, offs_r < rank, sb_ptr + si.to(tl.int64) * stride_sbe, q_ptr + qi.to(tl.int64) * stride_qe,
            qs_ptr + qi.to(tl.int64) * stride_qse)


@triton.jit
def _lowrank_v_tile(v_ptr, offs_r, kk, row_len, k_ok, r_ok, UPCAST: tl.constexpr):
    """V [rank, row_len] of a lowrank delta at columns ``kk``, transposed: [BLOCK_K, BLOCK_R]."""
    return load_tile(v_ptr + offs_r[None, :] * row_len + kk[:, None], k_ok[:, None] & r_ok[None, :], UPCAST)


@triton.jit
def _lowrank_add(acc, xr, u_ptr, rows, offs_r, rank, r_ok, n_ok, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """acc + (x @ V.T) @ U[rows].T: U [N, rank] read transposed as [BLOCK_R, BLOCK_N]."""
    ut = load_tile(u_ptr + rows[None, :] * rank + offs_r[:, None], r_ok[:, None] & n_ok[None, :], UPCAST)
    return tl.dot(xr, ut, acc, input_precision=DOT_PRECISION)


@triton.jit
def _sign_scaled(acc, sgn, scale_ptr, rows, n_ok):
    """acc + the +-1 product scaled per output row (sign1's one scale per row)."""
    return acc + sgn * tl.load(scale_ptr + rows, mask=n_ok, other=0.0).to(tl.float32)[None, :]


@triton.jit
def _delta_up_kernel(x_ptr, w1_ptr, inter_ptr, sorted_ptr, block_key_ptr, desc_ptr,
                     sb_ptr, ss_ptr, lr_ptr, q_ptr, qs_ptr,
                     num_pairs, H, I, N1,
                     stride_xt, stride_xh, stride_ws, stride_wn, stride_wh, stride_ip,
                     stride_sbe, stride_sbn, stride_sse, stride_qe, stride_qn, stride_qse, stride_qsn,
                     alpha, limit,
                     TOP_K: tl.constexpr, GATED: tl.constexpr, ACTIVATION: tl.constexpr, UPCAST: tl.constexpr,
                     DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr, HAS_SIGN: tl.constexpr, HAS_LR: tl.constexpr, HAS_INT4: tl.constexpr,
                     BLOCK_R: tl.constexpr, GROUP: tl.constexpr):
    key = tl.load(block_key_ptr + tl.program_id(0))
    if key < 0:
        return
    slot, si, lr_start, rank, qi = _descriptor(desc_ptr, key)
    pair, row_ok, offs_n, n_ok, offs_k = block_tile(sorted_ptr, num_pairs, I, BLOCK_M, BLOCK_N, BLOCK_K)
    offs_r, r_ok, sb, qb, qsb = _entry_pools(sb_ptr, q_ptr, qs_ptr, si, qi, rank, stride_sbe, stride_qe, stride_qse,
                                             BLOCK_R)
    lr_base = lr_ptr + lr_start * (N1 + H)           # U1 [N1, rank] then V1 [rank, H]

    x_ptrs = x_ptr + (pair // TOP_K)[:, None] * stride_xt + offs_k[None, :] * stride_xh
    g_ptrs = w1_ptr + slot.to(tl.int64) * stride_ws + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wh
    acc_g = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_u = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    sgn_g = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    sgn_u = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    xv = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        kk = k0 + offs_k
        k_ok = kk < H
        tile_ok = k_ok[:, None] & n_ok[None, :]
        x = load_tile(x_ptrs, row_ok[:, None] & k_ok[None, :], UPCAST)
        acc_g, acc_u = gate_up_dot(x, g_ptrs, I * stride_wn, tile_ok, acc_g, acc_u, GATED, UPCAST, DOT_PRECISION)
        if HAS_SIGN:
            if si >= 0:
                t = _sign_tile(sb, offs_n, kk, stride_sbn, tile_ok).to(x.dtype)
                sgn_g = tl.dot(x, t, sgn_g, input_precision=DOT_PRECISION)
                if GATED:
                    t = _sign_tile(sb, offs_n + I, kk, stride_sbn, tile_ok).to(x.dtype)
                    sgn_u = tl.dot(x, t, sgn_u, input_precision=DOT_PRECISION)
        if HAS_INT4:
            if qi >= 0:
                t = _int4_tile(qb, qsb, offs_n, kk, stride_qn, stride_qsn, tile_ok, GROUP).to(x.dtype)
                acc_g = tl.dot(x, t, acc_g, input_precision=DOT_PRECISION)
                if GATED:
                    t = _int4_tile(qb, qsb, offs_n + I, kk, stride_qn, stride_qsn, tile_ok, GROUP).to(x.dtype)
                    acc_u = tl.dot(x, t, acc_u, input_precision=DOT_PRECISION)
        if HAS_LR:
            if rank > 0:
                v = _lowrank_v_tile(lr_base + N1 * rank, offs_r, kk, H, k_ok, r_ok, UPCAST)
                xv = tl.dot(x, v, xv, input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_K * stride_xh
        g_ptrs += BLOCK_K * stride_wh
    if HAS_SIGN:
        if si >= 0:
            scales = ss_ptr + si.to(tl.int64) * stride_sse
            acc_g = _sign_scaled(acc_g, sgn_g, scales, offs_n, n_ok)
            if GATED:
                acc_u = _sign_scaled(acc_u, sgn_u, scales, offs_n + I, n_ok)
    if HAS_LR:
        if rank > 0:
            xr = xv.to(x_ptr.dtype.element_ty)  # rounded to the input dtype, as the torch backend's two matmuls do
            if UPCAST:
                xr = xr.to(tl.float32)
            acc_g = _lowrank_add(acc_g, xr, lr_base, offs_n, offs_r, rank, r_ok, n_ok, UPCAST, DOT_PRECISION)
            if GATED:
                acc_u = _lowrank_add(acc_u, xr, lr_base, offs_n + I, offs_r, rank, r_ok, n_ok, UPCAST,
                                     DOT_PRECISION)
    act = gated_activation(acc_g, acc_u, alpha, limit, GATED, ACTIVATION)
    store_rows(inter_ptr, pair, stride_ip, offs_n, act, row_ok, n_ok)


@triton.jit
def _delta_down_kernel(inter_ptr, w2_ptr, topk_w_ptr, out_ptr, sorted_ptr, block_key_ptr, desc_ptr,
                       sb_ptr, ss_ptr, lr_ptr, q_ptr, qs_ptr,
                       num_pairs, H, I,
                       stride_ip, stride_ws, stride_wh, stride_wi, stride_op,
                       stride_sbe, stride_sbn, stride_sse, stride_qe, stride_qn, stride_qse, stride_qsn,
                       UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       HAS_SIGN: tl.constexpr, HAS_LR: tl.constexpr, HAS_INT4: tl.constexpr,
                       BLOCK_R: tl.constexpr, GROUP: tl.constexpr):
    key = tl.load(block_key_ptr + tl.program_id(0))
    if key < 0:
        return
    slot, si, lr_start, rank, qi = _descriptor(desc_ptr, key)
    pair, row_ok, offs_n, n_ok, offs_k = block_tile(sorted_ptr, num_pairs, H, BLOCK_M, BLOCK_N, BLOCK_K)
    offs_r, r_ok, sb, qb, qsb = _entry_pools(sb_ptr, q_ptr, qs_ptr, si, qi, rank, stride_sbe, stride_qe, stride_qse,
                                             BLOCK_R)
    lr_base = lr_ptr + lr_start * (H + I)            # U2 [H, rank] then V2 [rank, I]

    a_ptrs = inter_ptr + pair[:, None] * stride_ip + offs_k[None, :]
    b_ptrs = w2_ptr + slot.to(tl.int64) * stride_ws + offs_n[None, :] * stride_wh + offs_k[:, None] * stride_wi
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    sgn = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    av = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
    for k0 in range(0, I, BLOCK_K):
        kk = k0 + offs_k
        k_ok = kk < I
        tile_ok = k_ok[:, None] & n_ok[None, :]
        a = load_tile(a_ptrs, row_ok[:, None] & k_ok[None, :], UPCAST)
        acc = tl.dot(a, load_tile(b_ptrs, tile_ok, UPCAST), acc, input_precision=DOT_PRECISION)
        if HAS_SIGN:
            if si >= 0:
                t = _sign_tile(sb, offs_n, kk, stride_sbn, tile_ok).to(a.dtype)
                sgn = tl.dot(a, t, sgn, input_precision=DOT_PRECISION)
        if HAS_INT4:
            if qi >= 0:
                t = _int4_tile(qb, qsb, offs_n, kk, stride_qn, stride_qsn, tile_ok, GROUP).to(a.dtype)
                acc = tl.dot(a, t, acc, input_precision=DOT_PRECISION)
        if HAS_LR:
            if rank > 0:
                v = _lowrank_v_tile(lr_base + H * rank, offs_r, kk, I, k_ok, r_ok, UPCAST)
                av = tl.dot(a, v, av, input_precision=DOT_PRECISION)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K * stride_wi
    if HAS_SIGN:
        if si >= 0:
            acc = _sign_scaled(acc, sgn, ss_ptr + si.to(tl.int64) * stride_sse, offs_n, n_ok)
    if HAS_LR:
        if rank > 0:
            ar = av.to(inter_ptr.dtype.element_ty)
            if UPCAST:
                ar = ar.to(tl.float32)
            acc = _lowrank_add(acc, ar, lr_base, offs_n, offs_r, rank, r_ok, n_ok, UPCAST, DOT_PRECISION)
    store_weighted_rows(out_ptr, topk_w_ptr, pair, stride_op, offs_n, acc, row_ok, n_ok)


def delta_workspace_shapes(max_tokens: int, top_k: int, hidden: int, intermediate: int, num_ids: int,
                           dtype: torch.dtype, config: dict | None = None) -> dict:
    """name -> (numel, dtype) of every buffer ``fused_moe_delta_triton`` uses for up to max_tokens tokens
    (the dense path's buffers sized for ``num_ids`` ids, plus the sort keys)."""
    from .grouped_gemm import workspace_shapes

    shapes = workspace_shapes(max_tokens, top_k, hidden, intermediate, num_ids, dtype, config)
    shapes["delta_keys"] = (max_tokens * top_k, torch.int32)
    return shapes


def allocate_delta_workspace(max_tokens, top_k, hidden, intermediate, num_ids, dtype, device, config=None) -> dict:
    return {name: torch.empty(numel, dtype=dt, device=device)
            for name, (numel, dt) in delta_workspace_shapes(max_tokens, top_k, hidden, intermediate, num_ids,
                                                            dtype, config).items()}


_DUMMY: dict = {}


def _nonempty(x: torch.Tensor) -> torch.Tensor:
    """An empty pool's stand-in: one element of its dtype on its device (never read: its branch is compiled
    out), so no kernel argument is a null pointer."""
    if x.numel():
        return x
    key = (x.dtype, x.device)
    if key not in _DUMMY:
        _DUMMY[key] = torch.zeros(1, dtype=x.dtype, device=x.device)
    return _DUMMY[key]


def _pool_args(t, max_rank: int):
    """(tensors, strides) of the pools for the two kernels (w1 side, w2 side), and the constexpr flags."""
    sides = []
    for bits, scale, lr, q, qs in ((t.sign_bits1, t.sign_scale1, t.lr1, t.q1, t.q_scale1),
                                   (t.sign_bits2, t.sign_scale2, t.lr2, t.q2, t.q_scale2)):
        strides = (bits.stride(0), bits.stride(1), scale.stride(0), q.stride(0), q.stride(1), qs.stride(0),
                   qs.stride(1))
        sides.append((tuple(_nonempty(x) for x in (bits, scale, lr, q, qs)), strides))
    flags = {"HAS_SIGN": t.sign_bits1.numel() > 0, "HAS_LR": t.lr1.numel() > 0 and max_rank > 0,
             "HAS_INT4": t.q1.numel() > 0, "BLOCK_R": max(16, triton.next_power_of_2(max(1, max_rank))),
             "GROUP": INT4_GROUP}
    return sides, flags


def fused_moe_delta_triton(hidden: torch.Tensor, expert_ids: torch.Tensor, topk_weights: torch.Tensor,
                           w1: torch.Tensor, w2: torch.Tensor, gated: bool, pools, max_rank: int | None = None,
                           config: dict | None = None, workspace: dict | None = None, activation: str | None = None,
                           alpha: float = SWIGLU_ALPHA, limit: float = SWIGLU_LIMIT) -> torch.Tensor:
    """The fused-MoE contract over expert ids (dense slots and deltas, ``multimoe_rt.delta``). Returns [T, H].

    ``pools``: a ``DeltaPools`` or its ``DeltaTensors`` (then ``max_rank``, the largest lowrank rank in the
    pools, must be given: it sizes the rank tile). ``workspace``: as ``fused_moe_triton``'s, sized for
    ``num_ids`` ids, plus "delta_keys" (int32, T*K) (``allocate_delta_workspace``); the result is then a view
    of workspace["out"].
    """
    check_moe_inputs(hidden, expert_ids, topk_weights, w1, w2, gated, check_slots=False)
    if isinstance(pools, DeltaPools):
        pools.check_slab(w1, w2)
        max_rank = pools.max_rank if max_rank is None else max_rank
    elif max_rank is None:
        raise DeltaError("fused_moe_delta_triton: give max_rank with raw delta tensors")
    t = as_tensors(pools)
    T, H = hidden.shape
    K = expert_ids.shape[1]
    I = w2.shape[2]
    N1 = w1.shape[1]
    device = hidden.device
    act, upcast, precision, cfg, launch = launch_params(hidden, T * K, gated, activation, alpha, limit, config,
                                                        "fused_moe_delta_triton")
    if t.desc_sorted.device != device:
        raise DeltaError(f"delta pools live on {t.desc_sorted.device}, the inputs on {device}")
    bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]

    out = _work(workspace, "out", (T, H), hidden.dtype, device)
    if T == 0:
        return out
    n_ids = t.num_ids
    # sort keys: pairs of one base slot adjacent (DeltaPools.sort_rank); desc_sorted[key] = desc[id]
    keys = _work(workspace, "delta_keys", (T, K), torch.int32, device)
    torch.index_select(t.sort_rank, 0, expert_ids.reshape(-1).long(), out=keys.view(-1))
    sorted_ids, block_key, _ = align_triton(keys, n_ids, bm, workspace=workspace, chunk=cfg["align"]["CHUNK"])
    num_blocks = block_key.numel()
    inter = _work(workspace, "intermediate", (T * K, I), hidden.dtype, device)
    pair_out = out if K == 1 else _work(workspace, "pair_out", (T * K, H), torch.float32, device)
    weights = topk_weights.reshape(-1)
    if not weights.is_contiguous():
        weights = weights.contiguous()
    sides, flags = _pool_args(t, max_rank)
    (p1, s1), (p2, s2) = sides
    desc = t.desc_sorted

    _delta_up_kernel[(num_blocks, triton.cdiv(I, bn))](
        hidden, w1, inter, sorted_ids, block_key, desc, *p1,
        T * K, H, I, N1,
        hidden.stride(0), hidden.stride(1), w1.stride(0), w1.stride(1), w1.stride(2), inter.stride(0), *s1,
        float(alpha), float(limit),
        TOP_K=K, GATED=bool(gated), ACTIVATION=act, UPCAST=upcast, DOT_PRECISION=precision,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, **flags, **launch)
    _delta_down_kernel[(num_blocks, triton.cdiv(H, bn))](
        inter, w2, weights, pair_out, sorted_ids, block_key, desc, *p2,
        T * K, H, I,
        inter.stride(0), w2.stride(0), w2.stride(1), w2.stride(2), pair_out.stride(0), *s2,
        UPCAST=upcast, DOT_PRECISION=precision, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, **flags, **launch)
    if K > 1:
        reduce_k(pair_out, out, K, cfg)
    return out

