"""Request bodies of the OpenAI API, parsed once: raw bytes -> bounded JSON -> a pydantic model.

Every way a body can be wrong ends in ``BodyError(message, param)``, which the server answers as an
OpenAI-style 400 naming the field; nothing a client sends can raise anything else:

* JSON: invalid UTF-8 or syntax; nesting deeper than ``MAX_DEPTH`` (the C parser's RecursionError is caught
  too, for bodies nested tens of thousands deep); a number literal longer than ``MAX_NUMBER_CHARS`` (a
  5,000-digit integer would otherwise reach ``int()`` and Python's digit limit, a 400-digit temperature
  would overflow ``float()``); ``NaN`` / ``Infinity``; a string holding a lone surrogate (``"\\ud800"``
  is valid JSON but not text any tokenizer can encode).
* Fields: ``extra="forbid"`` (an unknown field is a 400 naming it; vLLM's extensions that this server
  implements are ordinary fields, so the openai client's ``extra_body`` works for them), strict types
  (``true`` is not a number, ``2.0`` is not an integer), ranges.
* Fields OpenAI clients may send but this server does not implement (``logit_bias``, ``tools``, ...)
  are accepted only at their neutral value (``null``, ``{}``, ``[]``, ...); any other value is a 400 naming
  the field.

Nothing here imports fastapi, uvicorn or torch.
"""

from __future__ import annotations

import json
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

MAX_DEPTH = 32           # a chat body needs 5 levels; the slack is for clients' metadata
MAX_NUMBER_CHARS = 40    # a seed (< 2**63, 19 digits), a token id or a float such as 0.1234567890123456789
MAX_STOPS = 4            # OpenAI's limit on stop strings
MAX_STOP_TOKEN_IDS = 64
MAX_CHOICES = 128        # prompts x n in one request
MAX_LOGPROBS = 20        # top alternatives per token (OpenAI's top_logprobs limit, vLLM's default max)


