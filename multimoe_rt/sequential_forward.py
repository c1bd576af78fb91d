"""The engine's fallback forward for families the batched forward does not cover (the Switch encoder-decoder):
``MultiVariantModel`` run one sequence at a time, behind the interface ``engine.Engine`` uses from
``forward.BatchedModel`` (``batch``, ``forward``, ``weights``, ``kv``, ``slab``).

What it trades: a step's sequences run one after another through transformers' own model, so every family
``MultiVariantModel`` serves is served, exactly as its ``generate`` computes it, at batch-1 speed per sequence.

- KV cache: one transformers cache per row (``SequenceCaches``), created when a sequence starts and dropped when
  its row is freed; ``max_len`` bounds prompt + new tokens as the batched cache does.
- Variants: every variant counts as resident (its set index is its variant index), because the model swaps the
  non-expert weights itself, per sequence (``MultiVariantModel.use``: the paper's partial reconfiguration). The
  engine sorts a step's sequences by set, so a step switches once per variant it holds, and the next variant's
  copy is prefetched while the current one computes (Algorithm 2's look-ahead, inside one step).
- Encoder-decoder: the prompt is the encoder input. Prompt chunks accumulate in the row until the chunk that
  asks for logits (the prompt's last); then the encoder runs once and the decoder starts from
  ``decoder_start_token_id``, whose logits give the first token. Each later token is one decoder step.
- Decoder-only: every chunk continues the row's cache.

The engine retries a failed forward in halves, re-feeding tokens at positions a row may already hold: each
row's cache is cut back to the entry's start first, so a retry never doubles keys.
"""

from __future__ import annotations

import inspect
import threading
from dataclasses import dataclass, field

import torch

from .errors import StepError
from .forward import BatchEntry
from .model import MultiVariantModel


def _nbytes(obj, seen: set) -> int:
    """Bytes of the tensors reachable from a transformers cache or model output (each tensor once)."""
    if id(obj) in seen:
        return 0
    seen.add(id(obj))
    if torch.is_tensor(obj):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_nbytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(v, seen) for v in obj)
    if hasattr(obj, "__dict__") and not isinstance(obj, type):
        return sum(_nbytes(v, seen) for v in vars(obj).values())
    return 0


@dataclass
class _Row:
    """One sequence's state: ``length`` = its tokens whose keys the row holds, in the engine's positions
    (encoder-decoder: the prompt, then one per decoder token after the start token)."""
    length: int = 0
    prompt: list = field(default_factory=list)   # encoder-decoder: the prompt received so far
    cache: object = None
    encoder: object = None                        # encoder-decoder: the encoder's output, once the prompt is whole
    nbytes: int = 0


class SequenceCaches:
    """The rows of ``SequentialModel``: a free list (as ``kv_cache.KVCache``) and one transformers cache per
    allocated row. ``nbytes``: the bytes the rows' caches (and encoder outputs) hold now; they grow with the
    sequences instead of being reserved up front."""

    def __init__(self, max_seqs: int, max_len: int):
        for what, n in (("max_seqs", max_seqs), ("max_len", max_len)):
            if n <= 0:
                raise ValueError(f"SequenceCaches: {what} must be positive, got {n}")
        self.max_seqs, self.max_len = max_seqs, max_len
        self.rows: list[_Row | None] = [None] * max_seqs
        self._free = list(range(max_seqs))[::-1]
        self._lock = threading.Lock()

    @property
    def num_free(self) -> int:
        with self._lock:
            return len(self._free)

    @property
    def nbytes(self) -> int:
        with self._lock:
            return sum(r.nbytes for r in self.rows if r is not None)

    def allocate(self) -> int | None:
        with self._lock:
            if not self._free:
                return None
            row = self._free.pop()
            self.rows[row] = _Row()
            return row

    def free(self, row: int) -> None:
        with self._lock:
            if not 0 <= row < self.max_seqs or row in self._free:
                raise ValueError(f"SequenceCaches.free: row {row} is not allocated")
            self.rows[row] = None
            self._free.append(row)

    def row(self, row: int) -> _Row:
        with self._lock:
            r = self.rows[row] if 0 <= row < self.max_seqs else None
        if r is None:
            raise StepError(f"KV-cache row {row} is not allocated")
        return r


class ModelSets:
    """The ``weights`` face of ``SequentialModel``: ``weights.VariantWeights``'s methods the engine calls, over a
    model that swaps its own non-expert set per sequence. Every variant is resident as set = variant index, so
    nothing is ever loaded, evicted or drained here; ``stats`` are the model's swaps."""

    def __init__(self, mv: MultiVariantModel):
        self.mv = mv
        self.names = list(mv.names)
        self.num_sets = len(self.names)
        # [sets, vocab, hidden] as VariantWeights stacks it; the engine reads the vocabulary from shape[1]
        self.embed = mv.model.get_input_embeddings().weight.unsqueeze(0)

    @property
    def device_nbytes(self) -> int:
        return self.mv.store.device_nbytes

    @property
    def stats(self) -> dict:
        s = self.mv.store.stats
        return {"loads": s["switches"], "bytes_copied": s["bytes_copied"]}

    def resident(self) -> dict[int, int]:
        return {v: v for v in range(self.num_sets)}

    def lookup(self, v: int) -> int | None:
        return v if 0 <= v < self.num_sets else None

    def least_recent_set(self) -> int | None:
        return None   # nothing to drain: every variant is resident

    def start_load(self, v: int, busy) -> bool:
        return True   # already resident

    def poll(self) -> list:
        return []

    def wait_loads(self, timeout: float | None = None) -> None:
        pass          # no load is ever in flight

    def close(self) -> None:
        pass          # the model's own copy thread lives as long as the model


