"""MultiVariantModel: several variants of one MoE model served from one slab and one model skeleton.

The skeleton is the transformers model class of the family, built without expert weights: its
experts modules are ``SlabExperts`` reading the shared slab through the slot table, and its
parameters (all non-expert) are the active set of the ``NonExpertStore``. So ``forward`` and
``generate`` are transformers' own (KV cache, EOS, sampling), and switching variant is a store
switch plus a table-row change.

Threads: every method may be called from any thread. A request (``forward``/``generate``) holds the
store's request lock from start to end, and a flip needs it too, so a request sees one variant's weights,
whole; ``prefetch`` from another thread only copies into the staging set, which no request reads (see
``reconfig`` for the ownership rule). The variant is an argument of every request: what is "active" is
a cache, never an input.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Mapping

import torch
from torch import nn

from . import plan as plan_mod
from .checkpoint import VariantSet
from .errors import RequestError
from .experts import ActiveVariant, SlabExperts, moe_layer_prefixes
from .families import FAMILIES, get_family
from .reconfig import NonExpertStore

class _ModelClasses(Mapping):
    """family name -> (transformers config class, model class), resolved on access (``families.Family.classes``)."""

    def __getitem__(self, family):
        return get_family(family).classes()

    def __iter__(self):
        return iter(FAMILIES)

    def __len__(self):
        return len(FAMILIES)


MODEL_CLASSES = _ModelClasses()


def new_tokens(out: torch.Tensor, family: str, prompt_len: int) -> torch.Tensor:
    """The generated ids of a transformers ``generate`` output: Switch returns the decoder sequence
    (after its start token), decoder-only families prompt + continuation."""
    return get_family(family).new_tokens(out, prompt_len)


@torch.inference_mode()
def hf_generate(model, family: str, input_ids, max_new_tokens=25, eos_token_id=None, do_sample=False,
                temperature=1.0, top_p=1.0, **kwargs):
    """transformers' generate with the settings every system here uses (greedy unless ``do_sample``;
    pad = the config's pad id, else the (first) EOS, else 0); returns the new token ids only."""
    input_ids = input_ids.to(next(model.parameters()).device)
    if kwargs.get("attention_mask") is None:  # no padding here: without a mask transformers drops prompt pad ids
        kwargs["attention_mask"] = torch.ones_like(input_ids)
    pad = model.config.pad_token_id
    if pad is None:  # an EOS list (as configs spell several) pads with its first id
        pad = eos_token_id[0] if isinstance(eos_token_id, (list, tuple)) and eos_token_id else eos_token_id
    gen = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, eos_token_id=eos_token_id,
               pad_token_id=0 if pad is None else pad, **kwargs)
    if do_sample:
        gen.update(temperature=temperature, top_p=top_p)
    return new_tokens(model.generate(input_ids=input_ids, **gen), family, input_ids.shape[1])


def build_skeleton(variant_set: VariantSet, slab, table, active: ActiveVariant, device, dtype, backend=None) -> nn.Module:
    """The family's transformers model with slab-backed experts and uninitialised non-expert parameters."""
    adapter = variant_set.adapter
    config = adapter.hf_config(variant_set[0].config)
    with torch.device("meta"):
        model = adapter.classes()[1](config)
    layers = moe_layer_prefixes(model)
    if layers != variant_set.moe_layers:
        raise ValueError(f"the {variant_set.family} model's MoE blocks {layers} do not match the checkpoint's "
                         f"{variant_set.moe_layers}")
    for i, name in enumerate(layers):
        model.get_submodule(name).experts = SlabExperts(slab, table, i, active, variant_set.num_experts, backend,
                                                        activation=variant_set.activation, alpha=variant_set.alpha,
                                                        limit=variant_set.limit)
    _checkpoint_buffers_as_parameters(model, set(variant_set[0].non_expert_names()))
    model = model.to_empty(device=device).to(dtype)
    _keep_fp32(model, dtype)
    # Non-persistent buffers (rotary frequencies) were lost on the meta device: rebuild those modules.
    for name, module in list(model.named_modules()):
        if hasattr(module, "inv_freq"):
            parent, _, child = name.rpartition(".")
            fresh = type(module)(module.config).to(device)
            setattr(model.get_submodule(parent) if parent else model, child, fresh)
    model.tie_weights()
    return model.eval()


def _checkpoint_buffers_as_parameters(model: nn.Module, names: set) -> None:
    """Persistent buffers that the checkpoint stores per variant (DeepSeek-V3's router correction bias) become
    frozen parameters, so the non-expert store swaps them with the rest of a variant's set."""
    for mod_name, module in model.named_modules():
        for b_name, buf in list(module._buffers.items()):
            full = f"{mod_name}.{b_name}" if mod_name else b_name
            if buf is not None and full in names and b_name not in module._non_persistent_buffers_set:
                del module._buffers[b_name]
                module.register_parameter(b_name, nn.Parameter(buf, requires_grad=False))


def _keep_fp32(model: nn.Module, dtype) -> None:
    """Parameters transformers keeps in fp32 whatever the model dtype (``_keep_in_fp32_modules(_strict)``,
    e.g. DeepSeek-V3's router), kept in fp32 here too, so a 16-bit model routes as transformers' does."""
    if dtype not in (torch.float16, torch.bfloat16):
        return
    keep = list(getattr(model, "_keep_in_fp32_modules_strict", None) or []) + \
        list(getattr(model, "_keep_in_fp32_modules", None) or [])
    if not keep:
        return
    pattern = re.compile("|".join(re.escape(k) for k in keep))
    for name, p in model.named_parameters():
        if pattern.search(name):
            p.data = p.data.float()


