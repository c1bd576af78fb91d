"""``@triton.jit`` pieces the grouped GEMM kernels share (``grouped_gemm.py``, ``delta_gemm.py``): which pairs and
columns a program owns, tile loads, the gate/up step of the up projection, the activation epilogue and the
row stores. One copy, so the dense and the delta kernels cannot drift apart numerically.

Conventions: a program owns BLOCK_M pairs of the aligned order (``sorted_ids``; padding entries are >= the
number of pairs) on axis 0 and BLOCK_N output columns on axis 1. Weight tiles are loaded transposed, as
[BLOCK_K, BLOCK_N]. Accumulators are fp32; ``UPCAST`` (the interpreter) widens operands to fp32 before tl.dot.
"""
import triton
import triton.language as tl

from ..torch_moe import ACTIVATIONS

# The ACTIVATION constexpr of the up kernels: torch_moe.ACTIVATIONS in order.
ACT_CODE = {name: i for i, name in enumerate(ACTIVATIONS)}
assert ACTIVATIONS == ("silu", "gelu", "gelu_tanh", "relu", "swiglu_oai")


@triton.jit
def block_tile(sorted_ptr, num_pairs, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """This program's pairs (int64) and which are real (the rest pad the slot's run), its output columns and which
    exist, and the K lanes of one step."""
    pair = tl.load(sorted_ptr + tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    return pair, pair < num_pairs, offs_n, offs_n < N, tl.arange(0, BLOCK_K)


@triton.jit
def load_tile(ptrs, mask, UPCAST: tl.constexpr):
    """A masked tile (zeros outside), widened to fp32 under the interpreter, whose bf16 tl.dot is wrong."""
    t = tl.load(ptrs, mask=mask, other=0.0)
    if UPCAST:
        t = t.to(tl.float32)
    return t


@triton.jit
def gate_up_dot(x, w_ptrs, up_off, mask, acc_g, acc_u, GATED: tl.constexpr, UPCAST: tl.constexpr,
                DOT_PRECISION: tl.constexpr):
    """One K step of the up projection: x @ the gate tile (at ``w_ptrs``) and, gated, x @ the up tile, which
    sits ``up_off`` elements further (I rows below, or one row when gate and up rows interleave)."""
    acc_g = tl.dot(x, load_tile(w_ptrs, mask, UPCAST), acc_g, input_precision=DOT_PRECISION)
    if GATED:
        acc_u = tl.dot(x, load_tile(w_ptrs + up_off, mask, UPCAST), acc_u, input_precision=DOT_PRECISION)
    return acc_g, acc_u


@triton.jit
def activate(v, ACTIVATION: tl.constexpr):
    """The elementwise activation in fp32 (codes: ACT_CODE)."""
    if ACTIVATION == 0:    # silu
        out = v * tl.sigmoid(v)
    elif ACTIVATION == 1:  # gelu, exact: x * Phi(x)
        out = 0.5 * v * (1.0 + tl.math.erf(v * 0.7071067811865476))
    elif ACTIVATION == 2:  # gelu, tanh form: 0.5 x (1 + tanh(u)) == x * sigmoid(2u), u = sqrt(2/pi)(x + 0.044715 x^3)
        out = v * tl.sigmoid(1.5957691216057308 * (v + 0.044715 * v * v * v))
    else:                  # relu
        out = tl.maximum(v, 0.0)
    return out


@triton.jit
def gated_activation(acc_g, acc_u, alpha, limit, GATED: tl.constexpr, ACTIVATION: tl.constexpr):
    """The up kernels' epilogue: act(gate) * up, act(x) ungated, or the clamped SwiGLU (GPT-OSS, gated only)."""
    if ACTIVATION == 4:
        gate = tl.minimum(acc_g, limit)
        up = tl.minimum(tl.maximum(acc_u, -limit), limit)
        act = (up + 1.0) * (gate * tl.sigmoid(alpha * gate))
    elif GATED:
        act = activate(acc_g, ACTIVATION) * acc_u
    else:
        act = activate(acc_g, ACTIVATION)
    return act


@triton.jit
def store_rows(out_ptr, pair, stride_p, offs_n, vals, row_ok, n_ok):
    """vals [BLOCK_M, BLOCK_N] into rows ``pair`` of out, in out's dtype; padding rows and missing columns skipped."""
    tl.store(out_ptr + pair[:, None] * stride_p + offs_n[None, :], vals.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & n_ok[None, :])


@triton.jit
def store_weighted_rows(out_ptr, topk_w_ptr, pair, stride_p, offs_n, acc, row_ok, n_ok):
    """The down kernels' epilogue: each pair's row times its routing weight (fp32), stored."""
    weight = tl.load(topk_w_ptr + pair, mask=row_ok, other=0.0).to(tl.float32)
    store_rows(out_ptr, pair, stride_p, offs_n, acc * weight[:, None], row_ok, n_ok)


@triton.jit
def reduce_k_kernel(pair_ptr, out_ptr, H, stride_pp, stride_ot, TOP_K: tl.constexpr, BLOCK_H: tl.constexpr):
    """out[t] = sum_k pair_out[t*K + k] in fp32."""
    t = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    ok = offs < H
    acc = tl.zeros([BLOCK_H], dtype=tl.float32)
    for k in range(TOP_K):  # fixed k order: bitwise reproducible
        acc += tl.load(pair_ptr + (t * TOP_K + k) * stride_pp + offs, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + t * stride_ot + offs, acc.to(out_ptr.dtype.element_ty), mask=ok)


def reduce_k(pair_out, out, top_k: int, cfg: dict) -> None:
    """Launch reduce_k_kernel over out [T, H] (pair_out [T*K, H])."""
    T, H = out.shape
    bh = min(cfg["reduce"]["BLOCK_H"], triton.next_power_of_2(H))
    reduce_k_kernel[(T, triton.cdiv(H, bh))](pair_out, out, H, pair_out.stride(0), out.stride(0), TOP_K=top_k,
                                             BLOCK_H=bh, num_warps=cfg["reduce"]["num_warps"])
