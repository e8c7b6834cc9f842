"""The engine in its own process (pipeline/engine/core.py) behind EngineClient, and `python -m pipeline.serve`:
the same tokens as the in-process Engine, stop strings and cancellation from the front end, a dead or hung
engine process named and ended, the API server exiting when its engine dies, chat/generate printing only
the conversation. Real processes, a tiny random workspace, CPU."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx
import pytest
import torch

from conftest import REPO
from pipeline.engine import Engine, SamplingParams
from pipeline.engine.client import EXIT_CODE, EngineClient
from pipeline.models.llama import ModelArgs
from pipeline.models.sources import save_byte_tokenizer, synthetic_tensors
from pipeline.server.launch import ApiServer
from pipeline.workspace import write_workspace

ARGS = ModelArgs(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=32, hidden_dim=256, vocab_size=320,
                 max_seq_len=512)
SETTINGS = {"session_len": 256, "max_batch_size": 8, "cache_block_seq_len": 16}
PROMPTS = [[5, 6, 7], list(range(10, 47)), [100], list(range(200, 215))]


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    root = tmp_path_factory.mktemp("engine_process")
    save_byte_tokenizer(root / "tok", ARGS.vocab_size)
    write_workspace(root / "workspace", ARGS, synthetic_tensors(ARGS, 0, torch.float32), root / "tok", kv_bits=None)
    return root / "workspace"


@pytest.fixture(scope="module")
def client(ws, tmp_path_factory):
    c = EngineClient(ws, device="cpu", overrides=SETTINGS, log_file=str(tmp_path_factory.mktemp("log") / "core.log"))
    yield c
    c.stop()
    assert c.proc.returncode == 0


@pytest.fixture(scope="module")
def local(ws):
    return Engine.from_workspace(ws, device="cpu", overrides=SETTINGS)


def test_same_tokens_and_text_as_in_process(client, local):
    for p in (SamplingParams(max_new_tokens=12), SamplingParams(max_new_tokens=9, temperature=0.8, top_p=0.9, seed=7)):
        assert client.generate(PROMPTS, p) == local.generate(PROMPTS, p)
    text = "".join(o.text for o in local.submit(PROMPTS[1], SamplingParams(max_new_tokens=20)))
    stop = text[6:9]
    outs = list(client.submit(PROMPTS[1], SamplingParams(max_new_tokens=20, stop=[stop])))
    assert outs[-1].finished and outs[-1].finish_reason == "stop"
    assert "".join(o.text for o in outs) == text[:text.index(stop)]
    st = wait_idle(client)
    assert st["engine_pid"] == client.proc.pid   # the stop string cancelled it in the core
    lat = st["latency"]   # the core's pickup of each request (front end's send -> taken between steps)
    assert lat["picked"] >= 2 * len(PROMPTS) + 1 and 0 <= lat["pickup_s"] / lat["picked"] < 5.0


def wait_idle(client, timeout: float = 10) -> dict:
    """Poll stats until nothing runs and every KV block is back."""
    deadline = time.time() + timeout
    while (st := client.stats())["free_blocks"] != st["total_blocks"] or st["running"] or st["waiting"]:
        assert time.time() < deadline, st
        time.sleep(0.05)
    return st


def test_bad_requests_fail_at_submit(client):
    with pytest.raises(ValueError, match="session_len=256"):
        client.submit(list(range(3, 300)), SamplingParams(max_new_tokens=4))
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 320\)"):
        client.submit([5, 999], SamplingParams(max_new_tokens=4))
    with pytest.raises(ValueError, match="temperature"):
        client.submit([5], SamplingParams(temperature=-1))


def test_cancel_frees_blocks(client):
    h = client.submit(PROMPTS[1], SamplingParams(max_new_tokens=200, ignore_eos=True))
    first = next(iter(h))
    assert not first.finished
    h.cancel()
    outs = list(h)
    assert outs[-1].finish_reason == "cancelled" and outs[-1].num_generated_tokens < 200
    wait_idle(client)


def test_killed_engine_fails_requests_and_names_it(ws, tmp_path):
    reasons = []
    c = EngineClient(ws, device="cpu", overrides=SETTINGS, log_file=str(tmp_path / "core.log"),
                     on_failure=reasons.append)
    try:
        h = c.submit(PROMPTS[1], SamplingParams(max_new_tokens=250 - len(PROMPTS[1]), ignore_eos=True))
        next(iter(h))
        os.kill(c.proc.pid, signal.SIGKILL)
        outs = list(h)
        assert outs[-1].finish_reason == "error" and f"pid {c.proc.pid}" in outs[-1].error
        assert reasons and "was killed by SIGKILL" in reasons[0]
        with pytest.raises(RuntimeError, match="not running"):
            c.submit([5], SamplingParams())
    finally:
        c.stop()


def test_hung_engine_is_killed_after_the_timeout(ws, tmp_path):
    reasons = []
    c = EngineClient(ws, device="cpu", overrides=SETTINGS, hang_timeout=2.0, on_failure=reasons.append)
    try:
        os.kill(c.proc.pid, signal.SIGSTOP)               # frozen: no step ends, no heartbeat comes
        deadline = time.time() + 20
        while not reasons:
            assert time.time() < deadline, "the hung engine was not noticed"
            time.sleep(0.1)
        assert "hangs" in reasons[0] and "it was killed" in reasons[0]
        assert c.proc.wait(10) == -signal.SIGKILL
    finally:
        c.stop()


def test_api_server_exits_when_its_engine_dies(ws, tmp_path):
    s = ApiServer.for_workspace(tmp_path, ws, "--max-batch-size", "4", "--session-len", "256", "--device", "cpu",
                                "--api-key", "sk-1").start()
    try:
        h = s.health()
        assert h["engine_process"] and h["engine_pid"] != s.proc.pid
        r = httpx.post(s.url + "/v1/completions", headers={"Authorization": "Bearer sk-1"}, timeout=60,
                       json={"model": h["model"], "prompt": "abc", "max_tokens": 5, "temperature": 0})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1, r.text
        os.kill(h["engine_pid"], signal.SIGKILL)
        assert s.proc.wait(30) == EXIT_CODE
        assert f"the engine core process (pid {h['engine_pid']}) was killed by SIGKILL" in s.log()
    finally:
        s.stop()


def test_sigterm_lets_the_stream_in_flight_finish_then_stops_the_engine(ws, tmp_path):
    """A container's stop (SIGTERM): the stream in flight ends whole, the engine process is stopped (not left to
    notice its parent gone) and the server exits 0, as after Ctrl-C."""
    import threading
    s = ApiServer.for_workspace(tmp_path, ws, "--max-batch-size", "4", "--session-len", "256", "--device", "cpu").start()
    try:
        h = s.health()
        chunks, started = [], threading.Event()

        def stream():
            with httpx.stream("POST", s.url + "/v1/completions", timeout=60, json={
                    "model": h["model"], "prompt": [5, 6, 7], "max_tokens": 200, "ignore_eos": True, "stream": True,
                    "temperature": 0}) as r:
                for line in r.iter_lines():
                    started.set()
                    chunks.append(line)
        t = threading.Thread(target=stream)
        t.start()
        assert started.wait(30)
        s.proc.send_signal(signal.SIGTERM)
        assert s.proc.wait(30) == 0, s.log()[-3000:]
        t.join(30)
        assert [c for c in chunks if c][-1] == "data: [DONE]", chunks[-3:]
        assert sum('"finish_reason": "length"' in c for c in chunks) == 1
        assert "API server stopped (SIGTERM)" in s.log() and "is gone; exiting" not in s.log()
        deadline = time.time() + 10
        while time.time() < deadline and _alive(h["engine_pid"]):
            time.sleep(0.1)
        assert not _alive(h["engine_pid"])
    finally:
        s.stop()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:              # a zombie (exited, not yet reaped) is gone too
        return f.read().split(") ", 1)[1][0] != "Z"


def test_serve_cli_generate_prints_only_the_conversation(ws, tmp_path):
    log = tmp_path / "serve.log"
    p = subprocess.run([sys.executable, "-m", "pipeline.serve", str(ws), "--mode", "generate", "--device", "cpu",
                        "--prompt", "hello", "--prompt", "bye", "--max-new-tokens", "6", "--log-file", str(log)],
                       cwd=REPO, capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, p.stderr[-3000:]
    lines = [x for x in p.stdout.splitlines() if x.strip()]
    assert lines[0] == ">>> hello" and ">>> bye" in lines, p.stdout
    assert "INFO" not in p.stdout + p.stderr and "kernel" not in p.stdout, p.stdout + p.stderr
    assert "engine core ready" in log.read_text()             # the logs went to the file


def test_serve_cli_names_a_bad_workspace(tmp_path):
    p = subprocess.run([sys.executable, "-m", "pipeline.serve", str(tmp_path / "nope"), "--mode", "generate"],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "is not a workspace" in p.stderr and str(tmp_path / "nope") in p.stderr
    assert not (tmp_path / "serve.log").exists()   # no log file beside a folder that is not there


def test_serve_cli_names_a_bad_setting_with_this_runs_log_only(ws, tmp_path):
    """A setting out of range ends the CLI with status 2 and the setting's name, value and range; the log tail it
    shows is this run's (the log file is appended to by every run)."""
    log = tmp_path / "serve.log"
    log.write_text("an earlier run's line\n")
    p = subprocess.run([sys.executable, "-m", "pipeline.serve", str(ws), "--mode", "generate", "--device", "cpu",
                        "--prompt", "hi", "--max-batch-size", "0", "--log-file", str(log)],
                       cwd=REPO, capture_output=True, text=True, timeout=180)
    assert p.returncode == 2, p.stderr[-3000:]
    assert "max_batch_size=0 is out of range: sequences running at once, must be >= 1" in p.stderr
    assert "an earlier run's line" not in p.stderr and "an earlier run's line" in log.read_text()
