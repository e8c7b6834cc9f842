"""OpenAI's Responses API (`POST /v1/responses`) over the chat machinery: the request becomes a chat request (the same
template, tools, grammars and checks), the answer becomes Responses output items, streamed as Responses events.

    client.responses.create(model=m, input="Say hi", instructions="Be brief", max_output_tokens=32)
    client.responses.create(model=m, input=[...messages, function_call and function_call_output items...],
                            tools=[{"type": "function", "name": "get_weather", "parameters": {...}}], stream=True)

Taken: `input` (a string, or message items with text content: role user / assistant / system / developer, and the
function_call / function_call_output items of a tool loop), `instructions` (a system message first), `tools`
(function tools), `tool_choice`, `text.format` (text, json_object, json_schema), `max_output_tokens`, `temperature`,
`top_p`, `stream`, `parallel_tool_calls`, `metadata`, `user`, `store` (nothing is stored: the answer says
`store: false`). Refused with a 400 naming them: `previous_response_id` and `background` (this server keeps no
responses: send the whole conversation as `input`), `reasoning` with an effort, `truncation: "auto"`, `include`,
other tool types (web search, files, ...) and other input kinds (images, files). The answer: a message item with one
`output_text` part, and a `function_call` item per tool call; status "incomplete" (reason max_output_tokens) for
an answer cut at its length. Streamed: response.created, response.in_progress, then per item output_item.added /
content_part.added / output_text.delta ... / output_text.done / content_part.done / output_item.done (function calls:
output_item.added, function_call_arguments.delta ... .done, output_item.done), then response.completed (or
response.incomplete), every event with its sequence_number; a failure mid-stream: an `error` event, then
response.failed.
"""
from __future__ import annotations

import json
import time
import uuid
from typing import List, Literal, Optional, Union

from fastapi import Request
from pydantic import ConfigDict, Field, ValidationError

from . import tools
from .schemas import ApiError, ChatRequest, _Strict, parse_body, read_body
from .sse import EngineStream
# `Server` in annotations: app.Server (app imports this module, so not imported back)


class _Item(_Strict):
    # items a client echoes back from earlier answers carry fields this server does not use (ids, status, logprobs)
    model_config = ConfigDict(extra="ignore", strict=True)


class TextContent(_Item):
    type: Literal["input_text", "output_text"]
    text: str


class MessageItem(_Item):
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: Union[str, List[TextContent]]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class FunctionCallItem(_Item):
    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str


class FunctionCallOutputItem(_Item):
    type: Literal["function_call_output"]
    call_id: str
    output: str


class FunctionTool(_Strict):
    type: Literal["function"]
    name: str
    description: Optional[str] = None
    parameters: Optional[dict] = None
    strict: Optional[bool] = None


class ToolChoiceFunction(_Strict):
    type: Literal["function"]
    name: str


class TextFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    name: Optional[str] = None
    description: Optional[str] = None
    schema_: Optional[dict] = Field(None, alias="schema")
    strict: Optional[bool] = None


class TextConfig(_Strict):
    format: Optional[TextFormat] = None
    verbosity: Optional[Literal["low", "medium", "high"]] = None


class ResponsesRequest(_Strict):
    model: str
    input: Union[str, List[Union[MessageItem, FunctionCallItem, FunctionCallOutputItem]]]
    instructions: Optional[str] = None
    max_output_tokens: Optional[int] = Field(None, ge=1)
    temperature: Optional[float] = Field(None, ge=0, le=2)
    top_p: Optional[float] = Field(None, gt=0, le=1)
    stream: bool = False
    tools: Optional[List[FunctionTool]] = None
    tool_choice: Optional[Union[Literal["none", "auto", "required"], ToolChoiceFunction]] = None
    text: Optional[TextConfig] = None
    parallel_tool_calls: Optional[bool] = None
    store: Optional[bool] = None
    metadata: Optional[dict] = None
    user: Optional[str] = None
    previous_response_id: Optional[str] = None
    background: Optional[bool] = None
    reasoning: Optional[dict] = None
    truncation: Optional[Literal["disabled", "auto"]] = None
    include: Optional[List[str]] = None
    ignore_eos: bool = False                 # extension (as the chat API's): generate to max_output_tokens

    def check(self) -> None:
        """The fields this server takes but cannot honour: a 400 naming each."""
        if self.previous_response_id is not None or self.background:
            name = "previous_response_id" if self.previous_response_id is not None else "background"
            raise ApiError(400, f"{name} is not supported: this server keeps no responses; send the whole "
                           "conversation as input", param=name)
        if self.reasoning and any(v is not None for v in self.reasoning.values()):
            raise ApiError(400, "reasoning is not supported with this model", param="reasoning")
        if self.truncation == "auto":
            raise ApiError(400, "truncation='auto' is not supported: shorten the input (a prompt past session_len "
                           "is a 400 naming its length)", param="truncation")
        if self.include:
            raise ApiError(400, f"include={self.include!r} is not supported", param="include")
        fmt = self.text.format if self.text else None
        if fmt is not None and fmt.type == "json_schema" and (fmt.name is None or fmt.schema_ is None):
            raise ApiError(400, "text.format: a json_schema format needs its name and schema", param="text.format")


