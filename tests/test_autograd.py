"""Autograd through ``fused_moe``: gradients for the hidden states, the routing weights and both expert
weights, held against torch.autograd on the float64 reference and against torch.autograd.gradcheck.

Tolerances, relative error ||grad - ref|| / ||ref|| against float64 autograd of ``moe_reference``:
fp32 <= 1e-5, bf16/fp16 <= 2e-2 (the same as the forward's).
"""

import pytest
import torch

from multimoe_rt import ops
from multimoe_rt.slab import ExpertSlab, SlotTable
from multimoe_rt.torch_moe import ACTIVATIONS, moe_reference

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-2}
GATED_ACTS = [(True, a) for a in ACTIVATIONS] + [(False, a) for a in ACTIVATIONS if a != "swiglu_oai"]
LIMIT = 1.5  # small enough that the clamped SwiGLU's clamps are active on these inputs


def rel_err(out, ref):
    return ((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-300)).item()


def make_case(T, K, S, H, I, gated, dtype=torch.float64, seed=0, slot_ids=None, w1_scale=2.0):
    """Fresh random inputs, every float input a leaf that requires grad."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=g, dtype=torch.float64)
    w1 = w1_scale * torch.randn(S, 2 * I if gated else I, H, generator=g, dtype=torch.float64) / H ** 0.5
    w2 = torch.randn(S, H, I, generator=g, dtype=torch.float64) / I ** 0.5
    if slot_ids is None:
        slot_ids = torch.stack([torch.randperm(S, generator=g)[:K] for _ in range(T)]) if T else \
            torch.empty(0, K, dtype=torch.long)
    w = torch.rand(T, K, generator=g, dtype=torch.float64) + 0.1
    leaf = lambda t: t.to(dtype).requires_grad_()  # noqa: E731
    return leaf(x), slot_ids, leaf(w), leaf(w1), leaf(w2)


def reference_grads(x, s, w, w1, w2, gated, activation, grad_out, alpha=1.702, limit=LIMIT):
    """torch.autograd through the float64 reference, at the same (rounded) input values."""
    leaves = [t.detach().double().requires_grad_() for t in (x, w, w1, w2)]
    out = moe_reference(leaves[0], s, leaves[1], leaves[2], leaves[3], gated, activation, alpha, limit)
    return torch.autograd.grad(out, leaves, grad_out.double())


@pytest.mark.parametrize("gated,activation", GATED_ACTS)
@pytest.mark.parametrize("K", [1, 2, 3])
@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_gradcheck_float64(backend, K, gated, activation):
    # S=5 with T=4 and K <= 3: at least one slot gets no token (an empty expert, zero gradient)
    x, s, w, w1, w2 = make_case(4, K, 5, 6, 3, gated, seed=K * 10 + len(activation))
    f = lambda x, w, w1, w2: ops.fused_moe(x, s, w, w1, w2, gated, backend=backend,  # noqa: E731
                                           activation=activation, limit=LIMIT)
    assert torch.autograd.gradcheck(f, (x, w, w1, w2))


def test_gradcheck_empty_experts_and_a_slot_shared_by_two_variants():
    # Two variants, one layer, 3 experts each; variant 1 keeps its own expert 0 but shares experts 1 and 2
    # with variant 0 (slots 1, 2); slot 4 is written but no table entry points at it (never used).
    table = SlotTable(2, 1, 3)
    for e, slot in enumerate([0, 1, 2]):
        table.set(0, 0, e, slot)
    for e, slot in enumerate([3, 1, 2]):
        table.set(1, 0, e, slot)
    g = torch.Generator().manual_seed(3)
    T = 6
    topk = torch.stack([torch.randperm(3, generator=g)[:2] for _ in range(T)])
    variants = torch.tensor([0, 1, 0, 1, 1, 0])
    slots = table.resolve(0, topk, variants)
    assert set(slots.reshape(-1).tolist()) <= {0, 1, 2, 3} and 4 not in slots
    x, s, w, w1, w2 = make_case(T, 2, 5, 5, 4, True, slot_ids=slots, seed=4)
    f = lambda x, w, w1, w2: ops.fused_moe(x, s, w, w1, w2, True, backend="torch")  # noqa: E731
    assert torch.autograd.gradcheck(f, (x, w, w1, w2))
    out = f(x, w, w1, w2)
    d = torch.autograd.grad(out.square().sum(), (w1, w2))
    assert all(float(t[4].abs().max()) == 0.0 for t in d)  # the unused slot gets exactly zero
    # the shared slots collect gradient from tokens of both variants
    from_v0 = torch.autograd.grad(f(x, w * (variants == 0)[:, None], w1, w2).square().sum(), w1)[0]
    from_v1 = torch.autograd.grad(f(x, w * (variants == 1)[:, None], w1, w2).square().sum(), w1)[0]
    for slot in (1, 2):
        if (slots[variants == 0] == slot).any() and (slots[variants == 1] == slot).any():
            assert from_v0[slot].abs().max() > 0 and from_v1[slot].abs().max() > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("gated,activation", GATED_ACTS)
def test_grads_match_autograd_on_the_float64_reference(gated, activation, dtype):
    K = 2 if gated else 1
    x, s, w, w1, w2 = make_case(37, K, 6, 24, 20, gated, dtype, seed=len(activation) + 3 * gated)
    out = ops.fused_moe(x, s, w, w1, w2, gated, backend="torch", activation=activation, limit=LIMIT)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(9)).to(dtype)
    got = torch.autograd.grad(out, (x, w, w1, w2), grad_out)
    want = reference_grads(x, s, w, w1, w2, gated, activation, grad_out)
    for name, a, b in zip(("hidden", "topk_weights", "w1", "w2"), got, want):
        assert a.dtype == dtype and a.shape == b.shape and bool(torch.isfinite(a).all())
        assert rel_err(a, b) <= TOL[dtype], f"d {name}: {rel_err(a, b):.2e}"


@pytest.mark.parametrize("gated,activation", [(True, "silu"), (True, "gelu"), (True, "swiglu_oai"), (False, "relu")])
def test_triton_backend_gradients(gated, activation):
    """The triton backend's forward (interpreter on CPU) with the op's backward."""
    K = 2 if gated else 1
    x, s, w, w1, w2 = make_case(19, K, 4, 32, 16, gated, torch.float32, seed=5)
    out = ops.fused_moe(x, s, w, w1, w2, gated, backend="triton", activation=activation, limit=LIMIT)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
    got = torch.autograd.grad(out, (x, w, w1, w2), grad_out)
    want = reference_grads(x, s, w, w1, w2, gated, activation, grad_out)
    for a, b in zip(got, want):
        assert rel_err(a, b) <= 1e-5


def test_workspace_path_records_gradients_and_inference_skips_autograd():
    slab = ExpertSlab(4, 32, 16, True)
    x, s, w, w1, w2 = make_case(9, 2, 4, 32, 16, True, torch.float32, seed=6)
    ws = slab.workspace(9, 2)
    out = ops.fused_moe(x, s, w, w1, w2, True, backend="triton", workspace=ws)
    assert out.grad_fn is not None  # with grad mode on and inputs requiring grad, the op (and its backward) runs
    got = torch.autograd.grad(out.sum(), x)[0]
    want = reference_grads(x, s, w, w1, w2, True, "silu", torch.ones_like(out))[0]
    assert rel_err(got, want) <= 1e-5
    for ctx in (torch.no_grad, torch.inference_mode):
        with ctx():
            for backend, kw in (("triton", {"workspace": ws}), ("torch", {})):
                assert ops.fused_moe(x, s, w, w1, w2, True, backend=backend, **kw).grad_fn is None


def test_only_requested_gradients_are_computed(monkeypatch):
    from multimoe_rt import torch_moe

    seen = []
    real = torch_moe.moe_torch_backward

    def spy(*args, needs, **kw):
        seen.append(tuple(needs))
        return real(*args, needs=needs, **kw)

    monkeypatch.setattr(torch_moe, "moe_torch_backward", spy)
    x, s, w, w1, w2 = make_case(7, 2, 3, 8, 4, True, torch.float32, seed=7)
    w1_frozen, w2_frozen = w1.detach(), w2.detach()  # slab tensors: not parameters
    out = ops.fused_moe(x, s, w, w1_frozen, w2_frozen, True)
    gx, gw = torch.autograd.grad(out.sum(), (x, w))
    assert seen == [(True, True, False, False)]
    want = reference_grads(x, s, w, w1, w2, True, "silu", torch.ones_like(out))
    assert rel_err(gx, want[0]) <= 1e-5 and rel_err(gw, want[1]) <= 1e-5


def test_zero_tokens_and_zero_weights():
    x, s, w, w1, w2 = make_case(0, 2, 3, 8, 4, True, torch.float32)
    out = ops.fused_moe(x, s, w, w1, w2, True)
    grads = torch.autograd.grad(out.sum(), (x, w, w1, w2), allow_unused=True)
    assert grads[0].shape == (0, 8) and grads[1].shape == (0, 2)
    assert float(grads[2].abs().sum()) == 0.0 and float(grads[3].abs().sum()) == 0.0
    # a capacity-dropped Switch token (weight 0): no gradient reaches its hidden state or the experts through it
    x, s, w, w1, w2 = make_case(5, 1, 3, 8, 4, False, torch.float32, seed=8)
    weights = w.detach().clone()
    weights[2] = 0.0
    weights.requires_grad_()
    gx, gw = torch.autograd.grad(ops.fused_moe(x, s, weights, w1, w2, False).sum(), (x, weights))
    assert float(gx[2].abs().max()) == 0.0 and float(gw[2].abs()) > 0  # d/dw of a dropped token is still defined


def test_compiled_training_step_traces_through_the_op():
    """AOTAutograd traces forward and backward through the fake implementations in one graph."""
    x, s, w, w1, w2 = make_case(11, 2, 4, 16, 8, True, torch.float32, seed=10)

    def train_loss(x, w, w1, w2):
        out = ops.fused_moe(x, s, w, w1, w2, True, backend="torch", check_slots=False, activation="gelu")
        return (out.square() * torch.linspace(0.5, 1.5, out.shape[1])).sum()

    compiled = torch.compile(train_loss, backend="aot_eager", fullgraph=True)
    loss = compiled(x, w, w1, w2)
    got = torch.autograd.grad(loss, (x, w, w1, w2))
    want_loss = train_loss(x, w, w1, w2)
    want = torch.autograd.grad(want_loss, (x, w, w1, w2))
    assert torch.allclose(loss, want_loss)
    for a, b in zip(got, want):
        assert rel_err(a, b) <= 1e-6
    # the op and its backward are graph nodes, not graph breaks: fullgraph=True would have raised otherwise
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode()
    fx, fw, f1, f2 = (mode.from_tensor(t.detach()) for t in (x, w, w1, w2))
    fs = mode.from_tensor(s)
    with mode:
        out = torch.ops.multimoe_rt.fused_moe(fx, fs, fw, f1, f2, True, "torch", "gelu", 1.702, 7.0)
        grads = torch.ops.multimoe_rt.fused_moe_backward(out, fx, fs, fw, f1, f2, True, "torch", "gelu", 1.702, 7.0,
                                                         True, True, False, True)
    assert out.shape == (11, 16) and [tuple(g.shape) for g in grads] == [(11, 16), (11, 2), (0,), (4, 16, 8)]


def test_training_keeps_the_up_projection_for_the_backward():
    """Under grad the torch backend's op keeps each pair's up projection and the backward reads it (no recompute):
    the kept one gives the recomputed gradients, a wrong one wrong gradients; inference keeps nothing."""
    from multimoe_rt import torch_moe

    x, s, w, w1, w2 = make_case(9, 2, 4, 8, 5, True, torch.float32, seed=12)
    out = ops.fused_moe(x, s, w, w1, w2, True, backend="torch", activation="gelu")
    assert "fused_moe_train" in type(out.grad_fn).__name__
    with torch.no_grad():
        assert ops.fused_moe(x, s, w, w1, w2, True, backend="torch").grad_fn is None
    leaves = [t.detach() for t in (x, w, w1, w2)]
    _, h = torch_moe.moe_torch(leaves[0], s, *leaves[1:], True, "gelu", keep_h=True)
    assert h.shape == (9 * 2, 10)
    args = (torch.randn(9, 8, generator=torch.Generator().manual_seed(2)), leaves[0], s, *leaves[1:], True, "gelu")
    recomputed = torch_moe.moe_torch_backward(*args)
    for got, want in zip(torch_moe.moe_torch_backward(*args, h=h), recomputed):
        assert rel_err(got, want) <= 1e-6
    for got, want in zip(torch_moe.moe_torch_backward(*args, h=h + 1), recomputed):
        assert rel_err(got, want) > 1e-3


def test_op_called_positionally_as_before():
    """Other runtimes call the op with the seven arguments it had before activations: SiLU / ReLU."""
    x, s, w, w1, w2 = make_case(6, 2, 3, 8, 4, True, torch.float32, seed=11)
    out = torch.ops.multimoe_rt.fused_moe(x, s, w, w1, w2, True, "torch")
    assert rel_err(out, moe_reference(x, s, w, w1, w2, True, "silu")) <= 1e-5
    gx = torch.autograd.grad(out.sum(), x)[0]
    assert rel_err(gx, reference_grads(x, s, w, w1, w2, True, "silu", torch.ones_like(out))[0]) <= 1e-5


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("gated,activation", GATED_ACTS)
def test_gpu_triton_forward_with_backward(gated, activation, dtype):
    K = 2 if gated else 1
    x, s, w, w1, w2 = make_case(300, K, 16, 256, 352, gated, dtype, seed=12)
    x, w, w1, w2 = (t.detach().cuda().requires_grad_() for t in (x, w, w1, w2))
    out = ops.fused_moe(x, s.cuda(), w, w1, w2, gated, activation=activation, limit=LIMIT)
    assert ops.choose_backend(x.device) == "triton"
    grad_out = torch.randn(out.shape, device="cuda", dtype=dtype)
    got = torch.autograd.grad(out, (x, w, w1, w2), grad_out)
    want = reference_grads(x, s.cuda(), w, w1, w2, gated, activation, grad_out)
    for a, b in zip(got, want):
        assert rel_err(a, b) <= TOL[dtype]


# ---- GPT-OSS's stored layout read as stored: gate_up [S, H, 2I] with gate/up interleaved, down [S, I, H], biases ----
def stored_case(T, K, S, H, I, dtype, seed):
    """Leaves in GPT-OSS's layout (fresh random values, biases included)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=g, dtype=torch.float64)
    gate_up = 2.0 * torch.randn(S, H, 2 * I, generator=g, dtype=torch.float64) / H ** 0.5
    down = torch.randn(S, I, H, generator=g, dtype=torch.float64) / I ** 0.5
    b1 = 0.5 * torch.randn(S, 2 * I, generator=g, dtype=torch.float64)
    b2 = 0.5 * torch.randn(S, H, generator=g, dtype=torch.float64)
    s = torch.stack([torch.randperm(S, generator=g)[:K] for _ in range(T)]) if T else torch.empty(0, K, dtype=torch.long)
    w = torch.rand(T, K, generator=g, dtype=torch.float64) + 0.1
    return s, [t.to(dtype).requires_grad_() for t in (x, w, gate_up, down, b1, b2)]


