"""The core experts layer: ``SlabExperts`` reads a shared ExpertSlab through a SlotTable.

``ActiveVariant`` is the table row every SlabExperts of one model reads; ``moe_layer_prefixes``
finds the MoE blocks of a model of any supported family (``families``) in checkpoint order;
``experts_activation`` reads the activation of a transformers experts module.
"""

from __future__ import annotations

import torch
from torch import nn

from . import ops
from .families import BLOCK_CLASSES
from .torch_moe import (SWIGLU_ALPHA, SWIGLU_LIMIT, UnsupportedActivationError, activation_of_module,
                        check_activation_args, resolve_activation)


class ActiveVariant:
    """The variant every SlabExperts of one model reads: a row of the slot table.

    ``value`` is an int, or an int tensor ``[T]`` of per-token variant ids for a mixed batch.
    Shared by all layers so a switch flips them together.
    """

    def __init__(self, value=0):
        self.value = value


def moe_layer_prefixes(model: nn.Module) -> list[str]:
    """Module names of the MoE blocks in checkpoint order (the ``layer`` index of the table): the modules of a
    family's ``block_classes`` (``families.FAMILIES``) that hold an ``experts`` module."""
    return [name for name, module in model.named_modules()
            if type(module).__name__ in BLOCK_CLASSES and isinstance(getattr(module, "experts", None), nn.Module)]


def experts_activation(experts: nn.Module) -> tuple[str, float, float]:
    """``(activation, alpha, limit)`` of a transformers experts module, as ``ops.fused_moe`` takes them.

    Reads what the module itself applies: ``act_fn`` of experts built by transformers'
    ``use_experts_implementation`` (Mixtral and kin: ``act_fn(gate) * up``, or ``act_fn(up)`` without a
    gate), ``act`` of each SwitchTransformers expert, GPT-OSS's clamped SwiGLU (``alpha``, ``limit``).
    A custom ``_apply_gate`` or an activation the op lacks raises ``UnsupportedActivationError``."""
    if isinstance(experts, SlabExperts):
        return experts.activation, experts.alpha, experts.limit
    if isinstance(experts, nn.ModuleDict):  # SwitchTransformersExperts: expert_{e}.act
        acts = {activation_of_module(getattr(m, "act", None)) for m in experts.values()}
        if len(acts) != 1:
            raise UnsupportedActivationError(f"{type(experts).__name__}: experts with different activations {acts}")
        return acts.pop(), SWIGLU_ALPHA, SWIGLU_LIMIT
    gate = getattr(type(experts), "_apply_gate", None)
    if gate is not None and getattr(gate, "__name__", "") != "_default_apply_gate":
        if type(experts).__name__ == "GptOssExperts":
            return "swiglu_oai", float(experts.alpha), float(experts.limit)
        raise UnsupportedActivationError(f"{type(experts).__name__}._apply_gate is a custom gate the fused MoE op "
                                         f"does not implement")
    act_fn = getattr(experts, "act_fn", None)
    if act_fn is None:
        raise UnsupportedActivationError(f"{type(experts).__name__} has no act_fn to read the activation from")
    return activation_of_module(act_fn), SWIGLU_ALPHA, SWIGLU_LIMIT


