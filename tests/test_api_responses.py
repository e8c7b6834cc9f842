"""OpenAI's Responses API (`POST /v1/responses`, pipeline/server/responses.py) through the official `openai` client
against a real server process (tiny-random: what the model says does not matter, the shapes and the protocol do):
plain and streamed answers, the SDK's own stream accumulator, a tool loop, JSON output, and the 400s."""
from __future__ import annotations

import json
from typing import Literal

import openai
import pytest

from pipeline.server.launch import ApiServer

MODEL = "tiny-random"


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    s = ApiServer(tmp_path_factory.mktemp("responses"), "model=tiny-random", "quant=fp16", "serve.session_len=2048",
                  "serve.max_batch_size=4").start()
    yield openai.OpenAI(base_url=s.url + "/v1", api_key="none", max_retries=0, timeout=60)
    assert s.stop() == 0, s.log()[-3000:]


def test_plain_answer_is_the_chat_answer(client):
    """A string input with instructions: one message item of output_text, cut at max_output_tokens (status
    incomplete, usage counted), the same greedy text the chat API gives for the same conversation."""
    r = client.responses.create(model=MODEL, input="Name a color.", instructions="Answer in one word.",
                                max_output_tokens=6, temperature=0, extra_body={"ignore_eos": True})
    assert r.object == "response" and r.id.startswith("resp_") and r.model == MODEL
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert [o.type for o in r.output] == ["message"] and r.output[0].content[0].type == "output_text"
    assert r.usage.output_tokens == 6 and r.usage.input_tokens > 0
    chat = client.chat.completions.create(model=MODEL, max_tokens=6, temperature=0, extra_body={"ignore_eos": True},
                                          messages=[{"role": "system", "content": "Answer in one word."},
                                                    {"role": "user", "content": "Name a color."}])
    assert r.output_text == chat.choices[0].message.content
    assert r.usage.input_tokens == chat.usage.prompt_tokens


def test_streamed_events_follow_the_protocol(client):
    """stream=True: created, in_progress, the item and part opened, text deltas, then closed, then the final
    response (`response.incomplete` for one cut at max_output_tokens, as OpenAI sends it); sequence numbers count up
    from 0; the deltas add up to the final text. The SDK's own accumulator (`responses.stream`, which finishes only
    on `response.completed`) gets a completed answer (a grammar ends it) whole."""
    kw = dict(model=MODEL, input=[{"role": "user", "content": "Say something."}], max_output_tokens=8, temperature=0,
              extra_body={"ignore_eos": True})
    events = list(client.responses.create(stream=True, **kw))
    types = [e.type for e in events]
    assert types[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert types[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.incomplete"]
    assert set(types[4:-4]) == {"response.output_text.delta"}
    assert [e.sequence_number for e in events] == list(range(len(events)))
    final = events[-1].response
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert final.output_text == text == events[-4].text and final.usage.output_tokens == 8
    assert final.id == events[0].response.id and events[0].response.status == "in_progress"
    fmt = {"format": {"type": "json_schema", "name": "flag", "schema": {
        "type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"], "additionalProperties": False}}}
    with client.responses.stream(model=MODEL, input="Is it ok?", max_output_tokens=32, temperature=0, text=fmt) as s:
        got = s.get_final_response()
    assert got.status == "completed" and isinstance(json.loads(got.output_text)["ok"], bool)
    assert got.output[0].status == "completed" and got.usage.output_tokens > 0


def test_tool_loop_with_function_call_items(client):
    """A forced function: a function_call item (call_id, the tool's name, JSON arguments from its schema's grammar),
    streamed as argument deltas too; fed back with its output as input items, the next turn answers in text."""
    tool = {"type": "function", "name": "get_weather", "description": "Weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}},
                           "required": ["city"], "additionalProperties": False}}
    first = client.responses.create(model=MODEL, input="Weather in Paris?", tools=[tool], max_output_tokens=64,
                                    tool_choice={"type": "function", "name": "get_weather"}, temperature=0)
    calls = [o for o in first.output if o.type == "function_call"]
    assert first.status == "completed" and len(calls) == 1, first.output
    call = calls[0]
    assert call.name == "get_weather" and call.call_id.startswith("call_") and call.status == "completed"
    assert isinstance(json.loads(call.arguments)["city"], str)
    streamed = list(client.responses.create(model=MODEL, input="Weather in Paris?", tools=[tool], max_output_tokens=64,
                                            tool_choice={"type": "function", "name": "get_weather"}, temperature=0,
                                            stream=True))
    args = "".join(e.delta for e in streamed if e.type == "response.function_call_arguments.delta")
    done = [e for e in streamed if e.type == "response.function_call_arguments.done"]
    assert args == done[0].arguments == call.arguments                       # greedy: the same call
    second = client.responses.create(model=MODEL, tools=[tool], tool_choice="none", max_output_tokens=5,
                                     extra_body={"ignore_eos": True}, temperature=0, input=[
                                         {"role": "user", "content": "Weather in Paris?"},
                                         {"type": "function_call", "call_id": call.call_id, "name": call.name,
                                          "arguments": call.arguments},
                                         {"type": "function_call_output", "call_id": call.call_id,
                                          "output": json.dumps({"temp_c": 18})}])
    assert [o.type for o in second.output] == ["message"] and second.usage.output_tokens == 5
    assert second.output[0].status == "incomplete"                     # cut at max_output_tokens, as the response
    alone = client.responses.create(model=MODEL, tools=[tool], tool_choice="none", max_output_tokens=1,
                                    input="Weather in Paris?")
    assert second.usage.input_tokens > alone.usage.input_tokens + 20   # the call and its output are in the prompt


