"""Model families: the one place that knows, per transformers model type, where the MoE blocks and expert
tensors are, which tensors are experts, how the router picks them, the activation and the config fields.

Everything else asks a ``Family`` (``family_for_config``, ``get_family``) instead of testing names:
the loader (``checkpoint.Variant`` builds its index with ``Family.index``), the plan (family name,
gated), ``MultiVariantModel`` (the transformers classes), ``patch`` (``moe_layer_prefixes`` finds the
blocks by ``block_classes``) and the batched forward (``Family.batched``: which attention extras and
router it needs).

The slab's layout is the same for every family, so a fine-tune of any of them consolidates the same way:

    w1[slot] = [gate rows; up rows]  [2I, H]   (ungated, Switch: [I, H])
    w2[slot] = down                  [H, I]
    b1[slot], b2[slot]               [2I], [H]  only for families with expert biases (GPT-OSS)

A family whose checkpoint stores experts differently is converted once, at read time, by its
``ExpertSource`` (GPT-OSS: ``gate_up_proj [E, H, 2I]`` with gate and up interleaved along the last axis
is de-interleaved and transposed, ``down_proj [E, I, H]`` transposed). Plans record the family, and
expert hashes are taken of the converted tensors, so a plan says what the slab holds.

Supported families (``FAMILIES``):

  family        model_type           experts per MoE layer, in the file            router
  mixtral       mixtral              experts.gate_up_proj [E,2I,H], down_proj     softmax, top-k, renormalised
                                     or block_sparse_moe.experts.{e}.w1/w3/w2
  qwen3_moe     qwen3_moe            fused, or experts.{e}.gate/up/down_proj      softmax, top-k, norm_topk_prob
  olmoe         olmoe                fused, or per-expert (as qwen3_moe)          softmax, top-k, norm_topk_prob
  qwen2_moe     qwen2_moe            fused, or per-expert; + shared_expert and     softmax, top-k, norm_topk_prob
                                     shared_expert_gate (non-expert, per variant)
  deepseek_v3   deepseek_v3          fused, or per-expert; + shared_experts        sigmoid + correction bias,
                                     (non-expert); first_k_dense_replace dense     grouped top-k, scaled
  gpt_oss       gpt_oss              experts.gate_up_proj [E,H,2I] interleaved,    top-k of logits (+ bias),
                                     down_proj [E,I,H], both with biases           softmax over the k
  switch        switch_transformers  experts.expert_{e}.wi/wo (encoder+decoder)    top-1 (capacity)

Shared experts (Qwen2-MoE, DeepSeek-V3) are dense and always on: they stay per-variant non-expert
tensors (swapped with attention on a switch, stacked per set in the batched forward). See README
("Shared experts") for the measurement behind that choice.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from .errors import CheckpointError
from .torch_moe import SWIGLU_ALPHA, SWIGLU_LIMIT, UnsupportedActivationError, resolve_activation


class UnknownFamilyError(CheckpointError):
    """A config whose ``model_type`` no family adapter covers; the message lists the supported ones."""


def _fmt(shape) -> str:
    return str(list(shape))


# ---------------------------------------------------------------------------------------------------
# Where one MoE layer's experts are in a checkpoint, and how expert e is read in the slab's layout
# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FusedExperts:
    """transformers-5 naming: one tensor per projection for all experts of a layer.

    ``[E, 2I, H]`` gate_up (gate rows then up rows) and ``[E, H, I]`` down; with ``transposed`` (GPT-OSS)
    ``[E, H, 2I]`` with gate and up interleaved along the last axis (``interleaved``) and ``[E, I, H]``."""
    gate_up: str
    down: str
    transposed: bool = False
    interleaved: bool = False
    gate_up_bias: str | None = None
    down_bias: str | None = None

    def names(self) -> set:
        return {n for n in (self.gate_up, self.down, self.gate_up_bias, self.down_bias) if n}

    def read(self, variant, e: int):
        w1 = variant._finite(self.gate_up, variant._slice(self.gate_up, e), e)
        w2 = variant._finite(self.down, variant._slice(self.down, e), e)
        if self.transposed:
            w1, w2 = w1.t(), w2.t()
        if self.interleaved:
            w1 = torch.cat([w1[0::2], w1[1::2]])
        return w1.contiguous(), w2.contiguous()

    def read_bias(self, variant, e: int):
        if self.gate_up_bias is None:
            return None
        b1 = variant._finite(self.gate_up_bias, variant._slice(self.gate_up_bias, e), e)
        b2 = variant._finite(self.down_bias, variant._slice(self.down_bias, e), e)
        if self.interleaved:
            b1 = torch.cat([b1[0::2], b1[1::2]])
        return b1.contiguous(), b2.contiguous()


@dataclass(frozen=True)
class PerExpert:
    """One tensor per expert and projection (published Mixtral/Qwen/OLMoE/DeepSeek checkpoints, Switch):
    ``gate``/``up``/``down`` are name patterns with ``{e}``; ``up`` None for ungated experts."""
    gate: str
    up: str | None
    down: str
    num_experts: int

    def names(self) -> set:
        out = set()
        for e in range(self.num_experts):
            out |= {p.format(e=e) for p in (self.gate, self.up, self.down) if p}
        return out

    def read(self, variant, e: int):
        w1 = variant._read(self.gate.format(e=e))
        if self.up is not None:
            w1 = torch.cat([w1, variant._read(self.up.format(e=e))], dim=0)
        return w1, variant._read(self.down.format(e=e))

    def read_bias(self, variant, e: int):
        return None


# ---------------------------------------------------------------------------------------------------
# Routers (the batched forward's; the transformers skeleton runs the model's own router modules)
# ---------------------------------------------------------------------------------------------------
def route_softmax_topk(logits: torch.Tensor, top_k: int, normalize: bool, out_dtype=None):
    """Mixtral / Qwen / OLMoE: softmax in fp32, top-k, optionally renormalised over the k.
    ``out_dtype``: the routing weights' dtype (Mixtral keeps fp32; the Qwen family casts to the logits')."""
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    w, ids = torch.topk(probs, top_k, dim=-1)
    if normalize:
        w = w / w.sum(-1, keepdim=True)
    return (w if out_dtype is None else w.to(out_dtype)), ids


def route_grouped_sigmoid(logits: torch.Tensor, correction: torch.Tensor, top_k: int, n_group: int, topk_group: int,
                          normalize: bool, scale: float):
    """DeepSeek-V3: sigmoid scores; experts are chosen on score + ``correction`` (``e_score_correction_bias``, per
    token here since variants differ) within the ``topk_group`` groups whose two best corrected scores sum highest,
    but weighted by the uncorrected score, optionally renormalised, times ``scale`` (``routed_scaling_factor``).
    ``logits`` fp32, as transformers computes them; weights stay fp32."""
    scores = logits.sigmoid()
    choice = scores + correction
    T, E = choice.shape
    group_scores = choice.view(T, n_group, E // n_group).topk(2, dim=-1)[0].sum(-1)
    group_idx = torch.topk(group_scores, k=topk_group, dim=-1, sorted=False)[1]
    group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
    score_mask = group_mask.unsqueeze(-1).expand(T, n_group, E // n_group).reshape(T, E)
    ids = torch.topk(choice.masked_fill(~score_mask.bool(), float("-inf")), k=top_k, dim=-1, sorted=False)[1]
    w = scores.gather(1, ids)
    if normalize:
        w = w / (w.sum(-1, keepdim=True) + 1e-20)
    return w * scale, ids


def route_topk_softmax(logits: torch.Tensor, top_k: int):
    """GPT-OSS: top-k of the (biased) logits, softmax over those k in the logits' dtype."""
    top, ids = torch.topk(logits, top_k, dim=-1)
    return torch.softmax(top, dim=-1, dtype=top.dtype), ids


