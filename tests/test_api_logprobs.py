"""Logprobs, echo, token-id batches, n > 1 and the tokenizer endpoints over HTTP (issue 23), on a real server process
(tiny-random, quant=fp16) with the official `openai` client: every logprob equals PyTorch's log_softmax of the
reference model's logits (the load stage's weights rounded to fp16, as the workspace stores them).
lm-eval-harness itself against SmolLM2: tests/test_lm_eval.py."""
from __future__ import annotations

import json

import httpx
import openai
import pytest
import torch

from conftest import reference_model
from pipeline.server.launch import ApiServer

MODEL = "tiny-random"
TOL = 1e-3
PROMPTS = [[5, 6, 7, 8, 9], [40, 41, 42]]
LONG = list(range(60, 110))           # 50 tokens: 3 full KV blocks of 16


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    d = tmp_path_factory.mktemp("api_logprobs")
    s = ApiServer(d, f"model={MODEL}", "quant=fp16", "serve.session_len=256", "serve.max_batch_size=8",
                  "serve.cache_block_size=16", "serve.max_new_tokens=16").start()
    s.ref = reference_model(d / "cache")
    yield s
    assert s.stop() == 0, s.log()[-3000:]


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


@torch.no_grad()
def ref_rows(server, ids: list[int]) -> torch.Tensor:
    """(len(ids), V): row p = the reference model's log_softmax after ids[:p + 1]."""
    return torch.log_softmax(server.ref(torch.tensor([ids]))[0].float(), -1)


def post(server, path: str, body: dict) -> httpx.Response:
    return httpx.post(server.url + path, json=body, timeout=60)


def detok(server, ids: list[int]) -> str:
    return post(server, "/detokenize", {"tokens": ids}).json()["prompt"]


def test_token_id_batch_with_echo_is_what_lm_eval_reads(server):
    """lm-eval's loglikelihood request: a batch of token-id prompts, echo, logprobs 1, max_tokens 1."""
    r = post(server, "/v1/completions", {"model": MODEL, "prompt": PROMPTS, "echo": True, "logprobs": 1,
                                         "max_tokens": 1, "temperature": 0, "seed": 1234})
    assert r.status_code == 200, r.text
    body = r.json()
    assert [c["index"] for c in body["choices"]] == [0, 1]
    assert body["usage"] == {"prompt_tokens": 8, "completion_tokens": 2, "total_tokens": 10}
    for p, c in zip(PROMPTS, body["choices"]):
        lp = c["logprobs"]
        n = len(p) + 1                                            # the prompt, then the generated token
        assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(lp["text_offset"]) == n
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        assert "".join(lp["tokens"][:-1]) == detok(server, p) and c["text"].startswith(detok(server, p))
        assert lp["text_offset"] == [sum(len(t) for t in lp["tokens"][:i]) for i in range(n)]
        new = int(ref_rows(server, p)[-1].argmax())              # greedy: the reference's most likely token
        rows = ref_rows(server, p + [new])
        want = [rows[i - 1, t].item() for i, t in enumerate(p + [new]) if i]
        assert max(abs(a - b) for a, b in zip(lp["token_logprobs"][1:], want)) < TOL
        for i, top in enumerate(lp["top_logprobs"][1:], 1):   # the most likely token (and the chosen one)
            best = int(rows[i - 1].argmax())
            assert abs(top[detok(server, [best])] - rows[i - 1, best].item()) < TOL and len(top) <= 2