def test_json_schema_text_format(client):
    schema = {"type": "object", "properties": {"pick": {"enum": ["red", "blue"]}}, "required": ["pick"],
              "additionalProperties": False}
    r = client.responses.create(model=MODEL, input="Pick a color, as JSON.", max_output_tokens=32, temperature=0,
                                text={"format": {"type": "json_schema", "name": "pick", "schema": schema}})
    assert r.status == "completed" and json.loads(r.output_text)["pick"] in ("red", "blue")
    assert r.text.format.type == "json_schema"


@pytest.mark.parametrize("extra,param,words", [
    ({"previous_response_id": "resp_1"}, "previous_response_id", "keeps no responses"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "http://x/y.png"}]}]},
     "input.0.content.0.type", "'input_image' is not supported"),
    ({"input": [{"type": "reasoning", "summary": []}]}, "input.0.type", "'reasoning' are not supported"),
    ({"tools": [{"type": "web_search"}]}, "tools.0.type", "'web_search' are not supported"),
    ({"reasoning": {"effort": "high"}}, "reasoning", "not supported"),
    ({"max_output_tokens": "8"}, "max_output_tokens", "valid integer"),
    ({"text": {"format": {"type": "json_schema", "name": "x"}}}, "text.format", "needs its name and schema"),
])
def test_what_it_cannot_do_is_a_400_naming_it(client, extra, param, words):
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model=MODEL, **{"input": "hi", **extra})
    assert e.value.body["param"] == param and words in e.value.body["message"], e.value.body


def test_unknown_model_is_a_404(client):
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.responses.create(model="gpt-9", input="hi")


def test_langchain_on_the_responses_api(client):
    """LangChain's ChatOpenAI with use_responses_api=True: a plain answer, a bound tool it is made to call (its
    tool_calls parsed from the function_call item), and structured output from a pydantic model."""
    from langchain_openai import ChatOpenAI
    from pydantic import BaseModel

    class Pet(BaseModel):
        kind: Literal["cat", "dog"]
        friendly: bool

    llm = ChatOpenAI(model=MODEL, base_url=str(client.base_url), api_key="none", max_tokens=48, max_retries=0,
                     temperature=0, use_responses_api=True)
    msg = llm.invoke("Hello")
    assert isinstance(msg.content, (str, list)) and msg.response_metadata.get("status") in ("completed", "incomplete")

    def get_weather(city: Literal["Oslo", "Paris"]) -> str:  # bounded: a random model finishes the call
        """Weather in a city."""
        return "sunny"
    called = llm.bind_tools([get_weather], tool_choice="get_weather").invoke("Weather in Oslo?")
    assert [c["name"] for c in called.tool_calls] == ["get_weather"] and isinstance(called.tool_calls[0]["args"], dict)
    pet = llm.with_structured_output(Pet).invoke("Describe a pet.")
    assert isinstance(pet, Pet)
