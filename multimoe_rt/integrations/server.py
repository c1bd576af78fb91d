"""OpenAI-compatible HTTP server over the continuous-batching engine: one model per variant.

    multimoe-rt serve zoo/base zoo/ptb zoo/pycode --share 0.5 --port 8000

Endpoints: ``GET /v1/models`` (each variant: ``root`` is its name, ``parent`` its base), ``GET /v1/models/{id}``,
``POST /v1/completions``, ``POST /v1/chat/completions`` (both with ``stream``: server-sent events ending in
``data: [DONE]``), ``GET /health`` (503 with the reason when the engine loop died or the server drains),
``GET /metrics`` (Prometheus).

Errors are OpenAI-style JSON ``{"error": {"message", "type", "param", "code"}}``: 400 for any malformed body or
field (``param`` names it; unknown fields, unsupported values, a prompt plus ``max_tokens`` over the context,
``n`` over the queue size), 404 unknown model, 408 a body that does not arrive within ``body_timeout``, 413 a
body over ``max_body_bytes``, 429 queue full (with Retry-After), 503 shutting down. A client that disconnects
cancels its request (the engine frees the sequence's KV-cache row at its next step). SIGTERM stops accepting and
lets in-flight requests finish within ``drain_timeout``; when it expires, each open stream ends with an error
event and ``data: [DONE]`` and each waiting non-streamed request gets a 503.

The app talks to a *backend*: ``EngineBackend`` (an in-process ``Engine``) here, ``RayBackend`` in
``ray_serve.py`` (replicas holding variant groups). Both give the same routes, bodies and errors.
"""

from __future__ import annotations

try:
    import prometheus_client
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, Response, StreamingResponse
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError(f"multimoe_rt.integrations.server needs the 'serve' extra ({e.name} is missing): "
                      "pip install 'multimoe_rt[serve]'  (fastapi, uvicorn, prometheus-client)") from e

import asyncio
import contextlib
import json
import logging
import re
import time

from ..engine import QueueFull
from ..errors import EngineClosed, EngineDead, RequestError
from . import openai_api as oa
from .metrics import Metrics
from .openai_api import APIError

log = logging.getLogger(__name__)
_DONE = object()
_EXPIRED = object()
OFFLOAD_BYTES = 64 << 10   # bodies at least this large are parsed and tokenized in a worker thread

# engine field -> the request field a client sent, to name it in a 400 built from an engine RequestError
_FIELD_OF = {"max_new_tokens": "max_tokens", "temperature": "temperature", "top_p": "top_p", "top_k": "top_k",
             "min_p": "min_p", "repetition_penalty": "repetition_penalty", "presence_penalty": "presence_penalty",
             "frequency_penalty": "frequency_penalty", "min_tokens": "min_tokens", "stop_token_ids": "stop_token_ids",
             "stop": "stop", "seed": "seed", "logprobs": "logprobs", "ignore_eos": "ignore_eos", "prompt": "prompt"}


def _param_of(message: str) -> str | None:
    m = re.search(r"\b(" + "|".join(_FIELD_OF) + r")\b", message)
    return _FIELD_OF[m.group(1)] if m else None


# ---------------------------------------------------------------------------------------------------
# backends
# ---------------------------------------------------------------------------------------------------
class EngineBackend:
    """An in-process ``Engine``. ``submit`` returns the engine's ``RequestHandle`` (an async token stream
    with ``cancel()``, ``finish_reason`` and ``logprobs``); ``stats`` feeds /metrics and /health."""

    def __init__(self, engine, dirs, codecs: dict | None = None):
        self.engine = engine
        self.names = list(engine.names)
        self.parents = {n: (None if i == 0 else self.names[0]) for i, n in enumerate(self.names)}
        self.codecs = codecs if codecs is not None else oa.load_codecs(dirs, self.names)
        self.context = engine.kv.max_len
        self.max_seqs = engine.kv.max_seqs
        self.max_queue = engine.max_queue

    async def submit(self, variant: str, prompt: list[int], **kw):
        """``kw``: ``SamplingParams`` fields."""
        return self.engine.submit(variant, prompt, **kw)

    def health(self) -> tuple[bool, str]:
        check = getattr(self.engine, "health", None)   # an engine without it is taken as healthy
        return check() if check is not None else (True, "ok")

    def stats(self) -> dict:
        e = self.engine
        return {"load": e.load(), "kv_free": e.kv.num_free, "kv_slots": e.kv.max_seqs, "max_queue": e.max_queue,
                "weights": dict(e.weights.stats), "memory": e.memory_footprint(), "engine": dict(e.stats)}

    async def aclose(self, timeout: float | None) -> None:
        await asyncio.to_thread(self.engine.shutdown, True, timeout)


