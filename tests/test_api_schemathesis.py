"""Property-based fuzzing of the API server from its own /openapi.json (schemathesis): every operation gets valid
and invalid bodies (bounded examples); no answer is a server error (5xx), and the server is alive and idle
after. Slow: a real server process (tiny-random), a few hundred requests."""
from __future__ import annotations

import httpx
import pytest

from pipeline.server.launch import ApiServer

pytestmark = pytest.mark.slow
KEY = "sk-fuzz"
EXAMPLES = 30     # per operation and generation mode


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = ApiServer(tmp_path_factory.mktemp("fuzz"), "model=tiny-random", "quant=fp16", "serve.session_len=128",
                  "serve.max_batch_size=8", f"serve.api.keys=[{KEY}]", "serve.max_new_tokens=4").start()
    yield s
    assert s.stop() == 0, s.log()[-3000:]


def test_no_server_errors_from_schema_generated_requests(server):
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, given, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis.generation import GenerationMode

    spec = httpx.get(server.url + "/openapi.json", timeout=30).json()
    assert "ChatRequest" in spec["components"]["schemas"]          # the POST bodies are described
    schema = schemathesis.openapi.from_dict(spec)
    failures, calls = [], 0
    for result in schema.get_all_operations():
        op = result.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
                      suppress_health_check=list(HealthCheck))
            @given(case=op.as_strategy(mode))
            def run(case):
                nonlocal calls
                r = case.call(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
                calls += 1
                if r.status_code >= 500:
                    failures.append((op.label, mode.value, r.status_code, r.text[:300], case.body))
            try:
                run()
            except Unsatisfiable:   # no invalid input to make (e.g. GET /health has no parameters)
                assert mode is GenerationMode.NEGATIVE, op.label
    print(f"{calls} requests")
    assert calls >= 2 * EXAMPLES, calls
    assert not failures, failures[:5]
    assert server.alive()
    h = server.health()
    assert h["running"] == h["waiting"] == 0 and h["free_blocks"] == h["total_blocks"]
