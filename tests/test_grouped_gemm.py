"""fused_moe_triton against the float64 reference (Triton interpreter on CPU, real kernels on GPU).

Tolerances, relative error ||out - ref|| / ||ref||: fp32 <= 1e-5, bf16/fp16 <= 2e-2.
Work buffers are poisoned with NaN so a missed element shows up as a failure.
"""
import json

import pytest
import torch

from multimoe_rt.kernels.grouped_gemm import allocate_workspace, fused_moe_triton, select_config
from multimoe_rt.torch_moe import ACTIVATIONS, moe_reference

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-2}


def make_case(T, K, S, H, I, gated, dtype, seed, slots=None, device="cpu", w1_scale=1.0):
    """Fresh random inputs; slots restricts which slab slots receive pairs."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(T, H, generator=g)
    w1 = w1_scale * torch.randn(S, 2 * I if gated else I, H, generator=g) / H ** 0.5
    w2 = torch.randn(S, H, I, generator=g) / I ** 0.5
    pool = torch.tensor(slots if slots is not None else list(range(S)))
    # Distinct slots per token as a router would pick (when the pool allows it).
    if len(pool) >= K:
        pick = torch.stack([torch.randperm(len(pool), generator=g)[:K] for _ in range(T)]) if T else \
            torch.empty(0, K, dtype=torch.long)
    else:
        pick = torch.randint(0, len(pool), (T, K), generator=g)
    slot_ids = pool[pick].reshape(T, K)
    weights = torch.softmax(torch.randn(T, K, generator=g), dim=-1)
    cast = lambda t: t.to(dtype=dtype, device=device)  # noqa: E731
    return cast(hidden), slot_ids.to(device), weights.to(device), cast(w1), cast(w2)


def rel_err(out, ref):
    return ((out.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def run_and_check(T, K, S, H, I, gated, dtype, seed=0, slots=None, device="cpu", config=None, activation=None,
                  alpha=1.702, limit=7.0, w1_scale=1.0):
    hidden, slot_ids, weights, w1, w2 = make_case(T, K, S, H, I, gated, dtype, seed, slots, device, w1_scale)
    ws = allocate_workspace(T, K, H, I, S, dtype, device, config)
    for buf in ws.values():
        buf.fill_(float("nan") if buf.is_floating_point() else -7)
    out = fused_moe_triton(hidden, slot_ids, weights, w1, w2, gated, config=config, workspace=ws,
                           activation=activation, alpha=alpha, limit=limit)
    assert out.dtype == dtype and out.shape == (T, H)
    assert out.data_ptr() == ws["out"].data_ptr(), "output must live in the workspace"
    assert bool(torch.isfinite(out).all()), "an output element was not written (NaN poison survived)"
    ref = moe_reference(hidden, slot_ids, weights, w1, w2, gated, activation, alpha, limit)
    err = rel_err(out, ref)
    assert err <= TOL[dtype], f"rel err {err:.2e} > {TOL[dtype]:.0e} (T={T} K={K} H={H} I={I} {dtype} {activation})"
    return out


@pytest.mark.parametrize("T", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("gated,K", [(True, 2), (False, 1)])
def test_decode_sizes(T, gated, K):
    run_and_check(T, K, S=6, H=48, I=32, gated=gated, dtype=torch.float32, seed=T)


@pytest.mark.parametrize("gated,K", [(True, 2), (False, 1)])
def test_prefill_512_tokens(gated, K):
    cfg = select_config(512 * K)
    assert cfg["class"] == "prefill"
    run_and_check(512, K, S=4, H=40, I=24, gated=gated, dtype=torch.float32, seed=1)


@pytest.mark.parametrize("H,I", [(33, 19), (17, 70), (100, 5)])
@pytest.mark.parametrize("gated,K", [(True, 2), (False, 1), (True, 3)])
def test_odd_sizes(H, I, gated, K):
    run_and_check(11, K, S=5, H=H, I=I, gated=gated, dtype=torch.float32, seed=H + I)


# On CPU (Triton interpreter) the kernels upcast bf16/fp16 operands to float32 before tl.dot (the interpreter's
# bf16 dot is wrong), so a bf16/fp16 tl.dot never runs here: this checks loads, casts and stores in those
# dtypes only. The real bf16/fp16 dots are checked by the GPU tests below (test_gpu_against_reference,
# test_gpu_odd_and_large), which bench/gpu_check.sh runs on the GPU machine.
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("gated,K", [(True, 2), (False, 1)])
def test_dtypes(dtype, gated, K):
    run_and_check(37, K, S=5, H=48, I=40, gated=gated, dtype=dtype, seed=7)


GATED_ACTS = [(True, a) for a in ACTIVATIONS] + [(False, a) for a in ACTIVATIONS if a != "swiglu_oai"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("gated,activation", GATED_ACTS)
def test_activations_in_the_fused_epilogue(gated, activation, dtype):
    # w1 scaled so pre-activations span GELU's curved region and pass the clamp limit (2.0) both ways
    run_and_check(21, 2 if gated else 1, S=5, H=40, I=24, gated=gated, dtype=dtype, seed=len(activation),
                  activation=activation, alpha=1.702, limit=2.0, w1_scale=3.0)


def test_gelu_is_not_silu_in_the_kernel():
    hidden, slot_ids, weights, w1, w2 = make_case(12, 2, 4, 32, 16, True, torch.float32, 13, w1_scale=3.0)
    gelu = fused_moe_triton(hidden, slot_ids, weights, w1, w2, True, activation="gelu")
    silu = fused_moe_triton(hidden, slot_ids, weights, w1, w2, True)
    assert rel_err(silu, moe_reference(hidden, slot_ids, weights, w1, w2, True, "silu")) <= 1e-5
    assert rel_err(gelu, moe_reference(hidden, slot_ids, weights, w1, w2, True, "gelu")) <= 1e-5
    assert rel_err(gelu, moe_reference(hidden, slot_ids, weights, w1, w2, True, "silu")) > 1e-2


def test_slots_without_tokens():
    run_and_check(20, 2, S=9, H=32, I=24, gated=True, dtype=torch.float32, seed=3, slots=[1, 6])


@pytest.mark.parametrize("gated,K", [(True, 2), (False, 1)])
def test_all_tokens_on_one_slot(gated, K):
    run_and_check(70, K, S=4, H=32, I=24, gated=gated, dtype=torch.float32, seed=4, slots=[2])


def test_zero_weight_contributes_exactly_zero():
    hidden, slot_ids, weights, w1, w2 = make_case(9, 1, 3, 32, 16, False, torch.float32, 5)
    weights[::2] = 0.0  # Switch capacity-dropped tokens
    out = fused_moe_triton(hidden, slot_ids, weights, w1, w2, False)
    assert bool((out[::2] == 0).all())
    assert rel_err(out, moe_reference(hidden, slot_ids, weights, w1, w2, False)) <= 1e-5


def test_deterministic_and_no_workspace():
    hidden, slot_ids, weights, w1, w2 = make_case(30, 2, 4, 32, 16, True, torch.float32, 6)
    a = fused_moe_triton(hidden, slot_ids, weights, w1, w2, True)
    b = fused_moe_triton(hidden, slot_ids, weights, w1, w2, True)
    assert torch.equal(a, b)


def test_int32_slot_ids_and_empty_batch():
    hidden, slot_ids, weights, w1, w2 = make_case(6, 2, 4, 32, 16, True, torch.float32, 8)
    out = fused_moe_triton(hidden, slot_ids.int(), weights, w1, w2, True)
    assert rel_err(out, moe_reference(hidden, slot_ids, weights, w1, w2, True)) <= 1e-5
    empty = fused_moe_triton(hidden[:0], slot_ids[:0], weights[:0], w1, w2, True)
    assert empty.shape == (0, 32)


def test_config_override_by_dict_and_env(tmp_path, monkeypatch, reload_settings):
    cfg = {"BLOCK_M": 32, "BLOCK_N": 16, "BLOCK_K": 16}
    assert select_config(4, cfg)["BLOCK_M"] == 32
    run_and_check(13, 2, S=3, H=40, I=24, gated=True, dtype=torch.float32, seed=9, config=cfg)
    path = tmp_path / "tiles.json"
    path.write_text(json.dumps({"decode_max_pairs": 1, "prefill": {"BLOCK_N": 32}}))
    monkeypatch.setenv("MULTIMOE_TRITON_CONFIG", str(path))
    reload_settings()
    chosen = select_config(4)
    assert chosen["class"] == "prefill" and chosen["BLOCK_N"] == 32
    with pytest.raises(ValueError, match="power of two"):
        select_config(4, {"BLOCK_K": 24})


def test_shape_and_dtype_errors():
    hidden, slot_ids, weights, w1, w2 = make_case(4, 2, 3, 32, 16, True, torch.float32, 10)
    with pytest.raises(ValueError, match="gated"):
        fused_moe_triton(hidden, slot_ids, weights, w1, w2, False)
    with pytest.raises(ValueError, match="dtype"):
        fused_moe_triton(hidden.half(), slot_ids, weights, w1, w2, True)
    with pytest.raises(ValueError, match="must be one of"):  # float64 is for the torch/reference backends
        fused_moe_triton(hidden.double(), slot_ids, weights.double(), w1.double(), w2.double(), True)
    with pytest.raises(ValueError, match="'quick_gelu'"):
        fused_moe_triton(hidden, slot_ids, weights, w1, w2, True, activation="quick_gelu")


def check_stored_layout(T, K, S, H, I, dtype, activation, device="cpu", seed=0):
    """GPT-OSS's layout read as stored: gate_up [S, H, 2I] (gate/up interleaved), down [S, I, H], biases; the kernel
    gets transposed views and interleaved=True, the float64 reference the de-interleaved copies."""
    hidden, slot_ids, weights, _, _ = make_case(T, K, S, H, I, True, dtype, seed, device=device)
    g = torch.Generator().manual_seed(seed + 1)
    gate_up = (torch.randn(S, H, 2 * I, generator=g) / H ** 0.5).to(dtype=dtype, device=device)
    down = (torch.randn(S, I, H, generator=g) / I ** 0.5).to(dtype=dtype, device=device)
    b1 = (0.5 * torch.randn(S, 2 * I, generator=g)).to(dtype=dtype, device=device)
    b2 = (0.5 * torch.randn(S, H, generator=g)).to(dtype=dtype, device=device)
    ws = allocate_workspace(T, K, H, I, S, dtype, device)
    for buf in ws.values():
        buf.fill_(float("nan") if buf.is_floating_point() else -7)
    out = fused_moe_triton(hidden, slot_ids, weights, gate_up.transpose(1, 2), down.transpose(1, 2), True,
                           workspace=ws, activation=activation, limit=1.5, b1=b1, b2=b2, interleaved=True)
    assert bool(torch.isfinite(out).all()), "an output element was not written (NaN poison survived)"
    w1 = torch.cat([gate_up[:, :, 0::2], gate_up[:, :, 1::2]], dim=2).transpose(1, 2)
    b1c = torch.cat([b1[:, 0::2], b1[:, 1::2]], dim=1)
    ref = moe_reference(hidden, slot_ids, weights, w1, down.transpose(1, 2), True, activation, 1.702, 1.5, b1=b1c,
                        b2=b2)
    err = rel_err(out, ref)
    assert err <= TOL[dtype], f"rel err {err:.2e} > {TOL[dtype]:.0e} (T={T} H={H} I={I} {dtype} {activation})"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("activation", ["swiglu_oai", "gelu"])
@pytest.mark.parametrize("T,K,S,H,I", [(5, 2, 4, 24, 20), (19, 4, 6, 40, 17)])
def test_interleaved_transposed_weights_as_stored(T, K, S, H, I, dtype, activation):
    check_stored_layout(T, K, S, H, I, dtype, activation, seed=T)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("T", [1, 4, 64, 1000, 4096])
@pytest.mark.parametrize("gated,K", [(True, 2), (False, 1)])
def test_gpu_against_reference(T, dtype, gated, K):
    run_and_check(T, K, S=24, H=256, I=352, gated=gated, dtype=dtype, seed=T, device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("T", [3, 700])
@pytest.mark.parametrize("gated,activation", GATED_ACTS)
def test_gpu_activations(T, dtype, gated, activation):
    run_and_check(T, 2 if gated else 1, S=16, H=256, I=352, gated=gated, dtype=dtype, seed=T, device="cuda",
                  activation=activation, alpha=1.702, limit=2.0, w1_scale=3.0)


@pytest.mark.gpu
@pytest.mark.parametrize("T,H,I", [(300, 250, 170), (24, 4096, 1792)])  # the reference gathers [T, 2I, H] in fp64
def test_gpu_odd_and_large(T, H, I):
    run_and_check(T, 2, S=8, H=H, I=I, gated=True, dtype=torch.bfloat16, seed=H, device="cuda")
    run_and_check(T, 2, S=8, H=H, I=I, gated=True, dtype=torch.float32, seed=I, device="cuda", slots=[0, 7])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T", [1, 64, 1000])
def test_gpu_interleaved_transposed_weights_as_stored(T, dtype):
    check_stored_layout(T, 4, S=16, H=192, I=160, dtype=dtype, activation="swiglu_oai", device="cuda", seed=T)
