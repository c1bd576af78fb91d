"""The OpenAI-compatible HTTP server: a real uvicorn server in a subprocess on a free port, driven by the
official ``openai`` client and raw ``httpx``; its outputs are held to the engine's own for the same requests.
Backpressure, token-id-only models and the pure protocol parts run in-process (httpx's ASGI transport)."""

import asyncio
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch
import transformers as T
from prometheus_client.parser import text_string_to_metric_families

from multimoe_rt.engine import Engine
from multimoe_rt.integrations import openai_api as oa
from multimoe_rt.integrations.groups import RemoteJob, VariantGroups, decode_error, encode_error
from multimoe_rt.integrations.server import EngineBackend, build_app
from multimoe_rt.engine import QueueFull
from multimoe_rt.errors import EngineClosed, RequestError
from multimoe_rt.tokenizer import ByteTokenizer
from tiny_models import MIXTRAL, _perturb, save_variants

MAX_LEN, MAX_BATCH = 2048, 16
TOK = ByteTokenizer()


def save_text_variants(tmp_path, n=3, max_len=MAX_LEN):
    """Tiny random Mixtral variants with the byte tokenizer's vocabulary and its multimoe_tokenizer.json, as the
    zoo writes them, so text prompts fit."""
    torch.manual_seed(0)
    cfg = T.MixtralConfig(**{**MIXTRAL, "vocab_size": TOK.vocab_size, "max_position_embeddings": max_len,
                             "eos_token_id": TOK.eos_id, "bos_token_id": TOK.bos_id, "pad_token_id": TOK.pad_id})
    model = T.MixtralForCausalLM(cfg)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    dirs = []
    for i in range(n):
        model.load_state_dict(base)
        if i:
            _perturb(model, "all", 0.3, seed=i)
        path = tmp_path / ("base" if i == 0 else f"v{i}")
        model.save_pretrained(path)
        TOK.save(path)
        dirs.append(path)
    return dirs


def start_server(dirs, *extra, timeout=120, max_len=MAX_LEN):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    log = open(dirs[0].parent / f"server-{time.monotonic_ns()}.log", "w+")
    # cwd: a folder with nothing importable, so no checkout folder can shadow an installed package
    proc = subprocess.Popen([sys.executable, "-m", "multimoe_rt.integrations.server_args", *map(str, dirs),
                             "--port", "0",
                             "--max-batch", str(MAX_BATCH), "--max-len", str(max_len), "--log-level", "warning",
                             *extra], stdout=subprocess.PIPE, stderr=log, text=True, env=env,
                            cwd=dirs[0].parent)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout], daemon=True).start()
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            line = lines.get(timeout=0.5)
        except queue.Empty:
            if proc.poll() is not None:
                break
            continue
        if "listening on" in line:
            return proc, line.strip().rsplit(" ", 1)[-1], log
    proc.kill()
    log.seek(0)
    raise RuntimeError(f"server did not start:\n{log.read()[-3000:]}")


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    return save_text_variants(tmp_path_factory.mktemp("srv"))


@pytest.fixture(scope="module")
def names(dirs):
    return [d.name for d in dirs]


def stop_server(proc) -> None:
    """SIGTERM drains and must exit 0; a server that does not stop is killed either way."""
    proc.send_signal(signal.SIGTERM)
    try:
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.fixture(scope="module")
def server(dirs):
    proc, url, log = start_server(dirs, "--resident-sets", "2")
    yield url
    stop_server(proc)


@pytest.fixture(scope="module")
def ref(dirs):
    """The engine itself, in this process: what the server must answer."""
    eng = Engine.from_pretrained(dirs, max_seqs=MAX_BATCH, max_len=MAX_LEN)
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="none", max_retries=0, timeout=60)


