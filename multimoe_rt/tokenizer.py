"""Byte-level tokenizer shared by every zoo model.

Ids 0..255 are the UTF-8 bytes themselves, so any text round-trips without a vocabulary file; a few special ids
follow (pad, eos, bos, and sentinels that mark masked spans in Switch span-corruption denoising, as T5's
<extra_id_k> do). The zoo writes `multimoe_tokenizer.json` next to each checkpoint so a directory says which
ids its embedding rows mean; transformers never needs to read it.
"""

from __future__ import annotations

import codecs
import json
from pathlib import Path

TOKENIZER_FILE = "multimoe_tokenizer.json"


class ByteTokenizer:
    """Bytes 0..255, then pad, eos, bos, then `num_sentinels` sentinel ids (vocab_size = 259 + num_sentinels)."""

    kind = "multimoe_rt.ByteTokenizer"

    def __init__(self, num_sentinels: int = 13):
        if num_sentinels < 0:
            raise ValueError(f"num_sentinels must be >= 0, got {num_sentinels}")
        self.num_sentinels = num_sentinels
        self.pad_id = 256
        self.eos_id = 257
        self.bos_id = 258
        self.first_sentinel_id = 259
        # 13 sentinels make the default vocabulary 272, a multiple of 16, which keeps embedding rows aligned.
        self.vocab_size = self.first_sentinel_id + num_sentinels

    def encode(self, text: str, add_eos: bool = False) -> list[int]:
        """UTF-8 bytes of ``text``; a lone surrogate (not encodable as UTF-8) raises ``ValueError`` at its position."""
        try:
            ids = list(text.encode("utf-8"))
        except UnicodeEncodeError as e:
            raise ValueError(f"text is not valid Unicode: {text[e.start]!r} at position {e.start} is a lone "
                             "surrogate") from None
        if add_eos:
            ids.append(self.eos_id)
        return ids

    def decode(self, ids, skip_special: bool = True) -> str:
        """Bytes back to text (invalid UTF-8 becomes U+FFFD); specials are dropped, or shown as <name> tokens."""
        out = bytearray()
        for i in ids:
            i = int(i)
            if 0 <= i < 256:
                out.append(i)
            elif not skip_special:
                out.extend(self.special_name(i).encode("ascii"))
        return out.decode("utf-8", errors="replace")

    def stream_decoder(self, skip_special: bool = True) -> "ByteStreamDecoder":
        """An incremental decoder: ids in one at a time, text out, each byte decoded once."""
        return ByteStreamDecoder(self, skip_special)

    def sentinel(self, k: int) -> int:
        if not 0 <= k < self.num_sentinels:
            raise ValueError(f"sentinel index {k} out of range [0, {self.num_sentinels})")
        return self.first_sentinel_id + k

    def special_name(self, i: int) -> str:
        if i == self.pad_id:
            return "<pad>"
        if i == self.eos_id:
            return "</s>"
        if i == self.bos_id:
            return "<s>"
        if self.first_sentinel_id <= i < self.vocab_size:
            return f"<extra_id_{i - self.first_sentinel_id}>"
        raise ValueError(f"id {i} is not a special id of this tokenizer (vocab_size {self.vocab_size})")

    def to_dict(self) -> dict:
        return {
            "kind": self.kind,
            "vocab_size": self.vocab_size,
            "bytes": [0, 255],
            "pad_id": self.pad_id,
            "eos_id": self.eos_id,
            "bos_id": self.bos_id,
            "first_sentinel_id": self.first_sentinel_id,
            "num_sentinels": self.num_sentinels,
        }

    def save(self, directory) -> Path:
        path = Path(directory) / TOKENIZER_FILE
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, directory) -> "ByteTokenizer":
        path = Path(directory) / TOKENIZER_FILE
        d = json.loads(path.read_text())
        if d.get("kind") != cls.kind:
            raise ValueError(f"{path}: kind {d.get('kind')!r} is not {cls.kind!r}")
        tok = cls(num_sentinels=int(d["num_sentinels"]))
        if tok.to_dict() != d:
            raise ValueError(f"{path}: layout {d} differs from this ByteTokenizer's {tok.to_dict()}")
        return tok


class ByteStreamDecoder:
    """Token ids in, one at a time, text out: ``push(id) -> str``, ``flush() -> str`` at the end.

    Each byte goes through Python's incremental UTF-8 decoder once, so a token costs the same at the 4,000th
    token as at the first (re-decoding the whole output per token made streaming quadratic). A character whose
    bytes arrive in several tokens comes out whole with its last byte; the concatenated output equals
    ``ByteTokenizer.decode`` of all the ids. ``work``: ids decoded so far (a cost measure for tests)."""

    def __init__(self, tok: ByteTokenizer, skip_special: bool = True):
        self.tok, self.skip_special = tok, skip_special
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.work = 0

    def push(self, token: int) -> str:
        token = int(token)
        self.work += 1
        if 0 <= token < 256:
            return self._utf8.decode(bytes((token,)))
        if self.skip_special:
            return ""
        return self._utf8.decode(self.tok.special_name(token).encode("ascii"))

    def flush(self) -> str:
        return self._utf8.decode(b"", final=True)


class WindowStreamDecoder:
    """Incremental detokenization for any ``decode(ids) -> str`` (a transformers tokenizer), as vLLM does it:
    decode only the ids since the last emitted boundary, with the token before it as context (so a
    SentencePiece leading space or a byte-fallback sequence decodes as in the whole text), and emit the new
    text once it does not end in U+FFFD (an incomplete character). The window is bounded (``max_window``
    ids), so the cost per token stays flat however long the output grows. ``work``: ids decoded so far."""

    def __init__(self, decode, max_window: int = 16):
        self.decode, self.max_window = decode, max_window
        self.ids: list[int] = []
        self.prefix = self.read = 0     # ids[prefix:read] is the context already emitted; ids[read:] is held
        self.work = 0

    def _text(self, ids) -> str:
        self.work += len(ids)
        return self.decode(ids) if ids else ""

    def push(self, token: int) -> str:
        self.ids.append(int(token))
        before = self._text(self.ids[self.prefix:self.read])
        after = self._text(self.ids[self.prefix:])
        held = len(self.ids) - self.read
        if len(after) > len(before) and (not after.endswith("\ufffd") or held >= self.max_window):
            self.prefix, self.read = self.read, len(self.ids)
            return after[len(before):]
        return ""

    def flush(self) -> str:
        if self.read == len(self.ids):
            return ""
        before = self._text(self.ids[self.prefix:self.read])
        after = self._text(self.ids[self.prefix:])
        self.prefix = self.read = len(self.ids)
        return after[len(before):]
