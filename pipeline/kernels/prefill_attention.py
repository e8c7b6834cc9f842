"""Paged prefill attention: every chunk of a prefill step against its sequence's paged KV cache, one launch.

Usage:
    plan = prefill_plan(seqs, n_heads, n_kv_heads, head_dim, n_tokens=T, device=dev)   # once per step (host)
    out = paged_prefill_attention(q, k_cache, v_cache, seqs, scale, kv_mode="static", kv_bits=8,
                                  k_scale=ks, k_zp=kz, v_scale=vs, v_zp=vz, plan=plan)   # once per layer
    prefill_plan(new_seqs, n_heads, n_kv_heads, head_dim, n_tokens=T, out=plan)   # new contents, same tensors
                                                                                  # (CUDA graph replay)

Inputs:
  q             (T, n_heads, head_dim) fp16/bf16: the step's chunks' query rows, concatenated, rotary applied;
                T may be a padded bucket (rows past the chunks are padding).
  seqs          [(offset, n, block_table (max_blocks,) int32, ctx_len)], the ModelRunner.prefill format: chunk i
                is rows offset..offset+n-1 of q (offsets concatenated in order from 0), the last n of its
                sequence's ctx_len tokens (positions ctx_len-n..ctx_len-1), whose K/V (this chunk's rows
                included, written by rope_kv_write) are in the cache. Causal: the row at position p attends to
                keys 0..p of its own sequence.
  k/v_cache, kv_mode, kv_bits, k/v_scale, k/v_zp: exactly as paged_decode_attention (attention.py):
                16-bit, int8, int4 (two per byte, low nibble = even channel), static per-KV-head or dynamic
                per-slot parameters; query head h reads KV head h // (n_heads // n_kv_heads).
  out           (T, n_heads, head_dim), q's dtype; padding rows that the plan covers (T_real..n_tokens-1)
                are written as zeros, rows past n_tokens are not written.

The plan (`PrefillPlan`, built on the host by `prefill_plan`, one int32 device buffer, one host->device copy):
  tiles   (max_tiles, 5): per query tile [chunk's sequence index, first q row, rows (<= block_q),
          position of the first row, context length]; a tile never spans two chunks. Tiles are sorted by
          the keys they read, longest first (causal prefill tiles differ up to the context length: the
          long ones start first). Padding rows of the bucket get tiles with context 0 (they write zeros);
          tiles past those have 0 rows (their programs load the row and exit: every load/store is masked).
  tables  (max_seqs, max_blocks): the chunks' block tables.
  Shapes depend only on n_tokens (the bucket) and max_seqs: max_tiles = cdiv(n_tokens, block_q) + max_seqs.
  The kernel's grid is (n_kv_heads, max_tiles) (KV heads fastest: a tile's heads run together, so the
  longest tiles of every head start first) and its key loop bounds are read from the plan, so one capture
  is valid for every plan content of that bucket (`out=` rewrites an existing plan in place).

Kernel (flash attention, online softmax in fp32, exp2): one program per (query tile, KV head). GQA is
packed into the tile's M dimension: the block_q query rows x the G = n_heads // n_kv_heads query heads of
the KV head form BLOCK_M = block_q * G dot rows (row m is query row m // G, head m % G; padded up to
BLOCK_M when G does not divide it), so each K/V block is read once per tile and KV head for the whole
group, small chunks (16 rows, G = 4) still fill 64-row dot tiles, and the causal diagonal is only block_q
positions tall. Keys below the tile's first position (visible to every row) run in an unmasked loop, the
last few blocks in a masked one. Dequantization is folded as in the decode kernel: K/V codes become fp16
with integer ops only (`_kv_tile`), the static K scale is folded into the softmax scale and its zero point
dropped (k_zp * sum(q) is the same for every key of a row: softmax ignores it), the dynamic K scale/zp are
applied per key column, the V scale/zero point to the accumulator (static) or the probabilities (dynamic);
int4 runs as even/odd channel halves. q is cast to fp16 for quantized KV (also when bf16).
Defaults: BLOCK_M 128 (8 warps) for head_dim <= 128, else 64 (4 warps); BLOCK_N 64.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from pipeline.kernels import kvcache
from pipeline.kernels.attention import LOG2E, _check, _dot_kq, _kv_tile, dequant_kv, gather_kv, kv_rows
from pipeline.kernels.dispatch import cdiv, next_pow2, use_triton
from pipeline.kernels.pdl import enabled as pdl_enabled, gdc_launch, gdc_wait, launch_kwargs

FIELDS = 5  # tile row: seq, row0, n_rows, pos0, ctx
BLOCK_N = 64


@triton.jit
def _block(q0, q1, qsum, qpos, m_i, l_i, acc0, acc1, accz, n0, end, K, V, KS, KZ, VS, VZ, bt, kvh, qk_scale,
           s_kb, s_kh, s_kt, s_vb, s_vh, s_vt, s_sb, s_sh,
           BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr, DK: tl.constexpr, MODE: tl.constexpr,
           BITS: tl.constexpr, OFF64: tl.constexpr, MASK: tl.constexpr):
    """One block of BLOCK_N keys n0.. into the online softmax; MASK: causal + context-end masking."""
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, DK)
    nmask = offs_n < end
    # 64-bit offsets cost registers (the loop spilled with them): 32-bit ones unless a cache is too large (OFF64)
    if BLOCK_SIZE % BLOCK_N == 0:  # the keys lie in one paged block: one table entry, contiguous rows
        blk = tl.load(bt + n0 // BLOCK_SIZE)
        row = n0 % BLOCK_SIZE + tl.arange(0, BLOCK_N)
    else:
        if MASK:
            blk = tl.load(bt + offs_n // BLOCK_SIZE, mask=nmask, other=0)
        else:
            blk = tl.load(bt + offs_n // BLOCK_SIZE)
        row = offs_n % BLOCK_SIZE
    if OFF64:
        blk = blk.to(tl.int64)
    k_ptr = K + (blk * s_kb + kvh * s_kh + row * s_kt)[:, None] + offs_d[None, :]
    v_ptr = V + (blk * s_vb + kvh * s_vh + row * s_vt)[:, None] + offs_d[None, :]
    if MASK:
        kt = tl.load(k_ptr, mask=nmask[:, None], other=0)
        vt = tl.load(v_ptr, mask=nmask[:, None], other=0)
    else:
        kt = tl.load(k_ptr)
        vt = tl.load(v_ptr)
    if BITS == 4:
        s = _dot_kq(q0, _kv_tile(kt, BITS, False)) + _dot_kq(q1, _kv_tile(kt, BITS, True))
    else:
        s = _dot_kq(q0, _kv_tile(kt, BITS, False))
    if MODE == 2:
        side = blk * s_sb + kvh * s_sh + row
        if MASK:
            ks_n = tl.load(KS + side, mask=nmask, other=0.0)
            kz_n = tl.load(KZ + side, mask=nmask, other=0.0)
            vs_n = tl.load(VS + side, mask=nmask, other=0.0)
            vz_n = tl.load(VZ + side, mask=nmask, other=0.0)
        else:
            ks_n = tl.load(KS + side)
            kz_n = tl.load(KZ + side)
            vs_n = tl.load(VS + side)
            vz_n = tl.load(VZ + side)
        s = s * (ks_n * qk_scale)[None, :] + qsum[:, None] * kz_n[None, :]
    else:
        s = s * qk_scale
    if MASK:
        s = tl.where((offs_n[None, :] <= qpos[:, None]) & nmask[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    if MODE == 2:
        accz = accz * alpha + tl.sum(p * vz_n[None, :], 1)
        p = p * vs_n[None, :]
    pv = p.to(q0.dtype)
    acc0 = acc0 * alpha[:, None] + tl.dot(pv, _kv_tile(vt, BITS, False))
    if BITS == 4:
        acc1 = acc1 * alpha[:, None] + tl.dot(pv, _kv_tile(vt, BITS, True))
    return m_new, l_i, acc0, acc1, accz


@triton.jit
def _kernel(Q, K, V, TILES, BT, KS, KZ, VS, VZ, O, qk_scale,
            s_qt, s_qh, s_kb, s_kh, s_kt, s_vb, s_vh, s_vt, s_bt, s_sb, s_sh, s_ot, s_oh,
            G: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr,
            HEAD_DIM: tl.constexpr, MODE: tl.constexpr, BITS: tl.constexpr, OFF64: tl.constexpr = False,
            PDL: tl.constexpr = False):
    gdc_launch(PDL)
    gdc_wait(PDL)
    kvh = tl.program_id(0)   # fastest: the KV heads of a tile run together (heavy tiles first, all heads)
    tile = tl.program_id(1)
    t = TILES + tile * 5
    seq = tl.load(t)
    row0 = tl.load(t + 1)
    nrows = tl.load(t + 2)
    pos0 = tl.load(t + 3)
    ctx = tl.load(t + 4)
    end = tl.minimum(pos0 + nrows, ctx)                         # keys 0..end-1 are read
    full = tl.minimum((pos0 + 1) // BLOCK_N * BLOCK_N, end)     # keys every row sees: no mask
    bt = BT + seq * s_bt

    PACK: tl.constexpr = 2 if BITS == 4 else 1
    DK: tl.constexpr = HEAD_DIM // PACK  # stored elements per token row
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, DK)
    r = offs_m // G                       # query row in the tile
    rmask = r < nrows
    qpos = pos0 + r
    head = kvh * G + offs_m % G
    q_ptr = Q + ((row0 + r).to(tl.int64) * s_qt + head * s_qh)[:, None] + offs_d[None, :] * PACK
    q0 = tl.load(q_ptr, mask=rmask[:, None], other=0.0)  # (BLOCK_M, DK): all channels, or the even ones
    if BITS != 16:
        q0 = q0.to(tl.float16)
    q1 = q0
    if BITS == 4:
        q1 = tl.load(q_ptr + 1, mask=rmask[:, None], other=0.0).to(tl.float16)  # odd channels
    if MODE == 1:  # static: per-head scalars; the K scale joins the softmax scale
        qk_scale = qk_scale * tl.load(KS + kvh)
    qsum = tl.zeros([BLOCK_M], tl.float32)  # dynamic: sum(q) * softmax scale, times each key's zero point
    if MODE == 2:
        qsum = tl.sum(q0.to(tl.float32), 1)
        if BITS == 4:
            qsum += tl.sum(q1.to(tl.float32), 1)
        qsum = qsum * qk_scale

    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc0 = tl.zeros([BLOCK_M, DK], tl.float32)
    if BITS == 4:
        acc1 = tl.zeros([BLOCK_M, DK], tl.float32)  # odd channels
    else:
        acc1 = tl.zeros([1, 1], tl.float32)  # unused
    accz = tl.zeros([BLOCK_M], tl.float32)      # sum p * v_zp (dynamic only)
    for n0 in range(0, full, BLOCK_N):
        m_i, l_i, acc0, acc1, accz = _block(
            q0, q1, qsum, qpos, m_i, l_i, acc0, acc1, accz, n0, end, K, V, KS, KZ, VS, VZ, bt, kvh, qk_scale,
            s_kb, s_kh, s_kt, s_vb, s_vh, s_vt, s_sb, s_sh, BLOCK_N, BLOCK_SIZE, DK, MODE, BITS, OFF64, False)
    for n0 in range(full, end, BLOCK_N):
        m_i, l_i, acc0, acc1, accz = _block(
            q0, q1, qsum, qpos, m_i, l_i, acc0, acc1, accz, n0, end, K, V, KS, KZ, VS, VZ, bt, kvh, qk_scale,
            s_kb, s_kh, s_kt, s_vb, s_vh, s_vt, s_sb, s_sh, BLOCK_N, BLOCK_SIZE, DK, MODE, BITS, OFF64, True)

    # out = acc * a + b per row; padding tiles (no keys: l = 0) output 0
    inv_l = 1.0 / tl.maximum(l_i, 1e-30)
    a = inv_l
    b = tl.zeros([BLOCK_M], tl.float32)
    if MODE == 1:
        a = inv_l * tl.load(VS + kvh)
        b = tl.where(l_i > 0, tl.load(VZ + kvh), 0.0)
    if MODE == 2:
        b = accz * inv_l
    o_ptr = O + ((row0 + r).to(tl.int64) * s_ot + head * s_oh)[:, None] + offs_d[None, :] * PACK
    tl.store(o_ptr, (acc0 * a[:, None] + b[:, None]).to(O.dtype.element_ty), mask=rmask[:, None])
    if BITS == 4:
        tl.store(o_ptr + 1, (acc1 * a[:, None] + b[:, None]).to(O.dtype.element_ty), mask=rmask[:, None])


# ---------------------------------------------------------------------------------------------- plan


def tile_config(n_heads: int, n_kv_heads: int, head_dim: int, block_m: int | None = None) -> tuple[int, int]:
    """(BLOCK_M dot rows, query rows per tile) for this head layout: block_q = BLOCK_M // G rows x G heads."""
    G = n_heads // n_kv_heads
    block_m = block_m or (128 if head_dim <= 128 else 64)
    block_m = max(block_m, next_pow2(G))
    return block_m, block_m // G


