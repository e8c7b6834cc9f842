"""smooth: SmoothQuant migration scales from the calibrate statistics (plain data; applying is quant_w8's job).

Reads quant.{smooth_alpha, smooth_search, smooth_grid, search_samples}; inputs: load (weights, shape),
calibrate (per input channel absmax; its first search_samples windows for the search).
For each group of linears sharing an input (the same groups and fold targets as AWQ):
    qkv      q, k, v     folded into attn_norm
    o        o           folded into v   (GQA: one scale per KV-head channel, shared by its query heads)
    gate_up  gate, up    folded into mlp_norm
    down     down        folded into up
    s_j = max|X_j|^alpha / max|W_j|^(1-alpha)      (X_j: input channel j over the calibration tokens,
                                                     W_j: column j of every member linear)
    X / s meets W * s, so the product is unchanged in real arithmetic; int8 per-token activations then
    see channel ranges flattened by s. alpha = 0 means no smoothing (s = 1): the W8A8 baseline.
alpha is quant.smooth_alpha everywhere, or with quant.smooth_search=true the alpha of quant.smooth_grid
that minimises each group's W8A8 output error against full precision, per layer, run block by block
on search_samples calibration windows (pipeline/quant/smooth.py, the way AWQ searches its scales).
Artifact: smooth.safetensors with `layers.{i}.{group}.scale` (C,) fp32, the names `pipeline.quant.awq.apply`
folds; smooth.json (summary: per-group outlier ratio max/median of the channel absmax, before and after;
with the search, the chosen alpha and the losses per layer and group).
"""
from __future__ import annotations

import json

import torch
from safetensors.torch import load_file, save_file

from ..methods import require
from ..models.store import read_args, read_tensors
from ..quant.awq import GROUPS
from ..quant.blockwise import compute_dtype, walk_blocks
from ..quant.smooth import check_grid, group_ranges, layer_scales, search_block

VERSION = 2
READS = ["quant.smooth_alpha", "quant.smooth_search", "quant.smooth_grid", "quant.search_samples"]


def inputs(cfg) -> list[str]:
    require(cfg, "smooth")          # a method that smooths (smoothquant), its config checked
    return ["load", "calibrate"]


def outlier_ratio(absmax: torch.Tensor) -> float:
    """max / median of per-channel absmax: how far the worst channel sits above a typical one."""
    a = absmax.float().clamp_min(1e-5)
    return float(a.max() / a.median())


def fixed(ctx, stats, args, alpha) -> tuple[dict, dict]:
    out = {}
    for i in ctx.track(range(args.n_layers), total=args.n_layers, description="smooth"):
        p = f"layers.{i}."
        w = read_tensors(ctx.inputs["load"], [f"{p}{n}.weight" for ms in GROUPS.values() for n in ms])
        out.update({f"{p}{g}.scale": s.contiguous() for g, s in layer_scales(stats, w, i, args, alpha).items()})
    return out, {}


def searched(ctx, stats, args, q) -> tuple[dict, dict]:
    """Per layer and group, the grid alpha with the least W8A8 output error (block by block)."""
    grid, alpha = check_grid(q.smooth_grid), float(q.smooth_alpha)
    load_dir = ctx.inputs["load"]
    ids = load_file(str(ctx.inputs["calibrate"] / "tokens.safetensors"))["tokens"].long()[: q.search_samples]
    out, info = {}, {}
    for step in walk_blocks(load_dir, ids, ctx.device, compute_dtype(load_dir, ctx.device), ctx.track, "smooth search"):
        p = f"layers.{step.i}."
        w = {p + k: v for k, v in step.block.state_dict().items()}
        r = search_block(step.block, step.x, step.cos, step.sin, group_ranges(stats, w, step.i, args), args, grid, alpha)
        out.update({f"{p}{g}.scale": s.contiguous() for g, s in r["scales"].items()})
        info[step.i] = r["info"]
    return out, info


@torch.no_grad()
def run(ctx) -> dict:
    q = ctx.cfg.quant
    args = read_args(ctx.inputs["load"])
    stats = load_file(str(ctx.inputs["calibrate"] / "stats.safetensors"))
    out, info = searched(ctx, stats, args, q) if q.smooth_search else fixed(ctx, stats, args, float(q.smooth_alpha))
    save_file(out, str(ctx.out / "smooth.safetensors"))
    ratio = {}
    for g in GROUPS:
        xmax = [stats[f"layers.{i}.{g}.absmax"].float() for i in range(args.n_layers)]
        sc = [out[f"layers.{i}.{g}.scale"] for i in range(args.n_layers)]
        ratio[g] = {"before": round(max(map(outlier_ratio, xmax)), 2),
                    "after": round(max(outlier_ratio(x / s) for x, s in zip(xmax, sc)), 2)}
    res = {"alpha": float(q.smooth_alpha), "search": bool(q.smooth_search), "layers": args.n_layers,
           "activation_outlier_ratio": ratio}
    if info:
        gain = {g: [b[g]["loss_fixed"] / max(b[g]["loss"], 1e-30) for b in info.values()] for g in GROUPS}
        res |= {"grid": check_grid(q.smooth_grid), "search_samples": q.search_samples,
                "alphas": {g: [b[g]["alpha"] for b in info.values()] for g in GROUPS},       # per layer
                "mean_loss_gain_vs_fixed": {g: round(sum(v) / len(v), 3) for g, v in gain.items()}}
    (ctx.out / "smooth.json").write_text(json.dumps(res | ({"per_layer": info} if info else {}), indent=1))
    return res
