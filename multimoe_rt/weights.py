"""Per-variant non-expert weights for the batched forward: R resident sets stacked on the device.

Every variant's non-expert tensors (embeddings, attention, norms, routers, final norm, LM head) stay
in host memory (pinned where CUDA exists). R sets are resident on the device at once, stacked so
that row r of every tensor belongs to set r: ``layers[l]["qkv"][r]`` is set r's fused q/k/v
projection. A forward mixes variants by giving each token its set index.

Loading a variant that is not resident is the paper's partial reconfiguration, here the miss path
of an LRU cache: its tensors are copied into a free set (side CUDA stream on GPU, a copy thread on
CPU) while batches keep running on the other sets. The caller says which sets are busy (running
sequences read them); only an idle set is evicted, so no forward ever reads a set being written.

Thread safety: every method takes one internal lock; the copy itself runs outside it.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from .errors import CheckpointError, MultimoeError
from .families import FAMILIES, get_family


class WeightLoadError(MultimoeError, RuntimeError):
    """Copying a variant's non-expert set to the device failed; only requests for it are affected."""


def mixtral_tensor_names(num_layers: int, tied: bool) -> dict[str, list[str]]:
    """Stacked tensor key -> checkpoint tensor names concatenated (along dim 0) to build it (Mixtral)."""
    cfg = {"model_type": "mixtral", "num_hidden_layers": num_layers}
    return batched_tensor_names(get_family("mixtral"), cfg, tied)


def batched_tensor_names(family, config: dict, tied: bool) -> dict[str, list[str]]:
    """Stacked tensor key -> checkpoint tensor names concatenated (along dim 0) to build it, for a decoder
    family the batched forward covers (``families.Family.batched``).

    Every layer: ``ln1``, ``ln2`` and its attention's tensors (``attention_tensor_names``); MoE layers ``router``
    (and ``router_bias`` where the family's router has a second tensor), dense layers ``mlp_gate_up``/``mlp_down``;
    a shared expert's ``shared_gate_up``/``shared_down`` (and ``shared_gate`` for a gated one)."""
    family = get_family(family)
    spec = family.batched
    if spec is None:
        raise CheckpointError(f"the batched forward does not cover the {family.name} family; it covers "
                              f"{', '.join(batched_families())}")
    cfg = family.hf_config(config)
    moe = set(family.moe_layer_indices(config))
    names = {"embed": ["model.embed_tokens.weight"], "norm": ["model.norm.weight"]}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}"
        names[f"{i}.ln1"] = [f"{p}.input_layernorm.weight"]
        names.update({f"{i}.{k}": v for k, v in attention_tensor_names(spec, cfg, f"{p}.self_attn").items()})
        names[f"{i}.ln2"] = [f"{p}.post_attention_layernorm.weight"]
        if i in moe:
            router = [f"{p}.mlp.{t}" for t in family.router_tensors]
            names[f"{i}.router"] = router[:1]
            if spec.router_bias:
                names[f"{i}.router_bias"] = router[1:2]
            if spec.shared_expert:
                s = f"{p}.mlp.{family.shared_expert}"
                names[f"{i}.shared_gate_up"] = [f"{s}.gate_proj.weight", f"{s}.up_proj.weight"]
                names[f"{i}.shared_down"] = [f"{s}.down_proj.weight"]
                if spec.shared_expert == "sigmoid_gate":
                    names[f"{i}.shared_gate"] = [f"{p}.mlp.{family.shared_expert}_gate.weight"]
        else:
            names[f"{i}.mlp_gate_up"] = [f"{p}.mlp.gate_proj.weight", f"{p}.mlp.up_proj.weight"]
            names[f"{i}.mlp_down"] = [f"{p}.mlp.down_proj.weight"]
    if not tied:
        names["lm_head"] = ["lm_head.weight"]
    return names


