"""HTTP load: Poisson arrivals over HTTP (async httpx, streaming) against the same trace on the in-process engine.

    python bench/http_load.py [--rates 2,5] [-n 40] [--burst 500] [--ray]

The paper's request shape: 20-token prompts, 25 output tokens (EOS ignored), variants drawn uniformly, Poisson
arrivals at each rate λ. Per system: mean/p50/p99 TTFT (arrival -> first token, measured by the client: for
HTTP the first SSE chunk), mean turnaround (arrival -> last token / ``data: [DONE]``) and completed requests/s.
The HTTP overhead ratio is mean turnaround over HTTP / in-process at the same λ; ``--ray`` adds the Ray Serve
deployment (two replicas, two variant groups) against the single-process server. ``--burst N`` sends N
requests at once and counts the lost ones. All traffic goes to 127.0.0.1, bounded in count and time.

The server runs in its own process (``multimoe-rt serve``), the client in this one: on a small CPU machine they
share the cores, so the ratio includes the client's cost; a note in the JSON says so.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from . import RESULTS_HELP, results_dir

from multimoe_rt.machine import machine_info  # noqa: E402


def trace(n: int, rate: float, variants: list, prompt_len: int, vocab_lo: int, vocab_hi: int, seed: int) -> list:
    rng = np.random.default_rng(seed)
    t = np.cumsum(rng.exponential(1.0 / rate, n))
    t -= t[0]
    return [{"at": float(t[i]), "variant": variants[int(rng.integers(len(variants)))],
             "prompt": [int(x) for x in rng.integers(vocab_lo, vocab_hi, prompt_len)]} for i in range(n)]


def summarize(recs: list) -> dict:
    ok = [r for r in recs if r.get("ok")]
    ttft = np.array([r.get("ttft", np.nan) for r in ok]) if ok else np.array([np.nan])
    turn = np.array([r["turnaround"] for r in ok]) if ok else np.array([np.nan])
    span = max((r["at"] + r["turnaround"] for r in ok), default=np.nan) - min((r["at"] for r in recs), default=0)
    return {"completed": len(ok), "lost": len(recs) - len(ok), "ttft_mean": float(ttft.mean()),
            "ttft_p50": float(np.percentile(ttft, 50)), "ttft_p99": float(np.percentile(ttft, 99)),
            "turnaround_mean": float(turn.mean()), "turnaround_p50": float(np.percentile(turn, 50)),
            "turnaround_p99": float(np.percentile(turn, 99)), "req_per_s": float(len(ok) / span) if span else None}


# -- clients --------------------------------------------------------------------------------------
async def run_http(url: str, reqs: list, new_tokens: int, timeout: float = 120.0, stream: bool = True) -> list:
    import httpx

    limits = httpx.Limits(max_connections=len(reqs) + 8, max_keepalive_connections=len(reqs) + 8)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=timeout) as client:
        t0 = time.perf_counter() + 0.05

        async def one(r):
            await asyncio.sleep(max(0.0, t0 + r["at"] - time.perf_counter()))
            start = t0 + r["at"]
            body = {"model": r["variant"], "prompt": r["prompt"], "max_tokens": new_tokens, "temperature": 0,
                    "ignore_eos": True, "stream": True}
            out = {"at": r["at"], "ok": False}
            if not stream:   # one JSON answer: turnaround only (no TTFT)
                try:
                    resp = await client.post("/v1/completions", json={**body, "stream": False})
                    out.update(status=resp.status_code, turnaround=time.perf_counter() - start, ttft=float("nan"))
                    n = len(resp.json()["choices"][0]["token_ids"]) if resp.status_code == 200 else 0
                    out.update(ok=n == new_tokens, tokens=n)
                except Exception as e:  # noqa: BLE001 - counted as lost
                    out["error"] = repr(e)
                return out
            try:
                async with client.stream("POST", "/v1/completions", json=body) as resp:
                    out["status"] = resp.status_code
                    n = 0
                    async for line in resp.aiter_lines():
                        if not line.startswith("data: "):
                            continue
                        if line == "data: [DONE]":
                            out["turnaround"] = time.perf_counter() - start
                            out["ok"] = resp.status_code == 200 and n == new_tokens
                            break
                        got = len(json.loads(line[6:])["choices"][0]["token_ids"]) if line[6:7] == "{" else 0
                        if got and n == 0:
                            out["ttft"] = time.perf_counter() - start
                        n += got
                    out["tokens"] = n
            except Exception as e:  # noqa: BLE001 - counted as lost
                out["error"] = repr(e)
            return out

        return await asyncio.gather(*(one(r) for r in reqs))


async def run_engine(engine, reqs: list, new_tokens: int) -> list:
    t0 = time.perf_counter() + 0.05

    async def one(r):
        await asyncio.sleep(max(0.0, t0 + r["at"] - time.perf_counter()))
        start = t0 + r["at"]
        out = {"at": r["at"], "ok": False}
        n = 0
        async for _ in engine.submit(r["variant"], r["prompt"], max_new_tokens=new_tokens, ignore_eos=True):
            if n == 0:
                out["ttft"] = time.perf_counter() - start
            n += 1
        out.update(turnaround=time.perf_counter() - start, ok=n == new_tokens, tokens=n)
        return out

    return await asyncio.gather(*(one(r) for r in reqs))


async def burst_http(url: str, n: int, variants: list, new_tokens: int) -> dict:
    reqs = [{"at": 0.0, "variant": variants[i % len(variants)], "prompt": [97 + i % 26, 98, 99]} for i in range(n)]
    t = time.perf_counter()
    recs = await run_http(url, reqs, new_tokens, timeout=300)
    secs = time.perf_counter() - t
    s = summarize(recs)
    statuses = {}
    for r in recs:
        key = str(r.get("status", "error"))
        statuses[key] = statuses.get(key, 0) + 1
    return {"requests": n, "new_tokens": new_tokens, "seconds": secs, "req_per_s": n / secs, "lost": s["lost"],
            "statuses": statuses, "ttft_p50": s["ttft_p50"], "ttft_p99": s["ttft_p99"],
            "turnaround_p50": s["turnaround_p50"], "turnaround_p99": s["turnaround_p99"]}


# -- servers --------------------------------------------------------------------------------------
def proc_cpu(pid: int) -> float:
    """User + system CPU seconds of a process (Linux /proc), 0 where unreadable."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def start_server(dirs, threads: int, max_batch: int, max_len: int, stream_interval: int = 1):
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.Popen([sys.executable, "-m", "multimoe_rt.integrations.server_args", *map(str, dirs),
                             "--port", "0",
                             "--max-batch", str(max_batch), "--max-len", str(max_len), "--log-level", "warning",
                             "--stream-interval", str(stream_interval)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout], daemon=True).start()
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None:
        try:
            line = lines.get(timeout=0.5)
        except queue.Empty:
            continue
        if "listening on" in line:
            return proc, line.strip().rsplit(" ", 1)[-1]
    proc.kill()
    raise RuntimeError("the server did not start")


