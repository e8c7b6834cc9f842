"""turbomind: offline conversion of a (quantized) checkpoint into a TurboMind-style workspace.

Inputs: load (fp16), plus pack when quant.w_bits=4 (int4 weights re-laid out for the serving kernel, norms
with the AWQ scales folded in), plus kv_qparams when quant.kv_bits with kv_mode=static; for W8A8
(w_bits=8, a_bits=8) quant_w8 instead of pack: int8 weights + per-channel scales (weight_type int8), norms
with the SmoothQuant scales folded in, and the static KV qparams of the smoothed model.
Reads quant and serve.tp only: serving knobs (session_len, max_batch_size, cache_*) are not baked in
(config.ini holds defaults; the serve stage passes its own), so changing them never rebuilds this.
Artifact: workspace/ (layout in pipeline/artifacts/workspace.py).

Also from a folder, without the stage graph:
    python -m pipeline.workspace --hf /models/llama-2-7b-chat --out ./workspace --tp 1   # fp16 HF folder
    python -m pipeline.workspace --hf /models/llama-2-7b-awq --out ./workspace            # AutoAWQ folder
"""
from __future__ import annotations

from ..artifacts.workspace import write_workspace
from ..methods import select
from ..models.store import read_args

VERSION = 2                 # 2: workspace FORMAT 2 (int4 in the kernel layout, format_version in config.ini)
READS = ["quant", "serve.tp", "model.name"]


def inputs(cfg) -> list[str]:
    """Same upstream as evaluate (pipeline/methods). Refuses, before anything runs, weight formats the serving
    engine has no kernel path for."""
    return select(cfg, serving=True).upstream()


def run(ctx) -> dict:
    q, tp = ctx.cfg.quant, ctx.cfg.serve.tp
    load_dir = ctx.inputs["load"]
    args = read_args(load_dir)
    m = select(ctx.cfg, validate=False)
    tensors, linears, weight_type = m.weight.read(ctx.inputs, args, ctx.device)
    kvq = m.kv.read(m.kv_dir(ctx.inputs), args, q)
    dtype = next(t for t in tensors.values() if t.is_floating_point()).dtype
    info = write_workspace(ctx.out / "workspace", args, tensors, load_dir / "tokenizer", tp=tp, linears=linears,
                           weight_type=weight_type, group_size=q.group_size, kv_qparams=kvq, kv_bits=q.kv_bits,
                           kv_mode=q.kv_mode, model_name=str(ctx.cfg.model.name), dtype=dtype, track=ctx.track)
    files = list((ctx.out / "workspace").rglob("*"))
    info["bytes"] = sum(f.stat().st_size for f in files if f.is_file())
    return info
