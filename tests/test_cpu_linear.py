"""The CPU linear with 16-bit weights (multimoe_rt::lowp_linear), its dispatch rule (cpu_linear) and its use in
the torch MoE backend, against float64 references of the same rounded values.

Tolerances (relative error ||out - ref|| / ||ref||): 1e-5 for float32 x (float32 output: the op only
accumulates in float32), 2e-2 for bfloat16/float16 x (the output is rounded to 16 bits)."""
import pytest
import torch

from multimoe_rt import _ext, cpu_linear

pytestmark = pytest.mark.skipif(not _ext.has_lowp_linear, reason=f"no lowp_linear op: {_ext.reason}")

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-2}


def rel_err(out, ref):
    return ((out.double() - ref).norm() / ref.norm()).item()


def make(M, N, K, x_dtype, w_dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g).to(x_dtype)
    w = (torch.randn(N, K, generator=g) / K ** 0.5).to(w_dtype)
    return x, w


def reference(x, w):
    return x.double() @ w.double().T


OPS = {"simd": torch.ops.multimoe_rt.lowp_linear, "scalar": torch.ops.multimoe_rt.lowp_linear_scalar}


@pytest.mark.parametrize("kernel", ["simd", "scalar"])
@pytest.mark.parametrize("w_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("M", [1, 3, 16, 33, 64])
@pytest.mark.parametrize("N,K", [(37, 1031), (130, 19), (9, 16), (5, 7)])
def test_matches_float64(M, N, K, x_dtype, w_dtype, kernel):
    x, w = make(M, N, K, x_dtype, w_dtype, seed=M * 1000 + N + K)
    out = OPS[kernel](x, w)
    assert out.dtype == x_dtype and out.shape == (M, N)
    assert rel_err(out, reference(x, w)) <= TOL[x_dtype]


@pytest.mark.parametrize("w_dtype", [torch.bfloat16, torch.float16])
def test_every_element_is_its_own_dot_product(w_dtype):
    """Each output element against its own float64 dot product (a global norm could hide a few wrong or
    unwritten entries: the output is allocated uninitialised, so leftovers would show up here)."""
    for M, N, K in [(5, 23, 83), (64, 11, 33), (2, 4, 1)]:
        x, w = make(M, N, K, torch.float32, w_dtype, seed=M + N + K)
        out, ref = OPS["simd"](x, w).double(), reference(x, w)
        scale = x.double().abs() @ w.double().abs().T  # bound of the float32 rounding, per element
        assert ((out - ref).abs() <= 1e-5 * scale + 1e-12).all()


def test_fp16_x_and_mixed_dtypes():
    x, w = make(7, 29, 45, torch.float16, torch.bfloat16, seed=3)
    out = OPS["simd"](x, w)
    assert out.dtype == torch.float16 and rel_err(out, reference(x, w)) <= TOL[torch.float16]


@pytest.mark.parametrize("w_dtype", [torch.bfloat16, torch.float16])
def test_empty_and_degenerate_shapes(w_dtype):
    op = OPS["simd"]
    assert op(torch.randn(0, 24), torch.randn(5, 24).to(w_dtype)).shape == (0, 5)
    assert op(torch.randn(3, 24), torch.randn(0, 24).to(w_dtype)).shape == (3, 0)
    out = op(torch.randn(3, 0), torch.randn(5, 0).to(w_dtype))
    assert out.shape == (3, 5) and (out == 0).all()


@pytest.mark.parametrize("w_dtype", [torch.bfloat16, torch.float16])
def test_strided_views(w_dtype):
    """Slab slots, row slices of a slot (the gate rows of w13) and column slices (rows strided past K)."""
    g = torch.Generator().manual_seed(11)
    slab = (torch.randn(4, 50, 97, generator=g) / 10).to(w_dtype)
    x = torch.randn(6, 97, generator=g)
    for w in (slab[2], slab[1][:25], slab[3][25:], slab[0][::2]):
        assert rel_err(OPS["simd"](x, w), reference(x, w)) <= 1e-5
    w = slab[2][:, 3:80]  # row stride 97, K = 77
    xs = torch.randn(6, 77, generator=g)
    assert rel_err(OPS["simd"](xs, w), reference(xs, w)) <= 1e-5
    w = slab[2].T[:40]  # columns not adjacent: copied
    xt = torch.randn(3, 50, generator=g)
    assert rel_err(OPS["simd"](xt, w), reference(xt, w)) <= 1e-5
    xv = torch.randn(97, 6, generator=g).T  # x strided too
    assert rel_err(OPS["simd"](xv, slab[1]), reference(xv, slab[1])) <= 1e-5


def test_multithreaded_rows_split_like_one_thread():
    x, w = make(5, 1001, 300, torch.float32, torch.bfloat16, seed=5)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = OPS["simd"](x, w)
        torch.set_num_threads(2)
        two = OPS["simd"](x, w)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)