ITEM_TYPES = {"message", "function_call", "function_call_output"}


def parse(raw: bytes) -> ResponsesRequest:
    """The body -> a checked ResponsesRequest; other input kinds and tool types are a 400 naming them."""
    return parse_body(raw, ResponsesRequest, precheck=_kinds)


def _kinds(data: dict) -> None:
    """Input items, content parts and tools of kinds this server does not take: a 400 naming where."""
    for i, item in enumerate(data.get("input") if isinstance(data.get("input"), list) else []):
        kind = item.get("type", "message") if isinstance(item, dict) else None
        if isinstance(kind, str) and kind not in ITEM_TYPES:
            raise ApiError(400, f"input.{i}: items of type {kind!r} are not supported: this server takes text "
                           "messages, function calls and their outputs", param=f"input.{i}.type")
        parts = item.get("content") if isinstance(item, dict) else None
        for j, p in enumerate(parts if isinstance(parts, list) else []):
            t = p.get("type") if isinstance(p, dict) else None
            if isinstance(t, str) and t not in ("input_text", "output_text"):
                raise ApiError(400, f"input.{i}.content.{j}: content of type {t!r} is not supported: this server "
                               "reads text only", param=f"input.{i}.content.{j}.type")
    for i, t in enumerate(data.get("tools") if isinstance(data.get("tools"), list) else []):
        kind = t.get("type") if isinstance(t, dict) else None
        if isinstance(kind, str) and kind != "function":
            raise ApiError(400, f"tools.{i}: tools of type {kind!r} are not supported (function tools only)",
                           param=f"tools.{i}.type")


def to_chat(req: ResponsesRequest) -> ChatRequest:
    """The same request as a chat completion (the chat template, tools and grammar path the chat API takes)."""
    msgs = [{"role": "system", "content": req.instructions}] if req.instructions else []
    for item in [MessageItem(role="user", content=req.input)] if isinstance(req.input, str) else req.input:
        if isinstance(item, MessageItem):
            msgs.append({"role": item.role, "content": item.text()})
        elif isinstance(item, FunctionCallItem):
            call = {"id": item.call_id, "type": "function",
                    "function": {"name": item.name, "arguments": item.arguments}}
            if msgs and msgs[-1]["role"] == "assistant" and "tool_calls" in msgs[-1]:
                msgs[-1]["tool_calls"].append(call)           # parallel calls: one assistant turn
            elif msgs and msgs[-1]["role"] == "assistant":
                msgs[-1]["tool_calls"] = [call]                # its text, then its calls
            else:
                msgs.append({"role": "assistant", "content": None, "tool_calls": [call]})
        else:
            msgs.append({"role": "tool", "tool_call_id": item.call_id, "content": item.output})
    d: dict = {"model": req.model, "messages": msgs, "stream": req.stream, "ignore_eos": req.ignore_eos}
    for ours, theirs in (("max_output_tokens", "max_tokens"), ("temperature", "temperature"), ("top_p", "top_p"),
                         ("user", "user")):
        if getattr(req, ours) is not None:
            d[theirs] = getattr(req, ours)
    if req.tools:
        d["tools"] = [{"type": "function", "function": t.model_dump(exclude={"type"}, exclude_none=True)}
                      for t in req.tools]
    if req.tool_choice is not None:
        tc = req.tool_choice
        d["tool_choice"] = tc if isinstance(tc, str) else {"type": "function", "function": {"name": tc.name}}
    fmt = req.text.format if req.text else None
    if fmt is not None and fmt.type != "text":
        d["response_format"] = {"type": fmt.type} if fmt.type == "json_object" else {
            "type": "json_schema", "json_schema": {k: v for k, v in (("name", fmt.name), ("schema", fmt.schema_),
                                                                    ("description", fmt.description),
                                                                    ("strict", fmt.strict)) if v is not None}}
    try:
        chat = ChatRequest.model_validate(d)
    except ValidationError as e:
        err = e.errors(include_url=False)[0]
        raise ApiError(400, f"input: {err['msg']} at {'.'.join(map(str, err['loc']))}", param="input") from None
    chat.check()
    tools.check(chat)
    return chat


