"""Paged decode attention (one query token per sequence) over fp16/bf16, int8 or int4 KV caches.

Usage:
    out = paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale,
                                 kv_mode="static", kv_bits=8, k_scale=ks, k_zp=kz, v_scale=vs, v_zp=vz)

Layouts (see kvcache.py for the quantization math):
  q             (B, n_heads, head_dim) fp16/bf16, one token per sequence; n_heads % n_kv_heads == 0 (GQA:
                query head h reads KV head h // (n_heads // n_kv_heads)).
  k/v_cache     kv_mode "none":  (num_blocks, n_kv_heads, block_size, head_dim), q's dtype
                kv_bits 8:       same shape, int8 codes
                kv_bits 4:       (num_blocks, n_kv_heads, block_size, head_dim // 2) uint8, low nibble = even channel
  block_tables  (B, max_blocks) int32: token `pos` of sequence b lives in block block_tables[b, pos // block_size],
                row pos % block_size.
  context_lens  (B,) int32, >= 1: tokens 0..context_lens[b]-1 are attended (the new token's K/V already written).
  kv params     static:  k_scale, k_zp, v_scale, v_zp (n_kv_heads,) fp32
                dynamic: k_scale, k_zp, v_scale, v_zp (num_blocks, n_kv_heads, block_size) fp32 side tensors
  out           (B, n_heads, head_dim), q's dtype.

The kernel is split-K over the context (flash-decoding): grid (B * n_kv_heads, num_splits); each program
serves the n_heads // n_kv_heads query heads of one KV head (KV read once per group), keeps an online
softmax in fp32, and the last split program of each (sequence, KV head) to finish (an atomic arrival
counter) merges the splits by their log-sum-exp: one launch. Dequantization is
folded out of the inner loop: scores = k_scale * (q . k_codes) + k_zp * sum(q), and the V scale/zero
point are applied to the accumulator (static) or to the probabilities (dynamic), so the loop only
turns codes into fp16 (integer ops on the bits, no int->float converts; q is cast to fp16 for quantized
KV, also when it is bf16). int4 is handled as even/odd channel halves, never interleaved in registers.
"""
from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from pipeline.kernels import kvcache
from pipeline.kernels.dispatch import arrival_counters, cdiv, next_pow2, sm_count, use_triton
from pipeline.kernels.pdl import enabled as pdl_enabled, gdc_launch, gdc_wait, launch_kwargs

LOG2E = 1.4426950408889634


I8_F16_ASM = tl.constexpr("""{
        .reg .b32 t, c;
        xor.b32 t, $2, 0x80808080;
        mov.b32 c, 0x64806480;
        prmt.b32 $0, t, 0x64646464, 0x4140;
        prmt.b32 $1, t, 0x64646464, 0x4342;
        sub.f16x2 $0, $0, c;
        sub.f16x2 $1, $1, c;
        }""")


@triton.jit
def _kv_codes(x, BITS: tl.constexpr, HIGH: tl.constexpr, ASM: tl.constexpr):
    """`_kv_tile`; with ASM (a GPU) int8 codes go four a 32-bit word: one xor makes them biased (q + 128), two byte
    permutes put each under the fp16 exponent 0x64 (1024 + q + 128, two a word) and two sub.f16x2 take 1152 off,
    the same exact values in ~1.25 instructions a code against ~4 for the per-code widen, add and pack the
    compiler makes of `_kv_tile` (sm_90 SASS: tests/sm90_sass.py)."""
    if BITS == 8 and ASM:
        return tl.inline_asm_elementwise(I8_F16_ASM, "=r,=r,r", [x], dtype=tl.float16, is_pure=True, pack=4)
    return _kv_tile(x, BITS, HIGH)


@triton.jit
def _kv_tile(x, BITS: tl.constexpr, HIGH: tl.constexpr):
    """A loaded K/V tile as dot operand. Codes become their exact signed values q in fp16 without
    int->float converts (I2F runs at a quarter of the integer rate and bounded the int8 kernel):
    the fp16 bit pattern 0x6400 | u reads as 1024 + u."""
    if BITS == 16:
        y = x
    elif BITS == 8:
        y = (x.to(tl.int16) + (0x6400 + 128)).to(tl.float16, bitcast=True) - 1152.0  # int8 q
    elif HIGH:
        y = ((x >> 4).to(tl.int16) | 0x6400).to(tl.float16, bitcast=True) - 1032.0  # nibble = q + 8
    else:
        y = ((x & 0xF).to(tl.int16) | 0x6400).to(tl.float16, bitcast=True) - 1032.0
    return y


