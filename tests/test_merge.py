"""Merging baselines on hand-computed tensors, plus whole-model merges that must load into HF v5 models.

Hand-worked examples use values exactly representable in float32, so equality is exact there;
merges compared against a float64 recomputation use fp32 rel err <= 1e-5 (bf16 <= 2e-2).
"""
import pytest
import torch

from multimoe_rt.lab.merge import (LazyStateDict, average, merge_variants, task_arithmetic, ties,
                               ties_tensors, trim_topk)


def T(*v, dtype=torch.float32):
    return torch.tensor(v, dtype=dtype)


def rel_err(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


# ---------------------------------------------------------------- averaging / task arithmetic


def test_average_uniform_and_weighted():
    a = {"w": T(0.0, 4.0), "b": T(1.0)}
    b = {"w": T(4.0, 0.0), "b": T(3.0)}
    out = average([a, b])
    assert torch.equal(out["w"], T(2.0, 2.0)) and torch.equal(out["b"], T(2.0))
    # weights 1:3 -> (0*1 + 4*3)/4 = 3, (4*1 + 0*3)/4 = 1
    out = average([a, b], weights=[1, 3])
    assert torch.equal(out["w"], T(3.0, 1.0)) and torch.equal(out["b"], T(2.5))


def test_average_bad_weights():
    a = {"w": T(1.0)}
    with pytest.raises(ValueError, match="weights"):
        average([a, a], weights=[1.0])
    with pytest.raises(ValueError, match="weights"):
        average([a, a], weights=[1.0, -1.0])


def test_task_arithmetic_hand():
    base = {"w": T(1.0, 2.0)}
    ft1 = {"w": T(2.0, 2.0)}   # tau1 = [1, 0]
    ft2 = {"w": T(0.0, 5.0)}   # tau2 = [-1, 3]
    out = task_arithmetic(base, [ft1, ft2], scale=0.5)
    # 1 + 0.5*(1-1) = 1;  2 + 0.5*(0+3) = 3.5
    assert torch.equal(out["w"], T(1.0, 3.5))


def test_dtype_preserved_and_fp32_math():
    base = {"w": T(1.0, 2.0, dtype=torch.bfloat16)}
    ft = {"w": T(3.0, -2.0, dtype=torch.bfloat16)}
    out = task_arithmetic(base, [ft], scale=0.25)
    assert out["w"].dtype == torch.bfloat16
    assert torch.equal(out["w"], T(1.5, 1.0, dtype=torch.bfloat16))
    out = ties(base, [ft], density=1.0, scale=1.0)
    assert out["w"].dtype == torch.bfloat16 and torch.equal(out["w"], ft["w"])
    out = average([base, ft])
    assert out["w"].dtype == torch.bfloat16 and torch.equal(out["w"], T(2.0, 0.0, dtype=torch.bfloat16))


def test_non_float_buffers_pass_through_or_raise():
    a = {"idx": torch.tensor([1, 2]), "w": T(1.0)}
    b = {"idx": torch.tensor([1, 2]), "w": T(3.0)}
    out = average([a, b])
    assert torch.equal(out["idx"], torch.tensor([1, 2]))
    c = {"idx": torch.tensor([1, 3]), "w": T(3.0)}
    with pytest.raises(ValueError, match="idx"):
        average([a, c])


# ---------------------------------------------------------------- TIES worked by hand


def test_trim_keeps_top_fraction_and_ties_at_cut():
    # density 0.4 of 5 -> k = 2: keep 3 and -2
    assert torch.equal(trim_topk(T(3.0, -1.0, 0.5, -2.0, 0.0), 0.4), T(3.0, 0.0, 0.0, -2.0, 0.0))
    # k = 2, 2nd largest magnitude is 1, shared by two entries: both kept (reference-code rule)
    assert torch.equal(trim_topk(T(1.0, -1.0, 0.5, 2.0), 0.5), T(1.0, -1.0, 0.0, 2.0))
    # tiny density still keeps one entry
    assert torch.equal(trim_topk(T(1.0, -5.0, 2.0), 0.01), T(0.0, -5.0, 0.0))


def test_ties_hand_worked():
    base = {"w": T(1.0, 1.0, 1.0, 1.0, 1.0)}
    tau1 = T(3.0, -1.0, 0.5, -2.0, 0.0)
    tau2 = T(-1.0, 2.0, -0.25, -3.0, 1.0)
    tau3 = T(2.0, -4.0, 1.0, 0.5, -0.5)
    fts = [{"w": base["w"] + t} for t in (tau1, tau2, tau3)]
    # trim (density 0.4 -> k=2 per task vector):
    #   t1 -> [3, 0, 0, -2, 0];  t2 -> [0, 2, 0, -3, 0];  t3 -> [2, -4, 0, 0, 0]
    # elect: sum = [5, -2, 0, -5, 0] -> sign [+, -, 0, -, 0]; zero sums take the sign of the
    #   tensor's total (-2) -> [+, -, -, -, -]
    # disjoint mean: pos0 mean(3, 2) = 2.5; pos1 only -4 agrees -> -4; pos2 none -> 0;
    #   pos3 mean(-2, -3) = -2.5; pos4 none -> 0
    # result = 1 + 0.5 * [2.5, -4, 0, -2.5, 0]
    out = ties(base, fts, density=0.4, scale=0.5)
    assert torch.equal(out["w"], T(2.25, -1.0, 1.0, -0.25, 1.0))


def test_ties_zero_sum_sign_fallback():
    base = torch.zeros(2)
    # density 1 (no trim). pos0 sums to 0 -> uses sign of the tensor's total.
    # total = (1+5) + (-1-2) = 3 > 0 -> '+': pos0 keeps only +1 -> 1; pos1 sum 3 '+' -> 5
    out = ties_tensors(base, [T(1.0, 5.0), T(-1.0, -2.0)], density=1.0)
    assert torch.equal(out, T(1.0, 5.0))
    # total = 6 - 8 = -2 -> '-': pos0 keeps -1; pos1 sum -2 '-' -> -7
    out = ties_tensors(base, [T(1.0, 5.0), T(-1.0, -7.0)], density=1.0)
    assert torch.equal(out, T(-1.0, -7.0))


def test_ties_single_task_full_density_is_finetuned():
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(4, 6, generator=g)}
    ft = {"w": torch.randn(4, 6, generator=g)}
    out = ties(base, [ft], density=1.0, scale=1.0)
    assert rel_err(out["w"], ft["w"]) <= 1e-6


