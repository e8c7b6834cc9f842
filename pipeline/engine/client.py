"""The front end of the engine-core process: the Engine's API, with the engine stepping in a process of its own.

Usage (what the API server, terminal chat and generate use; in-process `Engine` keeps working as before):
    eng = EngineClient(ws, device="cuda", overrides={"max_batch_size": 32})   # starts the core, waits for ready
    h = eng.submit(eng.apply_chat_template([{"role": "user", "content": "hi"}]), SamplingParams(max_new_tokens=64))
    for out in h: print(out.text, end="")         # or `async for out in h.aiter()`
    eng.stats(); h.cancel(); eng.stop()

Here, in the caller's process: tokenization, chat templates, detokenization and stop strings (a stop string
cancels the request in the core), request checks (the same `check_request` as the engine, so a bad request
fails at submit). In the core (core.py): scheduling, the KV cache, sampling, the device.

Failure: a thread here watches the core. If its process exits, or its current step runs longer than
`hang_timeout` s (heartbeats carry the step's age), or nothing at all arrives for that long, the client says
so (log and stderr, naming the pid, the exit status and the tail of the core's log), fails every open request
with an error, and calls `on_failure(reason)`; the API server passes one that exits with EXIT_CODE.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Optional

import msgpack
import zmq

from ..workspace import TOKENIZER
from .engine import check_request
from .handle import RequestHandle, wake_all
from .params import GenerationOutput, SamplingParams
from .procs import exit_text
from .text import Detokenizer, chat_prompt

log = logging.getLogger(__name__)
EXIT_CODE = 71          # the server's exit status when its engine core dies or hangs


class ClientHandle(RequestHandle):
    """A request's stream in the front end: token ids from the core, text decoded here."""

    def __init__(self, client: "EngineClient", rid: int, detok: Detokenizer):
        super().__init__(client, rid)
        self.detok = detok
        self.finished = False

    def deliver(self, ids: list[int], finished: bool, reason, error, n_prompt: int, n_gen: int,
                logprobs=None, prompt_logprobs=None, wake: bool = True) -> bool:
        """One output of the core; True when a stop string ended the request here (the core must cancel it).
        wake=False: the caller wakes the consumer (handle.wake_all, once per message of the core)."""
        if self.finished:
            return False
        hit = False
        for i, t in enumerate(ids):
            if self.detok.add(t):
                hit, ids, finished, reason = True, ids[:i + 1], True, "stop"
                logprobs = logprobs and logprobs[:i + 1]
                break
        n_gen = len(self.detok.ids) if hit else n_gen
        self.finished = finished
        self._push(GenerationOutput(self.request_id, list(ids), self.detok.take(finished), finished, reason,
                                    error, n_prompt, n_gen, logprobs, prompt_logprobs), wake)
        return hit


