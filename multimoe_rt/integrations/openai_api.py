"""The OpenAI wire protocol, without a web framework: request parsing (``protocol.py``'s pydantic models),
tokenizers, the chat template, incremental detokenization with stop strings, log-probabilities and response
bodies.

``server.py`` (FastAPI) and ``ray_serve.py`` use it; nothing here imports fastapi, uvicorn or ray.

Errors are ``APIError(status, message, param, code)``; ``.body()`` is OpenAI's error JSON
``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from ..tokenizer import TOKENIZER_FILE, ByteTokenizer, WindowStreamDecoder
from . import protocol as P
from .protocol import MAX_CHOICES, MAX_STOPS  # noqa: F401  (re-exported)

log = logging.getLogger(__name__)

ERROR_TYPES = {400: "invalid_request_error", 404: "invalid_request_error", 408: "invalid_request_error",
               413: "invalid_request_error", 429: "rate_limit_error", 500: "server_error",
               503: "service_unavailable"}
MIN_LOGPROB = -9999.0   # stands for -inf (a token top-p/top-k ruled out): JSON has no infinities (vLLM's value)


class APIError(Exception):
    """An error answered as OpenAI-style JSON with HTTP ``status``."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": ERROR_TYPES.get(self.status, "server_error"),
                          "param": self.param, "code": self.code}}


# ---------------------------------------------------------------------------------------------------
# tokenizers ("codecs"): text <-> ids for one checkpoint directory
# ---------------------------------------------------------------------------------------------------
class ByteCodec:
    """The tiny zoo's byte tokenizer (``multimoe_tokenizer.json``). Encoding a stop string gives exactly
    the ids the model would emit for it, so stop strings are also handed to the engine as token ids."""

    exact_token_stops = True
    chat_template = None

    def __init__(self, tok: ByteTokenizer):
        self.tok = tok
        self.vocab_size, self.eos_id = tok.vocab_size, tok.eos_id

    def encode(self, text: str, special: bool = True) -> list[int]:
        return self.tok.encode(text)

    def decode(self, ids) -> str:
        return self.tok.decode(ids)

    def stream_decoder(self):
        return self.tok.stream_decoder()

    def token_bytes(self, i: int) -> bytes:
        i = int(i)
        if 0 <= i < 256:
            return bytes((i,))
        try:
            return self.tok.special_name(i).encode()
        except ValueError:
            return b""

    def token_text(self, i: int) -> str:
        """A token as logprobs show it: its text, or ``bytes:\\xNN`` for a byte that is not a character by
        itself (a piece of a multi-byte UTF-8 sequence), as vLLM writes it."""
        b = self.token_bytes(i)
        try:
            return b.decode("utf-8")
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{x:02x}" for x in b)


class HFCodec:
    """A transformers tokenizer read from the checkpoint directory: offline, never ``trust_remote_code``."""

    exact_token_stops = False

    def __init__(self, tok):
        self.tok = tok
        self.vocab_size, self.eos_id = len(tok), tok.eos_token_id
        self.chat_template = getattr(tok, "chat_template", None)

    def encode(self, text: str, special: bool = True) -> list[int]:
        return list(self.tok.encode(text, add_special_tokens=special))

    def decode(self, ids) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=True)

    def stream_decoder(self):
        return WindowStreamDecoder(self.decode)

    def token_text(self, i: int) -> str:
        return self.tok.decode([int(i)], skip_special_tokens=False)

    def token_bytes(self, i: int) -> bytes:
        return self.token_text(i).encode("utf-8", errors="replace")

    def render_chat(self, messages: list[dict]) -> str:
        return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def load_codec(directory):
    """The tokenizer a checkpoint directory carries: ``multimoe_tokenizer.json`` (byte-level), else a
    transformers tokenizer (``tokenizer.json`` / ``tokenizer_config.json``), else None (token ids only)."""
    d = Path(directory)
    if (d / TOKENIZER_FILE).is_file():
        return ByteCodec(ByteTokenizer.load(d))
    if (d / "tokenizer.json").is_file() or (d / "tokenizer_config.json").is_file():
        try:
            from transformers import AutoTokenizer

            return HFCodec(AutoTokenizer.from_pretrained(str(d), local_files_only=True, trust_remote_code=False))
        except Exception as e:  # noqa: BLE001 - a broken tokenizer leaves token-id prompts working
            log.warning("%s: tokenizer not loaded (%s); this model takes token-id prompts only", d, e)
    return None


def load_codecs(dirs, names) -> dict:
    """One codec per variant; a variant directory without a tokenizer uses the base's (fine-tunes share it)."""
    codecs = {n: load_codec(d) for n, d in zip(names, dirs)}
    base = codecs[names[0]]
    return {n: c if c is not None else base for n, c in codecs.items()}


