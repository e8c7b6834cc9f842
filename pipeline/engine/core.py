"""The engine-core process: one Engine stepping the device, driven over ZeroMQ by a front end (client.py).

Started by EngineClient (never by hand):
    python -m pipeline.engine.core --workspace WS --device cuda --overrides '{"max_batch_size": 32}' \\
        --inbox ipc:///tmp/llmp-x/in --outbox ipc:///tmp/llmp-x/out --parent PID [--log-file F]

Why a process: in one process the HTTP server, SSE streams, tokenization and detokenization share the GIL
with the thread issuing kernel launches, and under 32 clients each launch took ~3.5x longer than in a bench
thread. Here the process does nothing but schedule and step; text lives in the front end.

Protocol (msgpack over PUSH/PULL sockets; the front end binds both, this process connects):
  front -> core   ["add", rid, prompt_ids, params, t_sent]   params: SamplingParams fields (stop strings stay
                                                     in the front end, which cancels a request that hits one);
                                                     t_sent: the front end's time.perf_counter() (one clock for
                                                     both processes on Linux) for the pickup wait below
                  ["cancel", [rid, ...]]  ["stats", token]  ["stop"]
  core -> front   ["ready", stats]        once the engine is built and warmed up
                  ["out", [[rid, token_ids, finished, reason, error, n_prompt, n_generated, logprobs,
                            prompt_logprobs], ...]]  per step (the logprobs: None unless the request asks)
                  ["stats", token, stats] ["beat", busy_s]   every BEAT_S from a thread: busy_s = seconds the
                                                             current step has run (0: idle); the front end
                                                             calls the engine hung when it grows past its limit
                  ["fatal", message]      start-up failed (the process then exits 1)
Outputs go out after every step, and after every decode step of a look-ahead run (Engine.on_step), which
also takes new requests and cancels in between, so streaming and admission never wait for a batch to end; in
look-ahead runs new messages are also taken at the decode graph's mark, before the next step is queued
(Engine.on_poll).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time
import traceback

import msgpack
import zmq

from .params import SamplingParams
from .procs import watch_parent

BEAT_S = 0.5
log = logging.getLogger("pipeline.engine.core")


class _Sink:
    """The engine's handle for one request in this process: outputs are collected, sent after the step."""

    def __init__(self, outbox: list, rid: int):
        self.outbox, self.request_id, self.done_pushed = outbox, rid, False

    def _push(self, out) -> None:
        self.done_pushed = out.finished
        self.outbox.append([out.request_id, out.token_ids, out.finished, out.finish_reason, out.error,
                            out.num_prompt_tokens, out.num_generated_tokens, out.logprobs, out.prompt_logprobs])


