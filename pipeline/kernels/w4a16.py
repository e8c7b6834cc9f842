"""W4A16 GEMM: fp16/bf16 activations x int4 weights (per-group fp16 scale and zero), dequantized in registers.

Usage:
    from pipeline.kernels.w4a16 import pack_w4, w4a16_linear
    w = pack_w4(q, scales, zeros, group_size=128).to("cuda")   # q (N, K) uint8 0..15
    y = w4a16_linear(x, w, bias)                                # x (..., K) fp16/bf16 -> y (..., N)
    y = w4a16_linear(gate_up, w2, act="silu_mul")               # SwiGLU fused: gate_up (..., 2K)

Quantizer format (input of `pack_w4`, output of `unpack_w4`):
    q (N, K) uint8 in 0..15, scales (K//g, N) fp16, zeros (K//g, N) integer-valued 0..15,
    W[n, k] = (q[n, k] - zeros[k//g, n]) * scales[k//g, n];  y = x @ W.T (+ bias).

Kernel layout (`W4Weight`):
    qweight (K//8, N) int32. K is cut into groups of g; inside group b, with P = g // 8, int32 row
        b*P + p holds, in nibble j (bits 4j..4j+3), the value q[n, b*g + j*P + p].
        So one group is a (P, N) slab whose 8 nibble planes are 8 *contiguous* runs of P inputs:
        unpacking a (P, BLOCK_N) tile gives a (8, P, BLOCK_N) tile that is the (g, BLOCK_N) weight
        tile in natural k order by a plain reshape, and the activation tile stays a contiguous load.
        Rows are contiguous along N: loads are coalesced 16-byte vectors.
    scales (K//g, N) fp16, zeros (K//g, N) fp16 (exact integers), unchanged.

Kernel arithmetic (one K tile = one group, so scale and zero are per-column constants there):
    y[m, n] += s[n] * sum_k x[m, k] * (q[k, n] - z[n])
    The nibble becomes a float without an int->float convert: OR-ing it into the mantissa of
    c = 1024.0 (fp16, bits 0x6400) or c = 128.0 (bf16, bits 0x4300) gives exactly c + q, and
    subtracting c + z gives q - z exactly. The dot runs on tensor cores with fp32 accumulation; per
    weight the ALU work is a shift, a mask-or and one 16-bit subtract; the scale is applied per
    output column after the group's dot.

Configs: `w4a16_configs.py`. Paths (one entry point): M <= 4 -> also the CUDA-core GEMVs (`w4a16_gemv.py`;
with PDL at M = 1 the tuner times only the "wide" one); M <= 16 -> BLOCK_M = 16 tensor-core tiles with split-K over
groups so that enough programs stream the weights (fp32 partial tiles; the last program of each output tile to
arrive, counted by an atomic counter, adds them in a fixed order: one launch, deterministic); from M = 16 up also
the swapped-operand kernel (`w4a16_swap.py`: y^T = W x^T, the dequantized weights as the MMA's register operand,
no shared-memory round trip for them); for large M a Triton dequantize to a (K, N) scratch + cuBLAS; on sm_90
from M = 16 up also the Gluon kernel (`w4a16_gluon.py`: the swapped problem with async register-operand wgmma,
TMA and an mbarrier ring). The tuner keeps whichever it measures fastest per shape.
The tuner (`pipeline/kernels/tuner.py`) times a small, named config set once per (device, dtype, M bucket, N, K, g)
on the first call outside CUDA-graph capture; inside capture it uses the tuned or a default config. Its choices
are saved per GPU and reused by the next process (PIPELINE_TUNE_CACHE=0 turns that off).
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from pipeline.kernels.dispatch import arrival_counters, cdiv, sm_count, use_triton
from pipeline.kernels.norm import silu_mul
from pipeline.kernels.pdl import enabled as pdl_enabled, gdc_launch, gdc_wait, launch_kwargs
from pipeline.kernels.tuner import Tuner, config_version
from pipeline.kernels import w4a16_gluon, w4a16_gluon_gemv, w4a16_gluon_sk, w4a16_streamk
from pipeline.kernels.w4a16_configs import (CONFIGS, DECODE_SET, FMA_SET, INTERPRET_CONFIG, MID_SET,  # noqa: F401
                                          PREFILL_SET, WIDE_SET, candidates, default_config, gluon_candidates,
                                          swap_fields, tuning_set, uses_pairs)
from pipeline.kernels.w4a16_gemv import _gemv_kernel, _gemv_wide_kernel, _group_range, _load_x
from pipeline.kernels.tiles import split_for, tile_offsets
from pipeline.kernels.w4a16_swap import _dot, _nibbles_to_qz, _store_tile, _w4a16_swap_kernel

GROUP_SIZES = (32, 64, 128)


@dataclass
class W4Weight:
    qweight: torch.Tensor  # (K//8, N) int32, group-permuted nibbles (see module docstring)
    scales: torch.Tensor  # (K//g, N) fp16
    zeros: torch.Tensor  # (K//g, N) fp16, integer-valued
    K: int
    N: int
    group_size: int

    def to(self, device) -> "W4Weight":
        return W4Weight(self.qweight.to(device), self.scales.to(device), self.zeros.to(device),
                        self.K, self.N, self.group_size)

    @property
    def device(self) -> torch.device:
        return self.qweight.device


def pack_w4(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int) -> W4Weight:
    """Quantizer tensors -> kernel layout. q (N, K) uint8 0..15; scales, zeros (K//g, N)."""
    if group_size not in GROUP_SIZES:
        raise ValueError(f"group_size={group_size} not supported; valid: {GROUP_SIZES}")
    if q.dim() != 2:
        raise ValueError(f"q must be 2-D (N, K), got shape {tuple(q.shape)}")
    N, K = q.shape
    if K % group_size:
        raise ValueError(f"K={K} (q.shape[1]) is not a multiple of group_size={group_size}")
    G, P = K // group_size, group_size // 8
    for name, t in (("scales", scales), ("zeros", zeros)):
        if tuple(t.shape) != (G, N):
            raise ValueError(f"{name} shape {tuple(t.shape)} != (K//g, N) = {(G, N)}")
    qi = q.to(torch.int32)
    if int(qi.min()) < 0 or int(qi.max()) > 15:
        raise ValueError(f"q values must be in 0..15, got range [{int(qi.min())}, {int(qi.max())}]")
    zf = zeros.to(torch.float32)
    if not torch.equal(zf, zf.round()) or float(zf.min()) < 0 or float(zf.max()) > 15:
        raise ValueError("zeros must be integer-valued in 0..15")
    # (N, K) -> (N, G, 8, P): k = b*g + j*P + p ; nibble j of row (b, p)
    qv = qi.reshape(N, G, 8, P)
    shifts = (torch.arange(8, device=q.device, dtype=torch.int32) * 4).view(1, 1, 8, 1)
    packed = (qv << shifts).sum(dim=2, dtype=torch.int64)  # (N, G, P), < 2**32
    packed = torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)
    qweight = packed.reshape(N, G * P).t().contiguous()  # (K//8, N)
    return W4Weight(qweight, scales.to(torch.float16).contiguous(), zf.to(torch.float16).contiguous(),
                    K, N, group_size)