# ---------------------------------------------------------------------------------------------------
# The adapter
# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Batched:
    """What the batched mixed-variant forward (``forward.BatchedModel``) needs from a decoder family.

    ``attention``: ``"standard"`` (multi-head / grouped-query, ``attention.StandardAttention``) or ``"mla"``
    (DeepSeek's multi-head latent attention, ``mla.LatentAttention``, with its own KV-cache layout).
    ``qk_norm``: None, ``"head"`` (RMSNorm over each head's dim, Qwen3) or ``"full"`` (over the whole
    projection, OLMoE). ``qkv_bias`` / ``o_bias``: attention projection biases (Qwen2: q/k/v; GPT-OSS: all
    four), present only where the config's ``bias_key`` is true when one is named (GPT-OSS and DeepSeek:
    ``attention_bias``).
    ``sinks``: one learned logit per head in every softmax's denominator (GPT-OSS). Per-layer attention windows
    come from the config's ``layer_types`` (else ``sliding_window`` for every layer).
    ``shared_expert``: a dense shared MLP, ``"sigmoid_gate"`` (scaled by sigmoid(x @ gate), Qwen2) or ``"plain"``
    (added as is, DeepSeek). ``router``: ``"mixtral"``, ``"qwen"`` (norm_topk_prob from the config, weights cast to
    the model dtype), ``"grouped_sigmoid"`` (DeepSeek-V3, ``route_grouped_sigmoid``) or ``"topk_softmax"``
    (GPT-OSS, ``route_topk_softmax``); ``router_bias``: the router's second tensor (``Family.router_tensors[1]``:
    GPT-OSS's logit bias, DeepSeek's score correction) is stacked as ``router_bias``.
    ``fp32_parts``: stacked tensors transformers keeps in fp32 whatever the model dtype (DeepSeek's router,
    GPT-OSS's norms); ``norm_scale_fp32``: the RMSNorm multiplies by its weight before casting back (GPT-OSS)."""
    router: str = "mixtral"
    attention: str = "standard"
    bias_key: str | None = None  # config key that turns the attention biases on/off (transformers' default if absent)
    qk_norm: str | None = None
    qkv_bias: bool = False
    o_bias: bool = False
    sinks: bool = False
    shared_expert: str | None = None
    router_bias: bool = False
    fp32_parts: tuple = ()
    norm_scale_fp32: bool = False

    def biases(self, cfg) -> bool:
        """Whether this config's attention projections carry biases (``cfg``: the transformers config)."""
        return self.bias_key is None or bool(getattr(cfg, self.bias_key))


