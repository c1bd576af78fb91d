"""Cost model of the QoS simulator: hardware and model presets, request traces, roofline and calibrated step costs, memory fit."""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path



GB = 1e9


# ================================================================ presets


@dataclass(frozen=True)
class Hardware:
    name: str
    mem_bytes: float          # device memory
    bandwidth: float          # device memory bandwidth, B/s (peak, data sheet)
    peak_flops: float         # dense bf16 tensor FLOP/s (data sheet)
    link: float               # host->device, B/s, one direction (effective)
    bw_eff: float = 0.8       # achievable fraction of peak bandwidth (assumption, typical for decode GEMV)
    flops_eff: float = 0.6    # achievable fraction of peak FLOPs (assumption)
    step_overhead: float = 2e-3   # per forward step (kernel launches, Python), s (assumption)
    reserve_bytes: float = 4 * GB  # CUDA context, workspace, activations (assumption)
    source: str = ""


HARDWARE = {
    # NVIDIA A100 Tensor Core GPU data sheet (PCIe 80GB column): HBM2e 1,935 GB/s, BF16 Tensor Core 312 TFLOPS
    # dense (624 with sparsity), PCIe Gen4 64 GB/s (both directions: 32 GB/s each way; ~25 GB/s reached by
    # pinned cudaMemcpy in practice, the figure used here).
    "a100-80gb-pcie": Hardware("A100-80GB PCIe Gen4", 80 * GB, 1935 * GB, 312e12, 25 * GB,
                               source="NVIDIA A100 data sheet (PCIe 80GB): 1,935 GB/s, 312 TFLOPS bf16 dense, "
                                      "PCIe Gen4 x16 32 GB/s per direction (25 GB/s effective assumed)"),
    # NVIDIA H200 Tensor Core GPU data sheet (SXM): 141 GB HBM3e, 4.8 TB/s, BF16 989 TFLOPS dense (1,979 with
    # sparsity), PCIe Gen5 128 GB/s (64 GB/s each way; ~50 GB/s effective assumed).
    "h200": Hardware("H200 SXM (PCIe Gen5 host link)", 141 * GB, 4800 * GB, 989e12, 50 * GB,
                     source="NVIDIA H200 data sheet (SXM): 141 GB, 4.8 TB/s, 989 TFLOPS bf16 dense, "
                            "PCIe Gen5 x16 64 GB/s per direction (50 GB/s effective assumed)"),
}