# ---------------------------------------------------------------------------------------------------
# the chat template
# ---------------------------------------------------------------------------------------------------
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")
CHAT_STOPS = tuple(f"<|{r}|>" for r in CHAT_ROLES)


def render_chat(messages: list[dict], codec=None) -> str:
    """Messages -> prompt text. A checkpoint whose transformers tokenizer has a ``chat_template`` uses it;
    otherwise (the byte-level zoo) this plain template, documented in the README::

        <|system|>\\n{content}\\n<|user|>\\n{content}\\n ... <|assistant|>\\n

    one ``<|role|>`` line and the content per message, then ``<|assistant|>\\n`` for the reply. Generation
    also stops where the model starts another turn (any ``<|role|>`` tag, ``CHAT_STOPS``)."""
    if codec is not None and getattr(codec, "chat_template", None):
        return codec.render_chat(messages)
    return "".join(f"<|{m['role']}|>\n{m['content']}\n" for m in messages) + "<|assistant|>\n"


def uses_builtin_template(codec) -> bool:
    return not getattr(codec, "chat_template", None)


# ---------------------------------------------------------------------------------------------------
# incremental detokenization with stop strings
# ---------------------------------------------------------------------------------------------------
class TextStream:
    """Token ids in, text deltas out; never emits text that could still turn into a stop string, nor a
    half-decoded character. ``push(tok) -> str`` (the safe new text), ``flush() -> str`` at the end;
    ``stopped`` once a stop string appeared (the text before it is all that is emitted).

    Each token is decoded once (``codec.stream_decoder()``) and the stop search looks only at the text not
    yet emitted (at most the longest stop string plus the newest piece), so a token costs the same at any
    output length. ``work``: token ids the decoder has processed (a cost measure)."""

    def __init__(self, codec, stops=()):
        self.dec = codec.stream_decoder() if codec is not None else None
        self.stops = [s for s in stops if s]
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.ids: list[int] = []
        self.pending = ""                # decoded, not emitted yet
        self.pieces: list[str] = []      # emitted
        self.sent = 0                    # characters emitted
        self.stopped = False

    @property
    def work(self) -> int:
        return self.dec.work if self.dec is not None else 0

    @property
    def decoded_chars(self) -> int:
        return self.sent + len(self.pending)

    def push(self, token: int) -> str:
        if self.stopped:
            return ""
        self.ids.append(token)
        if self.dec is None:
            return ""
        self.pending += self.dec.push(token)
        return self._scan(final=False)

    def flush(self) -> str:
        if self.stopped or self.dec is None:
            return ""
        self.pending += self.dec.flush()
        return self._scan(final=True)

    def _scan(self, final: bool) -> str:
        # A stop string starts at or after the first pending character: everything before it was emitted
        # only once no stop could begin there (``hold`` characters are always kept back).
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            return self._emit(min(hits))
        return self._emit(len(self.pending) if final else len(self.pending) - self.hold)

    def _emit(self, end: int) -> str:
        if end <= 0:
            return ""
        out, self.pending = self.pending[:end], self.pending[end:]
        self.pieces.append(out)
        self.sent += len(out)
        return out

    @property
    def emitted(self) -> str:
        return "".join(self.pieces)


# ---------------------------------------------------------------------------------------------------
# request parsing
# ---------------------------------------------------------------------------------------------------
@dataclass
class GenRequest:
    """A parsed /v1/completions or /v1/chat/completions body, in the engine's terms.

    ``sampling``: ``SamplingParams`` fields shared by every choice (temperature, top_p, top_k, min_p, the
    penalties, min_tokens, stop_token_ids, ignore_eos); ``seed`` is per choice (``seed + j`` for choice j),
    ``max_tokens`` and the stop strings are resolved against the prompt and the tokenizer by the server."""
    kind: str                              # "completion" or "chat"
    model: str
    prompts: list = field(default_factory=list)    # completion: each a str or a list of token ids
    messages: list | None = None           # chat: [{"role", "content"}]
    max_tokens: int | None = None
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    n: int = 1
    stream: bool = False
    include_usage: bool = False
    echo: bool = False
    logprobs: int | None = None            # top alternatives per token; None: no logprobs
    user: str | None = None
    sampling: dict = field(default_factory=dict)


def _bad(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param=param, code="invalid_value")


def load_body(raw: bytes):
    """Request bytes -> a JSON value, within ``protocol``'s limits (depth, number size, valid Unicode)."""
    try:
        return P.load_json(raw)
    except P.BodyError as e:
        raise _bad(e.message, e.param) from None


