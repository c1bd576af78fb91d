"""The HTTP server as OpenAI and vLLM clients use it (issue 25), against a real uvicorn process: every sampling
field honoured (the server's tokens equal the engine's for the same SamplingParams) or refused with a 400 naming
it, a raw-body fuzz that must only ever get 4xx on a connection that stays usable, refusals with clear statuses,
streaming cost counted per token, slow clients dropped, the drain clock, the port check."""

import http.client
import json
import random
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

pytest.importorskip("fastapi", reason="the HTTP server needs fastapi (the 'serve' extra)")
pytest.importorskip("uvicorn", reason="the HTTP server needs uvicorn (the 'serve' extra)")
openai = pytest.importorskip("openai", reason="the client-side checks use the official openai client")
import httpx  # noqa: E402

from multimoe_rt.engine import Engine  # noqa: E402
# ref and client are test_server's fixtures, over this module's dirs and server
from test_server import MAX_LEN, TOK, client, metric, ref, save_text_variants, start_server, stop_server  # noqa: E402,F401

QUEUE = 64


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    return save_text_variants(tmp_path_factory.mktemp("proto"), n=2)


@pytest.fixture(scope="module")
def server(dirs):
    """One server for the module; small slow-client limits so those tests need no server of their own."""
    proc, url, log = start_server(dirs, "--max-queue", str(QUEUE), "--header-timeout", "1", "--keep-alive-timeout",
                                  "1", "--body-timeout", "2", "--max-connections", "12")
    yield url
    stop_server(proc)


def hostport(url):
    host, port = url.removeprefix("http://").rsplit(":", 1)
    return host, int(port)


PROMPT = "The quick brown fox"


# ---------------------------------------------------------------------------------------------------
# every field honoured: the server's tokens are the engine's for the same SamplingParams
# ---------------------------------------------------------------------------------------------------
FIELDS = [  # (request fields, the same as SamplingParams fields)
    ({"temperature": 0.9, "seed": 3, "top_k": 5}, {"temperature": 0.9, "seed": 3, "top_k": 5}),
    ({"temperature": 0.9, "seed": 4, "top_k": -1}, {"temperature": 0.9, "seed": 4}),
    ({"temperature": 1.5, "seed": 5, "min_p": 0.2}, {"temperature": 1.5, "seed": 5, "min_p": 0.2}),
    ({"temperature": 1.0, "seed": 6, "top_p": 0.5}, {"temperature": 1.0, "seed": 6, "top_p": 0.5}),
    ({"temperature": 0, "repetition_penalty": 3.0}, {"repetition_penalty": 3.0}),
    ({"temperature": 0, "presence_penalty": 2.0}, {"presence_penalty": 2.0}),
    ({"temperature": 0, "frequency_penalty": 2.0}, {"frequency_penalty": 2.0}),
    ({"temperature": 0, "min_tokens": 10}, {"min_tokens": 10}),
    ({"temperature": 0, "ignore_eos": True}, {"ignore_eos": True}),
]


@pytest.mark.parametrize("api,eng", FIELDS, ids=[next(iter(set(a) - {"temperature", "seed"}), "temperature")
                                                 for a, _ in FIELDS])
def test_sampling_fields_reach_the_engine(client, ref, api, eng):
    r = client.completions.create(model="v1", prompt=PROMPT, max_tokens=12, extra_body=api)
    want = ref.submit("v1", TOK.encode(PROMPT), max_new_tokens=12, **{"temperature": 0.0, **eng}).result(timeout=60)
    assert r.choices[0].token_ids == want.tokens and r.choices[0].finish_reason == want.finish_reason


def test_penalties_change_the_output(ref):
    """The fields above are not no-ops on this model: each changes greedy output against the plain one."""
    plain = ref.generate("v1", TOK.encode(PROMPT), max_new_tokens=24, ignore_eos=True)
    for kw in ({"repetition_penalty": 3.0}, {"frequency_penalty": 2.0}):
        assert ref.generate("v1", TOK.encode(PROMPT), max_new_tokens=24, ignore_eos=True, **kw) != plain, kw