def metrics(url) -> dict:
    """{(name, frozenset(labels)): value} of every sample."""
    text = httpx.get(url + "/metrics", timeout=10).text
    return {(s.name, frozenset(s.labels.items())): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def metric(url, name, **labels) -> float:
    return sum(v for (n, ls), v in metrics(url).items() if n == name and set(labels.items()) <= ls)


PROMPTS = ["The quick brown fox", "def main():\n    ", "Once upon a time", "x"]


# ---------------------------------------------------------------------------------------------------
# endpoints against a real server
# ---------------------------------------------------------------------------------------------------
def test_models_and_health(server, client, names, dirs):
    assert [m.id for m in client.models.list().data] == names
    body = httpx.get(server + "/v1/models").json()
    assert body["object"] == "list"
    assert [(m["id"], m["root"], m["parent"], m["max_model_len"]) for m in body["data"]] == \
        [("base", "base", None, MAX_LEN), ("v1", "v1", "base", MAX_LEN), ("v2", "v2", "base", MAX_LEN)]
    assert str(dirs[0].parent) not in httpx.get(server + "/v1/models").text   # no filesystem path leaks
    assert client.models.retrieve("v2").parent == "base"
    h = httpx.get(server + "/health")
    assert h.status_code == 200 and h.json()["status"] == "ok" and h.json()["models"] == names


def test_completions_on_three_variants_at_once_equal_the_engine(server, client, ref, names):
    jobs = [(v, p, stream) for v in names for p in PROMPTS[:2] for stream in (False, True)]

    def run(job):
        v, p, stream = job
        if not stream:
            r = client.completions.create(model=v, prompt=p, max_tokens=12, temperature=0)
            c = r.choices[0]
            return c.text, c.token_ids, c.finish_reason, r.usage
        text, ids, finish = "", [], None
        for chunk in client.completions.create(model=v, prompt=p, max_tokens=12, temperature=0, stream=True):
            c = chunk.choices[0]
            text += c.text
            ids += c.token_ids
            finish = c.finish_reason or finish
        return text, ids, finish, None

    with ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(run, jobs))
    for (v, p, stream), (text, ids, finish, usage) in zip(jobs, results):
        want = ref.submit(v, TOK.encode(p), max_new_tokens=12).result(timeout=60)
        assert ids == want.tokens, (v, p, stream)
        assert text == TOK.decode(want.tokens)
        assert finish == want.finish_reason
        if usage is not None:
            assert (usage.prompt_tokens, usage.completion_tokens) == (len(TOK.encode(p)), len(want.tokens))
    # the variants really differ, so a mix-up would show
    assert len({tuple(r[1]) for r, (v, p, s) in zip(results, jobs) if p == PROMPTS[0]}) == 3


def test_sampling_seed_batch_prompts_and_n(client, ref, names):
    r = client.completions.create(model="v1", prompt=[PROMPTS[0], TOK.encode(PROMPTS[2])], max_tokens=6,
                                  temperature=0.8, top_p=0.9, seed=11, n=2)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    for c in r.choices:
        p, j = [PROMPTS[0], PROMPTS[2]][c.index // 2], c.index % 2
        want = ref.generate("v1", TOK.encode(p), max_new_tokens=6, temperature=0.8, top_p=0.9, seed=11 + j)
        assert c.token_ids == want
    assert r.usage.prompt_tokens == len(PROMPTS[0]) + len(PROMPTS[2])
    assert r.usage.completion_tokens == sum(len(c.token_ids) for c in r.choices)


def test_raw_sse_stream_ends_with_done_and_carries_usage(server):
    body = {"model": "v2", "prompt": PROMPTS[1], "max_tokens": 8, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}, "ignore_eos": True}
    with httpx.stream("POST", server + "/v1/completions", json=body, timeout=30) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [x for x in r.iter_lines() if x]
    assert all(x.startswith("data: ") for x in lines)
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(x[6:]) for x in lines[:-1]]
    assert {c["object"] for c in chunks} == {"text_completion"} and len({c["id"] for c in chunks}) == 1
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 8
    assert all(c["usage"] is None for c in chunks[:-1])
    ids = [t for c in chunks[:-1] for t in c["choices"][0]["token_ids"]]
    assert len(ids) == 8 and chunks[-2]["choices"][0]["finish_reason"] == "length"
    full = httpx.post(server + "/v1/completions", json={**body, "stream": False, "stream_options": None}).json()
    assert full["choices"][0]["token_ids"] == ids
    assert full["choices"][0]["text"] == "".join(c["choices"][0]["text"] for c in chunks[:-1])


