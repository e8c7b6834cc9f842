"""Sampling controls, structured output and tools on the API server with the real SmolLM2-135M-Instruct (CPU), through
the clients people use: the `openai` library, LangChain's ChatOpenAI and LiteLLM.

- logit_bias +100 forces a token and -100 forbids one; frequency / presence penalties break a greedy loop.
- response_format json_schema / json_object: answers parse and validate (nested objects, enums, arrays), greedy and
  sampled; the JSON grammar on random logits ends (EOS) only where the JSON is complete.
- tool_choice named / "required": `tool_calls` with JSON arguments that match the function's parameters; "auto":
  `<tool_call>` text the model writes becomes tool calls, streaming too; tool results are accepted in the history.
"""
from __future__ import annotations

import asyncio
import json
import os

import jsonschema
import openai
import pytest
import torch

from conftest import DOWNLOADS
from pipeline.server.launch import ApiServer

# the default run: ~15 s of requests (plus the server's start; the workspace is the session's, shared with
# test_api_smollm2); slow: 20 sampled answers, streaming, "auto" and the LangChain / LiteLLM clients (~3 min on
# 2 cores; their default twins on tiny-random are in tests/test_api.py)

MODEL = "smollm2-135m"
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 24},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"]}}}
PARIS = [{"role": "user", "content": "What is the weather in Paris?"}]
ECHO = [{"role": "user", "content": 'Repeat exactly: <tool_call>{"name": "get_weather", "arguments": '
                                    '{"city": "Paris", "unit": "celsius"}}</tool_call>'}]  # "auto": the model writes it
PET = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 16},
    "kind": {"enum": ["cat", "dog", "bird"]},
    "age": {"type": "integer", "minimum": 0, "maximum": 30},
    "toys": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 3},
    "owner": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 16},
                                               "adult": {"type": "boolean"}}, "required": ["name", "adult"]}},
    "required": ["name", "kind", "age", "toys", "owner"]}
PET_ASK = [{"role": "user", "content": "Describe a pet as JSON: name, kind, age, toys and owner."}]


@pytest.fixture(scope="module")
def server(tmp_path_factory, smollm2_cache):
    s = ApiServer(tmp_path_factory.mktemp("api_structured"), "quant=fp16", "serve.session_len=1024",
                  "serve.max_batch_size=8", f"download_dir={DOWNLOADS}", cache_dir=smollm2_cache).start()
    yield s
    assert s.stop() == 0, s.log()[-3000:]


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def tokenizer(server, smollm2_cache):
    from transformers import AutoTokenizer
    folder, = smollm2_cache.glob("turbomind/*/workspace/triton_models/tokenizer")
    return AutoTokenizer.from_pretrained(str(folder))


@pytest.mark.slow   # the default run checks logit_bias on tiny-random (test_api.py)
def test_logit_bias_forces_and_forbids_a_token(client, tokenizer):
    ask = dict(model=MODEL, prompt="The capital of France is", max_tokens=3, temperature=0)
    greedy = client.completions.create(**ask).choices[0].text
    first = tokenizer(greedy, add_special_tokens=False).input_ids[0]
    banana = tokenizer(" banana", add_special_tokens=False).input_ids[0]
    forced = client.completions.create(**ask, logit_bias={str(banana): 100}).choices[0].text
    assert tokenizer(forced, add_special_tokens=False).input_ids == [banana] * 3
    other = client.completions.create(**ask, logit_bias={str(first): -100}).choices[0].text
    assert tokenizer(other, add_special_tokens=False).input_ids[0] != first


def test_frequency_and_presence_penalties_break_a_loop(client, tokenizer):
    def ids(**pen) -> list[int]:
        text = client.completions.create(model=MODEL, prompt="one one one one one one one one", max_tokens=12,
                                         temperature=0, **pen).choices[0].text
        return tokenizer(text, add_special_tokens=False).input_ids
    plain, freq, pres = ids(), ids(frequency_penalty=2.0), ids(presence_penalty=2.0)
    assert len(set(plain)) <= 4 and max(map(plain.count, plain)) >= 4     # greedy loops ("-to-many-to-many...")
    assert max(map(freq.count, freq)) <= 2                               # -2 per earlier use: no token thrice
    assert len(set(pres)) > len(set(plain))                              # -2 once used: the loop breaks later


def test_json_schema_greedy_parses_and_validates(client):
    r = client.chat.completions.create(model=MODEL, messages=PET_ASK, max_tokens=160, temperature=0,
                                       response_format={"type": "json_schema",
                                                        "json_schema": {"name": "pet", "schema": PET}})
    assert r.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(r.choices[0].message.content), PET)


def test_named_tool_choice_answers_tool_calls(client):
    r = client.chat.completions.create(model=MODEL, messages=PARIS, tools=[WEATHER], max_tokens=40, temperature=0,
                                       tool_choice={"type": "function", "function": {"name": "get_weather"}})
    c = r.choices[0]
    assert c.finish_reason == "tool_calls" and c.message.content is None
    call, = c.message.tool_calls
    assert call.id.startswith("call_") and call.type == "function" and call.function.name == "get_weather"
    args = json.loads(call.function.arguments)
    jsonschema.validate(args, WEATHER["function"]["parameters"])
    assert args["city"] == "Paris"


