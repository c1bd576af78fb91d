"""Pure-PyTorch MoE backend, the float64 reference, the activations and the backward.

Both compute the function every backend must agree on (see ``ops.fused_moe``):

    a      = act(x @ w1[s][:I].T) * (x @ w1[s][I:].T)    (gated: gate rows, then up rows; Mixtral)
           = act(x @ w1[s].T)                            (not gated; Switch)
    out[t] = sum_k topk_weights[t, k] * (a @ w2[s].T),   s = slot_ids[t, k]

Optional expert biases (GPT-OSS): ``b1[s]`` ``[N1]`` is added to ``x @ w1[s].T`` before the activation and
``b2[s]`` ``[H]`` to ``a @ w2[s].T`` before the routing weight.

Interleaved gate/up (GPT-OSS's stored layout, ``interleaved=True``): the gate is column ``2j`` and the up column
``2j + 1`` of the up projection (rows of ``w1[s]``, entries of ``b1[s]``) instead of ``j`` and ``I + j``. Weights
may be any strided views (GPT-OSS stores ``[S, H, 2I]`` and ``[S, I, H]``: pass their transposes), so such
experts run as stored, with no copy per call.

``act`` is one of ``ACTIVATIONS``: ``silu`` (the gated default), ``gelu`` (exact, erf), ``gelu_tanh``,
``relu`` (the ungated default) and ``swiglu_oai``, GPT-OSS's clamped SwiGLU (gated only), which
replaces the whole gated product:

    gate = min(gate, limit); up = clamp(up, -limit, limit); a = (up + 1) * gate * sigmoid(alpha * gate)

``moe_torch_backward`` is the gradient of that function with respect to the hidden states, the
routing weights and both expert weights (explicit formulas; tests hold them to torch.autograd on
the float64 reference).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import cpu_linear


FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# float64 is accepted by the torch and reference backends (gradcheck); the Triton kernels take FLOAT_DTYPES.
OP_DTYPES = FLOAT_DTYPES + (torch.float64,)

ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu", "swiglu_oai")
# GPT-OSS's defaults (config.swiglu_alpha, config.swiglu_limit); used by swiglu_oai only.
SWIGLU_ALPHA, SWIGLU_LIMIT = 1.702, 7.0
# Names transformers' configs use (``hidden_act``, ``dense_act_fn``) for the same functions.
_ALIASES = {
    "silu": "silu", "swish": "silu",
    "gelu": "gelu", "gelu_python": "gelu",
    "gelu_tanh": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_python_tanh": "gelu_tanh",
    "gelu_new": "gelu_tanh", "gelu_fast": "gelu_tanh", "gelu_accurate": "gelu_tanh",
    "relu": "relu",
    "swiglu_oai": "swiglu_oai", "swigluoai": "swiglu_oai",
}
# Activation modules, by class name (transformers' ACT2FN classes and torch.nn's), so the runtime
# needs no transformers import to read a module's ``act_fn``.
_MODULE_NAMES = {
    "SiLUActivation": "silu", "SiLU": "silu",
    "GELUActivation": "gelu",
    "GELUTanh": "gelu_tanh", "PytorchGELUTanh": "gelu_tanh", "NewGELUActivation": "gelu_tanh",
    "FastGELUActivation": "gelu_tanh", "AccurateGELUActivation": "gelu_tanh",
    "ReLU": "relu",
}


class UnsupportedActivationError(ValueError):
    """An activation the fused MoE op does not implement: never replaced by a silent SiLU."""


def default_activation(gated: bool) -> str:
    """What the op applies when no activation is named: SiLU for gated experts, ReLU otherwise."""
    return "silu" if gated else "relu"


def resolve_activation(activation, gated: bool) -> str:
    """The canonical name (one of ``ACTIVATIONS``) of ``activation``: a canonical name, a transformers
    config name (``"gelu_pytorch_tanh"``, ``"swish"``, ...), or None / "" / "auto" for the default."""
    if activation is None or activation in ("", "auto"):
        return default_activation(gated)
    name = _ALIASES.get(activation) if isinstance(activation, str) else None
    if name is None:
        raise UnsupportedActivationError(
            f"activation {activation!r} is not supported by the fused MoE op; supported: {', '.join(ACTIVATIONS)} "
            f"(also accepted: {', '.join(sorted(set(_ALIASES) - set(ACTIVATIONS)))})")
    if name == "swiglu_oai" and not gated:
        raise UnsupportedActivationError("activation 'swiglu_oai' (clamped SwiGLU) needs gated experts ([gate; up])")
    return name


def activation_of_module(act_fn) -> str:
    """The canonical activation of an activation module or function (an experts module's ``act_fn``)."""
    if act_fn is F.silu:
        return "silu"
    if act_fn is F.relu:
        return "relu"
    if act_fn is F.gelu:
        return "gelu"
    kind = type(act_fn).__name__
    if kind == "GELU" and isinstance(act_fn, torch.nn.Module):  # torch.nn.GELU(approximate=...)
        return "gelu_tanh" if getattr(act_fn, "approximate", "none") == "tanh" else "gelu"
    if kind in _MODULE_NAMES:
        return _MODULE_NAMES[kind]
    raise UnsupportedActivationError(
        f"activation {kind} ({act_fn!r}) is not supported by the fused MoE op; supported: {', '.join(ACTIVATIONS)}")


def check_activation_args(activation: str, alpha: float, limit: float) -> None:
    if activation not in ACTIVATIONS:
        raise UnsupportedActivationError(f"activation {activation!r}: expected one of {ACTIVATIONS}")
    if activation == "swiglu_oai" and not (limit > 0 and alpha == alpha):  # NaN alpha fails too
        raise ValueError(f"swiglu_oai needs limit > 0 and a finite alpha, got alpha={alpha}, limit={limit}")


class MoEInputTypeError(TypeError, ValueError):
    """An input of the wrong dtype. A TypeError, and a ValueError for callers of the kernel entry points,
    which raised ValueError before the checks were shared."""


def check_moe_inputs(hidden, slot_ids, topk_weights, w1, w2, gated: bool, check_slots: bool = True,
                     dtypes=FLOAT_DTYPES, b1=None, b2=None) -> None:
    """Validate at the boundary so bad input raises here, never inside a kernel: the one check of the
    fused-MoE contract, used by ``ops.fused_moe`` (``dtypes=OP_DTYPES``: float64 too, on the torch and
    reference backends) and by the Triton kernel's entry point (``FLOAT_DTYPES``)."""
    if hidden.dim() != 2:
        raise ValueError(f"hidden must be [T, H], got shape {tuple(hidden.shape)}")
    T, H = hidden.shape
    if w1.dim() != 3 or w2.dim() != 3:
        raise ValueError(f"w1/w2 must be [S, N, H]/[S, H, I], got {tuple(w1.shape)} and {tuple(w2.shape)}")
    S, n1, h1 = w1.shape
    I = w2.shape[2]
    expected_n1 = 2 * I if gated else I
    if h1 != H or w2.shape[1] != H or w2.shape[0] != S or n1 != expected_n1:
        raise ValueError(f"expert shapes do not match: hidden H={H}, w1 {tuple(w1.shape)} (expected "
                         f"[{S}, {expected_n1}, {H}] for gated={gated}), w2 {tuple(w2.shape)} (expected [{S}, {H}, {I}])")
    if slot_ids.dim() != 2 or slot_ids.shape[0] != T or tuple(topk_weights.shape) != tuple(slot_ids.shape):
        raise ValueError(f"slot_ids and topk_weights must both be [T={T}, K], got {tuple(slot_ids.shape)} "
                         f"and {tuple(topk_weights.shape)}")
    if slot_ids.dtype not in (torch.int32, torch.int64):
        raise MoEInputTypeError(f"slot_ids must be int32 or int64, got {slot_ids.dtype}")
    for name, t in (("hidden", hidden), ("w1", w1), ("w2", w2), ("topk_weights", topk_weights)):
        if t.dtype not in dtypes:
            raise MoEInputTypeError(f"{name} must be one of {dtypes}, got {t.dtype}")
    if not (hidden.dtype == w1.dtype == w2.dtype):
        raise MoEInputTypeError(f"hidden, w1, w2 must share a dtype, got {hidden.dtype}, {w1.dtype}, {w2.dtype}")
    for name, b, shape in (("b1", b1, (S, n1)), ("b2", b2, (S, H))):
        if b is None:
            continue
        if tuple(b.shape) != shape:
            raise ValueError(f"{name} (expert bias) must be {list(shape)}, got {tuple(b.shape)}")
        if b.dtype != hidden.dtype:
            raise MoEInputTypeError(f"{name} must have the experts' dtype {hidden.dtype}, got {b.dtype}")
        if b.device != hidden.device:
            raise ValueError(f"all MoE inputs must be on one device, got {b.device} for {name}, {hidden.device}")
    devices = {t.device for t in (hidden, slot_ids, topk_weights, w1, w2)}
    if len(devices) != 1:
        raise ValueError(f"all MoE inputs must be on one device, got {sorted(map(str, devices))}")
    if check_slots and slot_ids.numel():
        lo, hi = int(slot_ids.min()), int(slot_ids.max())  # a host sync: callers with a validated table skip it
        if lo < 0 or hi >= S:
            raise IndexError(f"slot id out of range: slot_ids span [{lo}, {hi}] but the slab has {S} slots")


def check_align_inputs(slot_ids: torch.Tensor, num_slots: int, block_m: int) -> None:
    """The one check of align's contract (``ops.align`` and the Triton align)."""
    if slot_ids.dtype not in (torch.int32, torch.int64):
        raise MoEInputTypeError(f"slot_ids must be int32 or int64, got {slot_ids.dtype}")
    if block_m <= 0 or num_slots <= 0:
        raise ValueError(f"block_m and num_slots must be positive, got {block_m}, {num_slots}")


def split_gate_up(h: torch.Tensor, interleaved: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(gate, up) of a gated up projection ``[..., 2I]``: its halves, or its alternating columns (interleaved)."""
    if not interleaved:
        return h.chunk(2, dim=-1)
    # One copy into [2, ..., I]: the activation's elementwise ops on stride-2 views ran 3-4x slower on CPU.
    both = h.unflatten(-1, (-1, 2)).movedim(-1, 0).contiguous()
    return both[0], both[1]


def join_gate_up(gate: torch.Tensor, up: torch.Tensor, interleaved: bool = False) -> torch.Tensor:
    """The inverse of ``split_gate_up``: ``[..., 2I]`` in the same layout."""
    if not interleaved:
        return torch.cat([gate, up], dim=-1)
    out = gate.new_empty(*gate.shape[:-1], 2 * gate.shape[-1])
    out[..., 0::2] = gate  # two strided copies: 2.8x faster than stack + flatten here
    out[..., 1::2] = up
    return out


def apply_activation(h: torch.Tensor, gated: bool, activation: str | None = None,
                     alpha: float = SWIGLU_ALPHA, limit: float = SWIGLU_LIMIT, interleaved: bool = False
                     ) -> torch.Tensor:
    """``[n, 2I] -> [n, I]`` (gated: [gate | up], or interleaved) or ``[n, I] -> [n, I]``: the contract's
    activation, with torch's own functions (as transformers' eager experts apply them)."""
    activation = resolve_activation(activation, gated)
    if activation == "swiglu_oai":
        gate, up = split_gate_up(h, interleaved)
        gate = gate.clamp(max=limit)
        up = up.clamp(min=-limit, max=limit)
        return (up + 1) * (gate * torch.sigmoid(gate * alpha))
    if gated:
        gate, up = split_gate_up(h, interleaved)
        return _elementwise(gate, activation) * up
    return _elementwise(h, activation)


def _elementwise(v: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "silu":
        return F.silu(v)
    if activation == "gelu":
        return F.gelu(v)
    if activation == "gelu_tanh":
        return F.gelu(v, approximate="tanh")
    return F.relu(v)


_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def _elementwise_and_derivative(v: torch.Tensor, activation: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(act(v), act'(v))``; the same subgradients as torch.autograd (relu'(0) = 0)."""
    if activation == "silu":
        sig = torch.sigmoid(v)
        return v * sig, sig * (1 + v * (1 - sig))
    if activation == "gelu":
        cdf = 0.5 * (1 + torch.erf(v * 0.5 ** 0.5))
        return v * cdf, cdf + v * torch.exp(-0.5 * v * v) * _INV_SQRT_2PI
    if activation == "gelu_tanh":
        inner = _SQRT_2_OVER_PI * (v + 0.044715 * v ** 3)
        th = torch.tanh(inner)
        d = 0.5 * (1 + th) + 0.5 * v * (1 - th * th) * _SQRT_2_OVER_PI * (1 + 3 * 0.044715 * v * v)
        return 0.5 * v * (1 + th), d
    return F.relu(v), (v > 0).to(v.dtype)


def activation_backward(h: torch.Tensor, grad_a: torch.Tensor, gated: bool, activation: str | None = None,
                        alpha: float = SWIGLU_ALPHA, limit: float = SWIGLU_LIMIT, interleaved: bool = False
                        ) -> torch.Tensor:
    """d loss / d h, given h (the up projection, as ``apply_activation`` takes it) and d loss / d a."""
    return activation_and_backward(h, grad_a, gated, activation, alpha, limit, interleaved)[1]


def activation_and_backward(h: torch.Tensor, grad_a: torch.Tensor, gated: bool, activation: str | None = None,
                            alpha: float = SWIGLU_ALPHA, limit: float = SWIGLU_LIMIT, interleaved: bool = False
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(a, d loss / d h)``: the activation and its backward from one pass over h (they share the sigmoids)."""
    activation = resolve_activation(activation, gated)
    if activation == "swiglu_oai":
        gate, up = split_gate_up(h, interleaved)
        g = gate.clamp(max=limit)
        u = up.clamp(min=-limit, max=limit)
        sig = torch.sigmoid(alpha * g)
        glu = g * sig
        d_gate = grad_a * (u + 1) * (sig + alpha * glu * (1 - sig)) * (gate <= limit).to(h.dtype)
        d_up = grad_a * glu * ((up >= -limit) & (up <= limit)).to(h.dtype)  # torch.clamp: inclusive bounds
        return (u + 1) * glu, join_gate_up(d_gate, d_up, interleaved)
    if gated:
        gate, up = split_gate_up(h, interleaved)
        act, d = _elementwise_and_derivative(gate, activation)
        return act * up, join_gate_up(grad_a * up * d, grad_a * act, interleaved)
    act, d = _elementwise_and_derivative(h, activation)
    return act, grad_a * d


def expert_forward(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, gated: bool, activation: str | None = None,
                   alpha: float = SWIGLU_ALPHA, limit: float = SWIGLU_LIMIT, b1=None, b2=None,
                   interleaved: bool = False) -> torch.Tensor:
    """One expert on rows of ``x`` (the contract's function for one slot, routing weight 1; biases optional)."""
    h = x @ w1.T if b1 is None else x @ w1.T + b1
    y = apply_activation(h, gated, activation, alpha, limit, interleaved) @ w2.T
    return y if b2 is None else y + b2


def padded_size(num_pairs: int, num_slots: int, block_m: int) -> int:
    """Length of align's outputs: the worst-case padded length, a multiple of ``block_m``."""
    worst = num_pairs + min(num_pairs, num_slots) * (block_m - 1)
    return -(-worst // block_m) * block_m


def align_torch(slot_ids: torch.Tensor, num_slots: int, block_m: int):
    """Sort token-expert pairs by slot and pad each slot's run to a multiple of ``block_m``.

    Returns ``(sorted_ids, block_slot, num_padded)``; padding entries hold the sentinel ``T*K``
    and blocks past ``num_padded`` have slot -1. The order inside one slot is the pair order,
    so every implementation produces identical outputs.
    """
    flat = slot_ids.reshape(-1).to(torch.int64)
    numel = flat.numel()
    device = slot_ids.device
    p_max = padded_size(numel, num_slots, block_m)
    sorted_ids = torch.full((p_max,), numel, dtype=torch.int32, device=device)
    block_slot = torch.full((p_max // block_m,), -1, dtype=torch.int32, device=device)
    if numel == 0:
        return sorted_ids, block_slot, torch.zeros(1, dtype=torch.int32, device=device)

    counts = torch.bincount(flat, minlength=num_slots)
    padded = (counts + block_m - 1) // block_m * block_m
    starts = torch.cumsum(padded, 0) - padded  # where each slot's run begins
    order = torch.sort(flat, stable=True).indices
    run_starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(numel, device=device) - run_starts[flat[order]]
    sorted_ids[starts[flat[order]] + rank] = order.to(torch.int32)

    num_padded = padded.sum()
    blocks_per_slot = padded // block_m
    block_slot[: int(num_padded) // block_m] = torch.repeat_interleave(
        torch.arange(num_slots, device=device, dtype=torch.int32), blocks_per_slot
    )
    return sorted_ids, block_slot, num_padded.to(torch.int32).reshape(1)


def moe_reference(hidden, slot_ids, topk_weights, w1, w2, gated: bool, activation: str | None = None,
                  alpha: float = SWIGLU_ALPHA, limit: float = SWIGLU_LIMIT, b1=None, b2=None,
                  interleaved: bool = False) -> torch.Tensor:
    """The float64 reference: one token-expert pair at a time, no sorting, no tricks. Differentiable
    with torch.autograd (the tests' gradient reference)."""
    x = hidden.double()
    out = torch.zeros(hidden.shape[0], w2.shape[1], dtype=torch.float64, device=hidden.device)
    for k in range(slot_ids.shape[1]):
        s = slot_ids[:, k].long()
        h = torch.einsum("th,tnh->tn", x, w1[s].double())
        if b1 is not None:
            h = h + b1[s].double()
        a = apply_activation(h, gated, activation, alpha, limit, interleaved)
        y = torch.einsum("ti,thi->th", a, w2[s].double())
        if b2 is not None:
            y = y + b2[s].double()
        out = out + topk_weights[:, k].double()[:, None] * y
    return out


def _slot_runs(slot_ids: torch.Tensor, num_slots: int):
    """Pairs sorted by slot (stable): ``(order, tokens, [(slot, start, n), ...])`` over used slots only."""
    K = slot_ids.shape[1]
    flat = slot_ids.reshape(-1).long()
    order = torch.sort(flat, stable=True).indices
    counts = torch.bincount(flat, minlength=num_slots).tolist()  # one host sync per call
    runs, start = [], 0
    for slot, n in enumerate(counts):
        if n:
            runs.append((slot, start, n))
            start += n
    return order, order // K, runs


def _grouped_pairs(hidden, slot_ids, w1, w2, gated, activation, alpha, limit, b1, b2, interleaved=False):
    """Every pair's expert output ``[T*K, H]`` (pair order) from two ``torch._grouped_mm`` calls over the
    pairs sorted by slot: no per-slot loop and no host sync. None where this torch build, dtype or the
    strides (multiples of 16 bytes) do not allow it; the caller then loops over slots.

    A mixed-variant batch spreads its tokens over many slots with a few tokens each, where the
    per-slot loop's fixed cost dominated (measured on CPU: 32 slots x 4 tokens, 1.7x faster matmuls)."""
    if not hasattr(torch, "_grouped_mm") or hidden.dtype == torch.float64 or hidden.shape[0] == 0:
        return None
    flat = slot_ids.reshape(-1).long()
    order = torch.sort(flat, stable=True).indices
    offs = torch.bincount(flat, minlength=w1.shape[0]).cumsum(0).to(torch.int32)
    x = hidden[order // slot_ids.shape[1]]
    try:
        h = torch._grouped_mm(x, w1.transpose(1, 2), offs=offs)
        if b1 is not None:
            h = h + b1[flat[order]]
        y = torch._grouped_mm(apply_activation(h, gated, activation, alpha, limit, interleaved).contiguous(),
                              w2.transpose(1, 2), offs=offs)
    except (RuntimeError, NotImplementedError):  # unsupported here: the per-slot loop computes the same
        return None
    if b2 is not None:
        y = y + b2[flat[order]]
    return y, order, h


def moe_torch(hidden, slot_ids, topk_weights, w1, w2, gated: bool, activation: str | None = None,
              alpha: float = SWIGLU_ALPHA, limit: float = SWIGLU_LIMIT, b1=None, b2=None,
              interleaved: bool = False, keep_h: bool = False):
    """Sort pairs by slot, run the experts as one grouped matmul (or one matmul per contiguous slot run
    where ``torch._grouped_mm`` cannot run), reduce over top-k in fp32.

    ``keep_h``: also return the up projection (biases added, before the activation) of every pair in slot order
    ``[T*K, N1]``, which ``moe_torch_backward(h=...)`` then reads instead of recomputing it (training)."""
    T, K = slot_ids.shape
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    pair_out = torch.empty(T * K, hidden.shape[1], dtype=acc, device=hidden.device)
    # bf16/fp16 experts on a CPU whose torch matmul is slow in 16 bits: the per-slot loop with the C++ linear
    # (cpu_linear), which torch._grouped_mm cannot use. Each slot's run is at most T rows.
    # The C++ linear reads row-major weights; strided views (experts used as stored) take torch's matmuls.
    lowp = (w1.shape[0] > 0 and w1.is_contiguous() and w2.is_contiguous()
            and cpu_linear.use_op(hidden[: min(T, cpu_linear.MAX_ROWS)], w1[0]))
    grouped = None if lowp else _grouped_pairs(hidden, slot_ids, w1, w2, gated, activation, alpha, limit, b1, b2,
                                               interleaved)
    if grouped is not None:
        y, order, h_sorted = grouped
        pair_out[order] = y.to(acc)
    else:
        order, tokens, runs = _slot_runs(slot_ids, w1.shape[0])
        x = hidden[tokens]
        h_runs = []
        for slot, start, n in runs:
            xs = x[start : start + n]
            if lowp:
                h = cpu_linear.linear(xs, w1[slot])
                h = h if b1 is None else h + b1[slot]
                a = apply_activation(h, gated, activation, alpha, limit, interleaved)
                y = cpu_linear.linear(a, w2[slot])
                y = y if b2 is None else y + b2[slot]
            else:
                h = xs @ w1[slot].T if b1 is None else torch.addmm(b1[slot], xs, w1[slot].T)
                a = apply_activation(h, gated, activation, alpha, limit, interleaved)
                y = a @ w2[slot].T if b2 is None else torch.addmm(b2[slot], a, w2[slot].T)
            pair_out[order[start : start + n]] = y.to(acc)
            h_runs.append(h)
        h_sorted = torch.cat(h_runs) if h_runs else hidden.new_empty(0, w1.shape[1])
    pair_out *= topk_weights.reshape(-1, 1).to(acc)
    out = pair_out.view(T, K, hidden.shape[1]).sum(1).to(hidden.dtype)  # explicit H: T may be 0
    return (out, h_sorted) if keep_h else out


def _grouped_weight_grad(left, right, offs, like):
    """Per slot ``left[rows of s].T @ right[rows of s]`` as one grouped matmul, laid out with ``like``'s strides (a
    transposed view's gradient is computed transposed, so it costs no copy either)."""
    if like.stride(1) == 1 and like.stride(2) != 1:  # a transposed view: compute [S, cols, rows], hand back its .mT
        return torch._grouped_mm(right.T, left, offs=offs).transpose(1, 2)
    return torch._grouped_mm(left.T, right, offs=offs)


def _grouped_backward(grad_out, hidden, slot_ids, topk_weights, w1, w2, gated, activation, alpha, limit, needs, b1, b2,
                      interleaved, h_saved=None):
    """``moe_torch_backward``'s gradients from ``torch._grouped_mm`` calls over the pairs sorted by slot (no per-slot
    loop, no host sync); None where this torch, dtype or the strides do not allow it. The per-slot loop's Python
    and matmul calls cost a training step 1.2x transformers' grouped_mm (``benchmarks/train_step.py``)."""
    if not hasattr(torch, "_grouped_mm") or hidden.dtype == torch.float64 or hidden.shape[0] == 0:
        return None
    need_h, need_w, need_w1, need_w2, need_b1, need_b2 = needs
    T, K = slot_ids.shape
    H, dtype, acc = hidden.shape[1], hidden.dtype, torch.float32
    flat = slot_ids.reshape(-1).long()
    order = torch.sort(flat, stable=True).indices
    slots = flat[order]
    counts = torch.bincount(flat, minlength=w1.shape[0])
    offs = counts.cumsum(0).to(torch.int32)
    tok = order // K
    xs, gs = hidden[tok], grad_out[tok]
    ws = topk_weights.reshape(-1)[order].to(acc)[:, None]
    out = [None] * 6
    try:
        if h_saved is not None:
            h = h_saved.to(acc)
        else:
            h = torch._grouped_mm(xs, w1.transpose(1, 2), offs=offs).to(acc)
            if b1 is not None:
                h = h + b1[slots].to(acc)
        g_w2 = torch._grouped_mm(gs, w2, offs=offs).to(acc)  # d loss / d a for routing weight 1
        gw = gs.to(acc) * ws
        a, d_h = activation_and_backward(h, g_w2 * ws, gated, activation, alpha, limit, interleaved)
        d_h = d_h.to(dtype)
        if need_w or need_w2:
            if need_w:
                d_weight = (g_w2 * a).sum(-1)
                if b2 is not None:
                    d_weight += (gs.to(acc) * b2[slots].to(acc)).sum(-1)
                out[1] = torch.empty_like(d_weight).index_copy_(0, order, d_weight).view(T, K).to(topk_weights.dtype)
            if need_w2:
                out[3] = _grouped_weight_grad(gw, a, offs, w2).to(w2.dtype)
        if need_b2:
            out[5] = torch.zeros(b2.shape, dtype=acc, device=b2.device).index_add_(0, slots, gw).to(b2.dtype)
        if need_h or need_w1 or need_b1:
            if need_w1:
                out[2] = _grouped_weight_grad(d_h, xs, offs, w1)
            if need_b1:
                out[4] = torch.zeros(b1.shape, dtype=acc, device=b1.device).index_add_(0, slots, d_h.to(acc)) \
                    .to(b1.dtype)
            if need_h:
                d_pair = torch._grouped_mm(d_h, w1, offs=offs).to(acc)
                out[0] = torch.empty_like(d_pair).index_copy_(0, order, d_pair).view(T, K, H).sum(1).to(dtype)
    except (RuntimeError, NotImplementedError):  # unsupported here: the per-slot loop computes the same
        return None
    if hidden.device.type != "cpu":  # the CPU kernel writes zeros for an empty group; others are not promised to
        empty = torch.nonzero(counts == 0).flatten()
        for i in (2, 3):
            if out[i] is not None:
                out[i].index_fill_(0, empty, 0)
    return out


def moe_torch_backward(grad_out, hidden, slot_ids, topk_weights, w1, w2, gated: bool, activation: str | None = None,
                       alpha: float = SWIGLU_ALPHA, limit: float = SWIGLU_LIMIT,
                       needs=(True, True, True, True), b1=None, b2=None, interleaved: bool = False, h=None):
    """Gradients of ``moe_torch``'s function: ``(d hidden, d topk_weights, d w1, d w2)``, and with six ``needs``
    flags (expert biases) ``(..., d b1, d b2)``; an entry whose ``needs`` flag is False comes back as None.

    Recomputes the up projection unless the forward kept it (``h``: ``moe_torch(..., keep_h=True)``'s, pairs in
    slot order).
    Matmuls run in the input dtype, the activation's derivative and the routing weight's dot
    product in fp32 (fp64 for fp64 inputs); d hidden sums over k in that precision.
    """
    need_h, need_w, need_w1, need_w2 = needs[:4]
    need_b1, need_b2 = (tuple(needs[4:]) + (False, False))[:2]
    grouped = _grouped_backward(grad_out, hidden, slot_ids, topk_weights, w1, w2, gated, activation, alpha, limit,
                                (need_h, need_w, need_w1, need_w2, need_b1, need_b2), b1, b2, interleaved, h)
    if grouped is not None:
        return tuple(grouped) if len(needs) > 4 else tuple(grouped[:4])
    T, K = slot_ids.shape
    H, dtype, device = hidden.shape[1], hidden.dtype, hidden.device
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    order, tokens, runs = _slot_runs(slot_ids, w1.shape[0])
    flat_w = topk_weights.reshape(-1)
    d_pair = torch.zeros(T * K, H, dtype=acc, device=device) if need_h else None
    d_weight = torch.zeros(T * K, dtype=acc, device=device) if need_w else None
    d_w1 = torch.zeros_like(w1) if need_w1 else None
    d_w2 = torch.zeros_like(w2) if need_w2 else None
    d_b1 = torch.zeros_like(b1) if need_b1 else None
    d_b2 = torch.zeros_like(b2) if need_b2 else None
    for slot, start, n in runs:
        pairs, tok = order[start : start + n], tokens[start : start + n]
        xs, gs = hidden[tok], grad_out[tok]
        ws = flat_w[pairs].to(acc)[:, None]
        if h is not None:
            hs = h[start : start + n].to(acc)
        else:
            hs = (xs @ w1[slot].T).to(acc)
            if b1 is not None:
                hs = hs + b1[slot].to(acc)
        g_w2 = (gs @ w2[slot]).to(acc)  # d loss / d a for routing weight 1: [n, I]
        if need_w or need_w2:
            a = apply_activation(hs, gated, activation, alpha, limit, interleaved)
            if need_w:  # d loss / d w[t, k] = g[t] . (a @ w2.T + b2) = (g[t] @ w2) . a + g[t] . b2
                d_weight[pairs] = (g_w2 * a).sum(-1)
                if b2 is not None:
                    d_weight[pairs] += (gs.to(acc) * b2[slot].to(acc)).sum(-1)
            if need_w2:
                d_w2[slot] = ((gs.to(acc) * ws).T @ a).to(w2.dtype)
        if need_b2:
            d_b2[slot] = (gs.to(acc) * ws).sum(0).to(b2.dtype)
        if need_h or need_w1 or need_b1:
            d_h = activation_backward(hs, g_w2 * ws, gated, activation, alpha, limit, interleaved).to(dtype)  # [n, N1]
            if need_w1:
                d_w1[slot] = d_h.T @ xs
            if need_b1:
                d_b1[slot] = d_h.to(acc).sum(0).to(b1.dtype)
            if need_h:
                d_pair[pairs] = (d_h @ w1[slot]).to(acc)
    d_hidden = d_pair.view(T, K, H).sum(1).to(dtype) if need_h else None
    d_topk = d_weight.view(T, K).to(topk_weights.dtype) if need_w else None
    if len(needs) > 4:
        return d_hidden, d_topk, d_w1, d_w2, d_b1, d_b2
    return d_hidden, d_topk, d_w1, d_w2