def test_chat_template_and_chat_stream(client, ref):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    prompt = oa.render_chat(msgs)
    assert prompt == "<|system|>\nBe brief.\n<|user|>\nHi\n<|assistant|>\n"   # the README's template
    stops = [TOK.encode(s) for s in oa.CHAT_STOPS]
    want = ref.submit("v1", TOK.encode(prompt), max_new_tokens=10, stop=stops).result(timeout=60)
    r = client.chat.completions.create(model="v1", messages=msgs, max_tokens=10, temperature=0)
    c = r.choices[0]
    assert r.object == "chat.completion" and c.message.role == "assistant"
    assert c.token_ids == want.tokens and c.finish_reason == want.finish_reason
    assert r.usage.prompt_tokens == len(TOK.encode(prompt))
    text, roles, ids = "", [], []
    for chunk in client.chat.completions.create(model="v1", messages=msgs, max_tokens=10, temperature=0,
                                                stream=True):
        assert chunk.object == "chat.completion.chunk"
        d = chunk.choices[0].delta
        roles += [d.role] if d.role else []
        text += d.content or ""
        ids += chunk.choices[0].token_ids
    assert roles == ["assistant"] and ids == want.tokens and text == c.message.content
    # content given as a list of text parts renders the same
    parts = [{"role": "system", "content": [{"type": "text", "text": "Be "}, {"type": "text", "text": "brief."}]},
             {"role": "user", "content": "Hi"}]
    assert client.chat.completions.create(model="v1", messages=parts, max_tokens=10, temperature=0) \
        .choices[0].token_ids == want.tokens


def test_stop_strings_cut_the_text(client, ref, names):
    for v in names:
        for p in PROMPTS:
            toks = ref.generate(v, TOK.encode(p), max_new_tokens=16, ignore_eos=True)
            k = next((i for i, t in enumerate(toks) if i > 0 and 32 < t < 127), None)
            if k is None:
                continue
            stop = chr(toks[k])
            r = client.completions.create(model=v, prompt=p, max_tokens=16, temperature=0, stop=[stop, "\x00zz"],
                                          extra_body={"ignore_eos": True})
            c = r.choices[0]
            assert c.finish_reason == "stop" and c.text == TOK.decode(toks[:k]) and stop not in c.text
            assert c.token_ids == toks[:k + 1]
            return
    pytest.fail("no greedy output with a printable character to stop at")