class Answer:
    """One response's output items, built from the chat Reply's deltas; events() gives the stream's events for each
    delta as it comes (the whole answer is the same items, for the non-streamed reply)."""

    def __init__(self):
        self.items: list[dict] = []
        self.open: Optional[dict] = None          # the item text or arguments are going into

    def _add(self, item: dict) -> list[dict]:
        self.items.append(item)
        i = len(self.items) - 1
        out = [{"type": "response.output_item.added", "output_index": i, "item": _copy(item)}]
        if item["type"] == "message":
            out.append({"type": "response.content_part.added", "item_id": item["id"], "output_index": i,
                        "content_index": 0, "part": {"type": "output_text", "text": "", "annotations": []}})
        self.open = item
        return out

    def _close(self, status: str = "completed") -> list[dict]:
        item, self.open = self.open, None
        if item is None:
            return []
        i = self.items.index(item)
        item["status"] = status
        if item["type"] == "message":
            part = item["content"][0]
            return [{"type": "response.output_text.done", "item_id": item["id"], "output_index": i, "content_index": 0,
                     "text": part["text"]},
                    {"type": "response.content_part.done", "item_id": item["id"], "output_index": i,
                     "content_index": 0, "part": dict(part)},
                    {"type": "response.output_item.done", "output_index": i, "item": _copy(item)}]
        return [{"type": "response.function_call_arguments.done", "item_id": item["id"], "output_index": i,
                 "arguments": item["arguments"]},
                {"type": "response.output_item.done", "output_index": i, "item": _copy(item)}]

    def delta(self, d: dict) -> list[dict]:
        """A chat delta ({"content": ...} or {"tool_calls": [...]}) -> the Responses events it makes."""
        out: list[dict] = []
        if d.get("content"):
            if self.open is None or self.open["type"] != "message":
                out += self._close()
                out += self._add({"type": "message", "id": f"msg_{uuid.uuid4().hex}", "status": "in_progress",
                                  "role": "assistant",
                                  "content": [{"type": "output_text", "text": "", "annotations": []}]})
            self.open["content"][0]["text"] += d["content"]
            out.append({"type": "response.output_text.delta", "item_id": self.open["id"],
                        "output_index": len(self.items) - 1, "content_index": 0, "delta": d["content"]})
        for c in d.get("tool_calls") or []:
            fn = c.get("function", {})
            if "id" in c:                          # a new call
                out += self._close()
                out += self._add({"type": "function_call", "id": f"fc_{uuid.uuid4().hex}", "call_id": c["id"],
                                  "name": fn["name"], "arguments": "", "status": "in_progress"})
            if fn.get("arguments"):
                self.open["arguments"] += fn["arguments"]
                out.append({"type": "response.function_call_arguments.delta", "item_id": self.open["id"],
                            "output_index": len(self.items) - 1, "delta": fn["arguments"]})
        return out

    def finish(self, reason: Optional[str]) -> list[dict]:
        """Close the open item (incomplete where the answer was cut at its length: a call's arguments may be cut
        too); an answer with no text and no call still gets its (empty) message."""
        status = "incomplete" if reason == "length" else "completed"
        out = self._close(status)
        if not self.items:
            out += self._add({"type": "message", "id": f"msg_{uuid.uuid4().hex}", "status": "in_progress",
                              "role": "assistant", "content": [{"type": "output_text", "text": "", "annotations": []}]})
            out += self._close(status)
        return out


def _copy(item: dict) -> dict:
    return json.loads(json.dumps(item))