def test_echo_with_max_tokens_0_scores_the_prompt_only(server, client):
    text = "scoring this"
    c = client.completions.create(model=MODEL, prompt=text, echo=True, logprobs=2, max_tokens=0)
    ch = c.choices[0]
    ids = post(server, "/tokenize", {"prompt": text}).json()["tokens"]
    assert ch.text == text and ch.finish_reason == "length" and c.usage.completion_tokens == 0
    assert len(ch.logprobs.tokens) == len(ids) and ch.logprobs.token_logprobs[0] is None
    rows = ref_rows(server, ids)
    want = [rows[i - 1, t].item() for i, t in enumerate(ids) if i]
    assert max(abs(a - b) for a, b in zip(ch.logprobs.token_logprobs[1:], want)) < TOL
    assert all(2 <= len(top) <= 3 for top in ch.logprobs.top_logprobs[1:])
    # echo without logprobs: the prompt's text in front, no logprobs; a list of strings: one choice each
    c = client.completions.create(model=MODEL, prompt=["ab", "cd"], echo=True, max_tokens=2, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert [x.text[:2] for x in c.choices] == ["ab", "cd"] and c.choices[0].logprobs is None


def test_chat_logprobs_blocking_and_streaming(server, client):
    msgs = [{"role": "user", "content": "hello"}]
    kw = dict(model=MODEL, messages=msgs, max_tokens=6, temperature=0, logprobs=True, top_logprobs=2,
              extra_body={"ignore_eos": True})
    r = client.chat.completions.create(**kw)
    content = r.choices[0].logprobs.content
    assert len(content) == 6 == r.usage.completion_tokens
    prompt = post(server, "/tokenize", {"messages": msgs}).json()["tokens"]
    seq = list(prompt)                                          # the reference's greedy answer
    for _ in range(6):
        seq.append(int(ref_rows(server, seq)[-1].argmax()))
    ids = seq[len(prompt):]
    rows = ref_rows(server, seq)[len(prompt) - 1:-1]
    for item, t, row in zip(content, ids, rows):
        assert item.token == detok(server, [t]) and item.bytes == list(item.token.encode())
        assert abs(item.logprob - row[t].item()) < TOL
        assert [x.logprob for x in item.top_logprobs] == pytest.approx(row.topk(2).values.tolist(), abs=TOL)
    chunks = list(client.chat.completions.create(**kw, stream=True))
    streamed = [x for c in chunks if c.choices and c.choices[0].logprobs for x in c.choices[0].logprobs.content]
    assert [x.token for x in streamed] == [x.token for x in content]     # (its prompt's first block now cached)
    assert [x.logprob for x in streamed] == pytest.approx([x.logprob for x in content], abs=TOL)
    with pytest.raises(openai.BadRequestError, match="top_logprobs"):
        client.chat.completions.create(model=MODEL, messages=msgs, top_logprobs=2)


def test_streamed_completion_with_echo_and_logprobs(server):
    body = {"model": MODEL, "prompt": [LONG[:6]], "echo": True, "logprobs": 1, "max_tokens": 4, "temperature": 0,
            "ignore_eos": True, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as r:
        events = [json.loads(x[6:]) for x in r.iter_lines() if x.startswith("data: {")]
    parts = [c for e in events for c in e["choices"] if c["logprobs"]]
    tokens = [t for c in parts for t in c["logprobs"]["tokens"]]
    assert len(tokens) == 6 + 4 and parts[0]["logprobs"]["token_logprobs"][0] is None
    offsets = [o for c in parts for o in c["logprobs"]["text_offset"]]
    assert offsets == [sum(len(t) for t in tokens[:i]) for i in range(10)]      # carried across chunks
    blocking = post(server, "/v1/completions", {**body, "stream": False}).json()["choices"][0]["logprobs"]
    assert [t for c in parts for t in c["logprobs"]["tokens"]] == blocking["tokens"]
    assert [t for c in parts for t in c["logprobs"]["token_logprobs"]][1:] == pytest.approx(
        blocking["token_logprobs"][1:], abs=TOL)


def test_n_choices_share_the_prompts_kv_blocks(server, client):
    before = server.health()["prefix_cache"]
    c = client.completions.create(model=MODEL, prompt=LONG, n=3, max_tokens=4, temperature=1.0, seed=7,
                                  extra_body={"ignore_eos": True})
    assert sorted(x.index for x in c.choices) == [0, 1, 2] and len({x.text for x in c.choices}) > 1
    after = server.health()["prefix_cache"]
    assert after["hits"] - before["hits"] == 2 * 48                 # choices 1 and 2 reuse the 3 full blocks
    assert c.usage.prompt_tokens == len(LONG) and c.usage.completion_tokens == 12
    again = client.completions.create(model=MODEL, prompt=LONG, n=3, max_tokens=4, temperature=1.0, seed=7,
                                      extra_body={"ignore_eos": True})
    assert [x.text for x in again.choices] == [x.text for x in c.choices]   # seeded: choice j uses seed + j
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], n=2, max_tokens=3,
                                       temperature=0)
    assert [x.index for x in r.choices] == [0, 1] and r.choices[0].message.content == r.choices[1].message.content


def test_tokenizer_endpoints(server):
    info = httpx.get(server.url + "/tokenizer_info", timeout=10).json()
    assert info["eos_token"] == "</s>" and info["model_max_length"] == 256 and "chat_template" in info
    t = post(server, "/tokenize", {"prompt": "hello", "add_special_tokens": False, "return_token_strs": True}).json()
    assert t["count"] == len(t["tokens"]) == 5 and t["max_model_len"] == 256 and len(t["token_strs"]) == 5
    assert detok(server, t["tokens"]) == "hello"
    bad = post(server, "/detokenize", {"tokens": [1, 10**6]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"


@pytest.mark.parametrize("body,param", [
    ({"prompt": "x", "logprobs": 21}, "logprobs"),
    ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"prompt": [[1, 2], []]}, "prompt"),
    ({"prompt": "x", "n": 0}, "n"),
    ({"prompt": "x", "suffix": "y"}, "suffix"),
])
def test_bad_logprob_requests_name_the_field(server, body, param):
    r = post(server, "/v1/completions", {"model": MODEL, **body})
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