ERRORS = [  # (endpoint, body, status, param)
    ("completions", b'{"model": "base", "prompt": ', 400, None),
    ("completions", b'["not", "an", "object"]', 400, None),
    ("completions", {"prompt": "hi"}, 400, "model"),
    ("completions", {"model": "base"}, 400, "prompt"),
    ("completions", {"model": "base", "prompt": []}, 400, "prompt"),
    ("completions", {"model": "base", "prompt": [1, 2.5]}, 400, "prompt"),
    ("completions", {"model": "base", "prompt": "hi", "max_tokens": "ten"}, 400, "max_tokens"),
    ("completions", {"model": "base", "prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    ("completions", {"model": "base", "prompt": "hi", "temperature": -1}, 400, "temperature"),
    ("completions", {"model": "base", "prompt": "hi", "top_p": 0}, 400, "top_p"),
    ("completions", {"model": "base", "prompt": "hi", "n": 0}, 400, "n"),
    ("completions", {"model": "base", "prompt": "hi", "seed": -1}, 400, "seed"),
    ("completions", {"model": "base", "prompt": "hi", "stream": "yes"}, 400, "stream"),
    ("completions", {"model": "base", "prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ("completions", {"model": "base", "prompt": "hi", "logprobs": 21}, 400, "logprobs"),
    ("completions", {"model": "base", "prompt": "hi", "logit_bias": {"5": 1}}, 400, "logit_bias"),
    ("completions", {"model": "base", "prompt": "hi", "top_kk": 3}, 400, "top_kk"),
    ("completions", {"model": "base", "prompt": "hi", "stream_options": {"include_usage": True}}, 400,
     "stream_options"),
    ("completions", {"model": "base", "prompt": [1, TOK.vocab_size]}, 400, "prompt"),   # out of the vocabulary
    ("chat/completions", {"model": "base"}, 400, "messages"),
    ("chat/completions", {"model": "base", "messages": [{"role": "wizard", "content": "hi"}]}, 400,
     "messages[0].role"),
    ("chat/completions", {"model": "base", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
     400, "messages[0].content"),
    ("completions", {"model": "nope", "prompt": "hi"}, 404, "model"),
    ("chat/completions", {"model": "nope", "messages": [{"role": "user", "content": "hi"}]}, 404, "model"),
    # context overflow: 400 as OpenAI and vLLM answer it (code context_length_exceeded)
    ("completions", {"model": "base", "prompt": "a" * MAX_LEN}, 400, "prompt"),
    ("completions", {"model": "base", "prompt": [5] * (MAX_LEN - 10), "max_tokens": 11}, 400, "max_tokens"),
    ("chat/completions", {"model": "base", "messages": [{"role": "user", "content": "a" * MAX_LEN}]}, 400, "prompt"),
]


@pytest.mark.parametrize("endpoint,body,status,param", ERRORS, ids=[f"{e[2]}-{i}" for i, e in enumerate(ERRORS)])
def test_errors_are_openai_json_with_the_right_status(server, endpoint, body, status, param):
    kw = {"content": body} if isinstance(body, bytes) else {"json": body}
    r = httpx.post(f"{server}/v1/{endpoint}", headers={"content-type": "application/json"}, timeout=30, **kw)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["type"] == "invalid_request_error" and err["param"] == param
    overflow = isinstance(body, dict) and len(json.dumps(body)) > MAX_LEN
    assert (err["code"] == "context_length_exceeded") == overflow
    if overflow:   # the message carries the limits
        assert str(MAX_LEN) in err["message"]


def test_errors_through_the_openai_client_and_oversize_bodies(server, client):
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="hi")
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model="base", prompt="hi", temperature=3)
    r = httpx.post(server + "/v1/completions", content=b" " * (9 << 20), headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"


def _wait_until(cond, timeout=15.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return cond()


def test_client_disconnect_cancels_and_frees_the_slot(server):
    base = metric(server, "multimoe_requests_total", status="cancelled")
    body = {"model": "v2", "prompt": "long", "max_tokens": MAX_LEN - 10, "temperature": 0, "ignore_eos": True}
    with httpx.stream("POST", server + "/v1/completions", json={**body, "stream": True}, timeout=30) as r:
        it = r.iter_lines()
        got = [next(it) for _ in range(6)]
        assert sum(x.startswith("data: ") for x in got) >= 3
        assert metric(server, "multimoe_running_sequences") >= 1
    # the stream is closed mid-way: the request is cancelled and its KV slot freed, long before 2000 tokens
    assert _wait_until(lambda: metric(server, "multimoe_requests_total", status="cancelled") == base + 1)
    assert _wait_until(lambda: metric(server, "multimoe_running_sequences") == 0
                       and metric(server, "multimoe_kv_free_slots") == MAX_BATCH)
    # a non-streaming client that gives up cancels too
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server + "/v1/completions", json=body, timeout=httpx.Timeout(30, read=0.5))
    assert _wait_until(lambda: metric(server, "multimoe_requests_total", status="cancelled") == base + 2)
    assert _wait_until(lambda: metric(server, "multimoe_kv_free_slots") == MAX_BATCH)


def test_metrics_exposition(server, client, names):
    client.completions.create(model="base", prompt="metrics", max_tokens=3, temperature=0)
    m = metrics(server)
    fams = {n for n, _ in m}
    for name in ["multimoe_http_requests_total", "multimoe_requests_total", "multimoe_ttft_seconds_bucket",
                 "multimoe_ttft_seconds_sum", "multimoe_turnaround_seconds_count", "multimoe_running_sequences",
                 "multimoe_waiting_requests", "multimoe_kv_free_slots", "multimoe_weight_set_loads_total",
                 "multimoe_weight_set_evictions_total", "multimoe_device_bytes", "multimoe_prompt_tokens_total",
                 "multimoe_completion_tokens_total"]:
        assert name in fams, name
    assert metric(server, "multimoe_http_requests_total", endpoint="/v1/completions", model="base", status="200") >= 1
    assert metric(server, "multimoe_http_requests_total", endpoint="/v1/completions", status="404") >= 0
    assert metric(server, "multimoe_ttft_seconds_count", model="base") >= 1
    assert metric(server, "multimoe_turnaround_seconds_count", model="base") >= 1
    assert metric(server, "multimoe_device_bytes", kind="total_device") > 0
    # 3 variants over 2 resident sets: the partial reconfigurations show
    for v in names:
        client.completions.create(model=v, prompt="x", max_tokens=1)
    assert metric(server, "multimoe_weight_set_loads_total") >= 3
    assert metric(server, "multimoe_weight_set_evictions_total") >= 1


def test_burst_of_500_concurrent_requests_loses_none(server, names):
    n = 500

    async def burst():
        limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
        async with httpx.AsyncClient(base_url=server, limits=limits, timeout=120) as c:
            async def one(i):
                body = {"model": names[i % 2], "prompt": [2 + i % 50, 7], "max_tokens": 3, "temperature": 0,
                        "ignore_eos": True, "stream": i % 2 == 1}
                r = await c.post("/v1/completions", json=body)
                if body["stream"]:
                    lines = [x for x in r.text.split("\n") if x]
                    ok = lines[-1] == "data: [DONE]"
                    toks = [t for x in lines[:-1] for t in json.loads(x[6:])["choices"][0]["token_ids"]]
                else:
                    ok, toks = True, r.json()["choices"][0]["token_ids"]
                return r.status_code, ok, len(toks)
            t0 = time.perf_counter()
            out = await asyncio.gather(*(one(i) for i in range(n)))
            return out, time.perf_counter() - t0

    out, secs = asyncio.run(burst())
    assert out == [(200, True, 3)] * n
    print(f"\nburst: {n} concurrent requests in {secs:.2f} s ({n / secs:.0f} req/s), none lost")


def test_sigterm_drains_in_flight_requests(dirs):
    proc, url, _ = start_server(dirs[:2], "--drain-timeout", "30")
    try:
        body = {"model": "v1", "prompt": "drain", "max_tokens": 300, "temperature": 0, "ignore_eos": True,
                "stream": True}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
            it = r.iter_lines()
            first = next(x for x in it if x)
            proc.send_signal(signal.SIGTERM)
            rest = [x for x in it if x]
        lines = [first] + rest
        assert lines[-1] == "data: [DONE]"
        ids = [t for x in lines[:-1] for t in json.loads(x[6:])["choices"][0]["token_ids"]]
        assert len(ids) == 300
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


# ---------------------------------------------------------------------------------------------------
# in-process (httpx ASGI transport): backpressure, shutdown, token-id-only models
# ---------------------------------------------------------------------------------------------------
def test_full_queue_is_429_and_a_closed_engine_503(dirs):
    eng = Engine.from_pretrained(dirs[:2], max_seqs=1, max_len=MAX_LEN, max_queue=1)
    app = build_app(EngineBackend(eng, dirs[:2]))

    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            body = {"model": "v1", "prompt": [5, 6], "max_tokens": 4}
            running = eng.submit("v1", [5], max_new_tokens=MAX_LEN - 5, ignore_eos=True)
            while eng.load()["running"] == 0:
                await asyncio.sleep(0.01)
            queued = eng.submit("v1", [5], max_new_tokens=4)
            r = await c.post("/v1/completions", json=body)
            assert r.status_code == 429 and r.headers["retry-after"] == "1"
            assert r.json()["error"]["type"] == "rate_limit_error" and r.json()["error"]["code"] == "queue_full"
            running.cancel()
            queued.result(timeout=60)
            r = await c.post("/v1/completions", json=body)
            assert r.status_code == 200 and len(r.json()["choices"][0]["token_ids"]) >= 1
            eng.shutdown()
            r = await c.post("/v1/completions", json=body)
            assert r.status_code == 503 and r.json()["error"]["code"] == "shutting_down"
            text = (await c.get("/metrics")).text
            assert 'multimoe_http_requests_total{endpoint="/v1/completions",model="v1",status="429"} 1.0' in text

    try:
        asyncio.run(go())
    finally:
        eng.shutdown()


def test_token_id_only_models(tmp_path):
    dirs = save_variants(tmp_path, "mixtral", n=2)   # vocab 64, no tokenizer file
    eng = Engine.from_pretrained(dirs, max_seqs=4, max_len=64)
    app = build_app(EngineBackend(eng, dirs))
    name = dirs[1].name

    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            r = await c.post("/v1/completions", json={"model": name, "prompt": "text", "max_tokens": 2})
            assert r.status_code == 400 and r.json()["error"]["code"] == "no_tokenizer"
            r = await c.post("/v1/chat/completions", json={"model": name, "messages": [{"role": "user",
                                                                                         "content": "hi"}]})
            assert r.status_code == 400 and r.json()["error"]["code"] == "no_tokenizer"
            r = await c.post("/v1/completions", json={"model": name, "prompt": [3, 64], "max_tokens": 2})
            assert r.status_code == 400 and "[0, 64)" in r.json()["error"]["message"]
            r = await c.post("/v1/completions", json={"model": name, "prompt": [3, 9, 27], "max_tokens": 5,
                                                      "temperature": 0, "ignore_eos": True})
            assert r.status_code == 200
            c0 = r.json()["choices"][0]
            assert c0["text"] == "" and c0["token_ids"] == eng.generate(name, [3, 9, 27], max_new_tokens=5,
                                                                         ignore_eos=True)

    try:
        asyncio.run(go())
    finally:
        eng.shutdown()


def test_stream_interval_sends_fewer_larger_chunks(tmp_path):
    dirs = save_variants(tmp_path, "mixtral", n=2)
    eng = Engine.from_pretrained(dirs, max_seqs=4, max_len=64)
    app = build_app(EngineBackend(eng, dirs), stream_interval=4)
    name = dirs[1].name

    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            body = {"model": name, "prompt": [3, 9, 27], "max_tokens": 10, "temperature": 0, "ignore_eos": True}
            r = await c.post("/v1/completions", json={**body, "stream": True})
            lines = [x for x in r.text.split("\n") if x]
            assert lines[-1] == "data: [DONE]"
            chunks = [json.loads(x[6:])["choices"][0] for x in lines[:-1]]
            assert [len(ch["token_ids"]) for ch in chunks] == [1, 4, 4, 1]   # the first token at once
            assert [ch["finish_reason"] for ch in chunks] == [None, None, None, "length"]
            full = (await c.post("/v1/completions", json=body)).json()["choices"][0]["token_ids"]
            assert [t for ch in chunks for t in ch["token_ids"]] == full

    try:
        asyncio.run(go())
    finally:
        eng.shutdown()


# ---------------------------------------------------------------------------------------------------
# pure parts: text stream, parsing, variant groups and the replica protocol (no web server, no Ray)
# ---------------------------------------------------------------------------------------------------
def test_text_stream_holds_back_possible_stops_and_partial_characters():
    ts = oa.TextStream(oa.ByteCodec(TOK), ["END", "\n\n"])
    out = "".join(ts.push(t) for t in TOK.encode("héllo E"))
    assert out == "héllo"[:len(out)] and len(out) <= len("héllo")   # " E" may start "END": held back
    out += "".join(ts.push(t) for t in TOK.encode("NDING"))
    assert ts.stopped and out == "héllo " and ts.push(65) == "" and ts.flush() == ""
    ts = oa.TextStream(oa.ByteCodec(TOK))
    pieces = [ts.push(t) for t in "é!".encode()]
    assert pieces == ["", "é", "!"] and ts.flush() == ""     # never half a character
    ts = oa.TextStream(oa.ByteCodec(TOK), ["zz"])
    assert "".join(ts.push(t) for t in TOK.encode("abz")) + ts.flush() == "abz"


def test_parsing_defaults_and_neutral_fields():
    r = oa.parse_completion({"model": "m", "prompt": ["a", [1, 2]], "logprobs": None, "echo": False,
                             "frequency_penalty": 0, "stop": "x", "max_tokens": 5, "logit_bias": {}})
    assert r.prompts == ["a", [1, 2]] and r.stop == ["x"] and r.n == 1 and r.logprobs is None
    assert (r.sampling["temperature"], r.sampling["top_p"], r.sampling["top_k"]) == (1.0, 1.0, 0)
    assert oa.parse_completion({"model": "m", "prompt": "a", "top_k": -1}).sampling["top_k"] == 0   # vLLM's "off"
    r = oa.parse_chat({"model": "m", "messages": [{"role": "user", "content": None}], "max_completion_tokens": 7})
    assert r.messages == [{"role": "user", "content": ""}] and r.max_tokens == 7
    with pytest.raises(oa.APIError) as e:
        oa.parse_completion({"model": "m", "prompt": "a", "n": 100, "max_tokens": 1} | {"prompt": ["a", "b"]})
    assert e.value.status == 400 and e.value.param == "n"


def test_cli_serve_options():
    from multimoe_rt.cli import build_parser

    a = build_parser().parse_args(["serve", "zoo/base", "zoo/ptb", "--share", "0.5", "--port", "0", "--max-batch", "8",
                                   "--max-queue", "10", "--stream-interval", "2"])
    assert (a.variant_dirs, a.share, a.port, a.max_batch, a.max_queue, a.stream_interval) == \
        (["zoo/base", "zoo/ptb"], 0.5, 0, 8, 10, 2)
    assert a.func.__name__ == "cmd_serve"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "d", "--share", "0.5", "--budget", "1MiB"])   # one of plan/share/budget


def test_variant_groups_route_each_variant_to_a_group_that_holds_it():
    g = VariantGroups.parse(["/z/base,/z/ptb", "/z/base,/z/code", "/z/base2,/z/math"])
    assert g.names == ["base", "ptb", "code", "base2", "math"]
    assert list(g.groups) == ["base+ptb", "base+code", "base2+math"]
    for v in g.names:
        assert v in g.group_names[g.route(v)]
    assert g.route("code") == "base+code" and g.route("base") == "base+ptb"
    assert g.parents == {"base": None, "ptb": "base", "code": "base", "base2": None, "math": "base2"}
    assert VariantGroups.from_dict(g.to_dict()).groups == g.groups
    with pytest.raises(RequestError):
        g.route("nope")
    with pytest.raises(ValueError):
        VariantGroups([["/a/x", "/b/x"]])


def test_remote_job_protocol():
    for e in (QueueFull("q"), EngineClosed("c"), RequestError("r"), RuntimeError("x")):
        back = decode_error(encode_error(e))
        assert type(back) is type(e) and str(back) == str(e)

    async def stream(items):
        for x in items:
            yield x

    async def go():
        cancelled = []
        job = await RemoteJob(stream([{"accepted": True, "replica": "r1", "group": "a+b"}, 4, 5,
                                      {"finish_reason": "length"}]), cancel=lambda: cancelled.append(1)).start()
        assert job.headers == {"x-multimoe-replica": "r1", "x-multimoe-group": "a+b"}
        assert [t async for t in job] == [4, 5] and job.finish_reason == "length"
        job.cancel()
        assert cancelled == []            # finished: nothing to cancel
        with pytest.raises(QueueFull):
            await RemoteJob(stream([encode_error(QueueFull("full"))])).start()

    asyncio.run(go())
