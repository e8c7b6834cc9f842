"""Fused rotary embedding + KV quantization + paged cache write, one launch for q, K and V of a step.

Usage:
    q_rot = rope_kv_write(q, k, v, positions, cos, sin, k_cache, v_cache, slot_mapping,
                          kv_mode="static", kv_bits=8, k_scale=ks, k_zp=kz, v_scale=vs, v_zp=vz)
    q_rot, k_rot = rope_kv_write(..., return_k=True)   # prefill: rotated, unquantized k for attention

Layouts:
  q             (T, n_heads, head_dim), k, v (T, n_kv_heads, head_dim), fp16/bf16, for T tokens (prefill or decode).
  positions     (T,) int32/int64, rows of the cos/sin tables.
  cos, sin      (max_pos, head_dim // 2) fp32, HF llama convention (rotate_half, non-interleaved):
                out[i] = x[i] cos[i] - x[i + D/2] sin[i], out[i + D/2] = x[i + D/2] cos[i] + x[i] sin[i].
  k/v_cache     paged caches as in attention.py / kvcache.py ((num_blocks, n_kv_heads, block_size, head_dim[//2])).
  slot_mapping  (T,) int32/int64: token t goes to block slot // block_size, row slot % block_size;
                a negative slot skips the cache write for that token (padding).
  kv params     static: (n_kv_heads,) fp32 scale/zp, read; dynamic: (num_blocks, n_kv_heads, block_size) fp32
                side tensors, written at the token's slot (kvcache.py's per-token asymmetric scale/zp).
Returns q rotated in q's dtype (and k rotated in k's dtype if return_k).

The kernel runs one program per (token, chunk of heads): all heads of a token in one program for
prefill, a few (or one) per program for a decode step's handful of tokens. head_dim is read as four quarter tiles
(half h in {0, 1}, channel parity p in {0, 1}): rotation pairs (0, p) with (1, p) and int4 packing
pairs (h, 0) with (h, 1), so neither needs a shuffle in registers.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from pipeline.kernels import kvcache
from pipeline.kernels.dispatch import cdiv, next_pow2, use_triton
from pipeline.kernels.pdl import enabled as pdl_enabled, gdc_launch, gdc_wait, launch_kwargs

PROGRAMS = 256  # aim for at least this many programs: a decode step's few tokens split their heads
RNE_MAGIC = 12582912.0  # 1.5 * 2^23: (y + M) - M rounds fp32 |y| < 2^22 half to even, like torch.round


@triton.jit
def _load4(base, rmask, j, HALF: tl.constexpr):
    # base (R, 1) row pointers -> quarter tiles (R, D/4) fp32: (half 0, even), (0, odd), (1, even), (1, odd)
    a0 = tl.load(base + 2 * j, mask=rmask, other=0.0).to(tl.float32)
    a1 = tl.load(base + 2 * j + 1, mask=rmask, other=0.0).to(tl.float32)
    b0 = tl.load(base + HALF + 2 * j, mask=rmask, other=0.0).to(tl.float32)
    b1 = tl.load(base + HALF + 2 * j + 1, mask=rmask, other=0.0).to(tl.float32)
    return a0, a1, b0, b1


@triton.jit
def _store4(base, rmask, j, a0, a1, b0, b1, HALF: tl.constexpr):
    ty = base.dtype.element_ty
    tl.store(base + 2 * j, a0.to(ty), mask=rmask)
    tl.store(base + 2 * j + 1, a1.to(ty), mask=rmask)
    tl.store(base + HALF + 2 * j, b0.to(ty), mask=rmask)
    tl.store(base + HALF + 2 * j + 1, b1.to(ty), mask=rmask)


@triton.jit
def _rotate(a0, a1, b0, b1, c0, c1, s0, s1):
    return (a0 * c0 - b0 * s0, a1 * c1 - b1 * s1, b0 * c0 + a0 * s0, b1 * c1 + a1 * s1)


@triton.jit
def _codes(x, zp, scale, LO: tl.constexpr, HI: tl.constexpr):
    y = tl.math.div_rn(x - zp, scale)
    y = tl.minimum(tl.maximum(y, LO), HI)
    return (y + 12582912.0) - 12582912.0  # round half to even


@triton.jit
def _quant_store(cbase, rmask, j, a0, a1, b0, b1, scale, zp, HALF: tl.constexpr, BITS: tl.constexpr):
    # scale, zp (R, 1); writes codes of the four quarter tiles at row pointers cbase (R, 1)
    LO: tl.constexpr = -(1 << (BITS - 1))
    HI: tl.constexpr = (1 << (BITS - 1)) - 1
    qa0 = _codes(a0, zp, scale, LO, HI)
    qa1 = _codes(a1, zp, scale, LO, HI)
    qb0 = _codes(b0, zp, scale, LO, HI)
    qb1 = _codes(b1, zp, scale, LO, HI)
    if BITS == 8:
        _store4(cbase, rmask, j, qa0.to(tl.int32), qa1.to(tl.int32), qb0.to(tl.int32), qb1.to(tl.int32), HALF)
    else:  # byte c//2 holds channels c (low nibble, even) and c + 1 (high nibble)
        lo = ((qa0 + 8).to(tl.int32) | ((qa1 + 8).to(tl.int32) << 4)).to(tl.uint8)
        hi = ((qb0 + 8).to(tl.int32) | ((qb1 + 8).to(tl.int32) << 4)).to(tl.uint8)
        tl.store(cbase + j, lo, mask=rmask)
        tl.store(cbase + HALF // 2 + j, hi, mask=rmask)


@triton.jit
def _write_kv(cbase, SC, ZC, side, rmask, hmask, heads, j, a0, a1, b0, b1,
              HALF: tl.constexpr, MODE: tl.constexpr, BITS: tl.constexpr):
    # static: SC/ZC are (n_kv_heads,) parameters; dynamic: side tensors written at `side`
    if MODE == 0:
        _store4(cbase, rmask, j, a0, a1, b0, b1, HALF)
    else:
        if MODE == 1:
            scale = tl.load(SC + heads, mask=hmask, other=1.0)
            zp = tl.load(ZC + heads, mask=hmask, other=0.0)
        else:
            mn = tl.minimum(tl.minimum(tl.min(a0, 1), tl.min(a1, 1)), tl.minimum(tl.min(b0, 1), tl.min(b1, 1)))
            mx = tl.maximum(tl.maximum(tl.max(a0, 1), tl.max(a1, 1)), tl.maximum(tl.max(b0, 1), tl.max(b1, 1)))
            scale = tl.maximum((mx - mn) / ((1 << BITS) - 1), 1e-8)
            zp = (mn + mx) * 0.5
            tl.store(SC + side, scale, mask=hmask)
            tl.store(ZC + side, zp, mask=hmask)
        _quant_store(cbase, rmask, j, a0, a1, b0, b1, scale[:, None], zp[:, None], HALF, BITS)


@triton.jit
def _rope_kv_kernel(Q, K, V, POS, COS, SIN, KC, VC, SLOT, KS, KZ, VS, VZ, QO, KO,
            s_qt, s_qh, s_kt, s_kh, s_vt, s_vh, s_cos,
            s_cb, s_ch, s_ct, s_sb, s_sh, s_qot, s_qoh, s_kot, s_koh, q_per, kv_per,
            H: tl.constexpr, HKV: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HKV: tl.constexpr,
            HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, MODE: tl.constexpr, BITS: tl.constexpr,
            WRITE_K: tl.constexpr, PDL: tl.constexpr = False):
    # grid (T, chunks): program (t, c) handles q heads c*q_per.. and KV heads c*kv_per.. of token t
    gdc_launch(PDL)
    gdc_wait(PDL)
    t = tl.program_id(0)
    c = tl.program_id(1)
    HALF: tl.constexpr = HEAD_DIM // 2
    j = tl.arange(0, HEAD_DIM // 4)[None, :]
    pos = tl.load(POS + t).to(tl.int64)
    c0 = tl.load(COS + pos * s_cos + 2 * j)
    c1 = tl.load(COS + pos * s_cos + 2 * j + 1)
    s0 = tl.load(SIN + pos * s_cos + 2 * j)
    s1 = tl.load(SIN + pos * s_cos + 2 * j + 1)

    hq = c * q_per + tl.arange(0, BLOCK_HQ)
    qm = ((tl.arange(0, BLOCK_HQ) < q_per) & (hq < H))[:, None]
    a0, a1, b0, b1 = _load4(Q + t * s_qt + hq[:, None] * s_qh, qm, j, HALF)
    a0, a1, b0, b1 = _rotate(a0, a1, b0, b1, c0, c1, s0, s1)
    _store4(QO + t * s_qot + hq[:, None] * s_qoh, qm, j, a0, a1, b0, b1, HALF)

    hk = c * kv_per + tl.arange(0, BLOCK_HKV)
    slot = tl.load(SLOT + t).to(tl.int64)
    blk = slot // BLOCK_SIZE
    row = slot % BLOCK_SIZE
    kv_in = (tl.arange(0, BLOCK_HKV) < kv_per) & (hk < HKV)  # this program's KV heads
    hm = kv_in & (hk < tl.where(slot >= 0, HKV, 0))  # heads whose cache rows are written (none for padding)
    km = hm[:, None]
    cbase = blk * s_cb + hk[:, None] * s_ch + row * s_ct  # element offset of the cache rows
    side = blk * s_sb + hk * s_sh + row
    a0, a1, b0, b1 = _load4(K + t * s_kt + hk[:, None] * s_kh, kv_in[:, None], j, HALF)
    a0, a1, b0, b1 = _rotate(a0, a1, b0, b1, c0, c1, s0, s1)
    if WRITE_K:
        _store4(KO + t * s_kot + hk[:, None] * s_koh, kv_in[:, None], j, a0, a1, b0, b1, HALF)
    _write_kv(KC + cbase, KS, KZ, side, km, hm, hk, j, a0, a1, b0, b1, HALF, MODE, BITS)
    a0, a1, b0, b1 = _load4(V + t * s_vt + hk[:, None] * s_vh, km, j, HALF)
    _write_kv(VC + cbase, VS, VZ, side, km, hm, hk, j, a0, a1, b0, b1, HALF, MODE, BITS)


def _check(q, k, v, positions, cos, sin, k_cache, v_cache, slot_mapping, kv_mode, kv_bits, params):
    kvcache.check_kv_config(kv_mode, kv_bits)
    if q.dim() != 3 or q.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"q must be (T, n_heads, head_dim) fp16/bf16, got {tuple(q.shape)} {q.dtype}")
    T, H, D = q.shape
    if D < 8 or D & (D - 1):
        raise ValueError(f"head_dim={D}: must be a power of two >= 8")
    for name, t in (("k", k), ("v", v)):
        if t.dim() != 3 or t.shape[0] != T or t.shape[2] != D or t.shape != k.shape or t.dtype != q.dtype:
            raise ValueError(f"{name} must be (T={T}, n_kv_heads, {D}) {q.dtype} like k, got {tuple(t.shape)} {t.dtype}")
    n_kv = k.shape[1]
    for name, t in (("positions", positions), ("slot_mapping", slot_mapping)):
        if t.shape != (T,) or t.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"{name} must be ({T},) int32/int64, got {tuple(t.shape)} {t.dtype}")
    for name, t in (("cos", cos), ("sin", sin)):
        if t.dim() != 2 or t.shape[1] != D // 2 or t.dtype != torch.float32 or t.stride(1) != 1:
            raise ValueError(f"{name} must be contiguous (max_pos, {D // 2}) fp32, got {tuple(t.shape)} {t.dtype}")
    want_dt = {16: q.dtype, 8: torch.int8, 4: torch.uint8}[kv_bits]
    want_dk = D // 2 if kv_bits == 4 else D
    for name, c in (("k_cache", k_cache), ("v_cache", v_cache)):
        if c.dim() != 4 or c.shape[1] != n_kv or c.shape[3] != want_dk or c.dtype != want_dt or c.shape != k_cache.shape:
            raise ValueError(f"{name} must be (num_blocks, {n_kv}, block_size, {want_dk}) {want_dt} like k_cache, "
                             f"got {tuple(c.shape)} {c.dtype}")
        if c.stride(3) != 1 or c.stride() != k_cache.stride():
            raise ValueError(f"{name} must be contiguous along head_dim with k_cache's strides, got {c.stride()}")
    side = (n_kv,) if kv_mode == "static" else tuple(k_cache.shape[:3])
    tensors = dict(k=k, v=v, positions=positions, cos=cos, sin=sin, k_cache=k_cache, v_cache=v_cache,
                   slot_mapping=slot_mapping)
    for name, t in params.items():
        if kv_mode == "none":
            continue
        if t is None or t.shape != side or t.dtype != torch.float32 or t.stride() != params["k_scale"].stride():
            got = None if t is None else (tuple(t.shape), t.dtype)
            raise ValueError(f"kv_mode={kv_mode!r}: {name} must be fp32 of shape {side} (strides like k_scale), "
                             f"got {got}")
        tensors[name] = t
    for name, t in tensors.items():
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device}, q on {q.device}")


def _launch(q, k, v, positions, cos, sin, k_cache, v_cache, slot_mapping, kv_mode="none", kv_bits=16,
            k_scale=None, k_zp=None, v_scale=None, v_zp=None, return_k=False, q_out=None, k_out=None, chunks=None):
    params = {"k_scale": k_scale, "k_zp": k_zp, "v_scale": v_scale, "v_zp": v_zp}
    _check(q, k, v, positions, cos, sin, k_cache, v_cache, slot_mapping, kv_mode, kv_bits, params)
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    T, H, D = q.shape
    n_kv = k.shape[1]
    q_out = torch.empty_like(q) if q_out is None else q_out
    k_out = (torch.empty_like(k) if k_out is None else k_out) if return_k else k
    for name, o, like in (("q_out", q_out, q), ("k_out", k_out, k)):
        if o.shape != like.shape or o.dtype != like.dtype or o.device != like.device or o.stride(-1) != 1:
            raise ValueError(f"{name} must be {tuple(like.shape)} {like.dtype}, got {tuple(o.shape)} {o.dtype}")
    ks, kz, vs, vz = (positions if t is None else t for t in (k_scale, k_zp, v_scale, v_zp))
    s_sb, s_sh = (ks.stride(0), ks.stride(1)) if kv_mode == "dynamic" else (0, 0)
    if T == 0:
        return (q_out, k_out) if return_k else q_out
    # few tokens (decode): spread each token's heads over programs so that more than one SM works; many tokens
    # (prefill): two KV heads per program and small programs (one warp per ~64-element quarter tile), so that many
    # are resident per SM: one program per token with every head (the decode shape at T = 2048) ran 10x its
    # byte floor, latency-bound at low occupancy
    many = T >= PROGRAMS
    chunks = chunks or (max(1, n_kv // 2) if many else max(1, min(n_kv, cdiv(PROGRAMS, T))))
    q_per, kv_per = cdiv(H, chunks), cdiv(n_kv, chunks)
    chunks = max(cdiv(H, q_per), cdiv(n_kv, kv_per))
    quarter = next_pow2(q_per) * D // 4  # elements of the largest quarter tile of a program
    warps = max(1, min(4, quarter // 64)) if many else 4
    pdl = pdl_enabled(q.device)
    _rope_kv_kernel[(T, chunks)](
        q, k, v, positions, cos, sin, k_cache, v_cache, slot_mapping, ks, kz, vs, vz, q_out, k_out,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), cos.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), s_sb, s_sh,
        q_out.stride(0), q_out.stride(1), k_out.stride(0), k_out.stride(1), q_per, kv_per,
        H=H, HKV=n_kv, BLOCK_HQ=next_pow2(q_per), BLOCK_HKV=next_pow2(kv_per),
        HEAD_DIM=D, BLOCK_SIZE=k_cache.shape[2], MODE=kvcache.KV_MODES.index(kv_mode), BITS=kv_bits, WRITE_K=return_k,
        PDL=pdl, num_warps=warps, **launch_kwargs(pdl))
    return (q_out, k_out) if return_k else q_out


def apply_rotary_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """x (T, heads, D) -> rotated fp32 (T, heads, D), HF rotate_half convention."""
    c = cos[positions.long()].repeat(1, 2)[:, None, :]  # (T, 1, D)
    s = sin[positions.long()].repeat(1, 2)[:, None, :]
    x1, x2 = x.float().chunk(2, dim=-1)
    return x.float() * c + torch.cat([-x2, x1], dim=-1) * s


def rope_kv_write_ref(q, k, v, positions, cos, sin, k_cache, v_cache, slot_mapping, kv_mode="none", kv_bits=16,
                      k_scale=None, k_zp=None, v_scale=None, v_zp=None, return_k=False, q_out=None, k_out=None):
    """PyTorch reference: rotate, quantize with kvcache.py, scatter into the paged caches."""
    kvcache.check_kv_config(kv_mode, kv_bits)
    q_rot, k_rot = apply_rotary_ref(q, cos, sin, positions), apply_rotary_ref(k, cos, sin, positions)
    keep = slot_mapping >= 0
    slot = slot_mapping[keep].long()
    blk, row = slot // k_cache.shape[2], slot % k_cache.shape[2]
    for cache, x, s, z in ((k_cache, k_rot, k_scale, k_zp), (v_cache, v.float(), v_scale, v_zp)):
        x = x[keep]  # (T', n_kv, D)
        if kv_mode == "none":
            cache[blk, :, row] = x.to(cache.dtype)
        elif kv_mode == "static":
            cache[blk, :, row] = kvcache.kv_quantize_static(x, s, z, kv_bits)
        else:
            codes, sc, zp = kvcache.kv_quantize_dynamic(x, kv_bits)
            cache[blk, :, row] = codes
            s[blk, :, row], z[blk, :, row] = sc, zp
    q_rot = q_rot.to(q.dtype) if q_out is None else q_out.copy_(q_rot)
    if return_k:
        return q_rot, (k_rot.to(k.dtype) if k_out is None else k_out.copy_(k_rot))
    return q_rot


def rope_kv_write(q, k, v, positions, cos, sin, k_cache, v_cache, slot_mapping, kv_mode="none", kv_bits=16,
                  k_scale=None, k_zp=None, v_scale=None, v_zp=None, return_k=False, q_out=None, k_out=None):
    """Rotate q and k, quantize k and v as configured, write them at slot_mapping; see the module doc."""
    args = (q, k, v, positions, cos, sin, k_cache, v_cache, slot_mapping, kv_mode, kv_bits, k_scale, k_zp, v_scale, v_zp)
    fn = _launch if use_triton(q, "rope_kv_write") else rope_kv_write_ref
    return fn(*args, return_k=return_k, q_out=q_out, k_out=k_out)
