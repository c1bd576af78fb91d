"""The KV cache of the batched forward: one contiguous row of ``max_len`` positions per sequence.

("Row", not "slot": a slot is a place in the expert slab.) Contiguous rows rather than vLLM's paged blocks:
a row is one index into a preallocated tensor,
so attention gathers a sequence's keys with plain indexing (no block table, no custom kernel) and
the tiny-to-medium contexts this runtime serves waste little. The cost is that every sequence
reserves ``max_len`` positions; paging is the upgrade when contexts grow long and uneven.

Thread safety: allocate/free take a lock; the tensors are written only by the engine's step thread.
"""

from __future__ import annotations

import threading

import torch


class KVCache:
    """``k``/``v``: ``[layers, max_seqs, max_len, kv_heads, head_dim]``, zero-initialised, with a free list."""

    def __init__(self, num_layers: int, max_seqs: int, max_len: int, num_kv_heads: int, head_dim: int,
                 dtype=torch.float32, device="cpu"):
        for what, n in (("num_layers", num_layers), ("max_seqs", max_seqs), ("max_len", max_len),
                        ("num_kv_heads", num_kv_heads), ("head_dim", head_dim)):
            if n <= 0:
                raise ValueError(f"KVCache: {what} must be positive, got {n}")
        shape = (num_layers, max_seqs, max_len, num_kv_heads, head_dim)
        # Zeros, not empty: padded query rows read position 0 of unused rows, which must be finite.
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_seqs, self.max_len = max_seqs, max_len
        self._free = list(range(max_seqs))[::-1]
        self._lock = threading.Lock()

    @classmethod
    def for_config(cls, config: dict, max_seqs: int, max_len: int, dtype=torch.float32, device="cpu") -> "KVCache":
        """The cache a model of this ``config.json`` needs."""
        heads = config["num_attention_heads"]
        return cls(config["num_hidden_layers"], max_seqs, max_len, config.get("num_key_value_heads") or heads,
                   config.get("head_dim") or config["hidden_size"] // heads, dtype=dtype, device=device)

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    @property
    def num_free(self) -> int:
        with self._lock:
            return len(self._free)

    def allocate(self) -> int | None:
        with self._lock:
            return self._free.pop() if self._free else None

    def free(self, row: int) -> None:
        with self._lock:
            if not 0 <= row < self.max_seqs or row in self._free:
                raise ValueError(f"KVCache.free: row {row} is not allocated")
            self._free.append(row)
