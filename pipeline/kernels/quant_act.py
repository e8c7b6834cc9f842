"""Dynamic per-token int8 activation quantization, alone or fused with RMSNorm (W8A8 inputs).

Usage:
    q, s = quantize_per_token(x)                       # x (..., K) fp16/bf16/fp32 -> q (..., K) int8, s (...) fp32
    q, s = rms_norm_quant(x, weight, eps)              # RMSNorm (norm.py numerics), then per-token quantize
    q, s, h = rms_norm_quant(x, weight, eps, residual=r)   # h = x + r (the new residual stream)

Per token (row): s = max(max|y|, 1e-8) / 127 in fp32, q = round_half_away(y / s) (IEEE division), in
[-127, 127] (symmetric: -128 unused), so y ~= q * s. The fused kernel never writes the fp16 normalised
row: one read of x (and r), one int8 write.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from pipeline.kernels.dispatch import next_pow2, use_triton
from pipeline.kernels.norm import _residual_row, _rmsnorm_row, _rows, rms_norm_ref

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
QMAX = 127.0
MIN_ABSMAX = 1e-8


# ----------------------------------------------------------------------------------------- reference
def quantize_per_token_ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    xf = x.float()
    s = xf.abs().amax(-1).clamp_min(MIN_ABSMAX) / QMAX  # (...)
    v = xf / s.unsqueeze(-1)
    q = (torch.sign(v) * torch.floor(v.abs() + 0.5)).clamp(-QMAX, QMAX).to(torch.int8)
    return q, s


def rms_norm_quant_ref(x, weight, eps, residual=None):
    if residual is None:
        return quantize_per_token_ref(rms_norm_ref(x, weight, eps))
    y, h = rms_norm_ref(x, weight, eps, residual)
    return (*quantize_per_token_ref(y), h)


# ----------------------------------------------------------------------------------------- kernel
@triton.jit
def _rmsnorm_quant_kernel(X, R, W, Q, S, H, n_cols, eps, s_x, s_r, s_q, s_h, BLOCK: tl.constexpr,
            NORM: tl.constexpr, HAS_RES: tl.constexpr):
    # one row per program: [h = x + r] -> [y = rmsnorm(h) * w] -> q = round(y / s), s = max|y| / 127
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    m = cols < n_cols
    hf = _residual_row(X, R, H, row, cols, m, s_x, s_r, s_h, HAS_RES)
    if NORM:
        y = _rmsnorm_row(hf, W, cols, m, n_cols, eps, X.dtype.element_ty).to(X.dtype.element_ty).to(tl.float32)
    else:
        y = hf
    s = tl.maximum(tl.max(tl.abs(y), 0), 1e-8) / 127.0
    v = tl.math.div_rn(y, tl.zeros_like(y) + s)
    q = tl.where(v >= 0, tl.floor(v + 0.5), -tl.floor(-v + 0.5))
    q = tl.minimum(tl.maximum(q, -127.0), 127.0)
    tl.store(Q + row * s_q + cols, q.to(tl.int8), mask=m)
    tl.store(S + row, s)


def _launch(x, weight=None, eps=0.0, residual=None):
    if x.dtype not in _DTYPES:
        raise ValueError(f"x dtype {x.dtype} is not one of {_DTYPES}")
    N = x.shape[-1]
    if weight is not None and tuple(weight.shape) != (N,):
        raise ValueError(f"weight shape {tuple(weight.shape)} != ({N},) (x's last dim)")
    for name, t in (("weight", weight), ("residual", residual)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} is on {t.device}, x on {x.device}")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        raise ValueError(f"residual must match x {tuple(x.shape)} {x.dtype}, got "
                         f"{tuple(residual.shape)} {residual.dtype}")
    BLOCK = next_pow2(N)
    if BLOCK > 65536:
        raise ValueError(f"hidden size {N} too large for the one-row-per-program kernel (max 65536)")
    x2 = _rows(x, "x", N)
    q = torch.empty(x.shape, dtype=torch.int8, device=x.device)
    s = torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device)
    q2 = q.view(-1, N)
    h = torch.empty_like(x) if residual is not None else None
    r2 = _rows(residual, "residual", N) if residual is not None else x2
    h2 = h.view(-1, N) if h is not None else x2
    if x2.shape[0]:
        _rmsnorm_quant_kernel[(x2.shape[0],)](x2, r2, weight if weight is not None else x2, q2, s, h2, N, eps,
                                x2.stride(0), r2.stride(0), q2.stride(0), h2.stride(0), BLOCK=BLOCK,
                                NORM=weight is not None, HAS_RES=residual is not None,
                                num_warps=min(16, max(1, BLOCK // 512)))
    return (q, s) if h is None else (q, s, h)


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (..., K) -> (q (..., K) int8, s (...) fp32) with x ~= q * s[..., None]."""
    if use_triton(x, "quant_act"):
        return _launch(x)
    if x.dtype not in _DTYPES:
        raise ValueError(f"x dtype {x.dtype} is not one of {_DTYPES}")
    return quantize_per_token_ref(x)


def rms_norm_quant(x, weight, eps, residual=None):
    """RMSNorm(x [+ residual]) * weight, quantized per token: (q, s) or (q, s, x + residual)."""
    if use_triton(x, "rms_norm_quant"):
        return _launch(x, weight, eps, residual)
    if weight.shape != (x.shape[-1],):
        raise ValueError(f"weight shape {tuple(weight.shape)} != ({x.shape[-1]},) (x's last dim)")
    return rms_norm_quant_ref(x, weight, eps, residual)