def _common(r: P._Sampling, kind: str, **extra) -> GenRequest:
    sampling = {}
    for key, default in (("temperature", 1.0), ("top_p", 1.0), ("top_k", 0), ("min_p", 0.0),
                         ("repetition_penalty", 1.0), ("presence_penalty", 0.0), ("frequency_penalty", 0.0),
                         ("min_tokens", 0), ("ignore_eos", False)):
        v = getattr(r, key)
        sampling[key] = default if v is None else v
    sampling["top_k"] = max(sampling["top_k"], 0)      # vLLM's -1 and OpenAI-style 0 both mean "off"
    if r.stop_token_ids:
        sampling["stop_token_ids"] = tuple(r.stop_token_ids)
    return GenRequest(kind=kind, model=r.model, max_tokens=r.max_completion_tokens or r.max_tokens, seed=r.seed,
                      stop=list(r.stop or []), n=r.n or 1, stream=bool(r.stream),
                      include_usage=bool(r.stream_options and r.stream_options.include_usage), user=r.user,
                      sampling=sampling, **extra)


def _parse(model, body):
    try:
        return P.parse(model, body)
    except P.BodyError as e:
        raise _bad(e.message, e.param) from None


def parse_completion(body) -> GenRequest:
    """POST /v1/completions: ``prompt`` is a string, a list of token ids, or a list of either (a batch)."""
    r = _parse(P.CompletionRequest, body)
    return _common(r, "completion", prompts=list(r.prompt), echo=bool(r.echo), logprobs=r.logprobs)


def parse_chat(body) -> GenRequest:
    """POST /v1/chat/completions: ``messages`` = [{role, content}], rendered by ``render_chat``."""
    r = _parse(P.ChatRequest, body)
    return _common(r, "chat", messages=[{"role": m.role, "content": m.text()} for m in r.messages],
                   logprobs=(r.top_logprobs or 0) if r.logprobs else None)


# ---------------------------------------------------------------------------------------------------
# response bodies
# ---------------------------------------------------------------------------------------------------
def new_id(kind: str) -> str:
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _lp(x) -> float:
    x = float(x)
    return x if x >= MIN_LOGPROB else MIN_LOGPROB   # also maps NaN to the floor


def logprobs_body(kind: str, codec, entries, offsets=None, start: int = 0):
    """OpenAI's logprobs object for ``entries`` = [(token_id, (logprob, [(alt_id, alt_logprob), ...]))].

    Completions: ``{"tokens", "token_logprobs", "top_logprobs", "text_offset"}`` (``text_offset`` from
    ``offsets``, characters into the choice's text). Chat: ``{"content": [{"token", "logprob", "bytes",
    "top_logprobs": [...]}]}``. A model without a tokenizer shows tokens as ``token_id:N``."""
    def text(i):
        return codec.token_text(i) if codec is not None else f"token_id:{int(i)}"

    def raw(i):
        return list(codec.token_bytes(i)) if codec is not None else None

    if kind == "chat":
        return {"content": [{"token": text(t), "logprob": _lp(lp), "bytes": raw(t),
                             "top_logprobs": [{"token": text(a), "logprob": _lp(alp), "bytes": raw(a)}
                                              for a, alp in top]}
                            for t, (lp, top) in entries]}
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for k, (t, (lp, top)) in enumerate(entries):
        out["tokens"].append(text(t))
        out["token_logprobs"].append(_lp(lp))
        out["top_logprobs"].append({text(a): _lp(alp) for a, alp in top})
        out["text_offset"].append(offsets[k] if offsets is not None else start)
    return out


def choice(kind: str, index: int, text: str, finish_reason, token_ids: list[int], *, delta: bool = False,
           first: bool = False, logprobs=None) -> dict:
    """One choice. ``token_ids`` (an extension, as in vLLM's ``return_token_ids``): the generated ids."""
    if kind == "completion":
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason,
                "token_ids": token_ids}
    if delta:
        d = {"role": "assistant", "content": text} if first else ({"content": text} if text or token_ids else {})
        return {"index": index, "delta": d, "logprobs": logprobs, "finish_reason": finish_reason,
                "token_ids": token_ids}
    return {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
            "finish_reason": finish_reason, "token_ids": token_ids}


def envelope(kind: str, rid: str, model: str, created: int, choices: list, usage_: dict | None, *,
             chunk: bool = False) -> dict:
    obj = {"completion": "text_completion", "chat": "chat.completion.chunk" if chunk else "chat.completion"}[kind]
    out = {"id": rid, "object": obj, "created": created, "model": model, "choices": choices}
    if not chunk or usage_ is not None:
        out["usage"] = usage_
    return out


def model_card(name: str, parent: str | None, context: int, created: int | None = None) -> dict:
    """A /v1/models entry: ``root`` is the variant's own name and ``parent`` its base (None for the base), as
    vLLM names a served model; no filesystem path leaves the server."""
    return {"id": name, "object": "model", "created": created or int(time.time()), "owned_by": "multimoe_rt",
            "root": name, "parent": parent, "max_model_len": context}
