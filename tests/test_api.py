"""The OpenAI-compatible API server, as a real process on 127.0.0.1 (tiny-random: the model's quality does
not matter here): the official `openai` client, raw HTTP bad input, API keys, the startup log.
SmolLM2 answers: tests/test_api_smollm2.py; disconnects, queueing and load: tests/test_api_load.py."""
from __future__ import annotations

import json
import re
import time

import httpx
import openai
import pytest

from pipeline.server.launch import ApiServer

KEY = "sk-test-123"
SESSION = 256


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = ApiServer(tmp_path_factory.mktemp("api"), "model=tiny-random", "quant=fp16", f"serve.session_len={SESSION}",
                  "serve.max_batch_size=8", f"serve.api.keys=[{KEY}]", "serve.max_new_tokens=16").start()
    yield s
    assert s.stop() == 0, s.log()[-3000:]


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def post(server, path: str, body, key: str | None = KEY) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(server.url + path, content=data, headers={**headers, "Content-Type": "application/json"},
                      timeout=60)


def test_startup_log_names_workspace_quant_kv_url(server):
    log = server.log()
    line = next(x for x in log.splitlines() if "workspace: " in x)
    assert line.rstrip().endswith("/workspace")
    assert "quant config: fp16" in log
    assert f"KV cache: {server.health()['kv_capacity_tokens']} tokens" in log
    assert f"session_len={SESSION}" in log and "up to 8 sequences running at once" in log
    assert f"listening on {server.url}" in log


def test_health_reports_start_up_and_first_token_latency(server, client):
    """/health says where the start went and where a streamed request's first token's time went: in the front end
    (arrival -> submitted, arrival -> first event) and in the engine (submit -> admitted, submit -> first token)."""
    h0 = server.health()
    assert {"load_s", "core_s", "spawn_to_ready_s"} <= set(h0["startup"]), h0["startup"]
    stream = client.completions.create(model="tiny-random", prompt="a b c", max_tokens=3, stream=True)
    assert sum(1 for _ in stream) >= 1
    h1 = server.health()
    f0, f1, e0, e1 = h0["frontend_latency"], h1["frontend_latency"], h0["latency"], h1["latency"]
    assert f1["streams"] - f0["streams"] == 1 and f1["first_chunks"] - f0["first_chunks"] == 1
    assert e1["first_tokens"] - e0["first_tokens"] == 1 and e1["admitted"] - e0["admitted"] == 1
    front, engine = f1["ttft_s"] - f0["ttft_s"], e1["ttft_s"] - e0["ttft_s"]
    assert 0 < engine <= front < 30, (engine, front)   # the engine's span lies inside the front end's
    assert 0 <= e1["queue_s"] - e0["queue_s"] <= engine and 0 < f1["submit_s"] - f0["submit_s"] <= front


def scrape(server) -> dict:
    """/metrics parsed by Prometheus' own client library: {(sample name, sorted labels): value}."""
    from prometheus_client.parser import text_string_to_metric_families
    r = httpx.get(server.url + "/metrics", timeout=30)   # no key: a scraper's, like /health
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain"), r.text[:300]
    return {(x.name, tuple(sorted(x.labels.items()))): x.value
            for fam in text_string_to_metric_families(r.text) for x in fam.samples}


