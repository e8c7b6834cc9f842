"""The API server with the real SmolLM2-135M-Instruct on the CPU, driven by the official `openai` client:
real answers, streaming equal to the blocking answer, stop strings, max_tokens, too-long prompts."""
from __future__ import annotations

import asyncio

import httpx
import openai
import pytest

from conftest import DOWNLOADS
from pipeline.server.launch import ApiServer

MODEL = "smollm2-135m"
SESSION = 512
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory, smollm2_cache):
    # the session's SmolLM2 cache: the GGUF dequantization and workspace are built once, shared with test_browser
    s = ApiServer(tmp_path_factory.mktemp("api_smol"), "quant=fp16", f"serve.session_len={SESSION}", "serve.max_batch_size=8",
                  f"download_dir={DOWNLOADS}", cache_dir=smollm2_cache).start()
    yield s
    assert s.stop() == 0, s.log()[-3000:]


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def test_chat_answers_and_streams_the_same_text(client):
    r = client.chat.completions.create(model=MODEL, messages=FRANCE, max_tokens=32, temperature=0)
    text = r.choices[0].message.content
    assert "Paris" in text and r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens > 2 and r.usage.prompt_tokens > 10
    pieces = [c.choices[0].delta.content for c in client.chat.completions.create(
        model=MODEL, messages=FRANCE, max_tokens=32, temperature=0, stream=True)
        if c.choices and c.choices[0].delta.content]
    assert len(pieces) >= 3 and "".join(pieces) == text


def test_stop_and_max_tokens(client):
    r = client.chat.completions.create(model=MODEL, messages=FRANCE, max_tokens=32, temperature=0, stop=["Paris"])
    assert r.choices[0].finish_reason == "stop" and "Paris" not in r.choices[0].message.content
    assert r.choices[0].message.content.strip()                 # the words before it are there
    r = client.chat.completions.create(model=MODEL, messages=FRANCE, max_tokens=3, temperature=0)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 3
    chunks = list(client.chat.completions.create(model=MODEL, messages=FRANCE, max_tokens=3, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].usage.completion_tokens == 3
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def test_multi_turn_and_completions(client):
    msgs = FRANCE + [{"role": "assistant", "content": "The capital of France is Paris."},
                     {"role": "user", "content": "And of Germany?"}]
    r = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=24, temperature=0)
    assert "Berlin" in r.choices[0].message.content
    c = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=4, temperature=0)
    assert "Paris" in c.choices[0].text


@pytest.mark.slow   # 40-150 s on 2 cores; faster twins: test_engine's batched greedy == reference, test_api_load's
#                     concurrent greedy answers all equal over HTTP (tiny model)
def test_concurrent_greedy_answers_match_sequential(server, client):
    """Requests batched together by the engine answer what each answers alone."""
    prompts = ["Name a color.", "What is 2+2?", "Say hello.", "Name a fruit."]
    alone = [client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": p}], max_tokens=12,
                                            temperature=0).choices[0].message.content for p in prompts]
    aclient = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)

    async def main():
        rs = await asyncio.gather(*(aclient.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": p}], max_tokens=12, temperature=0) for p in prompts))
        return [r.choices[0].message.content for r in rs]
    assert asyncio.run(main()) == alone


def test_prompt_over_session_len_is_a_400_and_server_goes_on(server, client):
    long = [{"role": "user", "content": "tell me about Paris. " * 200}]
    r = httpx.post(server.url + "/v1/chat/completions", json={"model": MODEL, "messages": long}, timeout=60)
    err = r.json()["error"]
    assert r.status_code == 400 and err["code"] == "context_length_exceeded"
    assert f"session_len is {SESSION}" in err["message"] and "tokens" in err["message"]
    with pytest.raises(openai.BadRequestError, match="session_len"):
        client.chat.completions.create(model=MODEL, messages=long)
    assert "Paris" in client.chat.completions.create(model=MODEL, messages=FRANCE, max_tokens=16,
                                                     temperature=0).choices[0].message.content