# ---------------------------------------------------------------------------------------------------
# one generation request: submit its choices, stream or collect them
# ---------------------------------------------------------------------------------------------------
class _Choice:
    def __init__(self, index: int, job, stream: oa.TextStream, prompt_len: int, echo: str = ""):
        self.index, self.job, self.ts, self.prompt_len, self.echo = index, job, stream, prompt_len, echo
        self.finish_reason: str | None = None
        self.first: float | None = None
        self.lps: list = []        # (token, (logprob, top)) per token, when logprobs were asked for
        self.offsets: list = []    # characters into the choice's text where each token's text starts


class _Generation:
    def __init__(self, app_state, kind: str, variant: str, choices: list[_Choice], t0: float, req: oa.GenRequest,
                 codec):
        self.s, self.kind, self.variant, self.choices, self.t0, self.req = app_state, kind, variant, choices, t0, req
        self.codec = codec
        self.rid, self.created = oa.new_id(kind), int(time.time())

    def _finish(self, c: _Choice, reason: str) -> None:
        if c.finish_reason is not None:
            return
        c.finish_reason = reason
        m = self.s.metrics
        m.finished.labels(self.variant, reason).inc()
        if reason != "cancelled":
            m.turnaround.labels(self.variant).observe(time.perf_counter() - self.t0)
        m.completion_tokens.labels(self.variant).inc(len(c.ts.ids))
        m.detokenized.labels(self.variant).inc(c.ts.work)

    def _token(self, c: _Choice, tok: int) -> str | None:
        """Feed one token; the text delta, or None when the choice already ended."""
        if c.finish_reason is not None:
            return None
        if c.first is None:
            c.first = time.perf_counter()
            self.s.metrics.ttft.labels(self.variant).observe(c.first - self.t0)
        if self.req.logprobs is not None:
            k = len(c.ts.ids)
            got = getattr(c.job, "logprobs", None) or []
            c.lps.append((tok, got[k] if k < len(got) else (float("nan"), [])))
            c.offsets.append(len(c.echo) + c.ts.decoded_chars)
        text = c.ts.push(tok)
        if c.ts.stopped:   # a stop string the engine could not see as token ids
            c.job.cancel()
        return text

    def _logprobs(self, c: _Choice, start: int, end: int):
        if self.req.logprobs is None:
            return None
        return oa.logprobs_body(self.kind, self.codec, c.lps[start:end], c.offsets[start:end])

    def _end(self, c: _Choice, error: BaseException | None) -> str:
        """The job's stream ended: the last text, and the choice's finish_reason is set."""
        if c.finish_reason is not None:
            return ""
        if error is not None:
            self._finish(c, "error")
            raise error
        tail = c.ts.flush()
        reason = "stop" if c.ts.stopped else (c.job.finish_reason or "stop")
        self._finish(c, reason)
        return tail

    def cancel_all(self) -> None:
        for c in self.choices:
            c.job.cancel()
            self._finish(c, "cancelled")

    def usage(self) -> dict:
        return oa.usage(sum(c.prompt_len for c in self.choices if c.index % self.req.n == 0),
                        sum(len(c.ts.ids) for c in self.choices))

    # -- non-streaming ----------------------------------------------------------------------
    async def collect(self) -> dict:
        async def one(c: _Choice):
            text, error = [c.echo], None
            try:
                async for tok in c.job:
                    piece = self._token(c, tok)
                    if piece is None:
                        break
                    text.append(piece)
                    if c.finish_reason is None and c.ts.stopped:
                        break
            except Exception as e:  # noqa: BLE001 - the engine failed this request
                error = e
            text.append(self._end(c, error))
            return "".join(text)

        try:
            texts = await asyncio.gather(*(one(c) for c in self.choices))
        except Exception as e:  # noqa: BLE001
            self.cancel_all()
            raise APIError(500, f"generation failed: {e}", code="engine_error") from e
        choices = [oa.choice(self.kind, c.index, t, c.finish_reason, list(c.ts.ids),
                             logprobs=self._logprobs(c, 0, len(c.lps)))
                   for c, t in zip(self.choices, texts)]
        return oa.envelope(self.kind, self.rid, self.variant, self.created, choices, self.usage())

    # -- streaming ----------------------------------------------------------------------------
    def _chunk(self, choices: list, usage_=None) -> bytes:
        body = oa.envelope(self.kind, self.rid, self.variant, self.created, choices, usage_, chunk=True)
        if self.req.include_usage and usage_ is None:
            body["usage"] = None
        return b"data: " + json.dumps(body, separators=(",", ":")).encode() + b"\n\n"

    async def _items(self):
        """(choice, token | _DONE | exception) as they come, merged from every choice through one queue, and
        (None, _EXPIRED) if the drain timeout expires first."""
        q: asyncio.Queue = asyncio.Queue()

        async def pump(c: _Choice):
            try:
                async for tok in c.job:
                    q.put_nowait((c, tok))
                q.put_nowait((c, _DONE))
            except Exception as e:  # noqa: BLE001
                q.put_nowait((c, e))

        async def expiry():
            await self.s.expired.wait()
            q.put_nowait((None, _EXPIRED))

        tasks = [asyncio.ensure_future(pump(c)) for c in self.choices] + [asyncio.ensure_future(expiry())]
        try:
            while True:
                yield await q.get()
        finally:
            for t in tasks:
                t.cancel()

    async def events(self):
        items = self._items()
        try:
            if self.kind == "chat":
                yield self._chunk([oa.choice("chat", c.index, "", None, [], delta=True, first=True)
                                   for c in self.choices])
            open_ = len(self.choices)
            every = max(1, self.s.stream_interval)
            pending = {c.index: (c.echo, [], 0) for c in self.choices}   # text, ids, first lp not sent yet
            async for c, item in items:
                if item is _EXPIRED:
                    err = APIError(503, f"the server shut down before the request finished (drain timeout "
                                   f"{self.s.drain_timeout:g} s)", code="drain_timeout").body()
                    yield b"data: " + json.dumps(err).encode() + b"\n\n"
                    self.cancel_all()
                    break
                if c.finish_reason is not None:
                    continue
                text, ids, lp0 = pending[c.index]
                if isinstance(item, BaseException) or item is _DONE:
                    try:
                        tail = self._end(c, item if isinstance(item, BaseException) else None)
                    except Exception as e:  # noqa: BLE001 - report in-band, as OpenAI-style error data
                        err = APIError(500, f"generation failed: {e}", code="engine_error").body()
                        yield b"data: " + json.dumps(err).encode() + b"\n\n"
                        self.cancel_all()
                        break
                    text += tail
                else:
                    text, ids = text + self._token(c, item), ids + [item]
                    if c.ts.stopped:
                        self._finish(c, "stop")
                if c.finish_reason is not None or len(ids) >= every or len(c.ts.ids) == 1:  # the first token at once
                    lp = self._logprobs(c, lp0, len(c.lps))
                    yield self._chunk([oa.choice(self.kind, c.index, text, c.finish_reason, ids, delta=True,
                                                 logprobs=lp)])
                    text, ids, lp0 = "", [], len(c.lps)
                pending[c.index] = (text, ids, lp0)
                if c.finish_reason is not None:
                    open_ -= 1
                    if open_ == 0:
                        break
            if self.req.include_usage:
                yield self._chunk([], self.usage())
            yield b"data: [DONE]\n\n"
        finally:   # also on a client disconnect (the response task is cancelled): free the sequences
            await items.aclose()
            for c in self.choices:
                if c.finish_reason is None:
                    c.job.cancel()
                    self._finish(c, "cancelled")