def test_prometheus_metrics_count_requests_tokens_and_latencies(server, client):
    """GET /metrics: vLLM's metric names under llm_pipeline:, labelled with the model; one streamed and one whole
    completion of 5 tokens each (a 7-id prompt) add 2 first-token times, 8 inter-token gaps, 2 end-to-end times,
    10 generated and 14 prompt tokens and 2 successes for `length`; the engine's gauges and prefix-cache counters
    are read at the scrape."""
    m, lab = "llm_pipeline:", (("model_name", "tiny-random"),)
    before = scrape(server)
    prompt = [11, 12, 13, 14, 15, 16, 17]
    for stream in (True, False):
        r = client.completions.create(model="tiny-random", prompt=prompt, max_tokens=5, stream=stream,
                                      extra_body={"ignore_eos": True})
        if stream:
            assert sum(1 for _ in r) >= 1
    after = scrape(server)
    d = lambda name, labels=lab: after[(m + name, labels)] - before.get((m + name, labels), 0.0)  # noqa: E731
    assert d("time_to_first_token_seconds_count") == 2 and d("e2e_request_latency_seconds_count") == 2
    assert d("inter_token_latency_seconds_count") == 8
    assert 0 < d("time_to_first_token_seconds_sum") <= d("e2e_request_latency_seconds_sum") < 60
    assert d("generation_tokens_total") == 10 and d("prompt_tokens_total") == 14
    assert d("request_success_total", tuple(sorted(lab + (("finished_reason", "length"),)))) == 2
    assert d("request_prompt_tokens_sum") == 14 and d("request_generation_tokens_count") == 2
    assert after[(m + "num_requests_running", lab)] == 0 and after[(m + "num_requests_waiting", lab)] == 0
    assert 0 <= after[(m + "kv_cache_usage_perc", lab)] <= 1
    assert d("prefix_cache_queries_total") >= 7 and (m + "prefix_cache_hits_total", lab) in after
    assert after[(m + "spec_decode_num_draft_tokens_total", lab)] == 0            # speculative decoding is off
    assert after[(m + "request_failure_total", lab)] == before.get((m + "request_failure_total", lab), 0)


def test_served_model_names_and_cors(server, tmp_path):
    """`--served-model-name`: requests may use any of the names, responses carry the first, /v1/models lists them
    all, another name gets a 404 naming them; `--allowed-origins`: a listed origin's preflight is answered (a page
    there may call the API, still with its key), others' are not, and a server without the flag answers none; keys
    from $PIPELINE_API_KEY (comma-separated) when no flag gives one."""
    ws = next(x.split("workspace: ", 1)[1].strip() for x in server.log().splitlines() if "workspace: " in x)
    s = ApiServer.for_workspace(tmp_path, ws, "--device", "cpu", "--session-len", str(SESSION), "--max-batch-size",
                                "2", "--served-model-name", "my-model", "gpt-local", "--allowed-origins",
                                "http://app.example", "--log-stats-interval", "0.2",
                                env={"PIPELINE_API_KEY": f"sk-other, {KEY}"}).start()   # keys from the environment
    try:
        c = openai.OpenAI(base_url=s.url + "/v1", api_key=KEY, max_retries=0, timeout=60)
        assert [m.id for m in c.models.list()] == ["my-model", "gpt-local"]
        r = c.completions.create(model="gpt-local", prompt=[5, 6, 7], max_tokens=2)
        assert r.model == "my-model" and r.usage.completion_tokens >= 1
        with pytest.raises(openai.NotFoundError, match="serves 'my-model' or 'gpt-local'"):
            c.completions.create(model="tiny-random", prompt=[5], max_tokens=1)
        pre = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization,content-type"}
        ok = httpx.options(s.url + "/v1/chat/completions", headers={"Origin": "http://app.example", **pre})
        assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == "http://app.example"
        other = httpx.options(s.url + "/v1/chat/completions", headers={"Origin": "http://evil.example", **pre})
        assert "access-control-allow-origin" not in other.headers
        r = httpx.post(s.url + "/v1/completions", json={"model": "my-model", "prompt": [5], "max_tokens": 1},
                       headers={"Origin": "http://app.example"})
        assert r.status_code == 401                          # CORS opens the door to the page, not to the API
        assert "CORS: pages from http://app.example may call the API" in s.log()
        assert "API keys: 2 configured (from PIPELINE_API_KEY)" in s.log() and KEY not in " ".join(s.cmd)
        deadline = time.time() + 10   # the periodic stats line of the interval that held the requests
        while time.time() < deadline and "Avg generation throughput" not in s.log():
            time.sleep(0.1)
        assert re.search(r"Avg prompt throughput: [\d.]+ tokens/s, Avg generation throughput: [1-9][\d.]* tokens/s, "
                         r"Running: \d+ reqs, Waiting: \d+ reqs, KV cache usage: [\d.]+%", s.log()), s.log()[-2000:]
    finally:
        assert s.stop() == 0, s.log()[-3000:]
    plain = httpx.options(server.url + "/v1/chat/completions", headers={"Origin": "http://app.example", **pre})
    assert "access-control-allow-origin" not in plain.headers