def test_ties_matches_float64_recomputation():
    g = torch.Generator().manual_seed(1)
    base = torch.randn(8, 16, generator=g, dtype=torch.float64)
    fts = [base + torch.randn(8, 16, generator=g, dtype=torch.float64) for _ in range(3)]
    tau = torch.stack([f - base for f in fts])
    k = int(0.3 * tau[0].numel())
    trimmed = torch.stack([torch.where(t.abs() >= t.abs().flatten().sort(descending=True).values[k - 1], t, 0.0)
                           for t in tau])
    s = torch.sign(trimmed.sum(0))
    s[s == 0] = 1.0 if trimmed.sum() >= 0 else -1.0
    agree = (torch.sign(trimmed) == s) & (trimmed != 0)
    mean = (trimmed * agree).sum(0) / agree.sum(0).clamp(min=1)
    ref = base + 0.7 * mean
    out = ties_tensors(base.float(), [f.float() for f in fts], density=0.3, scale=0.7)
    assert out.dtype == torch.float32
    assert rel_err(out, ref) <= 1e-5


def test_ties_bad_density():
    with pytest.raises(ValueError, match="density"):
        ties({"w": T(1.0)}, [{"w": T(2.0)}], density=0.0)


# ---------------------------------------------------------------- validation


def test_mismatched_keys_raise():
    a = {"w": T(1.0), "b": T(1.0)}
    b = {"w": T(1.0), "c": T(1.0)}
    with pytest.raises(ValueError, match="missing \\['b'\\].*extra \\['c'\\]"):
        average([a, b])
    with pytest.raises(ValueError, match="fine-tuned model 0"):
        task_arithmetic(a, [b], scale=1.0)
    with pytest.raises(ValueError, match="missing"):
        ties(a, [a, b])