def start_ray(dirs, names, threads: int, max_batch: int, max_len: int):
    import ray
    from ray import serve

    from multimoe_rt.integrations import ray_serve
    from multimoe_rt.integrations.groups import VariantGroups
    from multimoe_rt.integrations.runner import free_port

    half = (len(dirs) + 1) // 2
    groups = VariantGroups([dirs[:half], [dirs[0]] + dirs[half:]] if len(dirs) > 2 else [dirs, dirs[:1]])
    port = free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": str(threads)}})
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(ray_serve.build(groups, {"max_seqs": max_batch, "max_len": max_len}, replicas=2, threads=threads),
              name="multimoe", route_prefix="/")
    return f"http://127.0.0.1:{port}", list(groups.groups)


def stop_ray():
    import ray
    from ray import serve

    serve.shutdown()
    ray.shutdown()


def main_args(args) -> dict:
    import torch

    from multimoe_rt.engine import Engine

    torch.set_num_threads(args.threads)
    if args.dirs:
        dirs = [Path(d) for d in args.dirs]
    else:
        from multimoe_rt.lab import zoo

        built = zoo.build("mixtral-tiny", small=True, progress=False)
        dirs = [built[v] for v in args.variants.split(",")]
    names = [d.name for d in dirs]
    cfg = json.loads((dirs[0] / "config.json").read_text())
    vocab_hi = min(cfg["vocab_size"], 256 if (dirs[0] / "multimoe_tokenizer.json").is_file() else cfg["vocab_size"])
    rates = [float(x) for x in args.rates.split(",")]
    out = {"machine": machine_info(), "torch_threads": args.threads, "variants": names, "prompt_len": args.prompt_len,
           "new_tokens": args.new_tokens, "requests_per_rate": args.requests, "max_batch": args.max_batch,
           "stream_interval": args.stream_interval,
           "note": "server and client processes share this machine's cores; TTFT/turnaround measured by the client "
                   "from each request's scheduled arrival; per system and rate the median over repeats of each "
                   "run's statistic; systems alternate on the same trace", "rates": []}
    # prompts are token ids (printable bytes where the checkpoint has the byte tokenizer): no tokenizer cost
    traces = {rate: trace(args.requests, rate, names, args.prompt_len, 32, vocab_hi, args.seed) for rate in rates}
    warm = trace(8, 50.0, names, args.prompt_len, 32, vocab_hi, args.seed + 1)

    engine = Engine.from_pretrained(dirs, max_seqs=args.max_batch, max_len=args.max_len)
    proc, url = start_server(dirs, args.threads, args.max_batch, args.max_len, args.stream_interval)
    rurl = None
    try:
        if args.ray:
            rurl, out["ray_groups"] = start_ray(dirs, names, args.threads, args.max_batch, args.max_len)
        systems = {"engine": lambda reqs: run_engine(engine, reqs, args.new_tokens),
                   "http": lambda reqs: run_http(url, reqs, args.new_tokens)}
        if args.nostream:
            systems["http_nostream"] = lambda reqs: run_http(url, reqs, args.new_tokens, stream=False)
        if rurl:
            systems["ray"] = lambda reqs: run_http(rurl, reqs, args.new_tokens)
        for run in systems.values():
            asyncio.run(run(warm))
        # systems alternate on the same trace, repeat after repeat: slow drifts of a shared machine hit all alike
        runs = {(name, rate): [] for name in systems for rate in rates}
        for rep in range(args.repeats):
            for rate in rates:
                for name, run in systems.items():
                    c0, s0 = time.process_time(), proc_cpu(proc.pid)
                    res = summarize(asyncio.run(run(traces[rate])))
                    # CPU seconds per request: this process (client, or client + engine in-process) and the server
                    res["client_cpu_ms"] = 1e3 * (time.process_time() - c0) / args.requests
                    res["server_cpu_ms"] = 1e3 * (proc_cpu(proc.pid) - s0) / args.requests \
                        if name.startswith("http") else (float("nan") if name == "ray" else 0.0)
                    runs[name, rate].append(res)
        if args.burst:
            out["burst"] = asyncio.run(burst_http(url, args.burst, names, args.burst_tokens))
    finally:
        engine.shutdown()
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        if rurl:
            stop_ray()

    def med(name, rate):
        rs = runs[name, rate]
        m = {k: float(np.median([r[k] for r in rs])) for k in rs[0] if k not in ("completed", "lost")}
        return dict(m, completed=sum(r["completed"] for r in rs), lost=sum(r["lost"] for r in rs), runs=rs)

    for rate in rates:
        row = {"rate": rate, **{name: med(name, rate) for name in systems}}
        e, h = row["engine"], row["http"]
        row["http_over_engine_turnaround"] = h["turnaround_mean"] / e["turnaround_mean"]
        row["http_over_engine_ttft"] = h["ttft_mean"] / e["ttft_mean"]
        if "http_nostream" in row:
            row["http_nostream_over_engine_turnaround"] = row["http_nostream"]["turnaround_mean"] / e["turnaround_mean"]
        if "ray" in row:
            row["ray_over_http_turnaround"] = row["ray"]["turnaround_mean"] / h["turnaround_mean"]
            row["ray_over_http_ttft"] = row["ray"]["ttft_mean"] / h["ttft_mean"]
        out["rates"].append(row)
    out["repeats"] = args.repeats
    print(report(out))
    path = results_dir(args.out) / f"http_load-{args.tag}.json"  # --out's default is None: the results folder
    path.write_text(json.dumps(out, indent=2, default=str) + "\n")
    print(f"results: {path}")
    return out


