"""ExpertSlab and SlotTable: sizing, writes, validation, on-device resolution, slot sharing."""

import pytest
import torch

from multimoe_rt import ops
from multimoe_rt.slab import ExpertSlab, SlotTable
from multimoe_rt.torch_moe import moe_reference


def rand_expert(H, I, gated, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2 * I if gated else I, H, generator=g) / H**0.5, torch.randn(H, I, generator=g) / I**0.5


@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_slab_shapes_and_bytes(gated, dtype):
    slab = ExpertSlab(5, hidden=12, intermediate=7, gated=gated, dtype=dtype)
    n1 = 14 if gated else 7
    assert slab.w1.shape == (5, n1, 12) and slab.w2.shape == (5, 12, 7)
    assert slab.nbytes == 5 * (n1 * 12 + 12 * 7) * torch.empty(0, dtype=dtype).element_size()
    w1, w2 = rand_expert(12, 7, gated, 0)
    slab.write(2, w1, w2)
    assert slab.written.tolist() == [False, False, True, False, False]
    torch.testing.assert_close(slab.w1[2], w1.to(dtype))


def test_slab_write_rejects_bad_input():
    slab = ExpertSlab(2, 8, 4, gated=True)
    w1, w2 = rand_expert(8, 4, True, 0)
    with pytest.raises(IndexError, match="slot 2 out of range"):
        slab.write(2, w1, w2)
    with pytest.raises(ValueError, match=r"w1 has shape \(4, 8\), expected \(8, 8\)"):
        slab.write(0, w1[:4], w2)
    with pytest.raises(TypeError, match="floating point"):
        slab.write(0, w1.long(), w2)
    with pytest.raises(ValueError, match="dtype"):
        ExpertSlab(2, 8, 4, gated=True, dtype=torch.float64)


def test_table_validation_names_the_entry():
    slab = ExpertSlab(3, 8, 4, gated=False)
    table = SlotTable(2, 1, 2)
    w1, w2 = rand_expert(8, 4, False, 0)
    slab.write(0, w1, w2)
    with pytest.raises(ValueError, match=r"\(variant=0, layer=0, expert=0\) is unset"):
        table.validate(slab)
    table.slots.fill_(0)
    table.slots[1, 0, 1] = 7
    with pytest.raises(ValueError, match=r"\(variant=1, layer=0, expert=1\) points at slot 7"):
        table.validate(slab)
    table.slots[1, 0, 1] = 2
    with pytest.raises(ValueError, match="never written"):
        table.validate(slab)
    slab.write(2, w1, w2)
    table.validate(slab)
    with pytest.raises(IndexError, match="variant 2 out of range"):
        table.set(2, 0, 0, 0)
    with pytest.raises(IndexError, match="variant 5 out of range"):
        table.resolve(0, torch.zeros(1, 1, dtype=torch.long), 5)


def test_resolve_single_and_mixed_variants():
    table = SlotTable(2, 2, 3)
    table.slots.copy_(torch.arange(12, dtype=torch.int32).view(2, 2, 3))
    ids = torch.tensor([[0, 2], [1, 0]])
    assert table.resolve(1, ids, 0).tolist() == [[3, 5], [4, 3]]
    assert table.resolve(1, ids, torch.tensor([0, 1])).tolist() == [[3, 5], [10, 9]]


@pytest.mark.parametrize("gated,K", [(True, 2), (False, 1)])
def test_slot_sharing_equals_own_copies(gated, K):
    """Two variants sharing some slots == each variant with its own copy of those weights;
    a batch mixing both variants' tokens == each variant's tokens run separately."""
    H, I, E, T = 16, 12, 4, 40
    experts = {(v, e): rand_expert(H, I, gated, 10 * v + e) for v in range(2) for e in range(E)}
    for e in (0, 2):  # variant 1 shares experts 0 and 2 with variant 0
        experts[(1, e)] = experts[(0, e)]

    shared = ExpertSlab(6, H, I, gated)
    table = SlotTable(2, 1, E)
    slot_of = {}
    for (v, e), (w1, w2) in experts.items():
        key = id(w1)
        if key not in slot_of:
            slot_of[key] = len(slot_of)
            shared.write(slot_of[key], w1, w2)
        table.set(v, 0, e, slot_of[key])
    table.validate(shared)
    assert len(slot_of) == 6

    g = torch.Generator().manual_seed(0)
    x = torch.randn(T, H, generator=g)
    topk = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    w = torch.rand(T, K, generator=g)
    variant_ids = torch.randint(0, 2, (T,), generator=g)
    mixed = ops.fused_moe(x, table.resolve(0, topk, variant_ids), w, shared.w1, shared.w2, gated)

    for v in range(2):
        own1 = torch.stack([experts[(v, e)][0] for e in range(E)])
        own2 = torch.stack([experts[(v, e)][1] for e in range(E)])
        alone = ops.fused_moe(x, topk, w, own1, own2, gated)
        via_table = ops.fused_moe(x, table.resolve(0, topk, v), w, shared.w1, shared.w2, gated)
        torch.testing.assert_close(via_table, alone, rtol=0, atol=0)
        rows = variant_ids == v
        torch.testing.assert_close(mixed[rows], alone[rows], rtol=1e-6, atol=1e-6)
        ref = moe_reference(x, topk, w, own1, own2, gated)
        assert ((via_table.double() - ref).norm() / ref.norm()) < 1e-5