def attention_tensor_names(spec, cfg, p: str) -> dict[str, list[str]]:
    """One layer's attention tensors (under ``p``, its ``self_attn``) by stacked part name.

    Standard: ``qkv`` (q, k, v stacked), ``o``, and as the family has them ``qkv_bias``/``o_bias``,
    ``q_norm``/``k_norm``, ``sinks``. MLA: ``q`` or (``q_lora_rank`` set) ``q_a``/``q_a_norm``/``q_b``, then
    ``kv_a`` (``kv_a_proj_with_mqa``), ``kv_a_norm``, ``kv_b``, ``o``, with ``q_a_bias``/``kv_a_bias``/``o_bias``
    where ``attention_bias`` is set."""
    bias = spec.biases(cfg)
    if spec.attention == "mla":
        out = ({"q": [f"{p}.q_proj.weight"]} if cfg.q_lora_rank is None else
               {"q_a": [f"{p}.q_a_proj.weight"], "q_a_norm": [f"{p}.q_a_layernorm.weight"],
                "q_b": [f"{p}.q_b_proj.weight"]})
        out.update({"kv_a": [f"{p}.kv_a_proj_with_mqa.weight"], "kv_a_norm": [f"{p}.kv_a_layernorm.weight"],
                    "kv_b": [f"{p}.kv_b_proj.weight"], "o": [f"{p}.o_proj.weight"]})
        if bias:
            if cfg.q_lora_rank is not None:
                out["q_a_bias"] = [f"{p}.q_a_proj.bias"]
            out.update({"kv_a_bias": [f"{p}.kv_a_proj_with_mqa.bias"], "o_bias": [f"{p}.o_proj.bias"]})
        return out
    out = {"qkv": [f"{p}.{x}_proj.weight" for x in "qkv"], "o": [f"{p}.o_proj.weight"]}
    if spec.qkv_bias and bias:
        out["qkv_bias"] = [f"{p}.{x}_proj.bias" for x in "qkv"]
    if spec.o_bias and bias:
        out["o_bias"] = [f"{p}.o_proj.bias"]
    if spec.qk_norm:
        out["q_norm"], out["k_norm"] = [f"{p}.q_norm.weight"], [f"{p}.k_norm.weight"]
    if spec.sinks:
        out["sinks"] = [f"{p}.sinks"]
    return out


def batched_families() -> list[str]:
    """The families the batched mixed-variant forward covers."""
    return [name for name, f in FAMILIES.items() if f.batched is not None]


def read_host_sets(variant_set, dtype=torch.float32) -> list[dict[str, torch.Tensor]]:
    """Every variant's non-expert tensors as the stacked keys of ``batched_tensor_names`` (host, ``dtype``)."""
    tied = bool(variant_set[0].config.get("tie_word_embeddings", False))
    sources = batched_tensor_names(variant_set.adapter, variant_set[0].config, tied)
    keep = get_family(variant_set.adapter).batched.fp32_parts
    needed = {n for parts in sources.values() for n in parts}
    sets = []
    for v in variant_set:
        available = set(v.non_expert_names())
        unused = sorted(available - needed - {"lm_head.weight"})
        if unused:  # e.g. attention biases: silently ignoring them would serve the wrong function
            raise CheckpointError(f"{v.path}: non-expert tensor {unused[0]!r} is not used by the batched "
                                  f"{variant_set.family} forward ({len(unused)} such tensors)")
        host = {}
        for key, parts in sources.items():
            missing = [n for n in parts if n not in available]
            if missing:
                raise CheckpointError(f"{v.path}: missing non-expert tensor {missing[0]!r} of variant {v.name!r}")
            t = torch.cat([v.tensor(n) for n in parts]).to(part_dtype(key, keep, dtype)).contiguous()
            if not torch.isfinite(t).all():
                bad = int((~torch.isfinite(t)).sum())
                raise CheckpointError(f"{v.path}: tensor(s) {parts} hold {bad} NaN/Inf values")
            host[key] = t
        sets.append(host)
    return sets


def part_dtype(key: str, fp32_parts, dtype):
    """The dtype a stacked tensor is held in: fp32 for the parts the family keeps in fp32, else ``dtype``."""
    return torch.float32 if key.rpartition(".")[2] in fp32_parts else dtype


