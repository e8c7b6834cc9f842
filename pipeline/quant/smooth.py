"""SmoothQuant migration scales (plain data) and the per-block alpha search on the W8A8 output error.

    s = smooth_scale(x_absmax, w_absmax, alpha)          # (C,): max|X|^alpha / max|W|^(1-alpha)
    ranges = group_ranges(stats, w, i, args)             # {group: (x_absmax, w_absmax)} of layer i
    scales = layer_scales(stats, w, i, args, alpha)      # {group: s (C,)} at one fixed alpha
    res = search_block(block, x, cos, sin, ranges, args, grid, fixed_alpha)
          # {"scales": {group: s}, "info": {group: {"alpha", "loss", "loss_fixed", "loss_none"}}}

Groups, fold targets and the losses are AWQ's (pipeline/quant/awq.py): qkv -> attention output (o in
full precision), o -> o output, gate_up -> MLP output (down in full precision), down -> down output.
The search tries every alpha of the grid for one group at a time, the group's linears replaced by
`SmoothedW8A8`: exactly what quant_w8 + evaluate compute for that s (int8 per output channel weights
of W * s with fp16 scales, int8 per-token dynamic activations of X / s), and keeps the alpha whose
output is closest (MSE) to the full-precision block's on the search windows. The activation ranges
come from calibrate (all its tokens), as for the fixed alpha, so a searched alpha reproduces that
alpha's scales exactly; alpha 0 is s = 1 (no smoothing).
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from .awq import GROUPS, _mse, capture
from .w8 import W8A8Linear, quantize_w8

EPS = 1e-5


def check_alpha(alpha: float, name: str = "quant.smooth_alpha") -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
        raise ValueError(f"{name}={alpha!r} must be a number in [0, 1] (0: no smoothing, 1: all to the weights)")
    return float(alpha)


def check_grid(grid) -> list[float]:
    """The search grid as floats; an empty grid or a value outside [0, 1] is refused, naming it."""
    grid = list(grid or [])
    if not grid:
        raise ValueError("quant.smooth_grid is empty: give the alphas to try, e.g. [0,0.1,0.2,...,1]")
    for a in grid:
        if isinstance(a, bool) or not isinstance(a, (int, float)) or not 0.0 <= a <= 1.0:
            raise ValueError(f"quant.smooth_grid value {a!r} is not a number in [0, 1] (grid {grid})")
    return [float(a) for a in grid]


def smooth_scale(x_absmax: torch.Tensor, w_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """s = max|X|^alpha / max|W|^(1-alpha) per input channel; alpha 0: ones (no smoothing)."""
    check_alpha(alpha)
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


def group_ranges(stats: dict, w: dict, i: int, args) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{group: (x_absmax (C,), w_absmax (C,))} of layer i. stats: calibrate's; w: canonical weights of layer i."""
    p = f"layers.{i}."
    out = {}
    for g, members in GROUPS.items():
        xmax = stats[f"{p}{g}.absmax"].float()
        wmax = torch.stack([w[f"{p}{n}.weight"].float().abs().amax(0) for n in members]).amax(0)  # (C,)
        if g == "o":
            xmax, wmax = group_shared(xmax, args), group_shared(wmax, args)
        out[g] = (xmax, wmax.to(xmax.device))
    return out


def layer_scales(stats: dict, w: dict, i: int, args, alpha: float) -> dict[str, torch.Tensor]:
    """{group: s (C,)} for layer i at one alpha."""
    return {g: smooth_scale(xm, wm, alpha) for g, (xm, wm) in group_ranges(stats, w, i, args).items()}


class SmoothedW8A8(nn.Module):
    """A linear as the W8A8 model runs it after smoothing by s: W8A8Linear(Q(W * s))(x / s)."""

    def __init__(self, lin: nn.Linear, s: torch.Tensor):
        super().__init__()
        q, ws = quantize_w8(lin.weight.float() * s)                          # (N, K) int8, (N,)
        self.inner = W8A8Linear(q, ws.to(torch.float16), lin.bias)          # fp16 scales, as quant_w8 stores
        self.register_buffer("inv", 1.0 / s)                                 # (K,)

    def forward(self, x):
        return self.inner(x * self.inv.to(x.dtype))


@contextmanager
def replaced(block, modules: dict):
    """Put `modules` (name -> module) into the block for the body, then restore the originals."""
    old = {n: getattr(block, n) for n in modules}
    try:
        for n, m in modules.items():
            setattr(block, n, m)
        yield
    finally:
        for n, m in old.items():
            setattr(block, n, m)


@torch.no_grad()
def group_loss(block, fn, ref, members, s) -> float:
    """MSE of the group's output with its members as SmoothedW8A8 at scales s, against ref."""
    with replaced(block, {n: SmoothedW8A8(getattr(block, n), s) for n in members}):
        return _mse(fn(), ref)


@torch.no_grad()
def search_block(block, x, cos, sin, ranges: dict, args, grid: list[float], fixed_alpha: float) -> dict:
    """Per group, the alpha of `grid` whose W8A8 output is closest to full precision on x (S, T, D).

    ranges: group_ranges() of this layer. info records the chosen alpha and the losses at it, at
    fixed_alpha (the alpha-fixed path's choice) and at alpha 0 (no smoothing)."""
    _, fns = capture(block, x, cos, sin)
    scales, info = {}, {}
    for g, members in GROUPS.items():
        xm, wm = (t.to(x.device) for t in ranges[g])
        ref = fns[g]()
        losses = {a: group_loss(block, fns[g], ref, members, smooth_scale(xm, wm, a))
                  for a in dict.fromkeys([*grid, fixed_alpha, 0.0])}
        best = min(grid, key=lambda a: losses[a])
        scales[g] = smooth_scale(xm, wm, best).cpu()
        info[g] = {"alpha": best, "loss": losses[best], "loss_fixed": losses[fixed_alpha], "loss_none": losses[0.0]}
    return {"scales": scales, "info": info}
