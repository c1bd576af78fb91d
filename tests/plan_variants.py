"""The plan tests' variant set: a tiny random Mixtral saved as the base, and variants made by perturbing chosen
experts by known relative amounts (the rest stay byte-identical). Fixtures shared by test_plan.py and
test_plan_refusals.py (module-scoped: each module builds its own)."""

from __future__ import annotations

import copy

import pytest
import torch

from multimoe_rt.checkpoint import VariantSet
from multimoe_rt.plan import compute_distances
from multimoe_rt.tokenizer import ByteTokenizer

H, I, L, E = 32, 48, 2, 4

# variant -> {(layer, expert): relative perturbation}; untouched experts stay byte-identical
PERTURB = {
    "a": {(0, 1): 0.01, (1, 2): 0.10},
    "b": {(0, 1): 0.05, (1, 0): 0.20, (1, 3): 0.002},
    "c": {(0, 0): 0.30, (1, 1): 0.03},
}
COPY_FROM_A = ("c", (1, 2))  # c's expert (1, 2) is byte-identical to a's: one own copy serves both


def _perturb(param_rows, r, gen):
    noise = torch.randn(param_rows.shape, generator=gen)
    param_rows += r * param_rows.norm() * noise / noise.norm()


def _mixtral_experts(model, layer):
    return model.model.layers[layer].mlp.experts


@pytest.fixture(scope="module")
def mixtral_dirs(tmp_path_factory):
    from transformers import MixtralConfig, MixtralForCausalLM

    root = tmp_path_factory.mktemp("mixtral")
    torch.manual_seed(0)
    cfg = MixtralConfig(vocab_size=ByteTokenizer().vocab_size, hidden_size=H, intermediate_size=I, num_hidden_layers=L,
                        num_attention_heads=2, num_key_value_heads=1, num_local_experts=E,
                        num_experts_per_tok=2, max_position_embeddings=64)
    base = MixtralForCausalLM(cfg).eval()
    dirs = {"base": root / "base"}
    base.save_pretrained(dirs["base"])
    ByteTokenizer().save(dirs["base"])
    gen = torch.Generator().manual_seed(1)
    models = {}
    for name, changes in PERTURB.items():
        m = copy.deepcopy(base)
        with torch.no_grad():
            for (layer, e), r in changes.items():
                ex = _mixtral_experts(m, layer)
                _perturb(ex.gate_up_proj[e], r, gen)
                _perturb(ex.down_proj[e], r, gen)
            if name == COPY_FROM_A[0]:
                layer, e = COPY_FROM_A[1]
                src = _mixtral_experts(models["a"], layer)
                _mixtral_experts(m, layer).gate_up_proj[e].copy_(src.gate_up_proj[e])
                _mixtral_experts(m, layer).down_proj[e].copy_(src.down_proj[e])
        models[name] = m
        dirs[name] = root / name
        m.save_pretrained(dirs[name])
    return dirs, base


@pytest.fixture(scope="module")
def vs(mixtral_dirs):
    dirs, _ = mixtral_dirs
    return VariantSet.from_dirs(list(dirs.values()), names=list(dirs))


@pytest.fixture(scope="module")
def dist(vs):
    return compute_distances(vs, output=True)