def unpack_w4(w: W4Weight) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact inverse of pack_w4 -> (q (N, K) uint8, scales (K//g, N) fp16, zeros (K//g, N) fp16)."""
    K, N, g = w.K, w.N, w.group_size
    G, P = K // g, g // 8
    if sys.byteorder == "little":   # byte i of word p holds codes 8-plane j = 2i (low nibble) and 2i + 1 (high)
        b = w.qweight.t().contiguous().view(torch.uint8).reshape(N, G, P, 4)
        q = torch.stack((b & 0xF, b >> 4), dim=-1).reshape(N, G, P, 8).transpose(2, 3).reshape(N, K)
    else:
        packed = w.qweight.t().reshape(N, G, 1, P)   # int32: >> sign-extends, & 0xF keeps the nibble exactly
        shifts = (torch.arange(8, device=packed.device, dtype=torch.int32) * 4).view(1, 1, 8, 1)
        q = ((packed >> shifts) & 0xF).to(torch.uint8).reshape(N, K)
    return q, w.scales.clone(), w.zeros.clone()


def dequantize_w4(w: W4Weight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(N, K) dense weight (q - z) * s, computed in fp32 (exact) and cast once to `dtype`."""
    q, s, z = unpack_w4(w)
    N, K, g = w.N, w.K, w.group_size
    out = q.view(N, K // g, g).float()                                 # (N, G, g): each group's s, z broadcast
    out.sub_(z.float().t().unsqueeze(-1)).mul_(s.float().t().unsqueeze(-1))   # in place: one (N, K) fp32 buffer
    return out.view(N, K).to(dtype)


def w4a16_linear_ref(x: torch.Tensor, w: W4Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """PyTorch reference: dequantize to x's dtype, then matmul (fp32 accumulation where available)."""
    W = dequantize_w4(w, x.dtype)
    return F.linear(x, W, None if bias is None else bias.to(x.dtype))


# ----------------------------------------------------------------------------------------- kernels
@triton.jit
def _planes_f16(q, zc):
    # q (P, BN) int32 of 8 nibbles, zc (P, BN) fp16 = 1024 + zero -> the 8 planes q_j - z, (P, BN) fp16 each.
    # One lop3 ((x & 0x000f000f) | 0x64006400) makes nibbles j and j + 4 into the fp16 pair (1024 + q_j,
    # 1024 + q_j+4) and one sub.f16x2 makes both exact q - z: about 11 instructions per 8 weights instead of
    # a shift, mask, or, convert and subtract per weight. Inline PTX: GPU only (never the interpreter).
    return tl.inline_asm_elementwise(
        asm="""{
        .reg .b32 t, u, z2;
        mov.b32 z2, {$9, $9};
        lop3.b32 t, $8, 0x000f000f, 0x64006400, 0xea;
        sub.f16x2 t, t, z2;
        mov.b32 {$0, $4}, t;
        shr.u32 u, $8, 4;
        lop3.b32 t, u, 0x000f000f, 0x64006400, 0xea;
        sub.f16x2 t, t, z2;
        mov.b32 {$1, $5}, t;
        shr.u32 u, $8, 8;
        lop3.b32 t, u, 0x000f000f, 0x64006400, 0xea;
        sub.f16x2 t, t, z2;
        mov.b32 {$2, $6}, t;
        shr.u32 u, $8, 12;
        lop3.b32 t, u, 0x000f000f, 0x64006400, 0xea;
        sub.f16x2 t, t, z2;
        mov.b32 {$3, $7}, t;
        }""",
        constraints="=h,=h,=h,=h,=h,=h,=h,=h,r,h",
        args=[q, zc], dtype=(tl.float16, tl.float16, tl.float16, tl.float16,
                              tl.float16, tl.float16, tl.float16, tl.float16),
        is_pure=True, pack=1)


@triton.jit
def _load_group(q_ptrs, s_ptr, z_ptr, xs_ptrs, g, N, K, offs_n, mask_n, mask_m, P: tl.constexpr,
                GROUP: tl.constexpr, ACT: tl.constexpr):
    # group g's packed weights (P, BN) int32, scale and zero (BN,) fp32 and its 8 activation slices (BM, P)
    q = tl.load(q_ptrs + g * P * N, mask=mask_n[None, :], other=0)
    sc = tl.load(s_ptr + g * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    z = tl.load(z_ptr + g * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    xm = mask_m[:, None]
    xg = xs_ptrs + g * GROUP
    return (q, sc, z, _load_x(xg, K, xm, ACT), _load_x(xg + P, K, xm, ACT), _load_x(xg + 2 * P, K, xm, ACT),
            _load_x(xg + 3 * P, K, xm, ACT), _load_x(xg + 4 * P, K, xm, ACT), _load_x(xg + 5 * P, K, xm, ACT),
            _load_x(xg + 6 * P, K, xm, ACT), _load_x(xg + 7 * P, K, xm, ACT))


@triton.jit
def _group_mma(acc, q, sc, z, x0, x1, x2, x3, x4, x5, x6, x7, DKIND: tl.constexpr, PX: tl.constexpr,
               C: tl.constexpr):
    # acc (BM, BN) += sc * sum_j x_j @ (plane_j - z): one group, 8 dots of K = P
    if PX:  # fp16 on a GPU: inline-PTX unpack, two nibbles per instruction
        zc = (z + 1024.0).to(tl.float16)
        w0, w1, w2, w3, w4, w5, w6, w7 = _planes_f16(q, tl.broadcast_to(zc[None, :], q.shape))
    else:
        zc = z[None, :] + C
        w0 = _nibbles_to_qz(q & 0xF, zc, DKIND)
        w1 = _nibbles_to_qz((q >> 4) & 0xF, zc, DKIND)
        w2 = _nibbles_to_qz((q >> 8) & 0xF, zc, DKIND)
        w3 = _nibbles_to_qz((q >> 12) & 0xF, zc, DKIND)
        w4 = _nibbles_to_qz((q >> 16) & 0xF, zc, DKIND)
        w5 = _nibbles_to_qz((q >> 20) & 0xF, zc, DKIND)
        w6 = _nibbles_to_qz((q >> 24) & 0xF, zc, DKIND)
        w7 = _nibbles_to_qz((q >> 28) & 0xF, zc, DKIND)
    d = tl.zeros(acc.shape, dtype=tl.float32)
    d = _dot(x0, w0, d, DKIND)
    d = _dot(x1, w1, d, DKIND)
    d = _dot(x2, w2, d, DKIND)
    d = _dot(x3, w3, d, DKIND)
    d = _dot(x4, w4, d, DKIND)
    d = _dot(x5, w5, d, DKIND)
    d = _dot(x6, w6, d, DKIND)
    d = _dot(x7, w7, d, DKIND)
    return acc + sc[None, :] * d


@triton.jit
def _w4a16_kernel(x_ptr, q_ptr, s_ptr, z_ptr, b_ptr, y_ptr, ws_ptr, cnt_ptr, M, N, K, stride_xm, stride_ym, split_k,
            GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT: tl.constexpr,
            GROUP_M: tl.constexpr, DKIND: tl.constexpr, HAS_BIAS: tl.constexpr, SLICED: tl.constexpr,
            ACT: tl.constexpr, PX: tl.constexpr, PDL: tl.constexpr = False):
    # grid: (tiles of (M, N) in grouped order, SPLIT_K); each K step is one quantization group.
    # SPLIT (split_k > 1 programs along K): each writes its fp32 partial tile to a workspace and the
    # last one to finish its tile sums them in a fixed order (_finish_split: deterministic).
    # ACT: x is (M, 2K) = [gate | up] and the kernel reads silu(gate) * up (fused SwiGLU input).
    gdc_launch(PDL)
    gdc_wait(PDL)
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m, offs_n, mask_m, mask_n = tile_offsets(pid, M, N, BLOCK_M, BLOCK_N, GROUP_M)
    P: tl.constexpr = GROUP // 8
    C: tl.constexpr = 1024.0 if DKIND == 1 else 128.0 if DKIND == 2 else 0.0   # _nibbles_to_qz's magic on z too
    offs_p = tl.arange(0, P)

    g_lo, g_hi = _group_range(pid_k, K, split_k, GROUP)
    q_ptrs = q_ptr + offs_p[:, None] * N + offs_n[None, :]  # (P, BN)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if SLICED and P >= 16:
        # 8 dots of K = P per group, one per nibble plane (P contiguous inputs each): no reshape
        xs_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_p[None, :]  # (BM, P)
        for g in range(g_lo, g_hi):
            q, sc, z, x0, x1, x2, x3, x4, x5, x6, x7 = _load_group(
                q_ptrs, s_ptr, z_ptr, xs_ptrs, g, N, K, offs_n, mask_n, mask_m, P, GROUP, ACT)
            acc = _group_mma(acc, q, sc, z, x0, x1, x2, x3, x4, x5, x6, x7, DKIND, PX, C)
    else:
        x_ptrs = x_ptr + offs_m[:, None] * stride_xm + tl.arange(0, GROUP)[None, :]  # (BM, g)
        shifts = tl.arange(0, 8) * 4
        for g in range(g_lo, g_hi):
            x = _load_x(x_ptrs + g * GROUP, K, mask_m[:, None], ACT)  # (BM, g)
            q = tl.load(q_ptrs + g * P * N, mask=mask_n[None, :], other=0)  # (P, BN) int32
            s = tl.load(s_ptr + g * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)  # (BN,)
            zc = tl.load(z_ptr + g * N + offs_n, mask=mask_n, other=0.0).to(tl.float32) + C
            nib = (q[None, :, :] >> shifts[:, None, None]) & 0xF  # (8, P, BN), k = j*P + p
            w = tl.reshape(_nibbles_to_qz(nib, zc[None, None, :], DKIND), (GROUP, BLOCK_N))  # q - z
            if DKIND == 0:
                d = tl.dot(x, w, input_precision="ieee")
            else:
                d = tl.dot(x, w)  # (BM, BN) fp32 accumulate
            acc += s[None, :] * d

    _store_tile(acc, pid, pid_k, offs_m, offs_n, mask_m, mask_n, M, N, b_ptr, y_ptr, ws_ptr, cnt_ptr, stride_ym,
                split_k, SPLIT, HAS_BIAS)


@triton.jit
def _dequant_kernel(q_ptr, s_ptr, z_ptr, w_ptr, N, K, GROUP: tl.constexpr, BLOCK_N: tl.constexpr,
                    NK: tl.constexpr = False):
    # writes W^T (K, N) in w's dtype, or with NK W itself (N, K); grid (K//g, cdiv(N, BLOCK_N))
    gi = tl.program_id(0)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    P: tl.constexpr = GROUP // 8
    offs_p = tl.arange(0, P)
    mask_n = offs_n < N
    q = tl.load(q_ptr + (gi * P + offs_p)[:, None] * N + offs_n[None, :], mask=mask_n[None, :], other=0)
    s = tl.load(s_ptr + gi * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    z = tl.load(z_ptr + gi * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    nib = (q[None, :, :] >> (tl.arange(0, 8) * 4)[:, None, None]) & 0xF
    w = tl.reshape((nib.to(tl.float32) - z[None, None, :]) * s[None, None, :], (GROUP, BLOCK_N))
    offs_k = gi * GROUP + tl.arange(0, GROUP)
    if NK:
        tl.store(w_ptr + offs_n[:, None] * K + offs_k[None, :], tl.trans(w).to(w_ptr.dtype.element_ty),
                 mask=mask_n[:, None])
    else:
        tl.store(w_ptr + offs_k[:, None] * N + offs_n[None, :], w.to(w_ptr.dtype.element_ty),
                 mask=mask_n[None, :])


# ------------------------------------------------------------------------------- configs and tuner
# W4A16_TUNE=0: default configs, no timing. Bump "1" when a kernel of this family changes (config edits change
# the digest by themselves): saved tunings of other versions are ignored (pipeline/kernels/tuner.py).
TUNER = Tuner("W4A16_TUNE", version=config_version("1", {**CONFIGS, **w4a16_gluon.GLUON_CONFIGS,
                                                         **w4a16_gluon_gemv.GEMV_CONFIGS,
                                                         **w4a16_gluon_sk.SK_CONFIGS}))
_DKIND = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # the dot dtype, a kernel constexpr


FINE_FROM = 64   # above it the tuner's row buckets have a 1.5x step between powers of two


def _m_bucket(M: int) -> int:
    """The row count a shape's choice is tuned at and shared by: the next power of two up to FINE_FROM, then the next
    of 96, 128, 192, 256, 384, ... . Where the tensor cores' FLOPs bound a call, a config chosen at 2^k rows and
    run at 0.75 * 2^k (a prefix-cache hit's mixed step: ~190 rows) computes a third more rows than it needs (two
    128-row tiles for 192); the prefill graphs' buckets (engine/graphs.py) have the same steps and finer."""
    p = 1 << max(0, (M - 1).bit_length())
    return p * 3 // 4 if p > FINE_FROM and M <= p * 3 // 4 else p


def tuning_sizes(max_m: int) -> list[int]:
    """Every row bucket up to max_m, and max_m: the row counts a warm-up runs so every bucket a step can hit is
    tuned before a request is timed (Engine.warmup)."""
    out = sorted({_m_bucket(m) for m in range(1, max(1, max_m) + 1)} | {max(1, max_m)})
    return [m for m in out if m <= max(1, max_m)]


def _swap_stages(BM: int, BN: int, g: int, stages: int, act: bool, itemsize: int) -> int:
    """Pipeline depth of a swap config that fits the shared memory (227 KB on H100): per stage one group's codes
    (BN * g / 2 bytes) and activations (BM * g, twice with the fused SwiGLU, which reads gate and up)."""
    per_stage = BN * g // 2 + BM * g * itemsize * (2 if act else 1)
    while stages > 1 and stages * per_stage > 220 * 1024:
        stages -= 1
    return stages


def _launch(x2, w: W4Weight, bias, out_dtype, cfg, act: bool = False, pdl: bool | None = None) -> torch.Tensor:
    """x2 (M, K), or (M, 2K) = [gate | up] with act (the kernel reads silu(gate) * up); pdl: launch with PDL
    (default: what pdl.enabled says for x2's device)."""
    M, N, K, g = x2.shape[0], w.N, w.K, w.group_size
    pdl = pdl_enabled(x2.device) if pdl is None else pdl
    if cfg is not None and cfg[0] == UNFUSED:   # act: the SwiGLU product as its own kernel, then the plain GEMM
        return w4a16_linear(silu_mul(x2) if act else x2, w, bias)
    if cfg is not None and cfg[0] == "gluon_gemv":  # sm_90 Gluon GEMV (w4a16_gluon_gemv.py): one row
        return w4a16_gluon_gemv.w4a16_gluon_gemv(x2, w, bias, cfg[1], out=_alloc_out(M, N, out_dtype, x2.device),
                                                 pdl=pdl, act="silu_mul" if act else None)
    if cfg is not None and cfg[0] == "gluon_sk":  # sm_90 Gluon, persistent stream-K (w4a16_gluon_sk.py)
        return w4a16_gluon_sk.w4a16_gluon_sk_linear(x2, w, bias, cfg[1], "silu_mul" if act else None,
                                                    out=_alloc_out(M, N, out_dtype, x2.device), pdl=pdl)
    if cfg is not None and cfg[0] == "gluon":  # sm_90 Gluon kernel (w4a16_gluon.py)
        return w4a16_gluon.w4a16_gluon_linear(x2, w, bias, cfg[1], "silu_mul" if act else None,
                                              out=_alloc_out(M, N, out_dtype, x2.device), pdl=pdl)
    if cfg is None or cfg[0] == "dequant_nk":  # dequantize to a (K, N) scratch (or (N, K)), then cuBLAS
        if act:
            x2 = silu_mul(x2)
        nk = cfg is not None   # W as stored by fp16 checkpoints: F.linear runs the fp16 baseline's own GEMM (TN)
        wt = torch.empty((N, K) if nk else (K, N), device=x2.device, dtype=x2.dtype)
        _dequant_kernel[(K // g, cdiv(N, 128))](w.qweight, w.scales, w.zeros, wt, N, K, GROUP=g,
                                                      BLOCK_N=128, NK=nk, num_warps=4)
        if nk:
            return F.linear(x2, wt, None if bias is None else bias.to(x2.dtype))
        y = x2 @ wt
        return y if bias is None else y + bias.to(y.dtype)
    if cfg[0] == "swapk":  # the persistent stream-K swap tile (w4a16_streamk.py): one wave, equal runs of steps
        _, BM, BN, ctas, warps, stages, kw, pairs, *nested = cfg
        if kw * g // 8 < 16 and not (pairs == 1 and x2.dtype == torch.float16):
            raise ValueError(f"{cfg}: a dot of K = kw * g/8 = {kw * g // 8} < 16 at group {g}")
        tiles = cdiv(M, BM) * cdiv(N, BN)
        progs, parts = w4a16_streamk.plan(tiles, K // g, sm_count(x2.device, cpu=3), ctas)
        y = _alloc_out(M, N, out_dtype, x2.device)
        ws = torch.empty(parts, M, N, device=x2.device, dtype=torch.float32) if parts > 1 else y
        w4a16_streamk._w4a16_swapk_kernel[(progs,)](
            x2, w.qweight, w.scales, w.zeros, bias if bias is not None else x2, y, ws,
            arrival_counters(x2.device, tiles), M, N, K, x2.stride(0), y.stride(0), progs, MAX_PARTS=parts,
            GROUP=g, BLOCK_M=BM, BLOCK_N=BN, DKIND=_DKIND[x2.dtype], HAS_BIAS=bias is not None, ACT=act, KW=kw,
            PDL=pdl, PAIRS=pairs, ASM=x2.device.type == "cuda", NESTED=bool(nested and nested[0]), num_warps=warps,
            num_stages=_swap_stages(BM, BN, g, stages, act, x2.element_size()), **launch_kwargs(pdl))
        return y
    if cfg[0] == "wide":
        _, BN, KS, warps, h2 = cfg
        split = cdiv(K // g, KS)
        tiles = M * cdiv(N, BN)
    elif cfg[0] == "fma":
        _, BN, split, warps, stages = cfg
        split = split_for(M, N, K, g, 1, BN, split, x2.device)
        tiles = M * cdiv(N, BN)
    elif cfg[0] == "swap":
        BM, BN, split, warps, stages, kw, pairs, unroll = swap_fields(cfg)
        stages = _swap_stages(BM, BN, g, stages, act, x2.element_size())
        split = split_for(M, N, K, g, BM, BN, split, x2.device)
        tiles = cdiv(M, BM) * cdiv(N, BN)
    else:
        BM, BN, split, warps, stages, sliced, px = cfg
        px = px and x2.dtype == torch.float16 and x2.device.type == "cuda"  # inline PTX: fp16 on a GPU only
        split = split_for(M, N, K, g, BM, BN, split, x2.device)
        tiles = cdiv(M, BM) * cdiv(N, BN)
    y = _alloc_out(M, N, out_dtype, x2.device)
    b = bias if bias is not None else x2
    ws = torch.empty(split, M, N, device=x2.device, dtype=torch.float32) if split > 1 else y
    cnt = arrival_counters(x2.device, tiles) if split > 1 else y
    if cfg[0] == "wide":
        h2 = bool(h2) and x2.dtype == torch.float16 and x2.device.type == "cuda"  # inline PTX: GPU fp16 only
        _gemv_wide_kernel[(cdiv(N, BN) * split * M,)](
            x2, w.qweight, w.scales, w.zeros, b, y, ws, cnt, M, N, K, x2.stride(0), y.stride(0), split,
            GROUP=g, BLOCK_N=BN, KS=KS, SPLIT=split > 1, HAS_BIAS=bias is not None, ACT=act, H2=h2, PDL=pdl,
            num_warps=warps, num_stages=1, **launch_kwargs(pdl))
    elif cfg[0] == "fma":
        _gemv_kernel[(cdiv(N, BN), split, M)](
            x2, w.qweight, w.scales, w.zeros, b, y, ws, cnt, M, N, K, x2.stride(0), y.stride(0), split,
            GROUP=g, BLOCK_N=BN, SPLIT=split > 1, HAS_BIAS=bias is not None, ACT=act, PDL=pdl, num_warps=warps,
            num_stages=stages, **launch_kwargs(pdl))
    elif cfg[0] == "swap":
        _w4a16_swap_kernel[(tiles, split)](
            x2, w.qweight, w.scales, w.zeros, b, y, ws, cnt, M, N, K, x2.stride(0), y.stride(0), split,
            GROUP=g, BLOCK_M=BM, BLOCK_N=BN, SPLIT=split > 1, GROUP_M=8, DKIND=_DKIND[x2.dtype],
            HAS_BIAS=bias is not None, ACT=act, KW=kw, PDL=pdl, PAIRS=pairs,
            ASM=x2.device.type == "cuda", UNROLL=unroll, num_warps=warps, num_stages=stages, **launch_kwargs(pdl))
    else:
        _w4a16_kernel[(tiles, split)](x2, w.qweight, w.scales, w.zeros, b, y, ws, cnt,
                                M, N, K, x2.stride(0), y.stride(0), split,
                                GROUP=g, BLOCK_M=BM, BLOCK_N=BN, SPLIT=split > 1, GROUP_M=8, DKIND=_DKIND[x2.dtype],
                                HAS_BIAS=bias is not None, SLICED=int(sliced), ACT=act, PX=bool(px), PDL=pdl,
                                num_warps=warps, num_stages=stages, **launch_kwargs(pdl))
    return y


def _alloc_out(M: int, N: int, dtype, device) -> torch.Tensor:
    """Output buffer (tests poison it to catch unwritten elements)."""
    return torch.empty(M, N, device=device, dtype=dtype)


def _key(x2, w: W4Weight, bias, act: bool, pdl: bool) -> tuple:
    return (x2.device.index, x2.dtype, _m_bucket(x2.shape[0]), w.N, w.K, w.group_size, bias is not None, act, pdl)


def tuning_record(x: torch.Tensor, w: W4Weight, bias=None, act: str | None = None) -> tuple[str | None, dict]:
    """(chosen config, {config: ms}) of the tuner for this call's shape, if it has run."""
    return TUNER.record(_key(x.reshape(-1, x.shape[-1]), w, bias, act is not None, pdl_enabled(x.device)))


# For act="silu_mul" calls the tuner also times the product as its own kernel (norm.silu_mul) followed by the plain
# GEMM with its own tuned config: fusing it costs every program along N the SwiGLU of its inputs again, which
# doubles the main loop's instructions at 16-64 rows (sm_90 SASS, 2026-12-07: swap_m32_n64_c4_k8 213 -> 468,
# gl_m32_n128_k16_s4_c4 425 -> 1035), where those kernels are bound by instruction issue.
UNFUSED = "silu_mul+gemm"


def _config(name: str):
    """A config name -> its launch tuple: CONFIGS' (Triton kernels), ("gluon", name) for `w4a16_gluon`'s,
    ("gluon_sk", name) for `w4a16_gluon_sk`'s,
    ("gluon_gemv", name) for `w4a16_gluon_gemv`'s or (UNFUSED,)."""
    if name == UNFUSED:
        return (UNFUSED,)
    if name in w4a16_gluon.GLUON_CONFIGS:
        return ("gluon", name)
    if name in w4a16_gluon_sk.SK_CONFIGS:
        return ("gluon_sk", name)
    return ("gluon_gemv", name) if name in w4a16_gluon_gemv.GEMV_CONFIGS else CONFIGS[name]


def _choose(x2, w, bias, out_dtype, act: bool = False, pdl: bool | None = None) -> str:
    M = x2.shape[0]
    pdl = pdl_enabled(x2.device) if pdl is None else pdl
    key = _key(x2, w, bias, act, pdl)
    name = TUNER.tuned.get(key)
    if name is not None:  # the common case: no candidate list, no closure
        return name
    names = tuning_set(M, pdl)
    if x2.dtype != torch.float16 or os.environ.get("PIPELINE_W4A16_PAIRS", "1") == "0":
        names = tuple(n for n in names if not uses_pairs(n))   # the pair unpack: fp16 only; =0 for an A/B
    if act and os.environ.get("PIPELINE_W4A16_UNFUSED", "1") != "0":   # =0 for an A/B
        names = names + (UNFUSED,)
    if w4a16_gluon.enabled(x2.device) and w4a16_gluon.applicable(x2, w, act):
        names = names + tuple(n for n in gluon_candidates(M) if w4a16_gluon.fits(n, w.group_size, act))
        names = names + tuple(n for n in w4a16_gluon_sk.candidates(M) if w4a16_gluon_sk.fits(n, w.group_size, act))
        if w4a16_gluon.gemv_enabled(x2.device) and w4a16_gluon_gemv.applicable(x2, w, act):   # one row (opt-in)
            names = names + tuple(n for n in w4a16_gluon_gemv.GEMV_CONFIGS
                                  if w4a16_gluon_gemv.fits(n, w.group_size, w.K))
    if os.environ.get("PIPELINE_W4A16_STREAMK", "1") == "0":   # the stream-K tiles left out (an A/B; not yet timed)
        names = tuple(n for n in names if not n.startswith(("swapk_", "glk_")))
    return TUNER.choose(key, names, lambda name: _launch(x2, w, bias, out_dtype, _config(name), act, pdl),
                        default_config(M), x2.device)


def w4a16_linear(x: torch.Tensor, w: W4Weight, bias: torch.Tensor | None = None,
                 config: str | tuple | None = None, act: str | None = None) -> torch.Tensor:
    """y = x @ dequant(w).T (+ bias); x (..., K) fp16/bf16 (fp32 for the reference/interpreter).

    act="silu_mul": x is (..., 2K) = [gate | up] and y = silu_mul(x) @ dequant(w).T, the SwiGLU product
    computed while loading x (no separate kernel, no (..., K) intermediate).
    `config`: a name from CONFIGS or a raw tuple (tests); default: tuned per shape."""
    if act not in (None, "silu_mul"):
        raise ValueError(f"act={act!r} not supported; valid: None, 'silu_mul'")
    k_in = 2 * w.K if act else w.K
    if x.shape[-1] != k_in:
        raise ValueError(f"x.shape[-1]={x.shape[-1]} != {'2 * weight K' if act else 'weight K'}={k_in}")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"x.dtype={x.dtype} not supported; valid: float16, bfloat16, float32")
    if x.device != w.device:
        raise ValueError(f"x on {x.device} but weight on {w.device}")
    if bias is not None and tuple(bias.shape) != (w.N,):
        raise ValueError(f"bias shape {tuple(bias.shape)} != (N,) = ({w.N},)")
    if not use_triton(x, "w4a16"):
        return w4a16_linear_ref(silu_mul(x) if act else x, w, bias)
    x2 = x if x.dim() == 2 else x.reshape(-1, k_in)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if x2.shape[0] == 0:
        return x.new_empty(*x.shape[:-1], w.N)
    pdl = pdl_enabled(x.device)
    if isinstance(config, tuple) or (config is None and x.device.type != "cuda"):
        cfg = config or INTERPRET_CONFIG
    else:
        cfg = _config(config or _choose(x2, w, bias, x.dtype, act is not None, pdl))
    y = _launch(x2, w, bias, x.dtype, cfg, act is not None, pdl)
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], w.N)