def test_mismatched_shapes_raise_naming_tensor():
    a = {"layer.w": torch.ones(2, 3)}
    b = {"layer.w": torch.ones(3, 2)}
    for fn in (lambda: average([a, b]), lambda: task_arithmetic(a, [b], 1.0), lambda: ties(a, [b])):
        with pytest.raises(ValueError, match=r"'layer.w'.*\(3, 2\).*\(2, 3\)"):
            fn()


def test_lazy_state_dict_fetches_on_demand():
    fetched = []

    def fetch(n):
        fetched.append(n)
        return {"a": T(1.0), "b": T(3.0)}[n]

    lazy = LazyStateDict(["a", "b"], fetch)
    assert fetched == []
    out = average([lazy, {"a": T(3.0), "b": T(5.0)}])
    assert torch.equal(out["a"], T(2.0)) and torch.equal(out["b"], T(4.0))
    assert sorted(fetched) == ["a", "b"]


# ---------------------------------------------------------------- whole VariantSets -> HF v5 state dicts


class FakeVariant:
    """Duck-typed stand-in for checkpoint.Variant over an in-memory v5 state dict."""

    def __init__(self, name, family, sd, moe_layers, num_experts):
        self.name, self.family, self._sd = name, family, sd
        self.moe_layers, self.num_experts = moe_layers, num_experts

    def non_expert_names(self):
        return [k for k in self._sd if ".experts." not in k]

    def tensor(self, name):
        return self._sd[name]

    def expert(self, layer, e):
        p = self.moe_layers[layer]
        if self.family == "mixtral":
            return self._sd[f"{p}.experts.gate_up_proj"][e], self._sd[f"{p}.experts.down_proj"][e]
        return self._sd[f"{p}.experts.expert_{e}.wi.weight"], self._sd[f"{p}.experts.expert_{e}.wo.weight"]


def _mixtral(seed):
    from transformers import MixtralConfig, MixtralForCausalLM
    torch.manual_seed(seed)
    cfg = MixtralConfig(vocab_size=32, hidden_size=8, intermediate_size=6, num_hidden_layers=2,
                        num_attention_heads=2, num_key_value_heads=1, num_local_experts=3,
                        num_experts_per_tok=2)
    m = MixtralForCausalLM(cfg)
    with torch.no_grad():  # HF init leaves some params constant; randomise all so merges differ everywhere
        for p in m.parameters():
            p.normal_()
    return cfg, m


def _switch(seed):
    from transformers import SwitchTransformersConfig, SwitchTransformersForConditionalGeneration
    torch.manual_seed(seed)
    cfg = SwitchTransformersConfig(vocab_size=32, d_model=8, d_ff=6, d_kv=4, num_heads=2, num_layers=2,
                                   num_decoder_layers=2, num_experts=3, encoder_sparse_step=2,
                                   decoder_sparse_step=2)
    m = SwitchTransformersForConditionalGeneration(cfg)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_()
    return cfg, m


def _variants(family, seeds):
    out, models = [], []
    for i, s in enumerate(seeds):
        cfg, m = (_mixtral if family == "mixtral" else _switch)(s)
        sd = {k: v.clone() for k, v in m.state_dict().items()}
        if family == "mixtral":
            layers = [f"model.layers.{i}.mlp" for i in range(cfg.num_hidden_layers)]
        else:
            layers = sorted({k.split(".experts.")[0] for k in sd if ".experts." in k})
        out.append(FakeVariant(["base", "a", "b"][i], family, sd, layers, 3))
        models.append(m)
    return out, models


@pytest.mark.parametrize("family", ["mixtral", "switch"])
def test_merge_variants_average_loads_strict(family):
    variants, models = _variants(family, [0, 1, 2])
    merged = merge_variants(variants, "average", weights=[1, 1, 2])
    sds = [v._sd for v in variants]
    assert set(merged) == set(sds[0])
    for k, t in merged.items():
        ref = (sds[0][k].double() + sds[1][k].double() + 2 * sds[2][k].double()) / 4
        assert t.shape == sds[0][k].shape and t.dtype == sds[0][k].dtype
        assert rel_err(t, ref) <= 1e-5, k
    models[0].load_state_dict(merged, strict=True)


