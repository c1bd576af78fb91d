"""The fused CPU delta ops (csrc/delta_cpu.cpp: multimoe_rt::sign1_matmul, ::int4_matmul) against a float64
reference decoded by delta.sign1_decode / delta.int4_decode, under every kernel this CPU can run (the
scalar fallback, and on AVX2 the direct and table kernels), and moe_torch_delta on the fused path against
moe_reference_delta.

Tolerances, relative error ||out - ref|| / ||ref|| against float64 from the same (rounded) inputs: x in
float32 <= 1e-5; x in bfloat16/float16 <= 1e-5 as well, since the reference takes the same rounded x and
the ops accumulate in float32 (the MoE test, where the base matmul runs in bf16, keeps test_delta's 2e-2).
Fresh random inputs per case.
"""
import math

import pytest
import torch

from multimoe_rt import _ext
from multimoe_rt import delta as D
from multimoe_rt import delta_moe as DM

pytestmark = pytest.mark.skipif(not _ext.has_delta_ops, reason=f"fused delta ops not built: {_ext.reason}")

TOL = 1e-5
KERNELS = ["scalar"] + (["direct", "lut"] if _ext.has_delta_ops and _ext.delta_cpu_isa() == "avx2" else [])
SHAPES = [(0, 5, 19), (1, 1, 1), (1, 7, 19), (3, 9, 33), (16, 13, 64), (33, 11, 70), (5, 33, 300)]


