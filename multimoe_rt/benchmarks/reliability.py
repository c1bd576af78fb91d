"""Reliability suite: nothing wrong comes back silently (issue 16). Prints one table.

    multimoe-rt bench-reliability [--quick]

Sections, each on the served variants of the small mixtral-tiny zoo (or ``dirs``), served by the runtime's
``engine.Engine`` with the plan that keeps every variant's own experts (share 0), so "right" is well defined: a
request's tokens must equal its variant's greedy tokens computed alone (one request at a time, by a second engine
with one KV-cache row; that engine is itself checked against each variant's own transformers model first). The
bursts' engines hold one weight set fewer than there are variants, so serving keeps reloading sets (the paper's
partial reconfiguration) under the load.

  burst             N requests (default 1000) from 16 threads across all variants, 5% bad requests of 7 kinds:
                    counts of ok, rejected (RequestError at submit), failed, cancelled, lost, wrong
  burst + shutdown  the same burst with shutdown(drain=False) in the middle: every request is accounted for
  foreign thread    another thread submits requests of random variants and cancels them at random moments while
                    the engine serves a burst: set loads, drains and cancellations race the burst's requests
  faults            a set load that raises after scribbling NaN over the set it was filling, an allocation
                    failure (in a set load, in a forward), a NaN tensor and a truncated shard at load: clean
                    errors, only the requests concerned fail, every variant serves right afterwards, 0 wrong
  fuzz              hypothesis-mutated safetensors files (headers and bodies) and plans: only the project's own
                    error classes come out; a plan that loads serves every entry its own (or the anchor's) weights
  RSS               resident-set growth over 1,000 switches (one weight set, requests alternating variants)

``lost`` counts requests that never finished; ``wrong`` counts ok requests whose tokens differ from the variant's
tokens computed alone. Both must be 0. Faults are injected through the engine's test hooks
(``VariantWeights.copy_hook``, ``Engine.model.forward``), as tests/test_engine_faults.py does.
"""

from __future__ import annotations

import collections
import copy
import gc
import json
import logging
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

from multimoe_rt.checkpoint import VariantSet, load_variant
from multimoe_rt.engine import Engine
from multimoe_rt.errors import CheckpointError, EngineClosed, MultimoeError, RequestError, StepError
from multimoe_rt.weights import WeightLoadError

NEW = 4          # new tokens per request: the decode path runs, the burst stays short
PROMPT_LEN = 8
POOL = 24        # distinct prompts per variant (outputs computed alone once each)
MAX_LEN = 64     # KV-cache positions per sequence
REACH = PROMPT_LEN + NEW  # positions a pool request reaches: a forward reaching past them holds a poisoned prompt
BAD_KINDS = ("unknown variant", "empty prompt", "token id outside the vocabulary", "float token ids",
             "max_new_tokens=True", "prompt=None", "NaN temperature")


def _rss() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _outcome(h) -> str:
    """What became of a submitted request: ok, failed, cancelled or lost (never finished)."""
    if not h.done:
        return "lost"
    if h.finish_reason == "cancelled":
        return "cancelled"
    return "failed" if h.error is not None else "ok"


