"""The MoE op API: ``torch.ops.multimoe_rt.fused_moe`` and ``torch.ops.multimoe_rt.align``.

Other runtimes call these on plain tensors (hidden states, slot ids, routing weights, slab
tensors); ``torch.compile`` traces through them thanks to the fake implementations. Our own
classes are thin layers over them.

Backends: ``triton`` (GPU; CPU only under ``TRITON_INTERPRET=1``), ``torch`` (pure PyTorch)
and ``reference`` (float64). Default: triton on CUDA tensors, torch otherwise; the
``MULTIMOE_BACKEND`` environment variable or the ``backend`` argument override it.

``fused_moe`` takes the experts' activation (``torch_moe.ACTIVATIONS``; default SiLU when gated, ReLU
otherwise) and is differentiable: ``register_autograd`` gives gradients for the hidden states, the
routing weights and both expert weights through a second custom op, ``fused_moe_backward`` (also
with a fake implementation, so a compiled training step traces through both). Without grad mode
or without an input that requires grad, the op costs nothing extra.
"""

from __future__ import annotations

import functools

import torch

from . import delta as delta_mod
from . import delta_moe
from . import torch_moe
from .torch_moe import (  # noqa: F401  (re-exported: the op contract's names)
    ACTIVATIONS, FLOAT_DTYPES, OP_DTYPES, SWIGLU_ALPHA, SWIGLU_LIMIT, MoEInputTypeError, UnsupportedActivationError,
    check_activation_args, check_align_inputs, check_moe_inputs, resolve_activation)
from .config import settings
from .errors import UsageError

BACKENDS = ("triton", "torch", "reference")
DEFAULT_BLOCK_M = 16


@functools.cache  # whether triton imports and CUDA exists does not change within a process
def triton_status() -> tuple[bool, str]:
    """Whether the Triton backend can run here, and why not."""
    try:
        import triton  # noqa: F401
    except Exception as e:  # ImportError or a broken install
        return False, f"triton not importable: {e}"
    if torch.cuda.is_available():
        return True, "CUDA device"
    if settings().triton_interpret:
        return True, "TRITON_INTERPRET=1 (CPU interpreter, slow: for tests)"
    return False, "no CUDA device (set TRITON_INTERPRET=1 before importing triton to run it on CPU)"


def choose_backend(device: torch.device, backend: str | None = None) -> str:
    backend = backend or settings().backend or ("triton" if device.type == "cuda" else "torch")
    if backend not in BACKENDS:
        raise ValueError(f"unknown MoE backend {backend!r}; choose one of {BACKENDS}")
    if backend == "triton":
        ok, why = triton_status()
        if not ok:
            raise RuntimeError(f"the triton backend is unavailable: {why}")
    return backend


@torch.library.custom_op("multimoe_rt::fused_moe", mutates_args=())
def _fused_moe_op(hidden: torch.Tensor, slot_ids: torch.Tensor, topk_weights: torch.Tensor,
                  w1: torch.Tensor, w2: torch.Tensor, gated: bool, backend: str, activation: str = "auto",
                  alpha: float = SWIGLU_ALPHA, limit: float = SWIGLU_LIMIT, interleaved: bool = False) -> torch.Tensor:
    activation = resolve_activation(activation, gated)
    if backend == "triton":
        from .kernels.grouped_gemm import fused_moe_triton
        return fused_moe_triton(hidden, slot_ids, topk_weights, w1, w2, gated, activation=activation,
                                alpha=alpha, limit=limit, interleaved=interleaved)
    if backend == "reference":
        return torch_moe.moe_reference(hidden, slot_ids, topk_weights, w1, w2, gated, activation, alpha,
                                       limit, interleaved=interleaved).to(hidden.dtype)
    return torch_moe.moe_torch(hidden, slot_ids, topk_weights, w1, w2, gated, activation, alpha, limit,
                               interleaved=interleaved)


@_fused_moe_op.register_fake
def _(hidden, slot_ids, topk_weights, w1, w2, gated, backend, activation="auto", alpha=SWIGLU_ALPHA,
      limit=SWIGLU_LIMIT, interleaved=False):
    return hidden.new_empty(hidden.shape[0], w2.shape[1])


