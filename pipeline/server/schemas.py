"""Request bodies of the OpenAI-compatible API (pydantic, strict) and OpenAI-style errors.

Strict types: a wrong type (`"max_tokens": "10"`) is a 400 naming the field, never silently coerced (integral
floats, `"max_tokens": 1.0`, are accepted for integer fields, as OpenAI and vLLM do). Fields: an unknown one at the
top level or in a chat message (`"temprature": 0`, a newer client's field) is dropped and logged once per name, as
vLLM does; the OpenAI fields in IGNORED change nothing here and are dropped; those in UNSUPPORTED (audio output,
legacy function calling, ...) are a 400 naming them unless given their "off" value. Extensions beyond OpenAI's fields: top_k, min_p,
repetition_penalty, ignore_eos (used by bench/serve.py to fix output lengths). Logprobs: at most MAX_LOGPROBS
top tokens (vLLM's default limit); `max_tokens: 0` only with `echo` (the prompt scored, nothing generated). Tools
and response_format are turned into prompts, grammars and answers by tools.py.
"""
from __future__ import annotations

import json
import logging
import re
from typing import Dict, List, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

log = logging.getLogger("pipeline.server")


class ApiError(Exception):
    """An error answered as OpenAI does: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, *, param: Optional[str] = None, code: Optional[str] = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


def _any(value, data: dict) -> Optional[str]:
    return None


def _null_only(value, data: dict) -> Optional[str]:
    return None if value is None else "is not supported (only null)"


def _refused(why: str):
    return lambda value, data: None if value is None else why


def _text_only(value, data: dict) -> Optional[str]:
    return None if value in (None, ["text"]) else f"={value!r} is not supported: this server answers text only"


def _best_of(value, data: dict) -> Optional[str]:
    n = data.get("n", 1)
    return None if value in (None, 1, n) else f"={value!r} is not supported (only best_of = n: ask for n choices)"


# OpenAI request fields that change nothing on this server: accepted and dropped before validation.
# name -> check(value, body) giving None (ignore it) or why this value is refused (a 400 naming the field).
IGNORED = {
    "store": _any,                  # store the completion for OpenAI's distillation / evals
    "metadata": _any,               # tags for stored completions
    "service_tier": _any,           # OpenAI's latency tier
    "parallel_tool_calls": _any,    # "auto" answers every <tool_call> the model writes; a forced choice one
    "prediction": _null_only,       # predicted outputs (speculative content)
}
# OpenAI request fields this server cannot honour: a 400 naming the field (unless given its "off" value).
UNSUPPORTED = {
    "audio": _refused("is not supported: this server answers text only"),
    "modalities": _text_only,
    "web_search_options": _refused("is not supported: this server has no web search"),
    "functions": _refused("(the legacy function calling) is not supported: send them as tools"),
    "function_call": _refused("(the legacy function calling) is not supported: use tool_choice"),
    "best_of": _best_of,
}
_unknown_logged: set = set()   # (endpoint model, field) pairs already logged
MAX_BODY = 4 << 20   # bytes of a request body
SEED_MIN, SEED_MAX = -(2 ** 63), 2 ** 64 - 1      # what torch.Generator.manual_seed takes
MAX_LOGPROBS, MAX_N = 20, 128                     # top logprobs per token (vLLM's default), choices per prompt


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class FunctionCall(_Strict):
    name: str
    arguments: str                      # JSON text, as OpenAI sends it


class ToolCall(_Strict):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Optional[Union[str, List[TextPart]]] = None   # null only in an assistant turn with tool_calls
    name: Optional[str] = None
    tool_calls: Optional[List[ToolCall]] = None             # assistant
    tool_call_id: Optional[str] = None                      # tool

    def text(self) -> str:
        if self.content is None:
            return ""
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class FunctionDef(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    description: Optional[str] = None
    parameters: Optional[dict] = None   # a JSON Schema; none: no arguments
    strict: Optional[bool] = None


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionDef


class FunctionName(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: FunctionName


class JsonSchemaFormat(_Strict):
    name: str
    description: Optional[str] = None
    schema_: Optional[dict] = Field(None, alias="schema")
    strict: Optional[bool] = None


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: Optional[JsonSchemaFormat] = None


class StreamOptions(_Strict):
    include_usage: bool = False
    continuous_usage_stats: bool = False   # vLLM's extension: usage (tokens so far) in every chunk


class _Sampling(_Strict):
    model: str
    max_tokens: Optional[int] = Field(None, ge=0)              # 0: completions with echo only (checked below)
    max_completion_tokens: Optional[int] = Field(None, ge=1)   # newer name of max_tokens
    temperature: Optional[float] = Field(None, ge=0, le=2)
    top_p: Optional[float] = Field(None, gt=0, le=1)
    top_k: Optional[int] = Field(None, ge=0)                    # extension
    repetition_penalty: Optional[float] = Field(None, gt=0)    # extension
    ignore_eos: bool = False                                    # extension
    stop: Optional[Union[str, List[str]]] = None
    seed: Optional[int] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    n: int = Field(1, ge=1, le=MAX_N)                          # choices per prompt (they share its KV blocks)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    min_p: Optional[float] = Field(None, ge=0, le=1)            # extension (vLLM's)
    logit_bias: Optional[Dict[str, float]] = None               # token id (a string) -> -100..100
    response_format: Optional[ResponseFormat] = None
    user: Optional[str] = None

    @field_validator("max_tokens", "max_completion_tokens", "top_k", "seed", "n", mode="before")
    @classmethod
    def _integral_float(cls, v):
        return int(v) if isinstance(v, float) and v.is_integer() else v

    def check(self) -> None:
        """What pydantic's field constraints cannot say."""
        if self.seed is not None and not SEED_MIN <= self.seed <= SEED_MAX:
            raise ApiError(400, f"seed={self.seed} is out of range: give an integer from -2^63 to 2^64-1 "
                           f"({SEED_MIN}..{SEED_MAX})", param="seed")
        if self.max_tokens == 0 and not getattr(self, "echo", False):
            raise ApiError(400, "max_tokens=0 is only allowed on /v1/completions with echo=true (it scores the "
                           "prompt); ask for at least 1 token", param="max_tokens")
        for key, bias in (self.logit_bias or {}).items():
            if not key.strip().isdigit() or not -100 <= bias <= 100:
                raise ApiError(400, f"logit_bias maps token ids (strings of digits) to -100..100; got {key!r}: {bias}",
                               param="logit_bias")
        rf = self.response_format
        if rf is not None and (rf.type == "json_schema") != (rf.json_schema is not None):
            raise ApiError(400, "response_format: give json_schema exactly when type is 'json_schema'",
                           param="response_format")
        stops = self.stop_list()
        if len(stops) > 16 or any(not s for s in stops):
            raise ApiError(400, f"stop must be up to 16 non-empty strings; got {stops!r}", param="stop")
        if self.stream_options is not None and not self.stream:
            raise ApiError(400, "stream_options is only allowed with stream=true", param="stream_options")
        if self.max_tokens is not None and self.max_completion_tokens is not None:
            raise ApiError(400, "give max_tokens or max_completion_tokens, not both", param="max_tokens")

    def stop_list(self) -> List[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def requested_max_tokens(self) -> Optional[int]:
        return self.max_tokens if self.max_tokens is not None else self.max_completion_tokens


class ChatRequest(_Sampling):
    messages: List[ChatMessage] = Field(min_length=1)
    logprobs: Optional[bool] = None
    top_logprobs: Optional[int] = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: Optional[List[Tool]] = None
    tool_choice: Optional[Union[Literal["none", "auto", "required"], NamedToolChoice]] = None

    def check(self) -> None:
        super().check()
        if self.top_logprobs is not None and not self.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs=true", param="top_logprobs")

    def logprobs_k(self) -> Optional[int]:
        """Top logprobs per generated token (None: no logprobs)."""
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(_Sampling):
    prompt: Union[str, List[str], List[int], List[List[int]]]   # text, texts, token ids, or a batch of token ids
    echo: bool = False
    logprobs: Optional[int] = Field(None, ge=0, le=MAX_LOGPROBS)
    suffix: Optional[str] = None

    def check(self) -> None:
        super().check()
        p = self.prompt
        # a list of ints or strings holds no lists (pydantic took one of the union's homogeneous list types): only a
        # batch of token-id lists is walked (a walk over a 1,200-id prompt was 60% of parsing it, ~160 us)
        if isinstance(p, list) and (not p or (isinstance(p[0], list) and any(not x for x in p))):
            raise ApiError(400, "prompt is an empty list (or holds one); give a string, a list of strings, a list of "
                           "token ids or a list of token-id lists", param="prompt")
        if self.suffix:
            raise ApiError(400, "suffix is not supported", param="suffix")

    def logprobs_k(self) -> Optional[int]:
        return self.logprobs


def _describe(err: dict) -> str:
    loc = ".".join(str(p) for p in err["loc"])
    if err["type"] == "extra_forbidden":
        return f"unknown field '{loc}' (not part of this endpoint's request body)"
    if err["type"] == "missing":
        return f"missing required field '{loc}'"
    got = err.get("input")
    shown = json.dumps(got)[:80] if isinstance(got, (str, int, float, bool, type(None))) else type(got).__name__
    return f"'{loc}': {err['msg']} (got {shown})"


def _is_union_tag(p) -> bool:
    """pydantic names union branches in an error's loc ('str', 'list[int]', 'TextPart'); fields are lowercase."""
    return isinstance(p, str) and (p in ("str", "int", "float", "bool") or "[" in p or p[:1].isupper()
                                   or p.startswith(("literal", "function")))


# a JSON escape of a UTF-16 surrogate (\ud800-\udfff): the only way a lone surrogate gets into json.loads' output
# from UTF-8 bytes (raw UTF-8 cannot encode one), so bodies without it skip the walk below (a 1,000-token prompt
# list: ~0.3 ms of the front end's event loop)
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def _check_strings(data) -> None:
    """A lone surrogate ("\\ud800", valid JSON but not UTF-8) anywhere in the body: a 400 naming where.
    Iterative, so any depth json.loads returned is fine."""
    stack = [((), data)]
    while stack:
        path, v = stack.pop()
        if isinstance(v, dict):
            stack.extend((path + (k,), x) for k, x in v.items())
            items = v.keys()
        elif isinstance(v, list):
            stack.extend((path + (i,), x) for i, x in enumerate(v))
            items = ()
        else:
            items = (v,) if isinstance(v, str) else ()
        for s in items:
            try:
                s.encode("utf-8")
            except UnicodeEncodeError:
                at = path + (s,) if isinstance(v, dict) else path          # a key: name the key itself
                where = ".".join(ascii(p)[1:-1] if isinstance(p, str) else str(p) for p in at)
                raise ApiError(400, f"'{where}': the string {ascii(s)[:80]} has a lone surrogate (not valid "
                               "Unicode text)", param=where) from None


def _drop_unknown(data: dict, model: type[_Strict], where: str) -> None:
    """Drop the keys `model` does not know, logging each name once per model (as vLLM does: a client's newer field
    must not break a request; a typo shows in the server's log)."""
    known = {f.alias or name for name, f in model.model_fields.items()}
    for name in [k for k in data if k not in known]:
        del data[name]
        if (where, name) not in _unknown_logged:
            _unknown_logged.add((where, name))
            log.warning("ignoring unknown field %r in %s (logged once per field)", name, where)


async def read_body(request) -> bytes:
    """A request's body (a starlette Request), ApiError(413) past MAX_BODY bytes."""
    chunks, n = [], 0
    async for c in request.stream():
        n += len(c)
        if n > MAX_BODY:
            raise ApiError(413, f"request body over {MAX_BODY} bytes", code="body_too_large")
        chunks.append(c)
    return b"".join(chunks)


def parse_body(raw: bytes, model: type[_Strict], precheck=None) -> _Strict:
    """bytes -> a checked request, or ApiError(400) naming what is wrong. precheck(data): the endpoint's own look at
    the decoded JSON object before the field checks (an ApiError naming what it refuses)."""
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None
    except RecursionError:
        raise ApiError(400, "the request body is nested too deeply", code="invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {type(data).__name__}", code="invalid_json")
    if _SURROGATE_ESCAPE.search(raw):
        _check_strings(data)
    if precheck is not None:
        precheck(data)
    for name, check in {**IGNORED, **UNSUPPORTED}.items():
        if name in data:
            why = check(data[name], data)
            if why is not None:
                raise ApiError(400, f"{name} {why}", param=name)
            del data[name]
    _drop_unknown(data, model, model.__name__)
    if model is ChatRequest and isinstance(data.get("messages"), list):
        for m in data["messages"]:
            if isinstance(m, dict):
                _drop_unknown(m, ChatMessage, "ChatMessage")
    try:
        req = model.model_validate(data)
    except ValidationError as e:
        msgs, seen = [], set()
        for err in e.errors(include_url=False):
            loc = tuple(p for p in err["loc"] if not _is_union_tag(p))
            if loc not in seen:     # a union (content: str | list) reports one error per branch: keep one
                seen.add(loc)
                msgs.append((loc, _describe({**err, "loc": loc})))
        param = ".".join(str(p) for p in msgs[0][0])
        raise ApiError(400, "; ".join(m for _, m in msgs[:3]), param=param or None) from None
    req.check()
    return req
