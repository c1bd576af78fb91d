"""Measured cost of each way to store an expert: the plan's ``loss`` criterion.

For every non-anchor variant, its own model (transformers skeleton, own non-expert weights) runs with its
experts in a small slab; one expert at a time is replaced by an approximation (the anchor's copy, or the
anchor's copy plus a compressed delta of each codec and size) and the variant's mean next-token loss on
its calibration batches is measured. The cost of an option is that loss minus the variant's own loss
(nats per token: 0.0198 is a 2% perplexity increase). The entries a variant routes little to, or whose
change its later layers absorb, come out cheap whatever their weight distance: that is the point (on the
mixtral-tiny zoo the cost of sharing correlates negatively with relative L2).

Calibration batches are the variant's own text, held apart from evaluation (the zoo's held-out tail);
``lm_batches`` / ``seq2seq_batches`` build them, ``text_batches`` from a text file with the zoo's byte
tokenizer. Everything is seeded by the data alone (no sampling); a progress bar counts evaluations.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from . import plan as plan_mod
from .delta import encode_delta
from .experts import ActiveVariant, SlabExperts, moe_layer_prefixes
from .plan.common import PlanError, progress_bar
from .plan.mixed import DEFAULT_CODECS, SHARE, Costs, canonical_option
from .slab import ExpertSlab, SlotTable


def lm_batches(ids, seq_len: int = 256, max_tokens: int = 4096, batch_size: int = 8) -> list[dict]:
    """Consecutive windows of ``seq_len`` tokens (at most ``max_tokens`` in all) as causal-LM batches."""
    ids = torch.as_tensor(ids, dtype=torch.long).flatten()
    n = min(len(ids), max_tokens) // seq_len
    if n == 0:
        raise PlanError(f"calibration text has {len(ids)} tokens, fewer than one window of {seq_len}")
    windows = ids[:n * seq_len].view(n, seq_len)
    return [{"input_ids": windows[i:i + batch_size]} for i in range(0, n, batch_size)]


def seq2seq_batches(pairs, decoder_start_id: int, batch_size: int = 16) -> list[dict]:
    """(encoder ids, target ids) pairs as seq2seq batches of equal lengths (no padding to mask)."""
    groups: dict = {}
    for enc, tgt in pairs:
        groups.setdefault((len(enc), len(tgt)), []).append((enc, tgt))
    out = []
    for group in groups.values():
        for b0 in range(0, len(group), batch_size):
            chunk = group[b0:b0 + batch_size]
            enc = torch.tensor([p[0] for p in chunk], dtype=torch.long)
            tgt = torch.tensor([p[1] for p in chunk], dtype=torch.long)
            dec = torch.cat([torch.full((len(chunk), 1), decoder_start_id, dtype=torch.long), tgt[:, :-1]], 1)
            out.append({"input_ids": enc, "decoder_input_ids": dec, "labels": tgt})
    if not out:
        raise PlanError("no calibration pairs")
    return out


def text_batches(variant, text: str, seq_len: int = 256, max_tokens: int = 4096) -> list[dict]:
    """Causal-LM batches of ``text`` with the zoo's byte tokenizer saved next to the variant."""
    from .tokenizer import TOKENIZER_FILE, ByteTokenizer

    if variant.adapter.encoder_decoder:
        raise PlanError("text_batches builds causal-LM batches; for Switch variants pass seq2seq_batches")
    if not (Path(variant.path) / TOKENIZER_FILE).exists():
        raise PlanError(f"{variant.path}: no {TOKENIZER_FILE}; build calibration batches with your own tokenizer "
                        f"(lm_batches on token ids)")
    return lm_batches(ByteTokenizer.load(variant.path).encode(text), seq_len, max_tokens)


@torch.inference_mode()
def mean_nll(model, batches: list[dict]) -> tuple[float, int]:
    """Mean next-token (or label) NLL in nats over all batches, and the number of tokens scored."""
    total = torch.zeros((), dtype=torch.float64)
    count = 0
    for b in batches:
        if "labels" in b:
            logits = model(input_ids=b["input_ids"], decoder_input_ids=b["decoder_input_ids"], use_cache=False).logits
            target = b["labels"]
        else:
            logits = model(input_ids=b["input_ids"], use_cache=False).logits[:, :-1]
            target = b["input_ids"][:, 1:]
        logp = F.log_softmax(logits.float(), dim=-1)
        mask = target != -100
        total += -logp.gather(-1, target.clamp_min(0)[..., None])[..., 0][mask].sum(dtype=torch.float64)
        count += int(mask.sum())
    if not count:
        raise PlanError("calibration batches score no tokens")
    return float(total / count), count


