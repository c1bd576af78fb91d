"""Model-merging baselines: weight averaging, task arithmetic and TIES-merging.

These are the baselines the paper compares output quality against: instead of
serving several variants, fold them into one model. Everything works one tensor
at a time (float32 math, result cast back to the input dtype), so merging large
checkpoints needs memory for one tensor per variant plus the merged output.

State dicts are any ``Mapping[str, Tensor]``; a :class:`LazyStateDict` wraps a
name list and a fetch function so tensors are read from disk only when merged.
``merge_variants`` merges a whole ``VariantSet`` (see contract) and returns a
transformers-5 state dict that loads into ``MixtralForCausalLM`` /
``SwitchTransformersForConditionalGeneration`` with ``strict=True``.

TIES (Yadav et al., NeurIPS 2023), per tensor:
  1. trim: keep the ``density`` fraction of largest-magnitude entries of each
     task vector tau_t = ft_t - base (k = max(1, int(density * numel)); entries
     tied with the k-th magnitude are kept too, as the reference code does);
  2. elect: sign = sign(sum_t trimmed_t); where that sum is exactly 0, the sign
     of the whole tensor's summed trimmed vectors is used (the reference code
     uses the whole model's; we merge tensor by tensor), and +1 if that is 0 too;
  3. disjoint mean: average, per entry, only the trimmed values whose sign
     agrees with the elected sign (0 where none does);
  result = base + scale * merged.
Trimming is per tensor (as in mergekit), not over the flattened whole model.
For Mixtral experts the unit is each original matrix: gate, up, down of one
expert (the v5 fused ``gate_up_proj`` is split for trimming and rebuilt).
"""
from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path

import torch

from ..families import get_family

__all__ = [
    "LazyStateDict",
    "average",
    "task_arithmetic",
    "ties",
    "average_tensors",
    "task_arithmetic_tensors",
    "ties_tensors",
    "merge_variants",
    "save_merged",
    "METHODS",
]


