"""Compressed expert deltas (multimoe_rt.delta): codecs, pools, the torch backend and the Triton kernel
(interpreter on CPU) against the float64 reference.

Tolerances, relative error ||out - ref|| / ||ref|| against float64 on the same stored deltas: fp32 <= 1e-5,
bf16/fp16 <= 2e-2. Fresh random inputs per case; work buffers poisoned with NaN.
"""
import math

import pytest
import torch

from multimoe_rt import delta as D
from multimoe_rt import delta_moe as DM
from multimoe_rt.errors import MultimoeError

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-2}
SPECS = ("sign1", "lowrank5", "int4", "lowrank3+sign1", "lowrank20+int4")


def rel_err(out, ref):
    return ((out.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def make_slab(S, H, I, gated, specs, dtype=torch.float32, seed=0, bases=None):
    """Dense slab weights and pools holding one delta per spec (on base slot i % S unless ``bases``)."""
    g = torch.Generator().manual_seed(seed)
    n1 = 2 * I if gated else I
    w1 = (torch.randn(S, n1, H, generator=g) / H ** 0.5).to(dtype)
    w2 = (torch.randn(S, H, I, generator=g) / I ** 0.5).to(dtype)
    encs = [D.encode_delta(0.2 * torch.randn(n1, H, generator=g) / H ** 0.5,
                           0.2 * torch.randn(H, I, generator=g) / I ** 0.5, s, round_to=dtype) for s in specs]
    pools = D.DeltaPools(S, H, I, gated, dtype=dtype, entries=len(specs),
                         sign1=sum(e.sign1 is not None for e in encs), lowrank_units=sum(e.rank for e in encs),
                         int4=sum(e.int4 is not None for e in encs))
    for i, e in enumerate(encs):
        pools.add(bases[i] if bases else i % S, e, sync=False)
    pools.finish()
    return w1, w2, pools


def make_inputs(T, K, H, ids_pool, dtype, seed):
    g = torch.Generator().manual_seed(seed + 1000)
    hidden = torch.randn(T, H, generator=g).to(dtype)
    pool = torch.tensor(ids_pool)
    if len(pool) >= K and T:
        pick = torch.stack([torch.randperm(len(pool), generator=g)[:K] for _ in range(T)])
    else:
        pick = torch.randint(0, len(pool), (T, K), generator=g)
    ids = pool[pick].reshape(T, K)
    weights = torch.softmax(torch.randn(T, K, generator=g), -1).to(dtype)
    return hidden, ids, weights


# ------------------------------------------------------------------------------------------ codecs


@pytest.mark.parametrize("k", [1, 7, 8, 19, 64])
def test_sign1_roundtrip(k):
    d = torch.randn(5, k)
    bits, scale = D.sign1_encode(d)
    assert bits.dtype == torch.uint8 and bits.shape == (5, math.ceil(k / 8))
    torch.testing.assert_close(scale, d.abs().mean(1))
    dec = D.sign1_decode(bits, scale, k)
    assert torch.equal(torch.sign(dec), torch.where(d >= 0, 1.0, -1.0))
    torch.testing.assert_close(dec.abs(), scale[:, None].expand(5, k))


def test_sign1_scale_is_least_squares():
    d = torch.randn(4, 40)
    bits, scale = D.sign1_encode(d)
    s = D.sign1_signs(bits, 40, torch.float32)
    best = (d * s).sum(1) / (s * s).sum(1)
    torch.testing.assert_close(scale, best)


@pytest.mark.parametrize("k", [3, 32, 33, 70])
def test_int4_error_within_half_step(k):
    d = torch.randn(6, k)
    codes, scales = D.int4_encode(d)
    assert codes.shape == (6, math.ceil(k / 2)) and scales.shape == (6, math.ceil(k / D.INT4_GROUP))
    dec = D.int4_decode(codes, scales, k)
    step = scales.repeat_interleave(D.INT4_GROUP, 1)[:, :k]
    assert bool(((dec - d).abs() <= step / 2 + 1e-6).all())


def test_lowrank_exact_at_full_rank_and_padded_above():
    d = torch.randn(9, 5, dtype=torch.float32)
    U, V = D.lowrank_encode(d, 7)
    assert U.shape == (9, 7) and V.shape == (7, 5)
    assert rel_err(U @ V, d.double()) < 1e-5
    U, V = D.lowrank_encode(d, 2)
    s = torch.linalg.svdvals(d.double())
    assert abs((U @ V - d).double().norm() - s[2:].norm()) < 1e-4  # Eckart-Young


def test_combined_spec_encodes_the_residual():
    g = torch.Generator().manual_seed(3)
    d1, d2 = torch.randn(16, 12, generator=g), torch.randn(12, 8, generator=g)
    alone = D.encode_delta(d1, d2, "lowrank3").decode()
    both = D.encode_delta(d1, d2, "sign1+lowrank3").decode()
    assert D.canonical_spec("sign1+lowrank3") == "lowrank3+sign1"
    assert (both[0] - d1).norm() < (alone[0] - d1).norm()
    assert (both[1] - d2).norm() < (alone[1] - d2).norm()


@pytest.mark.parametrize("bad", ["", "sign2", "lowrank", "lowrank0", "sign1+sign1", "int4+", 3])
def test_bad_spec(bad):
    with pytest.raises(D.DeltaError):
        D.parse_spec(bad)


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_spec_nbytes_is_what_the_pools_take(spec, dtype):
    H, I = 33, 19
    enc = D.encode_delta(torch.randn(2 * I, H), torch.randn(H, I), spec)
    pools = D.DeltaPools(1, H, I, True, dtype=dtype, entries=1, sign1=int(enc.sign1 is not None),
                         lowrank_units=enc.rank, int4=int(enc.int4 is not None))
    empty = D.DeltaPools(1, H, I, True, dtype=dtype)
    assert pools.nbytes - empty.nbytes == D.spec_nbytes(spec, 2 * I, H, I, torch.empty((), dtype=dtype).element_size())


# ------------------------------------------------------------------------------------------ errors


@pytest.mark.parametrize("poison", [float("nan"), float("inf")])
def test_nonfinite_delta_raises(poison):
    d1, d2 = torch.randn(8, 4), torch.randn(4, 4)
    d1[3, 1] = poison
    with pytest.raises(D.DeltaError, match="non-finite"):
        D.encode_delta(d1, d2, "sign1")
    enc = D.encode_delta(torch.randn(8, 4), d2, "lowrank2")
    enc.lowrank[0][0, 0] = poison
    pools = D.DeltaPools(1, 4, 4, True, entries=1, lowrank_units=2)
    with pytest.raises(MultimoeError, match="non-finite"):
        pools.add(0, enc)
    assert isinstance(D.DeltaError("x"), ValueError)


def test_pool_limits_and_shapes():
    enc = D.encode_delta(torch.randn(8, 4), torch.randn(4, 4), "sign1")
    pools = D.DeltaPools(2, 4, 4, True, entries=1, sign1=1)
    with pytest.raises(D.DeltaError, match="base slot"):
        pools.add(2, enc)
    assert pools.add(1, enc) == 2
    with pytest.raises(D.DeltaError, match="full"):
        pools.add(0, enc)
    other = D.DeltaPools(2, 4, 5, True, entries=1, sign1=1)
    with pytest.raises(D.DeltaError, match="shapes"):
        other.add(0, enc)
    unfinished = D.DeltaPools(2, 4, 4, True, entries=2, sign1=2)
    unfinished.add(0, enc, sync=False)
    with pytest.raises(D.DeltaError, match="never added"):
        unfinished.finish()


# ------------------------------------------------------------------------------------------ torch backend


def _check_torch(T, K, S, H, I, gated, specs, dtype=torch.float32, seed=0, ids_pool=None, activation=None,
                 base_once=True):
    w1, w2, pools = make_slab(S, H, I, gated, specs, dtype, seed)
    ids_pool = ids_pool if ids_pool is not None else list(range(pools.num_ids))
    hidden, ids, weights = make_inputs(T, K, H, ids_pool, dtype, seed)
    out = DM.moe_torch_delta(hidden, ids, weights, w1, w2, gated, pools, activation=activation, base_once=base_once)
    assert out.shape == (T, H) and out.dtype == dtype
    ref = DM.moe_reference_delta(hidden, ids, weights, w1, w2, gated, pools, activation=activation)
    if T:
        err = rel_err(out, ref)
        assert err <= TOL[dtype], f"rel err {err:.2e} (T={T} K={K} H={H} I={I} {dtype} {specs})"
    return out


@pytest.mark.parametrize("gated,K", [(True, 2), (False, 1), (True, 3)])
@pytest.mark.parametrize("base_once", [True, False])
def test_torch_mixed_codecs_one_call(gated, K, base_once):
    _check_torch(23, K, S=4, H=40, I=24, gated=gated, specs=SPECS, seed=K, base_once=base_once)


@pytest.mark.parametrize("H,I", [(33, 19), (17, 70), (100, 5)])
def test_torch_odd_shapes(H, I):
    _check_torch(11, 2, S=3, H=H, I=I, gated=True, specs=SPECS, seed=H)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_torch_16bit(dtype):
    _check_torch(29, 2, S=3, H=48, I=40, gated=True, specs=SPECS, dtype=dtype, seed=5)


def test_torch_all_tokens_on_one_delta_and_empty_groups():
    # every pair on one delta id; the other ids (dense and delta) get nothing
    _check_torch(17, 1, S=3, H=32, I=16, gated=False, specs=SPECS, seed=2, ids_pool=[3 + 3])
    _check_torch(0, 2, S=3, H=32, I=16, gated=True, specs=SPECS, seed=2)


@pytest.mark.parametrize("activation", ["gelu", "swiglu_oai"])
def test_torch_activations(activation):
    _check_torch(9, 2, S=3, H=24, I=16, gated=True, specs=SPECS, seed=9, activation=activation)


def test_dense_ids_match_the_dense_path():
    from multimoe_rt.torch_moe import moe_torch

    w1, w2, pools = make_slab(3, 32, 16, True, SPECS, seed=4)
    hidden, ids, weights = make_inputs(13, 2, 32, [0, 1, 2], torch.float32, 4)
    out = DM.moe_torch_delta(hidden, ids, weights, w1, w2, True, pools)
    torch.testing.assert_close(out, moe_torch(hidden, ids, weights, w1, w2, True), rtol=1e-6, atol=1e-6)


def test_delta_changes_the_output():
    w1, w2, pools = make_slab(2, 32, 16, True, ["sign1"], seed=6, bases=[0])
    hidden, _, weights = make_inputs(5, 1, 32, [0], torch.float32, 6)
    dense = DM.moe_torch_delta(hidden, torch.zeros(5, 1, dtype=torch.long), weights[:, :1], w1, w2, True, pools)
    delta = DM.moe_torch_delta(hidden, torch.full((5, 1), 2), weights[:, :1], w1, w2, True, pools)
    assert (dense - delta).norm() > 1e-3 * dense.norm()


def test_effective_weights_are_base_plus_decoded_delta():
    g = torch.Generator().manual_seed(8)
    d1, d2 = torch.randn(32, 16, generator=g), torch.randn(16, 16, generator=g)
    enc = D.encode_delta(d1, d2, "lowrank4+sign1")
    pools = D.DeltaPools(2, 16, 16, True, entries=1, sign1=1, lowrank_units=4)
    i = pools.add(1, enc)
    w1, w2 = torch.randn(2, 32, 16), torch.randn(2, 16, 16)
    e1, e2 = pools.effective(w1, w2, i)
    dd1, dd2 = enc.decode(torch.float64)
    torch.testing.assert_close(e1, w1[1].double() + dd1)
    torch.testing.assert_close(e2, w2[1].double() + dd2)
    assert pools.describe(i)["base"] == 1 and pools.describe(0) == {
        "base": 0, "sign1": -1, "lowrank_start": 0, "lowrank_rank": 0, "int4": -1}


# ------------------------------------------------------------------------------------------ Triton kernel


def _check_triton(T, K, S, H, I, gated, specs, dtype=torch.float32, seed=0, ids_pool=None, activation=None,
                  config=None):
    pytest.importorskip("triton")
    from multimoe_rt.kernels.delta_gemm import allocate_delta_workspace, fused_moe_delta_triton

    w1, w2, pools = make_slab(S, H, I, gated, specs, dtype, seed)
    ids_pool = ids_pool if ids_pool is not None else list(range(pools.num_ids))
    hidden, ids, weights = make_inputs(T, K, H, ids_pool, dtype, seed)
    ws = allocate_delta_workspace(T, K, H, I, pools.num_ids, dtype, "cpu", config)
    for buf in ws.values():
        buf.fill_(float("nan") if buf.is_floating_point() else -7)
    out = fused_moe_delta_triton(hidden, ids, weights, w1, w2, gated, pools, config=config, workspace=ws,
                                 activation=activation)
    assert out.shape == (T, H) and out.dtype == dtype and out.data_ptr() == ws["out"].data_ptr()
    assert bool(torch.isfinite(out).all()), "an output element was not written (NaN poison survived)"
    if T:
        ref = DM.moe_reference_delta(hidden, ids, weights, w1, w2, gated, pools, activation=activation)
        err = rel_err(out, ref)
        assert err <= TOL[dtype], f"rel err {err:.2e} (T={T} K={K} H={H} I={I} {dtype} {specs})"


@pytest.mark.parametrize("gated,K", [(True, 2), (False, 1)])
def test_triton_mixed_codecs_one_call(gated, K):
    _check_triton(21, K, S=3, H=40, I=24, gated=gated, specs=SPECS, seed=K)


@pytest.mark.parametrize("H,I", [(33, 19), (17, 70)])
def test_triton_odd_shapes(H, I):
    _check_triton(7, 2, S=2, H=H, I=I, gated=True, specs=SPECS, seed=H)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_16bit(dtype):
    _check_triton(9, 2, S=3, H=48, I=40, gated=True, specs=SPECS, dtype=dtype, seed=5)


def test_triton_all_tokens_on_one_delta_empty_groups_and_prefill_tiles():
    _check_triton(19, 1, S=3, H=32, I=16, gated=False, specs=SPECS, seed=2, ids_pool=[3 + 4])
    _check_triton(0, 2, S=3, H=32, I=16, gated=True, specs=SPECS, seed=2)
    # more pairs than the decode class: prefill tiles (BLOCK_M 64) over a mix of dense and delta ids
    _check_triton(40, 2, S=3, H=24, I=16, gated=True, specs=("sign1", "lowrank3"), seed=3)


def test_triton_single_codec_pools_and_swiglu():
    # pools holding one codec only compile the others out
    for specs in (("sign1",), ("lowrank4",), ("int4",)):
        _check_triton(6, 2, S=2, H=24, I=16, gated=True, specs=specs, seed=len(specs[0]))
    _check_triton(6, 2, S=2, H=24, I=16, gated=True, specs=SPECS, seed=1, activation="swiglu_oai")


# ------------------------------------------------------------------------------------------ the op


@pytest.mark.parametrize("backend", ["torch", "reference", "triton"])
def test_op_dispatch_with_deltas(backend):
    from multimoe_rt import ops

    w1, w2, pools = make_slab(3, 40, 24, True, SPECS, seed=11)
    hidden, ids, weights = make_inputs(15, 2, 40, list(range(pools.num_ids)), torch.float32, 11)
    ref = DM.moe_reference_delta(hidden, ids, weights, w1, w2, True, pools)
    out = ops.fused_moe(hidden, ids, weights, w1, w2, True, backend=backend, deltas=pools)
    assert rel_err(out, ref) <= TOL[torch.float32]
    with pytest.raises(IndexError, match="expert id out of range"):
        ops.fused_moe(hidden, ids + pools.num_ids, weights, w1, w2, True, backend=backend, deltas=pools)


def test_op_workspace_path_and_slab():
    pytest.importorskip("triton")
    from multimoe_rt import ops
    from multimoe_rt.slab import ExpertSlab

    w1, w2, pools = make_slab(3, 32, 16, True, SPECS, seed=12)
    slab = ExpertSlab(3, 32, 16, True)
    for s in range(3):
        slab.write(s, w1[s], w2[s])
    slab.attach_deltas(pools)
    assert slab.num_ids == pools.num_ids and slab.nbytes == 3 * slab.slot_nbytes + pools.nbytes
    hidden, ids, weights = make_inputs(9, 2, 32, list(range(pools.num_ids)), torch.float32, 12)
    ws = slab.workspace(9, 2)
    assert "delta_keys" in ws
    out = ops.fused_moe(hidden, ids, weights, slab.w1, slab.w2, True, backend="triton", workspace=ws, deltas=pools)
    ref = DM.moe_reference_delta(hidden, ids, weights, w1, w2, True, pools)
    assert rel_err(out, ref) <= TOL[torch.float32]


def test_op_is_forward_only_and_traces():
    from multimoe_rt import ops

    w1, w2, pools = make_slab(2, 16, 8, True, ("sign1", "lowrank2"), seed=13)
    hidden, ids, weights = make_inputs(4, 2, 16, list(range(pools.num_ids)), torch.float32, 13)
    with pytest.raises(NotImplementedError, match="forward only"):
        ops.fused_moe(hidden.requires_grad_(), ids, weights, w1, w2, True, backend="torch", deltas=pools)
    hidden = hidden.detach()
    with pytest.raises(NotImplementedError, match="biases"):
        ops.fused_moe(hidden, ids, weights, w1, w2, True, backend="torch", deltas=pools,
                      b1=torch.zeros(2, 16), b2=torch.zeros(2, 16))
    # the fake implementation: shapes for torch.compile / meta tracing
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True):
        out = torch.ops.multimoe_rt.fused_moe_delta(hidden, ids, weights, w1, w2, True, "torch", "silu", 1.702, 7.0,
                                                    list(pools.tensors()), pools.max_rank)
    assert tuple(out.shape) == (4, 16)