@dataclass
class PrefillPlan:
    """Device-side tiling of a prefill step (see the module doc); `buf` holds tiles then tables."""
    buf: torch.Tensor      # int32, one host->device copy per step
    tiles: torch.Tensor    # (max_tiles, 5) int32 view of buf
    tables: torch.Tensor   # (max_seqs, max_blocks) int32 view of buf
    block_m: int           # the kernel's BLOCK_M (dot rows)
    block_q: int           # query rows per tile
    n_tokens: int          # query rows the plan addresses (the bucket)


def _plan_views(buf, max_tiles, max_seqs, max_blocks, block_m, block_q, n_tokens) -> PrefillPlan:
    at = cdiv(max_tiles * FIELDS, 4) * 4  # tables 16-byte aligned
    return PrefillPlan(buf, buf[:max_tiles * FIELDS].view(max_tiles, FIELDS),
                       buf[at:at + max_seqs * max_blocks].view(max_seqs, max_blocks), block_m, block_q, n_tokens)


def prefill_plan(seqs, n_heads: int, n_kv_heads: int, head_dim: int, *, n_tokens: int | None = None,
                 max_seqs: int | None = None, block_size: int | None = None, block_m: int | None = None,
                 device=None, out: PrefillPlan | None = None) -> PrefillPlan:
    """The tiles and block tables of a prefill step's chunks `seqs` ([(offset, n, block_table, ctx_len)]).

    n_tokens: the bucket (rows of q; default: the chunks' rows); max_seqs: the chunks a plan of this shape can
    hold (default: len(seqs)); block_size: the cache's, to check that every context fits its block table;
    block_m: the kernel's dot rows (default `tile_config`'s); device: where the plan lives (default: the first
    block table's device). out: an existing plan (same n_tokens, max_seqs, block
    tables' length and head layout) whose tensors are rewritten in place, for a captured CUDA graph's replay.
    """
    if not seqs:
        raise ValueError("prefill_plan needs at least one chunk")
    t_real = sum(n for _, n, _, _ in seqs)
    n_tokens = t_real if n_tokens is None else n_tokens
    max_seqs = len(seqs) if max_seqs is None else max_seqs
    max_blocks = seqs[0][2].shape[-1]
    block_m, block_q = tile_config(n_heads, n_kv_heads, head_dim, block_m)
    if len(seqs) > max_seqs or t_real > n_tokens:
        raise ValueError(f"{len(seqs)} chunks of {t_real} rows do not fit a plan for {max_seqs} chunks of "
                         f"{n_tokens} rows")
    tiles, off0 = [], 0
    for i, (off, n, bt, ctx) in enumerate(seqs):
        if off != off0 or not 1 <= n <= ctx <= max_blocks * (block_size or ctx) or bt.shape != (max_blocks,):
            raise ValueError(f"chunk {i} (offset {off}, n {n}, ctx {ctx}, table {tuple(bt.shape)}): chunks must be "
                             f"concatenated in order from row 0 (expected offset {off0}), 1 <= n <= ctx <= the "
                             f"table's capacity, and share the block tables' length {max_blocks}")
        off0 += n
        tiles += [(ctx - n + j + min(block_q, n - j), i, off + j, min(block_q, n - j), ctx - n + j, ctx)
                  for j in range(0, n, block_q)]
    tiles.sort(key=lambda x: -x[0])  # most keys first
    tiles += [(0, 0, r, min(block_q, n_tokens - r), 0, 0) for r in range(t_real, n_tokens, block_q)]  # zeros
    shape = (cdiv(n_tokens, block_q) + max_seqs, max_seqs, max_blocks, block_m, block_q, n_tokens)
    host = _plan_views(torch.zeros(cdiv(shape[0] * FIELDS, 4) * 4 + max_seqs * max_blocks, dtype=torch.int32),
                       *shape)
    host.tiles[:len(tiles)] = torch.tensor([x[1:] for x in tiles], dtype=torch.int32)
    host.tables[:len(seqs)] = torch.stack([bt for _, _, bt, _ in seqs])
    if out is None:
        dev = seqs[0][2].device if device is None else device
        return _plan_views(host.buf.to(dev, non_blocking=True), *shape)
    have = (out.n_tokens, out.block_m, tuple(out.tiles.shape), tuple(out.tables.shape))
    want = (n_tokens, block_m, tuple(host.tiles.shape), tuple(host.tables.shape))
    if have != want:
        raise ValueError(f"out: a plan of (n_tokens, block_m, tiles, tables) {have}; this step needs {want} "
                         "(same n_tokens, max_seqs, block tables' length and heads)")
    out.buf.copy_(host.buf, non_blocking=True)
    return out