class LazyStateDict(Mapping):
    """A read-only name -> tensor mapping whose tensors come from ``fetch(name)`` on access."""

    def __init__(self, names: Iterable[str], fetch: Callable[[str], torch.Tensor]):
        self._names = list(names)
        self._set = set(self._names)
        if len(self._set) != len(self._names):
            raise ValueError("LazyStateDict: duplicate tensor names")
        self._fetch = fetch

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._set:
            raise KeyError(name)
        return self._fetch(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


# ---------------------------------------------------------------- per tensor


def _check_same(name: str, tensors: Sequence[torch.Tensor], what: Sequence[str]) -> None:
    ref = tensors[0]
    for t, w in zip(tensors[1:], what[1:]):
        if tuple(t.shape) != tuple(ref.shape):
            raise ValueError(
                f"merge: tensor {name!r} has shape {tuple(t.shape)} in {w} "
                f"but {tuple(ref.shape)} in {what[0]}"
            )


def _non_float_passthrough(name: str, tensors: Sequence[torch.Tensor]) -> torch.Tensor | None:
    """Integer/bool buffers cannot be interpolated: they must agree and are kept as is."""
    if tensors[0].is_floating_point():
        return None
    for t in tensors[1:]:
        if t.is_floating_point() or not torch.equal(t, tensors[0]):
            raise ValueError(
                f"merge: non-floating tensor {name!r} differs between models; cannot merge it"
            )
    return tensors[0].clone()


def average_tensors(tensors: Sequence[torch.Tensor], weights: Sequence[float] | None = None,
                    name: str = "<tensor>") -> torch.Tensor:
    """Weighted mean of same-shape tensors; weights are normalised to sum to 1."""
    if len(tensors) == 0:
        raise ValueError("average: no tensors")
    _check_same(name, tensors, [f"model {i}" for i in range(len(tensors))])
    keep = _non_float_passthrough(name, tensors)
    if keep is not None:
        return keep
    w = _normalise(weights, len(tensors))
    acc = torch.zeros(tensors[0].shape, dtype=torch.float32, device=tensors[0].device)
    for wi, t in zip(w, tensors):
        acc.add_(t.to(device=acc.device, dtype=torch.float32), alpha=wi)
    return acc.to(tensors[0].dtype)


def _check_task_inputs(method: str, name: str, base, finetuned):
    """Validate base + fine-tuned tensors of one name; returns the tensor to pass through unchanged
    (non-float buffers) or None when the tensors are to be merged."""
    if len(finetuned) == 0:
        raise ValueError(f"{method}: no fine-tuned models")
    allt = [base, *finetuned]
    _check_same(name, allt, ["base"] + [f"fine-tuned model {i}" for i in range(len(finetuned))])
    return _non_float_passthrough(name, allt)


def task_arithmetic_tensors(base: torch.Tensor, finetuned: Sequence[torch.Tensor], scale: float,
                            name: str = "<tensor>") -> torch.Tensor:
    """base + scale * sum_t (ft_t - base)."""
    keep = _check_task_inputs("task_arithmetic", name, base, finetuned)
    if keep is not None:
        return keep
    b = base.to(torch.float32)
    acc = torch.zeros_like(b)
    for t in finetuned:
        acc.add_(t.to(device=b.device, dtype=torch.float32) - b)
    return (b + scale * acc).to(base.dtype)


def trim_topk(tau: torch.Tensor, density: float) -> torch.Tensor:
    """Zero all but the ``density`` fraction of largest-|tau| entries (ties at the cut kept)."""
    n = tau.numel()
    if n == 0 or density >= 1.0:
        return tau.clone()
    k = max(1, int(density * n))
    mag = tau.abs().flatten()
    # k-th largest magnitude = (n - k + 1)-th smallest
    kth = torch.kthvalue(mag, n - k + 1).values
    return torch.where(tau.abs() >= kth, tau, torch.zeros_like(tau))


def ties_tensors(base: torch.Tensor, finetuned: Sequence[torch.Tensor], density: float = 0.2,
                 scale: float = 1.0, name: str = "<tensor>") -> torch.Tensor:
    """TIES-merging of one tensor (trim, elect sign, disjoint mean); see the module doc."""
    if not (0.0 < density <= 1.0):
        raise ValueError(f"ties: density must be in (0, 1], got {density}")
    keep = _check_task_inputs("ties", name, base, finetuned)
    if keep is not None:
        return keep
    b = base.to(torch.float32)
    trimmed = torch.stack(
        [trim_topk(t.to(device=b.device, dtype=torch.float32) - b, density) for t in finetuned]
    )
    total = trimmed.sum(dim=0)
    sign = torch.sign(total)
    fallback = 1.0 if total.sum() >= 0 else -1.0
    sign = torch.where(sign == 0, torch.full_like(sign, fallback), sign)
    agree = torch.where(sign > 0, trimmed > 0, trimmed < 0)
    kept = torch.where(agree, trimmed, torch.zeros_like(trimmed))
    count = agree.sum(dim=0).clamp(min=1).to(torch.float32)
    merged = kept.sum(dim=0) / count
    return (b + scale * merged).to(base.dtype)


# ---------------------------------------------------------------- state dicts


def _normalise(weights: Sequence[float] | None, n: int) -> list[float]:
    if weights is None:
        return [1.0 / n] * n
    w = [float(x) for x in weights]
    if len(w) != n:
        raise ValueError(f"average: {len(w)} weights for {n} models")
    if any(x < 0 for x in w) or sum(w) <= 0:
        raise ValueError(f"average: weights must be >= 0 with a positive sum, got {w}")
    s = sum(w)
    return [x / s for x in w]


def _check_keys(dicts: Sequence[Mapping], labels: Sequence[str]) -> list[str]:
    names = list(dicts[0].keys())
    ref = set(names)
    for d, label in zip(dicts[1:], labels[1:]):
        keys = set(d.keys())
        if keys != ref:
            missing = sorted(ref - keys)[:5]
            extra = sorted(keys - ref)[:5]
            raise ValueError(
                f"merge: {label} has different tensors than {labels[0]}: "
                f"missing {missing}{'...' if len(ref - keys) > 5 else ''}, "
                f"extra {extra}{'...' if len(keys - ref) > 5 else ''}"
            )
    return names


def average(state_dicts: Sequence[Mapping[str, torch.Tensor]],
            weights: Sequence[float] | None = None) -> dict[str, torch.Tensor]:
    """Weighted average of several state dicts (uniform when ``weights`` is None)."""
    state_dicts = list(state_dicts)
    if not state_dicts:
        raise ValueError("average: no state dicts")
    labels = [f"model {i}" for i in range(len(state_dicts))]
    names = _check_keys(state_dicts, labels)
    _normalise(weights, len(state_dicts))  # fail before any work
    return {n: average_tensors([d[n] for d in state_dicts], weights, name=n) for n in names}


def task_arithmetic(base: Mapping[str, torch.Tensor], finetuned_list: Sequence[Mapping[str, torch.Tensor]],
                    scale: float) -> dict[str, torch.Tensor]:
    """base + scale * sum_t (ft_t - base), tensor by tensor."""
    finetuned_list = list(finetuned_list)
    if not finetuned_list:
        raise ValueError("task_arithmetic: no fine-tuned models")
    names = _check_keys([base, *finetuned_list],
                        ["base"] + [f"fine-tuned model {i}" for i in range(len(finetuned_list))])
    return {n: task_arithmetic_tensors(base[n], [f[n] for f in finetuned_list], scale, name=n)
            for n in names}


def ties(base: Mapping[str, torch.Tensor], finetuned_list: Sequence[Mapping[str, torch.Tensor]],
         density: float = 0.2, scale: float = 1.0) -> dict[str, torch.Tensor]:
    """TIES-merging, tensor by tensor (see module doc for the exact rules)."""
    finetuned_list = list(finetuned_list)
    if not finetuned_list:
        raise ValueError("ties: no fine-tuned models")
    if not (0.0 < density <= 1.0):
        raise ValueError(f"ties: density must be in (0, 1], got {density}")
    names = _check_keys([base, *finetuned_list],
                        ["base"] + [f"fine-tuned model {i}" for i in range(len(finetuned_list))])
    return {n: ties_tensors(base[n], [f[n] for f in finetuned_list], density, scale, name=n)
            for n in names}


METHODS = ("average", "task_arithmetic", "ties")


# ---------------------------------------------------------------- variant sets


def _merge_one(method: str, tensors: list[torch.Tensor], base_index: int, name: str,
               kw: dict) -> torch.Tensor:
    if method == "average":
        return average_tensors(tensors, kw.get("weights"), name=name)
    base = tensors[base_index]
    rest = [t for i, t in enumerate(tensors) if i != base_index]
    if method == "task_arithmetic":
        return task_arithmetic_tensors(base, rest, kw["scale"], name=name)
    return ties_tensors(base, rest, kw.get("density", 0.2), kw.get("scale", 1.0), name=name)


def merge_variants(variant_set, method: str, base: int | str = 0, **kw) -> dict[str, torch.Tensor]:
    """Merge every variant of a ``VariantSet`` into one transformers-5 state dict.

    method: "average" (all variants; optional ``weights`` in variant order),
    "task_arithmetic" (``scale`` required) or "ties" (``density``, ``scale``).
    For the last two, ``base`` (index or name, default 0: the zoo lists the base
    first) is the base model and every other variant a fine-tuned one.
    Non-expert tensors keep their v5 names; experts are written in the v5 layout:
    Mixtral ``{layer}.experts.gate_up_proj [E,2I,H]`` / ``down_proj [E,H,I]``,
    Switch ``{layer}.experts.expert_{e}.wi.weight [I,H]`` / ``wo.weight [H,I]``.
    """
    if method not in METHODS:
        raise ValueError(f"merge_variants: unknown method {method!r}; expected one of {METHODS}")
    allowed = {"average": {"weights"}, "task_arithmetic": {"scale"}, "ties": {"density", "scale"}}[method]
    unknown = set(kw) - allowed
    if unknown:
        raise TypeError(f"merge_variants({method!r}): unexpected arguments {sorted(unknown)}")
    if method == "task_arithmetic" and "scale" not in kw:
        raise TypeError("merge_variants('task_arithmetic') needs scale=")
    variants = list(variant_set)
    if method != "average" and len(variants) < 2:
        raise ValueError(f"merge_variants({method!r}) needs a base and at least one fine-tuned variant")
    if method == "average" and kw.get("weights") is not None:
        _normalise(kw["weights"], len(variants))
    if isinstance(base, str):
        names = [v.name for v in variants]
        if base not in names:
            raise ValueError(f"merge_variants: base {base!r} not among variants {names}")
        base_index = names.index(base)
    else:
        base_index = int(base)
        if not 0 <= base_index < len(variants):
            raise ValueError(f"merge_variants: base index {base_index} out of range for {len(variants)} variants")
    if method == "ties":
        d = kw.get("density", 0.2)
        if not (0.0 < d <= 1.0):
            raise ValueError(f"ties: density must be in (0, 1], got {d}")

    family = variants[0].family
    for v in variants[1:]:
        if v.family != family:
            raise ValueError(f"merge_variants: variant {v.name!r} is {v.family}, {variants[0].name!r} is {family}")
    labels = [f"variant {v.name!r}" for v in variants]
    non_expert = _check_keys([dict.fromkeys(v.non_expert_names()) for v in variants], labels)

    out: dict[str, torch.Tensor] = {}
    for n in non_expert:
        out[n] = _merge_one(method, [v.tensor(n) for v in variants], base_index, n, kw)

    moe_layers = list(variants[0].moe_layers)
    for v in variants[1:]:
        if list(v.moe_layers) != moe_layers:
            raise ValueError(f"merge_variants: {labels[0]} and variant {v.name!r} have different MoE layers")
    num_experts = variants[0].num_experts
    adapter = get_family(family)  # where the family's expert tensors go, and whether gate and up are separate
    gated = adapter.gated
    for layer, prefix in enumerate(moe_layers):
        stacks = None  # per expert tensor kind (w1, w2[, b1, b2]): the merged experts of this layer
        for e in range(num_experts):
            # slab layout; with biases (GPT-OSS) 4 tensors (duck-typed variants may offer expert() only)
            experts = [getattr(v, "expert_tensors", v.expert)(layer, e) for v in variants]
            tag = f"{prefix} expert {e}"
            merged = []
            for k, kind in enumerate(("w1", "w2", "b1", "b2")[:len(experts[0])]):
                parts = [x[k] for x in experts]
                if gated and kind in ("w1", "b1"):
                    # trim gate and up separately: they are separate matrices (w1/w3) in the original checkpoints
                    rows = parts[0].shape[0]
                    if rows % 2:
                        raise ValueError(f"merge_variants: {tag} {kind} has {rows} rows; gated experts need 2*I")
                    i = rows // 2
                    gate = _merge_one(method, [t[:i] for t in parts], base_index, f"{tag} gate", kw)
                    up = _merge_one(method, [t[i:] for t in parts], base_index, f"{tag} up", kw)
                    merged.append(torch.cat([gate, up], dim=0))
                else:
                    merged.append(_merge_one(method, parts, base_index, f"{tag} {kind}", kw))
            stacks = [[t] for t in merged] if stacks is None else [s + [t] for s, t in zip(stacks, merged)]
        out.update(adapter.expert_state(prefix, *(torch.stack(s) for s in stacks)))
    return out


# files copied next to the merged weights so the directory loads like the variant it came from
_SIDE_FILES = ("config.json", "generation_config.json", "multimoe_tokenizer.json")


def save_merged(state_dict: Mapping[str, torch.Tensor], out_dir: str | os.PathLike, like) -> Path:
    """Write a merged state dict as a Hugging Face directory (``model.safetensors`` plus the config and
    tokenizer files of ``like``, a Variant or a checkpoint directory), loadable by ``from_pretrained``
    and by ``checkpoint.load_variant``. Returns the directory."""
    from safetensors.torch import save_file

    src = Path(getattr(like, "path", like))
    if not (src / "config.json").is_file():
        raise FileNotFoundError(f"save_merged: {src / 'config.json'} missing; 'like' must be a variant directory")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for f in _SIDE_FILES:
        if (src / f).is_file():
            shutil.copyfile(src / f, out / f)
    # safetensors refuses non-contiguous tensors (a caller's dict may hold views)
    tensors = {k: v.detach().contiguous() for k, v in state_dict.items()}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out
