"""One batched decoder forward whose sequences may belong to different variants (Mixtral, Qwen3-MoE, OLMoE,
Qwen2-MoE, DeepSeek-V3, GPT-OSS: the families whose ``families.Family.batched`` says what their layers add to
Mixtral's).

The variant is an explicit input: every sequence of a ``Batch`` names its variant (the row of the
slot table its experts come from) and the device set holding that variant's non-expert weights
(``VariantWeights``). Tokens are laid out flat and sorted by set, so each set's tokens form one
segment and every non-expert linear is one matmul per segment, the way Punica's SGMV runs many
adapters in one batch. The experts run once per layer for the whole batch: slot ids come from
``table[variant of token, layer, expert]`` and one ``fused_moe`` call reads the shared slab.

One step mixes prompt chunks and decodes. Attention (``attention.StandardAttention``, or DeepSeek's latent
attention ``mla.LatentAttention``, as the family record says) reads keys from the KV-cache rows over a padded
per-sequence view of the queries (``[B, Q]``), in two groups: the decodes (Q = 1) and the prompt chunks
(Q = the longest chunk), so a long chunk does not pad every decode to its length. ``make_batch`` builds
every index (and one mask per attention window the layers use) on the host; the forward itself never syncs
with the host.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch

from . import ops, torch_moe
from .attention import StandardAttention
from .errors import CheckpointError
from .experts import slab_moe
from .families import family_for_config, route_grouped_sigmoid, route_softmax_topk, route_topk_softmax
from .layer_ops import grouped_linear, rms_norm  # grouped_linear: also imported from here by benchmarks
from .mla import LatentAttention

ATTENTION = {"standard": StandardAttention, "mla": LatentAttention}  # families.Batched.attention -> its module


@dataclass
class BatchEntry:
    """One sequence's part of a step: ``tokens`` continue its cache at ``start``."""
    set: int          # device set of the variant's non-expert weights
    variant: int      # row of the slot table
    kv_row: int       # the sequence's row of the KV cache
    tokens: list      # token ids fed this step (a prompt chunk, or the last sampled token)
    start: int        # position of tokens[0]
    logits: bool = True  # return the logits after the last token


@dataclass
class AttnGroup:
    """Sequences whose queries attention pads to one length Q. A step has at most two: the decodes (Q = 1)
    and the prompt chunks, so a long prompt chunk never pads every decode of the step to its length."""
    seq_rows: torch.Tensor    # [B] KV-cache row per sequence
    seq_sets: torch.Tensor    # [B] weight set per sequence
    q_index: torch.Tensor     # [B, Q] token index of each padded query (T = padding)
    tokens: torch.Tensor      # [n] the group's tokens (flat indices)
    rows: torch.Tensor        # [n] their rows in the flattened [B * Q] queries
    masks: dict               # attention window (None: causal) -> [B, Q, ctx] bool: which cached keys each query sees


@dataclass
class Batch:
    tokens: torch.Tensor      # [T] token ids, sorted by set
    positions: torch.Tensor   # [T]
    sets: torch.Tensor        # [T] weight set per token
    variants: torch.Tensor    # [T] slot-table row per token
    token_rows: torch.Tensor  # [T] KV-cache row per token
    groups: list              # [AttnGroup]: the decodes, the prompt chunks
    logit_rows: torch.Tensor  # [N] tokens whose logits are returned, in entry order
    segments: list            # [(set, start, end)] over tokens
    logit_segments: list      # [(set, start, end)] over logit_rows
    rope_groups: list | None = None  # [(seq_len, token indices)]: for a rotary that depends on the length


def _segments(sets: list[int]) -> list[tuple[int, int, int]]:
    out = []
    for i, s in enumerate(sets):
        if out and out[-1][0] == s:
            out[-1] = (s, out[-1][1], i + 1)
        else:
            out.append((s, i, i + 1))
    return out


