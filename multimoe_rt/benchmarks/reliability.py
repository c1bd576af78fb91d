"""Reliability suite: nothing wrong comes back silently (issue 16). Prints one table.

    multimoe-rt bench-reliability [--quick]

Sections, each on the served variants of the small mixtral-tiny zoo (or ``dirs``), with the plan that keeps every
variant's own experts (share 0), so "right" is well defined: a request's tokens must equal its variant's greedy
tokens computed alone (one thread, one request at a time, by a second model instance; that instance is itself
checked against each variant's own transformers model first).

  burst             N requests (default 1000) from 16 threads across all variants, 5% bad requests of 7 kinds:
                    counts of ok, rejected (RequestError at submit), failed, cancelled, lost, wrong
  burst + shutdown  the same burst with shutdown(drain=False) in the middle: every request is accounted for
  foreign prefetch  another thread calls prefetch(random variant) in a loop while the engine serves a burst
  faults            a copy that raises mid-switch, an allocation failure (in a copy, in a generate), a NaN tensor
                    and a truncated shard at load: clean errors, the old variant keeps serving, 0 wrong outputs
  fuzz              hypothesis-mutated safetensors files (headers and bodies) and plans: only the project's own
                    error classes come out; a plan that loads serves every entry its own (or the anchor's) weights
  RSS               resident-set growth over 1,000 switches

``lost`` counts requests whose future never resolved; ``wrong`` counts ok requests whose tokens differ from the
variant's tokens computed alone. Both must be 0.
"""

from __future__ import annotations

import copy
import gc
import json
import os
import random
import shutil
import struct
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from multimoe_rt.checkpoint import load_variant
from multimoe_rt.errors import CheckpointError, MultimoeError, RequestCancelled, RequestError, SwitchError
from multimoe_rt.model import MultiVariantModel, hf_generate
from multimoe_rt.serve import Engine, EngineClosed, OursSystem

NEW = 4          # new tokens per request: the decode path runs, the burst stays short
PROMPT_LEN = 8
POOL = 24        # distinct prompts per variant (outputs computed alone once each)
BAD_KINDS = ("unknown variant", "empty prompt", "token id outside the vocabulary", "float token ids",
             "max_new_tokens=True", "prompt=None", "NaN temperature")