@dataclass(frozen=True)
class Family:
    """One model family: data (config keys, tensor names, transformers classes) plus the few methods that read it.

    A new decoder family whose experts follow transformers 5's fused layout is one more entry in ``FAMILIES``;
    only a family with a different layer placement, naming or router needs a new ``layer_rule``, a subclass
    (``SwitchFamily``) or, for the batched forward, a ``Batched`` description."""
    name: str                      # what plans and VariantSet.family record
    model_types: tuple             # config.json "model_type" values
    config_class: str              # transformers class names, resolved lazily
    model_class: str
    block_classes: tuple           # transformers class names of the MoE blocks (patch finds them by these)
    intermediate_keys: tuple       # config key of one routed expert's intermediate size
    experts_keys: tuple = ("num_local_experts", "num_experts")
    top_k_keys: tuple = ("num_experts_per_tok",)  # () = top-1
    hidden_keys: tuple = ("hidden_size",)
    activation_key: str = "hidden_act"
    default_activation: str = "silu"
    gated: bool = True
    clamped_swiglu: bool = False   # GPT-OSS: activation is swiglu_oai(alpha, limit) whatever hidden_act says
    encoder_decoder: bool = False
    router_tensors: tuple = ("gate.weight",)   # under the block, and their shapes' kinds ("EH" or "E")
    router_shapes: tuple = ("EH",)
    fused: tuple | None = ("experts.gate_up_proj", "experts.down_proj")
    fused_transposed: bool = False
    expert_bias: bool = False
    per_expert: tuple | None = ("experts.{e}.gate_proj.weight", "experts.{e}.up_proj.weight",
                                "experts.{e}.down_proj.weight")
    legacy_blocks: tuple = ()      # other names of the block in published files (Mixtral: block_sparse_moe)
    layer_rule: str = "all"        # which decoder layers are MoE: all | qwen (decoder_sparse_step,
                                   # mlp_only_layers) | deepseek (first_k_dense_replace)
    shared_expert: str | None = None  # module name of a dense shared expert under the block, if any
    batched: Batched | None = None  # None: the batched forward does not cover this family

    # -- transformers classes --------------------------------------------------------------------
    def classes(self):
        """``(config class, model class)`` from transformers (imported here, on first use)."""
        import transformers
        return getattr(transformers, self.config_class), getattr(transformers, self.model_class)

    def hf_config(self, config: dict):
        return self.classes()[0].from_dict(dict(config))

    # -- config ----------------------------------------------------------------------------------
    def cfg(self, config: dict, keys, where="config.json"):
        for k in keys:
            if config.get(k) is not None:
                return config[k]
        raise CheckpointError(f"{where}: missing config key '{keys[0]}' for family {self.name}")

    def moe_layer_indices(self, config: dict, where="config.json") -> list[int]:
        """Decoder layers holding an MoE block, in order (their ordinal is the slot table's layer)."""
        n = self.cfg(config, ("num_hidden_layers",), where)
        if self.layer_rule == "qwen":
            step = config.get("decoder_sparse_step") or 1
            dense = set(config.get("mlp_only_layers") or [])
            experts = self.cfg(config, self.experts_keys, where)
            return [i for i in range(n) if i not in dense and experts > 0 and (i + 1) % step == 0]
        if self.layer_rule == "deepseek":
            first = config.get("first_k_dense_replace") or 0
            return list(range(first, n))
        return list(range(n))

    def block_prefix(self, layer: int) -> str:
        return f"model.layers.{layer}.mlp"

    def moe_layers(self, config: dict, where="config.json") -> list[str]:
        return [self.block_prefix(i) for i in self.moe_layer_indices(config, where)]

    def activation(self, config: dict, where="config.json") -> tuple[str, float, float]:
        """``(activation, alpha, limit)`` of the experts, as ``ops.fused_moe`` takes them."""
        if self.clamped_swiglu:
            return ("swiglu_oai", float(config.get("swiglu_alpha", SWIGLU_ALPHA)),
                    float(config.get("swiglu_limit", SWIGLU_LIMIT)))
        act = config.get(self.activation_key) or self.default_activation
        try:
            name = resolve_activation(act, self.gated)
        except UnsupportedActivationError as e:
            raise CheckpointError(f"{where}: {self.activation_key} {act!r}: {e}") from None
        if name == "swiglu_oai":
            raise CheckpointError(f"{where}: {self.activation_key} {act!r}: not an activation of {self.name}")
        return name, SWIGLU_ALPHA, SWIGLU_LIMIT

    # -- checkpoint index --------------------------------------------------------------------------
    def index(self, v) -> None:
        """Fill ``v`` (a ``checkpoint.Variant``) with sizes, MoE layers, expert sources and the non-expert
        name map (transformers-5 name -> name in the file). Raises CheckpointError naming what is wrong."""
        where = v.path / "config.json"
        c = v.config
        v.activation, v.alpha, v.limit = self.activation(c, where)
        H, I = self.cfg(c, self.hidden_keys, where), self.cfg(c, self.intermediate_keys, where)
        E = self.cfg(c, self.experts_keys, where)
        K = self.cfg(c, self.top_k_keys, where) if self.top_k_keys else 1  # Switch: top-1
        v.hidden_size, v.intermediate_size, v.num_experts, v.top_k = H, I, E, K
        v.vocab_size, v.gated = self.cfg(c, ("vocab_size",), where), self.gated
        v.moe_layers = self.moe_layers(c, where)
        quantised = sorted(n for n in v._entries if n.endswith(("_scale_inv", "weight_scale", "_blocks", "_scales")))
        if quantised and not any(n.endswith("_blocks") for n in quantised):
            raise CheckpointError(f"{v.path}: tensor '{quantised[0]}': quantised weights (FP8 with block scales) are "
                                  f"not supported; dequantise the checkpoint to bf16/fp32 first")
        if not self.encoder_decoder:  # layers past num_hidden_layers (DeepSeek-V3's MTP layer): transformers skips them
            n_layers = self.cfg(c, ("num_hidden_layers",), where)
            for n in [n for n in v._entries if (m := re.match(r"model\.layers\.(\d+)\.", n)) and
                      int(m.group(1)) >= n_layers]:
                del v._entries[n]
        v._layout, expert_names = [], set()
        for i, prefix in enumerate(v.moe_layers):
            source = self._find_experts(v, prefix, i, E, H, I)
            v._layout.append(source)
            expert_names |= source.names()
        v._expert_names = expert_names
        stray = sorted(n for n in v._entries if n not in expert_names and self._looks_like_expert(n))
        if stray:
            raise CheckpointError(
                f"{v._entries[stray[0]].file}: tensor '{stray[0]}' is an expert outside the MoE layers the config "
                f"describes ({v.moe_layers})")
        v._nonexpert = {}
        for n in v._entries:
            if n not in expert_names:
                v._nonexpert[self.canonical_name(n)] = n
        self._check_nonexpert(v)

    @staticmethod
    def _looks_like_expert(name: str) -> bool:
        return re.search(r"\.experts\.", name) is not None

    def canonical_name(self, name: str) -> str:
        """The transformers-5 name of a non-expert tensor stored under a legacy block name."""
        for legacy in self.legacy_blocks:
            m = re.fullmatch(rf"model\.layers\.(\d+)\.{re.escape(legacy)}\.(.*)", name)
            if m:
                return f"model.layers.{m.group(1)}.mlp.{m.group(2)}"
        return name

    def _find_experts(self, v, prefix: str, i: int, E: int, H: int, I: int):
        n1 = 2 * I if self.gated else I
        if self.fused is not None:
            gate_up, down = (f"{prefix}.{n}" for n in self.fused)
            if gate_up in v._entries:
                if self.fused_transposed:
                    v._expect(gate_up, (E, H, n1))
                    v._expect(down, (E, I, H))
                else:
                    v._expect(gate_up, (E, n1, H))
                    v._expect(down, (E, H, I))
                biases = (None, None)
                if self.expert_bias:
                    biases = (f"{gate_up}_bias", f"{down}_bias")
                    v._expect(biases[0], (E, n1))
                    v._expect(biases[1], (E, H))
                return FusedExperts(gate_up, down, transposed=self.fused_transposed,
                                    interleaved=self.fused_transposed, gate_up_bias=biases[0], down_bias=biases[1])
        if self.per_expert is not None:
            layer_prefix, _, _ = prefix.rpartition(".")
            for block in (prefix.rpartition(".")[2],) + self.legacy_blocks:
                p = f"{layer_prefix}.{block}" if layer_prefix else block
                gate, up, down = (None if n is None else f"{p}.{n}" for n in self.per_expert)
                if gate.format(e=0) not in v._entries:
                    continue
                for e in range(E):
                    v._expect(gate.format(e=e), (I, H))
                    if up is not None:
                        v._expect(up.format(e=e), (I, H))
                    v._expect(down.format(e=e), (H, I))
                return PerExpert(gate, up, down, E)
        if self.fused is not None and f"{prefix}.{self.fused[0]}_blocks" in v._entries:
            raise CheckpointError(f"{v.path}: MoE layer {i} stores MXFP4-quantised experts "
                                  f"('{prefix}.{self.fused[0]}_blocks'/'_scales'); dequantise them first (transformers: "
                                  f"from_pretrained(..., quantization_config=Mxfp4Config(dequantize=True)), then "
                                  f"save_pretrained)")
        expected = []
        if self.fused is not None:
            shape = (E, H, n1) if self.fused_transposed else (E, n1, H)
            expected.append(f"'{prefix}.{self.fused[0]}' (expected shape {_fmt(shape)})")
        if self.per_expert is not None:
            expected.append(f"per-expert '{prefix}.{self.per_expert[0].format(e=0)}'")
        raise CheckpointError(f"{v.path}: missing tensor {' or '.join(expected)} for MoE layer {i}")

    def _check_nonexpert(self, v) -> None:
        E, H, V = v.num_experts, v.hidden_size, v.vocab_size
        for i, prefix in enumerate(v.moe_layers):
            for rel, kind in zip(self.router_tensors, self.router_shapes):
                name = f"{prefix}.{rel}"
                shape = (E, H) if kind == "EH" else (E,)
                if name not in v._nonexpert:
                    raise CheckpointError(f"{v.path}: missing tensor '{name}' (router of MoE layer {i}, "
                                          f"expected shape {_fmt(shape)})")
                e = v._entries[v._nonexpert[name]]
                if tuple(e.shape) != shape:
                    raise CheckpointError(f"{e.file}: tensor '{v._nonexpert[name]}': expected shape {_fmt(shape)}, "
                                          f"found {_fmt(e.shape)}")
        embeds = self.embedding_names()
        present = [n for n in embeds if n in v._nonexpert]
        if not present:
            raise CheckpointError(f"{v.path}: missing tensor '{embeds[0]}' (expected shape {_fmt((V, H))})")
        for n in present + [n for n in ("lm_head.weight",) if n in v._nonexpert]:
            e = v._entries[n]
            if tuple(e.shape) != (V, H):
                raise CheckpointError(f"{e.file}: tensor '{n}': expected shape {_fmt((V, H))}, found {_fmt(e.shape)}")

    def embedding_names(self) -> list[str]:
        return ["model.embed_tokens.weight"]

    def expert_state(self, prefix: str, w1: torch.Tensor, w2: torch.Tensor, b1=None, b2=None) -> dict:
        """The inverse of reading: one MoE layer's experts, stacked in the slab layout (``w1 [E, N1, H]``,
        ``w2 [E, H, I]``, biases ``[E, N1]``, ``[E, H]``), as the family's transformers-5 tensors (for writing a
        merged or converted checkpoint that ``from_pretrained`` loads)."""
        if self.fused is None:  # Switch: per-expert tensors
            gate, _, down = self.per_expert
            out = {}
            for e in range(w1.shape[0]):
                out[f"{prefix}.{gate.format(e=e)}"] = w1[e]
                out[f"{prefix}.{down.format(e=e)}"] = w2[e]
            return out
        gate_up, down = (f"{prefix}.{n}" for n in self.fused)
        if self.fused_transposed:  # GPT-OSS: interleave gate/up columns, [E, H, 2I] and [E, I, H]
            def interleave(t):
                half = t.shape[1] // 2
                out = torch.empty_like(t)
                out[:, 0::2], out[:, 1::2] = t[:, :half], t[:, half:]
                return out
            state = {gate_up: interleave(w1).transpose(1, 2).contiguous(), down: w2.transpose(1, 2).contiguous()}
            if self.expert_bias:
                state[f"{gate_up}_bias"], state[f"{down}_bias"] = interleave(b1), b2
            return state
        return {gate_up: w1, down: w2}

    # -- models ------------------------------------------------------------------------------------
    def new_tokens(self, out: torch.Tensor, prompt_len: int) -> torch.Tensor:
        """The generated ids of a transformers ``generate`` output (decoder-only: after the prompt)."""
        return out[:, prompt_len:]

    def support(self) -> dict:
        """What this family supports, for the README table and ``runtime_info``."""
        return {"loader": True, "plan": True, "model": True, "patch": True,
                "experts_interface": not self.encoder_decoder, "batched_forward": self.batched is not None,
                # biased experts (GPT-OSS) are shared or kept, never offloaded or stored as deltas
                "offload": not self.expert_bias, "deltas": not self.expert_bias}


