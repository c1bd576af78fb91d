"""The synthetic bench's variants: per family, configs at real per-layer shapes (few layers), random-init by the
family's own transformers classes on the CPU (seeded: the same weights on any machine), fine-tuned copies saved
as checkpoints (``multimoe_rt/benchmarks/synthetic.py`` serves them).

Shapes per family (``SHAPES[family][shape]``):

* ``mixtral``: mid H=1024/I=2048 (issue 26's first measurements); large = Mixtral-8x7B's layer.
* ``deepseek_v3``: Moonlight-16B-A3B's layout (latent attention without a q LoRA, kv rank 512, rope/nope/v head
  dims 64/128/128, 64 routed experts of I=1408, top-6, 2 shared experts, one dense first layer); large is its
  per-layer shapes with one MoE layer; mid halves the widths and keeps 16 experts so a CPU run stays minutes.
  Routing is grouped (``n_group``/``topk_group``) at mid and test, as DeepSeek-V3 itself routes; Moonlight's
  single group would leave that path unexercised.
* ``gpt_oss``: gpt-oss-20b's layout (H=I=2880, 32 experts, top-4, 64 query / 8 kv heads of 64, sinks, expert
  and attention biases, clamped SwiGLU); one sliding (window 128) and one full layer; mid at H=I=1024.

The vocabulary is 32000 at large (Mixtral's; Moonlight's 163840 and gpt-oss's 201088 would make the LM heads of
four variants outweigh the layers measured) and 8192 at mid. The ``test`` shapes are tiny and odd, for tests only;
gpt_oss's test window (3) is shorter than the test prompts, so its sliding layers really slide.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from ..errors import UsageError

FAMILIES = ("mixtral", "deepseek_v3", "gpt_oss")

# Ends of generation stay off: the engine runs with ignore_eos and transformers with min_new_tokens, which masks an
# eos logit; without an eos both decode the same greedy tokens.
_COMMON = dict(max_position_embeddings=4096, eos_token_id=None, bos_token_id=None, pad_token_id=0,
               tie_word_embeddings=False)

_MOONLIGHT_MLA = dict(q_lora_rank=None, kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=128,
                      v_head_dim=128)
_MOONLIGHT_MLA_HALF = dict(q_lora_rank=None, kv_lora_rank=256, qk_rope_head_dim=32, qk_nope_head_dim=64,
                           v_head_dim=64)

SHAPES = {
    "mixtral": {
        "mid": dict(hidden_size=1024, intermediate_size=2048, num_hidden_layers=2, num_local_experts=8,
                    num_experts_per_tok=2, num_attention_heads=8, num_key_value_heads=2, vocab_size=8192),
        "large": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=1, num_local_experts=8,
                      num_experts_per_tok=2, num_attention_heads=32, num_key_value_heads=8, vocab_size=32000),
        "test": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_local_experts=4,
                     num_experts_per_tok=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=128),
    },
    "deepseek_v3": {
        "mid": dict(hidden_size=1024, intermediate_size=5632, moe_intermediate_size=704, num_hidden_layers=3,
                    first_k_dense_replace=1, n_routed_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2,
                    n_shared_experts=2, routed_scaling_factor=2.446, num_attention_heads=8, num_key_value_heads=8,
                    vocab_size=8192, **_MOONLIGHT_MLA_HALF),
        "large": dict(hidden_size=2048, intermediate_size=11264, moe_intermediate_size=1408, num_hidden_layers=2,
                      first_k_dense_replace=1, n_routed_experts=64, num_experts_per_tok=6, n_group=1, topk_group=1,
                      n_shared_experts=2, routed_scaling_factor=2.446, num_attention_heads=16,
                      num_key_value_heads=16, vocab_size=32000, **_MOONLIGHT_MLA),
        "test": dict(hidden_size=64, intermediate_size=80, moe_intermediate_size=24, num_hidden_layers=3,
                     first_k_dense_replace=1, n_routed_experts=6, num_experts_per_tok=2, n_group=2, topk_group=1,
                     n_shared_experts=1, routed_scaling_factor=2.5, num_attention_heads=3, num_key_value_heads=3,
                     vocab_size=128, q_lora_rank=20, kv_lora_rank=12, qk_rope_head_dim=4, qk_nope_head_dim=6,
                     v_head_dim=5),
    },
    "gpt_oss": {
        "mid": dict(hidden_size=1024, intermediate_size=1024, num_hidden_layers=2, num_local_experts=16,
                    num_experts_per_tok=4, num_attention_heads=16, num_key_value_heads=4, head_dim=64,
                    sliding_window=128, layer_types=["sliding_attention", "full_attention"], vocab_size=8192),
        "large": dict(hidden_size=2880, intermediate_size=2880, num_hidden_layers=2, num_local_experts=32,
                      num_experts_per_tok=4, num_attention_heads=64, num_key_value_heads=8, head_dim=64,
                      sliding_window=128, layer_types=["sliding_attention", "full_attention"], vocab_size=32000),
        "test": dict(hidden_size=64, intermediate_size=40, num_hidden_layers=2, num_local_experts=5,
                     num_experts_per_tok=2, num_attention_heads=4, num_key_value_heads=2, head_dim=12,
                     sliding_window=3, layer_types=["sliding_attention", "full_attention"], vocab_size=128),
    },
}
DELTA = {"relative_norm": 0.1, "rank": 8, "lowrank_energy": 0.8, "non_expert_relative_std": 0.02}


def shape_config(family: str, shape: str) -> dict:
    """The config fields of ``family`` at ``shape``; UsageError naming the choices otherwise."""
    if family not in SHAPES:
        raise UsageError(f"synthetic bench: unknown family {family!r}; choose from {', '.join(FAMILIES)}")
    if shape not in SHAPES[family]:
        raise UsageError(f"synthetic bench: unknown shape {shape!r}; choose from {', '.join(SHAPES[family])}")
    return SHAPES[family][shape]


def model_class(family: str):
    """The family's transformers causal-LM class (the transformers row loads every variant with it)."""
    from multimoe_rt.model import MODEL_CLASSES

    return MODEL_CLASSES[family][1]


