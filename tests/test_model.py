"""MultiVariantModel == each variant's own transformers model; switching is atomic and overlappable."""

import random
import threading
import time

import pytest
import torch

from multimoe_rt.model import MultiVariantModel
from multimoe_rt.reconfig import SwitchError
from tiny_models import reference, rel_err, save_variants

FP32_TOL = 1e-5  # relative error of fp32 logits against the variant's own model


@pytest.fixture(scope="module", params=["mixtral", "switch"])
def family_dirs(request, tmp_path_factory):
    return request.param, save_variants(tmp_path_factory.mktemp(request.param), request.param, n=3)


def run(model_or_ref, family, variant, ids, dec):
    if isinstance(model_or_ref, MultiVariantModel):
        return model_or_ref.forward(variant, ids, decoder_input_ids=dec if family == "switch" else None)
    with torch.no_grad():
        if family == "switch":
            return model_or_ref(input_ids=ids, decoder_input_ids=dec).logits
        return model_or_ref(input_ids=ids).logits


def test_sharing_zero_equals_own_models_in_any_switch_order(family_dirs):
    family, dirs = family_dirs
    mv = MultiVariantModel.from_pretrained(dirs, share=0.0)
    refs = {f"{family}-v{i}": reference(family, d) for i, d in enumerate(dirs)}
    g = torch.Generator().manual_seed(1)
    order = list(refs) * 2
    random.Random(0).shuffle(order)
    for name in order:
        ids, dec = torch.randint(2, 64, (2, 9), generator=g), torch.randint(2, 64, (2, 4), generator=g)
        assert rel_err(run(mv, family, name, ids, dec), run(refs[name], family, name, ids, dec)) <= FP32_TOL
        ours = mv.generate(name, ids[:1], max_new_tokens=6)
        theirs = refs[name].generate(ids[:1], max_new_tokens=6, do_sample=False, pad_token_id=0)
        theirs = theirs[:, 1:] if family == "switch" else theirs[:, ids.shape[1]:]
        assert ours.tolist() == theirs.tolist()
    assert mv.store.stats["switches"] >= len(set(order))


def test_full_sharing_keeps_each_variants_own_non_expert_path(family_dirs):
    family, dirs = family_dirs
    mv = MultiVariantModel.from_pretrained(dirs, share=1.0)
    first_moe = mv.variant_set.moe_layers[0]
    ids, dec = torch.randint(2, 64, (1, 7)), torch.randint(2, 64, (1, 3))
    for i, d in enumerate(reversed(dirs)):
        name = f"{family}-v{len(dirs) - 1 - i}"
        ref = reference(family, d)
        seen = {}
        hooks = [m.get_submodule(first_moe).register_forward_pre_hook(
            lambda mod, args, key=key: seen.__setitem__(key, args[0].clone()))
            for key, m in (("ours", mv.model), ("ref", ref))]
        run(mv, family, name, ids, dec)
        run(ref, family, name, ids, dec)
        for h in hooks:
            h.remove()
        torch.testing.assert_close(seen["ours"], seen["ref"], rtol=0, atol=0)


def test_prefetch_then_activate_never_reads_a_half_copied_set(tmp_path):
    """Ordering by events, not by the clock: the background copy is held after its first tensor, so the forward
    of the active variant provably runs mid-copy; activate must not return before every tensor has landed."""
    dirs = save_variants(tmp_path, "mixtral", n=2)
    mv = MultiVariantModel.from_pretrained(dirs)
    ref = reference("mixtral", dirs[1])
    ref0 = reference("mixtral", dirs[0])
    ids = torch.randint(2, 64, (1, 8))
    copied, started, release = [], threading.Event(), threading.Event()

    def hold_after_first(v, name):  # a slow "side stream" copy, held open by the test
        copied.append(name)
        if len(copied) == 1:
            started.set()
            assert release.wait(60), "the test never released the copy"

    mv.store.copy_hook = hold_after_first
    before = mv.store.stats["tensors_copied"]
    mv.prefetch("mixtral-v1")
    assert started.wait(60)
    assert mv.active_variant == "mixtral-v0"  # nothing flipped yet: the copy is in flight
    # a request of the active variant while the copy is held reads v0's weights, whole
    assert rel_err(mv.forward("mixtral-v0", ids), run(ref0, "mixtral", None, ids, None)) <= FP32_TOL
    assert len(copied) == 1
    release.set()
    mv.activate()
    n = len(copied)
    # activate returned only once every tensor had landed: the store counted each, and none came after
    assert n > 1 and n == mv.store.stats["tensors_copied"] - before
    assert mv.active_variant == "mixtral-v1"
    assert rel_err(mv.forward("mixtral-v1", ids), run(ref, "mixtral", None, ids, None)) <= FP32_TOL
    assert len(copied) == n


