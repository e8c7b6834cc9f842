"""awq: per-block AWQ scale and clip search (plain data; `pack` applies it).

Reads quant.{w_bits, group_size, zero_point, search, n_grid, clip, search_samples}; inputs: load and
calibrate (absmean per input channel over all calibration tokens; the first search_samples windows
are run block by block for the search losses). quant.search=false and quant.clip=false is
round-to-nearest: no calibration needed, identity scales and clips, the same files.
Artifact: awq.safetensors (layers.{i}.{qkv|o|gate_up|down}.scale (C,) fp32,
layers.{i}.{q|k|v|o|gate|up|down}.clip (N, K/g, 2) fp32 ratios for the group's min and max), awq.json (alpha and losses per group).
"""
from __future__ import annotations

import json

import torch
from safetensors.torch import load_file, save_file

from ..methods import require
from ..models.store import read_args
from ..quant import awq
from ..quant.blockwise import compute_dtype
from ..quant.w4 import check_group_size, linear_inputs

VERSION = 2
READS = ["quant.w_bits", "quant.group_size", "quant.zero_point", "quant.search", "quant.n_grid", "quant.clip",
         "quant.search_samples"]


def needs_calibration(q) -> bool:
    return bool(q.search or q.clip)


def inputs(cfg) -> list[str]:
    """load, plus calibrate when it searches (awq, awq_gptq; not rtn or gptq): pipeline/methods."""
    require(cfg, "awq")
    return ["load", "calibrate"] if needs_calibration(cfg.quant) else ["load"]


def identity(args, q) -> dict:
    out = {}
    K = linear_inputs(args)
    N = {"q": args.n_heads * args.head_dim, "k": args.n_kv_heads * args.head_dim,
         "v": args.n_kv_heads * args.head_dim, "o": args.dim, "gate": args.hidden_dim, "up": args.hidden_dim,
         "down": args.dim}
    for i in range(args.n_layers):
        for g, members in awq.GROUPS.items():
            out[f"layers.{i}.{g}.scale"] = torch.ones(K[members[0]])
        for n in K:
            out[f"layers.{i}.{n}.clip"] = torch.ones(N[n], K[n] // q.group_size, 2)
    return out


def run(ctx) -> dict:
    q = ctx.cfg.quant
    load_dir = ctx.inputs["load"]
    args = read_args(load_dir)
    check_group_size(args, q.group_size, f" ({args.arch}, dim {args.dim}, hidden {args.hidden_dim})")
    res = identity(args, q)
    info = {}
    if needs_calibration(q):
        from ..quant.blockwise import walk_blocks
        cal = ctx.inputs["calibrate"]
        stats = load_file(str(cal / "stats.safetensors"))
        ids = load_file(str(cal / "tokens.safetensors"))["tokens"].long()[: q.search_samples]
        dtype = compute_dtype(load_dir, ctx.device)
        for step in walk_blocks(load_dir, ids, ctx.device, dtype, ctx.track, "awq search"):
            absmean = {g: stats[f"layers.{step.i}.{g}.absmean"].to(ctx.device) for g in awq.GROUPS}
            r = awq.search_block(step.block, step.x, step.cos, step.sin, absmean, q, args)
            for g, s in r["scales"].items():
                res[f"layers.{step.i}.{g}.scale"] = s.contiguous()
            for n, c in r["clips"].items():
                res[f"layers.{step.i}.{n}.clip"] = c.contiguous()
            info[step.i] = r["info"]
    save_file(res, str(ctx.out / "awq.safetensors"))
    (ctx.out / "awq.json").write_text(json.dumps(info, indent=1))
    gain = [v["loss_rtn"] / max(v["loss"], 1e-30) for b in info.values() for v in b.values()]
    clipped = sum((v < 1).any(-1).sum().item() for k, v in res.items() if k.endswith(".clip"))
    return {"method": "awq" if q.search else ("rtn+clip" if q.clip else "rtn"), "w_bits": q.w_bits,
            "group_size": q.group_size, "mean_alpha": round(sum(v["alpha"] for b in info.values() for v in b.values())
                                                            / max(len(gain), 1), 3),
            "mean_loss_gain_vs_rtn": round(sum(gain) / max(len(gain), 1), 3), "clipped_groups": clipped}