@pytest.mark.parametrize("family", ["mixtral", "switch"])
def test_merge_variants_task_arithmetic_and_ties(family):
    variants, _ = _variants(family, [3, 4, 5])
    sds = [v._sd for v in variants]
    ta = merge_variants(variants, "task_arithmetic", scale=0.3)
    ref = task_arithmetic(sds[0], sds[1:], scale=0.3)
    for k in ref:
        assert rel_err(ta[k], ref[k]) <= 1e-6, k
    # base chosen by name: 'a' is the base, base and b are fine-tuned
    tb = merge_variants(variants, "ties", base="a", density=0.5, scale=0.8)
    for k in variants[0].non_expert_names():
        exp = ties_tensors(sds[1][k], [sds[0][k], sds[2][k]], 0.5, 0.8)
        assert torch.equal(tb[k], exp), k
    layer = variants[0].moe_layers[-1]
    if family == "mixtral":
        # gate and up are trimmed as separate matrices
        gu = [sd[f"{layer}.experts.gate_up_proj"][1] for sd in sds]
        exp = torch.cat([ties_tensors(gu[1][:6], [gu[0][:6], gu[2][:6]], 0.5, 0.8),
                         ties_tensors(gu[1][6:], [gu[0][6:], gu[2][6:]], 0.5, 0.8)])
        assert torch.equal(tb[f"{layer}.experts.gate_up_proj"][1], exp)
    else:
        wo = [sd[f"{layer}.experts.expert_2.wo.weight"] for sd in sds]
        assert torch.equal(tb[f"{layer}.experts.expert_2.wo.weight"], ties_tensors(wo[1], [wo[0], wo[2]], 0.5, 0.8))


def test_merge_variants_errors():
    variants, _ = _variants("mixtral", [0, 1])
    with pytest.raises(ValueError, match="unknown method"):
        merge_variants(variants, "slerp")
    with pytest.raises(TypeError, match="scale"):
        merge_variants(variants, "task_arithmetic")
    with pytest.raises(TypeError, match="unexpected"):
        merge_variants(variants, "average", density=0.1)
    with pytest.raises(ValueError, match="base 'zzz'"):
        merge_variants(variants, "ties", base="zzz")
    # a variant with a missing non-expert tensor is named in the error
    del variants[1]._sd["model.norm.weight"]
    with pytest.raises(ValueError, match="variant 'a'.*model.norm.weight"):
        merge_variants(variants, "average")


@pytest.mark.parametrize("family", ["mixtral", "switch"])
def test_checkpoints_merge_save_and_reload(tmp_path, family):
    """Real checkpoint directories -> VariantSet -> merge -> save_merged -> from_pretrained and load_variant."""
    from multimoe_rt import checkpoint as ckpt
    from transformers import MixtralForCausalLM, SwitchTransformersForConditionalGeneration
    from multimoe_rt.lab.merge import save_merged
    cls = MixtralForCausalLM if family == "mixtral" else SwitchTransformersForConditionalGeneration
    dirs = []
    for s in range(3):
        if family == "mixtral":
            _, m = _mixtral(s)
        else:
            from transformers import SwitchTransformersConfig
            torch.manual_seed(s)
            # num_sparse_*_layers=1 of 2 blocks: block 1 of each stack is sparse (HF's sparse-step rule)
            cfg = SwitchTransformersConfig(vocab_size=32, d_model=8, d_ff=6, d_kv=4, num_heads=2, num_layers=2,
                                           num_decoder_layers=2, num_experts=3, num_sparse_encoder_layers=1,
                                           num_sparse_decoder_layers=1)
            m = SwitchTransformersForConditionalGeneration(cfg)
        m.save_pretrained(tmp_path / f"v{s}")
        dirs.append(tmp_path / f"v{s}")
    vs = ckpt.VariantSet.from_dirs(dirs)
    merged = merge_variants(vs, "ties", density=0.3, scale=0.9)
    out = save_merged(merged, tmp_path / "merged", vs[0])
    model = cls.from_pretrained(out)
    sd = model.state_dict()
    for k, t in merged.items():
        assert torch.equal(sd[k], t), k
    again = ckpt.load_variant(out)
    assert again.family == family and sorted(again.non_expert_names()) == sorted(vs[0].non_expert_names())
    w1, w2 = again.expert(len(again.moe_layers) - 1, 2)
    ref1, ref2 = vs[0].expert(len(again.moe_layers) - 1, 2)
    assert w1.shape == ref1.shape and w2.shape == ref2.shape