def _is_routed_expert(key: str) -> bool:
    # Shared experts (DeepSeek) are dense, always-on MLPs: the runtime holds them with the non-expert set, and a
    # fine-tune moves them as it moves attention.
    return ".experts." in key and "shared_experts" not in key


def _fine_tune(w: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """``w [..., n, k]`` plus a delta per matrix: low rank plus noise, relative norm DELTA["relative_norm"]."""
    w32 = w.float()
    n, k = w32.shape[-2:]
    r = DELTA["rank"]
    low = torch.randn(*w32.shape[:-2], n, r, generator=g) @ torch.randn(*w32.shape[:-2], r, k, generator=g)
    noise = torch.randn(w32.shape, generator=g)

    def unit(t):  # per matrix
        return t / t.flatten(-2).norm(dim=-1)[..., None, None]

    delta = math.sqrt(DELTA["lowrank_energy"]) * unit(low) + math.sqrt(1 - DELTA["lowrank_energy"]) * unit(noise)
    scale = DELTA["relative_norm"] * w32.flatten(-2).norm(dim=-1)[..., None, None]
    return (w32 + scale * delta).to(w.dtype)


def _nudge(b: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """A non-expert tensor moved by DELTA["non_expert_relative_std"] of its spread (of its magnitude where it
    has none, e.g. norms initialised to ones; zeros stay zeros)."""
    f = b.float()
    std = f.std() if f.numel() > 1 and f.std() > 0 else f.abs().mean()
    return (f + DELTA["non_expert_relative_std"] * std * torch.randn(f.shape, generator=g)).to(b.dtype)


def build_variants(shape: str, n_variants: int, dtype: torch.dtype, seed: int = 0, family: str = "mixtral",
                   log=print) -> dict:
    """``{name: directory}`` of ``n_variants`` synthetic ``family`` variants (base first), cached under
    ``~/.cache/multimoe_rt/synthetic`` (rebuilt when the recipe changes)."""
    fields = shape_config(family, shape)
    from multimoe_rt.model import MODEL_CLASSES

    config_cls, model_cls = MODEL_CLASSES[family]
    recipe = {"family": family, "shape": fields, "common": _COMMON, "delta": DELTA, "seed": seed,
              "dtype": str(dtype)}
    key = f"{family}-{shape}-{n_variants}v-{str(dtype).replace('torch.', '')}-s{seed}"
    root = Path.home() / ".cache" / "multimoe_rt" / "synthetic" / key
    names = ["base"] + [f"ft{i}" for i in range(1, n_variants)]
    dirs = {n: root / n for n in names}
    stamp = root / "recipe.json"
    if stamp.exists() and json.loads(stamp.read_text()) == recipe and all((d / "config.json").exists() for d in dirs.values()):
        return dirs
    log(f"building {n_variants} synthetic {family} {shape} variants in {root} (once)")
    torch.manual_seed(seed)
    model = model_cls(config_cls(**fields, **_COMMON)).to(dtype).eval()  # on the CPU: the same weights anywhere
    base = {k: v.clone() for k, v in model.state_dict().items()}
    for i, name in enumerate(names):
        g = torch.Generator().manual_seed(seed * 1000 + i)
        with torch.no_grad():
            for k, p in model.state_dict().items():
                if i == 0:
                    p.copy_(base[k])
                elif _is_routed_expert(k) and base[k].dim() >= 2:
                    p.copy_(_fine_tune(base[k], g))
                else:
                    p.copy_(_nudge(base[k], g))
        model.save_pretrained(dirs[name])
    stamp.write_text(json.dumps(recipe))
    return dirs
