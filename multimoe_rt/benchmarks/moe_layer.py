"""What the kernel benches share (``kernels``, ``delta_codecs``, ``ceilings``): a random MoE layer and its inputs,
the timing loop, and the check against the float64 reference that runs before anything is timed."""

from __future__ import annotations

import statistics
import time

import torch

TOL = {torch.float32: 1e-5, torch.float16: 2e-2, torch.bfloat16: 2e-2}  # max-abs error / max-abs reference


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_group(fns: dict, device: torch.device, budget_s: float = 1.0, min_reps: int = 5,
               max_reps: int = 50) -> dict:
    """label -> {median_ms, min_ms, reps} for each fn() (each already called once, as a warmup).

    CUDA: triton.testing.do_bench medians, one fn after another. CPU: round-robin, one call of each fn
    per round, so load from other users of a shared machine hits every implementation alike; as many
    rounds as fit in budget_s * len(fns) (between min_reps and max_reps)."""
    if device.type == "cuda":
        import triton.testing

        out = {}
        for label, fn in fns.items():
            try:
                ms = triton.testing.do_bench(fn, warmup=10, rep=max(20, int(budget_s * 1000)), return_mode="median")
            except TypeError:  # a triton without return_mode: ask for the median quantile
                ms = triton.testing.do_bench(fn, warmup=10, rep=max(20, int(budget_s * 1000)), quantiles=[0.5])
                ms = ms[0] if isinstance(ms, (list, tuple)) else ms
            out[label] = {"median_ms": float(ms), "reps": "do_bench"}
        return out
    samples = {label: [] for label in fns}
    t_start = time.perf_counter()
    rounds = 0
    while rounds < max_reps and (rounds < min_reps or time.perf_counter() - t_start < budget_s * len(fns)):
        for label, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            samples[label].append(time.perf_counter() - t0)
        rounds += 1
    return {label: {"median_ms": statistics.median(v) * 1e3, "min_ms": min(v) * 1e3, "reps": len(v)}
            for label, v in samples.items()}


def make_layer(H: int, I: int, E: int, K: int, gated: bool, dtype, device, seed: int = 0) -> dict:
    device = torch.device(device)
    g = torch.Generator(device).manual_seed(seed)  # on the device: Mixtral-8x7B experts are 1.4e9 numbers
    n1 = 2 * I if gated else I
    # Scaled like a trained layer so activations stay O(1) in bf16.
    w1 = (torch.randn(E, n1, H, generator=g, device=device) / H**0.5).to(dtype)
    w2 = (torch.randn(E, H, I, generator=g, device=device) / I**0.5).to(dtype)
    return {"H": H, "I": I, "E": E, "K": K, "gated": gated, "dtype": dtype, "w1": w1, "w2": w2}


def make_inputs(layer: dict, M: int, device, seed: int = 1):
    g = torch.Generator().manual_seed(seed + M)
    E, K = layer["E"], layer["K"]
    hidden = torch.randn(M, layer["H"], generator=g).to(layer["dtype"]).to(device)
    logits = torch.randn(M, E, generator=g)
    probs, ids = torch.softmax(logits, -1).topk(K, dim=-1)
    if K > 1:
        probs = probs / probs.sum(-1, keepdim=True)  # Mixtral renormalises its top-k
    return hidden, ids.to(device), probs.to(layer["dtype"]).to(device)


def check(name: str, out: torch.Tensor, ref: torch.Tensor, rows: list[int], dtype) -> float:
    got = out[torch.tensor(rows, device=out.device)].double()
    if not torch.isfinite(got).all():
        raise SystemExit(f"kernel bench: {name} produced non-finite values; aborting")
    err = ((got - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()
    if err > TOL[dtype]:
        raise SystemExit(f"kernel bench: {name} is wrong: relative error {err:.3g} vs the float64 reference "
                         f"exceeds {TOL[dtype]:.0e} for {dtype}; aborting before timing")
    return err