# ---------------------------------------------------------------------------------------------------
# the app
# ---------------------------------------------------------------------------------------------------
class _State:
    def __init__(self, backend, metrics, default_max_tokens, max_body_bytes, stream_interval=1,
                 drain_timeout: float | None = 30.0, body_timeout: float | None = 60.0):
        self.backend, self.metrics = backend, metrics
        self.default_max_tokens, self.max_body_bytes = default_max_tokens, max_body_bytes
        self.stream_interval, self.drain_timeout, self.body_timeout = stream_interval, drain_timeout, body_timeout
        self.shutting_down = False
        self.expired = asyncio.Event()   # set when the drain timeout runs out: open requests end now

    def start_drain(self) -> None:
        """SIGTERM: refuse new requests (503); in ``drain_timeout`` seconds end whatever is still open. Call
        on the server's event loop."""
        if self.shutting_down:
            return
        self.shutting_down = True
        if self.drain_timeout is not None:
            asyncio.get_running_loop().call_later(self.drain_timeout, self.expired.set)


def _error_response(e: APIError, headers=None) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=headers)


async def _read_body(request: Request, limit: int, timeout: float | None) -> bytes:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"request body of {declared} bytes is over the limit of {limit}", code="request_too_large")
    raw = bytearray()
    try:
        async with asyncio.timeout(timeout):
            async for part in request.stream():
                raw += part
                if len(raw) > limit:
                    raise APIError(413, f"request body is over the limit of {limit} bytes", code="request_too_large")
    except TimeoutError:
        raise APIError(408, f"the request body did not arrive within {timeout:g} s", code="request_timeout") from None
    return bytes(raw)


