"""One request type (``SamplingParams``, validated once) and the batched sampler every engine step calls.

The sampler takes the step's logits ``[B, V]`` and one row per sampled sequence, and applies, in order:

1. penalties: ``repetition_penalty`` (HF/vLLM: a seen token's logit is divided by it if positive, multiplied
   if negative; "seen" = in the prompt or the output), then ``presence_penalty`` and ``frequency_penalty``
   (OpenAI: ``logit -= presence * [count > 0] + frequency * count`` over the output tokens);
2. ``min_tokens``: the row's end ids (its EOS unless ``ignore_eos``, and ``stop_token_ids``) get ``-inf``
   until that many tokens were generated;
3. logprobs, when asked: ``log_softmax`` of the logits at this point (after penalties, before temperature);
4. greedy rows (``temperature < GREEDY_BELOW``): ``argmax``; sampled rows: temperature, then ``top_k``,
   ``top_p`` (the smallest prefix of the sorted distribution whose mass reaches it), ``min_p`` (drop tokens
   below ``min_p`` times the most likely one's probability), then one uniform draw from the row's own
   ``torch.Generator``, so a seeded request gets the same tokens whatever else shares the step.

Every stage is one tensor operation over the batch with per-row parameters; the only Python loop over rows
draws each row's uniform from its own generator.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch

from .errors import RequestError
from .request_checks import as_bool, as_int, as_real, as_token_ids

GREEDY_BELOW = 1e-5   # temperatures below this are greedy (vLLM's floor): dividing by them overflows
MAX_LOGPROBS = 20     # OpenAI's top_logprobs limit


@dataclass(frozen=True)
class SamplingParams:
    """How one request samples and when it stops. Build it with ``SamplingParams.make(vocab_size, **fields)``
    (or ``params.validate(vocab_size)``): that checks every field once and raises ``RequestError`` naming it.

    ``temperature`` below ``GREEDY_BELOW`` is greedy. ``top_k = 0`` (or -1, vLLM's spelling) is off.
    ``stop``: token-id sequences that end the request (included in the output). ``stop_token_ids``: single
    ids that end it. ``eos_token_id``: an id or a tuple of ids; None means the model's. ``min_tokens``:
    EOS and ``stop_token_ids`` are suppressed until that many new tokens. ``logprobs``: None is off; ``k``
    returns each token's logprob and the ``k`` most likely alternatives (``0 <= k <= 20``).
    """
    max_new_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    min_tokens: int = 0
    stop: tuple = ()
    stop_token_ids: tuple = ()
    eos_token_id: int | tuple | None = None
    ignore_eos: bool = False
    seed: int | None = None
    logprobs: int | None = None

    @classmethod
    def make(cls, vocab_size: int | None = None, **kwargs) -> "SamplingParams":
        """Validated params from keyword fields; ``vocab_size`` bounds every token id when given."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise RequestError(f"unknown sampling parameter {unknown[0]!r}; known: {', '.join(sorted(known))}")
        p = {**{f.name: f.default for f in fields(cls)}, **kwargs}
        hi_id = None if vocab_size is None else vocab_size - 1

        def ids(name, x):
            return as_int(name, x, 0, hi_id)

        def id_tuple(name, x, what):
            if isinstance(x, (str, bytes)) or not isinstance(x, (list, tuple)):
                raise RequestError(f"{name} must be {what}, got {type(x).__name__} {x!r:.60}")
            return x

        out = {"max_new_tokens": as_int("max_new_tokens", p["max_new_tokens"], 1)}
        t = as_real("temperature", p["temperature"])
        if t < 0:
            raise RequestError(f"temperature must be >= 0 (below {GREEDY_BELOW} = greedy), got {t}")
        out["temperature"] = t
        out["top_p"] = as_real("top_p", p["top_p"])
        if not 0 < out["top_p"] <= 1:
            raise RequestError(f"top_p must be in (0, 1], got {out['top_p']}")
        top_k = as_int("top_k", p["top_k"], -1, None, " (0 or -1 = off)")
        out["top_k"] = max(top_k, 0)
        out["min_p"] = as_real("min_p", p["min_p"])
        if not 0 <= out["min_p"] <= 1:
            raise RequestError(f"min_p must be in [0, 1], got {out['min_p']}")
        out["repetition_penalty"] = as_real("repetition_penalty", p["repetition_penalty"])
        if not 0 < out["repetition_penalty"]:
            raise RequestError(f"repetition_penalty must be > 0 (1 = off), got {out['repetition_penalty']}")
        for name in ("presence_penalty", "frequency_penalty"):
            out[name] = as_real(name, p[name])
            if not -2 <= out[name] <= 2:
                raise RequestError(f"{name} must be in [-2, 2], got {out[name]}")
        out["min_tokens"] = as_int("min_tokens", p["min_tokens"], 0, out["max_new_tokens"],
                                   " (at most max_new_tokens)")
        stop = id_tuple("stop", () if p["stop"] is None else p["stop"], "a list of token-id sequences")
        stop = tuple(tuple(as_token_ids(s, "each stop sequence is a list of token ids")) for s in stop)
        if any(not s for s in stop):
            raise RequestError("stop sequences must not be empty")
        for s in stop:
            for i in s:
                ids("stop token id", i)
        out["stop"] = stop
        sti = id_tuple("stop_token_ids", () if p["stop_token_ids"] is None else p["stop_token_ids"],
                       "a list of token ids")
        out["stop_token_ids"] = tuple(ids("stop_token_ids", i) for i in sti)
        eos = p["eos_token_id"]
        if eos is not None and not isinstance(eos, (list, tuple)):
            eos = ids("eos_token_id", eos)
        elif eos is not None:
            eos = tuple(ids("eos_token_id", i) for i in eos)
        out["eos_token_id"] = eos
        out["ignore_eos"] = as_bool("ignore_eos", p["ignore_eos"])
        out["seed"] = None if p["seed"] is None else as_int("seed", p["seed"], 0, 2**63 - 1)
        out["logprobs"] = None if p["logprobs"] is None else as_int("logprobs", p["logprobs"], 0, MAX_LOGPROBS)
        return cls(**out)

    def validate(self, vocab_size: int | None = None) -> "SamplingParams":
        return type(self).make(vocab_size, **asdict(self))

    def replace(self, vocab_size: int | None = None, **changes) -> "SamplingParams":
        """A validated copy with ``changes``."""
        return type(self).make(vocab_size, **{**asdict(self), **changes})

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    @property
    def penalised(self) -> bool:
        return self.repetition_penalty != 1 or self.presence_penalty != 0 or self.frequency_penalty != 0


def eos_ids(eos) -> tuple:
    """An EOS setting (None, an id, or a list of ids, as configs spell it) as a tuple of ids."""
    if eos is None:
        return ()
    return tuple(int(i) for i in eos) if isinstance(eos, (list, tuple)) else (int(eos),)


@dataclass
class Row:
    """One sequence sampled this step: its params, tokens so far and generator (None for greedy rows)."""
    params: SamplingParams
    prompt: list
    output: list
    generator: torch.Generator | None = None
    end_ids: tuple = ()   # ids suppressed while len(output) < params.min_tokens (EOS, stop_token_ids)
    u: torch.Tensor | None = None  # this step's uniform, drawn once: a retried step reuses it


def make_generator(params: SamplingParams, device) -> torch.Generator | None:
    """The request's own random stream (None for greedy): seeded, or fresh entropy."""
    if params.greedy:
        return None
    g = torch.Generator(device=device)
    if params.seed is None:
        g.seed()
    else:
        g.manual_seed(params.seed)
    return g


def _col(rows, value, logits) -> torch.Tensor:
    return torch.tensor([value(r) for r in rows], dtype=logits.dtype).to(logits.device)[:, None]


def processed_logits(logits: torch.Tensor, rows: list[Row]) -> torch.Tensor:
    """Stages 1-2: penalties and ``min_tokens`` suppression (a new float tensor; ``logits`` is unchanged)."""
    x = logits.float().clone()
    B, V = x.shape
    if any(r.params.penalised for r in rows):
        seen = torch.zeros(B, V, dtype=torch.bool)
        counts = torch.zeros(B, V)
        for b, r in enumerate(rows):  # host-side index building; the arithmetic below is batched
            seen[b, r.prompt] = True
            if r.output:
                counts[b].index_add_(0, torch.tensor(r.output), torch.ones(len(r.output)))
        seen, counts = (seen | (counts > 0)).to(x.device), counts.to(x.device)
        rep = _col(rows, lambda r: r.params.repetition_penalty, x)
        x = torch.where(seen, torch.where(x > 0, x / rep, x * rep), x)
        x = x - _col(rows, lambda r: r.params.presence_penalty, x) * (counts > 0) \
            - _col(rows, lambda r: r.params.frequency_penalty, x) * counts
        # a tiny repetition_penalty can overflow: keep the logits finite so softmax never sees inf - inf
        big = torch.finfo(x.dtype).max
        x = x.clamp(-big, big)
    suppress = [(b, i) for b, r in enumerate(rows) if len(r.output) < r.params.min_tokens for i in r.end_ids]
    if suppress:
        b, i = torch.tensor(suppress).to(x.device).unbind(1)
        x[b, i] = float("-inf")
    return x


def filtered_probs(x: torch.Tensor, rows: list[Row]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stage 4 up to the draw, for sampled rows: the kept distribution in descending order (unnormalised)
    and the vocabulary id of each column. Every row takes the same path whatever its batch-mates ask for,
    so a seeded row's token does not depend on them."""
    V = x.shape[1]
    temperature = _col(rows, lambda r: r.params.temperature, x)
    z = (x - x.max(-1, keepdim=True).values) / temperature  # in [-inf, 0] with a 0 per row: no overflow
    z, order = z.sort(dim=-1, descending=True, stable=True)
    rank = torch.arange(V, device=x.device)[None]
    keep = rank < _col(rows, lambda r: r.params.top_k or V, x)
    p = torch.softmax(z.masked_fill(~keep, float("-inf")), -1)
    # top_p = 1 is off: a float32 cumsum can reach 1 before the tail, which must stay
    keep &= (p.cumsum(-1) - p) < _col(rows, lambda r: r.params.top_p if r.params.top_p < 1 else math.inf, x)
    keep &= p >= _col(rows, lambda r: r.params.min_p, x) * p[:, :1]
    return p.masked_fill(~keep, 0.0), order


def _draw(p: torch.Tensor, order: torch.Tensor, rows: list[Row]) -> torch.Tensor:
    u = torch.cat([r.u.to(p.device) for r in rows])
    cdf = p.cumsum(-1)
    # the first column whose cdf exceeds u * total: always a column with nonzero mass
    pick = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True).clamp_(max=p.shape[1] - 1)
    return order.gather(1, pick)[:, 0]


def sample_batch(logits: torch.Tensor, rows: list[Row]) -> tuple[list[int], list]:
    """One token per row of ``logits [B, V]``, and per row its logprob entry (None unless ``logprobs`` is
    set): ``(logprob of the chosen token, [(token, logprob)] of the k most likely)``, both from the
    log-softmax after penalties and min_tokens, before temperature and filtering."""
    if logits.shape[0] != len(rows):
        raise ValueError(f"sample_batch: {logits.shape[0]} logit rows for {len(rows)} sequences")
    if not bool(torch.isfinite(logits).all()):  # a NaN would come out as an arbitrary token
        raise ValueError("the model produced non-finite logits (NaN or inf)")
    for r in rows:  # before anything can fail: a retry of this step draws nothing twice
        if not r.params.greedy and r.u is None:
            r.u = torch.rand(1, generator=r.generator, device=r.generator.device)
    x = processed_logits(logits, rows)
    tokens = x.argmax(-1)
    sampled = [b for b, r in enumerate(rows) if not r.params.greedy]
    if sampled:
        idx = torch.tensor(sampled, device=x.device)
        p, order = filtered_probs(x[idx], [rows[b] for b in sampled])
        tokens[idx] = _draw(p, order, [rows[b] for b in sampled])
    want = [b for b, r in enumerate(rows) if r.params.logprobs is not None]
    out_lp = [None] * len(rows)
    if want:
        idx = torch.tensor(want, device=x.device)
        lp = torch.log_softmax(x[idx], -1)
        chosen = lp.gather(1, tokens[idx][:, None])[:, 0].tolist()
        k = max(rows[b].params.logprobs for b in want)
        top_v, top_i = lp.topk(min(k, lp.shape[1]), -1)
        top_v, top_i = top_v.tolist(), top_i.tolist()
        for j, b in enumerate(want):
            n = rows[b].params.logprobs
            out_lp[b] = (chosen[j], list(zip(top_i[j][:n], top_v[j][:n])))
    return tokens.tolist(), out_lp