class Suite:
    def __init__(self, dirs: dict, progress: bool = True, seed: int = 0):
        from multimoe_rt.plan import make_plan

        self.dirs, self.names = dict(dirs), list(dirs)
        self.log = (lambda m: print(m, file=sys.stderr, flush=True)) if progress else (lambda m: None)
        self.vs = VariantSet.from_dirs(list(self.dirs.values()), names=self.names)
        self.plan = make_plan(self.vs, share=0.0)
        self.alone = self.engine(max_seqs=1, resident_sets=len(self.names))
        self.vocab = self.alone.vocab_size
        rng = random.Random(seed)
        self.prompts = [[rng.randrange(0, min(256, self.vocab)) for _ in range(PROMPT_LEN)]
                        for _ in range(POOL)]
        self._expected: dict = {}
        self.alone_vs_transformers = self._check_alone_against_transformers()

    def engine(self, max_seqs: int = 8, resident_sets: int | None = None) -> Engine:
        """An engine over the suite's variants; by default one weight set fewer than variants (sets reload)."""
        sets = max(1, len(self.names) - 1) if resident_sets is None else resident_sets
        return Engine.from_pretrained(self.vs, plan=self.plan, resident_sets=sets, max_seqs=max_seqs,
                                      max_len=MAX_LEN)

    def close(self) -> None:
        self.alone.shutdown()

    def _check_alone_against_transformers(self) -> str:
        from multimoe_rt.model import MODEL_CLASSES, hf_generate

        same = 0
        ids = list(self.vs[0].eos_token_ids)  # the engine's default: the first variant's EOS
        eos = ids[0] if len(ids) == 1 else ids or None  # one id as an int: hf_generate pads with it
        for name, d in self.dirs.items():
            ref = MODEL_CLASSES[self.vs.family][1].from_pretrained(d).eval()
            theirs = hf_generate(ref, self.vs.family, torch.tensor([self.prompts[0]]), max_new_tokens=NEW,
                                 eos_token_id=eos)
            same += self.expected(name, 0) == theirs.reshape(-1).tolist()
        return f"{same}/{len(self.dirs)}"

    def expected(self, variant: str, k: int) -> list:
        key = (variant, k)
        if key not in self._expected:  # computed alone: one request at a time, in an engine of its own
            self._expected[key] = self.alone.generate(variant, self.prompts[k], max_new_tokens=NEW)
        return self._expected[key]

    def _serves_correctly(self, eng: Engine, first: str | None = None) -> bool:
        """Every variant's tokens right, ``first`` asked first (before other loads can overwrite its set)."""
        try:
            return all(eng.generate(v, self.prompts[1], max_new_tokens=NEW) == self.expected(v, 1)
                       for v in sorted(self.names, key=lambda v: v != first))
        except Exception:  # noqa: BLE001 -- a request that fails is not serving right
            return False

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
            "NaN temperature": ((v, p), {"temperature": float("nan")}),
        }[kind]

    def burst(self, n: int, threads: int, bad_fraction: float = 0.05, shutdown_after: int | None = None,
              meddle: bool = False, seed: int = 1, engine: Engine | None = None, poisoned: int = 0) -> dict:
        """``n`` requests from ``threads`` client threads (``poisoned`` more whose prompt is twice a pool prompt,
        long enough to reach past REACH); the engine is shut down at the end (``engine``: one a fault section
        prepared)."""
        rng = random.Random(seed)
        n_bad = round(bad_fraction * n)
        items = [("bad", BAD_KINDS[i % len(BAD_KINDS)]) for i in range(n_bad)] + \
                [("ok", (rng.choice(self.names), rng.randrange(POOL))) for _ in range(n - n_bad)] + \
                [("poisoned", (rng.choice(self.names), rng.randrange(POOL))) for _ in range(poisoned)]
        rng.shuffle(items)
        engine = engine or self.engine()
        loads0 = engine.weights.stats["loads"]
        submitted, lock = [], threading.Lock()
        counts = collections.Counter()
        start = threading.Barrier(threads + 1)
        stop = threading.Event()
        foreign = []

        def client(k):
            start.wait()
            for i in range(k, len(items), threads):
                kind, what = items[i]
                try:
                    if kind == "bad":
                        args, kw = self._bad(what)
                        engine.submit(*args, **kw)
                        raise AssertionError(f"bad request accepted: {what}")
                    prompt = list(self.prompts[what[1]]) * (2 if kind == "poisoned" else 1)
                    h = engine.submit(what[0], prompt, max_new_tokens=NEW)
                except RequestError:
                    with lock:
                        counts["rejected"] += 1
                    continue
                except EngineClosed:
                    with lock:
                        counts["closed"] += 1
                    continue
                with lock:
                    submitted.append((kind, what, h))

        def meddler():  # requests of random variants, cancelled at random moments: loads and drains race
            r = random.Random(seed + 99)
            while not stop.is_set():
                try:
                    h = engine.submit(r.choice(self.names), r.choice(self.prompts), max_new_tokens=NEW)
                except EngineClosed:
                    return
                foreign.append(h)
                time.sleep(r.random() * 0.004)
                h.cancel()
                engine.load()

        ts = [threading.Thread(target=client, args=(k,)) for k in range(threads)]
        if meddle:
            ts.append(threading.Thread(target=meddler))
        for t in ts:
            t.start()
        start.wait()
        t0 = time.perf_counter()
        if shutdown_after is not None:  # shut down in the middle: clients may still be submitting
            while engine.stats["finished"] < shutdown_after and time.perf_counter() - t0 < 600:
                time.sleep(0.001)
            engine.shutdown(drain=False, timeout=120)
        for t in ts[:threads]:
            t.join()
        if meddle:  # the foreign thread goes on until the burst is served, not only while it is submitted
            for *_, h in submitted:
                try:
                    h.result(timeout=600)
                except Exception:  # noqa: BLE001 -- counted below
                    pass
        stop.set()
        for t in ts[threads:]:
            t.join()
        if shutdown_after is None:
            engine.shutdown(drain=True, timeout=600)  # every request served
        wall = time.perf_counter() - t0
        out = {"requests": n, "bad": n_bad, "ok": 0, "rejected": counts["rejected"] + counts["closed"],
               "failed": 0, "cancelled": 0, "lost": 0, "wrong": 0, "checked": 0, "wall_s": round(wall, 2),
               "set_loads": engine.weights.stats["loads"] - loads0}
        errors = collections.Counter()
        if poisoned:
            out.update(poisoned=poisoned, poisoned_failed=0)
        for kind, (variant, k), h in submitted:
            what = _outcome(h)
            if kind == "poisoned":  # must fail alone, with the step's error
                out["poisoned_failed"] += what == "failed" and isinstance(h.error, StepError)
                out["lost"] += what == "lost"
                continue
            out[what] += 1
            if what == "failed":
                errors[type(h.error).__name__] += 1
            elif what == "ok":
                out["checked"] += 1
                out["wrong"] += h.tokens != self.expected(variant, k)
        out["errors"] = dict(errors)
        if meddle:
            out["foreign_requests"] = len(foreign)
            out["lost"] += sum(not h.done for h in foreign)
        out["accounted"] = out["ok"] + out["rejected"] + out["failed"] + out["cancelled"] + out["lost"] == n
        return out

    # ---- faults -----------------------------------------------------------------------------------------
    def load_fault(self, make_error, label: str) -> dict:
        """A set load that fails after scribbling NaN over the set it was filling: the requests waiting for that
        variant fail with a clean error, nothing ever reads the half-written set (every variant serves right
        afterwards), and a burst in which every third load fails has 0 wrong outputs."""
        eng = self.engine()
        w = eng.weights
        try:
            for v in self.names[:w.num_sets]:  # every set holds a variant: the next load evicts one
                eng.generate(v, self.prompts[1], max_new_tokens=NEW)
            target = self.names[-1]

            def scribble_then_fail(v):
                # the one load in flight fills the one set no resident variant holds
                (s,) = set(range(w.num_sets)) - set(w.resident().values())
                for t in w.stacked.values():
                    t[s].fill_(float("nan"))
                raise make_error()

            w.copy_hook = scribble_then_fail
            h = eng.submit(target, self.prompts[1], max_new_tokens=NEW)
            try:
                h.result(timeout=600)
            except Exception:  # noqa: BLE001 -- judged below
                pass
            w.copy_hook = None
            clean = isinstance(h.error, WeightLoadError) and "injected" in str(h.error)
            serving = self._serves_correctly(eng, first=target)
            calls = [0]

            def now_and_then(v):  # every third load fails
                calls[0] += 1
                if calls[0] % 3 == 0:
                    raise make_error()

            w.copy_hook = now_and_then
            b = self.burst(max(40, self.n // 10), threads=4, bad_fraction=0.0, seed=7, engine=eng)
        finally:
            eng.shutdown()
        return {"fault": label, "clean_error": clean and set(b["errors"]) <= {"WeightLoadError"},
                "serves_after": serving, "ok": b["ok"], "failed": b["failed"], "lost": b["lost"],
                "wrong": b["wrong"], "set_loads": b["set_loads"]}

    def forward_fault(self) -> dict:
        """Allocation failures inside a step's forward: a persistent one (every forward holding a poisoned prompt,
        one that reaches past REACH) fails exactly those requests; a transient one (every 7th forward call) is retried in halves. Only
        StepErrors, 0 wrong."""
        eng = self.engine()
        forward, calls = eng.model.forward, [0]

        def flaky(b):
            calls[0] += 1
            if calls[0] % 7 == 0 or bool((b.positions >= REACH).any()):
                raise torch.OutOfMemoryError("injected allocation failure")
            return forward(b)

        eng.model.forward = flaky
        n = max(40, self.n // 10)
        engine_log = logging.getLogger("multimoe_rt.engine")
        level = engine_log.level
        engine_log.setLevel(logging.CRITICAL)  # every injected failure would print a traceback
        try:
            b = self.burst(n, threads=4, bad_fraction=0.0, seed=8, engine=eng, poisoned=max(2, n // 20))
        finally:
            engine_log.setLevel(level)
            eng.shutdown()
        with self.engine() as after:
            serving = self._serves_correctly(after)
        return {"fault": "allocation failure in a forward", "ok": b["ok"], "failed": b["failed"], "lost": b["lost"],
                "wrong": b["wrong"], "serves_after": serving, "forward_calls": calls[0],
                "poisoned": b["poisoned"], "poisoned_failed": b["poisoned_failed"],
                "clean_error": b["poisoned_failed"] == b["poisoned"] and set(b["errors"]) <= {"StepError"}}

    def load_faults(self, tmp: Path) -> list[dict]:
        """A NaN tensor or a truncated shard in a variant being loaded: CheckpointError naming it, while an engine
        that is already serving goes on serving right."""
        from safetensors.torch import load_file, save_file

        rows = []
        src = self.dirs[self.names[1]]
        with self.engine() as serving:
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
                    Engine.from_pretrained([self.dirs[self.names[0]], bad], names=[self.names[0], "bad"],
                                           max_seqs=1, max_len=MAX_LEN).shutdown()
                except MultimoeError as e:
                    err = e
                except Exception as e:  # noqa: BLE001 -- reported as not clean
                    err = AssertionError(f"{type(e).__name__}: {e}")
                clean = isinstance(err, CheckpointError) and str(bad) in str(err)
                rows.append({"fault": label, "clean_error": clean, "error": f"{type(err).__name__}: {err}"[:160],
                             "serves_after": self._serves_correctly(serving), "ok": 0, "failed": 0, "lost": 0,
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

        from multimoe_rt.plan import Plan, PlanError, load_slab, make_plan
        from multimoe_rt.plan.mutate import mutants, wrong_entries

        make_plan(self.vs, share=0.5).to_json(tmp / "plan.json")
        out = {"cases": 0, "loaded": 0, "refused": 0, "other": 0, "wrong_weights": 0, "examples": []}
        f = tmp / "fuzz-plan.json"

        @settings(max_examples=n, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        @given(mutants((tmp / "plan.json").read_text()))
        def case(mutant):
            kind, raw = mutant
            f.write_text(raw)
            out["cases"] += 1
            try:
                p = Plan.from_json(f, variant_set=self.vs)
                slab, table = load_slab(p, self.vs)
            except PlanError:
                out["refused"] += 1
                return
            except Exception as e:  # noqa: BLE001 -- what this section counts
                out["other"] += 1
                if len(out["examples"]) < 5:
                    out["examples"].append(f"{kind}: {type(e).__name__}: {e}"[:200])
                return
            out["loaded"] += 1
            out["wrong_weights"] += len(wrong_entries(p, self.vs, slab, table))

        case()
        return out

    # ---- memory -----------------------------------------------------------------------------------------
    def rss_over_switches(self, n: int) -> dict:
        """``n`` one-token requests alternating variants on one weight set: every request reloads the set."""
        names = self.names
        with self.engine(max_seqs=1, resident_sets=1) as eng:
            for i in range(50):  # warm: every variant loaded, allocator pools used
                eng.generate(names[i % len(names)], self.prompts[i % POOL], max_new_tokens=1)
            gc.collect()
            before, loads = _rss(), eng.weights.stats["loads"]
            t0 = time.perf_counter()
            for i in range(n):
                eng.generate(names[i % len(names)], self.prompts[i % POOL], max_new_tokens=1)
            wall = time.perf_counter() - t0
            gc.collect()
            after = _rss()
            switches = eng.weights.stats["loads"] - loads
        return {"switches": switches, "rss_before_mib": round(before / 2**20, 2),
                "rss_after_mib": round(after / 2**20, 2), "growth_mib": round((after - before) / 2**20, 2),
                "wall_s": round(wall, 2)}

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
        self.log("foreign thread submitting and cancelling during serving")
        res["foreign_thread"] = self.burst(n, threads, bad_fraction=0.0, meddle=True, seed=3)
        self.log("injected faults")
        with tempfile.TemporaryDirectory(prefix="multimoe-reliability-") as tmp:
            tmp = Path(tmp)
            res["faults"] = [self.load_fault(lambda: OSError("injected copy failure"), "set load raises mid-copy"),
                             self.load_fault(lambda: torch.OutOfMemoryError("injected allocation failure"),
                                             "allocation failure in a set load"),
                             self.forward_fault(), *self.load_faults(tmp)]
            self.log(f"fuzzing: {fuzz_files} safetensors files, {fuzz_plans} plans")
            res["fuzz_safetensors"] = self.fuzz_safetensors(fuzz_files, tmp)
            res["fuzz_plans"] = self.fuzz_plans(fuzz_plans, tmp)
        self.log(f"RSS over {switches} switches")
        res["rss"] = self.rss_over_switches(switches)
        res["passed"] = passed(res)
        return res


def passed(res: dict) -> bool:
    bursts = [res["burst"], res["burst_shutdown"], res["foreign_thread"]]
    ok = all(b["lost"] == 0 and b["wrong"] == 0 and b["accounted"] for b in bursts)
    ok &= res["burst"]["rejected"] == res["burst"]["bad"] and res["burst"]["failed"] == 0
    ok &= all(f["lost"] == 0 and f["wrong"] == 0 and f["clean_error"] and f["serves_after"] for f in res["faults"])
    ok &= res["fuzz_safetensors"]["other"] == 0 and res["fuzz_plans"]["other"] == 0
    ok &= res["fuzz_plans"]["wrong_weights"] == 0
    same, total = res["alone_vs_transformers"].split("/")  # else "right" would not be well defined
    ok &= same == total
    return bool(ok)


def table(res: dict) -> str:
    head = f"{'section':<42} {'ok':>5} {'reject':>6} {'failed':>6} {'cancel':>6} {'lost':>4} {'wrong':>5}  notes"
    lines = [head, "-" * len(head)]

    def row(label, r, note=""):
        lines.append(f"{label:<42} {r.get('ok', 0):>5} {r.get('rejected', 0):>6} {r.get('failed', 0):>6} "
                     f"{r.get('cancelled', 0):>6} {r.get('lost', 0):>4} {r.get('wrong', 0):>5}  {note}")

    b = res["burst"]
    row(f"burst: {b['requests']} req, {res['threads']} threads, {b['bad']} bad", b,
        f"{b['checked']} outputs checked; {b['set_loads']} set loads; {b['wall_s']} s")
    b = res["burst_shutdown"]
    row("burst + shutdown(drain=False) midway", b, f"all accounted for: {'yes' if b['accounted'] else 'NO'}")
    b = res["foreign_thread"]
    row("foreign thread submitting and cancelling", b,
        f"{b['foreign_requests']} foreign requests; {b['set_loads']} set loads")
    for f in res["faults"]:
        note = (f"clean error: {'yes' if f['clean_error'] else 'NO'}; every variant right after: "
                f"{'yes' if f['serves_after'] else 'NO'}"
                + (f"; poisoned failed alone: {f['poisoned_failed']}/{f['poisoned']}" if "poisoned" in f else ""))
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
    suite = Suite(dirs, progress=progress)
    try:
        return suite.run(n=n, threads=threads, switches=switches, fuzz_files=fuzz_files, fuzz_plans=fuzz_plans)
    finally:
        suite.close()


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
