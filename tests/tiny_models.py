"""Tiny random Mixtral / Switch variants saved as Hugging Face directories, for fast model tests.

Variants share a base the way fine-tunes do: some perturb experts and attention, one keeps the
base's attention and norms (an expert-only fine-tune) so hash-skipping has something to find.
"""

import torch
import transformers as T

MIXTRAL = dict(vocab_size=64, hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=128)
SWITCH = dict(vocab_size=64, d_model=32, d_ff=40, num_layers=2, num_decoder_layers=2, num_heads=4, d_kv=8,
              num_experts=4, num_sparse_encoder_layers=1, num_sparse_decoder_layers=1, expert_capacity=512,
              decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)


def _perturb(model, which: str, scale: float, seed: int):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            is_expert = "experts" in name
            if (which == "experts" and is_expert) or (which == "attention" and not is_expert) or which == "all":
                p.add_(scale * p.std() * torch.randn(p.shape, generator=g))


def save_variants(tmp_path, family: str = "mixtral", n: int = 3) -> list:
    """Base, then variants: 1 = everything perturbed, 2 = experts only (attention frozen), ..."""
    torch.manual_seed(0)
    if family == "mixtral":
        model = T.MixtralForCausalLM(T.MixtralConfig(**MIXTRAL))
    else:
        model = T.SwitchTransformersForConditionalGeneration(T.SwitchTransformersConfig(**SWITCH))
    base = {k: v.clone() for k, v in model.state_dict().items()}
    dirs = []
    for i in range(n):
        model.load_state_dict(base)
        if i > 0:
            _perturb(model, "all" if i % 2 else "experts", 0.3, seed=i)
        path = tmp_path / f"{family}-v{i}"
        model.save_pretrained(path)
        dirs.append(path)
    return dirs


def reference(family: str, path):
    cls = T.MixtralForCausalLM if family == "mixtral" else T.SwitchTransformersForConditionalGeneration
    return cls.from_pretrained(path).eval()


def rel_err(out, ref) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


# ---- independent random variants of any decoder family (the batched-forward tests) ------------------------
def save_random_variants(root, config, n: int = 3, seed: int = 0, scale: float = 0.2) -> list:
    """``n`` checkpoints of one transformers ``config`` (e.g. ``T.GptOssConfig(...)``), each with its own random
    weights: every floating parameter and buffer drawn afresh (biases, sinks and DeepSeek's score correction
    included, which transformers initialises to zero or constants), with standard deviation ``scale``."""
    dirs = []
    for i in range(n):
        torch.manual_seed(seed * 100 + i)
        model = T.AutoModelForCausalLM.from_config(config)
        with torch.no_grad():
            for name, t in list(model.named_parameters()) + list(model.named_buffers()):
                if not t.is_floating_point() or "inv_freq" in name:
                    continue
                if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
                    t.copy_(1.0 + scale * torch.randn(t.shape))  # norms near one, so activations keep their size
                else:
                    t.copy_(scale * torch.randn(t.shape))
        path = root / f"{config.model_type}-{seed}-v{i}"
        model.save_pretrained(path)
        dirs.append(path)
    return dirs