class BodyError(ValueError):
    """A request body that cannot be served; ``param`` names the field (None: the body as a whole)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.message, self.param = message, param


# ---------------------------------------------------------------------------------------------------
# bounded JSON
# ---------------------------------------------------------------------------------------------------
class _BadNumber:
    """Stands in for a number literal that is too long or not finite, so the check below can name its field."""

    __slots__ = ("text",)

    def __init__(self, text: str):
        self.text = text


def _parse_int(s: str):
    return int(s) if len(s) <= MAX_NUMBER_CHARS else _BadNumber(s)


def _parse_float(s: str):
    if len(s) > MAX_NUMBER_CHARS:
        return _BadNumber(s)
    x = float(s)
    return x if x - x == 0 else _BadNumber(s)     # 1e400 parses as inf


def _path(path) -> str | None:
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or None


def _describe_number(t: str) -> str:
    if t in ("NaN", "Infinity", "-Infinity"):
        return f"{t} is not a finite number"
    return (f"a number literal of {len(t)} characters is over the limit of {MAX_NUMBER_CHARS}" if len(t) > MAX_NUMBER_CHARS
            else f"{t} is out of the range of a finite number")


def _check_tree(obj) -> None:
    """Depth, number and string checks over the parsed body, iteratively (no recursion limit to hit)."""
    stack = [(obj, (), 1)]
    while stack:
        x, path, depth = stack.pop()
        t = type(x)
        if t is str:
            try:
                x.encode("utf-8")
            except UnicodeEncodeError as e:
                raise BodyError(f"'{_path(path) or 'body'}' is not valid Unicode: a lone surrogate "
                                f"{x[e.start]!r} at position {e.start}", _path(path)) from None
        elif t is _BadNumber:
            raise BodyError(f"'{_path(path) or 'body'}': {_describe_number(x.text)}", _path(path))
        elif t is dict or t is list:
            if depth > MAX_DEPTH:
                raise BodyError(f"the JSON body nests deeper than {MAX_DEPTH} levels")
            if t is dict:
                for k, v in x.items():
                    stack.append((k, path, depth))   # keys are strings: the same Unicode check
                    stack.append((v, path + (k,), depth + 1))
            elif not all(type(v) is int for v in x):   # the common large case: a token-id prompt
                stack.extend((v, path + (i,), depth + 1) for i, v in enumerate(x))


def load_json(raw: bytes):
    """Bytes -> a JSON value within the limits above, or ``BodyError``."""
    try:
        obj = json.loads(raw, parse_int=_parse_int, parse_float=_parse_float, parse_constant=_BadNumber)
    except RecursionError:
        raise BodyError(f"the JSON body nests deeper than {MAX_DEPTH} levels") from None
    except UnicodeDecodeError as e:
        raise BodyError(f"the request body is not valid UTF-8: {e.reason} at byte {e.start}") from None
    except ValueError as e:   # JSONDecodeError
        raise BodyError(f"the request body is not valid JSON: {e}") from None
    _check_tree(obj)
    return obj


# ---------------------------------------------------------------------------------------------------
# models
# ---------------------------------------------------------------------------------------------------
class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class StreamOptions(_Strict):
    include_usage: Optional[bool] = None


Real = Optional[float]


# Accepted only at these values: a client library may send them with their defaults.
NEUTRAL = {"logit_bias": (None, {}), "suffix": (None, ""), "best_of": (None, 1), "tools": (None, []),
           "tool_choice": (None, "none"), "functions": (None, []), "function_call": (None, "none"),
           "parallel_tool_calls": (None, True, False), "response_format": (None, {"type": "text"}),
           "store": (None, False), "metadata": (None, {}), "service_tier": (None, "auto", "default"),
           "modalities": (None, ["text"]), "reasoning_effort": (None,), "prediction": (None,), "audio": (None,),
           "web_search_options": (None,)}


class _Sampling(_Strict):
    """The fields both endpoints share. ``None`` everywhere means "the default"."""

    model: str = Field(min_length=1)
    max_tokens: Optional[int] = Field(None, ge=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    temperature: Real = Field(None, ge=0, le=2)
    top_p: Real = Field(None, gt=0, le=1)
    top_k: Optional[int] = Field(None, ge=-1)
    min_p: Real = Field(None, ge=0, le=1)
    repetition_penalty: Real = Field(None, gt=0, le=100)
    presence_penalty: Real = Field(None, ge=-2, le=2)
    frequency_penalty: Real = Field(None, ge=-2, le=2)
    min_tokens: Optional[int] = Field(None, ge=0)
    stop: Any = None
    stop_token_ids: Optional[list[int]] = Field(None, max_length=MAX_STOP_TOKEN_IDS)
    seed: Optional[int] = Field(None, ge=0, le=2**63 - 1)
    n: Optional[int] = Field(None, ge=1, le=MAX_CHOICES)
    stream: Optional[bool] = None
    stream_options: Optional[StreamOptions] = None
    user: Optional[str] = None
    ignore_eos: Optional[bool] = None
    # refused unless neutral (NEUTRAL)
    logit_bias: Any = None
    suffix: Any = None
    best_of: Any = None
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    parallel_tool_calls: Any = None
    response_format: Any = None
    store: Any = None
    metadata: Any = None
    service_tier: Any = None
    modalities: Any = None
    reasoning_effort: Any = None
    prediction: Any = None
    audio: Any = None
    web_search_options: Any = None

    @field_validator("stop", mode="before")
    @classmethod
    def _stop(cls, v):
        if v is None:
            return []
        if isinstance(v, str):
            v = [v]
        if not (isinstance(v, list) and all(isinstance(s, str) and s for s in v)) or len(v) > MAX_STOPS:
            raise ValueError(f"must be a non-empty string or a list of at most {MAX_STOPS} such strings")
        return v

    @field_validator("stop_token_ids")
    @classmethod
    def _stop_ids(cls, v):
        if v is not None and any(t < 0 for t in v):
            raise ValueError("token ids must be >= 0")
        return v

    @model_validator(mode="after")
    def _cross(self):
        for key, neutral in NEUTRAL.items():
            if getattr(self, key) not in neutral:
                raise _FieldError(key, f"'{key}' is not supported by this server (only its default, "
                                  f"{neutral[-1]!r} or null, is accepted)")
        if self.stream_options is not None and not self.stream:
            raise _FieldError("stream_options", "'stream_options' is only allowed with stream=true")
        if (self.max_tokens is not None and self.max_completion_tokens is not None
                and self.max_tokens != self.max_completion_tokens):
            raise _FieldError("max_completion_tokens", "'max_tokens' and 'max_completion_tokens' disagree "
                              f"({self.max_tokens} and {self.max_completion_tokens}); give one of them")
        limit = self.max_completion_tokens or self.max_tokens
        if self.min_tokens and limit is not None and self.min_tokens > limit:
            raise _FieldError("min_tokens", f"'min_tokens' ({self.min_tokens}) is over the maximum number of "
                              f"tokens to generate ({limit})")
        return self


class CompletionRequest(_Sampling):
    """POST /v1/completions. ``prompt``: a string, a list of token ids, or a non-empty list of either."""

    prompt: Any
    logprobs: Optional[int] = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: Optional[bool] = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt(cls, p):
        if isinstance(p, str):
            prompts = [p]
        elif isinstance(p, list) and p and all(type(t) is int for t in p):
            prompts = [p]
        elif isinstance(p, list) and p and all(isinstance(x, str) or (isinstance(x, list) and
                                                                      all(type(t) is int for t in x)) for x in p):
            prompts = list(p)
        else:
            raise ValueError("must be a string, a list of token ids, or a non-empty list of strings or of "
                             "token-id lists")
        if any(len(x) == 0 for x in prompts):
            raise ValueError("must not be empty")
        if any(t < 0 for x in prompts if isinstance(x, list) for t in x):
            raise ValueError("token ids must be >= 0")
        return prompts

    @model_validator(mode="after")
    def _echo(self):
        if self.echo and self.logprobs is not None:
            raise _FieldError("echo", "'echo' together with 'logprobs' is not supported (this server does not "
                              "compute the prompt's log-probabilities)")
        if len(self.prompt) * (self.n or 1) > MAX_CHOICES:
            raise _FieldError("n", f"prompts x n = {len(self.prompt) * (self.n or 1)} is over the limit of "
                              f"{MAX_CHOICES} choices")
        return self


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Any = None

    @field_validator("content", mode="before")
    @classmethod
    def _content(cls, c):
        if c is None or isinstance(c, str):
            return c
        if isinstance(c, list) and all(isinstance(x, dict) and x.get("type") == "text" and isinstance(x.get("text"), str)
                                       and set(x) == {"type", "text"} for x in c):
            return [TextPart(type="text", text=x["text"]) for x in c]
        raise ValueError("must be a string or a list of {\"type\": \"text\", \"text\": ...} parts")

    def text(self) -> str:
        c = self.content
        return "" if c is None else c if isinstance(c, str) else "".join(p.text for p in c)


class ChatRequest(_Sampling):
    """POST /v1/chat/completions: ``messages`` = [{role, content}]."""

    messages: list[Message] = Field(min_length=1)
    logprobs: Optional[bool] = None
    top_logprobs: Optional[int] = Field(None, ge=0, le=MAX_LOGPROBS)

    @model_validator(mode="after")
    def _top(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise _FieldError("top_logprobs", "'top_logprobs' needs 'logprobs': true")
        return self


class _FieldError(ValueError):
    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param, self.message = param, message


def _first_error(e: ValidationError) -> BodyError:
    err = e.errors(include_url=False)[0]
    loc = err["loc"]
    ctx = err.get("ctx") or {}
    cause = ctx.get("error")
    if isinstance(cause, _FieldError):
        return BodyError(cause.message, cause.param)
    param = _path(loc)
    if err["type"] == "extra_forbidden":
        return BodyError(f"unknown field '{param}': this server does not implement it (see the README for the "
                         "fields it honours)", param)
    if err["type"] == "missing":
        return BodyError(f"'{param}' is required", param)
    msg = err["msg"].removeprefix("Value error, ")
    got = err.get("input")
    shown = "" if isinstance(got, (dict, list)) or got is None else f", got {got!r:.60}"
    return BodyError(f"'{param}': {msg}{shown}" if param else f"{msg}{shown}", param)


def parse(model: type[_Sampling], body) -> _Sampling:
    """A parsed JSON value -> ``model``, or ``BodyError`` naming the first bad field."""
    if not isinstance(body, dict):
        raise BodyError("the request body must be a JSON object")
    try:
        return model.model_validate(body)
    except ValidationError as e:
        raise _first_error(e) from None
