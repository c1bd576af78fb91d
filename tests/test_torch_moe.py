"""The pure-PyTorch backend against the float64 reference (CPU, every case of the issue)."""

import pytest
import torch

from multimoe_rt import ops
from multimoe_rt.torch_moe import (ACTIVATIONS, UnsupportedActivationError, activation_backward,
                                   activation_of_module, align_torch, apply_activation, moe_reference, moe_torch,
                                   resolve_activation)

# Relative error ||out - ref|| / ||ref|| against float64, by dtype.
TOL = {torch.float32: 1e-5, torch.float16: 2e-2, torch.bfloat16: 2e-2}


def rel_err(out, ref):
    return ((out.double() - ref).norm() / ref.norm()).item()


def make_case(T, K, H, I, S, gated, dtype, seed, slots=None, w1_scale=1.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=g).to(dtype)
    w1 = (w1_scale * torch.randn(S, 2 * I if gated else I, H, generator=g) / H**0.5).to(dtype)
    w2 = (torch.randn(S, H, I, generator=g) / I**0.5).to(dtype)
    s = torch.randint(0, S, (T, K), generator=g) if slots is None else slots
    w = torch.rand(T, K, generator=g) + 0.1
    return x, s, w, w1, w2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("gated,K", [(True, 2), (False, 1), (True, 1), (False, 2)])
@pytest.mark.parametrize("T", [1, 3, 8, 513])
def test_moe_torch_matches_reference(T, gated, K, dtype):
    x, s, w, w1, w2 = make_case(T, K, H=37, I=29, S=7, gated=gated, dtype=dtype, seed=T * 31 + K)
    out = moe_torch(x, s, w, w1, w2, gated)
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert rel_err(out, moe_reference(x, s, w, w1, w2, gated)) <= TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("gated,K", [(True, 2), (False, 1)])
@pytest.mark.parametrize("T", [1, 5, 64])
def test_grouped_matmul_path_and_slot_loop_both_match_reference(T, gated, K, dtype, monkeypatch):
    """16-byte aligned shapes take the torch._grouped_mm path; the per-slot loop is the fallback."""
    import multimoe_rt.torch_moe as tm

    x, s, w, w1, w2 = make_case(T, K, H=32, I=24, S=9, gated=gated, dtype=dtype, seed=T + K)
    ref = moe_reference(x, s, w, w1, w2, gated)
    if tm._grouped_pairs(x, s, w1, w2, gated, None, 1.0, 1.0, None, None) is None:
        pytest.skip("this torch build has no CPU torch._grouped_mm for these shapes")
    grouped = moe_torch(x, s, w, w1, w2, gated)
    monkeypatch.setattr(tm, "_grouped_pairs", lambda *args: None)
    looped = moe_torch(x, s, w, w1, w2, gated)
    assert rel_err(grouped, ref) <= TOL[dtype] and rel_err(looped, ref) <= TOL[dtype]


def test_all_tokens_on_one_slot_and_empty_slots():
    T, K = 64, 2
    slots = torch.full((T, K), 3)
    slots[:, 1] = 5  # slots 0, 1, 2, 4, 6 get no tokens
    x, s, w, w1, w2 = make_case(T, K, 24, 16, 7, True, torch.float32, seed=1, slots=slots)
    assert rel_err(moe_torch(x, s, w, w1, w2, True), moe_reference(x, s, w, w1, w2, True)) <= 1e-5


def test_zero_weight_contributes_exactly_zero():
    x, s, w, w1, w2 = make_case(9, 1, 16, 8, 4, False, torch.float32, seed=2)
    w[::2] = 0.0
    out = moe_torch(x, s, w, w1, w2, False)
    assert (out[::2] == 0).all() and (out[1::2] != 0).any()


def test_reference_is_per_pair_definition():
    # Hand-checkable: one token, two slots, SwiGLU.
    x = torch.tensor([[1.0, -2.0]])
    w1 = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[0.5, 0.5], [1.0, 1.0]]])  # I=1: rows gate, up
    w2 = torch.tensor([[[2.0], [1.0]], [[1.0], [-1.0]]])
    s, w = torch.tensor([[0, 1]]), torch.tensor([[0.25, 0.75]])
    silu = lambda v: v / (1 + torch.exp(torch.tensor(-v, dtype=torch.float64)))
    a0 = silu(1.0) * -2.0
    a1 = silu(-0.5) * -1.0
    expected = 0.25 * a0 * torch.tensor([2.0, 1.0]).double() + 0.75 * a1 * torch.tensor([1.0, -1.0]).double()
    torch.testing.assert_close(moe_reference(x, s, w, w1, w2, True)[0], expected)


