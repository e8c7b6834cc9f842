"""Serve a workspace: no graph, no config files (as `lmdeploy serve api_server ./workspace` does).

    python -m pipeline.serve WORKSPACE                                   # OpenAI API on http://127.0.0.1:23333
    python -m pipeline.serve WORKSPACE --mode api --host 0.0.0.0 --port 8000 --api-key sk-1 --max-batch-size 64
    python -m pipeline.serve WORKSPACE --mode chat                       # terminal chat, `exit` leaves
    python -m pipeline.serve WORKSPACE --mode generate --prompt "What is 2+2?" --prompt "Name a color"
    python -m pipeline.serve WORKSPACE --tp 2 --session-len 8192 --quant-policy 4 --no-prefix-caching

WORKSPACE is the `workspace/` folder the turbomind stage writes (or `python -m pipeline.workspace` builds).
The engine runs in a process of its own (pipeline/engine/core.py) and this process serves HTTP, tokenizes
and detokenizes; `--in-process` runs the engine as a thread here instead. Chat and generate print only the
conversation: logs go to --log-file (default: serve.log beside the workspace folder, else the temp folder).
The serve stage (`python -m pipeline.runner pipeline=serve ...`) calls the same functions.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

from .engine import Engine, SamplingParams

log = logging.getLogger("pipeline.serve")
MODES = ("api", "chat", "generate")
# the engine settings this entry point exposes: flag -> (Engine override, type, help)
ENGINE_FLAGS = {
    "session_len": (int, "tokens per sequence, prompt + output (default: the workspace's config.ini)"),
    "max_batch_size": (int, "sequences running at once (default: config.ini)"),
    "cache_max_entry_count": (float, "fraction of free GPU memory for the KV cache (default: config.ini)"),
    "cache_block_seq_len": (int, "tokens per KV block (default: config.ini)"),
    "max_prefill_tokens": (int, "prompt tokens per prefill step (default 2048)"),
    "num_blocks": (int, "KV blocks (default: sized from cache_max_entry_count)"),
    "quant_policy": (int, "KV cache: 0 16-bit, 4 int8, 8 int4 (default: config.ini)"),
    "tp": (int, "tensor-parallel ranks, one process per GPU (the workspace must be built for it)"),
    "speculative_tokens": (int, "prompt-lookup speculative decoding: draft tokens a decode step checks for each "
                                "greedy request, copied from its own earlier tokens (default 0: off)"),
    "speculative_ngram": (int, "speculative decoding: the longest n-gram matched (default 3)"),
}


def check_workspace(workspace) -> Path:
    ws = Path(workspace)
    if not (ws / "triton_models").is_dir():
        raise FileNotFoundError(f"{ws} is not a workspace (no triton_models/ in it): give the folder the turbomind "
                                "stage or `python -m pipeline.workspace --out` wrote")
    return ws


def open_engine(workspace, device: str = "auto", overrides: Optional[dict] = None, engine_process: bool = True,
                log_file: Optional[str] = None, log_level: str = "INFO", on_failure=None, hang_timeout: float = 120.0):
    """The engine over `workspace`: in a process of its own (EngineClient) or in this one (Engine, started)."""
    ws = check_workspace(workspace)
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    if engine_process:
        from .engine.client import EngineClient
        return EngineClient(ws, device=device, overrides=overrides, log_file=log_file, log_level=log_level,
                            on_failure=on_failure, hang_timeout=hang_timeout)
    return Engine.from_workspace(ws, device=device, overrides=overrides).start()


def generate(engine, prompts: list[str], params: SamplingParams, write=print) -> dict:
    """Answer every prompt (batched together), print them, return them in a summary."""
    if not prompts:
        raise ValueError("generate mode needs prompts (serve.prompts in the config, --prompt on the command line)")
    t0 = time.time()
    handles = [engine.submit(engine.apply_chat_template([{"role": "user", "content": p}]), params) for p in prompts]
    answers, n_tokens = [], 0
    for p, h in zip(prompts, handles):
        outs = list(h)
        if outs and outs[-1].finish_reason == "error":
            raise RuntimeError(f"generation failed: {outs[-1].error}")
        answers.append("".join(o.text for o in outs))
        n_tokens += sum(len(o.token_ids) for o in outs)
        write(f"\n>>> {p}\n{answers[-1].strip()}", flush=True)
    dt = time.time() - t0
    st = engine.stats()
    return {"mode": "generate", "prompts": len(prompts), "new_tokens": n_tokens, "seconds": round(dt, 2),
            "tokens_per_s": round(n_tokens / dt, 1), "weight_type": st["weight_type"],
            "quant_policy": st["quant_policy"], "answers": answers}


def chat(engine, params: SamplingParams, read=input, write=print, system: Optional[str] = None) -> dict:
    """Terminal chat with the model's chat template and multi-turn history (after `system`, a system prompt, if
    given); `exit` or `quit` (or EOF, or Ctrl-C at the prompt) leaves, `reset` starts a new conversation.
    Ctrl-C during an answer stops that answer."""
    st = engine.stats()
    write(f"chat with {st['model_name']} (weights {st['weight_type']}, quant_policy {st['quant_policy']}, "
          f"{st['device']}); type 'exit' to leave, 'reset' to start over.", flush=True)
    head = [{"role": "system", "content": system}] if system else []
    history: list[dict] = []
    turns, session_len = 0, engine.session_len
    while True:
        try:
            line = read("\n>>> ")
        except (EOFError, KeyboardInterrupt):
            write("")
            break
        if line.strip() in ("exit", "quit"):
            break
        if line.strip() == "reset":
            history = []
            write("[a new conversation]", flush=True)
            continue
        if not line.strip():
            continue
        history.append({"role": "user", "content": line})
        ids = engine.apply_chat_template(head + history)
        while len(ids) + 1 >= session_len and len(history) > 1:   # drop the oldest turns (never the system prompt)
            history = history[2:] if len(history) > 2 else history[-1:]
            ids = engine.apply_chat_template(head + history)
        ids = ids[-(session_len - 1):]
        p = SamplingParams(**{**params.__dict__, "max_new_tokens": min(params.max_new_tokens, session_len - len(ids))})
        h = engine.submit(ids, p)
        reply = ""
        try:
            for out in h:
                write(out.text, end="", flush=True)
                reply += out.text
                if out.finish_reason == "error":
                    write(f"\n[error: {out.error}]", end="")
        except KeyboardInterrupt:
            h.cancel()
            for out in h:
                reply += out.text
            write(" [stopped]", end="")
        write("", flush=True)
        history.append({"role": "assistant", "content": reply})
        turns += 1
    write("bye", flush=True)
    return {"mode": "chat", "turns": turns}


def quiet_console() -> None:
    """Chat and generate print only the conversation: console log handlers show warnings and errors only
    (file handlers keep everything)."""
    for h in logging.getLogger().handlers:
        if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler):
            h.setLevel(max(h.level, logging.WARNING))


def default_log_file(workspace: Path) -> str:
    parent = workspace.resolve().parent
    return str(parent / "serve.log") if os.access(parent, os.W_OK) else os.path.join(tempfile.gettempdir(),
                                                                                     "llm-pipeline-serve.log")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline.serve", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("workspace", type=Path)
    ap.add_argument("--mode", choices=MODES, default="api")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=23333, help="0: a free port (the log names it)")
    ap.add_argument("--api-key", action="append", default=[],
                    help="accepted bearer key (repeat for several; default: $PIPELINE_API_KEY, comma-separated, which "
                         "keeps keys out of the process list)")
    ap.add_argument("--served-model-name", nargs="+", default=[], metavar="NAME",
                    help="the model's name(s) in the API: requests may use any, responses carry the first (default: "
                         "config.ini's model_name)")
    ap.add_argument("--log-stats-interval", type=float, default=10.0, metavar="SECONDS",
                    help="api mode: a log line of throughput, queue, KV cache usage and prefix-cache hits this often "
                         "while the engine works (0: none)")
    ap.add_argument("--ssl-keyfile", help="api mode: serve HTTPS with this private key (with --ssl-certfile)")
    ap.add_argument("--ssl-certfile", help="api mode: serve HTTPS with this certificate (with --ssl-keyfile)")
    ap.add_argument("--allowed-origins", nargs="+", default=[], metavar="ORIGIN",
                    help="web origins whose pages may call the API (CORS), e.g. http://localhost:3000 or '*' "
                         "(default: none: same-origin only, the chat page included)")
    for name, (typ, help_) in ENGINE_FLAGS.items():
        ap.add_argument("--" + name.replace("_", "-"), type=typ, help=help_)
    ap.add_argument("--no-cuda-graphs", action="store_true", help="eager decode steps")
    ap.add_argument("--no-prefix-caching", action="store_true", help="never reuse KV blocks of shared prompt prefixes")
    ap.add_argument("--no-mixed-steps", action="store_true",
                    help="prefill new prompts in steps of their own (default: decoders ride along as one-token chunks)")
    ap.add_argument("--no-warmup", action="store_true", help="skip compiling, tuning and graph capture at start")
    ap.add_argument("--schedule", choices=["shortest_first", "fcfs"], default=None,
                    help="prefill order of prompts admitted together (default shortest_first: fewest tokens left "
                         "after the cached prefix first; fcfs: arrival order)")
    ap.add_argument("--in-process", action="store_true", help="run the engine as a thread of this process")
    ap.add_argument("--engine-timeout", type=float, default=120.0,
                    help="seconds one engine step may run before the engine process counts as hung")
    ap.add_argument("--prompt", action="append", default=[], help="generate mode: a prompt (repeat for several)")
    ap.add_argument("--system", default=None, help="chat mode: a system prompt ahead of the conversation")
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--temperature", type=float, default=None, help="default: 0 (greedy) for chat/generate, "
                    "1.0 for API requests that leave it out")
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--repetition-penalty", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--log-file", help="chat/generate: where logs go (default: serve.log beside the workspace)")
    a = ap.parse_args(argv)

    overrides = {k: getattr(a, k) for k in ENGINE_FLAGS}
    overrides.update(cuda_graphs=False if a.no_cuda_graphs else None,
                     prefix_caching=False if a.no_prefix_caching else None,
                     mixed_steps=False if a.no_mixed_steps else None, warmup=False if a.no_warmup else None,
                     schedule=a.schedule)
    try:   # before any log file goes beside it, and before the engine's start
        check_workspace(a.workspace)
        from .server import check_tls
        check_tls(a.ssl_keyfile, a.ssl_certfile)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    console = a.mode == "api"
    log_file = a.log_file or (None if console else default_log_file(a.workspace))
    handlers = [logging.StreamHandler(sys.stderr)] if console else []
    if log_file:
        handlers.append(logging.FileHandler(log_file))
    logging.basicConfig(level=logging.INFO, handlers=handlers, force=True,
                        format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    if not console:
        print(f"(logs: {log_file})", file=sys.stderr, flush=True)
    try:
        engine = open_engine(a.workspace, a.device, overrides, engine_process=not a.in_process, log_file=log_file,
                             on_failure=exit_on_failure if a.mode == "api" else None, hang_timeout=a.engine_timeout)
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    sampling = dict(max_new_tokens=a.max_new_tokens, top_p=a.top_p, top_k=a.top_k,
                    repetition_penalty=a.repetition_penalty, seed=a.seed)
    try:
        if a.mode == "api":
            from .server import serve_api
            serve_api(engine, host=a.host, port=a.port, keys=a.api_key, workspace=str(a.workspace),
                      served_model_names=a.served_model_name, allowed_origins=a.allowed_origins,
                      log_stats_interval=a.log_stats_interval, ssl_keyfile=a.ssl_keyfile,
                      ssl_certfile=a.ssl_certfile,
                      defaults={"max_tokens": a.max_new_tokens, "temperature": 1.0 if a.temperature is None else
                                a.temperature, "top_p": a.top_p, "top_k": a.top_k,
                                "repetition_penalty": a.repetition_penalty})
        else:
            params = SamplingParams(temperature=a.temperature or 0.0, **sampling)
            if a.mode == "chat":
                chat(engine, params, system=a.system)
            else:
                generate(engine, a.prompt, params)
    finally:
        engine.stop()
    return 0


def exit_on_failure(reason: str) -> None:
    """The API server's answer to a dead or hung engine (already reported): exit at once with EXIT_CODE."""
    from .engine.client import EXIT_CODE
    sys.stdout.flush()
    os._exit(EXIT_CODE)


if __name__ == "__main__":
    sys.exit(main())