class _CountRequests:
    """Pure ASGI middleware (it does not wrap the response stream): counts /v1/ requests by endpoint, model
    (``request.state.model``, set by the handler once it knows the model) and status."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            return await self.app(scope, receive, send)
        status = [500]

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            path = scope["path"]
            endpoint = "/v1/models/{id}" if path.startswith("/v1/models/") else path
            if endpoint not in ("/v1/models", "/v1/models/{id}", "/v1/completions", "/v1/chat/completions"):
                endpoint = "other"
            model = (scope.get("state") or {}).get("model", "")
            self.metrics.http.labels(endpoint, model, str(status[0])).inc()


async def _wait_disconnect(request: Request) -> None:
    """Returns when the client goes away (the body was read already; uvicorn then blocks until disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        await asyncio.sleep(0.05)   # a server that answers with empty messages must not make this spin


class _Prepared:
    """A request resolved against its model: prompts as token ids, stop strings, echo texts."""

    def __init__(self, req, codec, prompts, stops, token_stops, echoes):
        self.req, self.codec, self.prompts, self.stops, self.token_stops = req, codec, prompts, stops, token_stops
        self.echoes = echoes


def _encode(codec, text: str, param: str, special: bool = True) -> list[int]:
    try:
        return codec.encode(text, special=special)
    except ValueError as e:   # text a tokenizer refuses (the JSON check catches lone surrogates first)
        raise APIError(400, f"'{param}' cannot be tokenized: {e}", param=param, code="invalid_value") from None


def build_app(backend, *, default_max_tokens: int = 16, max_body_bytes: int = 8 << 20,
              drain_timeout: float | None = 30.0, close_backend: bool = True, stream_interval: int = 1,
              body_timeout: float | None = 60.0) -> FastAPI:
    """The ASGI app over ``backend`` (``EngineBackend``, or ``ray_serve.RayBackend``).

    ``default_max_tokens``: a completion without ``max_tokens`` gets this many (OpenAI's 16), a chat the rest
    of the context. ``drain_timeout``: how long shutdown lets in-flight requests run (``app.state.mm.start_drain``
    starts it; the runner calls it on SIGTERM). ``stream_interval``: a stream sends one chunk per this many
    tokens (the first token at once), as vLLM's ``--stream-interval``. ``body_timeout``: seconds a client has to
    send its whole request body (408 after)."""
    if stream_interval < 1:
        raise ValueError(f"stream_interval must be >= 1, got {stream_interval}")
    metrics = Metrics(backend)
    state = _State(backend, metrics, default_max_tokens, max_body_bytes, stream_interval, drain_timeout, body_timeout)
    max_queue = getattr(backend, "max_queue", None)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        state.shutting_down = True
        if close_backend and hasattr(backend, "aclose"):
            await backend.aclose(drain_timeout)

    app = FastAPI(title="multimoe_rt", summary="OpenAI-compatible server: one model per fine-tuned variant",
                  lifespan=lifespan)
    app.state.mm = state

    app.add_middleware(_CountRequests, metrics=metrics)

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError):
        headers = {"Retry-After": "1"} if e.status in (429, 503) else None
        if e.status == 408:
            headers = {"Connection": "close"}   # the rest of that body may still be on its way
        return _error_response(e, headers)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, e: Exception):
        log.exception("unhandled error in %s", request.url.path)
        return _error_response(APIError(500, f"internal error: {type(e).__name__}: {e}", code="internal_error"))

    @app.get("/health")
    async def health():
        ok, reason = backend.health() if hasattr(backend, "health") else (True, "")
        closing = state.shutting_down
        body = {"status": "shutting_down" if closing else "ok" if ok else "error", "models": backend.names}
        if not ok:
            body["reason"] = reason
        s = backend.stats() if hasattr(backend, "stats") else None
        if s:
            body.update(s["load"])
        return JSONResponse(body, status_code=503 if closing or not ok else 200)

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.expose(), media_type=prometheus_client.CONTENT_TYPE_LATEST)

    def card(name):
        return oa.model_card(name, backend.parents[name], backend.context)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [card(n) for n in backend.names]}

    @app.get("/v1/models/{model:path}")
    async def model(model: str, request: Request):
        request.state.model = model if model in backend.names else ""
        if model not in backend.names:
            raise _unknown(model)
        return card(model)

    def _unknown(name) -> APIError:
        return APIError(404, f"The model '{name}' does not exist; this server serves {backend.names}",
                        param="model", code="model_not_found")

    def prepare(raw: bytes, parse, kind: str) -> _Prepared:
        """Parse, validate and tokenize (CPU work: the caller runs large bodies in a worker thread)."""
        req = parse(oa.load_body(raw))
        if req.model not in backend.names:
            raise _unknown(req.model)
        codec = backend.codecs.get(req.model)
        stops = list(req.stop)
        echoes = []
        if kind == "chat":
            if codec is None:
                raise APIError(400, f"model '{req.model}' has no tokenizer, so it cannot take chat messages; "
                               "use /v1/completions with token ids", param="messages", code="no_tokenizer")
            if oa.uses_builtin_template(codec):
                stops += [s for s in oa.CHAT_STOPS if s not in stops]
            prompts = [_encode(codec, oa.render_chat(req.messages, codec), "messages", special=False)]
        else:
            prompts = []
            for p in req.prompts:
                if isinstance(p, str):
                    if codec is None:
                        raise APIError(400, f"model '{req.model}' has no tokenizer (no multimoe_tokenizer.json or "
                                       "tokenizer.json beside its checkpoint): send the prompt as token ids",
                                       param="prompt", code="no_tokenizer")
                    echoes.append(p)
                    p = _encode(codec, p, "prompt")
                else:
                    echoes.append(codec.decode(p) if codec is not None and req.echo else "")
                prompts.append(p)
        if stops and codec is None:
            raise APIError(400, f"model '{req.model}' has no tokenizer: 'stop' strings cannot be matched",
                           param="stop", code="no_tokenizer")
        token_stops = None
        if stops and codec.exact_token_stops:
            token_stops = tuple(tuple(_encode(codec, s, "stop", special=False)) for s in stops)
        return _Prepared(req, codec, prompts, stops, token_stops, echoes if req.echo else [""] * len(prompts))

    async def generate(request: Request, parse, kind: str):
        t0 = time.perf_counter()
        raw = await _read_body(request, state.max_body_bytes, state.body_timeout)
        if len(raw) >= OFFLOAD_BYTES:   # JSON parsing and tokenization of a large prompt must not stall streams
            pr = await asyncio.to_thread(prepare, raw, parse, kind)
        else:
            pr = prepare(raw, parse, kind)
        req, prompts = pr.req, pr.prompts
        request.state.model = req.model
        if state.shutting_down:
            raise APIError(503, "the server is shutting down", code="shutting_down")
        ctx = backend.context
        for ids in prompts:
            if len(ids) >= ctx:
                raise APIError(400, f"This model's maximum context length is {ctx} tokens; the prompt has "
                               f"{len(ids)} tokens, which leaves no room for a completion", param="prompt",
                               code="context_length_exceeded")
        if req.max_tokens is not None:
            over = [len(ids) for ids in prompts if len(ids) + req.max_tokens > ctx]
            if over:
                raise APIError(400, f"This model's maximum context length is {ctx} tokens; you requested "
                               f"{over[0] + req.max_tokens} ({over[0]} in the prompt, {req.max_tokens} for the "
                               "completion)", param="max_tokens", code="context_length_exceeded")
        total = len(prompts) * req.n
        if max_queue is not None and total > max_queue:
            raise APIError(400, f"this request asks for {total} choices (prompts x n), more than the server's "
                           f"queue holds ({max_queue}); send fewer at a time", param="n", code="invalid_value")
        choices = []
        try:
            for i, ids in enumerate(prompts):
                room = ctx - len(ids)
                n_new = req.max_tokens or (room if kind == "chat" else min(state.default_max_tokens, room))
                if req.sampling["min_tokens"] > n_new:
                    raise APIError(400, f"'min_tokens' ({req.sampling['min_tokens']}) is over the {n_new} tokens this "
                                   "request may generate (max_tokens, or the default, or the context left)",
                                   param="min_tokens", code="invalid_value")
                for j in range(req.n):
                    kw = dict(req.sampling, max_new_tokens=n_new, seed=None if req.seed is None else (req.seed + j) % 2**63)
                    if pr.token_stops:
                        kw["stop"] = pr.token_stops
                    if req.logprobs is not None:
                        kw["logprobs"] = req.logprobs
                    job = await backend.submit(req.model, ids, **kw)
                    choices.append(_Choice(i * req.n + j, job, oa.TextStream(pr.codec, pr.stops), len(ids),
                                           pr.echoes[i]))
        except BaseException as e:
            for c in choices:
                c.job.cancel()
            if isinstance(e, QueueFull):
                raise APIError(429, f"the server is busy: {e}", code="queue_full") from None
            if isinstance(e, EngineDead):
                raise APIError(503, f"the engine has stopped: {e}", code="engine_dead") from None
            if isinstance(e, EngineClosed):
                raise APIError(503, "the server is shutting down", code="shutting_down") from None
            if isinstance(e, RequestError):
                raise APIError(400, str(e), param=_param_of(str(e)), code="invalid_value") from None
            raise
        for ids in prompts:   # once per prompt, as usage counts it (not once per choice)
            state.metrics.prompt_tokens.labels(req.model).inc(len(ids))
        if req.user:
            log.debug("request %s for %s from user %r", choices[0].job, req.model, req.user)
        gen = _Generation(state, kind, req.model, choices, t0, req, pr.codec)
        headers = dict(getattr(choices[0].job, "headers", None) or {})
        if req.stream:
            return StreamingResponse(gen.events(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **headers})
        work = asyncio.ensure_future(gen.collect())
        watch = asyncio.ensure_future(_wait_disconnect(request))
        expiry = asyncio.ensure_future(state.expired.wait())
        try:
            await asyncio.wait({work, watch, expiry}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watch.cancel()
            expiry.cancel()
            if not work.done():   # the client went away, the drain expired, or this task was cancelled
                work.cancel()
                gen.cancel_all()
        if not work.done() or work.cancelled():
            if state.expired.is_set():
                raise APIError(503, f"the server shut down before the request finished (drain timeout "
                               f"{state.drain_timeout:g} s)", code="drain_timeout")
            return Response(status_code=499)
        return JSONResponse(work.result(), headers=headers)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await generate(request, oa.parse_completion, "completion")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await generate(request, oa.parse_chat, "chat")

    return app