def rel_err(out, ref):
    return ((out.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


@pytest.fixture(params=KERNELS)
def kernel(request):
    _ext.set_delta_cpu_kernel(request.param)
    yield request.param
    _ext.set_delta_cpu_kernel("auto")


def make(M, N, K, xdtype, sdtype, seed):
    g = torch.Generator().manual_seed(seed)
    d = torch.randn(N, K, generator=g)
    x = torch.randn(M, K, generator=g).to(xdtype)
    bits, scale = D.sign1_encode(d)
    codes, scales = D.int4_encode(d)
    return x, bits, scale.to(sdtype), codes, scales.to(sdtype)


@pytest.mark.parametrize("M,N,K", SHAPES)
@pytest.mark.parametrize("xdtype", [torch.float32, torch.bfloat16, torch.float16])
def test_sign1_matmul(kernel, M, N, K, xdtype):
    sdtype = torch.float32 if xdtype == torch.float32 else xdtype
    x, bits, scale, _, _ = make(M, N, K, xdtype, sdtype, seed=M * 1000 + N * 10 + K)
    out = _ext.sign1_matmul(x, bits, scale, K)
    assert out.dtype == torch.float32 and out.shape == (M, N)
    ref = x.double() @ D.sign1_decode(bits, scale, K, torch.float64).T
    if M:
        assert rel_err(out, ref) <= TOL
    # a stale or poisoned result must not pass: the reference is sensitive to one flipped bit
    if M and N and K >= 8:
        flipped = bits.clone()
        flipped[0, 0] ^= 1
        assert rel_err(_ext.sign1_matmul(x, flipped, scale, K), ref) > TOL


@pytest.mark.parametrize("M,N,K", SHAPES + [(2, 5, 31), (4, 6, 32), (2, 3, 95)])
@pytest.mark.parametrize("xdtype", [torch.float32, torch.bfloat16, torch.float16])
def test_int4_matmul(kernel, M, N, K, xdtype):
    sdtype = torch.float32 if xdtype == torch.float32 else xdtype
    x, _, _, codes, scales = make(M, N, K, xdtype, sdtype, seed=M * 1000 + N * 10 + K + 7)
    out = _ext.int4_matmul(x, codes, scales, K, D.INT4_GROUP)
    assert out.dtype == torch.float32 and out.shape == (M, N)
    ref = x.double() @ D.int4_decode(codes, scales, K, torch.float64).T
    if M:
        assert rel_err(out, ref) <= TOL
    if M and N:
        changed = codes.clone()
        changed[-1, -1] ^= 0x11 if K % 2 == 0 else 0x01  # the last real code(s): the ragged tail is read
        assert rel_err(_ext.int4_matmul(x, changed, scales, K, D.INT4_GROUP), ref) > TOL


def test_strided_rows_of_a_pool():
    """Pool slices have strided rows; bits of the neighbouring entries must not leak in."""
    g = torch.Generator().manual_seed(3)
    pool_bits = torch.randint(0, 256, (3, 10, 8), dtype=torch.uint8, generator=g)
    bits = pool_bits[:, :, :5].transpose(0, 1)[:, 1]  # [10, 5], row stride 8
    assert bits.stride() == (8, 1)
    x, scale = torch.randn(4, 40, generator=g), torch.rand(10, generator=g)
    ref = x.double() @ D.sign1_decode(bits.contiguous(), scale, 40, torch.float64).T
    assert rel_err(_ext.sign1_matmul(x, bits, scale, 40), ref) <= TOL


def test_k_zero_gives_zeros():
    x = torch.randn(3, 0)
    assert torch.equal(_ext.sign1_matmul(x, torch.zeros(4, 0, dtype=torch.uint8), torch.ones(4), 0), torch.zeros(3, 4))
    assert torch.equal(_ext.int4_matmul(x, torch.zeros(4, 0, dtype=torch.uint8), torch.ones(4, 0), 0, 32),
                       torch.zeros(3, 4))


@pytest.mark.parametrize("args,match", [
    ((torch.randn(2, 16, dtype=torch.float64), torch.zeros(3, 2, dtype=torch.uint8), torch.ones(3), 16),
     "x must be float32, bfloat16 or float16"),
    ((torch.randn(16), torch.zeros(3, 2, dtype=torch.uint8), torch.ones(3), 16), "x must be 2-D"),
    ((torch.randn(2, 16), torch.zeros(3, 2, dtype=torch.uint8), torch.ones(3), 17), "columns but k = 17"),
    ((torch.randn(2, 17), torch.zeros(3, 2, dtype=torch.uint8), torch.ones(3), 17), r"bits must be \[N, ceil\(k/8\) = 3\]"),
    ((torch.randn(2, 16), torch.zeros(3, 2, dtype=torch.int32), torch.ones(3), 16), "bits must be uint8"),
    ((torch.randn(2, 16), torch.zeros(3, 2, dtype=torch.uint8), torch.ones(4), 16), "scale must have shape"),
    ((torch.randn(2, 16), torch.zeros(3, 2, dtype=torch.uint8), torch.ones(3, dtype=torch.int32), 16),
     "scale must be float32"),
])
def test_sign1_bad_inputs(args, match):
    with pytest.raises(RuntimeError, match=match):
        _ext.sign1_matmul(*args)


@pytest.mark.parametrize("args,match", [
    ((torch.randn(2, 64), torch.zeros(3, 32, dtype=torch.uint8), torch.ones(3, 2), 64, 12), "group must be a multiple of 8"),
    ((torch.randn(2, 64), torch.zeros(3, 31, dtype=torch.uint8), torch.ones(3, 2), 64, 32), r"codes must be \[N, ceil\(k/2\)"),
    ((torch.randn(2, 64), torch.zeros(3, 32, dtype=torch.uint8), torch.ones(3, 3), 64, 32), "scales must have shape"),
    ((torch.randn(2, 64).bfloat16(), torch.zeros(3, 32), torch.ones(3, 2), 64, 32), "codes must be uint8"),
])
def test_int4_bad_inputs(args, match):
    with pytest.raises(RuntimeError, match=match):
        _ext.int4_matmul(*args)


def test_unknown_kernel_raises():
    with pytest.raises(RuntimeError, match="unknown kernel"):
        _ext.set_delta_cpu_kernel("avx9000")
    assert _ext.delta_cpu_kernel() == "auto"


# ------------------------------------------------------------------------------------------ the MoE


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("gated", [True, False])
def test_moe_torch_delta_fused_matches_reference(kernel, dtype, tol, gated, monkeypatch):
    from test_delta import make_inputs, make_slab, rel_err as moe_rel_err

    H, I, S = 40, 51, 2  # K not a multiple of 8 or of the int4 group on either projection
    specs = ("sign1", "int4", "lowrank3+sign1", "lowrank4+int4")
    w1, w2, pools = make_slab(S, H, I, gated, specs, dtype=dtype, seed=11)
    ids_pool = list(range(S + len(specs)))
    hidden, ids, weights = make_inputs(19, 2, H, ids_pool, dtype, seed=12)
    calls = []
    for name in ("sign1_matmul", "int4_matmul"):
        real = getattr(_ext, name)
        monkeypatch.setattr(_ext, name, lambda *a, _real=real, _name=name: calls.append(_name) or _real(*a))
    out = DM.moe_torch_delta(hidden, ids, weights, w1, w2, gated, pools)
    ref = DM.moe_reference_delta(hidden, ids, weights, w1, w2, gated, pools)
    assert {"sign1_matmul", "int4_matmul"} <= set(calls)  # the fused path ran
    assert out.dtype == dtype
    assert moe_rel_err(out, ref) <= tol


def test_moe_float64_keeps_the_torch_path(monkeypatch):
    from test_delta import make_inputs, make_slab

    w1, w2, pools = make_slab(2, 16, 24, True, ("sign1", "int4"), dtype=torch.float64, seed=5)
    hidden, ids, weights = make_inputs(5, 2, 16, [0, 1, 2, 3], torch.float64, seed=6)

    def boom(*a):
        raise AssertionError("float64 must not take the fused float32 ops")

    monkeypatch.setattr(_ext, "sign1_matmul", boom)
    monkeypatch.setattr(_ext, "int4_matmul", boom)
    out = DM.moe_torch_delta(hidden, ids, weights, w1, w2, True, pools)
    ref = DM.moe_reference_delta(hidden, ids, weights, w1, w2, True, pools)
    assert ((out - ref).norm() / ref.norm()).item() <= 1e-12