def _plan_chunks(plan: PrefillPlan):
    """seqs back from a plan (host sync; for the reference): [(offset, n, block_table, ctx_len)]."""
    chunks = {}
    for seq, row0, n, pos0, ctx in plan.tiles.tolist():
        if n and ctx:
            off, m, _ = chunks.get(seq, (row0, 0, ctx))
            chunks[seq] = (min(off, row0), m + n, ctx)
    return [(off, n, plan.tables[s], ctx) for s, (off, n, ctx) in sorted(chunks.items())]


# ---------------------------------------------------------------------------------------------- launch


def _launch(q, k_cache, v_cache, seqs, scale, kv_mode="none", kv_bits=16, k_scale=None, k_zp=None, v_scale=None,
            v_zp=None, plan=None, out=None, block_m=None, block_n=BLOCK_N, num_warps=None, num_stages=None):
    H, D = q.shape[1], q.shape[2]
    n_kv, bs = k_cache.shape[1], k_cache.shape[2]
    if plan is None:
        plan = prefill_plan(seqs, H, n_kv, D, n_tokens=q.shape[0], block_size=bs, block_m=block_m, device=q.device)
    # the decode launcher's checks of q, caches and KV parameters, on one row (same rules)
    params = {"k_scale": k_scale, "k_zp": k_zp, "v_scale": v_scale, "v_zp": v_zp}
    _check(q[:1], k_cache, v_cache, plan.tables[:1], plan.tiles[:1, 4], kv_mode, kv_bits, params)
    if tile_config(H, n_kv, D, plan.block_m) != (plan.block_m, plan.block_q) or plan.n_tokens > q.shape[0]:
        raise ValueError(f"plan (block_m {plan.block_m}, block_q {plan.block_q}, n_tokens {plan.n_tokens}) was not "
                         f"built for q {tuple(q.shape)} with {n_kv} KV heads")
    if q.stride(-1) != 1:
        q = q.contiguous()
    if out is None:
        out = torch.empty_like(q)
    elif out.shape != q.shape or out.dtype != q.dtype or out.device != q.device or out.stride(-1) != 1:
        raise ValueError(f"out must be like q {tuple(q.shape)} {q.dtype}, got {tuple(out.shape)} {out.dtype}")
    dummy = plan.buf
    ks, kz, vs, vz = (dummy if t is None else t for t in (k_scale, k_zp, v_scale, v_zp))
    s_sb, s_sh = (ks.stride(0), ks.stride(1)) if kv_mode == "dynamic" else (0, 0)
    pdl = pdl_enabled(q.device)
    _kernel[(n_kv, plan.tiles.shape[0])](
        q, k_cache, v_cache, plan.tiles, plan.tables, ks, kz, vs, vz, out, scale * LOG2E,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), plan.tables.stride(0), s_sb, s_sh,
        out.stride(0), out.stride(1),
        G=H // n_kv, BLOCK_M=plan.block_m, BLOCK_N=block_n, BLOCK_SIZE=bs, HEAD_DIM=D,
        MODE=kvcache.KV_MODES.index(kv_mode), BITS=kv_bits, OFF64=max(k_cache.numel(), ks.numel()) >= 2 ** 31,
        PDL=pdl,
        num_warps=num_warps or (8 if plan.block_m >= 128 else 4), num_stages=num_stages or 2,
        **launch_kwargs(pdl))
    return out


