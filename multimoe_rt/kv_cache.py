"""The KV caches of the batched forward: one contiguous row of ``max_len`` positions per sequence.

("Row", not "slot": a slot is a place in the expert slab.) Contiguous rows rather than vLLM's paged blocks:
a row is one index into a preallocated tensor,
so attention gathers a sequence's keys with plain indexing (no block table, no custom kernel) and
the tiny-to-medium contexts this runtime serves waste little. The cost is that every sequence
reserves ``max_len`` positions; paging is the upgrade when contexts grow long and uneven.

Two layouts, chosen by the family record (``families.Batched.attention``) in ``KVCache.for_config``:

- ``KVCache``: keys and values per kv head (``attention.StandardAttention``). Sliding-window layers keep every
  position too (transformers keeps only the window): simpler indexing, at the cost of memory on long contexts.
- ``LatentKVCache``: DeepSeek's multi-head latent attention (``mla.LatentAttention``) caches, per token, what
  transformers' ``DeepseekV3Attention`` caches: the compressed latent after ``kv_a_layernorm``
  (``kv_lora_rank`` values) and the shared rotary key after the rotary embedding (``qk_rope_head_dim``), side by
  side in one ``[.., kv_lora_rank + qk_rope_head_dim]`` vector. Per-head keys and values are never stored.

Thread safety: allocate/free take a lock; the tensors are written only by the engine's step thread.
"""

from __future__ import annotations

import threading

import torch


class _Rows:
    """The free list of cache rows, shared by both layouts."""

    def _init_rows(self, max_seqs: int, max_len: int):
        self.max_seqs, self.max_len = max_seqs, max_len
        self._free = list(range(max_seqs))[::-1]
        self._lock = threading.Lock()

    @staticmethod
    def _check(cls_name: str, **sizes):
        for what, n in sizes.items():
            if n <= 0:
                raise ValueError(f"{cls_name}: {what} must be positive, got {n}")

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

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
                raise ValueError(f"{type(self).__name__}.free: row {row} is not allocated")
            self._free.append(row)


class KVCache(_Rows):
    """``k``/``v``: ``[layers, max_seqs, max_len, kv_heads, head_dim]``, zero-initialised, with a free list."""

    def __init__(self, num_layers: int, max_seqs: int, max_len: int, num_kv_heads: int, head_dim: int,
                 dtype=torch.float32, device="cpu"):
        self._check("KVCache", num_layers=num_layers, max_seqs=max_seqs, max_len=max_len, num_kv_heads=num_kv_heads,
                    head_dim=head_dim)
        shape = (num_layers, max_seqs, max_len, num_kv_heads, head_dim)
        # Zeros, not empty: padded query rows read position 0 of unused rows, which must be finite.
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self._init_rows(max_seqs, max_len)

    @classmethod
    def for_config(cls, config: dict, max_seqs: int, max_len: int, dtype=torch.float32, device="cpu"):
        """The cache a model of this ``config.json`` needs: a ``LatentKVCache`` for a family with latent attention
        (DeepSeek-V3), else keys and values per kv head."""
        from .families import family_for_config

        spec = family_for_config(config).batched
        if spec is not None and spec.attention == "mla":
            return LatentKVCache(config["num_hidden_layers"], max_seqs, max_len, config["kv_lora_rank"],
                                 config["qk_rope_head_dim"], dtype=dtype, device=device)
        heads = config["num_attention_heads"]
        return cls(config["num_hidden_layers"], max_seqs, max_len, config.get("num_key_value_heads") or heads,
                   config.get("head_dim") or config["hidden_size"] // heads, dtype=dtype, device=device)

    def tensors(self):
        return (self.k, self.v)


class LatentKVCache(_Rows):
    """``latent``: ``[layers, max_seqs, max_len, kv_lora_rank + rope_dim]``: per token the normalised latent, then
    the rotated shared key (see the module docstring), zero-initialised, with a free list."""

    def __init__(self, num_layers: int, max_seqs: int, max_len: int, kv_lora_rank: int, rope_dim: int,
                 dtype=torch.float32, device="cpu"):
        self._check("LatentKVCache", num_layers=num_layers, max_seqs=max_seqs, max_len=max_len,
                    kv_lora_rank=kv_lora_rank, rope_dim=rope_dim)
        self.kv_lora_rank, self.rope_dim = kv_lora_rank, rope_dim
        self.latent = torch.zeros((num_layers, max_seqs, max_len, kv_lora_rank + rope_dim), dtype=dtype, device=device)
        self._init_rows(max_seqs, max_len)

    def tensors(self):
        return (self.latent,)