def _variant_model(variant_set, v: int):
    """Variant v's transformers model (fp32) whose experts read a slab of its own experts plus one probe slot.
    Returns (model, slab, table, probe slot)."""
    from .model import MODEL_CLASSES

    vs = variant_set
    L, E = vs.num_layers, vs.num_experts
    if vs.adapter.expert_bias:
        raise PlanError(f"measured costs (metric 'loss', codecs) cover experts without biases; the {vs.family} "
                        f"family's carry biases")
    model = MODEL_CLASSES[vs.family][1].from_pretrained(str(vs[v].path), dtype=torch.float32,
                                                        use_safetensors=True).eval()
    slab = ExpertSlab(L * E + 1, vs.hidden_size, vs.intermediate_size, vs.gated, dtype=torch.float32)
    table = SlotTable(1, L, E)
    for l in range(L):
        for e in range(E):
            w1, w2 = vs[v].expert(l, e)
            slab.write(l * E + e, w1.float(), w2.float())
            table.set(0, l, e, l * E + e)
    probe = L * E
    slab.write(probe, *[t.float() for t in vs[v].expert(0, 0)])
    active = ActiveVariant(0)
    layers = moe_layer_prefixes(model)
    if layers != vs.moe_layers:
        raise PlanError(f"variant {vs.names[v]!r}: MoE blocks {layers} do not match the checkpoint's {vs.moe_layers}")
    for i, name in enumerate(layers):
        model.get_submodule(name).experts = SlabExperts(slab, table, i, active, E, backend="torch",
                                                        activation=vs.activation, alpha=vs.alpha, limit=vs.limit)
    return model, slab, table, probe


def measure_costs(variant_set, batches, codecs=DEFAULT_CODECS, anchor: int = 0, distances=None,
                  calibration: str = "", progress: bool = False) -> Costs:
    """Costs of sharing and of each codec in ``codecs`` for every non-anchor, non-duplicate entry.

    ``batches``: per variant (a list indexed like the variant set, or a dict by name) its calibration batches
    (``lm_batches`` / ``seq2seq_batches``); the anchor's are not needed. ``distances`` (optional, from
    ``plan.compute_distances``) says which entries are byte-identical to the anchor's (skipped: free).
    """
    vs = variant_set
    V, L, E = len(vs), vs.num_layers, vs.num_experts
    options = [SHARE] + [canonical_option(c) for c in codecs]
    if isinstance(batches, dict):
        batches = [batches.get(n) for n in vs.names]
    if distances is None:
        distances = plan_mod.compute_distances(vs, anchor=anchor)
    todo = [(v, l, e) for v in range(V) if v != anchor for l in range(L) for e in range(E)
            if not distances.duplicate[v][l][e]]
    missing = sorted({vs.names[v] for v, _, _ in todo if not batches[v]})
    if missing:
        raise PlanError(f"no calibration batches for variants {missing}")
    loss = [[[None] * E for _ in range(L)] for _ in range(V)]
    base_nll, tokens = [None] * V, [0] * V
    bar = progress_bar(len(todo) * len(options), "measuring expert costs", progress)
    for v in sorted({t[0] for t in todo}):
        model, slab, table, probe = _variant_model(vs, v)
        own, tokens[v] = mean_nll(model, batches[v])
        base_nll[v] = own
        for _, l, e in (t for t in todo if t[0] == v):
            w1, w2 = (t.float() for t in vs[v].expert(l, e))
            b1, b2 = (t.float() for t in vs[anchor].expert(l, e))
            cell = {}
            for opt in options:
                if opt == SHARE:
                    p1, p2 = b1, b2
                else:
                    d1, d2 = encode_delta(w1 - b1, w2 - b2, opt).decode()
                    p1, p2 = b1 + d1, b2 + d2
                slab.write(probe, p1, p2)
                table.slots[0, l, e] = probe
                try:
                    cell[opt] = mean_nll(model, batches[v])[0] - own
                finally:
                    table.slots[0, l, e] = l * E + e
                bar.update(1)
            loss[v][l][e] = cell
        del model, slab
    bar.close()
    return Costs(anchor=anchor, options=options, loss=loss, base_nll=base_nll, tokens=tokens,
                 calibration=calibration)
