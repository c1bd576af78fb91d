"""DeepSeek's multi-head latent attention (MLA) in the batched forward, over a ``kv_cache.LatentKVCache``.

Per token, as transformers' ``DeepseekV3Attention``: queries from ``q_proj``, or (``q_lora_rank`` set) from
``q_b_proj(RMSNorm(q_a_proj(x)))``, split per head into a no-rope part (``qk_nope_head_dim``) and a rope part
(``qk_rope_head_dim``); ``kv_a_proj_with_mqa`` gives the compressed latent (``kv_lora_rank``, then RMSNorm) and
one rotary key shared by all heads. ``kv_b_proj`` expands the latent into each head's no-rope key and its value
(``v_head_dim``). Only the latent and the rotated shared key are cached.

The expansion is never run over the cache. ``kv_b_proj`` is absorbed into the query and the output instead
(the decode form of MLA that DeepSeek, vLLM and SGLang use): per head, ``q_nope . (W_uk c) = (W_uk^T q_nope) . c``,
so the attention is one-kv-head attention whose key is ``[c, k_rot]`` and whose value is ``c``, and each
head's value output is ``W_uv`` times its latent output. The same function as transformers' (exact in real
arithmetic; fp32 results agree to rounding), and the per-variant weights are touched only per token, never
per cached position, so sequences of different variants share one attention call.

Softmax scale: ``(qk_nope_head_dim + qk_rope_head_dim) ** -0.5``, times ``mscale**2`` under yarn rope scaling
with ``mscale_all_dim`` (as transformers does; yarn's own ``attention_factor`` is already in cos/sin).
"""

from __future__ import annotations

import math

import torch

from .errors import CheckpointError
from .kv_cache import LatentKVCache
from .layer_ops import attend, grouped_linear, rms_norm, rotate

LORA_NORM_EPS = 1e-6  # transformers builds q_a_layernorm / kv_a_layernorm with RMSNorm's default eps, not the config's


def softmax_scale(cfg) -> float:
    """The attention's softmax scale, with yarn's ``mscale_all_dim`` folded in (transformers' ``yarn_apply_mscale``)."""
    scale = (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim) ** -0.5
    rope = getattr(cfg, "rope_parameters", None) or {}
    mscale_all_dim = rope.get("mscale_all_dim", 0) if rope.get("rope_type", "default") != "default" else 0
    factor = rope.get("factor", 1.0)
    if mscale_all_dim and factor > 1:
        mscale = 0.1 * mscale_all_dim * math.log(factor) + 1.0
        scale *= mscale * mscale
    return scale


def deinterleave(x: torch.Tensor) -> torch.Tensor:
    """DeepSeek's ``rope_interleave`` pairs rotary dims as (0, 1), (2, 3), ...: evens then odds puts them in the
    halves layout ``layer_ops.rotate`` expects. Queries and keys get the same permutation, so their dot
    products, and transformers' output (which is also in this layout), are unchanged."""
    return torch.cat((x[..., 0::2], x[..., 1::2]), dim=-1)


class LatentAttention:
    """One layer's MLA: ``__call__(layer, L, h, b, cos, sin)`` as ``attention.StandardAttention``'s."""

    def __init__(self, spec, cfg, kv):
        self.spec, self.kv = spec, kv
        self.nh = cfg.num_attention_heads
        self.r, self.dr = cfg.kv_lora_rank, cfg.qk_rope_head_dim
        self.dn, self.dv = cfg.qk_nope_head_dim, cfg.v_head_dim
        self.q_lora = cfg.q_lora_rank is not None
        self.interleave = bool(getattr(cfg, "rope_interleave", False))
        self.scaling = softmax_scale(cfg)
        self.windows = [None] * cfg.num_hidden_layers  # DeepSeek-V3 attends causally over the whole context
        if not isinstance(kv, LatentKVCache):
            raise CheckpointError(f"{cfg.model_type}: latent attention needs a LatentKVCache (KVCache.for_config "
                                  f"builds it), got {type(kv).__name__}")
        want = (cfg.num_hidden_layers, self.r, self.dr)
        if (kv.latent.shape[0], kv.kv_lora_rank, kv.rope_dim) != want:
            got = (kv.latent.shape[0], kv.kv_lora_rank, kv.rope_dim)
            raise CheckpointError(f"{cfg.model_type}: the latent cache holds (layers, kv_lora_rank, qk_rope_head_dim) "
                                  f"= {got}, the config needs {want}")

    def _per_head(self, x, w, b, equation):
        """``einsum(equation, x[a:b], w[s])`` for each weight-set segment ``(s, a, b)`` of the batch."""
        if len(b.segments) == 1:
            return torch.einsum(equation, x, w[b.segments[0][0]])
        out = None
        for s, a, e in b.segments:
            y = torch.einsum(equation, x[a:e], w[s])
            if out is None:
                out = y.new_empty(x.shape[0], *y.shape[1:])
            out[a:e] = y
        return out

    def __call__(self, layer, L, h, b, cos, sin):
        T, nh, r = h.shape[0], self.nh, self.r
        if self.q_lora:
            qa = grouped_linear(h, L["q_a"], b.segments, L.get("q_a_bias"), b.sets)
            q = grouped_linear(rms_norm(qa, L["q_a_norm"][b.sets], LORA_NORM_EPS), L["q_b"], b.segments)
        else:
            q = grouped_linear(h, L["q"], b.segments)
        q_nope, q_rot = q.view(T, nh, self.dn + self.dr).split([self.dn, self.dr], -1)
        latent, k_rot = grouped_linear(h, L["kv_a"], b.segments, L.get("kv_a_bias"), b.sets).split([r, self.dr], -1)
        latent = rms_norm(latent, L["kv_a_norm"][b.sets], LORA_NORM_EPS)
        if self.interleave:
            q_rot, k_rot = deinterleave(q_rot), deinterleave(k_rot)
        q_rot, k_rot = rotate(q_rot, cos, sin), rotate(k_rot[:, None], cos, sin)[:, 0]
        cache = self.kv.latent[layer]
        cache[b.token_rows, b.positions] = torch.cat([latent, k_rot], -1)

        kv_b = L["kv_b"].view(L["kv_b"].shape[0], nh, self.dn + self.dv, r)  # [sets, heads, dn + dv, r]
        q_lat = self._per_head(q_nope, kv_b[:, :, :self.dn], b, "thd,hdr->thr")
        query = torch.cat([q_lat, q_rot], -1)                              # [T, heads, r + dr]
        padded = torch.cat([query, query.new_zeros(1, nh, r + self.dr)])
        out_lat = query.new_empty(T, nh, r)
        for g in b.groups:
            mask = g.masks[None]
            (B, Q), ctx = g.q_index.shape, mask.shape[-1]
            keys = cache[g.seq_rows, :ctx][:, None]                        # [B, 1, ctx, r + dr]
            # every head reads the one latent "kv head": fold the heads into the query axis (no GQA expansion)
            q = padded[g.q_index].transpose(1, 2).reshape(B, 1, nh * Q, r + self.dr)
            o = attend(q, keys, keys[..., :r], mask[:, None].expand(B, nh, Q, ctx).reshape(B, nh * Q, ctx),
                       self.scaling).view(B, nh, Q, r)
            out_lat[g.tokens] = o.transpose(1, 2).reshape(-1, nh, r)[g.rows]
        out = self._per_head(out_lat, kv_b[:, :, self.dn:], b, "thr,hvr->thv").reshape(T, nh * self.dv)
        return grouped_linear(out, L["o"], b.segments, L.get("o_bias"), b.sets)
