"""serve: the engine over the turbomind workspace (never cached); the stage form of `python -m pipeline.serve`.

    python -m pipeline.runner pipeline=serve                         # serve.mode=generate: answer serve.prompts
    python -m pipeline.runner pipeline=serve serve.mode=chat model=tiny-random   # terminal chat, `exit` leaves
    python -m pipeline.runner pipeline=serve serve.mode=chat serve.workspace=./workspace   # a given folder
    python -m pipeline.runner pipeline=serve serve.mode=api          # OpenAI-compatible HTTP (pipeline/server)

Serving knobs (session_len, max_batch_size, cache_*, max_prefill_tokens, cuda_graphs, prefix_caching, mixed_steps,
schedule) are passed to the engine as overrides; quant_policy comes from the workspace's config.ini (edit it to
switch KV int8). The engine runs in its own process (serve.engine_process=false: a thread of this one); chat and
generate print only the conversation, the engine's log goes to engine_core.log in the run folder.
"""
from __future__ import annotations

from pathlib import Path

from ..engine import SamplingParams
from ..serve import MODES, chat, exit_on_failure, generate, open_engine, quiet_console

VERSION = 1
READS = ["serve", "model.name"]
CACHED = False


def inputs(cfg) -> list[str]:
    return [] if cfg.serve.get("workspace") else ["turbomind"]


def engine_overrides(s) -> dict:
    return {"session_len": s.session_len, "max_batch_size": s.max_batch_size,
            "cache_max_entry_count": s.cache_max_entry_count, "cache_block_seq_len": s.cache_block_size,
            "max_prefill_tokens": s.max_prefill_tokens, "cuda_graphs": s.cuda_graphs,
            "prefix_caching": s.get("prefix_caching", True), "mixed_steps": s.get("mixed_steps", True),
            "schedule": s.get("schedule") or None,
            "num_blocks": s.get("num_blocks") or None, "tp": s.get("tp", 1), "tp_timeout": s.get("tp_timeout", 120.0),
            "speculative_tokens": s.get("speculative_tokens", 0) or None, "speculative_ngram": s.get("speculative_ngram")}


def sampling(s, **kw) -> SamplingParams:
    base = dict(max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k,
                repetition_penalty=s.repetition_penalty, seed=s.seed)
    return SamplingParams(**{**base, **kw})


def run(ctx) -> dict:
    s = ctx.cfg.serve
    if s.mode not in MODES:
        raise ValueError(f"serve.mode={s.mode!r} is not one of {list(MODES)}")
    given = bool(s.get("workspace"))
    ws = Path(s.workspace) if given else ctx.inputs["turbomind"] / "workspace"
    ctx.run_dir.mkdir(parents=True, exist_ok=True)
    log_file = str(ctx.run_dir / "engine_core.log")
    if s.mode != "api":
        quiet_console()
    else:
        from ..server import check_tls
        check_tls(s.api.get("ssl_keyfile"), s.api.get("ssl_certfile"))   # before the engine's start
    engine = open_engine(ws, str(ctx.device), engine_overrides(s), engine_process=s.get("engine_process", True),
                         log_file=log_file, on_failure=exit_on_failure if s.mode == "api" else None)
    try:
        if s.mode == "api":
            from ..server import serve_api
            cfg = ctx.full_cfg if ctx.full_cfg is not None else ctx.cfg
            defaults = {"max_tokens": s.max_new_tokens, "temperature": s.temperature, "top_p": s.top_p,
                        "top_k": s.top_k, "repetition_penalty": s.repetition_penalty}
            return serve_api(engine, host=s.api.host, port=int(s.api.port), keys=list(s.api["keys"] or []),
                             defaults=defaults, workspace=str(ws), quant=None if given else cfg.quant.name,
                             served_model_names=list(s.api.get("served_model_name") or []),
                             allowed_origins=list(s.api.get("allowed_origins") or []),
                             log_stats_interval=float(s.api.get("log_stats_interval", 10.0)),
                             ssl_keyfile=s.api.get("ssl_keyfile"), ssl_certfile=s.api.get("ssl_certfile"))
        if s.mode == "generate":
            return generate(engine, list(s.prompts), sampling(s))
        return chat(engine, sampling(s), system=s.get("system_prompt"))
    finally:
        engine.stop()