@torch.library.custom_op("multimoe_rt::fused_moe_backward", mutates_args=())
def _fused_moe_backward_op(grad_out: torch.Tensor, hidden: torch.Tensor, slot_ids: torch.Tensor,
                           topk_weights: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, gated: bool, backend: str,
                           activation: str, alpha: float, limit: float, need_hidden: bool, need_topk_weights: bool,
                           need_w1: bool, need_w2: bool, interleaved: bool = False
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of fused_moe for (hidden, topk_weights, w1, w2); one not asked for is an empty tensor.
    Every backend runs the PyTorch backward (it works on any device; the kernels are forward only)."""
    grads = torch_moe.moe_torch_backward(grad_out, hidden, slot_ids, topk_weights, w1, w2, gated,
                                         resolve_activation(activation, gated), alpha, limit,
                                         needs=(need_hidden, need_topk_weights, need_w1, need_w2),
                                         interleaved=interleaved)
    return tuple(g if g is not None else like.new_empty(0)
                 for g, like in zip(grads, (hidden, topk_weights, w1, w2)))


@_fused_moe_backward_op.register_fake
def _(grad_out, hidden, slot_ids, topk_weights, w1, w2, gated, backend, activation, alpha, limit, need_hidden,
      need_topk_weights, need_w1, need_w2, interleaved=False):
    return tuple(torch.empty_like(t) if need else t.new_empty(0)
                 for t, need in ((hidden, need_hidden), (topk_weights, need_topk_weights), (w1, need_w1),
                                 (w2, need_w2)))


def _fused_moe_setup_context(ctx, inputs, output):
    hidden, slot_ids, topk_weights, w1, w2, gated, backend, *rest = inputs
    ctx.save_for_backward(hidden, slot_ids, topk_weights, w1, w2)
    ctx.args = (gated, backend, *rest)


def _fused_moe_backward(ctx, grad_out):
    hidden, slot_ids, topk_weights, w1, w2 = ctx.saved_tensors
    gated, backend, *rest = ctx.args
    activation, alpha, limit, interleaved = (list(rest) + ["auto", SWIGLU_ALPHA, SWIGLU_LIMIT, False][len(rest):])
    need = ctx.needs_input_grad
    d_hidden, d_topk, d_w1, d_w2 = torch.ops.multimoe_rt.fused_moe_backward(
        grad_out.contiguous(), hidden, slot_ids, topk_weights, w1, w2, gated, backend, activation, alpha, limit,
        need[0], need[2], need[3], need[4], interleaved)
    return (d_hidden if need[0] else None, None, d_topk if need[2] else None, d_w1 if need[3] else None,
            d_w2 if need[4] else None) + (None,) * len(ctx.args)


_fused_moe_op.register_autograd(_fused_moe_backward, setup_context=_fused_moe_setup_context)


# Experts with biases (GPT-OSS): the same contract plus ``b1 [S, N1]`` (added before the activation) and
# ``b2 [S, H]`` (added before the routing weight), as two more ops so the unbiased ops keep their schema.
@torch.library.custom_op("multimoe_rt::fused_moe_bias", mutates_args=())
def _fused_moe_bias_op(hidden: torch.Tensor, slot_ids: torch.Tensor, topk_weights: torch.Tensor,
                       w1: torch.Tensor, w2: torch.Tensor, b1: torch.Tensor, b2: torch.Tensor, gated: bool,
                       backend: str, activation: str, alpha: float, limit: float,
                       interleaved: bool = False) -> torch.Tensor:
    activation = resolve_activation(activation, gated)
    if backend == "triton":
        from .kernels.grouped_gemm import fused_moe_triton
        return fused_moe_triton(hidden, slot_ids, topk_weights, w1, w2, gated, activation=activation,
                                alpha=alpha, limit=limit, b1=b1, b2=b2, interleaved=interleaved)
    if backend == "reference":
        return torch_moe.moe_reference(hidden, slot_ids, topk_weights, w1, w2, gated, activation, alpha, limit,
                                       b1=b1, b2=b2, interleaved=interleaved).to(hidden.dtype)
    return torch_moe.moe_torch(hidden, slot_ids, topk_weights, w1, w2, gated, activation, alpha, limit, b1=b1, b2=b2,
                               interleaved=interleaved)


@_fused_moe_bias_op.register_fake
def _(hidden, slot_ids, topk_weights, w1, w2, b1, b2, gated, backend, activation, alpha, limit, interleaved=False):
    return hidden.new_empty(hidden.shape[0], w2.shape[1])


@torch.library.custom_op("multimoe_rt::fused_moe_bias_backward", mutates_args=())
def _fused_moe_bias_backward_op(grad_out: torch.Tensor, hidden: torch.Tensor, slot_ids: torch.Tensor,
                                topk_weights: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, b1: torch.Tensor,
                                b2: torch.Tensor, gated: bool, backend: str, activation: str, alpha: float,
                                limit: float, needs: list[bool], interleaved: bool = False) -> list[torch.Tensor]:
    """Gradients for (hidden, topk_weights, w1, w2, b1, b2); one not asked for is an empty tensor."""
    grads = torch_moe.moe_torch_backward(grad_out, hidden, slot_ids, topk_weights, w1, w2, gated,
                                         resolve_activation(activation, gated), alpha, limit, needs=tuple(needs),
                                         b1=b1, b2=b2, interleaved=interleaved)
    return [g if g is not None else like.new_empty(0)
            for g, like in zip(grads, (hidden, topk_weights, w1, w2, b1, b2))]


@_fused_moe_bias_backward_op.register_fake
def _(grad_out, hidden, slot_ids, topk_weights, w1, w2, b1, b2, gated, backend, activation, alpha, limit, needs,
      interleaved=False):
    return [torch.empty_like(t) if need else t.new_empty(0)
            for t, need in zip((hidden, topk_weights, w1, w2, b1, b2), needs)]


def _fused_moe_bias_setup_context(ctx, inputs, output):
    hidden, slot_ids, topk_weights, w1, w2, b1, b2, *args = inputs
    ctx.save_for_backward(hidden, slot_ids, topk_weights, w1, w2, b1, b2)
    ctx.args = args


def _fused_moe_bias_backward(ctx, grad_out):
    hidden, slot_ids, topk_weights, w1, w2, b1, b2 = ctx.saved_tensors
    n = ctx.needs_input_grad
    needs = [n[0], n[2], n[3], n[4], n[5], n[6]]
    *args, interleaved = ctx.args
    grads = torch.ops.multimoe_rt.fused_moe_bias_backward(grad_out.contiguous(), hidden, slot_ids, topk_weights, w1,
                                                          w2, b1, b2, *args, needs, interleaved)
    d_hidden, d_topk, d_w1, d_w2, d_b1, d_b2 = (g if need else None for g, need in zip(grads, needs))
    return (d_hidden, None, d_topk, d_w1, d_w2, d_b1, d_b2) + (None,) * len(ctx.args)


_fused_moe_bias_op.register_autograd(_fused_moe_bias_backward, setup_context=_fused_moe_bias_setup_context)


# Training on the torch backend: the forward also returns the up projection of every pair (slot order), which the
# backward reads instead of recomputing it (one grouped matmul of seven, and the bias gather, per layer and step), as
# transformers' grouped_mm keeps its intermediates. Inference never takes this op, so it keeps nothing.
@torch.library.custom_op("multimoe_rt::fused_moe_train", mutates_args=())
def _fused_moe_train_op(hidden: torch.Tensor, slot_ids: torch.Tensor, topk_weights: torch.Tensor, w1: torch.Tensor,
                        w2: torch.Tensor, b1: torch.Tensor | None, b2: torch.Tensor | None, gated: bool, activation: str,
                        alpha: float, limit: float, interleaved: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return torch_moe.moe_torch(hidden, slot_ids, topk_weights, w1, w2, gated, activation, alpha, limit, b1=b1, b2=b2,
                               interleaved=interleaved, keep_h=True)


@_fused_moe_train_op.register_fake
def _(hidden, slot_ids, topk_weights, w1, w2, b1, b2, gated, activation, alpha, limit, interleaved):
    return (hidden.new_empty(hidden.shape[0], w2.shape[1]),
            hidden.new_empty(slot_ids.shape[0] * slot_ids.shape[1], w1.shape[1]))


@torch.library.custom_op("multimoe_rt::fused_moe_train_backward", mutates_args=())
def _fused_moe_train_backward_op(grad_out: torch.Tensor, hidden: torch.Tensor, slot_ids: torch.Tensor,
                                 topk_weights: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor,
                                 b1: torch.Tensor | None, b2: torch.Tensor | None, h: torch.Tensor, gated: bool,
                                 activation: str, alpha: float, limit: float, interleaved: bool,
                                 needs: list[bool]) -> list[torch.Tensor]:
    """Gradients for (hidden, topk_weights, w1, w2[, b1, b2]) (``needs`` has 4 or 6 flags); empty where not asked."""
    grads = torch_moe.moe_torch_backward(grad_out, hidden, slot_ids, topk_weights, w1, w2, gated, activation, alpha,
                                         limit, needs=tuple(needs), b1=b1, b2=b2, interleaved=interleaved, h=h)
    return [g if g is not None else hidden.new_empty(0) for g in grads]


@_fused_moe_train_backward_op.register_fake
def _(grad_out, hidden, slot_ids, topk_weights, w1, w2, b1, b2, h, gated, activation, alpha, limit, interleaved,
      needs):
    return [torch.empty_like(t) if need else hidden.new_empty(0)
            for t, need in zip((hidden, topk_weights, w1, w2, b1, b2), needs)]


def _fused_moe_train_setup_context(ctx, inputs, output):
    hidden, slot_ids, topk_weights, w1, w2, b1, b2, *args = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(hidden, slot_ids, topk_weights, w1, w2, b1, b2, output[1])
    ctx.args = args


def _fused_moe_train_backward(ctx, grad_out, _grad_h):
    hidden, slot_ids, topk_weights, w1, w2, b1, b2, h = ctx.saved_tensors
    n = ctx.needs_input_grad
    needs = [n[0], n[2], n[3], n[4]] + ([n[5], n[6]] if b1 is not None else [])
    grads = torch.ops.multimoe_rt.fused_moe_train_backward(grad_out.contiguous(), hidden, slot_ids, topk_weights, w1,
                                                           w2, b1, b2, h, *ctx.args, needs)
    d = [g if need else None for g, need in zip(grads, needs)] + [None, None]
    return (d[0], None, d[1], d[2], d[3], d[4], d[5]) + (None,) * len(ctx.args)


_fused_moe_train_op.register_autograd(_fused_moe_train_backward, setup_context=_fused_moe_train_setup_context)


@torch.library.custom_op("multimoe_rt::fused_moe_delta", mutates_args=())
def _fused_moe_delta_op(hidden: torch.Tensor, expert_ids: torch.Tensor, topk_weights: torch.Tensor,
                        w1: torch.Tensor, w2: torch.Tensor, gated: bool, backend: str, activation: str,
                        alpha: float, limit: float, deltas: list[torch.Tensor], max_rank: int) -> torch.Tensor:
    """fused_moe over expert ids that are dense slots or base slot + compressed delta (``multimoe_rt.delta``);
    ``deltas`` = ``DeltaPools.tensors()`` (``delta.POOL_NAMES``), ``max_rank`` its largest lowrank rank.
    Forward only: no gradient flows through deltas."""
    activation = resolve_activation(activation, gated)
    t = delta_mod.DeltaTensors(*deltas)
    if backend == "triton":
        from .kernels.delta_gemm import fused_moe_delta_triton
        return fused_moe_delta_triton(hidden, expert_ids, topk_weights, w1, w2, gated, t, max_rank=max_rank,
                                      activation=activation, alpha=alpha, limit=limit)
    if backend == "reference":
        return delta_moe.moe_reference_delta(hidden, expert_ids, topk_weights, w1, w2, gated, t, activation, alpha,
                                             limit).to(hidden.dtype)
    return delta_moe.moe_torch_delta(hidden, expert_ids, topk_weights, w1, w2, gated, t, activation, alpha, limit)


@_fused_moe_delta_op.register_fake
def _(hidden, expert_ids, topk_weights, w1, w2, gated, backend, activation, alpha, limit, deltas, max_rank):
    return hidden.new_empty(hidden.shape[0], w2.shape[1])


@torch.library.custom_op("multimoe_rt::align", mutates_args=())
def _align_op(slot_ids: torch.Tensor, num_slots: int, block_m: int,
              backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if backend == "triton":
        from .kernels.align import align_triton
        return align_triton(slot_ids, num_slots, block_m)
    if backend == "cpp":
        from . import _ext
        return _ext.align_cpu(slot_ids, num_slots, block_m) if slot_ids.device.type == "cpu" \
            else _ext.align_cuda(slot_ids, num_slots, block_m)
    return torch_moe.align_torch(slot_ids, num_slots, block_m)


@_align_op.register_fake
def _(slot_ids, num_slots, block_m, backend):
    p_max = torch_moe.padded_size(slot_ids.numel(), num_slots, block_m)
    return (slot_ids.new_empty(p_max, dtype=torch.int32), slot_ids.new_empty(p_max // block_m, dtype=torch.int32),
            slot_ids.new_empty(1, dtype=torch.int32))


def fused_moe(hidden, slot_ids, topk_weights, w1, w2, gated: bool, backend: str | None = None,
              check_slots: bool = True, workspace: dict | None = None, activation: str | None = None,
              alpha: float = SWIGLU_ALPHA, limit: float = SWIGLU_LIMIT, b1=None, b2=None,
              deltas=None, interleaved: bool = False) -> torch.Tensor:
    """Route each token's top-k (slot, weight) pairs through the slab experts; returns ``[T, H]``.

    ``activation``: one of ``ACTIVATIONS`` or a transformers config name (``"gelu_pytorch_tanh"``...);
    None = SiLU when ``gated``, ReLU otherwise. ``alpha``/``limit`` are the clamped SwiGLU's
    (``"swiglu_oai"``) parameters. An unsupported activation raises ``UnsupportedActivationError``.

    Differentiable (hidden, topk_weights, w1, w2). float64 inputs run on the torch and reference
    backends (for gradcheck); the triton backend takes fp32/fp16/bf16.

    ``b1 [S, N1]`` / ``b2 [S, H]``: optional expert biases (GPT-OSS), added before the activation and before the
    routing weight; given together (a zero tensor stands for a missing one), differentiable like the weights.

    ``interleaved`` (gated only): gate and up alternate along ``w1``'s rows and ``b1``'s entries (gate ``2j``, up
    ``2j + 1``), GPT-OSS's stored layout. ``w1``/``w2`` may be strided views (GPT-OSS's ``gate_up_proj [S, H, 2I]``
    and ``down_proj [S, I, H]`` transposed), read as stored with no copy; gradients come back with their strides.

    ``workspace`` (triton backend only): preallocated work buffers (``ExpertSlab.workspace``) so the
    expert path does not allocate per step; that eager path skips the custom op, which
    ``torch.compile`` traces without it, and is taken only when no gradient is being recorded.

    ``deltas`` (``ExpertSlab.deltas``, a ``multimoe_rt.delta.DeltaPools``): ``slot_ids`` are then expert ids,
    dense slots ``< w1.shape[0]`` or base slot + compressed delta above, any mix of codecs in one call
    (``torch.ops.multimoe_rt.fused_moe_delta``; forward only, no expert biases).
    """
    if deltas is not None:
        if b1 is not None or b2 is not None or interleaved:
            raise NotImplementedError("fused_moe: compressed deltas with expert biases or interleaved gate/up rows "
                                      "are not supported")
        return _fused_moe_deltas(hidden, slot_ids, topk_weights, w1, w2, gated, backend, check_slots, workspace,
                                 activation, alpha, limit, deltas)
    activation = resolve_activation(activation, gated)
    check_activation_args(activation, alpha, limit)
    backend = choose_backend(hidden.device, backend)
    check_moe_inputs(hidden, slot_ids, topk_weights, w1, w2, gated, check_slots,
                     dtypes=FLOAT_DTYPES if backend == "triton" else OP_DTYPES, b1=b1, b2=b2)
    alpha, limit, interleaved = float(alpha), float(limit), bool(interleaved)
    if interleaved and not gated:
        raise UsageError("fused_moe: interleaved=True needs gated experts (gate and up rows to interleave)")
    if (b1 is None) != (b2 is None):
        raise ValueError("fused_moe: expert biases b1 and b2 go together (pass zeros for a missing one)")
    if backend == "torch" and torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (hidden, topk_weights, w1, w2, b1, b2)):
        return torch.ops.multimoe_rt.fused_moe_train(hidden.contiguous(), slot_ids.contiguous(),
                                                     topk_weights.contiguous(), w1, w2, b1, b2, gated, activation,
                                                     alpha, limit, interleaved)[0]
    if b1 is not None:
        if workspace is not None and backend == "triton" and not torch.compiler.is_compiling() and not (
                torch.is_grad_enabled() and any(t.requires_grad for t in (hidden, topk_weights, w1, w2, b1, b2))):
            from .kernels.grouped_gemm import fused_moe_triton
            return fused_moe_triton(hidden.contiguous(), slot_ids.contiguous(), topk_weights.contiguous(), w1, w2,
                                    gated, workspace=workspace, activation=activation, alpha=alpha, limit=limit,
                                    b1=b1, b2=b2, interleaved=interleaved)
        return torch.ops.multimoe_rt.fused_moe_bias(hidden.contiguous(), slot_ids.contiguous(),
                                                    topk_weights.contiguous(), w1, w2, b1, b2, gated, backend,
                                                    activation, alpha, limit, interleaved)
    if workspace is not None and backend == "triton" and not torch.compiler.is_compiling() and not (
            torch.is_grad_enabled() and any(t.requires_grad for t in (hidden, topk_weights, w1, w2))):
        from .kernels.grouped_gemm import fused_moe_triton
        return fused_moe_triton(hidden.contiguous(), slot_ids.contiguous(), topk_weights.contiguous(), w1, w2,
                                gated, workspace=workspace, activation=activation, alpha=alpha, limit=limit,
                                interleaved=interleaved)
    return torch.ops.multimoe_rt.fused_moe(hidden.contiguous(), slot_ids.contiguous(), topk_weights.contiguous(),
                                           w1, w2, gated, backend, activation, alpha, limit, interleaved)


def _fused_moe_deltas(hidden, expert_ids, topk_weights, w1, w2, gated, backend, check_slots, workspace, activation,
                      alpha, limit, pools) -> torch.Tensor:
    activation = resolve_activation(activation, gated)
    check_activation_args(activation, alpha, limit)
    backend = choose_backend(hidden.device, backend)
    check_moe_inputs(hidden, expert_ids, topk_weights, w1, w2, gated, check_slots=False,
                     dtypes=FLOAT_DTYPES if backend == "triton" else OP_DTYPES)
    pools.check_slab(w1, w2)
    if check_slots:
        delta_mod.check_ids(expert_ids, pools.num_ids)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (hidden, topk_weights, w1, w2)):
        raise NotImplementedError("fused_moe with deltas is forward only: no gradient flows through compressed "
                                  "deltas (run under torch.no_grad() / inference_mode, or use dense slots)")
    alpha, limit = float(alpha), float(limit)
    if workspace is not None and backend == "triton" and not torch.compiler.is_compiling():
        from .kernels.delta_gemm import fused_moe_delta_triton
        return fused_moe_delta_triton(hidden.contiguous(), expert_ids.contiguous(), topk_weights.contiguous(), w1,
                                      w2, gated, pools, workspace=workspace, activation=activation, alpha=alpha,
                                      limit=limit)
    return torch.ops.multimoe_rt.fused_moe_delta(hidden.contiguous(), expert_ids.contiguous(),
                                                 topk_weights.contiguous(), w1, w2, gated, backend, activation,
                                                 alpha, limit, list(pools.tensors()), pools.max_rank)


def default_align_backend(device: torch.device) -> str:
    """triton on CUDA; on CPU the C++ op where the extension loaded, else torch. Measured on a 2-core AMD EPYC, 1
    thread, at 1-256 tokens, 8-64 slots, top-2..8: align_cpu 5-13 us against align_torch's 157-315 us (5-13x through
    the op dispatch: 30-71 us against 223-392 us)."""
    if device.type == "cuda":
        return "triton"
    from . import _ext
    return "cpp" if _ext.available else "torch"


def align(slot_ids, num_slots: int, block_m: int = DEFAULT_BLOCK_M, backend: str | None = None):
    """Sort pairs by slot, pad runs to ``block_m``: ``(sorted_ids, block_slot, num_padded)``."""
    check_align_inputs(slot_ids, num_slots, block_m)
    backend = backend or default_align_backend(slot_ids.device)
    if backend == "reference":
        backend = "torch"
    if backend not in ("triton", "torch", "cpp"):
        raise ValueError(f"unknown align backend {backend!r}; choose triton, torch or cpp")
    return torch.ops.multimoe_rt.align(slot_ids.contiguous(), num_slots, block_m, backend)
