"""Steps 2-8 of the gpu_check, run once step 1 has installed the project: environment and ceilings, the GPU tests,
the kernel rows, the variant-switch copy, and the hooks the benchmark modules fill."""
from __future__ import annotations

import os
import statistics
import sys
import threading
import time

import torch

from gpu_check_core import RESULT, ROOT, Step, sh, skip, time_left

def kbench():
    """multimoe_rt.benchmarks.kernels, imported on first use: only after step 1 installed the package."""
    import multimoe_rt.benchmarks.kernels as kb

    return kb



# ---------------------------------------------------------------------------------------- 2. env + ceilings
def step_env(device, dry):
    with Step("2_env") as d:
        d["machine"] = kbench().machine_info()
        smi = sh(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm", "--format=csv,noheader"],
                 min(10, time_left(d)))
        d["nvidia_smi"] = smi["tail"].strip() if smi["rc"] == 0 else f"unavailable ({smi['rc']})"
        nvcc = sh(["nvcc", "--version"], min(10, time_left(d)))
        d["nvcc"] = nvcc["tail"].strip().splitlines()[-1] if nvcc["rc"] == 0 else f"unavailable ({nvcc['rc']})"
        m = d["machine"]
        print(f"  gpu: {m['gpu']} | nvidia-smi: {d['nvidia_smi']} | torch {m['torch']} (cuda {m['cuda']}) | "
              f"triton {m['triton']} | transformers {m['transformers']} | {d['nvcc']}")
        from multimoe_rt.benchmarks.ceilings import measure_ceilings

        d["ceilings"] = measure_ceilings(device, dry)
        print(f"  ceilings: copy {d['ceilings']['copy_GBps']:.1f} GB/s, matmul {d['ceilings']['matmul_TFLOPs']:.2f} "
              f"TFLOP/s ({d['ceilings']['matmul_dtype']})")


# ---------------------------------------------------------------------------------------- 3. tests
def pytest_summary(tail: str) -> str:
    lines = [l for l in tail.strip().splitlines() if l.strip()]
    return lines[-1] if lines else ""


def gpu_test_files() -> list[str]:
    """Test files that hold GPU-marked tests (collecting only those keeps the step short and independent of
    optional packages the other files import)."""
    return sorted(f"tests/{p.name}" for p in (ROOT / "tests").glob("test_*.py")
                  if "mark.gpu" in p.read_text(errors="replace"))


def step_tests(device, dry, skip_tests):
    with Step("3_tests") as d:
        if skip_tests:
            skip(d, "pytest", "--skip-tests")
            return
        base = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfE"]
        files = gpu_test_files()
        d["files"] = files
        runs = {"gpu_marked": base + ["-m", "gpu"] + files}
        if dry:
            # GPU-marked tests are all skipped on CPU; the kernel tests in the Triton interpreter exercise the
            # same kernels' Python (and the interpreter shim for triton < 3.8 with numpy >= 2.4).
            interp = [f for f in ("tests/test_align.py", "tests/test_grouped_gemm.py") if (ROOT / f).exists()]
            runs["interpreter"] = base + ["-m", "not gpu"] + interp
        env = dict(os.environ)
        if dry:
            env.setdefault("OMP_NUM_THREADS", "1")
        ok = True
        for name, cmd in runs.items():
            r = sh(cmd, time_left(d), env)
            r["summary"] = pytest_summary(r["tail"])
            d[name] = r
            ok &= r["rc"] == 0
            print(f"  {name}: rc={r['rc']} {r['summary']}")
        if not ok:
            d["error"] = "some tests failed or timed out: " + "; ".join(
                f"{n}: rc={d[n]['rc']} {d[n]['summary']}" for n in runs if d[n]["rc"] != 0)


# ---------------------------------------------------------------------------------------- 4. kernels
def step_kernels(device, dry):
    with Step("4_kernels") as d:
        kb = kbench()
        ceilings = RESULT["steps"].get("2_env", {}).get("ceilings")
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        rows = d.setdefault("rows", [])  # filled as rows finish: a timeout keeps them
        deadline = d["deadline"] - 8  # leave time to tabulate; later cases are recorded as skipped
        if dry:
            # The Triton interpreter runs the GPU backend's Python path at the tiny sizes (not a speed number).
            kb.run(device, dtype, kb.layer_specs(device, tiny=True), 0.02, ceilings, backends=["torch", "triton"],
                   rows=rows, deadline=deadline)
            d["note"] = "dry run: tiny layers on CPU, triton through its interpreter; times are not meaningful"
        else:
            kb.run(device, dtype, kb.layer_specs(device), 0.1, ceilings, rows=rows, deadline=deadline)
        print(kb.format_table(rows))
        failed = kb.our_failures(rows)
        if failed:
            d["error"] = f"{len(failed)} row(s) of ours failed: " + "; ".join(
                f"{r['layer']} M={r['M']} {r['impl']}: {r['error'][:160]}" for r in failed[:6])


