"""align: Triton kernel, C++ CPU op (and CUDA op where built) equal the PyTorch align_torch exactly,
plus property tests of the contract on the Triton kernel (run under TRITON_INTERPRET=1 on CPU)."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from multimoe_rt import _ext
from multimoe_rt.kernels.align import align_triton, padded_size
from multimoe_rt.torch_moe import align_torch

CASES = [  # (T, K, num_slots, block_m)
    (1, 1, 1, 16), (1, 2, 8, 16), (5, 2, 3, 4), (37, 1, 100, 8), (300, 2, 7, 16),
    (129, 2, 5, 64), (64, 2, 2, 1), (0, 2, 4, 16),
]


def _slots(T, K, S, seed, dtype=torch.int64, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, S, (T, K), generator=g).to(dtype=dtype, device=device)


def _assert_same(got, want):
    for name, a, b in zip(("sorted_ids", "block_slot", "num_padded"), got, want):
        assert a.dtype == torch.int32, f"{name} dtype {a.dtype}"
        assert torch.equal(a.cpu(), b.cpu().to(torch.int32)), f"{name} differs:\n{a}\nvs\n{b}"


@pytest.mark.parametrize("T,K,S,bm", CASES)
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_triton_matches_torch(T, K, S, bm, dtype):
    s = _slots(T, K, S, seed=T * 31 + S, dtype=dtype)
    _assert_same(align_triton(s, S, bm, chunk=32), align_torch(s, S, bm))


@pytest.mark.skipif(not _ext.available, reason=f"C++ extension: {_ext.reason}")
@pytest.mark.parametrize("T,K,S,bm", CASES + [(4000, 2, 64, 64)])
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_cpp_matches_torch(T, K, S, bm, dtype):
    s = _slots(T, K, S, seed=T * 7 + S, dtype=dtype)
    _assert_same(_ext.align_cpu(s, S, bm), align_torch(s, S, bm))


@pytest.mark.skipif(not _ext.available, reason=f"C++ extension: {_ext.reason}")
def test_cpp_rejects_out_of_range_slot():
    with pytest.raises(RuntimeError, match="outside"):
        _ext.align_cpu(torch.tensor([[0, 5]]), 5, 4)


def test_triton_rejects_out_of_range_slot_on_cpu():
    with pytest.raises(ValueError, match=r"\[0, 5\)"):
        align_triton(torch.tensor([[0, 5]]), 5, 4)


def test_triton_workspace_outputs_are_views_and_fully_written():
    T, K, S, bm = 23, 2, 6, 8
    s = _slots(T, K, S, seed=3)
    p_max = padded_size(T * K, S, bm)
    ws = {"sorted_ids": torch.full((p_max + 10,), -7, dtype=torch.int32),
          "block_slot": torch.full((p_max // bm + 3,), -7, dtype=torch.int32),
          "num_padded": torch.full((1,), -7, dtype=torch.int32),
          "align_counts": torch.full((S,), -7, dtype=torch.int32)}
    got = align_triton(s, S, bm, workspace=ws)
    assert got[0].data_ptr() == ws["sorted_ids"].data_ptr()
    _assert_same(got, align_torch(s, S, bm))


def _check_contract(s, S, bm, out):
    sorted_ids, block_slot, num_padded = (t.cpu().long() for t in out)
    T, K = s.shape
    P = T * K
    flat = s.reshape(-1).long()
    n = int(num_padded[0])
    assert sorted_ids.numel() == padded_size(P, S, bm) and sorted_ids.numel() % bm == 0
    assert n % bm == 0 and n <= sorted_ids.numel()
    real = sorted_ids[sorted_ids < P]
    # Every pair exactly once; everything else is the sentinel.
    assert torch.equal(torch.sort(real).values, torch.arange(P))
    assert bool((sorted_ids[(sorted_ids >= P)] == P).all())
    assert bool((sorted_ids[n:] == P).all())
    assert block_slot.numel() == sorted_ids.numel() // bm
    assert bool((block_slot[n // bm:] == -1).all())
    for b in range(n // bm):
        ids = sorted_ids[b * bm:(b + 1) * bm]
        ids = ids[ids < P]
        assert ids.numel() > 0, f"block {b} holds only padding"
        assert bool((flat[ids] == block_slot[b]).all()), f"block {b} mixes slots"
        assert bool((ids[1:] > ids[:-1]).all()), f"block {b} not stable"
    # Runs are in slot order.
    used = block_slot[: n // bm]
    assert bool((used[1:] >= used[:-1]).all())


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(T=st.integers(0, 70), K=st.integers(1, 3), S=st.integers(1, 12),
       bm=st.sampled_from([1, 2, 4, 16]), skew=st.booleans(), seed=st.integers(0, 2**16))
def test_triton_align_properties(T, K, S, bm, skew, seed):
    s = _slots(T, K, S, seed)
    if skew:  # most pairs on one slot
        s = torch.where(s % 3 == 0, s, torch.zeros_like(s))
    out = align_triton(s, S, bm, chunk=16)
    _check_contract(s, S, bm, out)
    _assert_same(out, align_torch(s, S, bm))


@pytest.mark.gpu
@pytest.mark.parametrize("T,K,S,bm", CASES + [(4000, 2, 64, 64), (3000, 2, 1000, 16), (2, 2, 5000, 16)])
def test_gpu_triton_and_cuda_match_torch(T, K, S, bm):
    s = _slots(T, K, S, seed=11, device="cuda")
    want = align_torch(s, S, bm)
    _assert_same(align_triton(s, S, bm), want)
    if _ext.has_cuda_ops:
        _assert_same(_ext.align_cuda(s, S, bm), want)
        _assert_same(_ext.align_cuda(s.int(), S, bm), want)


@pytest.mark.skipif(not _ext.available, reason=f"C++ extension: {_ext.reason}")
def test_default_align_on_cpu_is_the_cpp_op(monkeypatch):
    """ops.align's default on CPU is the C++ op (measured 5-40x faster than align_torch at the engine's sizes),
    with the same outputs as the PyTorch align."""
    from multimoe_rt import ops

    calls = []
    real = _ext.align_cpu
    monkeypatch.setattr(_ext, "align_cpu", lambda *a: calls.append(a) or real(*a))
    s = _slots(13, 4, 64, seed=3)
    _assert_same(ops.align(s, 64, 16), align_torch(s, 64, 16))
    assert len(calls) == 1
    assert ops.default_align_backend(torch.device("cpu")) == "cpp"
    assert ops.default_align_backend(torch.device("cuda")) == "triton"
