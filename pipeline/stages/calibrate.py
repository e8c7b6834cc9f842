"""calibrate: calibration text through the reference model, block by block; activation statistics.

Reads `quant.calib` (dataset, path, samples, seqlen, seed); input: load.
Artifact: stats.safetensors (names in pipeline/quant/stats.py), tokens.safetensors (the calibration
windows, (samples, seqlen) int32, reused by awq), calib.json (summary).
One decoder block is on the device at a time; the hidden states of all windows stay there
(samples * seqlen * dim values).
"""
from __future__ import annotations

import json

import torch
from safetensors.torch import save_file

from ..models.store import read_args, read_tokenizer
from ..quant.blockwise import compute_dtype, walk_blocks
from ..quant.calib_data import calib_tokens
from ..quant.stats import block_stats, observe_block

VERSION = 1
READS = ["quant.calib"]


def inputs(cfg) -> list[str]:
    return ["load"]


@torch.no_grad()
def run(ctx) -> dict:
    c = ctx.cfg.quant.calib
    load_dir = ctx.inputs["load"]
    ids = calib_tokens(c, read_tokenizer(load_dir))
    dtype = compute_dtype(load_dir, ctx.device)
    stats = {}
    for step in walk_blocks(load_dir, ids, ctx.device, dtype, ctx.track, "calibrate"):
        lin, kv, handles = observe_block(step.block)
        step.forward()
        for h in handles:
            h.remove()
        stats.update(block_stats(step.i, lin, kv))
    save_file(stats, str(ctx.out / "stats.safetensors"))
    save_file({"tokens": ids.to(torch.int32)}, str(ctx.out / "tokens.safetensors"))
    args = read_args(load_dir)
    res = {"dataset": c.dataset, "samples": ids.shape[0], "seqlen": ids.shape[1], "tokens": ids.numel(),
           "layers": args.n_layers, "dtype": str(dtype).replace("torch.", "")}
    (ctx.out / "calib.json").write_text(json.dumps(res, indent=2))
    return res
