"""Output-quality metrics: perplexity for causal variants, loss and ROUGE-1 for seq2seq (Switch) variants.

Perplexity follows Multi-MoE's ``ppl_evaluator.py`` scaled to a model's context: tokenize the whole split once,
cut it into consecutive full windows of ``window`` tokens (``ids[i*W:(i+1)*W]``, optionally at most
``max_windows`` of them), score each window's next-token predictions, PPL = exp(total NLL / tokens scored).
Upstream averages per-window mean losses; every window scores W-1 tokens there, so that is the same number.

With ``stride < window`` it is the usual sliding-window protocol: windows start every ``stride`` tokens, the
first window scores all its W-1 predictions and each later one only its last ``stride`` tokens, so every
token after the first is scored exactly once and later windows give it ``window - stride`` tokens of context.

Everything takes a plain function, so any model fits: ``logits_fn(input_ids [B,W]) -> logits [B,W,V]``
(an object with ``.logits``, as HF models return, is accepted too).
"""
from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterable, Sequence

import torch

from .data import DATASETS, eval_text

__all__ = ["DATASETS", "window_plan", "perplexity", "tokenize_dataset", "evaluate_perplexity",
           "seq2seq_loss", "rouge1", "rouge_tokens", "hf_logits_fn", "hf_seq2seq_fn"]


def _logits(out) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out


def window_plan(n_tokens: int, window: int, stride: int | None = None,
                max_windows: int | None = None) -> list[tuple[int, int]]:
    """(start, first scored offset) for each window; a window scores targets at offsets [first, window).

    Only full windows are used (as upstream). Offset 0 is never a target: nothing in the window precedes it.
    """
    if window < 2:
        raise ValueError(f"perplexity: window must be >= 2 tokens, got {window}")
    stride = window if stride is None else int(stride)
    if not 1 <= stride <= window:
        raise ValueError(f"perplexity: stride must be in [1, window={window}], got {stride}")
    if max_windows is not None and max_windows < 1:
        raise ValueError(f"perplexity: max_windows must be >= 1, got {max_windows}")
    if n_tokens < window:
        raise ValueError(f"perplexity: {n_tokens} tokens is fewer than one window of {window}")
    n = (n_tokens - window) // stride + 1
    if max_windows is not None:
        n = min(n, max_windows)
    later = max(1, window - stride)
    return [(j * stride, 1 if j == 0 else later) for j in range(n)]


@torch.no_grad()
def perplexity(logits_fn: Callable[[torch.Tensor], torch.Tensor], token_ids, window: int,
               stride: int | None = None, max_windows: int | None = None, batch_size: int = 1,
               device: torch.device | str | None = None) -> dict:
    """Perplexity of a token stream under ``logits_fn`` (see module doc for the window protocol).

    token_ids: 1-D sequence/tensor of ints. Input batches are moved to ``device`` (default: the ids' device).
    Log-softmax runs in float32, NLL is summed in float64.
    Returns dict(ppl, nll (mean per scored token), tokens_scored, windows, window, stride).
    """
    ids = torch.as_tensor(token_ids, dtype=torch.long).flatten()
    if device is not None:
        ids = ids.to(device)
    stride = window if stride is None else int(stride)
    plan = window_plan(ids.numel(), window, stride, max_windows)
    if batch_size < 1:
        raise ValueError(f"perplexity: batch_size must be >= 1, got {batch_size}")
    offsets = torch.arange(1, window, device=ids.device)  # target offsets of the shifted predictions
    total = torch.zeros((), dtype=torch.float64, device=ids.device)
    scored = 0
    for b0 in range(0, len(plan), batch_size):
        chunk = plan[b0:b0 + batch_size]
        batch = torch.stack([ids[s:s + window] for s, _ in chunk])
        logits = _logits(logits_fn(batch))
        if logits.dim() != 3 or tuple(logits.shape[:2]) != tuple(batch.shape):
            raise ValueError(f"perplexity: logits_fn returned shape {tuple(logits.shape)} for input "
                             f"{tuple(batch.shape)}; expected [B, W, vocab]")
        vocab = logits.shape[-1]
        top = int(batch.max())
        if top >= vocab:
            raise ValueError(f"perplexity: token id {top} >= logits vocab size {vocab}")
        logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
        nll = -logp.gather(-1, batch[:, 1:, None].to(logp.device)).squeeze(-1)  # [B, W-1]
        first = torch.tensor([f for _, f in chunk], device=nll.device)
        mask = offsets.to(nll.device)[None, :] >= first[:, None]
        total += torch.where(mask, nll, torch.zeros_like(nll)).sum(dtype=torch.float64).to(total.device)
        scored += int(mask.sum())
    mean = total.item() / scored
    return {"ppl": math.exp(mean), "nll": mean, "tokens_scored": scored, "windows": len(plan),
            "window": window, "stride": stride}


