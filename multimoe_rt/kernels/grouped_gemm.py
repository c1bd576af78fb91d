"""Fused MoE on the expert slab: align by slot, grouped GEMM up + activation, grouped GEMM down,
deterministic reduce over k.

    fused_moe_triton(hidden [T,H], slot_ids [T,K], topk_weights [T,K], w1 [S,N1,H], w2 [S,H,I], gated,
                     activation="silu"|"gelu"|"gelu_tanh"|"relu"|"swiglu_oai", alpha, limit)

Steps (all on the device, no host sync):
  1. align_triton: pairs p = t*K + k sorted by slot, each slot's run padded to BLOCK_M (sentinel T*K);
     block_slot[b] says which slab slot block b multiplies with (-1: block past the end, exits at once).
  2. _moe_up_kernel: gathers token rows x[p // K], multiplies by w1[slot] (gate rows [0:I] and up rows
     [I:2I], or interleaved rows 0::2 and 1::2, as two tiles with two accumulators), applies the activation in fp32 in the epilogue
     (act(gate)*up, act(x) ungated, or the clamped SwiGLU (up+1)*gate*sigmoid(alpha*gate)), writes the
     intermediate [T*K, I] in the compute dtype.
  3. _moe_down_kernel: intermediate @ w2[slot].T, times the routing weight, writes the per-pair output
     [T*K, H] in fp32 (for K == 1 straight into the output).
  4. tiles.reduce_k_kernel: out[t] = sum_k pair_out[t*K + k] in fp32, in k order: deterministic, no atomics.

Precision: fp32 accumulation everywhere. For fp32 inputs tl.dot gets input_precision="ieee" so they are
not rounded to tf32 (for bf16/fp16 the default is passed). Under the Triton interpreter (CPU tensors),
tl.dot on bf16 returns wrong values, so the UPCAST constexpr converts dot operands to fp32 there.

Work buffers: pass ``workspace`` (a dict of preallocated tensors, see fused_moe_triton) and nothing is
allocated on the device per call; without it, buffers are allocated per call.

Tuning: tile sizes come from kernels/configs/default.json, two shape classes by number of pairs T*K:
"decode" (T*K <= decode_max_pairs) and "prefill". Override with the env var MULTIMOE_TRITON_CONFIG=path
to a json of the same layout (merged over the default), or per call with config={...} (either
{"decode": {...}, "prefill": {...}} or flat keys for the chosen class). To tune on a GPU, sweep per
class BLOCK_M in {16, 32, 64, 128} (larger for prefill, where each slot gets many rows; 16 for decode,
where a slot gets one or two rows and the rest of the block is padding), BLOCK_N and BLOCK_K in
{32, 64, 128}, num_warps in {4, 8}, num_stages in {2, 3, 4}; time with bench/kernels.py at the model's
H, I, K, number of slots and typical token counts, and keep the fastest setting that passes
tests/test_grouped_gemm.py. decode_max_pairs is the crossover where the prefill tiles start winning.
All block sizes must be powers of two and >= 16 (tl.dot's minimum).
"""
import copy
import functools
import json
from pathlib import Path

import torch
import triton
import triton.language as tl

from ..config import settings
from ..torch_moe import SWIGLU_ALPHA, SWIGLU_LIMIT, check_activation_args, check_moe_inputs, resolve_activation
from .align import align_triton, check_launchable, interpreting, padded_size
from .tiles import ACT_CODE, block_tile, gate_up_dot, gated_activation, load_tile, reduce_k, store_rows, \
    store_weighted_rows

_DEFAULT_CONFIG = Path(__file__).parent / "configs" / "default.json"
_TILE_KEYS = ("BLOCK_M", "BLOCK_N", "BLOCK_K")


