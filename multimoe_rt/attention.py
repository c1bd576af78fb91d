"""Standard attention of the batched forward: multi-head / grouped-query attention over a ``kv_cache.KVCache``.

What a family adds comes from its record (``families.Batched``): q/k norms per head (Qwen3) or over the whole
projection with an optional ``clip_qkv`` (OLMoE), q/k/v and o biases (Qwen2; GPT-OSS), attention sinks (GPT-OSS)
and, from the config, a window per layer (``layer_types``: GPT-OSS alternates sliding and full layers; otherwise
``sliding_window`` applies to every layer). DeepSeek's latent attention is ``mla.LatentAttention``.
"""

from __future__ import annotations

import torch

from .errors import CheckpointError
from .layer_ops import attend, grouped_linear, rms_norm, rotate


def layer_windows(cfg) -> list:
    """Per decoder layer its attention window (None: causal over the whole context), as transformers applies it:
    a layer whose ``layer_types`` entry is ``"sliding_attention"`` sees the last ``sliding_window`` positions; a
    config without ``layer_types`` applies ``sliding_window`` (when set) to every layer."""
    n = cfg.num_hidden_layers
    window = getattr(cfg, "sliding_window", None) or None
    kinds = getattr(cfg, "layer_types", None)
    if not kinds:
        return [window] * n
    return [window if kind == "sliding_attention" else None for kind in kinds[:n]]


class StandardAttention:
    """One layer's attention: ``__call__(layer, L, h, b, cos, sin)`` returns the o-projection's output ``[T, H]``
    and writes the step's keys and values into ``kv`` (``L``: the layer's stacked weights, ``b``: a
    ``forward.Batch``, ``cos``/``sin``: the rotary embedding per token)."""

    def __init__(self, spec, cfg, kv):
        self.spec, self.kv = spec, kv
        self.nh, self.nkv = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.nh
        self.scaling = self.head_dim ** -0.5
        self.eps = cfg.rms_norm_eps
        self.clip_qkv = getattr(cfg, "clip_qkv", None)
        self.windows = layer_windows(cfg)
        want = (cfg.num_hidden_layers, self.nkv, self.head_dim)
        got = getattr(kv, "k", None)
        if got is None or (got.shape[0], *got.shape[3:]) != want:
            raise CheckpointError(f"{cfg.model_type}: the KV cache must hold (layers, kv heads, head dim) = {want}, "
                                  f"got {type(kv).__name__} {None if got is None else (got.shape[0], *got.shape[3:])} "
                                  f"(KVCache.for_config builds the right one)")

    def _qkv(self, L, h, b):
        """Queries ``[T, heads, d]``, keys and values ``[T, kv_heads, d]`` before the rotary embedding."""
        T, d = h.shape[0], self.head_dim
        qkv = grouped_linear(h, L["qkv"], b.segments, L.get("qkv_bias"), b.sets)
        q, k, v = qkv.split([self.nh * d, self.nkv * d, self.nkv * d], -1)
        if self.spec.qk_norm == "full":  # OLMoE: over the whole projection, then the optional clip
            q, k = rms_norm(q, L["q_norm"][b.sets], self.eps), rms_norm(k, L["k_norm"][b.sets], self.eps)
            if self.clip_qkv is not None:
                q, k, v = (t.clamp(-self.clip_qkv, self.clip_qkv) for t in (q, k, v))
        q, k, v = q.reshape(T, self.nh, d), k.reshape(T, self.nkv, d), v.reshape(T, self.nkv, d)
        if self.spec.qk_norm == "head":  # Qwen3: over each head's dim
            q = rms_norm(q, L["q_norm"][b.sets][:, None], self.eps)
            k = rms_norm(k, L["k_norm"][b.sets][:, None], self.eps)
        return q, k, v

    def __call__(self, layer, L, h, b, cos, sin):
        d = self.head_dim
        q, k, v = self._qkv(L, h, b)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        ck, cv = self.kv.k[layer], self.kv.v[layer]
        ck[b.token_rows, b.positions] = k
        cv[b.token_rows, b.positions] = v
        padded = torch.cat([q, q.new_zeros(1, self.nh, d)])
        out = q.new_empty(q.shape[0], self.nh * d)  # every token belongs to one group: every row is written
        sinks = L.get("sinks")
        for g in b.groups:
            mask = g.masks[self.windows[layer]]
            ctx = mask.shape[-1]
            keys = ck[g.seq_rows, :ctx].transpose(1, 2)    # [B, kv_heads, ctx, d]
            values = cv[g.seq_rows, :ctx].transpose(1, 2)
            o = attend(padded[g.q_index].transpose(1, 2), keys, values, mask, self.scaling,  # [B, heads, Q, d]
                       None if sinks is None else sinks[g.seq_sets])
            out[g.tokens] = o.transpose(1, 2).reshape(-1, self.nh * d)[g.rows]
        return grouped_linear(out, L["o"], b.segments, L.get("o_bias"), b.sets)
