"""Drop-in integration with transformers: slab-backed experts modules and the ``multimoe`` experts
implementation.

Two routes:

* ``patch(model, slab, table, variant)`` replaces every experts module of a loaded model of any supported
  family (``multimoe_rt.families``: Mixtral, Qwen3-MoE, OLMoE, Qwen2-MoE, DeepSeek-V3, GPT-OSS, Switch) with a
  ``SlabExperts`` that reads the slab through the table (the
  original expert weights are freed); the rest of the model and ``generate()`` are untouched.
* ``register()`` adds ``"multimoe"`` to transformers' ``ExpertsInterface``, so
  ``from_pretrained(..., experts_implementation="multimoe")`` runs our fused MoE op on the
  model's own stacked expert weights (the table is the identity there).

Both apply the module's own activation (``experts_activation``: SiLU, GELU exact or tanh, ReLU, GPT-OSS's
clamped SwiGLU); one the op lacks raises, never a silent SiLU. Both are differentiable (training,
gradient checkpointing): gradients reach the hidden states and routing weights, and with
``experts_implementation="multimoe"`` the expert weights too.
"""

from __future__ import annotations

from torch import nn

from .. import families, ops
from ..experts import ActiveVariant, SlabExperts, experts_activation, moe_layer_prefixes, routing_weights


def patch(model: nn.Module, slab, table, variant=0, backend=None, active: ActiveVariant | None = None) -> ActiveVariant:
    """Replace the experts of ``model`` with slab-backed modules reading ``table[variant]``.

    Returns the ActiveVariant holder: set ``.value`` to serve another table row. Each layer keeps the
    activation its replaced experts module applied.
    """
    layers = moe_layer_prefixes(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no MoE blocks of a supported family to patch (supported model "
                         f"types: {families.supported()}; blocks: {', '.join(sorted(families.BLOCK_CLASSES))})")
    if len(layers) != table.shape[1]:
        raise ValueError(f"the model has {len(layers)} MoE layers but the slot table has {table.shape[1]}")
    table.validate(slab)
    active = active or ActiveVariant(variant)
    # Read every layer's activation before replacing any, so an unsupported one leaves the model untouched.
    acts = [experts_activation(model.get_submodule(name).experts) for name in layers]
    for layer, (name, (activation, alpha, limit)) in enumerate(zip(layers, acts)):
        block = model.get_submodule(name)
        num_experts = table.shape[2]
        block.experts = SlabExperts(slab, table, layer, active, num_experts, backend, activation=activation,
                                    alpha=alpha, limit=limit)
    return active


def multimoe_experts_forward(self, hidden_states, top_k_index, top_k_weights):
    """``ExpertsInterface`` entry: our fused op on the module's own ``gate_up_proj`` (or ``up_proj``
    without a gate) and ``down_proj``, with the module's activation and biases; differentiable.

    Experts stored another way (GPT-OSS: ``is_transposed``, gate and up interleaved, ``has_bias``) are read as
    stored: the op takes transposed views and ``interleaved=True``, so no weight is copied per call (the copies
    made a GPT-OSS training step 1.66x transformers' ``grouped_mm``; ``benchmarks/train_step.py``)."""
    if getattr(self, "has_post_expert_norm", False) or getattr(self, "_is_expert_parallel", False):
        raise NotImplementedError(f"experts_implementation='multimoe' supports neither a post-expert norm nor "
                                  f"expert parallelism; {type(self).__name__} uses one")
    activation, alpha, limit = experts_activation(self)
    w1 = self.gate_up_proj if self.has_gate else self.up_proj
    w2 = self.down_proj
    b1 = b2 = None
    if self.has_bias:
        b1, b2 = (self.gate_up_proj_bias if self.has_gate else self.up_proj_bias), self.down_proj_bias
    if self.is_transposed:  # [E, H, N1] and [E, I, H]: views in the op's [E, N1, H] / [E, H, I] order
        w1, w2 = w1.transpose(1, 2), w2.transpose(1, 2)
    return ops.fused_moe(hidden_states, top_k_index, routing_weights(hidden_states, top_k_weights), w1, w2,
                         gated=self.has_gate, check_slots=False, activation=activation, alpha=alpha, limit=limit,
                         b1=b1, b2=b2, interleaved=self.has_gate and not self.is_concatenated)


_registered = False


def register() -> bool:
    """Register ``multimoe`` in transformers' ExpertsInterface (idempotent); False where this
    transformers has none. Called explicitly (``multimoe_rt.register_experts_implementation``)
    and by ``MultiVariantModel.from_pretrained``; importing this module registers nothing."""
    global _registered
    if _registered:
        return True
    try:
        from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
    except ImportError:
        return False
    ALL_EXPERTS_FUNCTIONS.register("multimoe", multimoe_experts_forward)
    _registered = True
    return True