# ---------------------------------------------------------------------------------------- 5. switch
def nonexpert_shapes(dry: bool, fraction: float) -> list[tuple[str, tuple[int, ...]]]:
    """Mixtral-8x7B's non-expert tensors (v5 names): 1.606e9 parameters at fraction 1."""
    V, H, KV, L, E = (512, 64, 16, 4, 8) if dry else (32000, 4096, 1024, 32, 8)
    L = max(1, round(L * fraction))
    shapes = [("model.embed_tokens.weight", (V, H)), ("lm_head.weight", (V, H)), ("model.norm.weight", (H,))]
    for l in range(L):
        p = f"model.layers.{l}."
        shapes += [(p + "self_attn.q_proj.weight", (H, H)), (p + "self_attn.k_proj.weight", (KV, H)),
                   (p + "self_attn.v_proj.weight", (KV, H)), (p + "self_attn.o_proj.weight", (H, H)),
                   (p + "input_layernorm.weight", (H,)), (p + "post_attention_layernorm.weight", (H,)),
                   (p + "mlp.gate.weight", (E, H))]
    return shapes


class Copier:
    """Host->device copy of a tensor set the way the runtime loads a variant's non-expert set: pinned host tensors
    and non_blocking copies on a side CUDA stream, bracketed by events; on CPU a worker thread."""

    def __init__(self, host, dev, device):
        self.host, self.dev, self.device = host, dev, device
        self.side = torch.cuda.Stream(device) if device.type == "cuda" else None

    def start(self):
        if self.side is not None:
            self.side.wait_stream(torch.cuda.current_stream(self.device))  # start no earlier than queued work
            with torch.cuda.stream(self.side):
                self.ev0 = torch.cuda.Event(enable_timing=True)
                self.ev1 = torch.cuda.Event(enable_timing=True)
                self.ev0.record()
                for h, dv in zip(self.host, self.dev):
                    dv.copy_(h, non_blocking=True)
                self.ev1.record()
            return
        self.t = {}

        def work():
            self.t["start"] = time.perf_counter()
            for h, dv in zip(self.host, self.dev):
                dv.copy_(h)
            self.t["end"] = time.perf_counter()

        self.thread = threading.Thread(target=work)
        self.thread.start()

    def finish(self) -> float:
        """Wait for the copy; its duration in ms."""
        if self.side is not None:
            self.ev1.synchronize()
            return self.ev0.elapsed_time(self.ev1)
        self.thread.join()
        return (self.t["end"] - self.t["start"]) * 1e3


def step_switch(device, dry, fraction):
    with Step("5_switch") as d:
        from multimoe_rt import ops

        kb = kbench()
        cuda = device.type == "cuda"
        dtype = torch.bfloat16 if cuda else torch.float32
        if not cuda:
            skip(d, "pinned memory + side CUDA stream", "no CUDA: the copy runs on a worker thread on CPU tensors")
        shapes = nonexpert_shapes(dry, fraction)
        numel = sum(torch.Size(s).numel() for _, s in shapes)
        d.update(num_tensors=len(shapes), params=numel, fraction=fraction, dtype=str(dtype))
        host = [torch.empty(s, dtype=dtype, pin_memory=cuda).fill_(0.01) for _, s in shapes]
        dev = [torch.empty(s, dtype=dtype, device=device) for _, s in shapes]
        nbytes = numel * host[0].element_size()
        d["bytes"] = nbytes
        print(f"  non-expert set: {len(shapes)} tensors, {numel / 1e9:.3f}e9 params, {nbytes / 2**30:.2f} GiB")

        # Expert-GEMM prefill workload: the expert part of a TTFT (L MoE layers, one layer's weights reused).
        H, I, E, K, L, M = (64, 96, 8, 2, 4, 64) if dry else (4096, 14336, 8, 2, 32, 512)
        layer = kb.make_layer(H, I, E, K, True, dtype, device)
        hidden, ids, weights = kb.make_inputs(layer, M, device)
        backend = "triton" if cuda else "torch"

        def workload():
            x = hidden
            for _ in range(L):
                x = ops.fused_moe(x, ids, weights, layer["w1"], layer["w2"], True, backend=backend, check_slots=False)
            return x

        def timed_work() -> float:
            if cuda:
                e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                e0.record()
                workload()
                e1.record()
                e1.synchronize()
                return e0.elapsed_time(e1)
            t0 = time.perf_counter()
            workload()
            return (time.perf_counter() - t0) * 1e3

        with torch.inference_mode():
            copier = Copier(host, dev, device)
            reps = 3 if dry else 5
            copier.start(); copier.finish(); timed_work()  # warmup (allocations, Triton compile)
            copy_alone, work_alone, copy_ov, work_ov = [], [], [], []
            for _ in range(reps):
                kb.sync(device)
                copier.start()
                copy_alone.append(copier.finish())
                work_alone.append(timed_work())
                kb.sync(device)
                copier.start()  # the prefetch: copy issued, then the running workload proceeds
                work_ov.append(timed_work())
                copy_ov.append(copier.finish())
            ok = all(torch.equal(h, dv.cpu()) for h, dv in zip(host[:3], dev[:3]))
        med = statistics.median
        ca, wa, co, wo = med(copy_alone), med(work_alone), med(copy_ov), med(work_ov)
        d.update(copy_alone_ms=ca, copy_GBps=nbytes / (ca / 1e3) / 1e9, workload_alone_ms=wa,
                 copy_overlapped_ms=co, workload_overlapped_ms=wo, copy_verified=ok,
                 workload=f"{L} MoE layers (H={H}, I={I}, {E} experts, top-{K}) at M={M} tokens, {backend} backend",
                 # A prefetched switch overlaps the copy with running compute: the cost is the slowdown of that
                 # compute, plus any part of the copy still outstanding when it ends.
                 prefetched_ttft_impact=(wo + max(0.0, co - wo)) / wa - 1,
                 workload_slowdown_overlapped=wo / wa - 1,
                 # A blocking switch copies first, then runs the request.
                 blocking_ttft_impact=ca / wa)
        print(f"  copy alone {ca:.2f} ms ({d['copy_GBps']:.1f} GB/s) | workload alone {wa:.2f} ms | overlapped: "
              f"workload {wo:.2f} ms, copy {co:.2f} ms | TTFT +{d['prefetched_ttft_impact'] * 100:.1f}% prefetched, "
              f"+{d['blocking_ttft_impact'] * 100:.1f}% blocking")
        if not ok:
            d["error"] = "the copied non-expert tensors differ from the host copies"
        del host, dev, layer
        if cuda:
            torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------- 6, 7. hooks
