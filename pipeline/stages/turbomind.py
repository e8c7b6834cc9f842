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

from ..artifacts.kv_qparams import read_static
from ..artifacts.packed_w4 import read_dense, read_unpacked
from ..artifacts.w8a8 import read_quant_w8
from ..artifacts.workspace import write_workspace
from ..methods import upstream
from ..models.store import read_args, read_tensors
from ..quant.blockwise import LINEARS

VERSION = 1
READS = ["quant", "serve.tp", "model.name"]


SERVED = {(None, None): "16-bit", (4, None): "W4A16", (8, 8): "W8A8"}   # (w_bits, a_bits) -> weight path


def check_served(q) -> None:
    if (q.w_bits, q.a_bits) not in SERVED:
        raise ValueError(f"quant={q.name} (w_bits={q.w_bits}, a_bits={q.a_bits}): the serving engine runs 16-bit "
                         "weights (w_bits null), W4A16 (w_bits=4) or W8A8 (w_bits=8, a_bits=8); other formats are "
                         "evaluated, not served: run this one with pipeline=evaluate for its perplexity, or serve "
                         "quant=w4a16_kv8 or quant=w8a8")


def inputs(cfg) -> list[str]:
    """Same upstream as evaluate: load, pack (w_bits=4) or quant_w8 (W8A8), kv_qparams (static KV).
    Refuses, before anything runs, weight formats the serving engine has no kernel path for."""
    check_served(cfg.quant)
    return upstream(cfg)


def run(ctx) -> dict:
    q, tp = ctx.cfg.quant, ctx.cfg.serve.tp
    load_dir = ctx.inputs["load"]
    args = read_args(load_dir)
    w4 = w8 = None
    check_served(q)
    if q.a_bits:
        tensors, w8 = read_quant_w8(ctx.inputs["quant_w8"], load_dir, args)
    elif q.w_bits:
        pdir = ctx.inputs["pack"]
        tensors = read_dense(pdir)
        w4 = {f"layers.{i}.{n}": read_unpacked(pdir, f"layers.{i}.{n}", ctx.device)
              for i in range(args.n_layers) for n in LINEARS}
    else:
        tensors = read_tensors(load_dir)
    kvq = None
    if q.kv_bits:
        if q.kv_mode == "static":   # W8A8: the qparams of the smoothed model, written by quant_w8
            kvq = read_static(ctx.inputs["quant_w8" if q.a_bits else "kv_qparams"], args.n_layers, q.kv_bits, q.kv_sym)
    dtype = next(t for t in tensors.values() if t.is_floating_point()).dtype
    info = write_workspace(ctx.out / "workspace", args, tensors, load_dir / "tokenizer", tp=tp, w4=w4, w8=w8,
                           group_size=q.group_size, kv_qparams=kvq, kv_bits=q.kv_bits, kv_mode=q.kv_mode,
                           model_name=str(ctx.cfg.model.name), dtype=dtype, track=ctx.track)
    files = list((ctx.out / "workspace").rglob("*"))
    info["bytes"] = sum(f.stat().st_size for f in files if f.is_file())
    return info
