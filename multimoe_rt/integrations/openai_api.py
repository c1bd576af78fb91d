"""The OpenAI wire protocol, without a web framework: request parsing, tokenizers, the chat template,
incremental detokenization with stop strings, and response bodies.

``server.py`` (FastAPI) and ``ray_serve.py`` use it; nothing here imports fastapi, uvicorn or ray.

Errors are ``APIError(status, message, param, code)``; ``.body()`` is OpenAI's error JSON
``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import json
import logging
import math
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from ..tokenizer import TOKENIZER_FILE, ByteTokenizer

log = logging.getLogger(__name__)

ERROR_TYPES = {400: "invalid_request_error", 404: "invalid_request_error", 413: "invalid_request_error",
               429: "rate_limit_error", 500: "server_error", 503: "service_unavailable"}
MAX_STOPS = 4          # OpenAI's limit on stop strings
MAX_CHOICES = 128      # prompts x n in one request


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
    ``stopped`` once a stop string appeared (the text before it is all that is emitted)."""

    def __init__(self, codec, stops=()):
        self.codec, self.stops = codec, [s for s in stops if s]
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.ids: list[int] = []
        self.text, self.sent, self.stopped = "", 0, False

    def push(self, token: int) -> str:
        if self.stopped:
            return ""
        self.ids.append(token)
        if self.codec is None:
            return ""
        self.text = self.codec.decode(self.ids)
        hits = [i for i in (self.text.find(s, self.sent) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            return self._emit(min(hits))
        end = len(self.text) - self.hold
        if self.text.endswith("\ufffd"):   # maybe a character whose bytes are not all here yet
            end = min(end, len(self.text) - 1)
        return self._emit(end)

    def flush(self) -> str:
        return "" if self.stopped else self._emit(len(self.text))

    def _emit(self, end: int) -> str:
        if end <= self.sent:
            return ""
        out, self.sent = self.text[self.sent:end], end
        return out

    @property
    def emitted(self) -> str:
        return self.text[:self.sent]


# ---------------------------------------------------------------------------------------------------
# request parsing
# ---------------------------------------------------------------------------------------------------
@dataclass
class GenRequest:
    """A parsed /v1/completions or /v1/chat/completions body."""
    kind: str                              # "completion" or "chat"
    model: str
    prompts: list = field(default_factory=list)    # completion: each a str or a list of token ids
    messages: list | None = None           # chat
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    n: int = 1
    stream: bool = False
    include_usage: bool = False
    ignore_eos: bool = False


def _bad(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param=param, code="invalid_value")


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _num(body, key, default, lo=None, hi=None):
    x = body.get(key, default)
    if x is None:
        return default
    if not (isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)):
        raise _bad(f"'{key}' must be a number, got {x!r}", key)
    if (lo is not None and x < lo) or (hi is not None and x > hi):
        raise _bad(f"'{key}' must be in [{lo}, {hi}], got {x!r}", key)
    return float(x)


def _int(body, key, default, lo=None, hi=None):
    x = body.get(key, default)
    if x is None:
        return default
    if not _is_int(x):
        raise _bad(f"'{key}' must be an integer, got {x!r}", key)
    if (lo is not None and x < lo) or (hi is not None and x > hi):
        raise _bad(f"'{key}' must be in [{lo}, {'inf' if hi is None else hi}], got {x!r}", key)
    return x


def _bool(body, key, default=False):
    x = body.get(key, default)
    if x is None:
        return default
    if not isinstance(x, bool):
        raise _bad(f"'{key}' must be a boolean, got {x!r}", key)
    return x


# fields we accept only at their neutral value (OpenAI clients may send them)
_NEUTRAL = {"frequency_penalty": (0, 0.0), "presence_penalty": (0, 0.0), "logprobs": (None, False),
            "top_logprobs": (None, 0), "echo": (None, False), "suffix": (None, ""), "logit_bias": (None, {}),
            "best_of": (None, 1), "tools": (None, []), "response_format": (None,)}


def _common(body: dict, kind: str) -> GenRequest:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _bad("'model' is required: the name of a variant (GET /v1/models lists them)", "model")
    for key, neutral in _NEUTRAL.items():
        if key in body and body[key] not in neutral and not (key == "response_format" and
                                                             body[key] == {"type": "text"}):
            raise _bad(f"'{key}' is not supported by this server", key)
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    if not (isinstance(stop, list) and all(isinstance(s, str) and s for s in stop)) or len(stop) > MAX_STOPS:
        raise _bad(f"'stop' must be a non-empty string or a list of at most {MAX_STOPS} such strings", "stop")
    opts = body.get("stream_options")
    if opts is not None and not isinstance(opts, dict):
        raise _bad("'stream_options' must be an object", "stream_options")
    stream = _bool(body, "stream")
    include_usage = _bool(opts or {}, "include_usage")
    if opts and not stream:
        raise _bad("'stream_options' is only allowed with stream=true", "stream_options")
    max_key = "max_completion_tokens" if kind == "chat" and body.get("max_completion_tokens") is not None \
        else "max_tokens"
    return GenRequest(kind=kind, model=model, max_tokens=_int(body, max_key, None, lo=1),
                      temperature=_num(body, "temperature", 1.0, 0.0, 2.0),
                      top_p=_num(body, "top_p", 1.0, 0.0, 1.0), seed=_int(body, "seed", None, lo=0),
                      stop=stop, n=_int(body, "n", 1, 1, MAX_CHOICES), stream=stream, include_usage=include_usage,
                      ignore_eos=_bool(body, "ignore_eos"))


def parse_completion(body) -> GenRequest:
    """POST /v1/completions: ``prompt`` is a string, a list of token ids, or a list of either (a batch)."""
    if not isinstance(body, dict):
        raise _bad("the request body must be a JSON object")
    r = _common(body, "completion")
    p = body.get("prompt")
    if isinstance(p, str):
        prompts = [p]
    elif isinstance(p, list) and p and all(_is_int(t) for t in p):
        prompts = [p]
    elif isinstance(p, list) and p and all(isinstance(x, str) or (isinstance(x, list) and all(_is_int(t) for t in x))
                                           for x in p):
        prompts = list(p)
    else:
        raise _bad("'prompt' must be a string, a list of token ids, or a non-empty list of strings or of "
                   "token-id lists", "prompt")
    if any(len(x) == 0 for x in prompts):
        raise _bad("'prompt' must not be empty", "prompt")
    if r.top_p == 0:
        raise _bad("'top_p' must be > 0", "top_p")
    if len(prompts) * r.n > MAX_CHOICES:
        raise _bad(f"prompts x n = {len(prompts) * r.n} is over the limit of {MAX_CHOICES} choices", "n")
    r.prompts = prompts
    return r


def _content(m, i):
    c = m.get("content")
    if c is None:
        return ""
    if isinstance(c, str):
        return c
    if isinstance(c, list) and all(isinstance(x, dict) and x.get("type") == "text" and isinstance(x.get("text"), str)
                                   for x in c):
        return "".join(x["text"] for x in c)
    raise _bad(f"messages[{i}].content must be a string or a list of text parts", f"messages[{i}].content")


def parse_chat(body) -> GenRequest:
    """POST /v1/chat/completions: ``messages`` = [{role, content}], rendered by ``render_chat``."""
    if not isinstance(body, dict):
        raise _bad("the request body must be a JSON object")
    r = _common(body, "chat")
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise _bad("'messages' must be a non-empty list of {role, content} objects", "messages")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in CHAT_ROLES:
            raise _bad(f"messages[{i}] must be an object whose role is one of {list(CHAT_ROLES)}", f"messages[{i}]")
        out.append({"role": m["role"], "content": _content(m, i)})
    if r.top_p == 0:
        raise _bad("'top_p' must be > 0", "top_p")
    r.messages = out
    return r


def parse_body(raw: bytes):
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _bad(f"the request body is not valid JSON: {e}") from None


# ---------------------------------------------------------------------------------------------------
# response bodies
# ---------------------------------------------------------------------------------------------------
def new_id(kind: str) -> str:
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def choice(kind: str, index: int, text: str, finish_reason, token_ids: list[int], *, delta: bool = False,
           first: bool = False) -> dict:
    """One choice. ``token_ids`` (an extension, as in vLLM's ``return_token_ids``): the generated ids."""
    if kind == "completion":
        return {"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason,
                "token_ids": token_ids}
    if delta:
        d = {"role": "assistant", "content": text} if first else ({"content": text} if text or token_ids else {})
        return {"index": index, "delta": d, "logprobs": None, "finish_reason": finish_reason, "token_ids": token_ids}
    return {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": None,
            "finish_reason": finish_reason, "token_ids": token_ids}


def envelope(kind: str, rid: str, model: str, created: int, choices: list, usage_: dict | None, *,
             chunk: bool = False) -> dict:
    obj = {"completion": "text_completion", "chat": "chat.completion.chunk" if chunk else "chat.completion"}[kind]
    out = {"id": rid, "object": obj, "created": created, "model": model, "choices": choices}
    if not chunk or usage_ is not None:
        out["usage"] = usage_
    return out


def model_card(name: str, parent: str | None, root: str, context: int, created: int | None = None) -> dict:
    """A /v1/models entry: the base has no parent; every fine-tune names the base as its parent."""
    return {"id": name, "object": "model", "created": created or int(time.time()), "owned_by": "multimoe_rt",
            "root": root, "parent": parent, "max_model_len": context}
