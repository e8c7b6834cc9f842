"""OpenAI-compatible HTTP server (and the chat page at /) over one engine.

    python -m pipeline.runner pipeline=serve serve.mode=api                          # 127.0.0.1:23333
    python -m pipeline.runner pipeline=serve serve.mode=api serve.api.port=0 'serve.api.keys=[sk-1]'
    python -m pipeline.serve WORKSPACE --port 8000                                   # no graph, no config

The serve stage and `python -m pipeline.serve` open the engine (its own process by default) and call
serve_api(engine, host=..., port=...), which logs the workspace, quant config, KV capacity and URL, then
runs uvicorn until Ctrl-C or SIGTERM (a container's stop): it stops taking connections, lets the streams in flight
finish for up to 5 s, stops the engine and returns (the CLI then exits 0). Port 0 binds a free port (the log line
"API server listening on http://..." names it).
"""
from __future__ import annotations

import logging
import os
import signal
import socket
import threading
from typing import Optional

from ..weights import WEIGHT_TYPES
from .app import create_app
from .metrics import StatsLog

log = logging.getLogger("pipeline.server")
__all__ = ["create_app", "serve_api"]
KEY_ENV = "PIPELINE_API_KEY"   # accepted keys (comma-separated) where none is given as a flag or in the config


class Terminated(Exception):
    """SIGTERM, raised where uvicorn hands the signal back after its graceful shutdown (as it does Ctrl-C)."""


def _raise_terminated(signum, frame):
    raise Terminated()


def check_tls(keyfile: Optional[str], certfile: Optional[str]) -> bool:
    """Whether to serve HTTPS; ValueError naming what is wrong (one file without the other, a file not there, a key
    that does not go with its certificate), so a bad setting fails before the engine's start, not after it."""
    if not keyfile and not certfile:
        return False
    if not (keyfile and certfile):
        raise ValueError(f"TLS needs both ssl_keyfile and ssl_certfile; only {'ssl_keyfile' if keyfile else 'ssl_certfile'}"
                         " is given")
    import ssl
    for name, path in (("ssl_keyfile", keyfile), ("ssl_certfile", certfile)):
        if not os.path.isfile(path):
            raise ValueError(f"{name}={path!r}: no such file")
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(certfile, keyfile)
    except ssl.SSLError as e:
        raise ValueError(f"ssl_certfile={certfile!r} and ssl_keyfile={keyfile!r} do not load as a pair: {e}") from None
    return True


def quant_label(st: dict) -> str:
    """e.g. w4a16_kv8 from the engine's weight_type and quant_policy (0: 16-bit KV, 4: int8, 8: int4)."""
    w = getattr(WEIGHT_TYPES.get(st["weight_type"]), "label", "") or st["weight_type"]
    kv = {4: "_kv8", 8: "_kv4"}.get(st["quant_policy"], "")
    return w + kv