@dataclass(frozen=True)
class ModelSpec:
    """One MoE architecture's sizes, enough for bytes, FLOPs and KV traffic. The defaults describe a
    Mixtral-style model; the optional fields cover DeepSeek-V3 (MLA attention: ``kv_lora_rank`` > 0, then
    ``head_dim`` is the no-rope part of a query/key head; shared experts; dense first layers) and GPT-OSS
    (sliding-window layers, attention and expert biases, attention sinks)."""
    name: str
    hidden: int
    inter: int                # expert intermediate size
    layers: int
    experts: int
    topk: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    dtype_bytes: int = 2
    gated: bool = True        # SwiGLU: 3 matrices per expert
    dense_layers: int = 0     # first layers with a dense MLP instead of experts (first_k_dense_replace)
    dense_inter: int = 0      # their intermediate size
    shared_inter: int = 0     # intermediate size of the shared expert(s) of a MoE layer, all together
    q_lora_rank: int = 0      # MLA: 0 = a plain query projection
    kv_lora_rank: int = 0     # MLA: the compressed latent the KV cache holds per token and layer (0 = no MLA)
    rope_dim: int = 0         # MLA: the rope part of a query/key head (shared by the heads in the cache)
    v_head_dim: int = 0       # MLA: value head size
    sliding_window: int = 0   # tokens a sliding-window layer attends over
    sliding_layers: int = 0   # how many layers use it (GPT-OSS: every other one)
    biases: bool = False      # attention, router and expert biases plus one attention sink per head (GPT-OSS)
    source: str = ""

    @property
    def moe_layers(self) -> int:
        return self.layers - self.dense_layers

    @property
    def expert_params(self) -> int:
        bias = (2 * self.inter + self.hidden) if self.biases else 0
        return (3 if self.gated else 2) * self.hidden * self.inter + bias

    @property
    def expert_bytes(self) -> float:
        return self.expert_params * self.dtype_bytes

    @property
    def attention_params(self) -> int:
        h, d, n = self.hidden, self.head_dim, self.heads
        if self.kv_lora_rank:
            qk, r, c = d + self.rope_dim, self.q_lora_rank, self.kv_lora_rank
            q = h * r + r + r * n * qk if r else h * n * qk
            kv = h * (c + self.rope_dim) + c + c * n * (d + self.v_head_dim)
            return q + kv + n * self.v_head_dim * h
        qkvo = h * n * d * 2 + h * self.kv_heads * d * 2
        return qkvo + ((n + 2 * self.kv_heads) * d + h + n if self.biases else 0)

    @property
    def non_expert_params(self) -> int:
        h = self.hidden
        per_layer = self.attention_params + 2 * h                                    # + 2 norms
        moe = h * self.experts + (self.experts if self.biases else 0) + 3 * h * self.shared_inter   # router, shared
        return (self.layers * per_layer + self.moe_layers * moe + self.dense_layers * 3 * h * self.dense_inter
                + 2 * self.vocab * h + h)                                            # + embeddings, LM head, norm

    @property
    def non_expert_bytes(self) -> float:
        return self.non_expert_params * self.dtype_bytes

    @property
    def total_slots(self) -> int:
        return self.moe_layers * self.experts

    @property
    def full_bytes(self) -> float:
        return self.non_expert_bytes + self.total_slots * self.expert_bytes

    @property
    def kv_bytes_per_token(self) -> float:
        """KV-cache bytes of one token in every layer: MLA caches its compressed latent plus the shared rope key;
        the others a key and a value per KV head (a sliding-window layer's share is capped: ``kv_bytes``)."""
        if self.kv_lora_rank:
            return self.layers * (self.kv_lora_rank + self.rope_dim) * self.dtype_bytes
        return 2 * self.layers * self.kv_heads * self.head_dim * self.dtype_bytes

    def attended(self, context: int) -> int:
        """Positions one token attends over, summed over the layers (sliding-window layers see at most
        ``sliding_window``)."""
        full = self.layers - self.sliding_layers
        return full * context + self.sliding_layers * min(context, self.sliding_window or context)

    def kv_bytes(self, context: int) -> float:
        """KV-cache bytes one decode step of a sequence at ``context`` reads."""
        return self.kv_bytes_per_token * self.attended(context) / self.layers

    def attention_flops(self, context: int) -> float:
        """Score and value FLOPs of one token at ``context`` (MLA: the decompressed heads)."""
        qk = self.head_dim + self.rope_dim if self.kv_lora_rank else self.head_dim
        v = self.v_head_dim if self.kv_lora_rank else self.head_dim
        return 2 * self.heads * (qk + v) * self.attended(context)

    @property
    def active_params(self) -> int:
        return self.non_expert_params - self.vocab * self.hidden + self.moe_layers * self.topk * self.expert_params


