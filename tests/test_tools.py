"""The chat API's tool logic (pipeline/server/tools.py) without a server: <tool_call> parsing, streamed deltas, prompts
for templates with and without tool support, and the grammars that force a tool call (schema checks by xgrammar)."""
from __future__ import annotations

import json

import pytest

from pipeline.engine.structured import check_schema
from pipeline.server import tools
from pipeline.server.schemas import ApiError, ChatRequest

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time"}}


def chat(**kw) -> ChatRequest:
    return ChatRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "hi"}], **kw})


def test_parse_tool_calls():
    text = 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n' \
           '<tool_call>{"name": "get_time", "arguments": {}}'              # the last one cut before its closing tag
    content, calls = tools.parse_tool_calls(text)
    assert content == "Let me check."
    assert calls == [("get_weather", '{"city": "Paris"}'), ("get_time", "{}")]
    assert tools.parse_tool_calls("<tool_call>not json</tool_call> ok") == ("<tool_call>not json</tool_call> ok", [])
    assert tools.parse_tool_calls("no calls") == ("no calls", [])


def test_auto_reply_streams_content_and_holds_the_call():
    reply = tools.Reply.for_request(chat(tools=[WEATHER]))
    text = 'Sure. <tool_call>{"name": "get_weather", "arguments": {"city": "Rome"}}</tool_call>'
    pieces = [text[i:i + 3] for i in range(0, len(text), 3)]          # "<to", "ol_", ... split the tag
    deltas = [d for p in pieces for d in reply.deltas(p)]
    assert "".join(d["content"] for d in deltas) == "Sure. "           # nothing of the tag leaks as content
    last, reason = reply.finish("stop")
    assert reason == "tool_calls" and len(last) == 1
    call = last[0]["tool_calls"][0]
    assert call["index"] == 0 and call["id"].startswith("call_") and call["type"] == "function"
    assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Rome"}'}
    plain = tools.Reply.for_request(chat(tools=[WEATHER]))
    assert [d for p in ["a <", "b"] for d in plain.deltas(p)] == [{"content": "a "}, {"content": "<b"}]
    assert plain.finish("stop") == ([], "stop")


def test_forced_replies():
    named = tools.Reply.for_request(chat(tools=[WEATHER], tool_choice={"type": "function",
                                                                       "function": {"name": "get_weather"}}))
    msg, reason = named.message('{"city": "Oslo"}', "stop")
    assert reason == "tool_calls" and msg["content"] is None
    assert msg["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": '{"city": "Oslo"}'}
    streamed = named.deltas('{"city"') + named.deltas(': "Oslo"}')
    assert streamed[0]["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": ""}
    assert "".join(d["tool_calls"][0]["function"]["arguments"] for d in streamed) == '{"city": "Oslo"}'
    auto_fn = {"type": "function", "function": {"name": "auto"}}                # a name like a mode is a name
    forced = chat(tools=[auto_fn], tool_choice={"type": "function", "function": {"name": "auto"}})
    assert tools.Reply.for_request(forced).message("{}", "stop")[0]["tool_calls"][0]["function"]["name"] == "auto"
    assert json.loads(tools.constraint(forced)) == tools.NO_ARGS
    req = tools.Reply.for_request(chat(tools=[WEATHER, TIME], tool_choice="required"))
    msg, reason = req.message('{"name": "get_time", "arguments": {}}', "stop")
    assert msg["tool_calls"][0]["function"] == {"name": "get_time", "arguments": "{}"}
    assert req.message('{"name": "get_ti', "length") == ({"role": "assistant", "content": '{"name": "get_ti'},
                                                          "length")


def test_constraints_and_checks():
    named = json.loads(tools.constraint(chat(tools=[WEATHER], tool_choice={"type": "function",
                                                                          "function": {"name": "get_weather"}})))
    assert named == WEATHER["function"]["parameters"]
    anyof = json.loads(tools.constraint(chat(tools=[WEATHER, TIME], tool_choice="required")))["anyOf"]
    assert [a["properties"]["name"] for a in anyof] == [{"const": "get_weather"}, {"const": "get_time"}]
    assert tools.constraint(chat(tools=[WEATHER])) is None                       # auto: free text
    assert json.loads(tools.constraint(chat(response_format={"type": "json_object"}))) == {"type": "object"}
    with pytest.raises(ApiError, match="not in tools"):
        tools.check(chat(tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "nope"}}))
    with pytest.raises(ApiError, match="not both"):
        tools.check(chat(tools=[WEATHER], tool_choice="required", response_format={"type": "json_object"}))
    with pytest.raises(ValueError, match="Unsupported type"):
        check_schema('{"type": "frobnicate"}')


def test_prompt_for_templates_without_and_with_tools():
    history = [{"role": "user", "content": "Weather in Paris?"},
               {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
                   "name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
               {"role": "tool", "tool_call_id": "call_1", "content": "18 C"}]
    req = ChatRequest.model_validate({"model": "m", "messages": history, "tools": [WEATHER]})
    msgs, fns = tools.prompt_messages(req, "{% for m in messages %}{{ m.content }}{% endfor %}")   # no tools
    assert fns is None and msgs[0]["role"] == "system" and '"name": "get_weather"' in msgs[0]["content"]
    assert msgs[2] == {"role": "assistant", "content": '<tool_call>{"name": "get_weather", "arguments": '
                                                       '{"city": "Paris"}}</tool_call>'}
    assert msgs[3] == {"role": "user", "content": "<tool_response>\n18 C\n</tool_response>"}
    msgs, fns = tools.prompt_messages(req, "{% if tools %}...{% endif %}")     # a template that renders tools
    assert fns == [WEATHER] and len(msgs) == 3
    assert msgs[1]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}
    assert msgs[2] == {"role": "tool", "content": "18 C", "tool_call_id": "call_1"}


def test_tools_reach_a_template_that_renders_them(tmp_path):
    """The whole prompt path (prompt_messages + the engine's chat_prompt) for a template with tool support (as Qwen2.5
    and Hermes models have): the tools, the earlier call's arguments (an object) and the tool result are rendered."""
    from transformers import AutoTokenizer

    from pipeline.engine.text import chat_prompt
    from pipeline.models.sources import save_byte_tokenizer
    save_byte_tokenizer(tmp_path, 320)
    tok = AutoTokenizer.from_pretrained(str(tmp_path))
    tok.chat_template = (
        "{% if tools %}TOOLS:{% for t in tools %} {{ t.function.name }}{% endfor %}; {% endif %}"
        "{% for m in messages %}{{ m.role }}: {{ m.content }}"
        "{% for c in m.tool_calls or [] %}CALL {{ c.function.name }} {{ c.function.arguments | tojson }}{% endfor %}"
        "{% if m.tool_call_id %} ({{ m.tool_call_id }}){% endif %}; {% endfor %}assistant: ")
    history = [{"role": "user", "content": "Weather in Paris?"},
               {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
                   "name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
               {"role": "tool", "tool_call_id": "call_1", "content": "18 C"}]
    req = ChatRequest.model_validate({"model": "m", "messages": history, "tools": [WEATHER, TIME]})
    msgs, fns = tools.prompt_messages(req, tok.chat_template)
    text = tok.decode(chat_prompt(tok, msgs, fns))
    assert text == ('TOOLS: get_weather get_time; user: Weather in Paris?; '
                    'assistant: CALL get_weather {"city": "Paris"}; tool: 18 C (call_1); assistant: ')