def report(out: dict) -> str:
    lines = [f"{len(out['variants'])} variants ({', '.join(out['variants'])}); {out['machine'].get('cpu', '')}; "
             f"{out['prompt_len']}-token prompts, {out['new_tokens']} new tokens, {out['requests_per_rate']} requests "
             "per rate", f"{'λ':>5} {'system':<13} {'TTFT mean':>10} {'p50':>10} {'p99':>10} {'turn mean':>10} "
                         f"{'req/s':>7} {'lost':>5} {'CPU/req':>10}"]
    for row in out["rates"]:
        for sysname in ("engine", "http", "http_nostream", "ray"):
            if sysname in row:
                s = row[sysname]
                cpu = s["client_cpu_ms"] + (s["server_cpu_ms"] if np.isfinite(s["server_cpu_ms"]) else 0.0)
                ms = [f"{s[k] * 1e3:>8.1f}ms" for k in ("ttft_mean", "ttft_p50", "ttft_p99", "turnaround_mean")]
                lines.append(f"{row['rate']:>5g} {sysname:<13} {' '.join(ms)} {s['req_per_s'] or 0:>7.2f} "
                             f"{s['lost']:>5} {cpu:>8.1f}ms")
        ratios = [f"HTTP/engine mean turnaround {row['http_over_engine_turnaround']:.3f}, "
                  f"TTFT {row['http_over_engine_ttft']:.3f}"]
        if "http_nostream" in row:
            ratios.append(f"non-streaming HTTP/engine turnaround {row['http_nostream_over_engine_turnaround']:.3f}")
        if "ray" in row:
            ratios.append(f"Ray/HTTP turnaround {row['ray_over_http_turnaround']:.3f}, "
                          f"TTFT {row['ray_over_http_ttft']:.3f}")
        lines.append("      " + "; ".join(ratios))
    lines.append("      (CPU/req: this process, plus the server process for http; Ray's processes are not counted)")
    if "burst" in out:
        b = out["burst"]
        lines.append(f"burst: {b['requests']} concurrent requests x {b['new_tokens']} tokens in {b['seconds']:.2f} s "
                     f"({b['req_per_s']:.0f} req/s), lost {b['lost']}, statuses {b['statuses']}, TTFT p50 "
                     f"{b['ttft_p50'] * 1e3:.0f} ms p99 {b['ttft_p99'] * 1e3:.0f} ms")
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dirs", nargs="*", default=None, help="checkpoint directories (default: the small zoo)")
    p.add_argument("--variants", default="base,ptb,shakespeare,pycode", help="zoo variants (without --dirs)")
    p.add_argument("--rates", default="2,5", help="arrival rates λ (req/s), comma-separated")
    p.add_argument("-n", "--requests", type=int, default=40, help="requests per rate")
    p.add_argument("--prompt-len", type=int, default=20)
    p.add_argument("--new-tokens", type=int, default=25)
    p.add_argument("--max-batch", type=int, default=64)
    p.add_argument("--max-len", type=int, default=256)
    p.add_argument("--burst", type=int, default=500, help="concurrent requests of the burst (0: none)")
    p.add_argument("--burst-tokens", type=int, default=4)
    p.add_argument("--stream-interval", type=int, default=1, help="the server's tokens per streamed chunk")
    p.add_argument("--nostream", action="store_true", help="also HTTP without streaming (turnaround only)")
    p.add_argument("--repeats", type=int, default=3, help="alternating runs of each system per rate (medians)")
    p.add_argument("--ray", action="store_true", help="also the Ray Serve deployment (2 replicas, 2 groups)")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the engine, here and in the server")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tag", default="cpu")
    p.add_argument("--out", default=None, help=RESULTS_HELP)
    return p


def main(argv=None) -> int:
    main_args(parser().parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
