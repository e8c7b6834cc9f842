"""Tools and structured output of the chat API: prompts, grammar constraints and OpenAI-shaped answers.

    check(req)                                    # 400s naming tools / tool_choice / messages / response_format
    msgs, tools = prompt_messages(req, template)  # for engine.apply_chat_template(msgs, tools=tools)
    schema = constraint(req)                      # JSON Schema text for SamplingParams.json_schema, or None
    reply = Reply.for_request(req)                # one per choice: text pieces -> message / stream deltas
    message, finish_reason = reply.message(text, reason)
    deltas = reply.deltas(piece); last, finish_reason = reply.finish(reason)

tool_choice (default "auto" with tools, "none" without):
- a named function: the output is that function's arguments, constrained by its `parameters` schema;
- "required": the output is {"name": ..., "arguments": {...}} for one of the tools (a JSON Schema `anyOf`);
- "auto": the model writes what it wants; each `<tool_call>{"name": ..., "arguments": ...}</tool_call>` block in
  it (the convention of ChatML models: Qwen2, Hermes, SmolLM2) becomes a tool call, the rest stays content;
- "none": the tools are not shown to the model.
Answers with tool calls have `content: null` (or the text before the calls), `tool_calls` (ids `call_...`,
arguments as a JSON string) and finish_reason "tool_calls" (a cut answer keeps "length").
A chat template that does not mention tools (SmolLM2's) gets them as a system message in the Hermes style, the
assistant's earlier calls as `<tool_call>` text and tool results as user turns in `<tool_response>`.
"""
from __future__ import annotations

import json
import re
import uuid
from typing import Optional

from ..engine.structured import check_schema
from .schemas import ApiError, ChatRequest

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
CALL_BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.S)
TOOLS_PROMPT = ("You can call functions. Their signatures are inside <tools></tools>:\n<tools>\n{tools}\n</tools>\n"
                "To call one, answer with a JSON object naming it and giving its arguments inside <tool_call>"
                "</tool_call> tags:\n<tool_call>\n{{\"name\": <function name>, \"arguments\": <arguments object>}}\n"
                "</tool_call>")
NO_ARGS = {"type": "object", "properties": {}}


def choice_of(req: ChatRequest) -> tuple[str, Optional[str]]:
    """The tool choice in effect: ("none" | "auto" | "required", None) or ("function", its name)."""
    tc = req.tool_choice
    if tc is None:
        return ("auto" if req.tools else "none"), None
    return (tc, None) if isinstance(tc, str) else ("function", tc.function.name)


def check(req: ChatRequest) -> None:
    """What the field types cannot say about tools, tool messages and their mix with response_format."""
    names = [t.function.name for t in req.tools or []]
    if len(set(names)) != len(names):
        raise ApiError(400, f"tools: function names must be unique, got {names}", param="tools")
    kind, name = choice_of(req)
    if kind in ("required", "function"):
        if not names:
            raise ApiError(400, f"tool_choice={kind if name is None else name!r} needs tools", param="tool_choice")
        if kind == "function" and name not in names:
            raise ApiError(400, f"tool_choice names the function {name!r}, which is not in tools {names}",
                           param="tool_choice")
        if req.response_format is not None and req.response_format.type != "text":
            raise ApiError(400, "give response_format or a forced tool_choice, not both", param="response_format")
    for i, m in enumerate(req.messages):
        if m.content is None and not (m.role == "assistant" and m.tool_calls):
            raise ApiError(400, f"messages.{i}.content is null; only an assistant turn with tool_calls may omit it",
                           param=f"messages.{i}.content")
        if (m.role == "tool") != (m.tool_call_id is not None):
            raise ApiError(400, f"messages.{i}: tool_call_id is required in a tool message and only there",
                           param=f"messages.{i}.tool_call_id")
        if m.tool_calls and m.role != "assistant":
            raise ApiError(400, f"messages.{i}: tool_calls is only for assistant turns",
                           param=f"messages.{i}.tool_calls")
    for t in req.tools or []:
        if t.function.parameters is not None:
            _checked(t.function.parameters, f"tools: function {t.function.name!r} has parameters that ", "tools")