LENGTH_DEPENDENT_ROPE = ("dynamic", "longrope")  # transformers' rope types whose frequencies follow the length
CTX_BUCKET = 16  # key lengths are rounded up to a multiple of this: fewer distinct shapes per step


def make_batch(entries: list[BatchEntry], device, windows=(None,), max_len: int | None = None,
               by_length: bool = False) -> Batch:
    """Host-side indices of one step. ``entries`` must be sorted by ``set``; ``windows``: the attention windows the
    layers use (None: causal), one mask each; ``max_len`` caps the key length; ``by_length``: group tokens by
    their sequence's length after this step (``rope_groups``)."""
    if not entries:
        raise ValueError("make_batch: a batch needs at least one sequence")
    if any(a.set > b.set for a, b in zip(entries, entries[1:])):
        raise ValueError("make_batch: entries must be sorted by weight set")
    if any(not e.tokens for e in entries):
        raise ValueError("make_batch: every entry needs at least one token")
    tokens, positions, sets, variants, token_rows, logit_rows, offsets = [], [], [], [], [], [], []
    for e in entries:
        offsets.append(len(tokens))
        n = len(e.tokens)
        tokens += e.tokens
        positions += range(e.start, e.start + n)
        sets += [e.set] * n
        variants += [e.variant] * n
        token_rows += [e.kv_row] * n
        if e.logits:
            logit_rows.append(len(tokens) - 1)

    def dev(x):
        return torch.as_tensor(x, dtype=torch.long).to(device, non_blocking=True)

    groups = []
    for members in ([i for i, e in enumerate(entries) if len(e.tokens) == 1],
                    [i for i, e in enumerate(entries) if len(e.tokens) > 1]):
        if not members:
            continue
        B, Q = len(members), max(len(entries[i].tokens) for i in members)
        q_index = torch.full((B, Q), len(tokens), dtype=torch.long)
        q_pos = torch.full((B, Q), -1, dtype=torch.long)
        group_tokens, rows = [], []
        for b, i in enumerate(members):
            e, n = entries[i], len(entries[i].tokens)
            q_index[b, :n] = torch.arange(offsets[i], offsets[i] + n)
            q_pos[b, :n] = torch.arange(e.start, e.start + n)
            group_tokens += range(offsets[i], offsets[i] + n)
            rows += range(b * Q, b * Q + n)
        ctx = -(-(int(q_pos.max()) + 1) // CTX_BUCKET) * CTX_BUCKET
        ctx = ctx if max_len is None else min(ctx, max_len)
        key = torch.arange(ctx)
        masks = {}
        for window in dict.fromkeys(windows):
            mask = key[None, None, :] <= q_pos[:, :, None]
            if window is not None:
                mask &= (q_pos[:, :, None] - key[None, None, :]) < window
            mask[:, :, 0] |= q_pos < 0  # a padded query sees one key, so its softmax stays finite; its row is dropped
            masks[window] = mask.to(device, non_blocking=True)
        groups.append(AttnGroup(seq_rows=dev([entries[i].kv_row for i in members]),
                                seq_sets=dev([entries[i].set for i in members]), q_index=dev(q_index),
                                tokens=dev(group_tokens), rows=dev(rows), masks=masks))

    rope_groups = None
    if by_length:
        lengths: dict[int, list[int]] = {}
        for e, o in zip(entries, offsets):
            lengths.setdefault(e.start + len(e.tokens), []).extend(range(o, o + len(e.tokens)))
        rope_groups = [(n, dev(idx)) for n, idx in sorted(lengths.items())]
    return Batch(tokens=dev(tokens), positions=dev(positions), sets=dev(sets), variants=dev(variants),
                 token_rows=dev(token_rows), groups=groups, logit_rows=dev(logit_rows),
                 segments=_segments(sets), logit_segments=_segments([sets[r] for r in logit_rows]),
                 rope_groups=rope_groups)


def _rotary_class(family):
    """The family's rotary-embedding module class (the one its transformers model builds)."""
    import sys

    module = sys.modules[family.classes()[1].__module__]
    names = [n for n in vars(module) if n.endswith("RotaryEmbedding")]
    if len(names) != 1:
        raise RuntimeError(f"{module.__name__}: expected one *RotaryEmbedding class, found {names}")
    return getattr(module, names[0])


class BatchedModel:
    """A decoder family's forward over ``weights`` (non-expert sets), ``slab``/``table`` (experts) and ``kv``.

    The family adapter (``families.Family.batched``) says what a layer adds to Mixtral's: the attention module
    (standard, with q/k norms, biases, sinks and per-layer windows; or DeepSeek's latent attention), the router
    (Mixtral's renormalised softmax top-k, the Qwen family's with ``norm_topk_prob``, DeepSeek-V3's grouped
    sigmoid top-k with score correction and ``routed_scaling_factor``, GPT-OSS's softmax over the top-k biased
    logits), a shared expert (gated, Qwen2-MoE; plain, DeepSeek-V3) and which layers are dense MLPs (Qwen's
    ``mlp_only_layers`` / ``decoder_sparse_step``, DeepSeek's ``first_k_dense_replace``).
    """

    def __init__(self, config: dict, weights, slab, table, kv, backend: str | None = None):
        self.family = family_for_config(config)
        spec = self.family.batched
        if spec is None:
            from .weights import batched_families
            raise CheckpointError(f"the batched forward does not cover the {self.family.name} family; it covers "
                                  f"{', '.join(batched_families())} (use MultiVariantModel for the others)")
        cfg = self.family.hf_config(config)
        self.spec, self.cfg, self.weights, self.slab, self.table, self.kv = spec, cfg, weights, slab, table, kv
        self.attention = ATTENTION[spec.attention](spec, cfg, kv)
        self.top_k, self.eps = cfg.num_experts_per_tok, cfg.rms_norm_eps
        self.normalize = True if spec.router == "mixtral" else bool(getattr(cfg, "norm_topk_prob", True))
        # decoder layer -> MoE ordinal (the slot table's layer), None for a dense MLP layer
        moe = self.family.moe_layer_indices(cfg.to_dict())
        self.moe_index = [moe.index(i) if i in moe else None for i in range(cfg.num_hidden_layers)]
        self.rotary = _rotary_class(self.family)(cfg).to(slab.device)
        # transformers rescales these by the longest position of a call: here each sequence is its own call
        self.rope_by_length = getattr(self.rotary, "rope_type", "default") in LENGTH_DEPENDENT_ROPE
        self._inv_freq0 = self.rotary.inv_freq.detach().clone()
        self.backend = ops.choose_backend(slab.device, backend)
        act, self.alpha, self.limit = self.family.activation(cfg.to_dict())  # raises, naming an unsupported one
        self.activation = act
        self._busy = threading.Lock()

    def batch(self, entries: list[BatchEntry]) -> Batch:
        return make_batch(entries, self.slab.device, tuple(dict.fromkeys(self.attention.windows)), self.kv.max_len,
                          by_length=self.rope_by_length)

    def _rope(self, x, b: Batch):
        """cos/sin ``[T, 1, d]``. A length-dependent rotary gets each sequence's own length: a fresh state and
        one call per distinct length, whose largest position is that length - 1, as when the sequence runs alone."""
        if b.rope_groups is None:
            cos, sin = self.rotary(x, b.positions[None])
            return cos[0, :, None], sin[0, :, None]
        r = self.rotary
        parts = []
        for _, idx in b.rope_groups:
            # Forget what an earlier call changed. transformers' longrope copies the long frequencies into a
            # buffer that aliases original_inv_freq, so both are restored from a private copy, unaliased.
            r.original_inv_freq = self._inv_freq0.clone()
            r.register_buffer("inv_freq", self._inv_freq0.clone(), persistent=False)
            if hasattr(r, "original_max_seq_len"):  # dynamic: its growth
                r.max_seq_len_cached = r.original_max_seq_len
            parts.append((idx, *r(x[idx], b.positions[idx][None])))
        cos = x.new_empty(x.shape[0], parts[0][1].shape[-1], dtype=parts[0][1].dtype)
        sin = torch.empty_like(cos)
        for idx, c, s in parts:
            cos[idx], sin[idx] = c[0], s[0]
        return cos[:, None], sin[:, None]

    @torch.inference_mode()
    def forward(self, b: Batch) -> torch.Tensor:
        """Logits ``[len(b.logit_rows), vocab]`` (model dtype); writes this step's keys into the cache.

        One thread at a time (the engine's step thread): a second concurrent call raises at once rather
        than interleave its cache writes with the first's.
        """
        if not self._busy.acquire(blocking=False):
            raise RuntimeError(f"{type(self).__name__}.forward is already running in another thread; it is driven "
                               f"by one thread (the engine's)")
        try:
            return self._forward(b)
        finally:
            self._busy.release()

    def _forward(self, b: Batch) -> torch.Tensor:
        W = self.weights
        V = W.embed.shape[1]
        x = W.embed.view(-1, W.embed.shape[-1])[b.sets * V + b.tokens]
        cos, sin = self._rope(x, b)
        for layer, L in enumerate(W.layers):
            x = x + self.attention(layer, L, self._norm(x, L["ln1"][b.sets]), b, cos, sin)
            h = self._norm(x, L["ln2"][b.sets])
            moe = self.moe_index[layer]
            x = x + (self._dense_mlp(L, h, b) if moe is None else self._moe(moe, L, h, b))
        x = self._norm(x[b.logit_rows], W.norm[b.sets[b.logit_rows]])
        return grouped_linear(x, W.lm_head, b.logit_segments)

    def _norm(self, x, w):
        return rms_norm(x, w, self.eps, self.spec.norm_scale_fp32)

    def _route(self, L, h, b: Batch):
        router = self.spec.router
        if router == "grouped_sigmoid":  # DeepSeek-V3: fp32 logits, as transformers' router computes them
            c = self.cfg
            logits = grouped_linear(h.float(), L["router"], b.segments)
            return route_grouped_sigmoid(logits, L["router_bias"][b.sets].float(), self.top_k, c.n_group,
                                         c.topk_group, self.normalize, c.routed_scaling_factor)
        bias = L.get("router_bias")
        logits = grouped_linear(h, L["router"], b.segments, bias, b.sets)
        if router == "topk_softmax":
            return route_topk_softmax(logits, self.top_k)
        # Mixtral hands fp32 weights to its experts; the Qwen family casts them to the model dtype
        return route_softmax_topk(logits, self.top_k, self.normalize, None if router == "mixtral" else logits.dtype)

    def _moe(self, layer, L, h, b: Batch):
        top_w, top_ids = self._route(L, h, b)
        slots = self.table.resolve(layer, top_ids, b.variants)
        out = slab_moe(self.slab, h, slots, top_w, self.backend, self.activation, self.alpha, self.limit)
        if self.spec.shared_expert == "sigmoid_gate":  # Qwen2-MoE: a dense MLP per variant, gated per token
            gate = torch.sigmoid(grouped_linear(h, L["shared_gate"], b.segments))
            out = out + gate * self._mlp(h, L["shared_gate_up"], L["shared_down"], b)
        elif self.spec.shared_expert == "plain":  # DeepSeek-V3: always added
            out = out + self._mlp(h, L["shared_gate_up"], L["shared_down"], b)
        return out

    def _dense_mlp(self, L, h, b: Batch):
        return self._mlp(h, L["mlp_gate_up"], L["mlp_down"], b)

    def _mlp(self, h, gate_up, down, b: Batch):
        a = torch_moe.apply_activation(grouped_linear(h, gate_up, b.segments), True, self.activation)
        return grouped_linear(a, down, b.segments)


BatchedMixtral = BatchedModel  # the name of the Mixtral-only first version