def serve_api(engine, *, host: str = "127.0.0.1", port: int = 23333, keys=(), defaults: Optional[dict] = None,
              workspace: str = "", quant: Optional[str] = None, served_model_names=(), allowed_origins=(),
              log_stats_interval: float = 10.0, ssl_keyfile: Optional[str] = None,
              ssl_certfile: Optional[str] = None) -> dict:
    """Serve `engine` (an EngineClient or a started Engine) over HTTP until interrupted; returns a summary.
    quant: the label to show (default: derived from the workspace's weight type and KV policy);
    served_model_names: the names requests may use, the first in responses (default: config.ini's model_name);
    allowed_origins: web origins allowed to call the API from their pages (CORS; default: none);
    log_stats_interval: seconds between the log's throughput / queue / KV-usage lines while the engine works (0: none);
    ssl_keyfile, ssl_certfile: serve HTTPS with this key and certificate (check_tls first, before the engine starts).
    """
    import uvicorn

    keys = [str(k) for k in keys or []]
    from_env = not keys and bool(os.environ.get(KEY_ENV, "").strip())
    if from_env:   # a secret in the environment, not in argv (which `ps` shows every user of the machine)
        keys = [k.strip() for k in os.environ[KEY_ENV].split(",") if k.strip()]
    st = engine.stats()
    names = [str(n) for n in served_model_names or []] or [st["model_name"]]   # default: config.ini's model_name
    model_name = names[0]
    quant = quant or quant_label(st)
    info = {"quant": quant, "weight_type": st["weight_type"], "quant_policy": st["quant_policy"],
            "kv_capacity_tokens": st["kv_capacity_tokens"], "session_len": st["session_len"],
            "max_batch_size": st["max_batch_size"], "device": st.get("device", "")}
    defaults = dict(defaults or {})
    app = create_app(engine, model_name=model_name, keys=keys, info=info, defaults=defaults, aliases=names[1:],
                     allowed_origins=[str(o) for o in allowed_origins or []])

    # proto IPPROTO_TCP, not 0: asyncio turns Nagle off (TCP_NODELAY) only on sockets that say they are TCP, and
    # with Nagle on, every response on a kept-alive connection after its first segment waited for the client's
    # delayed ACK: +40 ms a request, and SSE chunks held back the same way
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)   # inherited by accepted connections on Linux
    sock.bind((host, port))                       # port 0: the OS picks a free one
    port = sock.getsockname()[1]
    tls = check_tls(ssl_keyfile, ssl_certfile)
    url = f"{'https' if tls else 'http'}://{host if ':' not in host else f'[{host}]'}:{port}"
    full_seqs = st["kv_capacity_tokens"] // st["session_len"]
    log.info("workspace: %s", workspace or "(given engine)")
    log.info("model: %s, quant config: %s (weights %s, KV quant_policy=%s, %s)", " / ".join(names), quant,
             st["weight_type"], st["quant_policy"], {0: "fp16 KV", 4: "int8 KV", 8: "int4 KV"}.get(st["quant_policy"], "?"))
    log.info("KV cache: %d tokens (%d blocks of %d) = %d sequences at session_len=%d; up to %d sequences "
             "running at once (max_batch_size); more requests wait in a queue", st["kv_capacity_tokens"],
             st["total_blocks"], st["block_size"], full_seqs, st["session_len"], st["max_batch_size"])
    log.info("API keys: %s", f"{len(keys)} configured{f' (from {KEY_ENV})' if from_env else ''} "
             "(Authorization: Bearer <key>)" if keys else "off")
    if allowed_origins:
        log.info("CORS: pages from %s may call the API", ", ".join(map(str, allowed_origins)))
    log.info("API server listening on %s (OpenAI API at %s/v1, chat page at %s/)", url, url, url)
    for h in logging.getLogger().handlers:
        h.flush()

    engine.start()
    stats_log = StatsLog(engine.stats, log_stats_interval, log) if log_stats_interval > 0 else None
    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=5,
                            lifespan="off", ssl_keyfile=ssl_keyfile, ssl_certfile=ssl_certfile)
    server = uvicorn.Server(config)
    # uvicorn shuts down gracefully on SIGINT and SIGTERM, then raises the signal again under the handler it found:
    # for SIGTERM the default one killed the process before the engine was stopped (status 143, its core left to
    # notice the parent gone); with this one it ends as Ctrl-C does
    main = threading.current_thread() is threading.main_thread()
    prev = signal.signal(signal.SIGTERM, _raise_terminated) if main else None
    try:
        server.run(sockets=[sock])     # until Ctrl-C / SIGINT or SIGTERM
    except (KeyboardInterrupt, Terminated) as e:
        log.info("API server stopped (%s)", "SIGTERM" if isinstance(e, Terminated) else "Ctrl-C")
    finally:
        if main:
            signal.signal(signal.SIGTERM, prev)
        if stats_log is not None:
            stats_log.stop()
        sock.close()
        engine.stop()
    return {"mode": "api", "url": url, "model": model_name, "quant": quant,
            "kv_capacity_tokens": st["kv_capacity_tokens"]}