@pytest.mark.parametrize("x,w,match", [
    (torch.randn(3, 8), torch.randn(4, 8), "w must be bfloat16 or float16"),
    (torch.randn(3, 8, dtype=torch.float64), torch.randn(4, 8).bfloat16(), "x must be float32, bfloat16 or float16"),
    (torch.randn(3, 8), torch.randn(4, 9).bfloat16(), "disagree on K"),
    (torch.randn(3, 2, 8), torch.randn(4, 8).bfloat16(), "x must be 2-D"),
    (torch.randn(3, 8), torch.randn(4, 8).bfloat16()[None], "w must be 2-D"),
])
def test_bad_inputs_raise_clearly(x, w, match):
    with pytest.raises(RuntimeError, match=match):
        torch.ops.multimoe_rt.lowp_linear(x, w)
    with pytest.raises(RuntimeError, match=match):
        _ext.lowp_linear(x, w)


def test_the_tolerance_sees_the_likely_bugs():
    """The 1e-5 check can fail: a dropped K tail (7 of 1031 columns), even/odd lanes of the bf16 kernel paired
    with the wrong x columns, or one weight row off by one bf16 ulp would each exceed it."""
    x, w = make(4, 16, 1031, torch.float32, torch.bfloat16, seed=9)
    ref = reference(x, w)
    assert rel_err(OPS["simd"](x, w), ref) <= 1e-5
    assert rel_err(reference(x[:, :1024], w[:, :1024]), ref) > 1e-5
    swapped = torch.arange(1031)
    swapped[:1030] = swapped[:1030].view(-1, 2).flip(1).flatten()
    assert rel_err(reference(x[:, swapped], w), ref) > 1e-5
    w2 = w.clone()
    w2[3] = (w2[3].float() * (1 + 2 ** -7)).bfloat16()
    assert rel_err(OPS["simd"](x, w2), ref) > 1e-5


# ---------------------------------------------------------------------------------------------- dispatch


@pytest.fixture
def counting(monkeypatch):
    calls = []
    real = _ext.lowp_linear
    monkeypatch.setattr(_ext, "lowp_linear", lambda x, w: calls.append(x.shape[0]) or real(x, w))
    monkeypatch.setattr(cpu_linear, "MODE", "on")  # the native-bf16 check is tested on its own below
    return calls


def test_linear_picks_the_op_where_it_should(counting):
    x, w = make(4, 9, 33, torch.bfloat16, torch.bfloat16, seed=1)
    out = cpu_linear.linear(x, w)
    assert counting == [4] and rel_err(out, reference(x, w)) <= 2e-2
    cpu_linear.linear(x.float(), w.half())
    assert counting == [4, 4]


def test_a_prefill_runs_in_blocks_of_max_rows(counting):
    x, w = make(2 * cpu_linear.MAX_ROWS + 3, 9, 33, torch.bfloat16, torch.bfloat16, seed=5)
    out = cpu_linear.linear(x, w)
    assert counting == [cpu_linear.MAX_ROWS, cpu_linear.MAX_ROWS, 3]
    assert out.shape == (x.shape[0], 9) and rel_err(out, reference(x, w)) <= 2e-2


def test_linear_falls_back_to_torch(counting, monkeypatch):
    x, w = make(4, 9, 33, torch.bfloat16, torch.bfloat16, seed=2)
    cases = [
        (x.float(), w.float()),                                    # float32 weights
        (x.double(), w.double()),                                  # float64
        (x.clone().requires_grad_(), w),                           # gradient wanted
        (x, w.clone().requires_grad_()),
    ]
    for xi, wi in cases:
        out = cpu_linear.linear(xi, wi)
        assert torch.equal(out, xi @ wi.T)
    assert counting == []
    with torch.no_grad():  # no gradient recorded: the op may run
        cpu_linear.linear(x.clone().requires_grad_(), w)
    assert counting == [4]
    monkeypatch.setattr(cpu_linear, "MODE", "off")
    cpu_linear.linear(x, w)
    monkeypatch.setattr(cpu_linear, "MODE", "auto")
    monkeypatch.setattr(_ext, "has_lowp_linear", False)
    cpu_linear.linear(x, w)
    assert counting == [4]


