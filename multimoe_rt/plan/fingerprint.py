"""Content fingerprints: of an expert (its weights' bytes) and of a checkpoint directory, so a plan
refuses checkpoints that changed since it was made."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

from ..checkpoint import raw_safetensors_header, safetensors_data_bytes, tensor_digest
from .common import PlanError


def expert_hash(w1: torch.Tensor, w2: torch.Tensor, *biases: torch.Tensor) -> str:
    """blake2b of the raw bytes (plus dtype and shapes, so equal bytes of another layout differ); the expert's
    biases, for families that have them (``Variant.expert_tensors``), are part of it."""
    return tensor_digest(w1, w2, *biases)


_EXPERT_HASHES: dict = {}  # (path, fingerprint) -> [L][E]: each checkpoint content is hashed once per process


def checkpoint_expert_hashes(variant, num_layers: int, num_experts: int, fingerprint: str | None = None) -> list:
    """``[L][E]`` ``expert_hash`` of every expert in one variant's checkpoint: what a plan's ``hashes`` must equal.
    Cached by content ``fingerprint`` when given, so loading many plans against one checkpoint hashes it once."""
    key = (str(variant.path), fingerprint)
    if fingerprint is not None and key in _EXPERT_HASHES:
        return _EXPERT_HASHES[key]
    hashes = [[expert_hash(*variant.expert_tensors(l, e)) for e in range(num_experts)] for l in range(num_layers)]
    if fingerprint is not None:
        _EXPERT_HASHES[key] = hashes
    return hashes


# Files up to this size are hashed whole; larger ones are sampled (a fine-tune changes nearly
# every byte of the tensors it touches, so samples catch it; load_slab also re-hashes every
# expert it reads against the plan).
_FULL_HASH_LIMIT = 64 * 1024**2
_SAMPLE_CHUNKS, _SAMPLE_BYTES = 256, 64 * 1024


def checkpoint_fingerprint(path: str | os.PathLike) -> str:
    """A content fingerprint of an HF directory: config.json + every *.safetensors file.

    Uses contents, not mtimes, so a copied directory still matches and a rewritten one does not.
    """
    path = Path(path)
    h = hashlib.blake2b(digest_size=16)
    cfg = path / "config.json"
    if cfg.exists():
        h.update(cfg.read_bytes())
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise PlanError(f"{path}: no *.safetensors files to fingerprint")
    for f in files:
        size = f.stat().st_size
        h.update(f"{f.name}:{size};".encode())
        with open(f, "rb") as fh:
            if size <= _FULL_HASH_LIMIT:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
            else:
                h.update(raw_safetensors_header(fh, f, size))
                for i in range(_SAMPLE_CHUNKS):
                    fh.seek(i * (size - _SAMPLE_BYTES) // (_SAMPLE_CHUNKS - 1))
                    h.update(fh.read(_SAMPLE_BYTES))
    return h.hexdigest()


def checkpoint_tensor_bytes(path) -> int:
    """Bytes of all tensors stored in a directory's safetensors files (from their headers)."""
    return sum(safetensors_data_bytes(f) for f in sorted(Path(path).glob("*.safetensors")))