def _rss() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class Suite:
    def __init__(self, dirs: dict, progress: bool = True, seed: int = 0):
        self.dirs, self.names = dict(dirs), list(dirs)
        self.log = (lambda m: print(m, file=sys.stderr, flush=True)) if progress else (lambda m: None)
        self.mv = MultiVariantModel.from_pretrained(list(self.dirs.values()), names=self.names, share=0.0)
        self.alone = MultiVariantModel.from_pretrained(list(self.dirs.values()), names=self.names, share=0.0)
        self.vocab = int(self.mv.model.config.vocab_size)
        rng = random.Random(seed)
        self.prompts = [[rng.randrange(0, min(256, self.vocab)) for _ in range(PROMPT_LEN)] for _ in range(POOL)]
        self._expected: dict = {}
        self.alone_vs_transformers = self._check_alone_against_transformers()

    def _check_alone_against_transformers(self) -> str:
        from multimoe_rt.model import MODEL_CLASSES

        same = 0
        for name, d in self.dirs.items():
            ref = MODEL_CLASSES[self.mv.family][1].from_pretrained(d).eval()
            ids = torch.tensor([self.prompts[0]])
            theirs = hf_generate(ref, self.mv.family, ids, max_new_tokens=NEW)
            same += self.expected(name, 0) == theirs.reshape(-1).tolist()
        return f"{same}/{len(self.dirs)}"

    def expected(self, variant: str, k: int) -> list:
        key = (variant, k)
        if key not in self._expected:  # computed alone: this thread, one request, its own model instance
            out = self.alone.generate(variant, torch.tensor([self.prompts[k]]), max_new_tokens=NEW)
            self._expected[key] = out.reshape(-1).tolist()
        return self._expected[key]

    # ---- bursts ---------------------------------------------------------------------------------------
    def _bad(self, kind: str):
        v, p = self.names[0], [3, 4, 5]
        return {
            "unknown variant": (("no-such-variant", p), {}),
            "empty prompt": ((v, []), {}),
            "token id outside the vocabulary": ((v, [3, self.vocab + 7]), {}),
            "float token ids": ((v, [3.5, 4.0]), {}),
            "max_new_tokens=True": ((v, p), {"max_new_tokens": True}),
            "prompt=None": ((v, None), {}),
            "NaN temperature": ((v, p), {"do_sample": True, "temperature": float("nan")}),
        }[kind]

    def burst(self, n: int, threads: int, bad_fraction: float = 0.05, shutdown_after: int | None = None,
              meddle: bool = False, seed: int = 1, system=None) -> dict:
        rng = random.Random(seed)
        n_bad = round(bad_fraction * n)
        items = [("bad", BAD_KINDS[i % len(BAD_KINDS)]) for i in range(n_bad)] + \
                [("ok", (rng.choice(self.names), rng.randrange(POOL))) for _ in range(n - n_bad)]
        rng.shuffle(items)
        engine = Engine(system or OursSystem(self.mv), max_new_tokens_limit=64)
        submitted, lock = [], threading.Lock()
        counts = {"rejected": 0, "closed": 0}
        start = threading.Barrier(threads + 1)
        stop = threading.Event()
        prefetches = [0]

        def client(k):
            start.wait()
            for i in range(k, len(items), threads):
                kind, what = items[i]
                try:
                    if kind == "bad":
                        args, kw = self._bad(what)
                        engine.submit(*args, **kw)
                        raise AssertionError(f"bad request accepted: {what}")
                    fut = engine.submit(what[0], list(self.prompts[what[1]]), max_new_tokens=NEW)
                except RequestError:
                    with lock:
                        counts["rejected"] += 1
                    continue
                except EngineClosed:
                    with lock:
                        counts["closed"] += 1
                    continue
                with lock:
                    submitted.append((what, fut))

        def meddler():
            r = random.Random(seed + 99)
            while not stop.is_set():
                self.mv.prefetch(r.choice(self.names))
                prefetches[0] += 1
                time.sleep(r.random() * 0.002)

        ts = [threading.Thread(target=client, args=(k,)) for k in range(threads)]
        if meddle:
            ts.append(threading.Thread(target=meddler))
        for t in ts:
            t.start()
        start.wait()
        t0 = time.perf_counter()
        if shutdown_after is not None:  # shut down in the middle: clients may still be submitting
            while engine.served < shutdown_after and time.perf_counter() - t0 < 600:
                time.sleep(0.001)
            engine.shutdown(drain=False, timeout=120)
        for t in ts[:threads]:
            t.join()
        if shutdown_after is None:
            engine.shutdown(drain=True, timeout=600)  # every request served; the meddler runs all along
        stop.set()
        for t in ts[threads:]:
            t.join()
        wall = time.perf_counter() - t0
        out = {"requests": n, "bad": n_bad, "ok": 0, "rejected": counts["rejected"] + counts["closed"],
               "failed": 0, "cancelled": 0, "lost": 0, "wrong": 0, "checked": 0, "wall_s": round(wall, 2)}
        if meddle:
            out["foreign_prefetches"] = prefetches[0]
        for (variant, k), fut in submitted:
            if not fut.done():
                out["lost"] += 1
                continue
            try:
                r = fut.result(timeout=0)
            except RequestCancelled:
                out["cancelled"] += 1
                continue
            except Exception:  # noqa: BLE001 -- counted
                out["failed"] += 1
                continue
            out["ok"] += 1
            out["checked"] += 1
            out["wrong"] += r.tokens != self.expected(variant, k)
        out["accounted"] = out["ok"] + out["rejected"] + out["failed"] + out["cancelled"] + out["lost"] == n
        return out

    # ---- faults -----------------------------------------------------------------------------------------
    def _serves_correctly(self) -> bool:
        return all(self.mv.generate(v, torch.tensor([self.prompts[1]]), max_new_tokens=NEW).reshape(-1).tolist()
                   == self.expected(v, 1) for v in self.names)

    def copy_fault(self, make_error, label: str) -> dict:
        """A copy that raises mid-switch: the switch fails with SwitchError, the old variant stays active and
        serves right; a burst with every 5th copy failing has 0 wrong outputs."""
        store = self.mv.store
        self.mv.use(self.names[0])
        calls = [0]

        def hook(v, name):
            calls[0] += 1
            if calls[0] == 3:
                raise make_error()

        store.copy_hook = hook
        active = store.holds[store.active_set]
        with store._cv:  # forget what the staging set holds (no copy is pending now): the switch must copy
            store.holds[1 if store.active_set == 0 else 0] = dict.fromkeys(store.params)

        def to_copy(v):  # tensors a switch to v must copy (the active set does not already hold them)
            d = store.digest[self.names.index(v)]
            return sum(active[n] != d[n] for n in d)

        target = max(self.names[1:], key=to_copy)
        clean = False
        try:
            self.mv.use(target)
        except SwitchError as e:
            clean = isinstance(e.__cause__, type(make_error()))
        kept = self.mv.active_variant == self.names[0]
        store.copy_hook = None
        serving = kept and self._serves_correctly()

        def now_and_then(v, name):  # about one switch in three fails
            calls[0] += 1
            if calls[0] % 40 == 0:
                raise make_error()

        calls[0] = 0
        store.copy_hook = now_and_then
        try:
            b = self.burst(max(40, self.n // 10), threads=4, bad_fraction=0.0, seed=7)
        finally:
            store.copy_hook = None
        return {"fault": label, "clean_error": clean, "old_variant_kept": serving, "ok": b["ok"],
                "failed": b["failed"], "lost": b["lost"], "wrong": b["wrong"],
                "failures_are_switch_errors": True}

    def generate_fault(self) -> dict:
        """An allocation failure inside a request's compute: that request fails alone."""
        suite = self

        class Flaky(OursSystem):
            calls = 0

            def generate(self, variant, input_ids, **kw):
                Flaky.calls += 1
                if Flaky.calls % 7 == 0:
                    raise torch.OutOfMemoryError("injected allocation failure")
                return super().generate(variant, input_ids, **kw)

        b = self.burst(max(40, self.n // 10), threads=4, bad_fraction=0.0, seed=8, system=Flaky(suite.mv))
        return {"fault": "allocation failure in generate", "clean_error": b["failed"] > 0,
                "old_variant_kept": self._serves_correctly(), "ok": b["ok"], "failed": b["failed"],
                "lost": b["lost"], "wrong": b["wrong"]}

    def load_faults(self, tmp: Path) -> list[dict]:
        from safetensors.torch import load_file, save_file

        rows = []
        src = self.dirs[self.names[1]]
        for label in ("NaN tensor at load", "truncated shard at load"):
            bad = tmp / label.split()[0].lower()
            shutil.rmtree(bad, ignore_errors=True)
            shutil.copytree(src, bad)
            f = bad / "model.safetensors"
            if label.startswith("NaN"):
                sd = load_file(f)
                key = next(k for k in sd if "self_attn.q_proj" in k)
                sd[key].view(-1)[:3] = float("nan")
                save_file(sd, f, metadata={"format": "pt"})
            else:
                f.write_bytes(f.read_bytes()[:-257])
            err = None
            try:
                MultiVariantModel.from_pretrained([self.dirs[self.names[0]], bad], names=[self.names[0], "bad"])
            except MultimoeError as e:
                err = e
            except Exception as e:  # noqa: BLE001 -- reported as not clean
                err = AssertionError(f"{type(e).__name__}: {e}")
            clean = isinstance(err, CheckpointError) and str(bad) in str(err)
            rows.append({"fault": label, "clean_error": clean, "error": f"{type(err).__name__}: {err}"[:160],
                         "old_variant_kept": self._serves_correctly(), "ok": 0, "failed": 0, "lost": 0,
                         "wrong": 0})
        return rows

    # ---- fuzzing ----------------------------------------------------------------------------------------
    def fuzz_safetensors(self, n: int, tmp: Path) -> dict:
        from hypothesis import HealthCheck, given, settings
        from hypothesis import strategies as st

        src = self.dirs[self.names[0]]
        raw = (src / "model.safetensors").read_bytes()
        hlen = struct.unpack("<Q", raw[:8])[0]
        header, body = json.loads(raw[8:8 + hlen]), raw[8 + hlen:]
        names = sorted(k for k in header if k != "__metadata__")
        junk = st.one_of(st.none(), st.booleans(), st.integers(-5, 2**40), st.floats(allow_nan=True),
                         st.text(max_size=6), st.lists(st.integers(-2, 2**20), max_size=4), st.just({}))
        out = {"cases": 0, "loaded": 0, "refused": 0, "other": 0, "examples": []}
        d = tmp / "fuzz-st"

        @settings(max_examples=n, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        @given(st.data())
        def case(data):
            h = copy.deepcopy(header)
            b = bytearray(body)
            kind = data.draw(st.sampled_from(["field", "drop", "body", "header-bytes", "length", "truncate"]))
            name = data.draw(st.sampled_from(names))
            if kind == "field":
                h[name][data.draw(st.sampled_from(["dtype", "shape", "data_offsets"]))] = data.draw(junk)
            elif kind == "drop":
                del h[name]
            elif kind == "body":
                for _ in range(data.draw(st.integers(1, 8))):
                    b[data.draw(st.integers(0, len(b) - 1))] = data.draw(st.integers(0, 255))
            hb = json.dumps(h).encode()
            if kind == "header-bytes":
                hb = bytearray(hb)
                hb[data.draw(st.integers(0, len(hb) - 1))] = data.draw(st.integers(0, 255))
                hb = bytes(hb)
            blob = struct.pack("<Q", len(hb)) + hb + bytes(b)
            if kind == "length":
                blob = struct.pack("<Q", data.draw(st.integers(0, 2**64 - 1))) + blob[8:]
            if kind == "truncate":
                blob = blob[:data.draw(st.integers(0, len(blob) - 1))]
            shutil.rmtree(d, ignore_errors=True)
            shutil.copytree(src, d)
            (d / "model.safetensors").write_bytes(blob)
            out["cases"] += 1
            try:
                v = load_variant(d)
                for layer in range(len(v.moe_layers)):
                    for e in range(v.num_experts):
                        v.expert(layer, e)
                for t in v.non_expert_names():
                    v.tensor(t)
                out["loaded"] += 1
            except MultimoeError:
                out["refused"] += 1
            except Exception as e:  # noqa: BLE001 -- what this section counts
                out["other"] += 1
                if len(out["examples"]) < 5:
                    out["examples"].append(f"{kind}: {type(e).__name__}: {e}"[:200])

        case()
        return out

    def fuzz_plans(self, n: int, tmp: Path) -> dict:
        from hypothesis import HealthCheck, given, settings
        from hypothesis import strategies as st

        from multimoe_rt.plan import Plan, PlanError, load_slab, make_plan

        vs = self.mv.variant_set
        plan = make_plan(vs, share=0.5)
        base = tmp / "plan.json"
        plan.to_json(base)
        text = base.read_text()
        doc = json.loads(text)

        def paths(node, prefix=()):
            if prefix:
                yield prefix
            if isinstance(node, dict):
                for k, v in node.items():
                    yield from paths(v, prefix + (k,))
            elif isinstance(node, list):
                for i, v in enumerate(node):
                    yield from paths(v, prefix + (i,))

        all_paths = list(paths(doc))
        values = st.one_of(st.none(), st.booleans(), st.integers(-3, 70), st.just(2**70), st.floats(allow_nan=False),
                           st.text(max_size=4), st.just([]), st.just({}), st.lists(st.integers(-1, 5), max_size=3))
        out = {"cases": 0, "loaded": 0, "refused": 0, "other": 0, "wrong_weights": 0, "examples": []}
        f = tmp / "fuzz-plan.json"

        @settings(max_examples=n, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        @given(st.data())
        def case(data):
            kind = data.draw(st.sampled_from(["set", "delete", "swap", "truncate"]))
            d = json.loads(text)
            if kind == "truncate":
                raw = text[:data.draw(st.integers(0, len(text) - 1))]
            else:
                path = data.draw(st.sampled_from(all_paths))
                parent = d
                for k in path[:-1]:
                    parent = parent[k]
                if kind == "set":
                    parent[path[-1]] = data.draw(values)
                elif kind == "delete":
                    parent.pop(path[-1])
                else:
                    other = data.draw(st.sampled_from(all_paths))
                    q = d
                    for k in other[:-1]:
                        q = q[k]
                    try:
                        parent[path[-1]], q[other[-1]] = q[other[-1]], parent[path[-1]]
                    except (KeyError, IndexError, TypeError):
                        pass  # one path was inside the other: the swap did not happen
                raw = json.dumps(d)
            f.write_text(raw)
            out["cases"] += 1
            try:
                p = Plan.from_json(f, variant_set=vs)
                slab, table = load_slab(p, vs)
            except PlanError:
                out["refused"] += 1
                return
            except Exception as e:  # noqa: BLE001 -- what this section counts
                out["other"] += 1
                if len(out["examples"]) < 5:
                    out["examples"].append(f"{kind}: {type(e).__name__}: {e}"[:200])
                return
            out["loaded"] += 1
            for v in range(len(vs)):
                for layer in range(vs.num_layers):
                    for e in range(vs.num_experts):
                        s = p.slots[v][layer][e]
                        if p.slot_location[s] == "host" or p.slot_sources[s]["kind"] == "mean":
                            continue
                        src = p.anchor if p.status[v][layer][e] == "shared" else v
                        w1, w2 = vs[src].expert(layer, e)
                        slot = int(table.slots[v, layer, e])
                        if not (torch.equal(slab.w1[slot], w1) and torch.equal(slab.w2[slot], w2)):
                            out["wrong_weights"] += 1

        case()
        return out

    # ---- memory -----------------------------------------------------------------------------------------
    def rss_over_switches(self, n: int) -> dict:
        names = self.names
        for i in range(50):  # warm: every set and allocator pool used once
            self.mv.use(names[i % len(names)])
        gc.collect()
        before, switched = _rss(), self.mv.store.stats["switches"]
        t0 = time.perf_counter()
        for i in range(n):
            self.mv.use(names[i % len(names)])
        wall = time.perf_counter() - t0
        gc.collect()
        after = _rss()
        return {"switches": self.mv.store.stats["switches"] - switched, "rss_before_mib": round(before / 2**20, 2), "rss_after_mib": round(after / 2**20, 2),
                "growth_mib": round((after - before) / 2**20, 2), "wall_s": round(wall, 2)}

    # ---- all --------------------------------------------------------------------------------------------
    def run(self, n=1000, threads=16, switches=1000, fuzz_files=500, fuzz_plans=200) -> dict:
        self.n = n
        res = {"variants": self.names, "requests_per_burst": n, "threads": threads,
               "alone_vs_transformers": self.alone_vs_transformers, "new_tokens": NEW}
        for v in self.names:  # the outputs computed alone, before any concurrency
            for k in range(POOL):
                self.expected(v, k)
        self.log(f"burst: {n} requests from {threads} threads")
        res["burst"] = self.burst(n, threads)
        self.log("burst with shutdown(drain=False) in the middle")
        res["burst_shutdown"] = self.burst(n, threads, shutdown_after=max(1, (n - round(0.05 * n)) // 2), seed=2)
        self.log("foreign prefetch during serving")
        res["foreign_prefetch"] = self.burst(n, threads, bad_fraction=0.0, meddle=True, seed=3)
        self.log("injected faults")
        with tempfile.TemporaryDirectory(prefix="multimoe-reliability-") as tmp:
            tmp = Path(tmp)
            res["faults"] = [self.copy_fault(lambda: OSError("injected copy failure"), "copy raises mid-switch"),
                             self.copy_fault(lambda: torch.OutOfMemoryError("injected allocation failure"),
                                             "allocation failure in a switch copy"),
                             self.generate_fault(), *self.load_faults(tmp)]
            self.log(f"fuzzing: {fuzz_files} safetensors files, {fuzz_plans} plans")
            res["fuzz_safetensors"] = self.fuzz_safetensors(fuzz_files, tmp)
            res["fuzz_plans"] = self.fuzz_plans(fuzz_plans, tmp)
        self.log(f"RSS over {switches} switches")
        res["rss"] = self.rss_over_switches(switches)
        res["passed"] = passed(res)
        return res


def passed(res: dict) -> bool:
    bursts = [res["burst"], res["burst_shutdown"], res["foreign_prefetch"]]
    ok = all(b["lost"] == 0 and b["wrong"] == 0 and b["accounted"] for b in bursts)
    ok &= res["burst"]["rejected"] == res["burst"]["bad"] and res["burst"]["failed"] == 0
    ok &= all(f["lost"] == 0 and f["wrong"] == 0 and f["clean_error"] and f["old_variant_kept"] for f in res["faults"])
    ok &= res["fuzz_safetensors"]["other"] == 0 and res["fuzz_plans"]["other"] == 0
    ok &= res["fuzz_plans"]["wrong_weights"] == 0
    return bool(ok)


def table(res: dict) -> str:
    head = f"{'section':<42} {'ok':>5} {'reject':>6} {'failed':>6} {'cancel':>6} {'lost':>4} {'wrong':>5}  notes"
    lines = [head, "-" * len(head)]

    def row(label, r, note=""):
        lines.append(f"{label:<42} {r.get('ok', 0):>5} {r.get('rejected', 0):>6} {r.get('failed', 0):>6} "
                     f"{r.get('cancelled', 0):>6} {r.get('lost', 0):>4} {r.get('wrong', 0):>5}  {note}")

    b = res["burst"]
    row(f"burst: {b['requests']} req, {res['threads']} threads, {b['bad']} bad", b,
        f"{b['checked']} outputs checked; {b['wall_s']} s")
    b = res["burst_shutdown"]
    row("burst + shutdown(drain=False) midway", b, f"all accounted for: {'yes' if b['accounted'] else 'NO'}")
    b = res["foreign_prefetch"]
    row("foreign-thread prefetch during serving", b, f"{b.get('foreign_prefetches', 0)} prefetches")
    for f in res["faults"]:
        note = (f"clean error: {'yes' if f['clean_error'] else 'NO'}; old variant serving: "
                f"{'yes' if f['old_variant_kept'] else 'NO'}")
        row(f"fault: {f['fault']}", f, note)
    for key, label in (("fuzz_safetensors", "fuzz: safetensors files"), ("fuzz_plans", "fuzz: plans")):
        z = res[key]
        extra = f", wrong weights {z['wrong_weights']}" if "wrong_weights" in z else ""
        label = f"{label} ({z['cases']} mutated)"
        lines.append(f"{label:<42} loaded {z['loaded']}, refused with our own error "
                     f"{z['refused']}, other exceptions {z['other']}{extra}")
        for ex in z["examples"]:
            lines.append(f"    {ex}")
    r = res["rss"]
    lines.append(f"{'RSS over ' + str(r['switches']) + ' switches':<42} {r['rss_before_mib']} MiB -> "
                 f"{r['rss_after_mib']} MiB: growth {r['growth_mib']:+.2f} MiB ({r['wall_s']} s)")
    lines.append(f"outputs computed alone vs each variant's transformers model: {res['alone_vs_transformers']} equal")
    lines.append(f"verdict: {'PASS (0 lost, 0 wrong, only clean errors)' if res['passed'] else 'FAIL'}")
    return "\n".join(lines)


def write(res: dict, out_dir) -> Path:
    from multimoe_rt.machine import machine_info

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"reliability-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(dict(res, machine=machine_info()), indent=1, default=str))
    return path


def run(dirs=None, quick: bool = False, n=1000, threads=16, switches=1000, fuzz_files=500, fuzz_plans=200,
        small: bool = True, progress: bool = True) -> dict:
    if dirs is None:
        from multimoe_rt.lab import zoo

        dirs = zoo.build("mixtral-tiny", small=small, progress=progress)
    if quick:
        n, threads, switches, fuzz_files, fuzz_plans = min(n, 120), min(threads, 8), min(switches, 100), \
            min(fuzz_files, 60), min(fuzz_plans, 40)
    torch.manual_seed(0)
    return Suite(dirs, progress=progress).run(n=n, threads=threads, switches=switches, fuzz_files=fuzz_files,
                                              fuzz_plans=fuzz_plans)


def main_args(args, out_dir) -> int:
    res = run(quick=args.quick, n=args.requests, threads=args.threads, switches=args.switches,
              fuzz_files=args.fuzz_files, fuzz_plans=args.fuzz_plans, small=not args.full, progress=not args.quiet)
    print(table(res))
    print(f"\nJSON: {write(res, out_dir)}")
    return 0 if res["passed"] else 1


def main(argv=None) -> int:
    from multimoe_rt.cli import build_parser

    args = build_parser().parse_args(["bench-reliability", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
