"""lowrank_encode: the best rank-r approximation, exactly (SVD) on small matrices and within 1% of the exact
approximation error on large ones (randomized SVD), repeatably."""

import pytest
import torch

from multimoe_rt.delta import lowrank_encode


def _delta(n, k, seed):
    g = torch.Generator().manual_seed(seed)
    low = torch.randn(n, 8, generator=g) @ torch.randn(8, k, generator=g) / 8**0.5
    return 0.9 * low / low.norm() + 0.4 * torch.randn(n, k, generator=g) / (n * k) ** 0.5


def _exact_error(d, r):
    s = torch.linalg.svdvals(d.double())
    return s[r:].square().sum().sqrt().item() / d.double().norm().item()


@pytest.mark.parametrize("n,k,rank", [(40, 24, 4), (96, 130, 16), (1024, 384, 16), (384, 1024, 8)])
def test_lowrank_error_is_the_best_rank_r_error(n, k, rank):
    d = _delta(n, k, seed=n + k)
    U, V = lowrank_encode(d, rank)
    assert U.shape == (n, rank) and V.shape == (rank, k)
    err = ((d.double() - U.double() @ V.double()).norm() / d.double().norm()).item()
    best = _exact_error(d, rank)
    assert best <= err <= best * 1.01 + 1e-7, (err, best)


def test_lowrank_is_repeatable_and_leaves_the_global_rng_alone():
    d = _delta(1024, 384, seed=3)
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    U1, V1 = lowrank_encode(d, 16)
    after = torch.rand(1)
    U2, V2 = lowrank_encode(d, 16)
    assert torch.equal(U1, U2) and torch.equal(V1, V2)
    assert torch.equal(before, after)