def stored_reference(s, x, w, gate_up, down, b1, b2, activation):
    """float64 reference on the op's concatenated layout, reached by explicit (differentiable) de-interleaving."""
    w1 = torch.cat([gate_up[:, :, 0::2], gate_up[:, :, 1::2]], dim=2).transpose(1, 2)
    b1c = torch.cat([b1[:, 0::2], b1[:, 1::2]], dim=1)
    return moe_reference(x, s, w, w1, down.transpose(1, 2), True, activation, 1.702, LIMIT, b1=b1c, b2=b2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("activation", ["swiglu_oai", "silu"])
@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("T,K,S,H,I", [(9, 2, 5, 12, 7), (1, 4, 6, 5, 3), (0, 2, 3, 8, 4)])
def test_interleaved_transposed_weights_match_the_float64_reference(T, K, S, H, I, backend, activation, dtype):
    """Forward and gradients (hidden, routing weights, both weights, both biases) of the op on transposed views
    with interleaved=True, against float64 autograd of the de-interleaved reference; gradients keep the stored
    layout (they reach the stored [S, H, 2I] / [S, I, H] parameters through the views)."""
    s, mine = stored_case(T, K, S, H, I, dtype, seed=T + 7 * K)
    x, w, gate_up, down, b1, b2 = mine
    out = ops.fused_moe(x, s, w, gate_up.transpose(1, 2), down.transpose(1, 2), True, backend=backend,
                        activation=activation, limit=LIMIT, b1=b1, b2=b2, interleaved=True)
    leaves = [t.detach().double().requires_grad_() for t in mine]
    ref = stored_reference(s, *leaves, activation)
    assert out.shape == (T, H) and out.dtype == dtype
    if T == 0:
        return
    g = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert rel_err(out, ref) <= TOL[dtype]
    got = torch.autograd.grad(out, mine, g.to(dtype))
    want = torch.autograd.grad(ref, leaves, g)
    for name, a, b, leaf in zip(("hidden", "weights", "gate_up", "down", "b1", "b2"), got, want, mine):
        assert a.shape == leaf.shape, name
        assert rel_err(a, b) <= TOL[dtype], f"{name}: {rel_err(a, b):.2e}"
    # the layout matters: reading the same storage as concatenated gate/up gives another function
    concat = ops.fused_moe(x, s, w, gate_up.transpose(1, 2), down.transpose(1, 2), True, backend=backend,
                           activation=activation, limit=LIMIT, b1=b1, b2=b2)
    assert rel_err(concat, ref) > 1e-2


def test_interleaved_gradcheck_float64_without_biases():
    s, (x, w, gate_up, down, _, _) = stored_case(4, 2, 3, 5, 3, torch.float64, seed=3)
    f = lambda x, w, gu, dn: ops.fused_moe(x, s, w, gu.transpose(1, 2), dn.transpose(1, 2), True,  # noqa: E731
                                           backend="torch", activation="swiglu_oai", limit=LIMIT, interleaved=True)
    assert torch.autograd.gradcheck(f, (x, w, gate_up, down))


def test_interleaved_needs_gated_experts():
    from multimoe_rt.errors import UsageError

    x, s, w, w1, w2 = make_case(3, 1, 2, 4, 3, gated=False, dtype=torch.float32)
    with pytest.raises(UsageError, match="interleaved=True needs gated experts"):
        ops.fused_moe(x, s, w, w1, w2, False, backend="torch", interleaved=True)
