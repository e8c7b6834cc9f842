"""RMSNorm (optionally fused with the residual add) and SiLU-mul, Triton + PyTorch references.

Usage:
    y = rms_norm(x, weight, eps)                       # x (..., N) fp16/bf16/fp32, weight (N,)
    y, h = rms_norm(x, weight, eps, residual=r)        # h = x + r (x's dtype), y = rms_norm(h): the new residual
    a = silu_mul(gate_up)                              # gate_up (..., 2N): gate = [..., :N], up = [..., N:]
    a = silu_mul(gate, up)                             # gate, up (..., N)

Numerics follow HF's LlamaRMSNorm: the residual sum is rounded to x's dtype (it is the stream the next
layer adds to), the statistics are fp32, the normalised value is rounded to x's dtype and then scaled by
weight: y = weight * (h * rsqrt(mean(h^2) + eps)).to(dtype), returned in x's dtype. silu_mul computes
silu(gate) * up in fp32 and rounds once.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from pipeline.kernels.dispatch import cdiv, next_pow2, use_triton
from pipeline.kernels.pdl import enabled as pdl_enabled, gdc_launch, gdc_wait, launch_kwargs

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _residual_row(X, R, H, row, cols, m, s_x, s_r, s_h, HAS_RES: tl.constexpr):
    """One row of x, or of h = x + r (rounded to x's dtype and stored to H); returned in fp32."""
    h = tl.load(X + row * s_x + cols, mask=m, other=0.0)
    if HAS_RES:
        h = (h.to(tl.float32) + tl.load(R + row * s_r + cols, mask=m, other=0.0).to(tl.float32)).to(X.dtype.element_ty)
        tl.store(H + row * s_h + cols, h, mask=m)
    return h.to(tl.float32)


@triton.jit
def _rmsnorm_row(hf, W, cols, m, n_cols, eps, dtype: tl.constexpr):
    """RMSNorm of an fp32 row with the reference's rounding: normalise, round to `dtype`, times w (fp32)."""
    rstd = 1.0 / tl.sqrt(tl.sum(hf * hf, 0) / n_cols + eps)
    w = tl.load(W + cols, mask=m, other=0.0).to(tl.float32)
    return (hf * rstd).to(dtype).to(tl.float32) * w


@triton.jit
def _rmsnorm_kernel(X, R, W, Y, H, n_cols, eps, s_x, s_r, s_y, s_h, BLOCK: tl.constexpr, HAS_RES: tl.constexpr,
                    PDL: tl.constexpr = False):
    gdc_launch(PDL)
    gdc_wait(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    m = cols < n_cols
    hf = _residual_row(X, R, H, row, cols, m, s_x, s_r, s_h, HAS_RES)
    y = _rmsnorm_row(hf, W, cols, m, n_cols, eps, X.dtype.element_ty)
    tl.store(Y + row * s_y + cols, y.to(Y.dtype.element_ty), mask=m)


@triton.jit
def _silu_mul_kernel(G, U, Y, n_cols, s_g, s_u, s_y, BLOCK: tl.constexpr, PDL: tl.constexpr = False):
    gdc_launch(PDL)
    gdc_wait(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = cols < n_cols
    g = tl.load(G + row * s_g + cols, mask=m, other=0.0).to(tl.float32)
    u = tl.load(U + row * s_u + cols, mask=m, other=0.0).to(tl.float32)
    y = g / (1.0 + tl.exp(-g)) * u
    tl.store(Y + row * s_y + cols, y.to(Y.dtype.element_ty), mask=m)


def _rows(t: torch.Tensor, name: str, n: int) -> torch.Tensor:
    """View (..., n) as (rows, n) with unit column stride (copies only if it must)."""
    if t.shape[-1] != n:
        raise ValueError(f"{name} has last dim {t.shape[-1]}, expected {n}")
    t2 = t if t.dim() == 2 else t.reshape(-1, n)
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _launch_rms_norm(x, weight, eps, residual=None, out=None, residual_out=None):
    if x.dtype not in _DTYPES:
        raise ValueError(f"x dtype {x.dtype} is not one of {_DTYPES}")
    N = x.shape[-1]
    if weight.shape != (N,):
        raise ValueError(f"weight shape {tuple(weight.shape)} != ({N},) (x's last dim)")
    for name, t in (("weight", weight), ("residual", residual), ("out", out), ("residual_out", residual_out)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} is on {t.device}, x on {x.device}")
    for name, t in (("residual", residual), ("out", out), ("residual_out", residual_out)):
        if t is not None and (t.shape != x.shape or t.dtype != x.dtype):
            raise ValueError(f"{name} must match x {tuple(x.shape)} {x.dtype}, got {tuple(t.shape)} {t.dtype}")
    BLOCK = next_pow2(N)
    if BLOCK > 65536:
        raise ValueError(f"hidden size {N} too large for the one-row-per-program kernel (max 65536)")
    x2 = _rows(x, "x", N)
    out = torch.empty_like(x) if out is None else out
    y2 = out if out.dim() == 2 else out.view(-1, N)
    if residual is not None:
        r2 = _rows(residual, "residual", N)
        residual_out = torch.empty_like(x) if residual_out is None else residual_out
        h2 = residual_out if residual_out.dim() == 2 else residual_out.view(-1, N)
    else:
        r2 = h2 = x2
    if x2.shape[0]:
        pdl = pdl_enabled(x.device)
        _rmsnorm_kernel[(x2.shape[0],)](x2, r2, weight, y2, h2, N, eps, x2.stride(0), r2.stride(0), y2.stride(0),
                                h2.stride(0), BLOCK=BLOCK, HAS_RES=residual is not None,
                                PDL=pdl, num_warps=min(16, max(1, BLOCK // 512)), **launch_kwargs(pdl))
    return out if residual is None else (out, residual_out)


def rms_norm_ref(x, weight, eps, residual=None, out=None, residual_out=None):
    """PyTorch reference (HF LlamaRMSNorm numerics, see the module doc)."""
    h = x if residual is None else x + residual
    hf = h.float()
    y = weight.float() * (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype).float()
    y = y.to(x.dtype) if out is None else out.copy_(y)
    if residual is None:
        return y
    return y, (h if residual_out is None else residual_out.copy_(h))


def rms_norm(x, weight, eps, residual=None, out=None, residual_out=None):
    """y = RMSNorm(x [+ residual]) * weight; returns y, or (y, x + residual) when residual is given."""
    fn = _launch_rms_norm if use_triton(x, "rms_norm") else rms_norm_ref
    return fn(x, weight, eps, residual, out, residual_out)


def _split(gate, up):
    if up is None:
        if gate.shape[-1] % 2:
            raise ValueError(f"silu_mul(gate_up): last dim {gate.shape[-1]} must be even ([gate | up])")
        n = gate.shape[-1] // 2
        return gate[..., :n], gate[..., n:]
    if gate.shape != up.shape or gate.dtype != up.dtype or gate.device != up.device:
        raise ValueError(f"gate {tuple(gate.shape)} {gate.dtype} {gate.device} and up {tuple(up.shape)} "
                         f"{up.dtype} {up.device} must match")
    return gate, up


def _launch_silu_mul(gate, up=None, out=None):
    g, u = _split(gate, up)
    if g.dtype not in _DTYPES:
        raise ValueError(f"dtype {g.dtype} is not one of {_DTYPES}")
    N = g.shape[-1]
    out = torch.empty(g.shape, dtype=g.dtype, device=g.device) if out is None else out
    if out.shape != g.shape or out.dtype != g.dtype or out.device != g.device:
        raise ValueError(f"out must be {tuple(g.shape)} {g.dtype}, got {tuple(out.shape)} {out.dtype}")
    g2, u2, y2 = _rows(g, "gate", N), _rows(u, "up", N), (out if out.dim() == 2 else out.view(-1, N))
    BLOCK = min(1024, next_pow2(N))
    if g2.shape[0]:
        pdl = pdl_enabled(g.device)
        _silu_mul_kernel[(g2.shape[0], cdiv(N, BLOCK))](g2, u2, y2, N, g2.stride(0), u2.stride(0),
                                                               y2.stride(0), BLOCK=BLOCK, PDL=pdl, num_warps=4,
                                                               **launch_kwargs(pdl))
    return out


def silu_mul_ref(gate, up=None, out=None):
    g, u = _split(gate, up)
    y = F.silu(g.float()) * u.float()
    return y.to(g.dtype) if out is None else out.copy_(y)


def silu_mul(gate, up=None, out=None):
    """silu(gate) * up; with one argument, gate_up (..., 2N) holds [gate | up] along the last dim."""
    fn = _launch_silu_mul if use_triton(gate, "silu_mul") else silu_mul_ref
    return fn(gate, up, out)
