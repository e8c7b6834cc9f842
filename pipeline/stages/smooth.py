"""smooth: SmoothQuant migration scales from the calibrate statistics (plain data; applying is quant_w8's job).

Reads `quant.smooth_alpha`; inputs: load (weights, shape), calibrate (per input channel absmax).
For each group of linears sharing an input (the same groups and fold targets as AWQ):
    qkv      q, k, v     folded into attn_norm
    o        o           folded into v   (GQA: one scale per KV-head channel, shared by its query heads)
    gate_up  gate, up    folded into mlp_norm
    down     down        folded into up
    s_j = max|X_j|^alpha / max|W_j|^(1-alpha)      (X_j: input channel j over the calibration tokens,
                                                     W_j: column j of every member linear)
    X / s meets W * s, so the product is unchanged in real arithmetic; int8 per-token activations then
    see channel ranges flattened by s. alpha = 0 means no smoothing (s = 1): the W8A8 baseline.
Artifact: smooth.safetensors with `layers.{i}.{group}.scale` (C,) fp32, the names `pipeline.quant.awq.apply`
folds; smooth.json (summary: per-group outlier ratio max/median of the channel absmax, before and after).
"""
from __future__ import annotations

import json

import torch
from safetensors.torch import load_file, save_file

from ..models.store import read_args, read_tensors
from ..quant.awq import GROUPS

VERSION = 1
READS = ["quant.smooth_alpha"]
EPS = 1e-5


def inputs(cfg) -> list[str]:
    return ["load", "calibrate"]


def smooth_scale(x_absmax: torch.Tensor, w_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """s = max|X|^alpha / max|W|^(1-alpha) per input channel; alpha 0: ones (no smoothing)."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"quant.smooth_alpha={alpha} must be in [0, 1]")
    if alpha == 0:
        return torch.ones_like(x_absmax, dtype=torch.float32)
    x, w = x_absmax.float().clamp_min(EPS), w_absmax.float().clamp_min(EPS)
    return (x.pow(alpha) / w.pow(1 - alpha)).clamp_min(EPS)


def group_shared(v: torch.Tensor, args) -> torch.Tensor:
    """Max of a per-(query head, channel) vector (nh*hd,) over the query heads of each KV group, expanded
    back: o's input channels that one v output channel feeds must share its scale."""
    rep = args.n_heads // args.n_kv_heads
    m = v.reshape(args.n_kv_heads, rep, args.head_dim).amax(1, keepdim=True)
    return m.expand(-1, rep, -1).reshape(-1)


def layer_scales(stats: dict, w: dict, i: int, args, alpha: float) -> dict[str, torch.Tensor]:
    """{group: s (C,)} for layer i. stats: calibrate's tensors; w: canonical weights of layer i."""
    p = f"layers.{i}."
    out = {}
    for g, members in GROUPS.items():
        xmax = stats[f"{p}{g}.absmax"].float()
        wmax = torch.stack([w[f"{p}{n}.weight"].float().abs().amax(0) for n in members]).amax(0)  # (C,)
        if g == "o":
            xmax, wmax = group_shared(xmax, args), group_shared(wmax, args)
        out[g] = smooth_scale(xmax, wmax, alpha)
    return out


def outlier_ratio(absmax: torch.Tensor) -> float:
    """max / median of per-channel absmax: how far the worst channel sits above a typical one."""
    a = absmax.float().clamp_min(EPS)
    return float(a.max() / a.median())


@torch.no_grad()
def run(ctx) -> dict:
    alpha = float(ctx.cfg.quant.smooth_alpha)
    load_dir = ctx.inputs["load"]
    args = read_args(load_dir)
    stats = load_file(str(ctx.inputs["calibrate"] / "stats.safetensors"))
    out, before, after = {}, {g: [] for g in GROUPS}, {g: [] for g in GROUPS}
    for i in ctx.track(range(args.n_layers), total=args.n_layers, description="smooth"):
        p = f"layers.{i}."
        w = read_tensors(load_dir, [f"{p}{n}.weight" for ms in GROUPS.values() for n in ms])
        for g, s in layer_scales(stats, w, i, args, alpha).items():
            out[f"{p}{g}.scale"] = s.contiguous()
            before[g].append(outlier_ratio(stats[f"{p}{g}.absmax"]))
            after[g].append(outlier_ratio(stats[f"{p}{g}.absmax"].float() / s))
    save_file(out, str(ctx.out / "smooth.safetensors"))
    res = {"alpha": alpha, "layers": args.n_layers,
           "activation_outlier_ratio": {g: {"before": round(max(before[g]), 2), "after": round(max(after[g]), 2)}
                                        for g in GROUPS}}
    (ctx.out / "smooth.json").write_text(json.dumps(res, indent=2))
    return res
