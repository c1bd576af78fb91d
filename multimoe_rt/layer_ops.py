"""The elementary math the batched forward's layers share (``forward``, ``attention``, ``mla``): a linear per
weight-set segment, RMSNorm, the rotary embedding and attention over padded per-sequence queries."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import cpu_linear


def grouped_linear(x: torch.Tensor, w: torch.Tensor, segments, bias: torch.Tensor | None = None,
                   sets: torch.Tensor | None = None) -> torch.Tensor:
    """``x[a:b] @ w[s].T`` for every segment ``(s, a, b)``; ``w`` is ``[sets, out, in]``; ``bias [sets, out]`` is
    added per token (``sets``: each token's set). 16-bit weights on a CPU without native 16-bit matmul go through
    ``cpu_linear`` (torch's own path there is compute-bound)."""
    if len(segments) == 1:
        y = cpu_linear.linear(x, w[segments[0][0]])
    else:
        y = x.new_empty(x.shape[0], w.shape[1])
        for s, a, b in segments:
            if cpu_linear.use_op(x[a:b], w[s]):
                y[a:b] = cpu_linear.linear(x[a:b], w[s])
            else:
                torch.mm(x[a:b], w[s].t(), out=y[a:b])
    return y if bias is None else y + bias[sets]


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float, scale_fp32: bool = False) -> torch.Tensor:
    """transformers' RMSNorm: normalise in fp32, then scale in the model dtype (Mixtral and most families; ``w``
    per token) or, ``scale_fp32`` (GPT-OSS), scale in fp32 and cast the product back."""
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if scale_fp32:
        return (w.float() * normed).to(x.dtype)
    return w * normed.to(x.dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The rotary embedding on the two halves of the last dim. ``cos``/``sin`` cover the whole dim, or (GPT-OSS's
    rotary returns one angle per pair) half of it."""
    half = x.shape[-1] // 2
    if cos.shape[-1] == half:
        cos, sin = torch.cat((cos, cos), -1), torch.cat((sin, sin), -1)
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float,
           sinks: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax attention ``[B, heads, Q, Ev]`` of ``q [B, heads, Q, E]`` over ``k [B, kv_heads, ctx, E]`` and
    ``v [B, kv_heads, ctx, Ev]`` (query head h reads kv head h // (heads / kv_heads)), ``mask [B, Q, ctx]`` bool.

    ``sinks [B, heads]``: one more logit per head in the softmax's denominator, whose value is dropped (GPT-OSS);
    SDPA has no such term, so that case runs the softmax itself, as transformers' eager GPT-OSS attention does."""
    H, Hkv = q.shape[1], k.shape[1]
    if sinks is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None], scale=scale, enable_gqa=H != Hkv)
    B, _, Q, E = q.shape
    ctx = k.shape[2]
    g = H // Hkv
    s = torch.matmul(q.reshape(B, Hkv, g * Q, E), k.transpose(-1, -2)).view(B, H, Q, ctx) * scale
    s = s.masked_fill(~mask[:, None], float("-inf"))
    s = torch.cat([s, sinks.to(s.dtype)[:, :, None, None].expand(B, H, Q, 1)], dim=-1)
    p = torch.softmax(s - s.amax(-1, keepdim=True), dim=-1)[..., :-1].to(v.dtype)
    return torch.matmul(p.reshape(B, Hkv, g * Q, ctx), v).view(B, H, Q, v.shape[-1])