def response_object(rid: str, created: int, req: ResponsesRequest, chat: ChatRequest, srv: "Server",
                    output: list, reason: Optional[str], usage: Optional[dict], status: Optional[str] = None) -> dict:
    """The Response object (status from the finish reason: "length" is incomplete for max_output_tokens)."""
    if status is None:
        status = "incomplete" if reason == "length" else "completed"
    fmt = req.text.format.model_dump(by_alias=True, exclude_none=True) if req.text and req.text.format else \
        {"type": "text"}
    d = srv.defaults
    return {"id": rid, "object": "response", "created_at": created, "status": status, "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "instructions": req.instructions, "max_output_tokens": req.max_output_tokens, "model": srv.model_name,
            "output": output, "parallel_tool_calls": req.parallel_tool_calls is not False,
            "previous_response_id": None, "reasoning": {"effort": None, "summary": None}, "store": False,
            "temperature": req.temperature if req.temperature is not None else d["temperature"],
            "text": {"format": fmt}, "tool_choice": _tool_choice(req), "tools": [
                t.model_dump(exclude_none=True) for t in req.tools or []],
            "top_p": req.top_p if req.top_p is not None else d["top_p"], "truncation": "disabled",
            "usage": usage, "user": req.user, "metadata": req.metadata or {}}


def _tool_choice(req: ResponsesRequest):
    tc = req.tool_choice
    return tc.model_dump() if isinstance(tc, ToolChoiceFunction) else (tc or ("auto" if req.tools else "none"))


def _usage(prompt: int, completion: int) -> dict:
    return {"input_tokens": prompt, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": completion,
            "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": prompt + completion}


async def respond(srv: "Server", request: Request):
    """POST /v1/responses: the JSON Response, or its event stream."""
    t_arrival = time.perf_counter()
    req = parse(await read_body(request))
    srv.check_model(req.model)
    chat = to_chat(req)
    pending = srv.submit([srv.chat_prompt(chat)], chat)
    rid, created = f"resp_{uuid.uuid4().hex}", int(time.time())
    reply = tools.Reply.for_request(chat)
    if not req.stream:
        r = (await srv.collect(request, pending, t_arrival))[0]
        answer = Answer()
        for d in reply.deltas(r["text"]) + reply.finish(r["finish_reason"])[0]:
            answer.delta(d)
        answer.finish(r["finish_reason"])
        return response_object(rid, created, req, chat, srv, answer.items, r["finish_reason"],
                               _usage(r["prompt_tokens"], r["completion_tokens"]))
    srv.latency["streams"] += 1
    srv.latency["submit_s"] += time.perf_counter() - t_arrival
    return EngineStream(_events(srv, req, chat, pending, reply, rid, created, t_arrival), on_disconnect=pending.cancel)


async def _events(srv: "Server", req, chat, pending, reply, rid: str, created: int, t_arrival: float):
    seq = 0

    def sse(ev: dict) -> str:
        nonlocal seq
        ev["sequence_number"] = seq
        seq += 1
        return f"event: {ev['type']}\ndata: {json.dumps(ev)}\n\n"
    start = response_object(rid, created, req, chat, srv, [], None, None, status="in_progress")
    yield sse({"type": "response.created", "response": start}) + sse({"type": "response.in_progress",
                                                                      "response": start})
    h, answer = pending.handles[0], Answer()
    timer, first = srv.metrics.request(t_arrival), True
    try:
        async for out in h.aiter():
            timer.observe(out)
            if out.token_ids and first:
                first = False
                srv.latency["first_chunks"] += 1
                srv.latency["ttft_s"] += time.perf_counter() - t_arrival
            if out.finish_reason == "error":
                srv.counts["requests_failed"] += 1
                pending.finished(0, "error")
                failed = response_object(rid, created, req, chat, srv, answer.items, None, None, status="failed")
                failed["error"] = {"code": "server_error", "message": f"generation failed: {out.error}"}
                yield sse({"type": "error", "code": "server_error", "message": f"generation failed: {out.error}",
                           "param": None}) + sse({"type": "response.failed", "response": failed})
                return
            events = [e for d in reply.deltas(out.text) for e in answer.delta(d)]
            if out.finished:
                pending.finished(0, out.finish_reason)
                events += [e for d in reply.finish(out.finish_reason)[0] for e in answer.delta(d)]
                events += answer.finish(out.finish_reason)
                done = response_object(rid, created, req, chat, srv, answer.items, out.finish_reason,
                                       _usage(out.num_prompt_tokens, out.num_generated_tokens))
                events.append({"type": "response.incomplete" if done["status"] == "incomplete" else
                               "response.completed", "response": done})
            if events:
                yield "".join(sse(e) for e in events)
    finally:
        pending.cancel()