def _checked(schema: dict, what: str, param: str) -> str:
    text = json.dumps(schema)
    try:
        check_schema(text)
    except ValueError as e:
        raise ApiError(400, f"{what}cannot be a grammar: {e}", param=param) from None
    return text


def constraint(req) -> Optional[str]:
    """The JSON Schema (text) that the output must match: a forced tool call's, or response_format's; else None."""
    kind, name = choice_of(req) if isinstance(req, ChatRequest) else ("none", None)
    if kind in ("required", "function"):
        tools = {t.function.name: t.function.parameters or NO_ARGS for t in req.tools}
        if kind == "function":
            return _checked(tools[name], f"tools: {name!r}'s parameters ", "tools")
        calls = [{"type": "object", "properties": {"name": {"const": n}, "arguments": p},
                  "required": ["name", "arguments"]} for n, p in tools.items()]
        return _checked({"anyOf": calls}, "tools: the calls ", "tools")
    rf = req.response_format
    if rf is None or rf.type == "text":
        return None
    schema = rf.json_schema.schema_ if rf.type == "json_schema" else None
    return _checked(schema if schema is not None else {"type": "object"}, "response_format: the schema ",
                    "response_format")


# ---------------------------------------------------------------------- the prompt
def _loads_or_text(s: str):
    try:
        return json.loads(s)
    except json.JSONDecodeError:
        return s


def _call_text(call) -> str:
    """An earlier tool call as the model would have written it."""
    args = _loads_or_text(call.function.arguments)
    return CALL_OPEN + json.dumps({"name": call.function.name, "arguments": args}) + CALL_CLOSE


def prompt_messages(req: ChatRequest, template: Optional[str]) -> tuple[list[dict], Optional[list[dict]]]:
    """The messages (and tools) for the chat template. A template that mentions `tools` gets them as given (tool
    calls with their arguments as objects, as Hugging Face templates expect); another gets them folded into text."""
    tools = [t.model_dump(exclude_none=True) for t in req.tools or []] if choice_of(req)[0] != "none" else None
    native = bool(template and "tools" in template)
    msgs = []
    for m in req.messages:
        role = "system" if m.role == "developer" else m.role
        d = {"role": role, "content": m.text()}
        if m.tool_calls and native:
            d["tool_calls"] = [{"id": c.id, "type": "function", "function": {
                "name": c.function.name, "arguments": _loads_or_text(c.function.arguments)}} for c in m.tool_calls]
        elif m.tool_calls:
            said = [d["content"]] if d["content"] else []
            d["content"] = "\n".join(said + [_call_text(c) for c in m.tool_calls])
        if role == "tool":
            if native:
                d["tool_call_id"] = m.tool_call_id
            else:
                d = {"role": "user", "content": f"<tool_response>\n{d['content']}\n</tool_response>"}
        msgs.append(d)
    if tools and not native:
        text = TOOLS_PROMPT.format(tools="\n".join(json.dumps(t["function"]) for t in tools))
        if msgs[0]["role"] == "system":
            msgs[0] = {**msgs[0], "content": msgs[0]["content"] + "\n\n" + text}
        else:
            msgs.insert(0, {"role": "system", "content": text})
        tools = None
    return msgs, tools


# ---------------------------------------------------------------------- the answer
def parse_tool_calls(text: str) -> tuple[Optional[str], list[tuple[str, str]]]:
    """Model text -> (content outside the <tool_call> blocks or None, [(name, arguments JSON text)]); a block that
    is not a JSON object with a string "name" stays in the content. The last block may lack its closing tag."""
    calls, kept, at = [], [], 0
    for m in CALL_BLOCK.finditer(text):
        try:
            obj = json.loads(m.group(1))
        except json.JSONDecodeError:
            continue
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            continue
        args = obj.get("arguments", obj.get("parameters", {}))
        calls.append((obj["name"], args if isinstance(args, str) else json.dumps(args)))
        kept.append(text[at:m.start()])
        at = m.end()
    content = ("".join(kept) + text[at:]).strip()
    return content or None, calls