def tokenize_dataset(name: str, split: str = "test", tokenizer=None, root=None) -> torch.Tensor:
    """Token ids of a data set's evaluation text (``data.eval_text``), tokenized once as one stream.

    Default tokenizer: ``ByteTokenizer()`` with its plain ``encode`` (no BOS; upstream's single leading BOS
    over a whole split changes nothing measurable).
    """
    if tokenizer is None:
        from ..tokenizer import ByteTokenizer
        tokenizer = ByteTokenizer()
    return torch.tensor(tokenizer.encode(eval_text(name, split, root)), dtype=torch.long)


def evaluate_perplexity(logits_fn, name: str, window: int, split: str = "test", tokenizer=None,
                        root=None, **kw) -> dict:
    """``perplexity`` on a registered data set (``DATASETS``); extra keywords go to ``perplexity``."""
    out = perplexity(logits_fn, tokenize_dataset(name, split, tokenizer, root), window, **kw)
    out.update(dataset=name, split=split)
    return out


@torch.no_grad()
def seq2seq_loss(model_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                 pairs: Iterable[tuple[Sequence[int], Sequence[int]]], decoder_start_id: int,
                 device: torch.device | str | None = None) -> dict:
    """Teacher-forced target NLL of an encoder-decoder model, one pair at a time (no padding to get wrong).

    pairs: (encoder_ids, decoder_target_ids). The decoder input is the target shifted right behind
    ``decoder_start_id`` (T5/Switch use the pad id). ``model_fn(enc_ids [1,Le], dec_input_ids [1,Ld])`` returns
    logits [1,Ld,V]. Returns dict(nll (mean per target token), ppl, tokens_scored, pairs).
    """
    total, scored, count = 0.0, 0, 0
    for enc, tgt in pairs:
        enc = torch.as_tensor(enc, dtype=torch.long, device=device).flatten()[None]
        tgt = torch.as_tensor(tgt, dtype=torch.long, device=device).flatten()[None]
        if enc.numel() == 0 or tgt.numel() == 0:
            raise ValueError(f"seq2seq_loss: pair {count} has an empty encoder input or target")
        start = torch.full((1, 1), decoder_start_id, dtype=torch.long, device=tgt.device)
        dec_in = torch.cat([start, tgt[:, :-1]], dim=1)
        logits = _logits(model_fn(enc, dec_in))
        if logits.dim() != 3 or tuple(logits.shape[:2]) != tuple(dec_in.shape):
            raise ValueError(f"seq2seq_loss: model_fn returned shape {tuple(logits.shape)} for decoder "
                             f"input {tuple(dec_in.shape)}; expected [1, Ld, vocab]")
        logp = torch.log_softmax(logits.float(), dim=-1)
        total += -logp.gather(-1, tgt[..., None].to(logp.device)).sum(dtype=torch.float64).item()
        scored += tgt.numel()
        count += 1
    if count == 0:
        raise ValueError("seq2seq_loss: no pairs")
    mean = total / scored
    return {"nll": mean, "ppl": math.exp(mean), "tokens_scored": scored, "pairs": count}


def rouge1(prediction_tokens: Sequence, reference_tokens: Sequence) -> float:
    """ROUGE-1 F1: clipped unigram overlap, F1 of precision (over prediction) and recall (over reference).

    Tokens are any hashables (ids or words; see ``rouge_tokens`` for text). Returns 0.0 if either is empty,
    as the ``rouge_score`` package does.
    """
    if not prediction_tokens or not reference_tokens:
        return 0.0
    overlap = sum((Counter(prediction_tokens) & Counter(reference_tokens)).values())
    if overlap == 0:
        return 0.0
    p = overlap / len(prediction_tokens)
    r = overlap / len(reference_tokens)
    return 2 * p * r / (p + r)


def rouge_tokens(text: str) -> list[str]:
    """Words as ``rouge_score``'s default tokenizer makes them (no stemming): lower-case, runs of [a-z0-9]."""
    out, cur = [], []
    for ch in text.lower():
        if ("a" <= ch <= "z") or ("0" <= ch <= "9"):
            cur.append(ch)
        elif cur:
            out.append("".join(cur))
            cur = []
    if cur:
        out.append("".join(cur))
    return out


def hf_logits_fn(model) -> Callable[[torch.Tensor], torch.Tensor]:
    """Adapter for a Hugging Face causal LM: ids [B,W] -> logits [B,W,V] (ids moved to the model's device)."""
    dev = next(model.parameters()).device

    def fn(ids: torch.Tensor) -> torch.Tensor:
        return model(input_ids=ids.to(dev), use_cache=False).logits

    return fn


def hf_seq2seq_fn(model) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Adapter for a Hugging Face encoder-decoder (e.g. SwitchTransformersForConditionalGeneration)."""
    dev = next(model.parameters()).device

    def fn(enc: torch.Tensor, dec: torch.Tensor) -> torch.Tensor:
        return model(input_ids=enc.to(dev), decoder_input_ids=dec.to(dev), use_cache=False).logits

    return fn
