"""AWQ: activation-aware scale search and clip search per decoder block (plain data), and `apply`.

    res = search_block(step, stats, q)       # {"scales": {group: (C,)}, "clips": {linear: (N, G)}, "info": {...}}
    tensors = apply(tensors, i, res_tensors, args)   # fold the scales into a block's canonical tensors

Groups of linears sharing an input, the tensor the 1/s folds into, and the loss the grid search
minimises (measured on a subset of calibration sequences, like AutoAWQ):
    qkv      q, k, v     attn_norm   attention output (o included)
    o        o           v           o output   (GQA: one scale per KV-head channel, shared by the
                                                 query heads of that KV group, so it folds into v)
    gate_up  gate, up    mlp_norm    MLP output (down included)
    down     down        up          down output
Scales: s = absmean^alpha / sqrt(max * min) (absmean per input channel, from calibrate, over all
calibration tokens), alpha on the grid i / n_grid, i = 0..n_grid-1 (alpha 0 = no scaling, so the search
never does worse than round-to-nearest on its loss). W_hat = Q(W * s) / s.
Clip: per linear (q and k excluded, as AutoAWQ does: attention logits are sensitive to clipping) and
per (output row, group), ratios (r_min, r_max) in {1, 0.95, ..., 0.55} shrinking the group's min and
max that minimise that group's output error sum_t (x_t,g . (w_g - Q_r(w_g)))^2 = dw^T H_g dw with the
Gram matrix H_g = X_g^T X_g of the scaled inputs: first one shared ratio (AutoAWQ's search), then
r_min with r_max fixed, then r_max with r_min fixed (coordinate descent, 30 candidates).
quant.search=false gives s = 1; quant.clip=false gives r = 1: round-to-nearest, the same path.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F

from .w4 import fake_quant

GROUPS = {"qkv": ("q", "k", "v"), "o": ("o",), "gate_up": ("gate", "up"), "down": ("down",)}
PREV = {"qkv": "attn_norm", "o": "v", "gate_up": "mlp_norm", "down": "up"}
NO_CLIP = ("q", "k")
CLIP_RATIOS = [1 - i / 20 for i in range(10)]


def awq_scale(absmean: torch.Tensor, alpha: float) -> torch.Tensor:
    s = absmean.float().clamp_min(1e-4).pow(alpha)
    return s / (s.max() * s.min()).sqrt()


def kv_shared(x: torch.Tensor, args) -> torch.Tensor:
    """Average a per-(head, channel) vector (nh*hd,) over the query heads of each KV group."""
    rep = args.n_heads // args.n_kv_heads
    v = x.reshape(args.n_kv_heads, rep, args.head_dim).mean(1, keepdim=True)
    return v.expand(-1, rep, -1).reshape(-1)


@contextmanager
def swapped(block, weights: dict):
    old = {n: getattr(block, n).weight.data for n in weights}
    try:
        for n, w in weights.items():
            getattr(block, n).weight.data = w
        yield
    finally:
        for n, w in old.items():
            getattr(block, n).weight.data = w


def _mse(a, b) -> float:
    return (a.float() - b.float()).pow(2).mean().item()


@torch.no_grad()
def capture(block, x, cos, sin):
    """Inputs of the four groups and the functions whose outputs the search compares."""
    h_attn = block.attn_norm(x)                                                # (S, T, D)
    seen = {}
    hd = block.o.register_forward_pre_hook(lambda m, args: seen.__setitem__("o", args[0]))
    y = block.attention(h_attn, cos, sin)
    hd.remove()
    h_mlp = block.mlp_norm(x + y)
    down_in = F.silu(block.gate(h_mlp)) * block.up(h_mlp)                      # (S, T, F)
    inputs = {"qkv": h_attn, "o": seen["o"], "gate_up": h_mlp, "down": down_in}
    fns = {"qkv": lambda: block.attention(h_attn, cos, sin), "o": lambda: block.o(seen["o"]),
           "gate_up": lambda: block.mlp(h_mlp), "down": lambda: block.down(down_in)}
    return inputs, fns


@torch.no_grad()
def search_scales(block, fns, absmean: dict, q, args) -> tuple[dict, dict]:
    scales, info = {}, {}
    alphas = [i / q.n_grid for i in range(q.n_grid)] if q.search else [0.0]
    for g, members in GROUPS.items():
        am = absmean[g]
        if g == "o" and args.n_heads != args.n_kv_heads:
            am = kv_shared(am, args)
        W = {n: getattr(block, n).weight.data for n in members}
        ref = fns[g]()
        best = (float("inf"), 0.0, None)
        losses = []
        for alpha in alphas:
            s = awq_scale(am, alpha).to(W[members[0]].device)
            Wq = {n: (fake_quant(w.float() * s, q.w_bits, q.group_size, q.zero_point) / s).to(w.dtype)
                  for n, w in W.items()}
            with swapped(block, Wq):
                loss = _mse(fns[g](), ref)
            losses.append(loss)
            if loss < best[0]:
                best = (loss, alpha, s)
        scales[g] = best[2].float().cpu()
        info[g] = {"alpha": best[1], "loss": best[0], "loss_rtn": losses[0]}
    return scales, info


@torch.no_grad()
def search_clips(block, inputs: dict, scales: dict, q) -> dict:
    """Per linear, (N, K/g, 2) clip ratios [r_min, r_max] (ones where clipping is off)."""
    clips = {}
    G = q.group_size
    for g, members in GROUPS.items():
        s = scales[g].to(inputs[g].device)
        X = (inputs[g].reshape(-1, s.numel()).float() / s)                     # (tokens, K)
        Xg = X.reshape(X.shape[0], -1, G)                                      # (tokens, K/g, g)
        H = torch.einsum("tgi,tgj->gij", Xg, Xg)                                # (K/g, g, g)
        for n in members:
            w = getattr(block, n).weight.data.float() * s                      # (N, K)
            N = w.shape[0]
            best_r = torch.ones(N, s.numel() // G, 2, device=w.device)
            if n in NO_CLIP or not q.clip:
                clips[n] = best_r.cpu()
                continue

            def err(r):
                dw = (w - fake_quant(w, q.w_bits, G, q.zero_point, clip=r)).reshape(N, -1, G)  # (N, K/g, g)
                return (torch.einsum("ngi,gij->ngj", dw, H) * dw).sum(-1)          # (N, K/g)
            best_err = err(best_r)
            for which in ((0, 1), (0,), (1,)):                                 # both, then min, then max
                for ratio in CLIP_RATIOS[1:]:
                    cand = best_r.clone()
                    for k in which:
                        cand[..., k] = ratio
                    e = err(cand)
                    better = e < best_err
                    best_err = torch.where(better, e, best_err)
                    best_r = torch.where(better[..., None], cand, best_r)
            clips[n] = best_r.cpu()
    return clips


@torch.no_grad()
def search_block(block, x, cos, sin, absmean: dict, q, args) -> dict:
    """AWQ search for one block with input x (S, T, D); absmean: group -> (C,) from calibrate."""
    inputs, fns = capture(block, x, cos, sin)
    scales, info = search_scales(block, fns, absmean, q, args)
    clips = search_clips(block, inputs, scales, q)
    return {"scales": scales, "clips": clips, "info": info}


def apply(t: dict, i: int, res: dict, args) -> dict:
    """Fold layer i's AWQ scales into its canonical tensors t (a dict, modified and returned).

    res holds `layers.{i}.{group}.scale` (C,). Exact in real arithmetic: every W * s meets x / s.
    """
    p = f"layers.{i}."
    for g, members in GROUPS.items():
        s = res[f"{p}{g}.scale"].to(t[p + "q.weight"].device).float()
        for n in members:
            w = t[p + n + ".weight"]
            t[p + n + ".weight"] = (w.float() * s).to(w.dtype)
        prev = PREV[g]
        if g == "o":
            rep = args.n_heads // args.n_kv_heads
            s = s.reshape(args.n_kv_heads, rep, args.head_dim)[:, 0].reshape(-1)  # (nkv*hd,) v's outputs
        for suffix in (".weight", ".bias"):
            name = p + prev + suffix
            if name in t:
                v = t[name]
                sv = s if v.dim() == 1 else s[:, None]
                t[name] = (v.float() / sv).to(v.dtype)
    return t