@triton.jit
def _dot_kq(q, k):
    # q (BLOCK_G, Dk), k (BLOCK_N, Dk) -> (BLOCK_G, BLOCK_N) fp32
    return tl.dot(q, tl.trans(k))


@triton.jit
def _program_range(CL, n_kv, part, PDL: tl.constexpr):
    # grid (B * n_kv, splits): this program's (sequence, KV head) and its context split [start, end)
    gdc_launch(PDL)
    gdc_wait(PDL)
    pid = tl.program_id(0)
    sid = tl.program_id(1)
    b = pid // n_kv
    start = sid * part
    end = tl.minimum(start + part, tl.load(CL + b))
    return pid, sid, b, pid % n_kv, start, end


@triton.jit
def _attn_decode_kernel(Q, K, V, BT, CL, KS, KZ, VS, VZ, O, OP, LSE, CNT,
            sm_scale, n_kv, part, n_splits,
            s_qb, s_qh, s_kb, s_kh, s_kt, s_vb, s_vh, s_vt, s_bt, s_sb, s_sh,
            s_ob, s_oh, s_pb, s_ph, s_ps, s_lb, s_lh,
            G: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr,
            BLOCK_N: tl.constexpr, MODE: tl.constexpr, BITS: tl.constexpr, SPLIT: tl.constexpr,
            BLOCK_S: tl.constexpr, PDL: tl.constexpr = False, ASM: tl.constexpr = False):
    pid, sid, b, kvh, start, end = _program_range(CL, n_kv, part, PDL)

    PACK: tl.constexpr = 2 if BITS == 4 else 1
    DK: tl.constexpr = HEAD_DIM // PACK  # stored elements per token row
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, DK)
    gmask = offs_g < G
    heads = kvh * G + offs_g
    q_ptr = Q + b * s_qb + heads[:, None] * s_qh + offs_d[None, :] * PACK
    # quantized KV computes in fp16 (codes are exact there), fp16/bf16 KV in its own dtype
    q0 = tl.load(q_ptr, mask=gmask[:, None], other=0.0)  # (BLOCK_G, DK): all channels, or the even ones
    if BITS != 16:
        q0 = q0.to(tl.float16)
    qsum = tl.sum(q0.to(tl.float32), 1)
    if BITS == 4:
        q1 = tl.load(q_ptr + 1, mask=gmask[:, None], other=0.0).to(tl.float16)  # odd channels
        qsum += tl.sum(q1.to(tl.float32), 1)

    if MODE == 1:  # static: per-head scalars
        ks = tl.load(KS + kvh)
        kz = tl.load(KZ + kvh)
        vs = tl.load(VS + kvh)
        vz = tl.load(VZ + kvh)

    m_i = tl.full([BLOCK_G], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc0 = tl.zeros([BLOCK_G, DK], tl.float32)
    acc1 = tl.zeros([BLOCK_G, DK], tl.float32)  # odd channels (int4 only)
    accz = tl.zeros([BLOCK_G], tl.float32)      # sum p * v_zp (dynamic only)
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        nmask = offs_n < end
        blk = tl.load(BT + b * s_bt + offs_n // BLOCK_SIZE, mask=nmask, other=0).to(tl.int64)
        row = offs_n % BLOCK_SIZE
        k_ptr = K + blk[:, None] * s_kb + kvh * s_kh + row[:, None] * s_kt + offs_d[None, :]
        v_ptr = V + blk[:, None] * s_vb + kvh * s_vh + row[:, None] * s_vt + offs_d[None, :]
        kt = tl.load(k_ptr, mask=nmask[:, None], other=0)
        vt = tl.load(v_ptr, mask=nmask[:, None], other=0)
        if BITS == 4:
            s = _dot_kq(q0, _kv_tile(kt, BITS, False)) + _dot_kq(q1, _kv_tile(kt, BITS, True))
        else:
            s = _dot_kq(q0, _kv_codes(kt, BITS, False, ASM))
        if MODE == 1:
            s = s * ks + kz * qsum[:, None]
        if MODE == 2:
            side = blk * s_sb + kvh * s_sh + row
            ks_n = tl.load(KS + side, mask=nmask, other=0.0)
            kz_n = tl.load(KZ + side, mask=nmask, other=0.0)
            vs_n = tl.load(VS + side, mask=nmask, other=0.0)
            vz_n = tl.load(VZ + side, mask=nmask, other=0.0)
            s = s * ks_n[None, :] + qsum[:, None] * kz_n[None, :]
        s = tl.where(nmask[None, :], s * sm_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        m_i = m_new
        if MODE == 2:
            accz = accz * alpha + tl.sum(p * vz_n[None, :], 1)
            p = p * vs_n[None, :]
        pv = p.to(q0.dtype)
        if BITS == 4:
            acc0 = acc0 * alpha[:, None] + tl.dot(pv, _kv_tile(vt, BITS, False))
            acc1 = acc1 * alpha[:, None] + tl.dot(pv, _kv_tile(vt, BITS, True))
        else:
            acc0 = acc0 * alpha[:, None] + tl.dot(pv, _kv_codes(vt, BITS, False, ASM))

    inv_l = 1.0 / tl.maximum(l_i, 1e-30)
    if MODE == 0:
        o0 = acc0 * inv_l[:, None]
        o1 = acc1 * inv_l[:, None]
    if MODE == 1:
        live = tl.where(l_i > 0, 1.0, 0.0)  # an empty split must output 0, not the zero point
        o0 = acc0 * (vs * inv_l)[:, None] + (vz * live)[:, None]
        o1 = acc1 * (vs * inv_l)[:, None] + (vz * live)[:, None]
    if MODE == 2:
        o0 = (acc0 + accz[:, None]) * inv_l[:, None]
        o1 = (acc1 + accz[:, None]) * inv_l[:, None]
    if SPLIT:
        op_ptr = OP + b * s_pb + heads[:, None] * s_ph + sid * s_ps + offs_d[None, :] * PACK
        tl.store(op_ptr, o0, mask=gmask[:, None])
        if BITS == 4:
            tl.store(op_ptr + 1, o1, mask=gmask[:, None])
        lse = tl.where(l_i > 0, m_i + tl.log2(tl.maximum(l_i, 1e-30)), float("-inf"))
        tl.store(LSE + b * s_lb + heads * s_lh + sid, lse, mask=gmask)
        # the last split of this (sequence, KV head) to finish merges all of them (no second launch);
        # barriers make the counter's release/acquire cover every thread's stores and loads
        tl.debug_barrier()
        arrived = tl.atomic_add(CNT + pid, 1, sem="acq_rel")
        if arrived == n_splits - 1:
            tl.debug_barrier()
            _merge_splits(OP, LSE, O, b, kvh, n_splits, s_pb, s_ph, s_ps, s_lb, s_lh, s_ob, s_oh,
                          G, HEAD_DIM, BLOCK_S)
            tl.atomic_xchg(CNT + pid, 0)  # re-armed for the next launch
    else:
        o_ptr = O + b * s_ob + heads[:, None] * s_oh + offs_d[None, :] * PACK
        tl.store(o_ptr, o0.to(O.dtype.element_ty), mask=gmask[:, None])
        if BITS == 4:
            tl.store(o_ptr + 1, o1.to(O.dtype.element_ty), mask=gmask[:, None])


@triton.jit
def _attn_decode_g1_kernel(Q, K, V, BT, CL, KS, KZ, VS, VZ, O, OP, LSE, CNT,
                           sm_scale, n_kv, part, n_splits,
                           s_qb, s_qh, s_kb, s_kh, s_kt, s_vb, s_vh, s_vt, s_bt,
                           s_ob, s_oh, s_pb, s_ph, s_ps, s_lb, s_lh,
                           BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
                           MODE: tl.constexpr, BITS: tl.constexpr, SPLIT: tl.constexpr, BLOCK_S: tl.constexpr,
                           PDL: tl.constexpr = False, ASM: tl.constexpr = False):
    # variant "fma": one query head per KV head (G = 1, multi-head attention), 16-bit or static int8 KV. No MMA
    # (a G = 1 dot pads the query to 16 rows): scores and the weighted V sum on CUDA cores, and the online softmax
    # kept per tile row (BLOCK_N running maxima, sums and (BLOCK_N, D) accumulators), so no loop iteration needs
    # a reduction across the tile's rows; the rows are merged once at the end (as `_merge_splits` merges splits).
    pid, sid, b, h, start, end = _program_range(CL, n_kv, part, PDL)
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(Q + b * s_qb + h * s_qh + offs_d)
    if BITS != 16:
        q = q.to(tl.float16)      # as the MMA kernel: quantized KV scores from the fp16 query
    q = q.to(tl.float32)
    if MODE == 1:
        ks = tl.load(KS + h)
        kz = tl.load(KZ + h)
        vs = tl.load(VS + h)
        vz = tl.load(VZ + h)
        qz = kz * tl.sum(q, 0)
    m_r = tl.full([BLOCK_N], -1.0e30, tl.float32)
    l_r = tl.zeros([BLOCK_N], tl.float32)
    acc = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        nmask = offs_n < end
        blk = tl.load(BT + b * s_bt + offs_n // BLOCK_SIZE, mask=nmask, other=0).to(tl.int64)
        row = offs_n % BLOCK_SIZE
        kt = tl.load(K + blk[:, None] * s_kb + h * s_kh + row[:, None] * s_kt + offs_d[None, :], mask=nmask[:, None],
                     other=0)
        vt = tl.load(V + blk[:, None] * s_vb + h * s_vh + row[:, None] * s_vt + offs_d[None, :], mask=nmask[:, None],
                     other=0)
        s = tl.sum(_kv_codes(kt, BITS, False, ASM).to(tl.float32) * q[None, :], 1)
        if MODE == 1:
            s = s * ks + qz
        s = tl.where(nmask, s * sm_scale, float("-inf"))
        m_new = tl.maximum(m_r, s)
        alpha = tl.exp2(m_r - m_new)
        p = tl.exp2(s - m_new)
        l_r = l_r * alpha + p
        acc = acc * alpha[:, None] + p[:, None] * _kv_codes(vt, BITS, False, ASM).to(tl.float32)
        m_r = m_new
    # merge the rows: m the maximum, each row's sum and accumulator scaled by 2^(m_r - m)
    m_i = tl.max(m_r, 0)
    w = tl.where(l_r > 0, tl.exp2(m_r - m_i), 0.0)
    l_i = tl.sum(l_r * w, 0)
    o = tl.sum(acc * w[:, None], 0) / tl.maximum(l_i, 1e-30)
    if MODE == 1:
        o = o * vs + tl.where(l_i > 0, vz, 0.0)   # an empty split outputs 0, not the zero point
    if SPLIT:
        tl.store(OP + b * s_pb + h * s_ph + sid * s_ps + offs_d, o)
        lse = tl.where(l_i > 0, m_i + tl.log2(tl.maximum(l_i, 1e-30)), float("-inf"))
        tl.store(LSE + b * s_lb + h * s_lh + sid, lse)
        tl.debug_barrier()
        arrived = tl.atomic_add(CNT + pid, 1, sem="acq_rel")
        if arrived == n_splits - 1:
            tl.debug_barrier()
            _merge_splits(OP, LSE, O, b, h, n_splits, s_pb, s_ph, s_ps, s_lb, s_lh, s_ob, s_oh, 1, HEAD_DIM, BLOCK_S)
            tl.atomic_xchg(CNT + pid, 0)
    else:
        tl.store(O + b * s_ob + h * s_oh + offs_d, o.to(O.dtype.element_ty))


@triton.jit
def _merge_splits(OP, LSE, O, b, kvh, n_splits, s_pb, s_ph, s_ps, s_lb, s_lh, s_ob, s_oh,
                  G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr):
    # out[b, h] = sum_s 2^(lse_s - max) op_s / sum_s 2^(lse_s - max) for the G query heads of KV head kvh;
    # every split of a head is read in one (BLOCK_S, HEAD_DIM) load
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, HEAD_DIM)
    smask = offs_s < n_splits
    for gi in tl.static_range(G):
        h = kvh * G + gi
        lse = tl.load(LSE + b * s_lb + h * s_lh + offs_s, mask=smask, other=float("-inf"), cache_modifier=".cg")
        w = tl.exp2(lse - tl.max(lse, 0))  # empty splits have lse = -inf -> weight 0
        op = tl.load(OP + b * s_pb + h * s_ph + offs_s[:, None] * s_ps + offs_d[None, :], mask=smask[:, None],
                     other=0.0, cache_modifier=".cg")
        o = tl.sum(op * w[:, None], 0) / tl.sum(w, 0)
        tl.store(O + b * s_ob + h * s_oh + offs_d, o.to(O.dtype.element_ty))


WAVES = 3  # the context is split until about this many programs per SM


def fma_applies(n_heads: int, n_kv: int, kv_mode: str, kv_bits: int) -> bool:
    """The "fma" variant serves this call: multi-head attention (G = 1) over a 16-bit or static int8 cache."""
    return n_heads == n_kv and (kv_mode, kv_bits) in (("none", 16), ("static", 8))


def _context_split(pairs, max_ctx, block_n, device, num_splits=None, waves=WAVES):
    """(splits, tokens per split) for `pairs` (sequence, KV head) programs over at most max_ctx tokens:
    about `waves` programs per SM, each a whole number of block_n tiles, at most 64 splits."""
    if num_splits is None:
        num_splits = math.ceil(waves * sm_count(device, cpu=2) / pairs)  # CPU: a few splits, merge exercised
    num_splits = max(1, min(num_splits, cdiv(max_ctx, block_n), 64))
    part = cdiv(cdiv(max_ctx, num_splits), block_n) * block_n
    return cdiv(max_ctx, part), part


def _check(q, k_cache, v_cache, block_tables, context_lens, kv_mode, kv_bits, params):
    kvcache.check_kv_config(kv_mode, kv_bits)
    if q.dim() != 3 or q.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"q must be (B, n_heads, head_dim) fp16/bf16, got {tuple(q.shape)} {q.dtype}")
    B, H, D = q.shape
    if D < 16 or D & (D - 1) or (kv_bits == 4 and D < 32):
        raise ValueError(f"head_dim={D}: must be a power of two >= 16 (>= 32 for int4 KV)")
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache {tuple(k_cache.shape)} / v_cache {tuple(v_cache.shape)}: need equal "
                         "(num_blocks, n_kv_heads, block_size, head_dim[//2]) shapes")
    num_blocks, n_kv, bs, dk = k_cache.shape
    want_dt = {16: q.dtype, 8: torch.int8, 4: torch.uint8}[kv_bits]
    want_dk = D // 2 if kv_bits == 4 else D
    if k_cache.dtype != want_dt or v_cache.dtype != want_dt or dk != want_dk:
        raise ValueError(f"kv_mode={kv_mode!r}, kv_bits={kv_bits}: caches must be {want_dt} with last dim "
                         f"{want_dk}, got {k_cache.dtype}/{v_cache.dtype} with last dim {dk}")
    if H % n_kv:
        raise ValueError(f"n_heads={H} is not a multiple of n_kv_heads={n_kv}")
    if block_tables.dim() != 2 or block_tables.shape[0] != B or block_tables.dtype != torch.int32:
        raise ValueError(f"block_tables must be ({B}, max_blocks) int32, got {tuple(block_tables.shape)} "
                         f"{block_tables.dtype}")
    if context_lens.shape != (B,) or context_lens.dtype != torch.int32:
        raise ValueError(f"context_lens must be ({B},) int32, got {tuple(context_lens.shape)} {context_lens.dtype}")
    side = (n_kv,) if kv_mode == "static" else (num_blocks, n_kv, bs)
    tensors = {"k_cache": k_cache, "v_cache": v_cache, "block_tables": block_tables, "context_lens": context_lens}
    for name, t in params.items():
        if kv_mode == "none":
            continue
        if t is None or t.shape != side or t.dtype != torch.float32:
            got = None if t is None else (tuple(t.shape), t.dtype)
            raise ValueError(f"kv_mode={kv_mode!r}: {name} must be fp32 of shape {side}, got {got}")
        tensors[name] = t
    for name, t in tensors.items():
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device}, q on {q.device}")
    for name in ("k_cache", "v_cache"):
        if tensors[name].stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous along head_dim, strides {tensors[name].stride()}")
    if kv_mode == "dynamic" and any(t.stride(-1) != 1 for t in params.values()):
        raise ValueError("dynamic KV scale/zp side tensors must be contiguous along block_size")


