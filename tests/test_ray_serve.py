"""Variant-group routing across replicas. The routing rules (``groups.GroupAffinity``, ``GroupGuard``,
``start_with_affinity``) run here without Ray, against simulated replicas and a Ray-like router; the Ray Serve
deployment on a local Ray instance (CPU, two engine replicas holding different variant groups) runs where ray is
installed (the ``ray`` extra) and is skipped otherwise."""

import asyncio
import json
import os
import random

import httpx
import pytest

from multimoe_rt.integrations.groups import (GroupAffinity, GroupGuard, Misrouted, RemoteJob, VariantGroups,
                                             encode_error, start_with_affinity)


# ---------------------------------------------------------------------------------------------------
# routing rules, without Ray
# ---------------------------------------------------------------------------------------------------
class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


class ReplicaDied(Exception):
    pass


class Cluster:
    """Replicas with a ``GroupGuard`` each, and Ray's multiplexed routing as the front sees it: a request for a
    group goes to a live replica that holds it, else to one holding none (Ray prefers the fewest loaded models),
    else to a random live replica (which may then load it)."""

    def __init__(self, n, clock, seed=0):
        self.guards = {f"r{i}": GroupGuard() for i in range(n)}
        self.dead: set = set()
        self.clock, self.rng = clock, random.Random(seed)

    def route(self, group):
        live = [r for r in self.guards if r not in self.dead]
        holding = [r for r in live if self.guards[r].current == group]
        empty = [r for r in live if self.guards[r].current is None]
        return self.rng.choice(holding or empty or live)

    async def start(self, group, may_move, hold=False):
        """One request's start, as ``RayBackend.submit`` does it; ``hold`` keeps it in flight."""
        r = self.route(group)
        reason = self.guards[r].check(group, may_move)

        async def stream():
            yield encode_error(Misrouted(reason)) if reason else {"accepted": True, "replica": r, "group": group}

        if reason is None:
            self.guards[r].enter(group)
            if not hold:
                self.guards[r].leave()
        return await RemoteJob(stream()).start()


def test_a_lost_replica_does_not_make_the_survivors_evict_each_other():
    clock = Clock()
    cl = Cluster(3, clock)
    aff = GroupAffinity(grace_s=30.0, clock=clock)
    groups = ["a", "b", "c"]

    async def sleep(s):   # the test's loop advances the clock; a retry only yields to it
        await asyncio.sleep(0)

    async def request(g, hold=False):
        return await start_with_affinity(lambda mm: cl.start(g, mm, hold), g, aff, sleep=sleep, retry_s=0.5,
                                         give_up_s=1e9)

    async def go():
        for g in groups:   # warm-up: one group per replica
            await request(g)
        home = {g: aff.home[g] for g in groups}
        assert len(set(home.values())) == 3
        lost = home["c"]
        cl.dead.add(lost)
        survivors = [r for r in cl.guards if r != lost]
        before = {r: cl.guards[r].switches for r in survivors}
        # while the replacement starts (20 s < grace), requests for every group keep coming
        pending_c = asyncio.ensure_future(request("c"))
        for _ in range(40):
            for g in ("a", "b"):
                job = await request(g)
                assert job.info["replica"] == home[g]
            clock.t += 0.5
            await asyncio.sleep(0)
        assert not pending_c.done()                      # "c" waits for its own replica ...
        assert {r: cl.guards[r].switches for r in survivors} == before   # ... and nobody evicted anybody
        cl.guards["r_new"] = GroupGuard()               # the replacement comes up
        job = await pending_c
        assert job.info["replica"] == "r_new" and aff.home["c"] == "r_new"
        assert {r: cl.guards[r].switches for r in survivors} == before

    asyncio.run(go())


def test_after_the_grace_period_a_group_may_move_but_never_off_a_replica_with_requests_in_flight():
    clock = Clock()
    cl = Cluster(2, clock, seed=1)
    aff = GroupAffinity(grace_s=5.0, clock=clock)

    async def sleep(s):
        clock.t += s
        await asyncio.sleep(0)

    async def go():
        for g in ("a", "b"):
            await start_with_affinity(lambda mm, g=g: cl.start(g, mm), g, aff, sleep=sleep)
        ra, rb = aff.home["a"], aff.home["b"]
        await start_with_affinity(lambda mm: cl.start("a", mm, hold=True), "a", aff, sleep=sleep)   # in flight
        cl.dead.add(rb)
        # "b" lost its replica; the only survivor has "a" in flight: "b" is refused past the grace period too
        with pytest.raises(Exception, match="no replica could take"):
            await start_with_affinity(lambda mm: cl.start("b", mm), "b", aff, sleep=sleep, retry_s=1.0, give_up_s=12.0)
        assert cl.guards[ra].current == "a" and cl.guards[ra].switches == 0
        cl.guards[ra].leave()                           # "a" finishes: now "b" may take the idle replica
        job = await start_with_affinity(lambda mm: cl.start("b", mm), "b", aff, sleep=sleep)
        assert job.info["replica"] == ra and cl.guards[ra].switches == 1

    asyncio.run(go())


