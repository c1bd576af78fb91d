"""Load MoE variants from local Hugging Face directories, lazily, and check that a set of them fits one slab.

A directory holds `config.json` and either `model.safetensors` or a sharded `model.safetensors.index.json`.
Only safetensors are read (through `safe_open`, memory-mapped); nothing is unpickled and no code from the
checkpoint runs. Every header is parsed and checked against the file size before anything is opened, so a
truncated download fails here with the file named instead of deep inside a kernel.

Families (by config["model_type"]): see ``families.py``, the one place that knows each family's config
fields, MoE layers and expert naming (both transformers-5 fused tensors and the per-expert naming of
published checkpoints); ``Variant`` asks its ``Family`` to index the files, and reads experts through it.
Non-expert tensors are always named as transformers 5 names them.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from .errors import CheckpointError  # defined with the other error classes; re-exported here
from .families import MODEL_TYPES, Family, UnknownFamilyError, family_for_config  # noqa: F401 (re-exported)

# safetensors dtype strings -> (torch dtype, bytes per element)
_DTYPES = {
    "F64": (torch.float64, 8), "F32": (torch.float32, 4), "F16": (torch.float16, 2), "BF16": (torch.bfloat16, 2),
    "I64": (torch.int64, 8), "I32": (torch.int32, 4), "I16": (torch.int16, 2), "I8": (torch.int8, 1),
    "U8": (torch.uint8, 1), "BOOL": (torch.bool, 1),
    "F8_E4M3": (torch.float8_e4m3fn, 1), "F8_E5M2": (torch.float8_e5m2, 1),
}
# Headers of real checkpoints are well under a megabyte per shard; anything huge is a corrupt length field.
_MAX_HEADER = 100 * 1024 * 1024

FAMILIES = MODEL_TYPES  # config model_type -> family name (families.FAMILIES has the adapters)


@dataclass(frozen=True)
class _Entry:
    file: Path
    dtype: str
    shape: tuple


def raw_safetensors_header(f, path: Path, size: int) -> bytes:
    """The JSON header bytes of an open safetensors file (positioned at 0), its length checked against ``size``."""
    head = f.read(8)
    if len(head) < 8:
        raise CheckpointError(f"{path}: truncated safetensors file: {size} bytes, no 8-byte header length")
    (n,) = struct.unpack("<Q", head)
    if n > _MAX_HEADER or 8 + n > size:
        raise CheckpointError(
            f"{path}: corrupt or truncated safetensors header: header length field says {n} bytes, "
            f"file has {size} bytes")
    return f.read(n)


def safetensors_data_bytes(path: Path) -> int:
    """Bytes of the tensor data in one safetensors file: the file minus its header."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        return size - 8 - len(raw_safetensors_header(f, path, size))


def tensor_digest(*tensors: torch.Tensor) -> str:
    """blake2b of the tensors' raw bytes, each with its dtype and shape (equal bytes of another layout differ).

    The one tensor hash of the package: expert hashes in plans, identical non-expert tensors in the store."""
    h = hashlib.blake2b(digest_size=16)
    for t in tensors:
        h.update(f"{t.dtype}{tuple(t.shape)};".encode())
        # a uint8 view works for bfloat16 too, which numpy cannot represent directly
        h.update(memoryview(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()))
    return h.hexdigest()


def read_safetensors_header(path: Path) -> dict[str, _Entry]:
    """Parse and check one safetensors header: JSON, dtypes, byte lengths, and that the data fits in the file."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = raw_safetensors_header(f, path, size)
            n = len(raw)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read: {e}") from e
    try:
        header = json.loads(raw.decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except (UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{path}: corrupt safetensors header (not valid JSON: {e})") from e

    entries, data_end = {}, 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
            ok = all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in (*shape, begin, end))
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: corrupt safetensors header entry for tensor '{name}': {info!r}") from e
        if not ok or begin > end:
            raise CheckpointError(f"{path}: corrupt safetensors header entry for tensor '{name}': shape and "
                                  f"data_offsets must be integers >= 0 with begin <= end, got {info!r}")
        if not isinstance(dtype, str) or dtype not in _DTYPES:
            raise CheckpointError(f"{path}: tensor '{name}': unsupported dtype {dtype!r}")
        want = math.prod(shape) * _DTYPES[dtype][1]
        if end - begin != want:
            raise CheckpointError(
                f"{path}: tensor '{name}': header gives {end - begin} bytes for {dtype} {list(shape)}, expected {want}")
        data_end = max(data_end, end)
        entries[name] = _Entry(path, dtype, shape)
    if 8 + n + data_end > size:
        raise CheckpointError(
            f"{path}: truncated safetensors file: header says tensor data ends at byte {8 + n + data_end}, "
            f"file has {size} bytes")
    return entries


def _load_index(directory: Path) -> dict[str, _Entry]:
    """name -> entry over the directory's safetensors file(s), each header checked."""
    single = directory / "model.safetensors"
    index = directory / "model.safetensors.index.json"
    if single.is_file():
        return read_safetensors_header(single)
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: cannot read 'weight_map': {e}") from e
        entries = {}
        for shard in sorted(set(weight_map.values())):
            shard_path = directory / shard
            if not shard_path.is_file():
                raise CheckpointError(f"{index}: shard '{shard}' listed in weight_map is missing ({shard_path})")
            entries.update(read_safetensors_header(shard_path))
        for name, shard in weight_map.items():
            if name not in entries or entries[name].file.name != Path(shard).name:
                raise CheckpointError(f"{directory / shard}: tensor '{name}' listed in {index.name} is not in the file")
        return entries
    pickled = [p.name for p in directory.glob("*.bin")] + [p.name for p in directory.glob("*.pt")]
    hint = f" (found {pickled}: pickle formats are never loaded, convert to safetensors)" if pickled else ""
    raise CheckpointError(f"{directory}: no model.safetensors or model.safetensors.index.json{hint}")