class SequentialModel:
    """``MultiVariantModel`` one sequence at a time, behind ``engine.Engine``'s model interface (see the module
    docstring). ``max_seqs`` rows, each up to ``max_len`` tokens (prompt + new tokens)."""

    def __init__(self, mv: MultiVariantModel, max_seqs: int, max_len: int):
        self.mv, self.slab = mv, mv.slab
        self.weights = ModelSets(mv)
        self.kv = SequenceCaches(max_seqs, max_len)
        self.encoder_decoder = mv.variant_set.adapter.encoder_decoder
        self.config = mv.model.config
        # transformers renamed the cache argument (past_key_values -> cache); take whichever this one has
        params = inspect.signature(mv.model.forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"

    def batch(self, entries: list[BatchEntry]) -> list[BatchEntry]:
        if not entries:
            raise StepError("a step needs at least one sequence")
        if any(not e.tokens for e in entries):
            raise StepError("every entry of a step needs at least one token")
        return list(entries)

    def forward(self, entries: list[BatchEntry]) -> torch.Tensor:
        """Logits ``[n, V]`` after the last token of each entry with ``logits=True``, in entry order."""
        out = []
        for i, e in enumerate(entries):
            nxt = next((f.variant for f in entries[i + 1:] if f.variant != e.variant), None)
            if nxt is not None and (i == 0 or entries[i - 1].variant != e.variant):
                self.mv.use(e.variant)
                self.mv.prefetch(nxt)   # copied while this variant's sequences compute
            logits = self._run(e)
            if e.logits:
                out.append(logits)
        if not out:
            return torch.empty(0, self.weights.embed.shape[1], device=self.slab.device)
        return torch.stack(out)

    def _new_cache(self):
        from transformers.cache_utils import DynamicCache, EncoderDecoderCache

        if self.encoder_decoder:  # no sliding windows here: plain caches, as transformers' generate builds them
            return EncoderDecoderCache(DynamicCache(), DynamicCache())
        return DynamicCache(config=self.config)  # the config says which layers slide (GPT-OSS)

    def _rewind(self, r: _Row, start: int) -> None:
        """Cut the row back to ``start`` tokens (a retried entry), or refuse a gap."""
        if start > r.length:
            raise StepError(f"an entry starts at position {start}, but its row holds {r.length} tokens")
        if start == r.length:
            return
        if self.encoder_decoder and start < len(r.prompt):
            r.prompt, r.encoder, r.cache = r.prompt[:start], None, None   # back inside the prompt
        elif start == 0 or r.cache is None:
            r.cache = None
        else:
            r.cache.crop(start - r.length)   # negative: drop that many positions (every transformers 5)
        r.length = start

    def _run(self, e: BatchEntry) -> torch.Tensor:
        r = self.kv.row(e.kv_row)
        self._rewind(r, e.start)
        if r.length + len(e.tokens) > self.kv.max_len:
            raise StepError(f"row {e.kv_row} would hold {r.length + len(e.tokens)} tokens, over max_len "
                            f"{self.kv.max_len}")
        device = self.slab.device
        if self.encoder_decoder:
            logits = self._run_encoder_decoder(e, r, device)
        else:
            r.cache = r.cache if r.cache is not None else self._new_cache()
            res = self.mv.outputs(e.variant, input_ids=torch.tensor([e.tokens], device=device), use_cache=True,
                                  **{self._cache_arg: r.cache})
            logits = res.logits[0, -1]
        r.length = e.start + len(e.tokens)
        r.nbytes = _nbytes(r.cache, set()) + _nbytes(r.encoder, set())
        return logits

    def _run_encoder_decoder(self, e: BatchEntry, r: _Row, device) -> torch.Tensor | None:
        if r.encoder is None:
            r.prompt.extend(e.tokens)
            if not e.logits:
                return None   # more of the prompt comes in later steps
            ids = torch.tensor([r.prompt], device=device)
            with self.mv.lock:  # the encoder and the first decoder step see one variant's weights
                self.mv.use(e.variant)
                with torch.inference_mode():
                    r.encoder = self.mv.model.get_encoder()(input_ids=ids)
                r.cache = self._new_cache()
                start = self.config.decoder_start_token_id
                res = self.mv.outputs(e.variant, encoder_outputs=r.encoder, use_cache=True,
                                      decoder_input_ids=torch.tensor([[start]], device=device),
                                      **{self._cache_arg: r.cache})
            return res.logits[0, -1]
        res = self.mv.outputs(e.variant, encoder_outputs=r.encoder, use_cache=True,
                              decoder_input_ids=torch.tensor([e.tokens], device=device),
                              **{self._cache_arg: r.cache})
        return res.logits[0, -1]