def test_failed_copy_keeps_the_old_variant_serving(tmp_path):
    dirs = save_variants(tmp_path, "mixtral", n=2)
    mv = MultiVariantModel.from_pretrained(dirs)
    ids = torch.randint(2, 64, (1, 8))
    want0 = run(reference("mixtral", dirs[0]), "mixtral", None, ids, None)
    calls = []

    def fault(v, name):
        calls.append(name)
        if len(calls) == 3:
            raise OSError("injected copy failure")

    mv.store.copy_hook = fault
    with pytest.raises(SwitchError, match="mixtral-v0.* stays active"):
        mv.use("mixtral-v1")
    assert mv.active_variant == "mixtral-v0"
    assert rel_err(mv.forward("mixtral-v0", ids), want0) <= FP32_TOL
    mv.store.copy_hook = None  # the half-written staging set must not be trusted afterwards
    want1 = run(reference("mixtral", dirs[1]), "mixtral", None, ids, None)
    assert rel_err(mv.forward("mixtral-v1", ids), want1) <= FP32_TOL


def test_concurrent_requests_for_different_variants_are_serialised(tmp_path):
    dirs = save_variants(tmp_path, "mixtral", n=3)
    mv = MultiVariantModel.from_pretrained(dirs)
    ids = torch.randint(2, 64, (1, 8))
    want = {f"mixtral-v{i}": run(reference("mixtral", d), "mixtral", None, ids, None) for i, d in enumerate(dirs)}
    errors = []

    def client(seed):
        rng = random.Random(seed)
        for _ in range(6):
            name = rng.choice(list(want))
            if rel_err(mv.forward(name, ids), want[name]) > FP32_TOL:
                errors.append(name)

    threads = [threading.Thread(target=client, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def test_resident_variants_switch_without_copies_and_frozen_tensors_are_skipped(tmp_path):
    dirs = save_variants(tmp_path, "mixtral", n=3)
    mv = MultiVariantModel.from_pretrained(dirs, resident=3)
    before = mv.store.stats["bytes_copied"]
    for name in ["mixtral-v2", "mixtral-v1", "mixtral-v0"]:
        mv.use(name)
    assert mv.store.stats["bytes_copied"] == before and mv.active_variant == "mixtral-v0"

    mv = MultiVariantModel.from_pretrained(dirs)  # v2 fine-tuned experts only: its attention equals v0's
    skipped = mv.store.stats["tensors_skipped"]
    mv.use("mixtral-v2")
    assert mv.store.stats["tensors_skipped"] - skipped == len(mv.store.params)
    assert mv.memory_footprint()["non_expert_device_bytes"] == 2 * mv.store.set_nbytes


def test_unknown_variant_and_bad_generation_settings(tmp_path):
    mv = MultiVariantModel.from_pretrained(save_variants(tmp_path, "mixtral", n=2))
    with pytest.raises(KeyError, match="unknown variant 'nope'"):
        mv.forward("nope", torch.zeros(1, 3, dtype=torch.long))
    for bad in (0, True, 2.0, "2", None, torch.tensor(2.0)):
        with pytest.raises(ValueError, match="max_new_tokens"):
            mv.generate("mixtral-v0", torch.zeros(1, 3, dtype=torch.long), max_new_tokens=bad)
    with pytest.raises(KeyError, match="a variant is a name or an index"):
        mv.forward(["mixtral-v0"], torch.zeros(1, 3, dtype=torch.long))


def test_triton_backend_inside_the_model(tmp_path, monkeypatch):
    """The model path through the Triton kernels (the interpreter here, real CUDA on a GPU)."""
    dirs = save_variants(tmp_path, "mixtral", n=2)
    mv = MultiVariantModel.from_pretrained(dirs, share=0.5, backend="triton")
    torch_mv = MultiVariantModel.from_pretrained(dirs, share=0.5, backend="torch")
    ids = torch.randint(2, 64, (1, 6))
    for name in ["mixtral-v1", "mixtral-v0"]:
        assert rel_err(mv.forward(name, ids), torch_mv.forward(name, ids)) <= FP32_TOL
    import multimoe_rt.kernels.grouped_gemm as gg

    allocations, allocate = [], gg.allocate_workspace
    monkeypatch.setattr(gg, "allocate_workspace", lambda *a, **k: allocations.append(a) or allocate(*a, **k))
    assert mv.generate("mixtral-v1", ids, max_new_tokens=4).tolist() == \
        torch_mv.generate("mixtral-v1", ids, max_new_tokens=4).tolist()
    assert allocations == []  # prefill and decode steps reused the work buffers sized by the first forward


def test_offloaded_experts_serve_the_same_logits(tmp_path):
    """A budget below the experts' bytes with offload=True: host experts are paged in, outputs unchanged."""
    dirs = save_variants(tmp_path, "mixtral", n=2)
    full = MultiVariantModel.from_pretrained(dirs, share=0.0)
    budget = full.slab.nbytes - 3 * full.slab.slot_nbytes
    mv = MultiVariantModel.from_pretrained(dirs, share=0.0, budget=budget, offload=True)
    tier = mv.slab.host_tier
    assert tier is not None and mv.slab.nbytes == budget
    ids = torch.randint(2, 64, (2, 9))
    for name in ["mixtral-v1", "mixtral-v0", "mixtral-v1"]:
        assert rel_err(mv.forward(name, ids), full.forward(name, ids)) <= FP32_TOL
    assert tier.stats["fetches"] > 0


# ---- issue 16: every public method is safe from any thread ---------------------------------------

@pytest.mark.parametrize("meddle", ["prefetch", "prefetch+activate", "use"])
def test_foreign_thread_switching_never_corrupts_a_running_request(tmp_path, meddle):
    """A thread that prefetches / switches / activates while another runs forward and generate: every
    request still sees its own variant's weights, whole (old code: a mix of two variants' weights)."""
    dirs = save_variants(tmp_path, "mixtral", n=3)
    mv = MultiVariantModel.from_pretrained(dirs)
    names = list(mv.names)
    ids = torch.randint(2, 64, (1, 8), generator=torch.Generator().manual_seed(3))
    refs = {n: reference("mixtral", d) for n, d in zip(names, dirs)}
    want = {n: run(refs[n], "mixtral", n, ids, None) for n in names}
    want_gen = {n: refs[n].generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)[:, ids.shape[1]:]
                for n in names}
    mv.store.copy_hook = lambda v, name: time.sleep(0.0002)  # a slow copy widens any race window
    stop, errors = threading.Event(), []

    def meddler():
        rng = random.Random(7)
        while not stop.is_set():
            try:
                name = rng.choice(names)
                if meddle == "prefetch":
                    mv.prefetch(name)
                elif meddle == "use":
                    mv.use(name)
                else:
                    mv.prefetch(name)
                    time.sleep(rng.random() * 0.002)
                    mv.activate()
            except BaseException as e:  # noqa: BLE001 -- reported below
                errors.append(e)
            if meddle != "prefetch":
                time.sleep(rng.random() * 0.001)

    t = threading.Thread(target=meddler)
    t.start()
    wrong = []
    try:
        for i in range(30):
            name = names[(i * 7) % 3]
            if rel_err(mv.forward(name, ids), want[name]) > FP32_TOL:
                wrong.append(("forward", i, name))
            if i % 4 == 0 and mv.generate(name, ids, max_new_tokens=4).tolist() != want_gen[name].tolist():
                wrong.append(("generate", i, name))
    finally:
        stop.set()
        t.join()
    assert errors == [] and wrong == []


def test_prefetch_then_generate_current_keeps_the_prefetched_set_and_counts_every_byte(tmp_path):
    """prefetch(next) then generate(current): the prefetch is kept for later, not thrown away, and every
    copied byte is counted when it is copied."""
    dirs = save_variants(tmp_path, "mixtral", n=2)
    mv = MultiVariantModel.from_pretrained(dirs)
    ids = torch.randint(2, 64, (1, 5))
    set_bytes = mv.store.set_nbytes
    before = mv.store.stats["bytes_copied"]
    mv.prefetch("mixtral-v1")
    mv.generate("mixtral-v0", ids, max_new_tokens=2)
    assert mv.active_variant == "mixtral-v0"
    mv.generate("mixtral-v1", ids, max_new_tokens=2)
    assert mv.active_variant == "mixtral-v1"
    copied = mv.store.stats["bytes_copied"] - before
    assert 0 < copied <= set_bytes  # v1's set copied once, never twice
    # a prefetch that is then replaced by another variant's copy is counted as copied and as discarded
    mv3 = MultiVariantModel.from_pretrained(save_variants(tmp_path / "three", "mixtral", n=3))
    b0 = mv3.store.stats["bytes_copied"]
    mv3.prefetch("mixtral-v1")
    mv3.use("mixtral-v2")
    s = mv3.store.stats
    assert s["bytes_discarded"] > 0 and s["bytes_copied"] - b0 >= s["bytes_discarded"]


def test_nan_weights_are_refused_at_load_not_served_as_token_zero(tmp_path):
    """Old code: a NaN in a checkpoint loaded silently and generate returned token 0 forever."""
    from safetensors.torch import load_file, save_file

    from multimoe_rt.checkpoint import CheckpointError

    dirs = save_variants(tmp_path, "mixtral", n=2)
    f = dirs[1] / "model.safetensors"
    clean = load_file(f)
    for key in ("model.layers.0.self_attn.q_proj.weight", "model.norm.weight"):
        sd = {k: v.clone() for k, v in clean.items()}
        sd[key].view(-1)[:2] = float("nan")
        save_file(sd, f, metadata={"format": "pt"})
        with pytest.raises(CheckpointError, match=rf"mixtral-v1/model.safetensors: tensor '{key}': 2 non-finite"):
            MultiVariantModel.from_pretrained(dirs)
    mv = MultiVariantModel.from_pretrained(dirs, check_finite=False)  # the opt-out loads it, as asked
    assert torch.isnan(mv.forward("mixtral-v1", torch.randint(2, 64, (1, 4)))).any()


def test_token_id_zero_in_a_prompt_is_a_token(tmp_path):
    """Old code: generate passed pad id 0 with no attention mask, so transformers masked every prompt token 0."""
    dirs = save_variants(tmp_path, "mixtral", n=2)
    mv = MultiVariantModel.from_pretrained(dirs)
    ids = torch.tensor([[5, 0, 7, 0, 0, 9]])
    ref = reference("mixtral", dirs[1])
    with torch.no_grad():
        logits = ref(input_ids=ids).logits[0, -1]
    got = mv.generate("mixtral-v1", ids, max_new_tokens=1)
    assert got.reshape(-1).tolist() == [int(logits.argmax())]
    want = ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                        pad_token_id=0, eos_token_id=None)[0, ids.shape[1]:]
    assert mv.generate("mixtral-v1", ids, max_new_tokens=6).reshape(-1).tolist() == want.tolist()
