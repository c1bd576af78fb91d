"""The core experts layer: ``SlabExperts`` reads a shared ExpertSlab through a SlotTable.

``ActiveVariant`` is the table row every SlabExperts of one model reads; ``moe_layer_prefixes``
finds the MoE blocks of a Mixtral or SwitchTransformers model in checkpoint order.
"""

from __future__ import annotations

from torch import nn

from . import ops


class ActiveVariant:
    """The variant every SlabExperts of one model reads: a row of the slot table.

    ``value`` is an int, or an int tensor ``[T]`` of per-token variant ids for a mixed batch.
    Shared by all layers so a switch flips them together.
    """

    def __init__(self, value=0):
        self.value = value


def moe_layer_prefixes(model: nn.Module) -> list[str]:
    """Module names of the MoE blocks in checkpoint order (the ``layer`` index of the table)."""
    names = []
    for name, module in model.named_modules():
        kind = type(module).__name__
        if kind.endswith("SparseMoeBlock") or kind == "SwitchTransformersSparseMLP":
            names.append(name)
    return names


class SlabExperts(nn.Module):
    """An experts module whose weights live in a shared ExpertSlab, found through a SlotTable.

    Accepts both call conventions: Mixtral's ``(hidden, top_k_index, top_k_weights)`` and
    Switch's ``(hidden, one_hot_selected [T,1,E], router_probs [T,1])``.
    """

    def __init__(self, slab, table, layer: int, active: ActiveVariant, num_experts: int, backend=None):
        super().__init__()
        self.slab, self.table, self.layer, self.active = slab, table, layer, active
        # Resolved once: the slab's device fixes it, and the hot path need not re-check per call.
        self.num_experts, self.backend = num_experts, ops.choose_backend(slab.device, backend)

    def forward(self, hidden_states, top_k_index, top_k_weights):
        if top_k_index.dim() == 3:  # Switch: one-hot dispatch mask, zero row = dropped by capacity
            top_k_weights = top_k_weights * top_k_index.sum(-1).to(top_k_weights.dtype)
            top_k_index = top_k_index.argmax(-1)
        if top_k_index.shape[-1] > self.num_experts:
            raise ValueError(f"top-k {top_k_index.shape[-1]} exceeds the {self.num_experts} experts of layer {self.layer}")
        slots = self.table.resolve(self.layer, top_k_index, self.active.value)
        if self.slab.host_tier is not None:
            slots = self.slab.host_tier.translate(slots)
        workspace = self.slab.workspace(*slots.shape) if self.backend == "triton" else None
        return ops.fused_moe(hidden_states, slots, top_k_weights.to(hidden_states.dtype), self.slab.w1, self.slab.w2,
                             self.slab.gated, backend=self.backend, check_slots=False, workspace=workspace)

    def extra_repr(self) -> str:
        return f"layer={self.layer}, slab_slots={self.slab.num_slots}, gated={self.slab.gated}"