def _launch(q, k_cache, v_cache, block_tables, context_lens, scale, kv_mode="none", kv_bits=16,
            k_scale=None, k_zp=None, v_scale=None, v_zp=None, out=None, max_context_len=None,
            num_splits=None, block_n=None, num_warps=4, num_stages=2, waves=WAVES, variant="mma", asm=None):
    """variant "fma" (G = 1, 16-bit or static int8 KV; `fma_applies`): `_attn_decode_g1_kernel`, no MMA.
    asm: int8 codes four a word by inline PTX (`_kv_codes`); default off, PIPELINE_KV_I8_ASM=1 turns it on (a GPU
    only). Timed on an H100 (bench/decode_profile.py, 2026-12-07) it made both kernels slower alone (MMA 3%, CUDA-core
    11-15%) and changed nothing in serving (decode steps 3891 with it, 3885 / 3880 without)."""
    params = {"k_scale": k_scale, "k_zp": k_zp, "v_scale": v_scale, "v_zp": v_zp}
    _check(q, k_cache, v_cache, block_tables, context_lens, kv_mode, kv_bits, params)
    if q.stride(-1) != 1:
        q = q.contiguous()
    B, H, D = q.shape
    n_kv, bs = k_cache.shape[1], k_cache.shape[2]
    G = H // n_kv
    if out is None:
        out = torch.empty_like(q)
    elif out.shape != q.shape or out.dtype != q.dtype or out.device != q.device or out.stride(-1) != 1:
        raise ValueError(f"out must be like q {tuple(q.shape)} {q.dtype}, got {tuple(out.shape)} {out.dtype}")
    block_n = block_n or (32 if variant == "fma" else 64 if kv_bits == 16 else 128)   # fma 32 x 4 warps: no spills
    max_ctx = max_context_len or block_tables.shape[1] * bs  # capacity: graph-safe upper bound
    num_splits, part = _context_split(B * n_kv, max_ctx, block_n, q.device, num_splits, waves)
    split = num_splits > 1
    if split:
        op = torch.empty(B, H, num_splits, D, device=q.device, dtype=torch.float32)
        lse = torch.empty(B, H, num_splits, device=q.device, dtype=torch.float32)
    else:
        op, lse = out, out[:, :, 0]  # unused placeholders
    cnt = arrival_counters(q.device, B * n_kv) if split else context_lens
    dummy = context_lens
    ks, kz, vs, vz = (dummy if t is None else t for t in (k_scale, k_zp, v_scale, v_zp))
    s_sb, s_sh = (ks.stride(0), ks.stride(1)) if kv_mode == "dynamic" else (0, 0)
    pdl = pdl_enabled(q.device)
    if asm is None:
        asm = q.is_cuda and os.environ.get("PIPELINE_KV_I8_ASM", "0") == "1"
    if variant == "fma":
        if not fma_applies(H, n_kv, kv_mode, kv_bits):
            raise ValueError(f"decode attention variant 'fma' takes one query head per KV head and 16-bit or static "
                             f"int8 KV, not {H}/{n_kv} heads, kv_mode={kv_mode!r}, kv_bits={kv_bits}")
        _attn_decode_g1_kernel[(B * n_kv, num_splits)](
            q, k_cache, v_cache, block_tables, context_lens, ks, kz, vs, vz, out, op, lse, cnt,
            scale * LOG2E, n_kv, part, num_splits,
            q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), block_tables.stride(0),
            out.stride(0), out.stride(1), op.stride(0), op.stride(1), op.stride(2) if split else 0,
            lse.stride(0), lse.stride(1),
            BLOCK_SIZE=bs, HEAD_DIM=D, BLOCK_N=block_n, MODE=kvcache.KV_MODES.index(kv_mode), BITS=kv_bits,
            SPLIT=split, BLOCK_S=next_pow2(num_splits), PDL=pdl, ASM=asm, num_warps=num_warps,
            num_stages=num_stages, **launch_kwargs(pdl))
        return out
    elif variant != "mma":
        raise ValueError(f"decode attention variant must be 'mma' or 'fma', got {variant!r}")
    _attn_decode_kernel[(B * n_kv, num_splits)](
        q, k_cache, v_cache, block_tables, context_lens, ks, kz, vs, vz, out, op, lse, cnt,
        scale * LOG2E, n_kv, part, num_splits,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), block_tables.stride(0), s_sb, s_sh,
        out.stride(0), out.stride(1), op.stride(0), op.stride(1), op.stride(2) if split else 0,
        lse.stride(0), lse.stride(1),
        G=G, BLOCK_G=max(16, next_pow2(G)), BLOCK_SIZE=bs, HEAD_DIM=D, BLOCK_N=block_n,
        MODE=kvcache.KV_MODES.index(kv_mode), BITS=kv_bits, SPLIT=split,
        BLOCK_S=next_pow2(num_splits), PDL=pdl, ASM=asm, num_warps=num_warps, num_stages=num_stages,
        **launch_kwargs(pdl))
    return out