def routing_weights(hidden_states: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
    """The routing weights as the op takes them, unrounded: a router's fp32 scores stay fp32 (the kernels
    apply them in fp32, as transformers' eager experts do) rather than being cast to a 16-bit model dtype."""
    if top_k_weights.dtype == hidden_states.dtype:
        return top_k_weights
    return top_k_weights.to(torch.float64 if hidden_states.dtype == torch.float64 else torch.float32)


def slab_moe(slab, hidden: torch.Tensor, slots: torch.Tensor, top_k_weights: torch.Tensor, backend: str,
             activation: str, alpha: float = SWIGLU_ALPHA, limit: float = SWIGLU_LIMIT) -> torch.Tensor:
    """The slab MoE, the one experts call of both forwards (``SlabExperts`` and ``forward.BatchedModel``):
    ``hidden [T, H]`` through the experts at ``slots [T, K]`` (slot-table ids) weighted by ``top_k_weights``, with
    the slab's gating, expert biases (``b1``/``b2``) and compressed deltas, the given activation (``alpha``/``limit``
    for the clamped SwiGLU) on ``backend``; the Triton path uses the slab's preallocated workspace.

    Offloaded experts (``slab.host_tier``) are paged into the cache first; when one call needs more of them than
    the cache holds (a mixed batch reads variants x experts of a layer) the tokens run in chunks that fit."""
    weights = routing_weights(hidden, top_k_weights)
    tier = slab.host_tier
    chunks = None if tier is None else tier.split(slots)
    if chunks is None:
        return _fused(slab, hidden, slots if tier is None else tier.translate(slots), weights, backend, activation,
                      alpha, limit)
    out = torch.empty_like(hidden)
    for rows in chunks:
        out[rows] = _fused(slab, hidden[rows], tier.translate(slots[rows]), weights[rows], backend, activation,
                           alpha, limit)
    return out


def _fused(slab, hidden, slots, weights, backend, activation, alpha, limit):
    workspace = slab.workspace(*slots.shape) if backend == "triton" else None
    return ops.fused_moe(hidden, slots, weights, slab.w1, slab.w2, slab.gated, backend=backend, check_slots=False,
                         workspace=workspace, activation=activation, alpha=alpha, limit=limit, b1=slab.b1, b2=slab.b2,
                         deltas=slab.deltas)


class SlabExperts(nn.Module):
    """An experts module whose weights live in a shared ExpertSlab, found through a SlotTable.

    Accepts both call conventions: Mixtral's ``(hidden, top_k_index, top_k_weights)`` and
    Switch's ``(hidden, one_hot_selected [T,1,E], router_probs [T,1])``.

    ``activation`` is the model's (``Variant.activation``, a config's ``hidden_act``, or
    ``torch_moe.activation_of_module`` of the experts module it replaces); None = SiLU for a gated
    slab, ReLU otherwise. ``alpha``/``limit``: the clamped SwiGLU's (``"swiglu_oai"``) parameters.
    Differentiable with respect to the hidden states and routing weights (the slab is not a parameter).
    """

    def __init__(self, slab, table, layer: int, active: ActiveVariant, num_experts: int, backend=None,
                 activation: str | None = None, alpha: float = SWIGLU_ALPHA, limit: float = SWIGLU_LIMIT):
        super().__init__()
        self.slab, self.table, self.layer, self.active = slab, table, layer, active
        # Resolved once: the slab's device fixes it, and the hot path need not re-check per call.
        self.num_experts, self.backend = num_experts, ops.choose_backend(slab.device, backend)
        self.activation = resolve_activation(activation, slab.gated)  # an unsupported one raises here
        check_activation_args(self.activation, alpha, limit)
        self.alpha, self.limit = float(alpha), float(limit)

    def forward(self, hidden_states, top_k_index, top_k_weights):
        if top_k_index.dim() == 3:  # Switch: one-hot dispatch mask, zero row = dropped by capacity
            top_k_weights = top_k_weights * top_k_index.sum(-1).to(top_k_weights.dtype)
            top_k_index = top_k_index.argmax(-1)
        if top_k_index.shape[-1] > self.num_experts:
            raise ValueError(f"top-k {top_k_index.shape[-1]} exceeds the {self.num_experts} experts of layer {self.layer}")
        slots = self.table.resolve(self.layer, top_k_index, self.active.value)
        return slab_moe(self.slab, hidden_states, slots, top_k_weights, self.backend, self.activation, self.alpha,
                        self.limit)

    def extra_repr(self) -> str:
        return (f"layer={self.layer}, slab_slots={self.slab.num_slots}, gated={self.slab.gated}, "
                f"activation={self.activation}, bias={self.slab.has_bias}")