def paged_prefill_attention_ref(q, k_cache, v_cache, seqs, scale, kv_mode="none", kv_bits=16, k_scale=None,
                                k_zp=None, v_scale=None, v_zp=None, plan=None, out=None, **_):
    """PyTorch reference: per chunk, gather its sequence's KV, dequantize with kvcache.py, fp32 causal SDPA.
    seqs None: the chunks are read back from `plan` (a host sync). Rows past the chunks up to the plan's
    n_tokens (default: all of q's) are zeroed, as the kernel does."""
    kvcache.check_kv_config(kv_mode, kv_bits)
    if seqs is None:
        seqs = _plan_chunks(plan)
    G = q.shape[1] // k_cache.shape[1]
    out = torch.empty_like(q) if out is None else out
    for off, n, bt, ctx in seqs:
        rows = kv_rows(bt.to(q.device), ctx, k_cache.shape[2])
        kv = []
        for cache, s, z in ((k_cache, k_scale, k_zp), (v_cache, v_scale, v_zp)):
            x = gather_kv(cache, rows)  # (ctx, n_kv, D or D/2)
            if kv_mode == "dynamic":
                s, z = gather_kv(s, rows), gather_kv(z, rows)  # (ctx, n_kv)
            kv.append(dequant_kv(x, kv_mode, kv_bits, s, z).transpose(0, 1).repeat_interleave(G, 0))  # (H, ctx, D)
        mask = torch.arange(ctx, device=q.device)[None, :] <= (ctx - n + torch.arange(n, device=q.device))[:, None]
        o = F.scaled_dot_product_attention(q[off:off + n].float().transpose(0, 1), *kv, attn_mask=mask, scale=scale)
        out[off:off + n] = o.transpose(0, 1).to(q.dtype)
    t_real = sum(n for _, n, _, _ in seqs)
    out[t_real:q.shape[0] if plan is None else plan.n_tokens] = 0
    return out


def paged_prefill_attention(q, k_cache, v_cache, seqs, scale, kv_mode="none", kv_bits=16, k_scale=None, k_zp=None,
                            v_scale=None, v_zp=None, plan=None, out=None):
    """Prefill attention of a step's chunks over a paged KV cache; Triton where `dispatch.use_triton` says so,
    else the reference. plan: from `prefill_plan` (built here from seqs when None; seqs may be None when given)."""
    args = (q, k_cache, v_cache, seqs, scale, kv_mode, kv_bits, k_scale, k_zp, v_scale, v_zp)
    if use_triton(q, "paged_prefill_attention"):
        return _launch(*args, plan=plan, out=out)
    return paged_prefill_attention_ref(*args, plan=plan, out=out)