def test_stats_log_line_covers_the_interval():
    """The periodic log line: throughput over the interval, the queue and KV usage at its end, the prefix cache's hit
    rate over the interval only; nothing for an interval where the engine did nothing and holds nothing."""
    from pipeline.server.metrics import StatsLog
    a = {"t": 0.0, "prompt": 100, "gen": 50, "queries": 100, "hits": 0, "running": 0, "waiting": 0, "free": 10,
         "total": 10}
    b = {**a, "t": 2.0, "prompt": 1100, "gen": 250, "queries": 1100, "hits": 750, "running": 3, "waiting": 1, "free": 4}
    line = StatsLog.line(None, a, b)
    assert line == ("Avg prompt throughput: 500.0 tokens/s, Avg generation throughput: 100.0 tokens/s, Running: 3 reqs, "
                    "Waiting: 1 reqs, KV cache usage: 60.0%, Prefix cache hit rate: 75.0%")
    assert StatsLog.line(None, a, {**a, "t": 5.0}) is None
    assert StatsLog.line(None, a, {**b, "drafted": 40, "kept": 30}).endswith(", Drafts kept: 75.0%")
    assert StatsLog.line(None, a, {**a, "t": 1.0, "running": 2}).endswith("Prefix cache hit rate: -")


def test_models_health_and_keys(server, client):
    assert [m.id for m in client.models.list()] == ["tiny-random"]
    h = server.health()                                  # /health is open (no key needed)
    assert h["status"] == "ok" and h["free_blocks"] == h["total_blocks"] > 0
    for key in (None, "sk-wrong"):
        r = httpx.get(server.url + "/v1/models", headers={"Authorization": f"Bearer {key}"} if key else {})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", r.text
    r = post(server, "/v1/chat/completions", {"model": "tiny-random", "messages": [{"role": "user", "content": "x"}]},
             key="sk-wrong")
    assert r.status_code == 401 and "incorrect API key" in r.json()["error"]["message"]
    bad = openai.OpenAI(base_url=server.url + "/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(model="tiny-random", messages=[{"role": "user", "content": "x"}])


def test_openai_client_chat_stream_stop_max_tokens(client):
    msgs = [{"role": "user", "content": "hello there"}]
    r = client.chat.completions.create(model="tiny-random", messages=msgs, max_tokens=12, temperature=0,
                                       extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 12
    assert r.usage.total_tokens == r.usage.prompt_tokens + 12 and r.usage.prompt_tokens > 0
    full = r.choices[0].message.content
    # streaming gives the same greedy text, in pieces, with usage at the end
    chunks = list(client.chat.completions.create(model="tiny-random", messages=msgs, max_tokens=12, temperature=0,
                                                 stream=True, stream_options={"include_usage": True},
                                                 extra_body={"ignore_eos": True}))
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert "".join(pieces) == full and len(pieces) >= 2
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 12
    # stop: a string from the middle of the greedy answer ends it there
    stop = full[len(full) // 2:len(full) // 2 + 2]
    r2 = client.chat.completions.create(model="tiny-random", messages=msgs, max_tokens=12, temperature=0, stop=[stop],
                                        extra_body={"ignore_eos": True})
    assert r2.choices[0].finish_reason == "stop" and r2.choices[0].message.content == full[:full.index(stop)]
    # max_tokens caps the answer; the greedy answer is a prefix of the longer one
    r3 = client.chat.completions.create(model="tiny-random", messages=msgs, max_tokens=3, temperature=0,
                                        extra_body={"ignore_eos": True})
    assert r3.usage.completion_tokens == 3 and full.startswith(r3.choices[0].message.content)


def test_completions_seed_and_token_prompts(client):
    kw = dict(model="tiny-random", max_tokens=8, temperature=1.0, top_p=0.9, extra_body={"ignore_eos": True})
    a = client.completions.create(prompt="The quick brown fox", seed=7, **kw)
    b = client.completions.create(prompt="The quick brown fox", seed=7, **kw)
    assert a.choices[0].text == b.choices[0].text and a.usage.completion_tokens == 8
    many = client.completions.create(prompt=["one", "two", "three"], seed=1, **kw)
    assert sorted(c.index for c in many.choices) == [0, 1, 2] and many.usage.completion_tokens == 24
    ids = client.completions.create(prompt=[1, 2, 3, 4], seed=1, **kw)
    assert ids.usage.prompt_tokens == 4
    stream = list(client.completions.create(prompt="abc", stream=True, seed=3, **kw))
    assert "".join(c.choices[0].text for c in stream if c.choices) == \
        client.completions.create(prompt="abc", seed=3, **kw).choices[0].text


MSG = [{"role": "user", "content": "hi"}]
BAD = [  # (path, body, status, words the error message must contain)
    ("/v1/chat/completions", b'{"model": "tiny-random", "messages": [', 400, "not valid JSON"),
    ("/v1/chat/completions", b"[1, 2]", 400, "JSON object"),
    ("/v1/chat/completions", {"model": "gpt-4", "messages": MSG}, 404, "'gpt-4' does not exist"),
    ("/v1/chat/completions", {"model": "tiny-random", "messages": MSG, "max_tokens": "10"}, 400, "max_tokens"),
    ("/v1/chat/completions", {"model": "tiny-random", "messages": MSG, "temperature": "hot"}, 400, "temperature"),
    ("/v1/chat/completions", {"model": "tiny-random", "messages": "hi"}, 400, "messages"),
    ("/v1/chat/completions", {"model": "tiny-random", "messages": [{"role": "user", "content": 5}]}, 400,
     "messages.0.content"),
    ("/v1/chat/completions", {"model": "tiny-random", "messages": [{"role": "robot", "content": "x"}]}, 400, "role"),
    ("/v1/chat/completions", {"model": "tiny-random", "messages": MSG, "max_tokens": -5}, 400, "max_tokens"),
    ("/v1/chat/completions", {"model": "tiny-random", "messages": MSG, "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/chat/completions", {"model": "tiny-random", "messages": MSG, "max_tokens": 10**12}, 400,
     f"session_len={SESSION}"),
    ("/v1/chat/completions", {"model": "tiny-random", "messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"model": "tiny-random"}, 400, "missing required field 'messages'"),
    ("/v1/chat/completions", {"model": "tiny-random", "messages": [{"role": "user", "content": "w " * 400}]}, 400,
     f"session_len is {SESSION}"),
    ("/v1/chat/completions", {"model": "tiny-random", "messages": MSG, "audio": {"voice": "alloy"}}, 400,
     "audio is not supported"),
    ("/v1/chat/completions", {"model": "tiny-random", "messages": MSG, "modalities": ["text", "audio"]}, 400,
     "modalities"),
    ("/v1/chat/completions", {"model": "tiny-random", "messages": MSG, "functions": [{"name": "f"}]}, 400,
     "send them as tools"),
    ("/v1/completions", {"model": "tiny-random", "prompt": "x", "best_of": 3}, 400, "best_of"),
    ("/v1/chat/completions", {"model": "tiny-random", "messages": MSG, "top_p": 0}, 400, "top_p"),
    ("/v1/chat/completions", {"model": "tiny-random", "messages": MSG, "n": 0}, 400, "'n'"),
    ("/v1/chat/completions", {"model": "tiny-random", "messages": MSG, "stop": [""]}, 400, "stop"),
    ("/v1/completions", {"model": "tiny-random", "prompt": "x" * 1000}, 400, "session_len"),
    ("/v1/completions", {"model": "tiny-random", "prompt": [1, 99999]}, 400, "token ids"),
    ("/v1/completions", {"model": "tiny-random", "prompt": []}, 400, "prompt"),
    ("/v1/completions", {"model": "tiny-random", "prompt": [[1, 2], []]}, 400, "empty list (or holds one)"),
    ("/v1/completions", {"model": "tiny-random", "prompt": [1, [2]]}, 400, "prompt"),
    ("/v1/completions", {"model": "tiny-random", "messages": MSG}, 400, "missing required field 'prompt'"),
    ("/v1/nothing", {}, 404, "no route"),
    # issue 23: what used to be 500s, and OpenAI fields we cannot honour
    ("/v1/completions", {"model": "tiny-random", "prompt": "a\ud800b"}, 400, "'prompt'"),
    ("/v1/chat/completions", {"model": "tiny-random", "messages": [{"role": "user", "content": "\ud800"}]}, 400,
     "'messages.0.content'"),
    ("/v1/chat/completions", {"model": "\udfff", "messages": MSG}, 400, "'model'"),
    ("/v1/chat/completions", b'{"model": "tiny-random", "messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", 400,
     "nested too deeply"),
    ("/v1/completions", {"model": "tiny-random", "prompt": "x", "seed": 2**64}, 400, "seed=18446744073709551616"),
    ("/v1/completions", {"model": "tiny-random", "prompt": "x", "seed": -2**63 - 1}, 400, "-2^63 to 2^64-1"),
    ("/v1/chat/completions", {"model": "tiny-random", "messages": MSG, "max_tokens": 1.5}, 400, "max_tokens"),
    ("/v1/chat/completions", {"model": "tiny-random", "messages": MSG, "prediction": {"type": "content"}}, 400,
     "prediction is not supported"),
    # sampling controls, structured output and tools: bad values name their field
    ("/v1/chat/completions", {"model": "tiny-random", "messages": MSG, "presence_penalty": 2.5}, 400,
     "presence_penalty"),
    ("/v1/completions", {"model": "tiny-random", "prompt": "x", "frequency_penalty": -3}, 400, "frequency_penalty"),
    ("/v1/completions", {"model": "tiny-random", "prompt": "x", "min_p": 1.5}, 400, "min_p"),
    ("/v1/completions", {"model": "tiny-random", "prompt": "x", "logit_bias": {"abc": 1}}, 400, "logit_bias"),
    ("/v1/completions", {"model": "tiny-random", "prompt": "x", "logit_bias": {"5": 101}}, 400, "logit_bias"),
    ("/v1/completions", {"model": "tiny-random", "prompt": "x", "logit_bias": {"99999": 1}}, 400, "logit_bias"),
    ("/v1/chat/completions", {"model": "tiny-random", "messages": MSG, "response_format": {"type": "json_schema"}},
     400, "response_format"),
    ("/v1/chat/completions", {"model": "tiny-random", "messages": MSG, "response_format": {
        "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "frobnicate"}}}}, 400, "frobnicate"),
    ("/v1/chat/completions", {"model": "tiny-random", "messages": MSG, "tool_choice": "required"}, 400, "tool_choice"),
    ("/v1/chat/completions", {"model": "tiny-random", "messages": MSG, "tools": [
        {"type": "function", "function": {"name": "f"}}], "tool_choice": {"type": "function", "function": {
            "name": "g"}}}, 400, "'g', which is not in tools"),
    ("/v1/chat/completions", {"model": "tiny-random", "messages": [{"role": "user", "content": None}]}, 400,
     "messages.0.content"),
    ("/v1/chat/completions", {"model": "tiny-random", "messages": [{"role": "tool", "content": "1"}]}, 400,
     "tool_call_id"),
]


@pytest.mark.parametrize("path,body,status,words", BAD, ids=[f"{i}-{b[2]}" for i, b in enumerate(BAD)])
def test_bad_requests_get_openai_errors(server, path, body, status, words):
    r = post(server, path, body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert words in err["message"], err
    assert set(err) == {"message", "type", "param", "code"}


def test_server_keeps_serving_after_bad_input(server, client):
    for path, body, *_ in BAD:
        post(server, path, body)
    r = client.chat.completions.create(model="tiny-random", messages=MSG, max_tokens=4)
    assert r.choices[0].finish_reason in ("stop", "length") and server.alive()
    h = server.health()
    assert h["free_blocks"] == h["total_blocks"] and h["running"] == h["waiting"] == 0


def test_newer_client_fields_ignored_and_integral_floats(server):
    """issue 23: fields that change nothing here are accepted; max_tokens 1.0 is 1; seeds up to 2^64-1 work."""
    extra = {"store": True, "metadata": {"a": "b"}, "parallel_tool_calls": False, "service_tier": "auto",
             "user": "u1", "prediction": None, "stream_options": None}
    r = post(server, "/v1/chat/completions", {"model": "tiny-random", "messages": MSG, "max_tokens": 1.0,
                                              "ignore_eos": True, **extra})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 1, r.text
    r = post(server, "/v1/completions", {"model": "tiny-random", "prompt": "x", "max_tokens": 2.0, "ignore_eos": True,
                                         "seed": 2**64 - 1, **extra})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2, r.text


def test_unknown_fields_are_ignored_and_logged_once(server):
    """issue 23, as vLLM: a field this server does not know (a typo, a newer client's field, at the top level or in a
    message) is dropped and logged once per name; the request is answered."""
    msgs = [{"role": "user", "content": "hi", "refusal": None, "annotations": []}]
    for _ in range(2):
        r = post(server, "/v1/chat/completions", {"model": "tiny-random", "messages": msgs, "max_tokens": 2,
                                                  "temprature": 0.5, "modalities": ["text"], "best_of": 1})
        assert r.status_code == 200, r.text
    r = post(server, "/v1/completions", {"model": "tiny-random", "prompt": "x", "max_tokens": 1, "frobnicate": 1})
    assert r.status_code == 200, r.text
    log = server.log()
    assert log.count("ignoring unknown field 'temprature' in ChatRequest") == 1
    assert log.count("ignoring unknown field 'refusal' in ChatMessage") == 1
    assert "ignoring unknown field 'frobnicate' in CompletionRequest" in log


def test_model_object_and_openapi(server, client):
    m = client.models.retrieve("tiny-random")
    assert m.id == "tiny-random" and m.object == "model" and m.owned_by == "llm-pipeline"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")
    r = httpx.get(server.url + "/v1/models/gpt-4", headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 404 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert r.json()["error"]["code"] == "model_not_found"
    spec = httpx.get(server.url + "/openapi.json").json()
    assert spec["openapi"].startswith("3.") and "/v1/chat/completions" in spec["paths"]
    assert "/v1/models/{model_id}" in spec["paths"] or "/v1/models/{model_id:path}" in spec["paths"]


PETS = {"type": "object", "properties": {   # bounded (enums, booleans, short arrays): even a random model ends it
    "kind": {"enum": ["cat", "dog", "bird"]}, "ok": {"type": "boolean"},
    "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3},
    "owner": {"type": "object", "properties": {"adult": {"type": "boolean"}}, "required": ["adult"]}},
    "required": ["kind", "ok", "tags", "owner"]}


def test_logit_bias_forces_and_forbids(client):
    ask = dict(model="tiny-random", prompt="hi", max_tokens=6, temperature=0, extra_body={"ignore_eos": True})
    forced = client.completions.create(**ask, logit_bias={"65": 100}).choices[0].text
    assert len(forced) == 6 and set(forced) == {forced[0]}             # the biased token, every time
    both = client.completions.create(**ask, logit_bias={"65": -100, "66": 100}).choices[0].text
    assert forced[0] not in both and len(set(both)) == 1 and both != forced


def test_json_schema_answers_validate_even_from_a_random_model(client):
    """The grammar alone makes the answer: a random model's greedy and sampled answers all parse and validate, and
    end with "stop" (EOS is allowed only where the JSON is complete)."""
    import jsonschema
    fmt = {"type": "json_schema", "json_schema": {"name": "pets", "schema": PETS}}
    answers = [client.chat.completions.create(model="tiny-random", messages=MSG, max_tokens=200, temperature=t,
                                              seed=s, response_format=fmt).choices[0] for t, s in [(0, 0), (1.2, 1),
                                                                                                   (1.2, 2), (1.2, 3)]]
    for c in answers:
        assert c.finish_reason == "stop", c.message.content
        jsonschema.validate(json.loads(c.message.content), PETS)
    assert len({c.message.content for c in answers}) > 1


def test_langchain_structured_output_and_litellm_penalties(server, monkeypatch):
    """The real clients: LangChain's with_structured_output (response_format json_schema from a pydantic model) and
    LiteLLM's completion with OpenAI's penalties and n=2."""
    from typing import Literal

    from langchain_openai import ChatOpenAI
    from pydantic import BaseModel

    class Pet(BaseModel):
        kind: Literal["cat", "dog", "bird"]
        friendly: bool

    llm = ChatOpenAI(model="tiny-random", base_url=server.url + "/v1", api_key=KEY, max_tokens=80, max_retries=0)
    pet = llm.with_structured_output(Pet).invoke("Describe a pet.")
    assert isinstance(pet, Pet)
    monkeypatch.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "True")             # no fetch of the price list
    import litellm
    r = litellm.completion(model="openai/tiny-random", api_base=server.url + "/v1", api_key=KEY, messages=MSG,
                           max_tokens=8, presence_penalty=0.5, frequency_penalty=0.5, min_p=0.1, ignore_eos=True, n=2,
                           temperature=1.0, seed=3)
    assert len(r.choices) == 2 and [c.index for c in r.choices] == [0, 1]
    assert r.usage.completion_tokens == 16 and all(c.finish_reason == "length" for c in r.choices)


def test_https_with_a_certificate(server, tmp_path):
    """--ssl-keyfile / --ssl-certfile: the server speaks HTTPS (the openai client trusting that certificate gets
    answers; plain HTTP gets none), and a bad pair fails at once, before the engine starts, naming the file."""
    import shutil
    import subprocess
    import sys

    from pipeline.server.launch import REPO
    if shutil.which("openssl") is None:
        pytest.skip("no openssl command here to make a test certificate")
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True)
    ws = next(x.split("workspace: ", 1)[1].strip() for x in server.log().splitlines() if "workspace: " in x)
    s = ApiServer.for_workspace(tmp_path / "srv", ws, "--device", "cpu", "--session-len", str(SESSION),
                                "--ssl-keyfile", str(key), "--ssl-certfile", str(cert))
    import ssl
    s.verify = ssl.create_default_context(cafile=str(cert))   # trust that certificate only
    s.start()
    try:
        assert s.url.startswith("https://127.0.0.1:")
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="none", max_retries=0, timeout=60,
                          http_client=httpx.Client(verify=s.verify))
        assert c.completions.create(model="tiny-random", prompt=[5, 6], max_tokens=2).usage.completion_tokens >= 1
        with pytest.raises(httpx.HTTPError):
            httpx.get(s.url.replace("https://", "http://") + "/health", timeout=5)
    finally:
        assert s.stop() == 0, s.log()[-3000:]
    bad = subprocess.run([sys.executable, "-m", "pipeline.serve", ws, "--ssl-keyfile", str(tmp_path / "nope.pem"),
                          "--ssl-certfile", str(cert)], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "ssl_keyfile=" in bad.stderr and "no such file" in bad.stderr, bad.stderr
    half = subprocess.run([sys.executable, "-m", "pipeline.serve", ws, "--ssl-certfile", str(cert)], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert half.returncode == 2 and "only ssl_certfile is given" in half.stderr, half.stderr
