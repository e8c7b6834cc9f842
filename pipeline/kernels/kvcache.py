"""KV-cache quantization math: the single source of truth (PyTorch reference).

Used by the Triton kernels' references (attention.py, rope_kv.py) and by the reference model's
fake-quant in evaluation, so the kernels and the evaluation quantize identically.

Usage:
    scale, zp = kv_qparams_from_stats(kmin, kmax, kabsmax, bits=8, symmetric=False)  # (n_kv_heads,)
    q = kv_quantize_static(k, scale, zp, bits=8)          # k (..., n_kv_heads, head_dim) -> int8
    k_hat = kv_dequantize_static(q, scale, zp, bits=8)    # -> fp32
    q, s, z = kv_quantize_dynamic(k, bits=4)              # per (token, head) scale/zero point
    k_hat = kv_fake_quant(k, "dynamic", 4)                # quantize + dequantize, in k's dtype

Axis convention: x is (..., n_kv_heads, head_dim): the last axis is head_dim (quantized together
per token), the one before is the KV head (static parameters are per head, shape (n_kv_heads,)).

Codes:
  q = clamp(round((x - zp) / scale), -2^(bits-1), 2^(bits-1) - 1), round = half to even.
  bits=8: stored as signed int8, shape (..., head_dim).
  bits=4: stored as q + 8 in a nibble, two per uint8 along head_dim, low nibble = even channel:
          shape (..., head_dim // 2) uint8.
  x_hat = q * scale + zp.

Static parameters (per layer, per KV head, from calibration), fp32 (n_kv_heads,):
  asymmetric: zp = (min + max) / 2, scale = (max - min) / (2^bits - 1)
  symmetric:  zp = 0,               scale = absmax / (2^(bits-1) - 1)
Dynamic (no calibration): per token and KV head, asymmetric with the same formulas over the
head_dim values of that token; scale and zp are fp32 of shape (..., n_kv_heads). In the paged
cache they live in side tensors (num_blocks, n_kv_heads, block_size) fp32. A constant row gets
scale = 1e-8 (its codes are then 0 and x_hat = zp exactly).
"""
from __future__ import annotations

import torch

KV_MODES = ("none", "static", "dynamic")
MIN_SCALE = 1e-8


def qrange(bits: int) -> tuple[int, int]:
    if bits not in (4, 8):
        raise ValueError(f"kv bits={bits!r}: quantized KV supports 4 or 8 bits")
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Signed codes in [-8, 7], (..., D) -> uint8 (..., D // 2), low nibble = even channel, stored q + 8."""
    if q.shape[-1] % 2:
        raise ValueError(f"pack_int4 needs an even last dim, got shape {tuple(q.shape)}")
    u = (q.to(torch.int16) + 8).to(torch.uint8)
    return u[..., 0::2] | (u[..., 1::2] << 4)


def unpack_int4(p: torch.Tensor) -> torch.Tensor:
    """uint8 (..., D // 2) -> signed codes int8 (..., D)."""
    if p.dtype != torch.uint8:
        raise TypeError(f"unpack_int4 expects uint8, got {p.dtype}")
    lo = (p & 0xF).to(torch.int8) - 8
    hi = (p >> 4).to(torch.int8) - 8
    return torch.stack([lo, hi], dim=-1).flatten(-2)


def _codes(x: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor, bits: int) -> torch.Tensor:
    lo, hi = qrange(bits)
    q = torch.round((x.float() - zp) / scale).clamp_(lo, hi).to(torch.int8)
    return pack_int4(q) if bits == 4 else q


def _values(q: torch.Tensor, bits: int) -> torch.Tensor:
    qrange(bits)
    return (unpack_int4(q) if bits == 4 else q).float()


def kv_qparams_from_stats(xmin, xmax, absmax, bits: int, symmetric: bool):
    """Static (scale, zp), fp32 (n_kv_heads,), from per-head calibration statistics."""
    lo, hi = qrange(bits)
    if symmetric:
        scale = absmax.float() / hi
        zp = torch.zeros_like(scale)
    else:
        scale = (xmax.float() - xmin.float()) / (hi - lo)
        zp = (xmin.float() + xmax.float()) / 2
    return scale.clamp_min(MIN_SCALE), zp


def kv_quantize_static(x: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor, bits: int) -> torch.Tensor:
    """x (..., n_kv_heads, head_dim); scale, zp (n_kv_heads,) -> codes (see module doc)."""
    if scale.shape != (x.shape[-2],) or zp.shape != (x.shape[-2],):
        raise ValueError(f"static scale/zp must be (n_kv_heads,)=({x.shape[-2]},), "
                         f"got {tuple(scale.shape)} / {tuple(zp.shape)}")
    return _codes(x, scale.float()[:, None], zp.float()[:, None], bits)


def kv_dequantize_static(q: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes (..., n_kv_heads, head_dim[/2]) -> fp32 (..., n_kv_heads, head_dim)."""
    return _values(q, bits) * scale.float()[:, None] + zp.float()[:, None]


def kv_dynamic_params(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per (token, head) asymmetric scale and zp, fp32 (..., n_kv_heads), over head_dim."""
    lo, hi = qrange(bits)
    xf = x.float()
    xmin, xmax = xf.amin(-1), xf.amax(-1)
    return ((xmax - xmin) / (hi - lo)).clamp_min(MIN_SCALE), (xmin + xmax) / 2


def kv_quantize_dynamic(x: torch.Tensor, bits: int):
    """x (..., n_kv_heads, head_dim) -> (codes, scale, zp); scale, zp fp32 (..., n_kv_heads)."""
    scale, zp = kv_dynamic_params(x, bits)
    return _codes(x, scale[..., None], zp[..., None], bits), scale, zp


def kv_dequantize_dynamic(q: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes (..., head_dim[/2]) with scale, zp (...) -> fp32 (..., head_dim)."""
    return _values(q, bits) * scale.float()[..., None] + zp.float()[..., None]


def kv_fake_quant(x: torch.Tensor, mode: str, bits: int, scale=None, zp=None) -> torch.Tensor:
    """Quantize then dequantize x (..., n_kv_heads, head_dim); returns x's dtype.

    mode "none" (or bits 16) returns x unchanged; "static" needs scale, zp (n_kv_heads,);
    "dynamic" computes per (token, head) parameters.
    """
    if mode == "none" or bits == 16:
        return x
    if mode == "static":
        if scale is None or zp is None:
            raise ValueError("kv_fake_quant(mode='static') needs scale and zp of shape (n_kv_heads,)")
        return kv_dequantize_static(kv_quantize_static(x, scale, zp, bits), scale, zp, bits).to(x.dtype)
    if mode == "dynamic":
        q, s, z = kv_quantize_dynamic(x, bits)
        return kv_dequantize_dynamic(q, s, z, bits).to(x.dtype)
    raise ValueError(f"kv mode={mode!r} is not one of {KV_MODES}")


def check_kv_config(mode: str, bits: int) -> None:
    if mode not in KV_MODES:
        raise ValueError(f"kv_mode={mode!r} is not one of {KV_MODES}")
    if mode == "none" and bits != 16:
        raise ValueError(f"kv_mode='none' stores fp16/bf16: kv_bits must be 16, got {bits!r}")
    if mode != "none":
        qrange(bits)
