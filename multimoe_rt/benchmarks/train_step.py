"""A training step of each family's transformers model with the experts forced to each implementation:
transformers' ``eager`` and ``grouped_mm`` against ours (``experts_implementation="multimoe"``).

    python -m multimoe_rt.benchmarks.train_step [--families mixtral,gpt_oss] [--tokens 4x128] [--reps 9]
                                                [--threads 1] [--out DIR]

Per family, one random model (same weights for every implementation: one state dict loaded into each) at a
CPU-sized shape where the experts dominate the step: hidden 256, expert intermediate 512, 8 experts, top-2,
2 decoder layers, every layer MoE, fp32. One step = forward, cross-entropy on the next token, backward
(gradients of every parameter, experts included); the optimiser is left out (it is the same for all).
Before timing, the loss and every gradient of ours are checked against eager's (fp32, relative error
<= 1e-4; a wrong one aborts). Times are medians over interleaved rounds (one step of each implementation
per round, so a load change on a shared machine hits all alike). Ratios are against ``grouped_mm``, the
default transformers picks where it can run.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time

import torch

from . import results_dir
from ..machine import machine_info

IMPLS = ("eager", "grouped_mm", "multimoe")
GRAD_TOL = 1e-4  # fp32: relative error of ours against eager, loss and every gradient
H, I, E, K, LAYERS, VOCAB = 256, 512, 8, 2, 2, 512
_COMMON = dict(vocab_size=VOCAB, hidden_size=H, num_attention_heads=4, num_key_value_heads=2,
               num_hidden_layers=LAYERS, max_position_embeddings=512, initializer_range=0.05,
               tie_word_embeddings=False, pad_token_id=0, bos_token_id=None, eos_token_id=None)


def family_configs() -> dict:
    """family -> transformers config; every decoder layer MoE, the experts at (H, I, E, K)."""
    import transformers as T

    return {
        "mixtral": T.MixtralConfig(**_COMMON, intermediate_size=I, num_local_experts=E, num_experts_per_tok=K),
        "qwen3_moe": T.Qwen3MoeConfig(**_COMMON, intermediate_size=I, moe_intermediate_size=I, num_experts=E,
                                      num_experts_per_tok=K, head_dim=64, norm_topk_prob=True),
        "olmoe": T.OlmoeConfig(**_COMMON, intermediate_size=I, num_experts=E, num_experts_per_tok=K),
        "qwen2_moe": T.Qwen2MoeConfig(**_COMMON, intermediate_size=I, moe_intermediate_size=I,
                                      shared_expert_intermediate_size=I, num_experts=E, num_experts_per_tok=K),
        "deepseek_v3": T.DeepseekV3Config(**_COMMON, intermediate_size=I, moe_intermediate_size=I,
                                          n_routed_experts=E, num_experts_per_tok=K, n_group=2, topk_group=1,
                                          first_k_dense_replace=0, n_shared_experts=1, kv_lora_rank=32,
                                          q_lora_rank=64, qk_rope_head_dim=32, v_head_dim=64,
                                          qk_nope_head_dim=32),
        "gpt_oss": T.GptOssConfig(**_COMMON, intermediate_size=I, num_local_experts=E, num_experts_per_tok=K,
                                  head_dim=64, sliding_window=64, layer_types=["sliding_attention", "full_attention"]),
    }


def make_models(config) -> dict:
    """impl -> model (train mode) holding one random state dict."""
    import transformers as T

    from ..integrations.hf import register

    register()
    torch.manual_seed(0)
    base = T.AutoModelForCausalLM.from_config(config)
    # Random biases: GPT-OSS initialises expert biases to zero, which would leave their gradient path untested.
    with torch.no_grad():
        for name, p in base.named_parameters():
            if name.endswith("_bias") and ".experts." in name:
                p.normal_(0, 0.05)
    state = base.state_dict()
    models = {}
    for impl in IMPLS:
        # A config of its own: the implementation is read from the config at every call, and from_config keeps it.
        m = T.AutoModelForCausalLM.from_config(copy.deepcopy(config), experts_implementation=impl)
        m.load_state_dict(state)
        models[impl] = m.train()
    return models


def step(model, ids) -> torch.Tensor:
    """One forward and backward; returns the loss (gradients left in .grad)."""
    model.zero_grad(set_to_none=True)
    logits = model(ids).logits
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    loss.backward()
    return loss


def _rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def check_against_eager(models: dict, ids) -> float:
    """Worst relative error of multimoe's loss and gradients against eager's; raises SystemExit past GRAD_TOL."""
    losses, grads = {}, {}
    for impl in ("eager", "multimoe"):
        losses[impl] = step(models[impl], ids).detach()
        grads[impl] = {n: p.grad.detach().clone() for n, p in models[impl].named_parameters() if p.grad is not None}
    if set(grads["eager"]) != set(grads["multimoe"]):
        raise SystemExit(f"train_step: multimoe leaves gradients of {set(grads['eager']) ^ set(grads['multimoe'])}")
    worst = _rel(losses["multimoe"], losses["eager"])
    for n, g in grads["eager"].items():
        worst = max(worst, _rel(grads["multimoe"][n], g))
    if worst > GRAD_TOL:
        raise SystemExit(f"train_step: multimoe's loss or gradients differ from eager's by {worst:.2e} > {GRAD_TOL}")
    return worst


def bench_family(name: str, config, batch: int, seq: int, reps: int, log=print) -> dict:
    models = make_models(config)
    ids = torch.randint(1, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(1))
    err = check_against_eager(models, ids)
    samples = {impl: [] for impl in IMPLS}
    for impl in IMPLS:
        step(models[impl], ids)  # warm-up
    for _ in range(reps):
        for impl in IMPLS:
            t0 = time.perf_counter()
            step(models[impl], ids)
            samples[impl].append(time.perf_counter() - t0)
    ms = {impl: statistics.median(v) * 1e3 for impl, v in samples.items()}
    row = {"family": name, "tokens": batch * seq, "rel_err_vs_eager": err,
           "median_ms": ms, "reps": reps,
           "multimoe_vs_grouped_mm": ms["multimoe"] / ms["grouped_mm"],
           "multimoe_vs_eager": ms["multimoe"] / ms["eager"]}
    log(f"{name:12s} eager {ms['eager']:8.1f} ms  grouped_mm {ms['grouped_mm']:8.1f} ms  multimoe "
        f"{ms['multimoe']:8.1f} ms  -> {row['multimoe_vs_grouped_mm']:.2f}x grouped_mm, "
        f"{row['multimoe_vs_eager']:.2f}x eager  (grad err {err:.1e})")
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--families", default=None, help="comma-separated (default: all six)")
    ap.add_argument("--tokens", default="4x128", help="BATCHxSEQ of one step (default 4x128)")
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None, help="results folder (default $MULTIMOE_RESULTS, else "
                                                "~/.cache/multimoe_rt/results)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    batch, seq = (int(v) for v in args.tokens.lower().split("x"))
    configs = family_configs()
    names = args.families.split(",") if args.families else list(configs)
    unknown = sorted(set(names) - set(configs))
    if unknown:
        raise SystemExit(f"train_step: unknown families {unknown}; choose from {sorted(configs)}")
    info = machine_info()
    print(f"machine: {info['cpu']} x{info['cpu_count']}, {args.threads} torch thread(s), torch {info['torch']}, "
          f"transformers {info['transformers']}; H={H} I={I} E={E} top-{K}, {LAYERS} layers, {batch}x{seq} tokens")
    rows = [bench_family(n, configs[n], batch, seq, args.reps) for n in names]
    out = results_dir(args.out) / f"train_step-{info['host']}.json"
    out.write_text(json.dumps({"machine": info, "threads": args.threads, "shape": dict(H=H, I=I, E=E, K=K,
                              layers=LAYERS, batch=batch, seq=seq), "rows": rows}, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