MODELS = {
    # mistralai/Mixtral-8x7B-v0.1 config.json: hidden_size 4096, intermediate_size 14336, num_hidden_layers 32,
    # num_attention_heads 32, num_key_value_heads 8 (head_dim 128), num_local_experts 8, num_experts_per_tok 2,
    # vocab_size 32000, untied embeddings; bf16. 46.7 B parameters (93 GB): no single variant fits an 80 GB A100.
    "mixtral-8x7b": ModelSpec("Mixtral-8x7B", 4096, 14336, 32, 8, 2, 32, 8, 128, 32000,
                              source="mistralai/Mixtral-8x7B-v0.1 config.json"),
    # Qwen/Qwen3-30B-A3B config.json: hidden_size 2048, moe_intermediate_size 768, num_hidden_layers 48,
    # num_attention_heads 32, num_key_value_heads 4, head_dim 128, num_experts 128, num_experts_per_tok 8,
    # vocab_size 151936, untied embeddings; bf16 (30.5 B parameters).
    "qwen3-30b-a3b": ModelSpec("Qwen3-30B-A3B", 2048, 768, 48, 128, 8, 32, 4, 128, 151936,
                               source="Qwen/Qwen3-30B-A3B config.json"),
    # this project's zoo (multimoe_rt/lab/zoo.py RECIPES["mixtral-tiny"] and SMALL), byte tokenizer vocab 259,
    # fp32 on CPU.
    # moonshotai/Moonlight-16B-A3B config.json (DeepSeek-V3 architecture): hidden_size 2048, moe_intermediate_size
    # 1408, num_hidden_layers 27 (first_k_dense_replace 1, intermediate_size 11264), n_routed_experts 64,
    # num_experts_per_tok 6, n_shared_experts 2, num_attention_heads 16, q_lora_rank null, kv_lora_rank 512,
    # qk_nope_head_dim 128, qk_rope_head_dim 64, v_head_dim 128, vocab_size 163840, untied; bf16 (16 B parameters).
    "moonlight-16b-a3b": ModelSpec("Moonlight-16B-A3B", 2048, 1408, 27, 64, 6, 16, 16, 128, 163840,
                                   dense_layers=1, dense_inter=11264, shared_inter=2 * 1408, kv_lora_rank=512,
                                   rope_dim=64, v_head_dim=128, source="moonshotai/Moonlight-16B-A3B config.json"),
    # openai/gpt-oss-20b config.json: hidden_size 2880, intermediate_size 2880, num_hidden_layers 24 (layer_types
    # alternate sliding_attention / full_attention, sliding_window 128), num_local_experts 32, experts_per_token 4,
    # num_attention_heads 64, num_key_value_heads 8, head_dim 64, vocab_size 201088, attention and expert biases,
    # attention sinks, untied; counted in bf16 (the release stores experts in MXFP4); 20.9 B parameters.
    "gpt-oss-20b": ModelSpec("gpt-oss-20b", 2880, 2880, 24, 32, 4, 64, 8, 64, 201088, sliding_window=128,
                             sliding_layers=12, biases=True, source="openai/gpt-oss-20b config.json"),
    "mixtral-tiny": ModelSpec("mixtral-tiny", 128, 256, 4, 8, 2, 4, 2, 32, 259, dtype_bytes=4,
                              source="multimoe_rt/lab/zoo.py RECIPES['mixtral-tiny']"),
    "mixtral-tiny-small": ModelSpec("mixtral-tiny --small", 32, 64, 2, 4, 2, 2, 1, 16, 259, dtype_bytes=4,
                                    source="multimoe_rt/lab/zoo.py SMALL['mixtral-tiny']"),
}


# ================================================================ workload

@dataclass
class Req:
    arrival: float
    variant: int
    prompt: int = 20
    out: int = 25
    start: float = math.nan
    first: float = math.nan
    finish: float = math.nan


def poisson_trace(rate: float, n: int, variants: int, seed: int = 0, prompt: int = 20, out: int = 25,
                  mix: str = "uniform") -> list[Req]:
    """``n`` requests with exponential inter-arrivals of mean 1/rate, a random variant each (serve_qos's mix)."""
    if rate <= 0:
        raise ValueError(f"arrival rate must be > 0, got {rate}")
    rng = random.Random(seed)
    w = [1.0] * variants if mix == "uniform" else [1.0 / (i + 1) for i in range(variants)]
    t, reqs = 0.0, []
    for _ in range(n):
        t += rng.expovariate(rate)
        reqs.append(Req(t, rng.choices(range(variants), w)[0], prompt, out))
    return reqs


def serve_qos_trace(rate: float, n: int, variants: int, seed: int, pool_size: int) -> list[Req]:
    """The trace ``serve_qos.make_trace`` drew (same RNG calls; prompt contents do not matter here)."""
    rng = random.Random(seed)
    names = list(range(variants))
    t, reqs = 0.0, []
    for _ in range(n):
        t += rng.expovariate(rate)
        v = rng.choices(names, [1.0] * variants)[0]
        rng.choice(range(pool_size))
        reqs.append(Req(t, v))
    return reqs