@pytest.mark.parametrize("T,K,S,block_m", [(1, 1, 4, 16), (5, 2, 3, 4), (100, 2, 17, 16), (7, 2, 40, 8)])
def test_align_torch_layout(T, K, S, block_m):
    s = torch.randint(0, S, (T, K))
    sorted_ids, block_slot, num_padded = align_torch(s, S, block_m)
    n = int(num_padded)
    assert n % block_m == 0 and len(sorted_ids) % block_m == 0
    real = sorted_ids[:n][sorted_ids[:n] < T * K]
    assert sorted(real.tolist()) == list(range(T * K))
    assert (sorted_ids[n:] == T * K).all() and (block_slot[n // block_m:] == -1).all()
    flat = s.reshape(-1)
    for b in range(n // block_m):
        ids = sorted_ids[b * block_m:(b + 1) * block_m]
        ids = ids[ids < T * K]
        assert (flat[ids.long()] == block_slot[b]).all()
        assert ids.tolist() == sorted(ids.tolist())  # stable within a slot


def test_align_empty_input():
    sorted_ids, block_slot, num_padded = align_torch(torch.empty(0, 2, dtype=torch.int64), 4, 8)
    assert int(num_padded) == 0 and (block_slot == -1).all()


def test_ops_fused_moe_dispatch_and_compile():
    x, s, w, w1, w2 = make_case(11, 2, 20, 12, 5, True, torch.float32, seed=3)
    ref = moe_reference(x, s, w, w1, w2, True)
    for backend in ("torch", "reference"):
        assert rel_err(ops.fused_moe(x, s, w, w1, w2, True, backend=backend), ref) <= 1e-5
    compiled = torch.compile(lambda t: ops.fused_moe(t, s, w, w1, w2, True, check_slots=False), backend="eager")
    assert rel_err(compiled(x), ref) <= 1e-5


def test_backend_env_override(monkeypatch, reload_settings):
    before = ops.choose_backend(torch.device("cpu"))
    monkeypatch.setenv("MULTIMOE_BACKEND", "reference")
    assert ops.choose_backend(torch.device("cpu")) == before  # read once: a later change is not seen
    reload_settings()
    assert ops.choose_backend(torch.device("cpu")) == "reference"
    monkeypatch.setenv("MULTIMOE_BACKEND", "nope")
    reload_settings()
    with pytest.raises(ValueError, match="unknown MoE backend"):
        ops.choose_backend(torch.device("cpu"))


@pytest.mark.parametrize("mutate,exc,match", [
    (lambda a: a.update(x=a["x"].int()), TypeError, "must be one of"),
    (lambda a: a.update(x=a["x"].double()), TypeError, "share a dtype"),
    (lambda a: a.update(x=a["x"][:, :-1]), ValueError, "expert shapes"),
    (lambda a: a.update(s=a["s"].float()), TypeError, "int32 or int64"),
    (lambda a: a.update(s=a["s"] + 100), IndexError, "out of range"),
    (lambda a: a.update(s=a["s"] - 100), IndexError, "out of range"),
    (lambda a: a.update(w=a["w"][:, :1]), ValueError, r"\[T=6, K\]"),
    (lambda a: a.update(w1=a["w1"][:, :5]), ValueError, "gated=True"),
    (lambda a: a.update(x=a["x"].to("meta")), ValueError, "one device"),
])
def test_bad_input_raises_clearly(mutate, exc, match):
    x, s, w, w1, w2 = make_case(6, 2, 10, 8, 3, True, torch.float32, seed=4)
    a = dict(x=x, s=s, w=w, w1=w1, w2=w2)
    mutate(a)
    with pytest.raises(exc, match=match):
        ops.fused_moe(a["x"], a["s"], a["w"], a["w1"], a["w2"], True)


# ---- activations -------------------------------------------------------------------------------------
GATED_ACTS = [(True, a) for a in ACTIVATIONS] + [(False, a) for a in ACTIVATIONS if a != "swiglu_oai"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("gated,activation", GATED_ACTS)
def test_moe_torch_matches_reference_per_activation(gated, activation, dtype):
    # w1 scaled up so pre-activations reach well past GELU's and SiLU's curved region and the clamp limit
    x, s, w, w1, w2 = make_case(40, 2, 24, 20, 5, gated, dtype, seed=len(activation) + 7 * gated, w1_scale=3.0)
    ref = moe_reference(x, s, w, w1, w2, gated, activation, 1.702, 2.0)
    out = moe_torch(x, s, w, w1, w2, gated, activation, 1.702, 2.0)
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert rel_err(out, ref) <= TOL[dtype]
    # the op, both backends, takes the activation as a keyword (the default stays SiLU / ReLU)
    for backend in ("torch", "reference"):
        got = ops.fused_moe(x, s, w, w1, w2, gated, backend=backend, activation=activation, alpha=1.702, limit=2.0)
        assert rel_err(got, ref) <= TOL[dtype]


def test_activations_differ_so_the_choice_matters():
    x, s, w, w1, w2 = make_case(30, 2, 16, 12, 4, True, torch.float32, seed=11, w1_scale=3.0)
    outs = {a: moe_reference(x, s, w, w1, w2, True, a, 1.702, 2.0) for a in ACTIVATIONS}
    for a in ACTIVATIONS:
        for b in ACTIVATIONS:
            if a < b:
                # gelu vs gelu_tanh: ~1e-4 apart, still 10x the fp32 tolerance, so fp32 tests tell them apart
                assert rel_err(outs[a].float(), outs[b]) > (1e-4 if {a, b} == {"gelu", "gelu_tanh"} else 1e-3), (a, b)
    assert torch.equal(outs["silu"], moe_reference(x, s, w, w1, w2, True))  # the default is SiLU when gated
    x, s, w, w1, w2 = make_case(30, 1, 16, 12, 4, False, torch.float32, seed=12)
    assert torch.equal(moe_reference(x, s, w, w1, w2, False, "relu"), moe_reference(x, s, w, w1, w2, False))


def test_activation_definitions_by_hand():
    v = torch.tensor([-3.0, -0.5, 0.0, 0.7, 2.5], dtype=torch.float64)
    erf_gelu = 0.5 * v * (1 + torch.erf(v / 2 ** 0.5))
    tanh_gelu = 0.5 * v * (1 + torch.tanh((2 / torch.pi) ** 0.5 * (v + 0.044715 * v ** 3)))
    ones = torch.ones_like(v)
    for name, want in (("silu", v * torch.sigmoid(v)), ("gelu", erf_gelu), ("gelu_tanh", tanh_gelu),
                       ("relu", v.clamp(min=0))):
        torch.testing.assert_close(apply_activation(v[None], False, name)[0], want)
        torch.testing.assert_close(apply_activation(torch.cat([v, ones])[None], True, name)[0], want)
    # GPT-OSS: gate clamped above at limit, up clamped to [-limit, limit], (up + 1) * gate * sigmoid(alpha gate)
    gate = torch.tensor([-4.0, 0.3, 1.0, 5.0], dtype=torch.float64)
    up = torch.tensor([-6.0, 0.5, 2.9, 3.5], dtype=torch.float64)
    gc, uc = torch.tensor([-4.0, 0.3, 1.0, 3.0]).double(), torch.tensor([-3.0, 0.5, 2.9, 3.0]).double()
    want = (uc + 1) * gc * torch.sigmoid(1.5 * gc)
    torch.testing.assert_close(apply_activation(torch.cat([gate, up])[None], True, "swiglu_oai", 1.5, 3.0)[0], want)


@pytest.mark.parametrize("gated,activation", GATED_ACTS)
def test_activation_backward_matches_autograd(gated, activation):
    g = torch.Generator().manual_seed(5)
    h = (3 * torch.randn(50, 16 if gated else 8, generator=g, dtype=torch.float64)).requires_grad_()
    a = apply_activation(h, gated, activation, 1.3, 1.5)
    grad_a = torch.randn(a.shape, generator=g, dtype=torch.float64)
    (want,) = torch.autograd.grad(a, h, grad_a)
    torch.testing.assert_close(activation_backward(h.detach(), grad_a, gated, activation, 1.3, 1.5), want)


def test_activation_names_and_errors():
    assert resolve_activation(None, True) == "silu" and resolve_activation("auto", False) == "relu"
    for hf_name, ours in (("swish", "silu"), ("gelu_pytorch_tanh", "gelu_tanh"), ("gelu_new", "gelu_tanh"),
                          ("gelu", "gelu"), ("relu", "relu"), ("swigluoai", "swiglu_oai")):
        assert resolve_activation(hf_name, True) == ours
    with pytest.raises(UnsupportedActivationError, match="'quick_gelu'"):
        resolve_activation("quick_gelu", True)
    with pytest.raises(UnsupportedActivationError, match="needs gated"):
        resolve_activation("swiglu_oai", False)
    x, s, w, w1, w2 = make_case(6, 2, 10, 8, 3, True, torch.float32, seed=4)
    with pytest.raises(UnsupportedActivationError, match="'mish'"):  # never a silent SiLU
        ops.fused_moe(x, s, w, w1, w2, True, activation="mish")
    with pytest.raises(ValueError, match="limit > 0"):
        ops.fused_moe(x, s, w, w1, w2, True, activation="swiglu_oai", limit=0.0)


def test_activation_of_module():
    from transformers.activations import ACT2FN

    for hf_name, ours in (("silu", "silu"), ("swish", "silu"), ("gelu", "gelu"), ("gelu_python", "gelu"),
                          ("gelu_pytorch_tanh", "gelu_tanh"), ("gelu_new", "gelu_tanh"), ("gelu_fast", "gelu_tanh"),
                          ("relu", "relu")):
        assert activation_of_module(ACT2FN[hf_name]) == ours, hf_name
    assert activation_of_module(torch.nn.GELU(approximate="tanh")) == "gelu_tanh"
    assert activation_of_module(torch.nn.functional.gelu) == "gelu"
    for unsupported in ("quick_gelu", "gelu_10", "relu2", "mish"):
        with pytest.raises(UnsupportedActivationError):
            activation_of_module(ACT2FN[unsupported])
    # what transformers computes for those names is what our canonical activation computes
    v = 3 * torch.randn(200, dtype=torch.float64)
    for hf_name in ("silu", "gelu", "gelu_python", "gelu_pytorch_tanh", "gelu_new", "gelu_fast", "relu"):
        ours = apply_activation(v[None], False, resolve_activation(hf_name, False))[0]
        torch.testing.assert_close(ACT2FN[hf_name](v), ours, rtol=1e-9, atol=1e-9)
