"""Expert biases in the fused MoE op (GPT-OSS, issue 17): torch and triton backends against the float64
reference, gradients against autograd on the reference, the slab holding biases."""

import pytest
import torch

from multimoe_rt import ops
from multimoe_rt.slab import ExpertSlab
from multimoe_rt.torch_moe import ACTIVATIONS, moe_reference


def rel_err(out, ref) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def case(T=13, K=2, S=5, H=16, I=8, gated=True, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    n1 = 2 * I if gated else I
    x = torch.randn(T, H, generator=g).to(dtype)
    s = torch.stack([torch.randperm(S, generator=g)[:K] for _ in range(T)])
    w = torch.rand(T, K, generator=g).to(dtype)
    w1 = (0.3 * torch.randn(S, n1, H, generator=g)).to(dtype)
    w2 = (0.3 * torch.randn(S, H, I, generator=g)).to(dtype)
    b1 = torch.randn(S, n1, generator=g).to(dtype)
    b2 = torch.randn(S, H, generator=g).to(dtype)
    return x, s, w, w1, w2, b1, b2


def backends():
    out = ["torch", "reference"]
    if ops.triton_status()[0]:
        out.append("triton")
    return out


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("backend", backends())
def test_biased_experts_match_the_float64_reference(activation, backend):
    gated = activation != "relu"
    x, s, w, w1, w2, b1, b2 = case(gated=gated)
    ref = moe_reference(x, s, w, w1, w2, gated, activation, 1.702, 1.5, b1=b1, b2=b2)
    out = ops.fused_moe(x, s, w, w1, w2, gated, backend=backend, activation=activation, alpha=1.702, limit=1.5,
                        b1=b1, b2=b2)
    assert rel_err(out, ref) <= 1e-5
    plain = moe_reference(x, s, w, w1, w2, gated, activation, 1.702, 1.5)
    assert rel_err(plain, ref) > 1e-2  # the biases matter


def test_biased_gradients_match_autograd_on_the_reference():
    x, s, w, w1, w2, b1, b2 = (t.double() if t.is_floating_point() else t for t in case(T=9, seed=3))
    leaves = [t.clone().requires_grad_() for t in (x, w, w1, w2, b1, b2)]
    ref = moe_reference(leaves[0], s, leaves[1], leaves[2], leaves[3], True, "swiglu_oai", 1.702, 1.5,
                        b1=leaves[4], b2=leaves[5])
    g = torch.randn_like(ref)
    want = torch.autograd.grad(ref, leaves, g)
    mine = [t.clone().requires_grad_() for t in (x, w, w1, w2, b1, b2)]
    out = ops.fused_moe(mine[0], s, mine[1], mine[2], mine[3], True, backend="torch", activation="swiglu_oai",
                        alpha=1.702, limit=1.5, b1=mine[4], b2=mine[5])
    got = torch.autograd.grad(out, mine, g)
    for a, b in zip(got, want):
        assert rel_err(a, b) <= 1e-10
    assert torch.autograd.gradcheck(
        lambda *t: ops.fused_moe(t[0], s, t[1], t[2], t[3], True, backend="torch", activation="silu", b1=t[4],
                                 b2=t[5]), tuple(mine))


def test_biases_go_together_and_have_the_slab_shapes():
    x, s, w, w1, w2, b1, b2 = case()
    with pytest.raises(ValueError, match="together"):
        ops.fused_moe(x, s, w, w1, w2, True, b1=b1)
    with pytest.raises(ValueError, match=r"b2 \(expert bias\) must be"):
        ops.fused_moe(x, s, w, w1, w2, True, b1=b1, b2=b2[:, :3])


def test_slab_holds_biases_per_slot():
    slab = ExpertSlab(3, 16, 8, True, bias=True)
    x, s, w, w1, w2, b1, b2 = case(S=3)
    for i in range(3):
        slab.write(i, w1[i], w2[i], b1[i], b2[i])
    assert slab.slot_nbytes == (16 * 16 + 16 * 8 + 16 + 16) * 4
    out = ops.fused_moe(x, s, w, slab.w1, slab.w2, True, b1=slab.b1, b2=slab.b2)
    assert rel_err(out, moe_reference(x, s, w, w1, w2, True, b1=b1, b2=b2)) <= 1e-5
    with pytest.raises(ValueError, match="bias"):
        slab.write(0, w1[0], w2[0])  # a biased slab needs the biases