def load_trace(path) -> list[Req]:
    """A trace file: JSON list of {"arrival": s, "variant": int, "prompt": tokens, "out": tokens}."""
    return [Req(float(r["arrival"]), int(r["variant"]), int(r.get("prompt", 20)), int(r.get("out", 25)))
            for r in json.loads(Path(path).read_text())]


# ================================================================ cost models

def distinct_touched(experts: int, topk: int, tokens: float) -> float:
    """Expected distinct experts of one layer that ``tokens`` tokens touch, uniform top-k routing."""
    if tokens <= 0:
        return 0.0
    return experts * (1.0 - (1.0 - topk / experts) ** tokens)


@dataclass
class Memory:
    """What is resident: expert slots on the device vs slots the system addresses, and the share used."""
    slots_needed: float
    slots_resident: float
    share: float = 0.0
    fits: bool = True

    @property
    def miss(self) -> float:
        """Fraction of touched expert slots that live in host memory (uniform access, LRU hit rate = C/S)."""
        return max(0.0, 1.0 - self.slots_resident / self.slots_needed) if self.slots_needed else 0.0


def plan_memory(system: str, m: ModelSpec, hw_mem: float, variants: int, *, reserve: float, kv: float,
                share: float | None = None, resident_sets: int = 2) -> Memory:
    """Memory limits decide residency.

    ours / batching: ``resident_sets`` non-expert sets (active + staging, or the R-set cache), a slab of
    L*E*(1 + (V-1)(1-share)) slots; with ``share`` None the share is Algorithm 1's: keep private experts while the
    budget allows (share = the smallest that fits, 1.0 if even one copy does not fit; then the rest is offloaded).
    swap: one full model slot. resident: V full models. partitioned: one instance's view (memory already /N).
    """
    free = hw_mem - reserve - kv
    le = m.total_slots
    if system in ("ours", "ours+affinity", "batching"):
        room = (free - resident_sets * m.non_expert_bytes) / m.expert_bytes
        if share is None:
            share = 0.0 if variants == 1 else min(1.0, max(0.0, 1.0 - (room / le - 1.0) / (variants - 1)))
        need = le * (1 + (variants - 1) * (1 - share))
        return Memory(need, max(0.0, min(need, room)), share, room >= need)
    if system == "swap":
        room = (free - m.non_expert_bytes) / m.expert_bytes
        return Memory(le, max(0.0, min(le, room)), 0.0, room >= le)
    if system == "resident":
        room = (free - variants * m.non_expert_bytes) / m.expert_bytes
        return Memory(variants * le, max(0.0, min(variants * le, room)), 0.0, room >= variants * le)
    if system == "partitioned":
        room = (free - m.non_expert_bytes) / m.expert_bytes
        return Memory(le, max(float(m.experts), min(le, room)), 0.0, room >= le)
    raise ValueError(f"unknown system {system!r}")