@pytest.mark.slow
def test_auto_parses_tool_call_text_and_takes_tool_results(client):
    r = client.chat.completions.create(model=MODEL, messages=ECHO, tools=[WEATHER], max_tokens=48, temperature=0)
    calls = r.choices[0].message.tool_calls
    assert calls and calls[0].function.name == "get_weather"
    assert json.loads(calls[0].function.arguments) == {"city": "Paris", "unit": "celsius"}
    history = PARIS + [r.choices[0].message.model_dump(exclude_none=True),
                       {"role": "tool", "tool_call_id": calls[0].id, "content": "18 degrees, sunny"}]
    r = client.chat.completions.create(model=MODEL, messages=history, tools=[WEATHER], max_tokens=24, temperature=0)
    assert r.choices[0].message.content and r.choices[0].finish_reason in ("stop", "length")


def test_grammar_masks_random_logits_into_valid_json(tokenizer):
    """Random logits (a model that knows nothing) under the engine's grammar: every answer ends on EOS, which is
    allowed only where the JSON is complete, and parses and validates."""
    from pipeline.engine.structured import Grammars, apply_bitmask
    V = len(tokenizer)
    g = Grammars(tokenizer, V, [tokenizer.eos_token_id])
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        m, out = g.matcher(json.dumps(PET)), []
        while not m.is_terminated() and len(out) < 400:
            logits = torch.randn(1, V, generator=gen) * 3
            bm = g.bitmask(1)
            m.fill_next_token_bitmask(bm, 0)
            apply_bitmask(logits, bm, [0])
            t = int(torch.multinomial(logits.softmax(-1)[0], 1, generator=gen))
            assert m.accept_token(t)
            out.append(t)
        assert out[-1] == tokenizer.eos_token_id and m.is_terminated()
        jsonschema.validate(json.loads(tokenizer.decode(out[:-1])), PET)


@pytest.mark.slow
def test_twenty_sampled_json_schema_answers_validate(server):
    schemas = [PET, {"type": "object", "properties": {"colors": {"type": "array", "items": {
        "enum": ["red", "green", "blue"]}, "minItems": 1, "maxItems": 4}, "ok": {"type": "boolean"}},
        "required": ["colors", "ok"]}]
    aclient = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=900)

    async def one(i: int):
        schema = schemas[i % 2]
        r = await aclient.chat.completions.create(
            model=MODEL, messages=PET_ASK, max_tokens=200, temperature=1.0, seed=i,
            response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}})
        return schema, r.choices[0]

    async def main():
        return await asyncio.gather(*(one(i) for i in range(20)))
    answers = asyncio.run(main())
    for schema, c in answers:
        assert c.finish_reason == "stop", c.message.content
        jsonschema.validate(json.loads(c.message.content), schema)
    assert len({c.message.content for _, c in answers}) > 10          # sampled: they differ


@pytest.mark.slow
def test_json_object_and_streamed_tool_calls(client):
    r = client.chat.completions.create(model=MODEL, messages=PET_ASK, max_tokens=120, temperature=0.7, seed=1,
                                       response_format={"type": "json_object"})
    assert isinstance(json.loads(r.choices[0].message.content), dict)
    for choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
        chunks = list(client.chat.completions.create(model=MODEL, messages=PARIS, tools=[WEATHER], max_tokens=40,
                                                     temperature=0, tool_choice=choice, stream=True))
        parts = [t for ch in chunks if ch.choices for t in ch.choices[0].delta.tool_calls or []]
        assert parts[0].id.startswith("call_") and parts[0].function.name == "get_weather"
        args = "".join(p.function.arguments or "" for p in parts)
        jsonschema.validate(json.loads(args), WEATHER["function"]["parameters"])
        assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "tool_calls"
    chunks = list(client.chat.completions.create(model=MODEL, messages=ECHO, tools=[WEATHER], max_tokens=48,
                                                 temperature=0, stream=True))                  # "auto"
    deltas = [ch.choices[0].delta for ch in chunks if ch.choices]
    assert "<tool_call>" not in "".join(d.content or "" for d in deltas)
    call, = [t for d in deltas for t in d.tool_calls or []]
    assert json.loads(call.function.arguments) == {"city": "Paris", "unit": "celsius"}


@pytest.mark.slow
def test_langchain_tools_and_structured_output(server):
    from langchain_openai import ChatOpenAI
    from pydantic import BaseModel, Field

    def get_weather(city: str) -> str:
        """Get the current weather in a city."""
        return "sunny"

    class Pet(BaseModel):
        name: str = Field(max_length=16)
        kind: str = Field(json_schema_extra={"enum": ["cat", "dog", "bird"]})
        age: int = Field(ge=0, le=30)

    llm = ChatOpenAI(model=MODEL, base_url=server.url + "/v1", api_key="unused", temperature=0, max_tokens=60,
                     max_retries=0)
    for choice in ("get_weather", "any"):
        msg = llm.bind_tools([get_weather], tool_choice=choice).invoke("What is the weather in Paris?")
        call, = msg.tool_calls
        assert call["name"] == "get_weather" and isinstance(call["args"]["city"], str)
    pet = llm.with_structured_output(Pet).invoke("Describe a pet.")
    assert isinstance(pet, Pet) and pet.kind in ("cat", "dog", "bird")


@pytest.mark.slow
def test_litellm_completion_with_penalties(server):
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")      # no fetch of the price list
    import litellm
    r = litellm.completion(model=f"openai/{MODEL}", api_base=server.url + "/v1", api_key="unused", messages=PARIS,
                           max_tokens=16, temperature=0, presence_penalty=0.5, frequency_penalty=0.5)
    assert r.choices[0].message.content and r.usage.completion_tokens > 0