class MultiVariantModel:
    """Serve ``variant_set``'s variants from one slab; see ``from_pretrained``."""

    def __init__(self, variant_set: VariantSet, plan, device="cpu", dtype=torch.float32, resident: int = 0,
                 backend=None):
        self.variant_set, self.plan = variant_set, plan
        self.names, self.family = list(variant_set.names), variant_set.family
        self.device, self.dtype = torch.device(device), dtype
        self.slab, self.table = plan_mod.load_slab(plan, variant_set, device=self.device, dtype=dtype)
        self.active = ActiveVariant(0)
        self.model = build_skeleton(variant_set, self.slab, self.table, self.active, self.device, dtype, backend)
        self.lock = threading.RLock()
        self.store = NonExpertStore(self.model, variant_set, self.device, resident=resident,
                                    on_switch=self._select_row, lock=self.lock)

    @classmethod
    def from_pretrained(cls, dirs, names=None, budget=None, share=None, plan=None, metric="l2", scope="global",
                        representative="anchor", device="cpu", dtype=torch.float32, resident: int = 0,
                        backend=None, seed: int = 0, offload: bool = False, check_finite: bool = True):
        """Load variant directories, plan the slab (or take ``plan``: a Plan or a JSON path), build the model.

        Without ``budget``/``share``/``plan`` every variant keeps its own experts, except exact duplicates.
        ``offload``: experts beyond the budget live in host memory and are paged in on use.
        ``check_finite``: refuse NaN/Inf weights as they are read (CheckpointError names file, tensor, count).
        """
        variant_set = dirs if isinstance(dirs, VariantSet) else \
            VariantSet.from_dirs(dirs, names=names, check_finite=check_finite)
        if isinstance(plan, (str, bytes)) or hasattr(plan, "__fspath__"):
            plan = plan_mod.Plan.from_json(plan, variant_set)
        elif plan is None:
            if budget is None and share is None:
                share = 0.0
            plan = plan_mod.make_plan(variant_set, budget_bytes=budget,
                                      share=share, metric=metric, scope=scope, representative=representative,
                                      seed=seed, dtype=dtype, offload=offload)
        return cls(variant_set, plan, device=device, dtype=dtype, resident=resident, backend=backend)

    def _select_row(self, v: int) -> None:
        self.active.value = v

    # -- switching (Algorithm 2) ------------------------------------------------------------
    @property
    def active_variant(self) -> str:
        return self.names[self.store.active_variant]

    def prefetch(self, variant) -> None:
        """Start copying ``variant``'s non-expert weights while the current request still runs; safe from any
        thread (it never changes what a running request reads). Kept until used or replaced."""
        self.store.prefetch(variant)

    def activate(self) -> float:
        """Flip to the pending copy, if any (after the running request); returns seconds waited for the copy."""
        return self.store.activate()

    def use(self, variant) -> None:
        """Make ``variant`` active now (after the running request); requests do this themselves."""
        self.store.use(variant)

    # -- compute ----------------------------------------------------------------------------
    @torch.inference_mode()
    def forward(self, variant, input_ids, decoder_input_ids=None, **kwargs):
        """Logits of ``variant`` for ``input_ids`` (Switch: encoder ids, plus ``decoder_input_ids``)."""
        with self.lock:
            self.use(variant)
            input_ids = input_ids.to(self.device)
            if self.variant_set.adapter.encoder_decoder:
                if decoder_input_ids is None:
                    raise RequestError("Switch variants need decoder_input_ids for a forward pass")
                return self.model(input_ids=input_ids, decoder_input_ids=decoder_input_ids.to(self.device),
                                  **kwargs).logits
            return self.model(input_ids=input_ids, **kwargs).logits

    __call__ = forward

    @torch.inference_mode()
    def outputs(self, variant, **inputs):
        """transformers' whole output of ``variant`` for ``inputs`` (tensors on the model's device; caches and
        encoder outputs included), for callers that keep a cache per sequence (``sequential_forward``)."""
        with self.lock:
            self.use(variant)
            return self.model(**inputs)

    @torch.inference_mode()
    def generate(self, variant, input_ids, max_new_tokens: int = 25, eos_token_id=None, do_sample: bool = False,
                 temperature: float = 1.0, top_p: float = 1.0, attention_mask=None, **kwargs):
        """Prefill + decode with a KV cache (transformers' generate) as ``variant``; returns new token ids."""
        try:
            n = None if isinstance(max_new_tokens, bool) else int(max_new_tokens.__index__())
        except (AttributeError, TypeError):
            n = None
        if n is None or n < 1:
            raise RequestError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
        max_new_tokens = n
        with self.lock:
            self.use(variant)
            mask = None if attention_mask is None else attention_mask.to(self.device)
            return hf_generate(self.model, self.family, input_ids, max_new_tokens=max_new_tokens,
                               eos_token_id=eos_token_id, do_sample=do_sample, temperature=temperature,
                               top_p=top_p, attention_mask=mask, **kwargs)

    def memory_footprint(self) -> dict:
        return {"slab_bytes": self.slab.nbytes, "non_expert_device_bytes": self.store.device_nbytes,
                "total_device_bytes": self.slab.nbytes + self.store.device_nbytes}