class Core:
    def __init__(self, engine, inbox: zmq.Socket, outbox: zmq.Socket):
        self.engine, self.inbox, self.outbox = engine, inbox, outbox
        self.pending: list = []                      # outputs of the current step, sent together
        self.busy_since = 0.0                        # monotonic start of the step in progress (0: idle)
        self.stopping = False
        # requests' wait from the front end's send to this process taking them (it does so between steps): seconds
        # summed over `picked`, in stats()["latency"] beside the engine's own (submit -> admitted, -> first token)
        self.pickup = {"picked": 0, "pickup_s": 0.0}
        engine.detokenize = False
        engine.handle_factory = lambda eng, rid: _Sink(self.pending, rid)
        engine.on_step = self.tick
        engine.on_poll = self.drain                  # mid-step in look-ahead runs (Engine._await_mark)

    def send(self, msg) -> None:
        self.outbox.send(msgpack.packb(msg), copy=False)

    def flush(self) -> None:
        if self.pending:
            self.send(["out", self.pending])
            self.pending.clear()

    def handle(self, msg) -> None:
        op = msg[0]
        if op == "add":
            _, rid, prompt, params, *sent = msg
            if sent:
                self.pickup["picked"] += 1
                self.pickup["pickup_s"] += max(0.0, time.perf_counter() - sent[0])
            try:
                self.engine.submit(prompt, SamplingParams(**params), request_id=rid)
            except (ValueError, TypeError) as e:     # the front end checks first; this is the last line
                self.pending.append([rid, [], True, "error", f"{type(e).__name__}: {e}", len(prompt), 0, None, None])
        elif op == "cancel":
            for rid in msg[1]:
                self.engine.cancel(rid)
        elif op == "stats":
            st = self.engine.stats()
            st["latency"] = {**st.get("latency", {}), **self.pickup}
            self.send(["stats", msg[1], st])
        elif op == "stop":
            self.stopping = True
        else:
            log.error("unknown message %r", op)

    def drain(self, timeout_ms: int = 0) -> None:
        """Handle every message waiting (waiting up to timeout_ms for the first)."""
        if timeout_ms and not self.inbox.poll(timeout_ms):
            return
        while True:
            try:
                raw = self.inbox.recv(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            self.handle(msgpack.unpackb(raw.buffer, raw=False, strict_map_key=False))   # int keys: logit_bias

    def tick(self) -> None:
        """After a decode step inside Engine.step: send its tokens, take what arrived. The next decode step starts
        now: a look-ahead run of many steps inside one Engine.step is not one step that hangs."""
        self.flush()
        self.drain()
        self.busy_since = time.monotonic()

    def run(self) -> None:
        e = self.engine
        while not self.stopping:
            idle = not e.has_work()
            if idle:
                e.timeline.pause()
            self.drain(50 if idle else 0)
            if self.stopping:
                break
            if e.has_work():
                self.busy_since = time.monotonic()
                e.step()
                self.busy_since = 0.0
            self.flush()
        e.stop()                                     # cancels what is left (outputs flushed below)
        self.flush()


def _beat(addr: str, ctx: zmq.Context, core_ref: list) -> None:
    """Heartbeats on a socket of this thread's own (sockets are not thread-safe)."""
    sock = ctx.socket(zmq.PUSH)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(addr)
    start = time.monotonic()
    while True:
        core = core_ref[0]
        if core is None:                              # still building the engine: report the start time
            busy = time.monotonic() - start
        else:
            busy = time.monotonic() - core.busy_since if core.busy_since else 0.0
        sock.send(msgpack.packb(["beat", busy]))
        time.sleep(BEAT_S)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workspace", required=True)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--overrides", default="{}")
    ap.add_argument("--inbox", required=True)
    ap.add_argument("--outbox", required=True)
    ap.add_argument("--parent", type=int, required=True)
    ap.add_argument("--log-file")
    ap.add_argument("--log-level", default="INFO")
    a = ap.parse_args(argv)
    signal.signal(signal.SIGINT, signal.SIG_IGN)    # Ctrl-C is the front end's: it stops this process by message
    if a.log_file:                                  # everything this process prints goes to the log file
        fd = os.open(a.log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
    logging.basicConfig(level=a.log_level, stream=sys.stderr, force=True,
                        format="[%(asctime)s][engine core %(process)d][%(name)s][%(levelname)s] - %(message)s")
    watch_parent(a.parent, f"[engine core] the front end (pid {a.parent}) is gone; exiting")
    ctx = zmq.Context()
    inbox, outbox = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
    outbox.setsockopt(zmq.LINGER, 2000)
    inbox.connect(a.inbox)
    outbox.connect(a.outbox)
    core_ref: list = [None]
    threading.Thread(target=_beat, args=(a.outbox, ctx, core_ref), daemon=True).start()
    t0 = time.perf_counter()
    try:
        from .engine import Engine
        engine = Engine.from_workspace(a.workspace, device=a.device, overrides=json.loads(a.overrides))
    except Exception as e:  # noqa: BLE001 - reported to the front end, which raises it
        log.error("engine start failed:\n%s", traceback.format_exc())
        outbox.send(msgpack.packb(["fatal", f"{type(e).__name__}: {e}"]))
        outbox.close()
        return 1
    engine.startup["core_s"] = time.perf_counter() - t0   # from main() to ready
    core = Core(engine, inbox, outbox)
    core_ref[0] = core
    st = engine.stats()
    st.update(pid=os.getpid(), vocab_size=engine.runner.args.vocab_size)
    core.send(["ready", st])
    log.info("engine core ready (pid %d): %s", os.getpid(), {k: st[k] for k in ("model_name", "device", "weight_type")})
    core.run()
    outbox.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