@dataclass(frozen=True)
class SwitchFamily(Family):
    """SwitchTransformers: encoder-decoder, sparse every ``sparse_step`` blocks of each stack, ungated, top-1."""

    def moe_layers(self, config: dict, where="config.json") -> list[str]:
        n_enc = self.cfg(config, ("num_layers", "num_hidden_layers"), where)
        n_dec = config.get("num_decoder_layers") or n_enc
        out = []
        # Same placement rule as transformers' SwitchTransformersStack (sparse_step from the config counts).
        for stack, n, key, ff in (("encoder", n_enc, "num_sparse_encoder_layers", 1),
                                  ("decoder", n_dec, "num_sparse_decoder_layers", 2)):
            n_sparse = self.cfg(config, (key,), where)
            step = n // n_sparse if n_sparse > 0 else n
            for b in range(n):
                if step > 0 and (b % step == 1 or step == 1):
                    out.append(f"{stack}.block.{b}.layer.{ff}.mlp")
        return out

    def moe_layer_indices(self, config: dict, where="config.json") -> list[int]:
        return list(range(len(self.moe_layers(config, where))))

    def embedding_names(self) -> list[str]:
        return ["shared.weight", "encoder.embed_tokens.weight", "decoder.embed_tokens.weight"]

    def new_tokens(self, out: torch.Tensor, prompt_len: int) -> torch.Tensor:
        return out[:, 1:]  # the decoder sequence after its start token


FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("mixtral", ("mixtral",), "MixtralConfig", "MixtralForCausalLM", ("MixtralSparseMoeBlock",),
           intermediate_keys=("intermediate_size",),
           per_expert=("experts.{e}.w1.weight", "experts.{e}.w3.weight", "experts.{e}.w2.weight"),
           legacy_blocks=("block_sparse_moe",), batched=Batched(router="mixtral")),
    Family("qwen3_moe", ("qwen3_moe",), "Qwen3MoeConfig", "Qwen3MoeForCausalLM", ("Qwen3MoeSparseMoeBlock",),
           intermediate_keys=("moe_intermediate_size",), experts_keys=("num_experts", "num_local_experts"),
           layer_rule="qwen", batched=Batched(router="qwen", qk_norm="head")),
    Family("olmoe", ("olmoe",), "OlmoeConfig", "OlmoeForCausalLM", ("OlmoeSparseMoeBlock",),
           intermediate_keys=("intermediate_size",), experts_keys=("num_experts", "num_local_experts"),
           batched=Batched(router="qwen", qk_norm="full")),
    Family("qwen2_moe", ("qwen2_moe",), "Qwen2MoeConfig", "Qwen2MoeForCausalLM", ("Qwen2MoeSparseMoeBlock",),
           intermediate_keys=("moe_intermediate_size",), experts_keys=("num_experts", "num_local_experts"),
           layer_rule="qwen", shared_expert="shared_expert",
           batched=Batched(router="qwen", qkv_bias=True, shared_expert="sigmoid_gate")),
    Family("deepseek_v3", ("deepseek_v3",), "DeepseekV3Config", "DeepseekV3ForCausalLM", ("DeepseekV3MoE",),
           intermediate_keys=("moe_intermediate_size",), experts_keys=("n_routed_experts", "num_local_experts"),
           router_tensors=("gate.weight", "gate.e_score_correction_bias"), router_shapes=("EH", "E"),
           layer_rule="deepseek", shared_expert="shared_experts",
           batched=Batched(router="grouped_sigmoid", attention="mla", shared_expert="plain", router_bias=True,
                           bias_key="attention_bias",
                           fp32_parts=("router", "router_bias"))),
    Family("gpt_oss", ("gpt_oss",), "GptOssConfig", "GptOssForCausalLM", ("GptOssMLP",),
           intermediate_keys=("intermediate_size",), experts_keys=("num_local_experts", "num_experts"),
           clamped_swiglu=True, router_tensors=("router.weight", "router.bias"), router_shapes=("EH", "E"),
           fused_transposed=True, expert_bias=True, per_expert=None,
           batched=Batched(router="topk_softmax", qkv_bias=True, o_bias=True, bias_key="attention_bias", sinks=True,
                           router_bias=True,
                           fp32_parts=("ln1", "ln2", "norm"), norm_scale_fp32=True)),
    SwitchFamily("switch", ("switch_transformers",), "SwitchTransformersConfig",
                 "SwitchTransformersForConditionalGeneration", ("SwitchTransformersSparseMLP",),
                 intermediate_keys=("d_ff",), experts_keys=("num_experts",), top_k_keys=(),
                 hidden_keys=("d_model", "hidden_size"), activation_key="dense_act_fn", default_activation="relu",
                 gated=False, encoder_decoder=True, router_tensors=("router.classifier.weight",), fused=None,
                 per_expert=("experts.expert_{e}.wi.weight", None, "experts.expert_{e}.wo.weight")),
)}

# config.json model_type -> family name
MODEL_TYPES: dict[str, str] = {t: f.name for f in FAMILIES.values() for t in f.model_types}
BLOCK_CLASSES: frozenset = frozenset(c for f in FAMILIES.values() for c in f.block_classes)


def supported() -> str:
    return ", ".join(sorted(MODEL_TYPES))


def get_family(name: str) -> Family:
    """The adapter of a family name (as plans record it) or a config ``model_type``."""
    if isinstance(name, Family):
        return name
    f = FAMILIES.get(name) or FAMILIES.get(MODEL_TYPES.get(name, ""))
    if f is None:
        raise UnknownFamilyError(f"unknown model family {name!r}; supported model types: {supported()}")
    return f


def family_for_config(config: dict, where="config.json") -> Family:
    """The adapter of a checkpoint's config; an unknown ``model_type`` raises naming the supported ones."""
    model_type = config.get("model_type") if isinstance(config, dict) else getattr(config, "model_type", None)
    if model_type not in MODEL_TYPES:
        raise UnknownFamilyError(f"{where}: unknown family: model_type {model_type!r}; supported model types: "
                                 f"{supported()}")
    return FAMILIES[MODEL_TYPES[model_type]]