def _fmt(shape) -> str:
    return str(list(shape))


class Variant:
    """One checkpoint directory, read lazily. See the module docstring for the naming it accepts."""

    def __init__(self, path, name: str | None = None, check_finite: bool = True):
        """``check_finite``: every floating tensor is checked for NaN/Inf once, as it is first read (one pass
        over bytes that are read anyway); False skips that, for people who know their checkpoints."""
        self.path = Path(path)
        self._check_finite = bool(check_finite)
        self._finite_ok: set = set()
        if not self.path.is_dir():
            raise CheckpointError(f"{self.path}: not a directory")
        self.name = name if name is not None else self.path.name
        cfg_path = self.path / "config.json"
        if not cfg_path.is_file():
            raise CheckpointError(f"{cfg_path}: missing config (config.json is required)")
        try:
            self.config = json.loads(cfg_path.read_text())
        except ValueError as e:
            raise CheckpointError(f"{cfg_path}: not valid JSON: {e}") from e
        gen_path = self.path / "generation_config.json"
        try:  # optional: transformers reads its generation defaults (EOS first of all) from here
            self.generation_config = json.loads(gen_path.read_text()) if gen_path.is_file() else {}
        except ValueError as e:
            raise CheckpointError(f"{gen_path}: not valid JSON: {e}") from e
        self.adapter: Family = family_for_config(self.config, cfg_path)
        self.family = self.adapter.name
        self._entries = _load_index(self.path)
        self._handles = {}
        # Filled by the adapter: sizes, activation (+ alpha, limit), moe_layers, per MoE layer an ExpertSource
        # (families.FusedExperts | PerExpert) in _layout, _expert_names, and _nonexpert (v5 name -> name in the file)
        self._layout: list = []
        self._nonexpert: dict[str, str] = {}
        self.adapter.index(self)
        self._n1 = 2 * self.intermediate_size if self.gated else self.intermediate_size
        self._check_dtypes()
        self.expert_nbytes = (self._n1 * self.hidden_size + self.hidden_size * self.intermediate_size) * \
            _DTYPES[self._expert_dtype][1]
        self.dtype = _DTYPES[self._expert_dtype][0]

    @property
    def eos_token_ids(self) -> tuple:
        """The ids generation stops at, as transformers decides: generation_config.json's ``eos_token_id`` if it
        sets one, else config.json's; either may be an int or a list."""
        eos = self.generation_config.get("eos_token_id")
        if eos is None:
            eos = self.config.get("eos_token_id")
        if eos is None:
            return ()
        ids = eos if isinstance(eos, list) else [eos]
        if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
            raise CheckpointError(f"{self.path}: eos_token_id must be a token id or a list of them, got {eos!r}")
        return tuple(ids)

    # ---- layout (the adapter calls these) ----
    def _expect(self, name: str, shape) -> _Entry:
        e = self._entries.get(name)
        if e is None:
            raise CheckpointError(f"{self.path}: missing tensor '{name}' (expected shape {_fmt(shape)})")
        if tuple(e.shape) != tuple(shape):
            raise CheckpointError(f"{e.file}: tensor '{name}': expected shape {_fmt(shape)}, found {_fmt(e.shape)}")
        return e

    def _check_dtypes(self):
        if not self._expert_names:
            raise CheckpointError(f"{self.path}: no MoE layers: the config describes none ({self.family})")
        dtypes = {self._entries[n].dtype for n in self._expert_names}
        if len(dtypes) != 1:
            first = sorted(self._expert_names)[0]
            odd = next(n for n in sorted(self._expert_names) if self._entries[n].dtype != self._entries[first].dtype)
            raise CheckpointError(f"{self._entries[odd].file}: tensor '{odd}': dtype {self._entries[odd].dtype}, "
                                  f"expected {self._entries[first].dtype} like '{first}' (experts must share a dtype)")
        self._expert_dtype = dtypes.pop()

    # ---- lazy reads ----
    def _handle(self, file: Path):
        h = self._handles.get(file)
        if h is None:
            try:
                h = safe_open(str(file), framework="pt")
            except Exception as e:  # safetensors raises its own error types
                raise CheckpointError(f"{file}: cannot open as safetensors: {e}") from e
            self._handles[file] = h
        return h

    def _read(self, name: str) -> torch.Tensor:
        file = self._entries[name].file
        try:
            t = self._handle(file).get_tensor(name)
        except CheckpointError:
            raise
        except Exception as e:  # safetensors' own error types: a file that changed or lies about its layout
            raise CheckpointError(f"{file}: tensor '{name}': cannot read: {e}") from e
        return self._finite(name, t)

    def _slice(self, name: str, index: int) -> torch.Tensor:
        file = self._entries[name].file
        try:
            return self._handle(file).get_slice(name)[index]
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(f"{file}: tensor '{name}': cannot read row {index}: {e}") from e

    def _finite(self, name: str, t: torch.Tensor, expert: int | None = None) -> torch.Tensor:
        """``t`` (tensor ``name``, or its slice for ``expert``) once checked for NaN/Inf, when checking is on."""
        key = name if expert is None else (name, expert)
        if not self._check_finite or key in self._finite_ok or not t.is_floating_point():
            return t
        x = t.float() if t.element_size() == 1 else t  # float8: isfinite is not implemented for every kind
        if not bool(torch.isfinite(x).all()):
            n_nan, n_inf = int(torch.isnan(x).sum()), int(torch.isinf(x).sum())
            where = "" if expert is None else f" (expert {expert})"
            raise CheckpointError(
                f"{self._entries[name].file}: tensor '{name}'{where}: {n_nan + n_inf} non-finite values "
                f"({n_nan} NaN, {n_inf} Inf) of {t.numel()}; expected finite values. Fix or re-export the "
                f"checkpoint (check_finite=False skips this check)")
        self._finite_ok.add(key)
        return t

    def expert(self, layer: int, expert: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(w1, w2) of one expert in the slab's layout: w1 [2I, H] (gate rows then up rows) or [I, H] (Switch wi);
        w2 [H, I]. Families that store experts otherwise (GPT-OSS) are converted here (``families``)."""
        if not 0 <= layer < len(self.moe_layers):
            raise IndexError(f"variant '{self.name}': MoE layer {layer} out of range [0, {len(self.moe_layers)})")
        if not 0 <= expert < self.num_experts:
            raise IndexError(f"variant '{self.name}': expert {expert} out of range [0, {self.num_experts})")
        return self._layout[layer].read(self, expert)

    def expert_bias(self, layer: int, expert: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(b1 [2I], b2 [H]) of one expert in the slab's layout (gate then up), or None for families without
        expert biases."""
        return self._layout[layer].read_bias(self, expert)

    def expert_tensors(self, layer: int, expert: int) -> tuple:
        """Everything a slab slot holds for one expert: ``(w1, w2)``, or ``(w1, w2, b1, b2)`` for families with
        expert biases. What plans hash and compare, and what ``ExpertSlab.write`` takes."""
        w = self.expert(layer, expert)
        b = self.expert_bias(layer, expert)
        return w if b is None else (*w, *b)

    def non_expert_names(self) -> list[str]:
        return list(self._nonexpert)

    def tensor(self, name: str) -> torch.Tensor:
        """A non-expert tensor by its transformers-5 name."""
        if name not in self._nonexpert:
            raise CheckpointError(f"{self.path}: missing tensor '{name}' (not a non-expert tensor of variant "
                                  f"'{self.name}'; it has {len(self._nonexpert)})")
        return self._read(self._nonexpert[name])

    def tensor_shape(self, name: str) -> tuple:
        return tuple(self._entries[self._nonexpert[name]].shape)

    def tensor_file(self, name: str) -> Path:
        """The file a non-expert tensor lives in (for error messages and tools)."""
        return self._entries[self._nonexpert[name]].file

    def check_finite(self):
        """Read every floating tensor now (not only as it is used) and raise on the first holding NaN or Inf."""
        checking, self._check_finite = self._check_finite, True
        try:
            for name, e in self._entries.items():
                if _DTYPES[e.dtype][0].is_floating_point:
                    self._read(name)
        finally:
            self._check_finite = checking

    def __repr__(self):
        return (f"Variant({self.name!r}, family={self.family}, layers={len(self.moe_layers)}, "
                f"experts={self.num_experts}, H={self.hidden_size}, I={self.intermediate_size}, dtype={self.dtype})")


def load_variant(path, name: str | None = None, check_finite: bool = True) -> Variant:
    return Variant(path, name=name, check_finite=check_finite)


@dataclass
class VariantSet:
    """Variants that can share one expert slab: same family, MoE layers, experts, sizes, top-k, vocab, dtype and
    the same non-expert tensors with the same shapes. The first variant is the reference."""

    variants: list = field(default_factory=list)

    def __post_init__(self):
        self.variants = list(self.variants)
        if not self.variants:
            raise CheckpointError("VariantSet needs at least one variant")
        names = [v.name for v in self.variants]
        dup = next((n for n in names if names.count(n) > 1), None)
        if dup is not None:
            raise CheckpointError(f"VariantSet: variant name '{dup}' used twice ({names}); pass distinct names")
        ref = self.variants[0]
        for v in self.variants[1:]:
            _check_compatible(ref, v)
        self.names = names
        self.family, self.num_layers, self.num_experts = ref.family, len(ref.moe_layers), ref.num_experts
        self.hidden_size, self.intermediate_size = ref.hidden_size, ref.intermediate_size
        self.gated, self.top_k, self.vocab_size, self.dtype = ref.gated, ref.top_k, ref.vocab_size, ref.dtype
        self.activation = ref.activation  # the experts' activation (torch_moe.ACTIVATIONS), the same in every variant
        self.alpha, self.limit = ref.alpha, ref.limit  # the clamped SwiGLU's parameters (swiglu_oai only)
        self.adapter = ref.adapter  # families.Family: what the family's layers, routers and tensors are
        self.moe_layers = list(ref.moe_layers)

    @classmethod
    def from_dirs(cls, dirs, names=None, check_finite: bool = True) -> "VariantSet":
        dirs = list(dirs)
        if names is not None and len(names) != len(dirs):
            raise CheckpointError(f"VariantSet.from_dirs: {len(names)} names for {len(dirs)} directories")
        return cls([load_variant(d, name=None if names is None else names[i], check_finite=check_finite)
                    for i, d in enumerate(dirs)])

    def __len__(self):
        return len(self.variants)

    def __getitem__(self, i):
        if isinstance(i, str):
            return self.variants[self.names.index(i)]
        return self.variants[i]

    def __iter__(self):
        return iter(self.variants)


def _check_compatible(ref: Variant, v: Variant):
    def fail(what, expected, found):
        raise CheckpointError(f"variant '{v.name}' ({v.path}) is incompatible with '{ref.name}' ({ref.path}): "
                              f"{what}: expected {expected}, found {found}")

    for attr in ("family", "num_experts", "hidden_size", "intermediate_size", "top_k", "vocab_size", "gated", "dtype",
                 "activation", "alpha", "limit"):
        if getattr(ref, attr) != getattr(v, attr):
            fail(attr, getattr(ref, attr), getattr(v, attr))
    if len(ref.moe_layers) != len(v.moe_layers):
        fail("number of MoE layers", len(ref.moe_layers), len(v.moe_layers))
    for a, b in zip(ref.moe_layers, v.moe_layers):
        if a != b:
            fail("MoE layer", a, b)
    theirs = set(v.non_expert_names())
    for name in ref.non_expert_names():
        if name not in theirs:
            raise CheckpointError(f"{v.path}: missing tensor '{name}' (present in '{ref.name}' at "
                                  f"{ref.tensor_file(name)}, shape {_fmt(ref.tensor_shape(name))})")
        if ref.tensor_shape(name) != v.tensor_shape(name):
            raise CheckpointError(f"{v.tensor_file(name)}: tensor '{name}': expected shape "
                                  f"{_fmt(ref.tensor_shape(name))} (as in '{ref.name}'), found "
                                  f"{_fmt(v.tensor_shape(name))}")
    ours = set(ref.non_expert_names())
    for name in v.non_expert_names():
        if name not in ours:
            raise CheckpointError(f"{v.tensor_file(name)}: tensor '{name}' is not in '{ref.name}' ({ref.path}): "
                                  f"expected the same non-expert tensors in every variant")
