"""serve: the engine over the turbomind workspace (never cached).

    python -m pipeline.runner pipeline=serve                         # serve.mode=generate: answer serve.prompts
    python -m pipeline.runner pipeline=serve serve.mode=chat model=tiny-random   # terminal chat, `exit` leaves
    python -m pipeline.runner pipeline=serve serve.mode=chat serve.workspace=./workspace   # a given folder
    python -m pipeline.runner pipeline=serve serve.mode=api          # OpenAI-compatible HTTP (pipeline/server)

Serving knobs (session_len, max_batch_size, cache_*, max_prefill_tokens, cuda_graphs) are passed to the
engine as overrides; quant_policy comes from the workspace's config.ini (edit it to switch KV int8).
"""
from __future__ import annotations

import time
from pathlib import Path

from ..engine import Engine, SamplingParams

VERSION = 1
READS = ["serve", "model.name"]
CACHED = False
MODES = ("generate", "chat", "api")


def inputs(cfg) -> list[str]:
    return [] if cfg.serve.get("workspace") else ["turbomind"]


def engine_overrides(s) -> dict:
    return {"session_len": s.session_len, "max_batch_size": s.max_batch_size,
            "cache_max_entry_count": s.cache_max_entry_count, "cache_block_seq_len": s.cache_block_size,
            "max_prefill_tokens": s.max_prefill_tokens, "cuda_graphs": s.cuda_graphs,
            "num_blocks": s.get("num_blocks") or None, "tp": s.get("tp", 1), "tp_timeout": s.get("tp_timeout", 120.0)}


def sampling(s, **kw) -> SamplingParams:
    base = dict(max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k,
                repetition_penalty=s.repetition_penalty, seed=s.seed)
    return SamplingParams(**{**base, **kw})


def run(ctx) -> dict:
    s = ctx.cfg.serve
    if s.mode not in MODES:
        raise ValueError(f"serve.mode={s.mode!r} is not one of {list(MODES)}")
    ws = Path(s.workspace) if s.get("workspace") else ctx.inputs["turbomind"] / "workspace"
    engine = Engine.from_workspace(ws, device=str(ctx.device), overrides=engine_overrides(s))
    if s.mode == "api":
        from ..server import serve_api
        return serve_api(ctx, engine)
    engine.start()
    try:
        return generate(engine, s) if s.mode == "generate" else chat(engine, s)
    finally:
        engine.stop()


def generate(engine: Engine, s) -> dict:
    """Answer every prompt of serve.prompts (batched together), print them, return them in the summary."""
    if not s.prompts:
        raise ValueError("serve.mode=generate needs serve.prompts (a list of strings), e.g. "
                         "serve.prompts='[\"What is the capital of France?\"]'")
    t0 = time.time()
    handles = [engine.submit(engine.apply_chat_template([{"role": "user", "content": p}]), sampling(s))
               for p in s.prompts]
    answers, n_tokens = [], 0
    for p, h in zip(s.prompts, handles):
        outs = list(h)
        answers.append("".join(o.text for o in outs))
        n_tokens += sum(len(o.token_ids) for o in outs)
        print(f"\n>>> {p}\n{answers[-1].strip()}", flush=True)
    dt = time.time() - t0
    st = engine.stats()
    return {"mode": "generate", "prompts": len(s.prompts), "new_tokens": n_tokens, "seconds": round(dt, 2),
            "tokens_per_s": round(n_tokens / dt, 1), "weight_type": st["weight_type"],
            "quant_policy": st["quant_policy"], "answers": answers}


def chat(engine: Engine, s, read=input, write=print) -> dict:
    """Terminal chat with the model's chat template and multi-turn history; `exit` (or EOF) leaves.
    Ctrl-C during an answer stops that answer."""
    st = engine.stats()
    write(f"chat with {st['model_name']} (weights {st['weight_type']}, quant_policy {st['quant_policy']}, "
          f"{st['device']}); type 'exit' to leave.", flush=True)
    history: list[dict] = []
    turns = 0
    while True:
        try:
            line = read("\n>>> ")
        except EOFError:
            break
        if line.strip() == "exit":
            break
        if not line.strip():
            continue
        history.append({"role": "user", "content": line})
        ids = engine.apply_chat_template(history)
        while len(ids) + 1 >= engine.session_len and len(history) > 1:   # drop the oldest turns
            history = history[2:] if len(history) > 2 else history[-1:]
            ids = engine.apply_chat_template(history)
        ids = ids[-(engine.session_len - 1):]
        h = engine.submit(ids, sampling(s, max_new_tokens=min(s.max_new_tokens, engine.session_len - len(ids))))
        reply = ""
        try:
            for out in h:
                write(out.text, end="", flush=True)
                reply += out.text
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