def run_hook(d: dict, device, dry: bool, bench_file: str, needs: list[str], what: str) -> None:
    """A step filled by ``multimoe_rt.benchmarks.<module>``'s ``gpu_check(device, dry, deadline, log) -> dict`` (deadline: a
    time.time() value, the step's limit less 2 s): its dict goes into the step's JSON ("error" in it, or in
    one of its "rows", fails the step). Skipped, with the reason, while the feature's
    modules do not import or the bench file has no gpu_check() yet."""
    import importlib

    for mod in needs:
        try:
            importlib.import_module(mod)
        except Exception as e:  # noqa: BLE001
            skip(d, what, f"not available yet: {mod} is not importable ({type(e).__name__}: {e})")
            return
    fn = getattr(importlib.import_module(f"multimoe_rt.benchmarks.{bench_file}"), "gpu_check", None)
    if fn is None:
        skip(d, what, f"not available yet: multimoe_rt.benchmarks.{bench_file} has no gpu_check(device, dry, deadline, log) "
                      f"({', '.join(needs)} import{'s' if len(needs) == 1 else ''})")
        return
    wall_deadline = time.time() + (d["deadline"] - time.monotonic()) - 2  # a time.time() value
    d.update(fn(device, dry, wall_deadline, print) or {})
    rows = d.get("rows") or []
    if any("error" in r for r in rows if isinstance(r, dict)):
        d.setdefault("error", "a row failed: " + "; ".join(str(r["error"])[:160] for r in rows if "error" in r)[:400])


def step_batched_forward(device, dry):
    """Decode step of the batched mixed-variant forward at 1, 16, 64 and 256 sequences spread over 4
    variants, against the same batch all of one variant (ms per step, tokens/s, device bytes)."""
    with Step("6_batched_forward") as d:
        run_hook(d, device, dry, "batched_forward", ["multimoe_rt.forward"],
                 "batched mixed-variant forward")


def step_delta_codecs(device, dry):
    """Experts stored as base + compressed delta (int4 / sign1 / lowrank) against the dense slab: fused_moe
    time at decode and prefill sizes, bytes per expert, error against the dense expert."""
    with Step("7_delta_codecs") as d:
        run_hook(d, device, dry, "delta_codecs", ["multimoe_rt.delta"], "delta codecs vs dense slab")


def step_synthetic(device, dry):
    """``bench-batch --synthetic large`` in bf16 (a test shape in a dry run): one variant, mixed dense copies,
    every expert shared, the sign1 and int4 plans and transformers, tokens/s and bytes against the roofline."""
    with Step("8_synthetic") as d:
        run_hook(d, device, dry, "synthetic", ["multimoe_rt.benchmarks.synthetic"], "batching at real layer shapes")