class VariantWeights:
    """Host copies of every variant's non-expert set and ``num_sets`` device sets, LRU-managed.

    ``host``: one dict per variant with the keys of ``batched_tensor_names`` (``read_host_sets`` builds it
    from checkpoints; benchmarks may pass random tensors). ``fp32_parts``: part names held in fp32 whatever
    ``dtype`` is (``families.Batched.fp32_parts``).
    """

    def __init__(self, names, host: list[dict[str, torch.Tensor]], num_sets: int, device="cpu",
                 dtype=torch.float32, fp32_parts=()):
        if num_sets < 1:
            raise ValueError(f"num_sets must be >= 1, got {num_sets}")
        if len(names) != len(host) or not host:
            raise ValueError(f"VariantWeights: {len(names)} names for {len(host)} host sets")
        self.names = list(names)
        self.num_sets = min(num_sets, len(self.names))
        self.device, self.dtype = torch.device(device), dtype
        self.tied = "lm_head" not in host[0]
        self.num_layers = sum(1 for k in host[0] if k.endswith(".ln1"))
        pin = torch.cuda.is_available()

        def held(k, t):
            t = t.to(part_dtype(k, fp32_parts, dtype)).contiguous()
            return t.pin_memory() if pin else t
        self.host = [{k: held(k, t) for k, t in h.items()} for h in host]

        self.stacked = {k: torch.zeros((self.num_sets, *t.shape), dtype=t.dtype, device=self.device)
                        for k, t in self.host[0].items()}
        # per decoder layer: its stacked tensors by part name (ln1, qkv, o, ln2, router | mlp_*, q_norm, ...)
        self.layers = [{k.partition(".")[2]: t for k, t in self.stacked.items() if k.partition(".")[0] == str(i)}
                       for i in range(self.num_layers)]
        self.embed, self.norm = self.stacked["embed"], self.stacked["norm"]
        self.lm_head = self.embed if self.tied else self.stacked["lm_head"]

        self._lock = threading.Lock()
        self._lru: OrderedDict[int, int] = OrderedDict()   # variant -> set, least recently used first
        self._free = list(range(self.num_sets))[::-1]
        self._loading: dict[int, tuple[int, Future]] = {}  # variant -> (set, copy future)
        self._side_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._copier = ThreadPoolExecutor(1, thread_name_prefix="multimoe-weights-copy")
        self.copy_hook = None  # tests inject delays or faults here: called as hook(variant)
        self.stats = {"loads": 0, "evictions": 0, "hits": 0, "load_failures": 0, "bytes_copied": 0}

    @classmethod
    def from_variant_set(cls, variant_set, num_sets: int, device="cpu", dtype=torch.float32) -> "VariantWeights":
        return cls(variant_set.names, read_host_sets(variant_set, dtype), num_sets, device, dtype,
                   get_family(variant_set.adapter).batched.fp32_parts)

    @property
    def set_nbytes(self) -> int:
        return sum(t[0].numel() * t.element_size() for t in self.stacked.values())

    @property
    def device_nbytes(self) -> int:
        return self.set_nbytes * self.num_sets

    def resident(self) -> dict[int, int]:
        """Variant -> set of every fully loaded variant."""
        with self._lock:
            return dict(self._lru)

    def lookup(self, v: int) -> int | None:
        """The set holding variant ``v``, marked recently used; None if it is not (yet) resident."""
        with self._lock:
            s = self._lru.get(v)
            if s is not None:
                self._lru.move_to_end(v)
                self.stats["hits"] += 1
            return s

    def least_recent_set(self) -> int | None:
        """The resident set used longest ago: the one to drain when every set is busy."""
        with self._lock:
            return next(iter(self._lru.values()), None)

    def start_load(self, v: int, busy: set[int]) -> bool:
        """Begin copying variant ``v`` into a free or idle set (one not in ``busy``); False if none is."""
        with self._lock:
            if v in self._lru or v in self._loading:
                return True
            if self._free:
                s = self._free.pop()
            else:
                old = next((u for u, s in self._lru.items() if s not in busy), None)
                if old is None:
                    return False
                s = self._lru.pop(old)
                self.stats["evictions"] += 1
            fut = self._copier.submit(self._copy, v, s)
            self._loading[v] = (s, fut)
            return True

    def _copy(self, v: int, s: int):
        if self.copy_hook is not None:
            self.copy_hook(v)
        if self._side_stream is None:
            for k, t in self.host[v].items():
                self.stacked[k][s].copy_(t)
            return None
        # The compute stream may still read set s (queued kernels of the last step that used it).
        self._side_stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self._side_stream):
            for k, t in self.host[v].items():
                self.stacked[k][s].copy_(t, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self._side_stream)
        return done

    def poll(self) -> list[tuple[int, BaseException | None]]:
        """Finish the loads whose copy has landed: ``[(variant, error or None)]``."""
        finished = []
        with self._lock:
            for v, (s, fut) in list(self._loading.items()):
                if not fut.done():
                    continue
                error = fut.exception()
                if error is None and fut.result() is not None:
                    event = fut.result()
                    if not event.query():
                        continue
                    torch.cuda.current_stream(self.device).wait_event(event)
                del self._loading[v]
                if error is None:
                    self._lru[v] = s
                    self.stats["loads"] += 1
                    self.stats["bytes_copied"] += self.set_nbytes
                else:
                    self._free.append(s)  # the set holds a partial copy: nobody may read it as v
                    self.stats["load_failures"] += 1
                    error = WeightLoadError(f"loading variant {self.names[v]!r} failed: {error}")
                finished.append((v, error))
        return finished

    def wait_loads(self, timeout: float | None = None) -> None:
        """Block until every copy in flight has run (its result still comes from ``poll``)."""
        with self._lock:
            futures = [f for _, f in self._loading.values()]
        for f in futures:
            try:
                f.result(timeout)
            except Exception:  # reported by poll()
                pass

    def close(self) -> None:
        self._copier.shutdown(wait=True)
