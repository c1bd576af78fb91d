"""Ray Serve deployment on a local Ray instance (CPU): two engine replicas holding different variant groups.
Every request must reach a replica that holds its variant, and answer what the single-process engine does.
Runs where ray is installed (the ``ray`` extra); skipped otherwise."""

import json
import os

import httpx
import pytest

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")

from multimoe_rt.engine import Engine  # noqa: E402
from multimoe_rt.integrations import ray_serve  # noqa: E402
from multimoe_rt.integrations.groups import VariantGroups  # noqa: E402
from multimoe_rt.integrations.runner import free_port  # noqa: E402
from test_server import TOK, save_text_variants  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
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


def test_requests_reach_a_replica_holding_their_variant(deployment):
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