class Roofline:
    """Step times from bytes and FLOPs against a device's bandwidth and peak; copies over its link.

    ``fraction`` scales memory, bandwidth, peak and link (a MIG instance gets 1/N of each).
    """

    def __init__(self, hw: Hardware, model: ModelSpec, system: str, variants: int, *, fraction: float = 1.0,
                 share: float | None = None, resident_sets: int = 2, max_batch: int = 1, max_ctx: int = 64):
        self.hw, self.m, self.system, self.variants = hw, model, system, variants
        self.bw = hw.bandwidth * hw.bw_eff * fraction
        self.flops = hw.peak_flops * hw.flops_eff * fraction
        self.link = hw.link * fraction
        kv = max_batch * max_ctx * model.kv_bytes_per_token
        self.mem = plan_memory(system, model, hw.mem_bytes * fraction, variants, reserve=hw.reserve_bytes * fraction,
                               kv=kv, share=share, resident_sets=resident_sets)
        self.share = self.mem.share

    # -- one forward step -------------------------------------------------------------------------
    def step(self, groups: dict[int, int], contexts: list[int] | None = None) -> float:
        """Seconds for one forward step: ``groups`` = variant -> tokens in this step; ``contexts`` = the context
        length each sequence attends over (KV read and attention FLOPs)."""
        m = self.m
        n = sum(groups.values())
        if n == 0:
            return 0.0
        contexts = contexts or []
        # distinct expert slots per layer: shared slots see every token, private ones only their variant's
        s = self.share if self.system in ("ours", "ours+affinity", "batching") else 0.0
        E, k = m.experts, m.topk
        distinct = s * distinct_touched(E, k, n) + (1 - s) * sum(distinct_touched(E, k, t) for t in groups.values())
        if self.system not in ("ours", "ours+affinity", "batching"):
            distinct = sum(distinct_touched(E, k, t) for t in groups.values())
        expert_bytes = m.moe_layers * distinct * m.expert_bytes
        weight_bytes = len(groups) * m.non_expert_bytes + expert_bytes
        kv_bytes = sum(m.kv_bytes(c) for c in contexts)
        flops = 2 * n * m.active_params + sum(m.attention_flops(c) for c in contexts)
        t = max((weight_bytes + kv_bytes) / self.bw, flops / self.flops) + self.hw.step_overhead
        return t + self.mem.miss * expert_bytes / self.link   # offloaded experts copied in when touched

    # -- batch-1 interface (shared with Calibrated) --------------------------------------------------
    def prefill(self, r: Req) -> float:
        """Prompt forward (produces the first token)."""
        return self.step({r.variant: r.prompt}, [r.prompt])

    def decode(self, r: Req, i: int) -> float:
        """The i-th decode step after the first token (i = 1 .. out-1)."""
        return self.step({r.variant: 1}, [r.prompt + i])

    def service(self, r: Req) -> tuple[float, float]:
        """(time to first token, total compute time) of one request at batch 1, no switch."""
        p = self.prefill(r)
        d = sum(self.decode(r, i) for i in range(1, r.out))
        return p, p + d

    def copy_time(self, nbytes: float) -> float:
        return nbytes / self.link

    def switch_bytes(self) -> float:
        if self.system in ("ours", "ours+affinity", "batching"):
            return self.m.non_expert_bytes                       # partial reconfiguration
        if self.system == "swap":
            return self.m.non_expert_bytes + self.mem.slots_resident * self.m.expert_bytes
        return 0.0

    def switch_blocking(self) -> float:
        return self.copy_time(self.switch_bytes())

    def switch_after_prefetch(self, overlap: float) -> float:
        """Residual wait when the copy started ``overlap`` seconds before the request starts."""
        return max(0.0, self.switch_blocking() - overlap)

    def lane_speed(self, busy: int) -> float:
        return 1.0   # MIG instances are isolated: no slow-down from the others


@dataclass
class Calibrated:
    """A system's costs on this CPU, measured from idle service times (``calibrate``)."""
    prefill_s: float              # start -> first token, same variant as before (no switch)
    decode_s: float               # per later token
    switch_block_s: float = 0.0   # extra service time when the variant changes and nothing was prefetched
    switch_prefetched_s: float = 0.0   # extra service time when the switch was prefetched during the last request
    lane_slowdown: tuple = (1.0,)     # service(k lanes busy) / service(1 lane), k = 1..N (partitioned)
    system: str = ""

    def prefill(self, r: Req) -> float:
        return self.prefill_s

    def decode(self, r: Req, i: int) -> float:
        return self.decode_s

    def service(self, r: Req) -> tuple[float, float]:
        return self.prefill_s, self.prefill_s + (r.out - 1) * self.decode_s

    def switch_blocking(self) -> float:
        return self.switch_block_s

    def switch_after_prefetch(self, overlap: float) -> float:
        return min(self.switch_block_s, self.switch_prefetched_s)

    def lane_speed(self, busy: int) -> float:
        sl = self.lane_slowdown
        return 1.0 / sl[min(busy, len(sl)) - 1]
