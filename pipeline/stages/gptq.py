"""gptq: GPTQ on the calibration windows, block by block, on the weights the awq stage's scales make (identity
scales for plain GPTQ; AWQ's scales and clips for AWQ + GPTQ). Plain data out; `pack` packs these codes.

Reads quant.{w_bits, group_size, zero_point, gptq_damp, gptq_block, gptq_desc_act, gptq_mse, gptq_feedback};
inputs: load, calibrate (tokens.safetensors: every calibration window), awq (awq.safetensors). Each block sees
the output of the blocks before it already quantized (pipeline/quant/gptq.py: the algorithm and its options).
Artifact: gptq.safetensors (layers.{i}.{linear}.{codes (N, K) uint8, scales (K/g, N) fp16, zeros (K/g, N)
uint8}: pipeline/quant/w4.py's quantizer format), gptq.json (H-weighted loss against round to nearest, per stack).
"""
from __future__ import annotations

import json

import torch
from safetensors.torch import load_file, save_file

from ..methods import require
from ..models.store import read_args
from ..quant import awq, gptq
from ..quant.blockwise import compute_dtype, walk_blocks
from ..quant.w4 import check_group_size

VERSION = 2
READS = ["quant.w_bits", "quant.group_size", "quant.zero_point", "quant.gptq_damp", "quant.gptq_block",
         "quant.gptq_desc_act", "quant.gptq_mse", "quant.gptq_feedback"]
PARTS = ("codes", "scales", "zeros")


def inputs(cfg) -> list[str]:
    require(cfg, "gptq")
    return ["load", "calibrate", "awq"]


def fold_awq(block, i: int, res: dict, args) -> None:
    """Fold layer i's AWQ scales into the block's weights (pipeline/quant/awq.py's apply, on its state dict)."""
    p = f"layers.{i}."
    t = awq.apply({p + k: v for k, v in block.state_dict().items()}, i, res, args)
    block.load_state_dict({k[len(p):]: v for k, v in t.items()})


@torch.no_grad()
def run(ctx) -> dict:
    q = ctx.cfg.quant
    load_dir = ctx.inputs["load"]
    args = read_args(load_dir)
    check_group_size(args, q.group_size, f" ({args.arch}, dim {args.dim}, hidden {args.hidden_dim})")
    res = load_file(str(ctx.inputs["awq"] / "awq.safetensors"))
    ids = load_file(str(ctx.inputs["calibrate"] / "tokens.safetensors"))["tokens"].long()
    dtype = compute_dtype(load_dir, ctx.device)
    out, info = {}, {}
    for step in walk_blocks(load_dir, ids, ctx.device, dtype, ctx.track, "gptq"):
        fold_awq(step.block, step.i, res, args)
        p = f"layers.{step.i}."
        clips = {n: res[f"{p}{n}.clip"].to(ctx.device) for m in gptq.STACKS.values() for n in m}
        r = gptq.quantize_block(step.block, step.x, step.cos, step.sin, step.batch, q, clips)
        step.done = True                                                       # x is the quantized block's output
        for n, parts in r["codes"].items():
            out.update({f"{p}{n}.{k}": v.cpu() for k, v in zip(PARTS, parts)})
        info[step.i] = r["info"]
    save_file(out, str(ctx.out / "gptq.safetensors"))
    (ctx.out / "gptq.json").write_text(json.dumps(info, indent=1))
    gain = [v["loss_rtn"] / max(v["loss"], 1e-30) for b in info.values() for v in b.values()]
    return {"method": "gptq", "w_bits": q.w_bits, "group_size": q.group_size, "samples": int(ids.shape[0]),
            "mean_loss_gain_vs_rtn": round(sum(gain) / max(len(gain), 1), 3)}
