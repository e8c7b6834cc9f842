"""serve.mode=chat in a real terminal (a pty): prompt, streamed answers, multi-turn, `exit` leaves."""
from __future__ import annotations

import json
import os
import pty
import select
import subprocess
import sys
import time

from conftest import REPO


def read_until(fd: int, token: str, buf: list, timeout: float = 180) -> str:
    end = time.time() + timeout
    while time.time() < end:
        text = b"".join(buf).decode(errors="replace")
        if token in text:
            buf.clear()
            return text
        r, _, _ = select.select([fd], [], [], 0.5)
        if r:
            try:
                buf.append(os.read(fd, 4096))
            except OSError:
                break
    raise AssertionError(f"no {token!r} within {timeout} s; terminal so far:\n{b''.join(buf).decode(errors='replace')}")


def test_chat_in_a_terminal(tmp_path):
    master, slave = pty.openpty()
    cmd = [sys.executable, "-m", "pipeline.runner", "pipeline=serve", "serve.mode=chat", "model=tiny-random",
           "serve.max_new_tokens=8", f"cache_dir={tmp_path / 'cache'}", f"hydra.run.dir={tmp_path / 'run'}"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TERM": "xterm"}
    p = subprocess.Popen(cmd, stdin=slave, stdout=slave, stderr=slave, cwd=REPO, env=env, close_fds=True)
    os.close(slave)
    buf: list = []
    try:
        banner = read_until(master, ">>> ", buf)
        assert "chat with tiny-random" in banner and "type 'exit' to leave, 'reset' to start over" in banner
        os.write(master, b"hello there\n")
        read_until(master, ">>> ", buf)
        os.write(master, b"and a second turn\n")
        read_until(master, ">>> ", buf)
        os.write(master, b"reset\n")
        assert "[a new conversation]" in read_until(master, ">>> ", buf)
        os.write(master, b"exit\n")
        read_until(master, "bye", buf)
        assert p.wait(120) == 0
    finally:
        if p.poll() is None:
            p.kill()
        os.close(master)
    summary = json.loads((tmp_path / "run" / "serve.json").read_text())
    assert summary == {"mode": "chat", "turns": 2}


class _Engine:
    """The parts of an engine chat() uses, recording each prompt it is given (the chat template: one line a turn)."""
    session_len = 10_000

    def __init__(self):
        self.prompts = []

    def stats(self):
        return {"model_name": "m", "weight_type": "fp16", "quant_policy": 0, "device": "cpu"}

    def apply_chat_template(self, msgs):
        return [f"{m['role']}:{m['content']}" for m in msgs]

    def submit(self, ids, params):
        from pipeline.engine.params import GenerationOutput
        self.prompts.append(ids)
        return iter([GenerationOutput(0, [1], "ok", True, "stop", None, len(ids), 1)])


def test_chat_system_prompt_reset_and_ctrl_c_at_the_prompt():
    """--system leads every turn's prompt; `reset` forgets the turns (not the system prompt); Ctrl-C at the prompt
    leaves as `exit` does (no traceback)."""
    from pipeline.serve import chat
    from pipeline.engine.params import SamplingParams
    lines, out, eng = iter(["hi", "again", "reset", "fresh"]), [], _Engine()

    def read(prompt):
        try:
            return next(lines)
        except StopIteration:
            raise KeyboardInterrupt from None
    res = chat(eng, SamplingParams(max_new_tokens=4), read=read, write=lambda *a, **k: out.append(a[0] if a else ""),
               system="be brief")
    assert res == {"mode": "chat", "turns": 3} and out[-1] == "bye" and "[a new conversation]" in out
    assert eng.prompts == [["system:be brief", "user:hi"],
                           ["system:be brief", "user:hi", "assistant:ok", "user:again"],
                           ["system:be brief", "user:fresh"]]