@triton.jit
def _moe_up_kernel(x_ptr, w1_ptr, inter_ptr, sorted_ptr, block_slot_ptr, b1_ptr,
                   num_pairs, H, I,
                   stride_xt, stride_xh, stride_ws, stride_wn, stride_wh, w_up_off, stride_ip, stride_bs, stride_bn,
                   b_up_off, alpha, limit,
                   TOP_K: tl.constexpr, GATED: tl.constexpr, ACTIVATION: tl.constexpr, UPCAST: tl.constexpr,
                   DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                   HAS_BIAS: tl.constexpr = False):
    slot = tl.load(block_slot_ptr + tl.program_id(0))
    if slot < 0:
        return
    pair, row_ok, offs_n, n_ok, offs_k = block_tile(sorted_ptr, num_pairs, I, BLOCK_M, BLOCK_N, BLOCK_K)
    x_ptrs = x_ptr + (pair // TOP_K)[:, None] * stride_xt + offs_k[None, :] * stride_xh
    # stride_wn steps from one gate (or up) column to the next: one row, or two where gate and up interleave.
    g_ptrs = w1_ptr + slot.to(tl.int64) * stride_ws + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wh
    acc_g = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_u = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        k_ok = offs_k < H - k0
        x = load_tile(x_ptrs, row_ok[:, None] & k_ok[None, :], UPCAST)
        acc_g, acc_u = gate_up_dot(x, g_ptrs, w_up_off, k_ok[:, None] & n_ok[None, :], acc_g, acc_u, GATED, UPCAST,
                                   DOT_PRECISION)
        x_ptrs += BLOCK_K * stride_xh
        g_ptrs += BLOCK_K * stride_wh
    if HAS_BIAS:  # b1[slot] is [N1], laid out like w1's rows
        b_ptrs = b1_ptr + slot.to(tl.int64) * stride_bs + offs_n * stride_bn
        acc_g += tl.load(b_ptrs, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        if GATED:
            acc_u += tl.load(b_ptrs + b_up_off, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    act = gated_activation(acc_g, acc_u, alpha, limit, GATED, ACTIVATION)
    store_rows(inter_ptr, pair, stride_ip, offs_n, act, row_ok, n_ok)


@triton.jit
def _moe_down_kernel(inter_ptr, w2_ptr, topk_w_ptr, out_ptr, sorted_ptr, block_slot_ptr, b2_ptr,
                     num_pairs, H, I,
                     stride_ip, stride_ws, stride_wh, stride_wi, stride_op, stride_bs, stride_bh,
                     UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     HAS_BIAS: tl.constexpr = False):
    slot = tl.load(block_slot_ptr + tl.program_id(0))
    if slot < 0:
        return
    pair, row_ok, offs_n, n_ok, offs_k = block_tile(sorted_ptr, num_pairs, H, BLOCK_M, BLOCK_N, BLOCK_K)
    a_ptrs = inter_ptr + pair[:, None] * stride_ip + offs_k[None, :]
    b_ptrs = w2_ptr + slot.to(tl.int64) * stride_ws + offs_n[None, :] * stride_wh + offs_k[:, None] * stride_wi
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, I, BLOCK_K):
        k_ok = offs_k < I - k0
        a = load_tile(a_ptrs, row_ok[:, None] & k_ok[None, :], UPCAST)
        b = load_tile(b_ptrs, k_ok[:, None] & n_ok[None, :], UPCAST)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K * stride_wi
    if HAS_BIAS:  # b2[slot] is [H]
        acc += tl.load(b2_ptr + slot.to(tl.int64) * stride_bs + offs_n * stride_bh, mask=n_ok,
                       other=0.0).to(tl.float32)[None, :]
    store_weighted_rows(out_ptr, topk_w_ptr, pair, stride_op, offs_n, acc, row_ok, n_ok)


def _merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


@functools.lru_cache(maxsize=8)
def _file_config(env_path: str | None) -> dict:
    with open(_DEFAULT_CONFIG) as f:
        cfg = json.load(f)
    if env_path:
        try:
            with open(env_path) as f:
                cfg = _merge(cfg, json.load(f))
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"MULTIMOE_TRITON_CONFIG={env_path}: cannot read a json config ({e})") from e
    return cfg


def select_config(num_pairs: int, config: dict | None = None) -> dict:
    """Tile sizes for a call with num_pairs = T*K pairs: default.json, then $MULTIMOE_TRITON_CONFIG,
    then config (nested by class or flat for the chosen class). Returns a flat dict incl. "reduce"
    and "align" sub-dicts."""
    cfg = _file_config(settings().triton_config)
    config = config or {}
    nested = {k: v for k, v in config.items() if isinstance(v, dict) or k == "decode_max_pairs"}
    flat = {k: v for k, v in config.items() if k not in nested}
    cfg = _merge(cfg, nested)
    cls = "decode" if num_pairs <= cfg["decode_max_pairs"] else "prefill"
    chosen = _merge(cfg[cls], flat)
    for key in _TILE_KEYS:
        v = chosen[key]
        if not isinstance(v, int) or v < 16 or v & (v - 1):
            raise ValueError(f"triton MoE config {cls}.{key}={v!r}: must be a power of two >= 16")
    chosen["reduce"] = cfg["reduce"]
    chosen["align"] = cfg["align"]
    chosen["class"] = cls
    return chosen


def _work(workspace, name, shape, dtype, device):
    """workspace[name] viewed as `shape` (it may be larger: size it once for the largest batch)."""
    numel = 1
    for s in shape:
        numel *= s
    if workspace is not None and name in workspace:
        buf = workspace[name]
        if buf.numel() < numel or buf.dtype != dtype or buf.device != device or not buf.is_contiguous():
            raise ValueError(f"fused_moe_triton workspace[{name!r}]: need a contiguous tensor of >= {numel} "
                             f"elements of {dtype} on {device}, got {buf.numel()} of {buf.dtype} on {buf.device}")
        return buf.view(-1)[:numel].view(shape)
    return torch.empty(shape, dtype=dtype, device=device)


def workspace_shapes(max_tokens: int, top_k: int, hidden: int, intermediate: int, num_slots: int,
                     dtype: torch.dtype, config: dict | None = None) -> dict:
    """name -> (numel, dtype) of every buffer fused_moe_triton uses for up to max_tokens tokens, so a
    caller can allocate them once (torch.empty) and pass them as workspace."""
    pairs = max_tokens * top_k
    block_m = max(select_config(pairs, config)["BLOCK_M"], select_config(1, config)["BLOCK_M"])
    p_max = max(padded_size(pairs, num_slots, block_m), padded_size(pairs, num_slots, 16))
    return {
        "sorted_ids": (p_max, torch.int32),
        "block_slot": (p_max // 16, torch.int32),
        "num_padded": (1, torch.int32),
        "align_counts": (num_slots, torch.int32),
        "intermediate": (pairs * intermediate, dtype),
        "pair_out": (pairs * hidden, torch.float32),
        "out": (max_tokens * hidden, dtype),
    }


def allocate_workspace(max_tokens, top_k, hidden, intermediate, num_slots, dtype, device, config=None) -> dict:
    return {name: torch.empty(numel, dtype=dt, device=device)
            for name, (numel, dt) in workspace_shapes(max_tokens, top_k, hidden, intermediate, num_slots,
                                                      dtype, config).items()}


def launch_params(hidden: torch.Tensor, num_pairs: int, gated: bool, activation, alpha: float, limit: float,
                  config: dict | None, what: str):
    """What one call of the MoE kernels (dense or delta) is launched with: ``(activation code, UPCAST,
    DOT_PRECISION, tile config, launch kwargs)``; raises on an activation or device they cannot take."""
    activation = resolve_activation(activation, gated)
    check_activation_args(activation, alpha, limit)
    check_launchable(hidden.device, what)
    upcast = interpreting(hidden.device)
    # "ieee" keeps fp32 inputs out of tf32; for 16-bit inputs (and the interpreter's fp32 upcast of
    # them) the default is what tensor cores do anyway.
    precision = "ieee" if hidden.dtype == torch.float32 or upcast else "tf32"
    cfg = select_config(num_pairs, config)
    launch = {"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]}
    return ACT_CODE[activation], upcast, precision, cfg, launch


def fused_moe_triton(hidden: torch.Tensor, slot_ids: torch.Tensor, topk_weights: torch.Tensor,
                     w1: torch.Tensor, w2: torch.Tensor, gated: bool, config: dict | None = None,
                     workspace: dict | None = None, activation: str | None = None, alpha: float = SWIGLU_ALPHA,
                     limit: float = SWIGLU_LIMIT, b1: torch.Tensor | None = None,
                     b2: torch.Tensor | None = None, interleaved: bool = False) -> torch.Tensor:
    """Contract fused_moe on the slab. Returns [T, H] in hidden.dtype.

    b1 [S, N1] / b2 [S, H] (optional, together): expert biases, added in fp32 in the epilogues.

    w1, w2, b1, b2 may be strided views (read through their strides, never copied); ``interleaved``: gate and
    up alternate along w1's rows and b1's entries (GPT-OSS's stored layout).

    activation: torch_moe.ACTIVATIONS (or a transformers name); None = SiLU gated, ReLU ungated.

    workspace (optional) holds preallocated contiguous buffers, each at least as large as this call needs
    (see workspace_shapes / allocate_workspace): "intermediate" (hidden.dtype, T*K*I), "pair_out"
    (float32, T*K*H), "out" (hidden.dtype, T*H) and the align buffers "sorted_ids", "block_slot",
    "num_padded", "align_counts" (int32). The returned tensor is then a view of workspace["out"].
    """
    check_moe_inputs(hidden, slot_ids, topk_weights, w1, w2, gated, check_slots=False, b1=b1, b2=b2)
    if (b1 is None) != (b2 is None):
        raise ValueError("fused_moe_triton: expert biases b1 and b2 go together")
    has_bias = b1 is not None
    T, H = hidden.shape
    K = slot_ids.shape[1]
    S = w1.shape[0]
    I = w2.shape[2]
    device = hidden.device
    act, upcast, precision, cfg, launch = launch_params(hidden, T * K, gated, activation, alpha, limit, config,
                                                        "fused_moe_triton")
    bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    # Gate column j and its up column: rows j and I + j, or rows 2j and 2j + 1 (interleaved).
    col_step, up_rows = (2, 1) if interleaved else (1, I)

    out = _work(workspace, "out", (T, H), hidden.dtype, device)
    if T == 0:
        return out
    sorted_ids, block_slot, _ = align_triton(slot_ids, S, bm, workspace=workspace, chunk=cfg["align"]["CHUNK"])
    num_blocks = block_slot.numel()
    inter = _work(workspace, "intermediate", (T * K, I), hidden.dtype, device)
    pair_out = out if K == 1 else _work(workspace, "pair_out", (T * K, H), torch.float32, device)
    weights = topk_weights.reshape(-1)
    if not weights.is_contiguous():
        weights = weights.contiguous()
    bs1 = (b1.stride(0), col_step * b1.stride(1), up_rows * b1.stride(1)) if has_bias else (0, 0, 0)
    bs2 = (b2.stride(0), b2.stride(1)) if has_bias else (0, 0)

    _moe_up_kernel[(num_blocks, triton.cdiv(I, bn))](
        hidden, w1, inter, sorted_ids, block_slot, b1 if has_bias else w1,
        T * K, H, I,
        hidden.stride(0), hidden.stride(1), w1.stride(0), col_step * w1.stride(1), w1.stride(2),
        up_rows * w1.stride(1), inter.stride(0), *bs1,
        float(alpha), float(limit),
        TOP_K=K, GATED=bool(gated), ACTIVATION=act, UPCAST=upcast, DOT_PRECISION=precision,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, HAS_BIAS=has_bias, **launch)
    _moe_down_kernel[(num_blocks, triton.cdiv(H, bn))](
        inter, w2, weights, pair_out, sorted_ids, block_slot, b2 if has_bias else w2,
        T * K, H, I,
        inter.stride(0), w2.stride(0), w2.stride(1), w2.stride(2), pair_out.stride(0), *bs2,
        UPCAST=upcast, DOT_PRECISION=precision, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, HAS_BIAS=has_bias, **launch)
    if K > 1:
        reduce_k(pair_out, out, K, cfg)
    return out