def test_guard_and_affinity_rules():
    g = GroupGuard()
    assert g.check("a", may_move=False) is None          # an empty replica takes any group
    g.enter("a")
    assert g.check("a", may_move=False) is None
    assert "in flight" in g.check("b", may_move=True)
    g.leave()
    assert "waits" in g.check("b", may_move=False) and g.check("b", may_move=True) is None
    clock = Clock()
    aff = GroupAffinity(grace_s=10, clock=clock)
    assert aff.may_move("x")                              # never placed: anywhere
    aff.placed("x", "r1")
    assert not aff.may_move("x")
    aff.lost("x")
    clock.t = 9.9
    assert not aff.may_move("x")
    clock.t = 10.0
    assert aff.may_move("x")
    aff.placed("x", "r2")
    assert not aff.may_move("x") and aff.home["x"] == "r2"


# ---------------------------------------------------------------------------------------------------
# the deployment on a local Ray instance
# ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    ray = pytest.importorskip("ray", reason="the Ray Serve deployment needs the 'ray' extra")
    serve = pytest.importorskip("ray.serve", reason="the Ray Serve deployment needs the 'ray' extra")
    from multimoe_rt.integrations import ray_serve
    from multimoe_rt.integrations.runner import free_port
    from test_server import save_text_variants

    dirs = save_text_variants(tmp_path_factory.mktemp("ray"), n=3)
    groups = VariantGroups([[dirs[0], dirs[1]], [dirs[0], dirs[2]]])
    port = free_port()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "RAY_SERVE_LOG_TO_STDERR": "0"}})
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(ray_serve.build(groups, {"max_seqs": 8, "max_len": 256}, replicas=2, threads=1),
                  name="multimoe", route_prefix="/")
        yield f"http://127.0.0.1:{port}", dirs, groups
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.mark.slow
def test_requests_reach_a_replica_holding_their_variant(deployment):
    from multimoe_rt.engine import Engine
    from test_server import TOK

    url, dirs, groups = deployment
    placement = httpx.get(url + "/v1/placement", timeout=30).json()["placement"]
    assert sorted(p["group"] for p in placement) == ["base+v1", "base+v2"]
    assert len({p["replica"] for p in placement}) == 2           # one group per replica
    replica_of = {p["group"]: p["replica"] for p in placement}
    assert [m["id"] for m in httpx.get(url + "/v1/models").json()["data"]] == ["base", "v1", "v2"]

    with Engine.from_pretrained(dirs, max_seqs=8, max_len=256) as ref:
        for v in ["base", "v1", "v2", "v2", "v1"]:
            prompt = f"hello {v}"
            r = httpx.post(url + "/v1/completions", json={"model": v, "prompt": prompt, "max_tokens": 8,
                                                          "temperature": 0}, timeout=60)
            assert r.status_code == 200, r.text
            group = r.headers["x-multimoe-group"]
            assert v in groups.group_names[group] and r.headers["x-multimoe-replica"] == replica_of[group]
            want = ref.generate(v, TOK.encode(prompt), max_new_tokens=8)
            assert r.json()["choices"][0]["token_ids"] == want
        body = {"model": "v2", "prompt": "stream", "max_tokens": 6, "temperature": 0, "stream": True}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
            assert r.headers["x-multimoe-group"] == "base+v2"
            lines = [x for x in r.iter_lines() if x]
        assert lines[-1] == "data: [DONE]"
        ids = [t for x in lines[:-1] for t in json.loads(x[6:])["choices"][0]["token_ids"]]
        assert ids == ref.generate("v2", TOK.encode("stream"), max_new_tokens=6)
    r = httpx.post(url + "/v1/completions", json={"model": "nope", "prompt": "x"}, timeout=30)
    assert r.status_code == 404
    r = httpx.post(url + "/v1/completions", json={"model": "v1", "prompt": [1, 999]}, timeout=30)
    assert r.status_code == 400 and "[0, 272)" in r.json()["error"]["message"]
