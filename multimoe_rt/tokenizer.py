"""Byte-level tokenizer shared by every zoo model.

Ids 0..255 are the UTF-8 bytes themselves, so any text round-trips without a vocabulary file; a few special ids
follow (pad, eos, bos, and sentinels that mark masked spans in Switch span-corruption denoising, as T5's
<extra_id_k> do). The zoo writes `multimoe_tokenizer.json` next to each checkpoint so a directory says which
ids its embedding rows mean; transformers never needs to read it.
"""

from __future__ import annotations

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
        ids = list(text.encode("utf-8"))
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
