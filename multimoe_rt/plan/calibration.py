"""Calibration inputs for the output metric: recorded MoE-input states, or Gaussian stand-ins."""

from __future__ import annotations

from pathlib import Path

import torch

from .common import PlanError


def gaussian_calibration(hidden_size: int, num_tokens: int = 256, seed: int = 0) -> torch.Tensor:
    """Fallback inputs when no recorded states are given: Gaussian rows rescaled to RMS 1.

    MoE inputs are RMS-normed (Mixtral) or layer-normed (Switch) states, so per-token RMS ~1
    before the norm's learned gain. This is a stand-in, labelled ``"gaussian"`` in the plan;
    recorded states (``record_calibration``) track quality better.
    """
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tokens, hidden_size, generator=g, dtype=torch.float32)
    return x / x.pow(2).mean(-1, keepdim=True).sqrt()


@torch.no_grad()
def record_calibration(model: torch.nn.Module, moe_layers: list[str], inputs: list[dict],
                       max_tokens: int = 512) -> dict[int, torch.Tensor]:
    """Record the hidden states entering each MoE block (``Variant.moe_layers`` prefixes).

    ``inputs`` is a list of keyword dicts for ``model(**kw)`` (e.g. ``{"input_ids": ...}``).
    Returns ``{layer: float32 [N, H]}`` with at most ``max_tokens`` rows per layer.
    """
    modules = dict(model.named_modules())
    missing = [p for p in moe_layers if p not in modules]
    if missing:
        raise PlanError(f"record_calibration: model has no modules {missing[:3]} "
                        f"(expected the MoE block prefixes of Variant.moe_layers)")
    out: dict[int, list[torch.Tensor]] = {i: [] for i in range(len(moe_layers))}
    hooks = []
    for i, prefix in enumerate(moe_layers):
        def hook(mod, args, kwargs, i=i):
            x = args[0] if args else next(iter(kwargs.values()))
            out[i].append(x.detach().reshape(-1, x.shape[-1]).float().cpu())
        hooks.append(modules[prefix].register_forward_pre_hook(hook, with_kwargs=True))
    try:
        for kw in inputs:
            model(**kw)
            if all(sum(len(t) for t in v) >= max_tokens for v in out.values()):
                break
    finally:
        for h in hooks:
            h.remove()
    return {i: torch.cat(v)[:max_tokens] for i, v in out.items() if v}


@torch.no_grad()
def calibration_from_text(variant, text: str, max_tokens: int = 512, seq_len: int = 128) -> dict[int, torch.Tensor]:
    """Recorded MoE-input states of ``variant`` (usually the anchor) on ``text``.

    Loads the variant with transformers (safetensors only) and byte-tokenizes the text with the
    ByteTokenizer the zoo writes next to each checkpoint; other tokenizers are not supported here
    (record states yourself with ``record_calibration``).
    """
    from ..tokenizer import TOKENIZER_FILE, ByteTokenizer

    if not (Path(variant.path) / TOKENIZER_FILE).exists():
        raise PlanError(f"{variant.path}: no {TOKENIZER_FILE}; calibration_from_text needs the zoo's byte "
                        f"tokenizer (use record_calibration with your own inputs instead)")
    tok = ByteTokenizer.load(variant.path)
    ids = tok.encode(text)[:max_tokens]
    if not ids:
        raise PlanError("calibration text is empty")
    batches = [torch.tensor([ids[i:i + seq_len]]) for i in range(0, len(ids), seq_len)]
    cls = variant.adapter.classes()[1]
    inputs = [{"input_ids": b, "decoder_input_ids": b} if variant.adapter.encoder_decoder else {"input_ids": b}
              for b in batches]
    model = cls.from_pretrained(str(variant.path), dtype=torch.float32, use_safetensors=True).eval()
    return record_calibration(model, variant.moe_layers, inputs, max_tokens=max_tokens)