def kv_rows(block_table, n, block_size):
    """Where rows 0..n-1 of a sequence live in a paged cache: (block ids, offsets in the block), for `gather_kv`.
    block_table (max_blocks,) -> ((n,), (n,)); (B, max_blocks) of B sequences -> ((B, n), (n,))."""
    pos = torch.arange(n, device=block_table.device)
    return block_table[..., pos // block_size].long(), pos % block_size


def gather_kv(cache, rows):
    """The rows `kv_rows` located, from a paged cache (codes (num_blocks, n_kv, block, ...) or per-token scales
    (num_blocks, n_kv, block)) -> (n, n_kv_heads, ...), or (B, n, n_kv_heads, ...) for B sequences (rows past a
    sequence's context are whatever its table points at)."""
    blk, off = rows
    return cache[blk, :, off]


def dequant_kv(x, kv_mode, kv_bits, scale, zp):
    if kv_mode == "none":
        return x.float()
    if kv_mode == "static":
        return kvcache.kv_dequantize_static(x, scale, zp, kv_bits)
    return kvcache.kv_dequantize_dynamic(x, scale, zp, kv_bits)


def paged_decode_attention_ref(q, k_cache, v_cache, block_tables, context_lens, scale, kv_mode="none", kv_bits=16,
                               k_scale=None, k_zp=None, v_scale=None, v_zp=None, out=None, **_):
    """PyTorch reference: gather each sequence's KV, dequantize with kvcache.py, fp32 softmax."""
    kvcache.check_kv_config(kv_mode, kv_bits)
    B, H, D = q.shape
    G = H // k_cache.shape[1]
    out = torch.empty_like(q) if out is None else out
    for b, n in enumerate(context_lens.tolist()):
        rows = kv_rows(block_tables[b], n, k_cache.shape[2])
        kv = []
        for cache, s, z in ((k_cache, k_scale, k_zp), (v_cache, v_scale, v_zp)):
            x = gather_kv(cache, rows)  # (n, n_kv, D or D/2)
            if kv_mode == "dynamic":
                s, z = gather_kv(s, rows), gather_kv(z, rows)  # (n, n_kv)
            kv.append(dequant_kv(x, kv_mode, kv_bits, s, z).repeat_interleave(G, dim=1))  # (n, H, D)
        att = torch.einsum("hd,nhd->hn", q[b].float(), kv[0]) * scale
        out[b] = torch.einsum("hn,nhd->hd", att.softmax(-1), kv[1]).to(q.dtype)
    return out


def paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale, kv_mode="none", kv_bits=16,
                           k_scale=None, k_zp=None, v_scale=None, v_zp=None, out=None, max_context_len=None):
    """Decode attention over a paged KV cache; Triton where `dispatch.use_triton` says so, else the reference.

    max_context_len (optional int) bounds the context for the split heuristic; default: the block
    table's capacity, which needs no host sync (CUDA-graph safe).
    """
    args = (q, k_cache, v_cache, block_tables, context_lens, scale, kv_mode, kv_bits, k_scale, k_zp, v_scale, v_zp)
    if use_triton(q, "paged_decode_attention"):
        variant = "fma" if decode_variant() == "fma" and fma_applies(q.shape[1], k_cache.shape[1], kv_mode,
                                                                      kv_bits) else "mma"
        return _launch(*args, out=out, max_context_len=max_context_len, variant=variant)
    return paged_decode_attention_ref(*args, out=out)


def decode_variant() -> str:
    """PIPELINE_ATTN_DECODE: "fma" (default: the CUDA-core kernel where `fma_applies`, else the MMA kernel) or "mma"
    (the MMA kernel everywhere). The server's measurement decides, alternating fresh servers on the 7B: in session 16
    MMA's decode steps were 2.0-2.6% faster than fma's, which then converted its int8 KV with inline PTX; that
    conversion made both kernels slower timed alone and is now off (session 17: fma without it 11-18% faster than
    MMA in graph timing), and in session 18's A/B (H100, `bench/results/serve_ab_h100_s18.json`) fma's decode steps
    ran 3996 / 4030 tok/s against 3921 with MMA (2636.7 / 2655.7 against 2620.9 output tok/s)."""
    v = os.environ.get("PIPELINE_ATTN_DECODE", "fma")
    if v not in ("mma", "fma"):
        raise ValueError(f"PIPELINE_ATTN_DECODE={v!r} is not 'mma' or 'fma'")
    return v