def test_stop_token_ids_max_completion_tokens_and_chat(client, ref):
    toks = ref.generate("v1", TOK.encode(PROMPT), max_new_tokens=12, ignore_eos=True)
    stop_id = toks[5]
    r = client.completions.create(model="v1", prompt=PROMPT, temperature=0, extra_body={
        "stop_token_ids": [stop_id], "ignore_eos": True, "max_completion_tokens": 12})
    c = r.choices[0]
    assert c.token_ids == toks[:toks.index(stop_id) + 1] and c.finish_reason == "stop"
    r = client.completions.create(model="v1", prompt=PROMPT, temperature=0, extra_body={
        "max_completion_tokens": 4, "ignore_eos": True})
    assert r.choices[0].token_ids == toks[:4] and r.choices[0].finish_reason == "length"
    msgs = [{"role": "user", "content": "Hi"}]
    r = client.chat.completions.create(model="v1", messages=msgs, temperature=0, max_completion_tokens=3,
                                       extra_body={"top_k": 1, "min_tokens": 3, "user": "u1"}, user="u1")
    assert len(r.choices[0].token_ids) == 3 and r.usage.completion_tokens == 3


def test_logprobs_completions_and_chat_equal_the_engine(client, ref, server):
    want = ref.submit("v1", TOK.encode(PROMPT), max_new_tokens=6, logprobs=3, ignore_eos=True).result(timeout=60)
    r = client.completions.create(model="v1", prompt=PROMPT, max_tokens=6, temperature=0, logprobs=3,
                                  extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    assert r.choices[0].token_ids == want.tokens
    assert lp.token_logprobs == pytest.approx([x for x, _ in want.logprobs], abs=1e-5)
    assert lp.tokens == [TOK.decode([t]) if t < 128 else f"bytes:\\x{t:02x}" for t in want.tokens]
    for top, (_, alts) in zip(lp.top_logprobs, want.logprobs):
        assert len(top) <= 3 and list(top.values()) == pytest.approx([a for _, a in alts][:len(top)], abs=1e-5)
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
    # streamed: the chunks' logprobs put together are the same
    body = {"model": "v1", "prompt": PROMPT, "max_tokens": 6, "temperature": 0, "logprobs": 3, "stream": True,
            "ignore_eos": True}
    with httpx.stream("POST", server + "/v1/completions", json=body, timeout=30) as s:
        chunks = [json.loads(x[6:]) for x in s.iter_lines() if x.startswith("data: {")]
    got = [v for ch in chunks for v in ch["choices"][0]["logprobs"]["token_logprobs"]]
    assert got == pytest.approx(lp.token_logprobs, abs=1e-6)
    # chat: logprobs + top_logprobs
    msgs = [{"role": "user", "content": "Hi"}]
    r = client.chat.completions.create(model="v1", messages=msgs, max_tokens=4, temperature=0, logprobs=True,
                                       top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert len(content) == len(r.choices[0].token_ids) and all(len(x.top_logprobs) == 2 for x in content)
    assert all(x.bytes is not None and x.logprob <= 0 for x in content)
    r = client.chat.completions.create(model="v1", messages=msgs, max_tokens=4, temperature=0)
    assert r.choices[0].logprobs is None


def test_echo(client, server, ref):
    want = ref.generate("v1", TOK.encode(PROMPT), max_new_tokens=5, ignore_eos=True)
    r = client.completions.create(model="v1", prompt=PROMPT, max_tokens=5, temperature=0, echo=True,
                                  extra_body={"ignore_eos": True})
    assert r.choices[0].text == PROMPT + TOK.decode(want) and r.choices[0].token_ids == want
    body = {"model": "v1", "prompt": TOK.encode(PROMPT), "max_tokens": 5, "temperature": 0, "echo": True,
            "stream": True, "ignore_eos": True}
    with httpx.stream("POST", server + "/v1/completions", json=body, timeout=30) as s:
        chunks = [json.loads(x[6:]) for x in s.iter_lines() if x.startswith("data: {")]
    assert "".join(ch["choices"][0]["text"] for ch in chunks) == PROMPT + TOK.decode(want)


REFUSED = [  # (endpoint, body fields, the param the 400 names)
    ("completions", {"logit_bias": {"5": 10}}, "logit_bias"),
    ("completions", {"suffix": "x"}, "suffix"),
    ("completions", {"best_of": 2}, "best_of"),
    ("completions", {"frobnicate": 1}, "frobnicate"),
    ("completions", {"echo": True, "logprobs": 1}, "echo"),
    ("completions", {"logprobs": True}, "logprobs"),
    ("completions", {"top_k": -2}, "top_k"),
    ("completions", {"min_p": 1.5}, "min_p"),
    ("completions", {"repetition_penalty": 0}, "repetition_penalty"),
    ("completions", {"presence_penalty": 3}, "presence_penalty"),
    ("completions", {"frequency_penalty": -2.5}, "frequency_penalty"),
    ("completions", {"min_tokens": 20, "max_tokens": 5}, "min_tokens"),
    ("completions", {"min_tokens": 20}, "min_tokens"),            # over the default max_tokens (16)
    ("completions", {"stop_token_ids": [-1]}, "stop_token_ids"),
    ("completions", {"stop_token_ids": [TOK.vocab_size]}, "stop_token_ids"),
    ("completions", {"max_tokens": 5, "max_completion_tokens": 6}, "max_completion_tokens"),
    ("completions", {"n": QUEUE + 1}, "n"),                        # more choices than the queue holds
    ("completions", {"user": 5}, "user"),
    ("completions", {"stream_options": {"include_usage": True, "x": 1}, "stream": True}, "stream_options.x"),
    ("chat/completions", {"tools": [{"type": "function"}]}, "tools"),
    ("chat/completions", {"response_format": {"type": "json_object"}}, "response_format"),
    ("chat/completions", {"top_logprobs": 2}, "top_logprobs"),
    ("chat/completions", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("chat/completions", {"logprobs": 3}, "logprobs"),
    ("chat/completions", {"echo": True}, "echo"),
    ("chat/completions", {"messages": [{"role": "user", "content": "hi", "name": "x"}]}, "messages[0].name"),
]


@pytest.mark.parametrize("endpoint,fields,param", REFUSED, ids=[f"{e}-{p}" for e, _, p in REFUSED])
def test_unsupported_values_and_unknown_fields_are_400_naming_the_field(server, endpoint, fields, param):
    base = {"model": "v1", "prompt": "hi"} if endpoint == "completions" else \
        {"model": "v1", "messages": [{"role": "user", "content": "hi"}]}
    r = httpx.post(f"{server}/v1/{endpoint}", json={**base, **fields}, timeout=30)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error" and err["message"]


def test_context_overflow_is_400_with_the_limits(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="v1", prompt=[5] * 2000, max_tokens=100)
    msg = e.value.body["message"] if isinstance(e.value.body, dict) else str(e.value)
    assert e.value.status_code == 400 and "2048" in msg and "2000" in msg and "100" in msg


# ---------------------------------------------------------------------------------------------------
# malformed bodies: only 4xx, on a connection that stays usable
# ---------------------------------------------------------------------------------------------------
def _malformed_bodies() -> list[bytes]:
    rng = random.Random(25)
    good = {"model": "v1", "prompt": "hi", "max_tokens": 2}
    out = [
        b"", b"{", b"}", b"null", b"[]", b"1", b'"x"', b"true", b"\xff\xfe\x00", b"\xc3\x28", b"{\"model\": \"v1\"",
        b"[" * 50000 + b"]" * 50000, b"{\"a\":" * 50000 + b"1" + b"}" * 50000,
        b'{"model": "v1", "prompt": "hi", "max_tokens": ' + b"9" * 5000 + b"}",
        b'{"model": "v1", "prompt": "hi", "temperature": 1' + b"0" * 400 + b"}",
        b'{"model": "v1", "prompt": "hi", "top_p": 0.' + b"1" * 400 + b"}",
        b'{"model": "v1", "prompt": "hi", "temperature": 1e400}',
        b'{"model": "v1", "prompt": "hi", "temperature": NaN}',
        b'{"model": "v1", "prompt": "hi", "seed": -Infinity}',
        b'{"model": "v1", "prompt": "\\ud800"}', b'{"model": "v1", "prompt": "a\\udfffb"}',
        b'{"model": "v1", "prompt": "hi", "stop": ["\\ud83d"]}',
        b'{"model": "v1", "messages": [{"role": "user", "content": "\\udc00"}]}',
        b'{"model": "\\ud800", "prompt": "hi"}', b'{"\\ud800": 1, "model": "v1", "prompt": "hi"}',
        b'{"model": "v1", "prompt": [' + b"9" * 60 + b"]}",
    ]
    nums = [True, "1", [], {}, [[[]]], -1e308, 10**30]   # wrong type or far out of range for every number field
    bad = {  # values that no field of that name accepts
        "model": [None, 5, [], {"a": 1}, ""], "prompt": [None, 5, [], [None], [1, "a"], ["a", 1.5], [[]], [-1]],
        "max_tokens": [0, -1, 1.5] + nums, "temperature": [-0.1, 2.5] + nums, "top_p": [0, 1.01] + nums,
        "n": [0, 1.0, 129] + nums, "stop": [5, [""], ["a"] * 5, [1], {}], "seed": [-1, 2**63, 0.5] + nums,
        "stream": [1, "true", []], "logprobs": [-1, 21, True, 1.5], "top_k": [-2, 1.5] + nums[:-1],   # a huge top_k is valid (off)
        "min_p": [-0.1, 1.1] + nums, "stop_token_ids": [5, [-1], [1.5], ["a"], [None]],
        "stream_options": [5, [], {"x": 1}, {"include_usage": 1}], "echo": [1, "yes"],
        "min_tokens": [-1, 1.5, 17] + nums, "repetition_penalty": [0, -1] + nums,
        "ignore_eos": [0, "no"], "presence_penalty": [2.5, -3] + nums, "user": [5, [], {}],
        "logit_bias": [{"1": 5}, [1], 3], "best_of": [2, "a"], "tools": [[{}]], "unknown_field": [1, None, "x"],
    }
    for k, vs in bad.items():
        for v in vs:
            out.append(json.dumps({**good, k: v}).encode())
    keys = sorted(bad)
    while len(out) < 220:   # two bad fields at once
        k1, k2 = rng.sample(keys, 2)
        out.append(json.dumps({**good, k1: rng.choice(bad[k1]), k2: rng.choice(bad[k2])}).encode())
    return out


def test_fuzz_malformed_bodies_get_4xx_and_the_connection_survives(server, ref):
    bodies = _malformed_bodies()
    assert len(bodies) >= 100
    host, port = hostport(server)
    conn = http.client.HTTPConnection(host, port, timeout=30)
    conn.connect()
    sock = conn.sock
    statuses = []
    for raw in bodies:
        for path in ("/v1/completions", "/v1/chat/completions"):
            conn.request("POST", path, body=raw, headers={"content-type": "application/json"})
            r = conn.getresponse()
            data = r.read()
            statuses.append(r.status)
            assert 400 <= r.status < 500, (raw[:200], r.status, data[:300])
            err = json.loads(data)["error"]
            assert set(err) == {"message", "type", "param", "code"} and err["message"]
            assert not r.will_close and conn.sock is sock, "the server dropped the connection"
    # the same connection still serves a correct request correctly
    conn.request("POST", "/v1/completions", body=json.dumps({"model": "v1", "prompt": PROMPT, "max_tokens": 5,
                                                             "temperature": 0}),
                 headers={"content-type": "application/json"})
    r = conn.getresponse()
    assert r.status == 200 and conn.sock is sock
    assert json.loads(r.read())["choices"][0]["token_ids"] == ref.generate("v1", TOK.encode(PROMPT), max_new_tokens=5)
    conn.close()
    assert metric(server, "multimoe_http_requests_total", status="500") == 0


@pytest.mark.parametrize("raw,param", [
    (b'{"model": "v1", "prompt": "hi", "max_tokens": ' + b"1" * 5000 + b"}", "max_tokens"),
    (b'{"model": "v1", "prompt": "hi", "temperature": 1' + b"0" * 400 + b"}", "temperature"),
    (b'{"model": "v1", "prompt": "hi", "top_p": 1' + b"0" * 400 + b".5}", "top_p"),
    (b'{"model": "v1", "prompt": "a\\ud800"}', "prompt"),
    (b'{"model": "v1", "prompt": "hi", "stop": ["x", "\\udfff"]}', "stop[1]"),
    (b'{"model": "v1", "messages": [{"role": "user", "content": "\\ud800"}]}', "messages[0].content"),
    (b"[" * 50000 + b"]" * 50000, None),
])
def test_the_reported_500s_are_named_400s(server, raw, param):
    path = "/v1/chat/completions" if b"messages" in raw else "/v1/completions"
    r = httpx.post(server + path, content=raw, headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


# ---------------------------------------------------------------------------------------------------
# counts, model cards, streaming cost, large prompts
# ---------------------------------------------------------------------------------------------------
def test_prompt_tokens_are_counted_once_per_request(server, client):
    before = metric(server, "multimoe_prompt_tokens_total", model="v1")
    r = client.completions.create(model="v1", prompt="0123456789", max_tokens=2, n=3)
    assert r.usage.prompt_tokens == 10
    assert metric(server, "multimoe_prompt_tokens_total", model="v1") - before == 10


def test_streaming_detokenizes_each_token_once(server):
    """The detokenizer's work per generated token is the same for 256 and 2,000 tokens (it was the whole output
    per token: quadratic). Counted by the server, not timed."""
    def stream(n):
        before = (metric(server, "multimoe_detokenized_tokens_total", model="v1"),
                  metric(server, "multimoe_completion_tokens_total", model="v1"))
        body = {"model": "v1", "prompt": "x", "max_tokens": n, "temperature": 0, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", server + "/v1/completions", json=body, timeout=120) as r:
            lines = [x for x in r.iter_lines() if x]
        assert lines[-1] == "data: [DONE]"
        work = metric(server, "multimoe_detokenized_tokens_total", model="v1") - before[0]
        toks = metric(server, "multimoe_completion_tokens_total", model="v1") - before[1]
        assert toks == n
        return work / toks

    assert stream(256) == stream(2000) == 1.0


def test_a_large_prompt_does_not_stop_a_running_stream(server):
    """An 7 MB prompt (over the context: a 400) while a stream runs: the stream finishes whole and the big body
    gets its 400. Its parse and tokenization ran in a worker thread (checked in-process below)."""
    body = {"model": "v1", "prompt": "x", "max_tokens": 300, "temperature": 0, "ignore_eos": True, "stream": True}
    result = {}

    def big():
        result["r"] = httpx.post(server + "/v1/completions", timeout=60,
                                 json={"model": "v1", "prompt": "y" * (7 << 20), "max_tokens": 1})

    with httpx.stream("POST", server + "/v1/completions", json=body, timeout=60) as r:
        it = r.iter_lines()
        first = next(x for x in it if x)
        t = threading.Thread(target=big)
        t.start()
        rest = [x for x in it if x]
        t.join(60)
    ids = [tok for x in [first] + rest[:-1] for tok in json.loads(x[6:])["choices"][0]["token_ids"]]
    assert rest[-1] == "data: [DONE]" and len(ids) == 300
    assert result["r"].status_code == 400 and result["r"].json()["error"]["code"] == "context_length_exceeded"


def test_large_prompts_are_tokenized_off_the_event_loop(dirs):
    import asyncio

    from multimoe_rt.integrations import openai_api as oa
    from multimoe_rt.integrations.server import OFFLOAD_BYTES, EngineBackend, build_app

    seen = []

    class Recording(oa.ByteCodec):
        def encode(self, text, special=True):
            seen.append((len(text), threading.get_ident()))
            return super().encode(text, special)

    eng = Engine.from_pretrained(dirs, max_seqs=2, max_len=MAX_LEN)
    codec = Recording(TOK)
    app = build_app(EngineBackend(eng, dirs, codecs={n: codec for n in eng.names}))

    async def go():
        loop_thread = threading.get_ident()
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            await c.post("/v1/completions", json={"model": "v1", "prompt": "small", "max_tokens": 1})
            r = await c.post("/v1/completions", json={"model": "v1", "prompt": "z" * OFFLOAD_BYTES, "max_tokens": 1})
            assert r.status_code == 400
        return loop_thread

    try:
        loop_thread = asyncio.run(go())
    finally:
        eng.shutdown()
    (small, t_small), (large, t_large) = seen
    assert small == 5 and t_small == loop_thread
    assert large == OFFLOAD_BYTES and t_large != loop_thread


def test_health_is_503_with_the_reason_when_the_engine_died(dirs):
    import asyncio

    from multimoe_rt.integrations.server import EngineBackend, build_app

    eng = Engine.from_pretrained(dirs[:1], max_seqs=1, max_len=64)
    app = build_app(EngineBackend(eng, dirs[:1]))

    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            assert (await c.get("/health")).status_code == 200
            eng.health = lambda: (False, "engine loop died: boom")
            r = await c.get("/health")
            assert r.status_code == 503 and r.json()["reason"] == "engine loop died: boom"

    try:
        asyncio.run(go())
    finally:
        eng.shutdown()


# ---------------------------------------------------------------------------------------------------
# slow clients (the module's server runs with --header-timeout 1 --keep-alive-timeout 1 --body-timeout 2
# --max-connections 12)
# ---------------------------------------------------------------------------------------------------
def _closed_within(sock, seconds) -> bytes:
    """What the server sends before closing; fails if it is still open after ``seconds`` (a bound, not a
    measurement: the server's timeouts are 1-2 s)."""
    sock.settimeout(seconds)
    got = b""
    while True:
        try:
            part = sock.recv(4096)
        except socket.timeout:
            pytest.fail(f"the server kept the connection open for {seconds} s; got {got[:200]!r}")
        if not part:
            return got
        got += part


def test_slow_headers_are_dropped(server):
    host, port = hostport(server)
    with socket.create_connection((host, port)) as s:
        stop = threading.Event()

        def trickle():   # one byte every 0.2 s, never finishing the head
            for b in b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 1000:
                if stop.wait(0.2):
                    return
                try:
                    s.send(bytes([b]))
                except OSError:
                    return

        t = threading.Thread(target=trickle, daemon=True)
        t.start()
        got = _closed_within(s, 20)
        stop.set()
    assert got.startswith(b"HTTP/1.1 408")
    # a connection that never sends anything is dropped too
    with socket.create_connection((host, port)) as s:
        _closed_within(s, 20)


def test_idle_keep_alive_and_slow_bodies_are_dropped(server):
    host, port = hostport(server)
    with socket.create_connection((host, port)) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        got = _closed_within(s, 20)   # answered, then closed once idle for the keep-alive timeout
    assert got.startswith(b"HTTP/1.1 200")
    with socket.create_connection((host, port)) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 1000\r\n\r\n{\"model\": ")
        got = _closed_within(s, 20)
    assert got.startswith(b"HTTP/1.1 408") and b"request_timeout" in got


def test_connection_limit_answers_503(server):
    host, port = hostport(server)
    socks = []
    try:
        for _ in range(14):   # connections each holding a request in progress (its body not sent: 2 s allowed)
            s = socket.create_connection((host, port))
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n")
            socks.append(s)
            time.sleep(0.02)   # one at a time, so the server has registered each before the next
        r = httpx.get(server + "/health", timeout=10)
        assert r.status_code == 503
    finally:
        for s in socks:
            s.close()
    deadline = time.time() + 20   # the server sees the closes; then it serves again
    while httpx.get(server + "/health", timeout=10).status_code != 200:
        assert time.time() < deadline, "still refusing after the connections closed"
        time.sleep(0.1)


# ---------------------------------------------------------------------------------------------------
# port in use, drain expiry
# ---------------------------------------------------------------------------------------------------
def test_port_in_use_is_one_line_before_loading(server, dirs):
    host, port = hostport(server)
    p = subprocess.run([sys.executable, "-m", "multimoe_rt.integrations.server_args", *map(str, dirs), "--host", host,
                        "--port", str(port)], capture_output=True, text=True, timeout=60, cwd=dirs[0].parent)
    assert p.returncode == 1
    lines = [x for x in p.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and "in use" in lines[0] and str(port) in lines[0], p.stderr
    assert "loaded" not in p.stderr and "variants" not in p.stderr


def test_drain_expiry_ends_streams_with_an_error_and_503s_the_rest(dirs):
    proc, url, _ = start_server(dirs[:2], "--drain-timeout", "1", "--max-batch", "1")
    try:
        long = {"model": "v1", "prompt": "drain", "max_tokens": 2000, "temperature": 0, "ignore_eos": True}
        queued = {}

        def waiting():   # behind the running stream (max batch 1): not started when the drain expires
            queued["r"] = httpx.post(url + "/v1/completions", json={**long, "max_tokens": 5}, timeout=60)

        with httpx.stream("POST", url + "/v1/completions", json={**long, "stream": True}, timeout=60) as r:
            it = r.iter_lines()
            first = next(x for x in it if x)
            t = threading.Thread(target=waiting)
            t.start()
            deadline = time.time() + 30
            while metric(url, "multimoe_waiting_requests") < 1 and time.time() < deadline:
                time.sleep(0.05)
            proc.send_signal(signal.SIGTERM)
            rest = [x for x in it if x]
            t.join(60)
        assert first.startswith("data: {") and rest[-1] == "data: [DONE]"
        err = json.loads(rest[-2][6:])
        assert err["error"]["code"] == "drain_timeout"
        ids = [tok for x in [first] + rest[:-2] for tok in json.loads(x[6:])["choices"][0]["token_ids"]]
        assert 0 < len(ids) < 2000
        assert queued["r"].status_code == 503 and queued["r"].json()["error"]["code"] == "drain_timeout"
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