class EngineClient:
    def __init__(self, workspace, device: str = "auto", overrides: Optional[dict] = None,
                 log_file: Optional[str] = None, log_level: str = "INFO", hang_timeout: float = 120.0,
                 on_failure: Optional[Callable[[str], None]] = None, start_timeout: Optional[float] = None):
        ws = Path(workspace)
        self.workspace, self.hang_timeout, self.on_failure, self.log_file = ws, hang_timeout, on_failure, log_file
        self.tokenizer = None
        self._ids = itertools.count()
        self._handles: dict[int, ClientHandle] = {}
        self._send_lock = threading.Lock()
        self._stats_wait: dict[int, tuple[threading.Event, list]] = {}
        self._closing = False
        self.failed: Optional[str] = None
        self._dir = tempfile.mkdtemp(prefix="llmp-")   # ipc socket paths must stay short
        self._ctx = zmq.Context()
        self._out = self._ctx.socket(zmq.PUSH)          # -> core
        self._in = self._ctx.socket(zmq.PULL)           # <- core (outputs, replies, heartbeats)
        for s in (self._out, self._in):
            s.setsockopt(zmq.LINGER, 0)
        self._out.bind(f"ipc://{self._dir}/in")
        self._in.bind(f"ipc://{self._dir}/out")
        cmd = [sys.executable, "-m", "pipeline.engine.core", "--workspace", str(ws), "--device", str(device),
               "--overrides", json.dumps({k: v for k, v in (overrides or {}).items() if v is not None}),
               "--inbox", f"ipc://{self._dir}/in", "--outbox", f"ipc://{self._dir}/out",
               "--parent", str(os.getpid()), "--log-level", log_level] + (["--log-file", log_file] if log_file else [])
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        repo = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = repo + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        t0 = time.monotonic()
        # where this core's lines begin in a log file shared with earlier runs (its tail in errors is this run's only)
        self._log_start = Path(log_file).stat().st_size if log_file and Path(log_file).exists() else 0
        self.proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL)
        log.info("engine core process started (pid %d)%s", self.proc.pid, f", its log: {log_file}" if log_file else "")
        try:
            if (ws / TOKENIZER).exists():   # while the core starts (imports, weights, warm-up)
                from transformers import AutoTokenizer
                self.tokenizer = AutoTokenizer.from_pretrained(str(ws / TOKENIZER))
            self.info = self._wait_ready(start_timeout)
        except BaseException:
            self._kill()
            raise
        self.ready_s = time.monotonic() - t0   # the core's whole start, its interpreter and imports included
        self.session_len, self.model_name = self.info["session_len"], self.info["model_name"]
        self._last_msg = time.monotonic()
        self._busy = 0.0
        self._thread = threading.Thread(target=self._recv_loop, name="engine-client", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ start-up
    def _wait_ready(self, timeout: Optional[float]) -> dict:
        t0 = time.monotonic()
        while True:
            if self._in.poll(200):
                msg = msgpack.unpackb(self._in.recv(), raw=False)
                if msg[0] == "ready":
                    return msg[1]
                if msg[0] == "fatal":
                    self.proc.wait(30)
                    raise RuntimeError(f"the engine core process failed to start: {msg[1]}{self._log_tail()}")
                continue                               # heartbeats while it loads and warms up
            code = self.proc.poll()
            if code is not None:
                raise RuntimeError(f"the engine core process (pid {self.proc.pid}) {exit_text(code)} while "
                                   f"starting{self._log_tail()}")
            if timeout is not None and time.monotonic() - t0 > timeout:
                raise RuntimeError(f"the engine core process (pid {self.proc.pid}) was not ready after {timeout} s"
                                   f"{self._log_tail()}")

    def _log_tail(self, n: int = 3000) -> str:
        """The last n characters this run wrote to its log file ("" where there are none)."""
        if not self.log_file or not Path(self.log_file).exists():
            return ""
        with open(self.log_file, "rb") as f:
            f.seek(self._log_start)
            text = f.read().decode(errors="replace")[-n:]
        return f"\nthe end of its log ({self.log_file}):\n{text}" if text.strip() else ""

    # ------------------------------------------------------------------ Engine's API
    def _send(self, msg) -> None:
        if self.failed:
            raise RuntimeError(f"the engine is not running: {self.failed}")
        with self._send_lock:
            self._out.send(msgpack.packb(msg))

    def submit(self, prompt_ids: list[int], params: Optional[SamplingParams] = None) -> ClientHandle:
        params = params or SamplingParams()
        prompt, _ = check_request(prompt_ids, params, self.session_len, self.info["vocab_size"],
                                  self.info["kv_capacity_tokens"])
        rid = next(self._ids)
        h = ClientHandle(self, rid, Detokenizer(self.tokenizer, params.stop))
        self._handles[rid] = h
        core_params = dataclasses.asdict(params)
        core_params["stop"] = []                     # checked here, on the text
        try:
            self._send(["add", rid, prompt, core_params, time.perf_counter()])
        except BaseException:
            self._handles.pop(rid, None)
            raise
        return h

    def cancel(self, request_id: int) -> None:
        if not self.failed:
            self._send(["cancel", [request_id]])

    def generate(self, prompts: list[list[int]], params: Optional[SamplingParams] = None) -> list[list[int]]:
        handles = [self.submit(p, params) for p in prompts]
        return [[t for out in h for t in out.token_ids] for h in handles]

    def apply_chat_template(self, messages: list[dict], tools: Optional[list[dict]] = None) -> list[int]:
        return chat_prompt(self.tokenizer, messages, tools)

    def stats(self, timeout: float = 10.0) -> dict:
        """The core's Engine.stats() (plus engine_pid); waits for the step in progress to end."""
        token = next(self._ids)
        ev, box = threading.Event(), []
        self._stats_wait[token] = (ev, box)
        try:
            self._send(["stats", token])
            if not ev.wait(timeout):
                raise TimeoutError(f"the engine core (pid {self.proc.pid}) did not answer a stats request "
                                   f"in {timeout} s")
        finally:
            self._stats_wait.pop(token, None)
        st = {**box[0], "engine_pid": self.proc.pid, "engine_process": True}
        st["startup"] = {**st.get("startup", {}), "spawn_to_ready_s": self.ready_s}
        return st

    def start(self) -> "EngineClient":
        return self                                   # the core steps from its start

    def running_thread(self) -> bool:
        return True                                   # handles never step an engine in the caller's thread

    def stop(self, timeout: float = 30.0) -> None:
        if self._closing:
            return
        self._closing = True
        try:
            if self.proc.poll() is None and not self.failed:
                with self._send_lock:
                    self._out.send(msgpack.packb(["stop"]))
                self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            log.warning("the engine core (pid %d) did not stop in %s s; killing it", self.proc.pid, timeout)
        finally:
            self._kill()
            self._thread.join(2)
            self._fail_open("cancelled", None)
            self._ctx.destroy(linger=0)
            shutil.rmtree(self._dir, ignore_errors=True)

    def _kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    # ------------------------------------------------------------------ the receiving thread
    def _recv_loop(self) -> None:
        while not self._closing:
            try:
                if self._in.poll(200):
                    self._dispatch(msgpack.unpackb(self._in.recv(), raw=False))
                    self._last_msg = time.monotonic()
            except zmq.ZMQError:
                if self._closing:
                    return
                raise
            if not self._closing:
                self._check_alive()

    def _dispatch(self, msg) -> None:
        op = msg[0]
        if op == "out":
            stops, delivered = [], []
            for rid, *out in msg[1]:
                h = self._handles.get(rid)
                if h is None:
                    continue
                if h.deliver(*out, wake=False):
                    stops.append(rid)
                delivered.append(h)
                if h.finished:
                    del self._handles[rid]
            wake_all(delivered)                      # one call into the event loop for the step, not one a request
            if stops and not self._closing:
                self._send(["cancel", stops])
        elif op == "beat":
            self._busy = msg[1]
        elif op == "stats":
            ev, box = self._stats_wait.get(msg[1], (None, None))
            if ev is not None:
                box.append(msg[2])
                ev.set()

    def _check_alive(self) -> None:
        code = self.proc.poll()
        if code is not None:
            return self._failure(f"the engine core process (pid {self.proc.pid}) {exit_text(code)}")
        quiet = time.monotonic() - self._last_msg
        if self._busy > self.hang_timeout or quiet > self.hang_timeout:
            what = f"one step has run for {self._busy:.0f} s" if self._busy > self.hang_timeout else \
                f"nothing came from it for {quiet:.0f} s"
            self.proc.kill()
            return self._failure(f"the engine core process (pid {self.proc.pid}) hangs ({what}, over the "
                                 f"{self.hang_timeout:.0f} s limit); it was killed")

    def _failure(self, reason: str) -> None:
        if self.failed or self._closing:
            return
        self.failed = reason
        reason += self._log_tail(2000)
        log.error(reason)
        print(f"error: {reason}", file=sys.stderr, flush=True)
        self._fail_open("error", reason)
        if self.on_failure is not None:
            self.on_failure(reason)

    def _fail_open(self, reason: str, error: Optional[str]) -> None:
        for rid, h in list(self._handles.items()):
            h.deliver([], True, reason, error, 0, len(h.detok.ids))
            self._handles.pop(rid, None)