def test_native_bf16_cpus_keep_torch(counting, monkeypatch):
    x, w = make(2, 9, 33, torch.bfloat16, torch.bfloat16, seed=3)
    monkeypatch.setattr(cpu_linear, "MODE", "auto")
    cpu_linear.native_lowp_matmul.cache_clear()
    cpu_linear.op_has_simd.cache_clear()
    try:
        monkeypatch.setattr(cpu_linear, "_cpu_flags", lambda: {"avx2", "fma", "f16c", "amx_bf16"})
        monkeypatch.setattr(cpu_linear.platform, "machine", lambda: "x86_64")
        assert not cpu_linear.use_op(x, w) and cpu_linear.use_op(x, w.half())  # AMX-BF16 has no fp16
        cpu_linear.native_lowp_matmul.cache_clear()
        monkeypatch.setattr(cpu_linear, "_cpu_flags", lambda: {"avx2", "fma", "f16c"})
        assert cpu_linear.use_op(x, w)
        cpu_linear.native_lowp_matmul.cache_clear()
        cpu_linear.op_has_simd.cache_clear()
        monkeypatch.setattr(cpu_linear, "_cpu_flags", lambda: {"avx", "sse4_2"})  # the op would run scalar
        assert not cpu_linear.use_op(x, w)
    finally:
        cpu_linear.native_lowp_matmul.cache_clear()
        cpu_linear.op_has_simd.cache_clear()


def test_this_machine_follows_the_rule():
    flags = cpu_linear._cpu_flags()
    x, w = make(2, 9, 33, torch.bfloat16, torch.bfloat16, seed=4)
    expect = ({"avx2", "fma", "f16c"} <= flags and not ({"avx512_bf16", "amx_bf16"} & flags)
              and cpu_linear.MODE == "auto")
    if cpu_linear.MODE == "auto":
        assert cpu_linear.use_op(x, w) == expect


# ---------------------------------------------------------------------------------------------- MoE backend


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("gated,K", [(True, 2), (False, 1)])
@pytest.mark.parametrize("T", [1, 5, 40])
def test_torch_moe_lowp_uses_the_op_and_matches_reference(T, gated, K, dtype, counting):
    from multimoe_rt.torch_moe import moe_reference, moe_torch

    g = torch.Generator().manual_seed(T * 7 + K)
    H, I, S = 40, 24, 6
    x = torch.randn(T, H, generator=g).to(dtype)
    w1 = (torch.randn(S, 2 * I if gated else I, H, generator=g) / H ** 0.5).to(dtype)
    w2 = (torch.randn(S, H, I, generator=g) / I ** 0.5).to(dtype)
    s = torch.randint(0, S, (T, K), generator=g)
    tw = torch.rand(T, K, generator=g) + 0.1
    b1 = (torch.randn(S, w1.shape[1], generator=g) / 10).to(dtype)
    b2 = (torch.randn(S, H, generator=g) / 10).to(dtype)
    for biases in ((None, None), (b1, b2)):
        out = moe_torch(x, s, tw, w1, w2, gated, b1=biases[0], b2=biases[1])
        assert out.dtype == dtype
        assert rel_err(out, moe_reference(x, s, tw, w1, w2, gated, b1=biases[0], b2=biases[1])) <= 2e-2
    assert len(counting) == 2 * 2 * len(torch.unique(s))  # w1 and w2 per used slot, twice


def test_torch_moe_float32_unchanged(counting, monkeypatch):
    """fp32 experts never take the op: the same result as before, bit for bit."""
    from multimoe_rt.torch_moe import moe_torch

    g = torch.Generator().manual_seed(0)
    x, w1, w2 = torch.randn(9, 32, generator=g), torch.randn(5, 48, 32, generator=g), torch.randn(5, 32, 24, generator=g)
    s, tw = torch.randint(0, 5, (9, 2), generator=g), torch.rand(9, 2, generator=g)
    out = moe_torch(x, s, tw, w1, w2, True)
    assert counting == []
    monkeypatch.setattr(cpu_linear, "MODE", "off")
    assert torch.equal(out, moe_torch(x, s, tw, w1, w2, True))