def _calls_reason(reason: Optional[str]) -> Optional[str]:
    """An answer with tool calls that ended normally finishes with "tool_calls"; one cut short keeps "length"."""
    return "tool_calls" if reason == "stop" else reason


def _call(index: int, name: str, arguments: str) -> dict:
    return {"index": index, "id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": name, "arguments": arguments}}


class Reply:
    """One choice's text turned into OpenAI's chat answer. mode: "text" (plain content), "auto" (<tool_call> blocks
    parsed), "required" (the text is {"name", "arguments"}) or "function" (the text is the arguments of `name`)."""

    def __init__(self, mode: str, name: Optional[str] = None):
        self.mode, self.name, self.buf, self.sent = mode, name, "", 0

    @classmethod
    def for_request(cls, req: ChatRequest) -> "Reply":
        kind, name = choice_of(req)
        return cls("text" if kind == "none" else kind, name)

    def calls(self, text: str) -> tuple[Optional[str], list[tuple[str, str]]]:
        if self.mode == "auto":
            return parse_tool_calls(text)
        if self.mode == "required":
            try:
                obj = json.loads(text)
                return None, [(obj["name"], json.dumps(obj["arguments"]))]
            except (json.JSONDecodeError, KeyError, TypeError):
                return text, []                  # cut short (length): shown as it is
        return None, [(self.name, text)]

    def message(self, text: str, reason: Optional[str]) -> tuple[dict, Optional[str]]:
        """The whole answer: (message, finish_reason)."""
        if self.mode == "text":
            return {"role": "assistant", "content": text}, reason
        content, calls = self.calls(text)
        if not calls:
            return {"role": "assistant", "content": content or ""}, reason
        msg = {"role": "assistant", "content": content,
               "tool_calls": [{k: v for k, v in _call(i, *c).items() if k != "index"} for i, c in enumerate(calls)]}
        return msg, _calls_reason(reason)

    def deltas(self, piece: str) -> list[dict]:
        """Stream deltas for a new piece of text: content as it comes ("auto": up to a possible <tool_call>; then
        held for parsing), a named function's arguments as they come, "required" held to the end."""
        if self.mode == "text":
            return [{"content": piece}] if piece else []
        self.buf += piece
        if self.mode == "required":
            return []
        if self.mode == "function":             # stream the arguments
            first = [] if self.sent else [{"tool_calls": [_call(0, self.name, "")]}]
            self.sent = 1
            return first + ([{"tool_calls": [{"index": 0, "function": {"arguments": piece}}]}] if piece else [])
        cut = self.buf.find(CALL_OPEN, self.sent)
        if cut < 0:                             # hold back a tail that may begin <tool_call>
            cut = len(self.buf)
            for k in range(min(len(CALL_OPEN) - 1, len(self.buf) - self.sent), 0, -1):
                if self.buf.endswith(CALL_OPEN[:k]):
                    cut -= k
                    break
        elif self.sent == cut:
            return []
        out, self.sent = self.buf[self.sent:cut], max(self.sent, cut)
        return [{"content": out}] if out else []

    def finish(self, reason: Optional[str]) -> tuple[list[dict], Optional[str]]:
        """The last deltas (the held-back text or the parsed calls) and the finish_reason."""
        if self.mode == "text":
            return [], reason
        if self.mode == "function":             # its arguments went out as they came
            return ([] if self.sent else [{"tool_calls": [_call(0, self.name, "")]}]), _calls_reason(reason)
        rest = self.buf[self.sent:]
        content, calls = self.calls(rest)
        if not calls:
            return ([{"content": rest}] if rest else []), reason
        out = [{"content": content}] if content else []
        out += [{"tool_calls": [_call(i, *c)]} for i, c in enumerate(calls)]
        return out, _calls_reason(reason)
