"""W4A16 CUDA-core decode GEMVs (M <= 4) and the split-K finish they share with `w4a16._w4a16_kernel`.

Used through `pipeline.kernels.w4a16.w4a16_linear` (configs `fma_*` -> `_gemv_kernel`, `wide_*` ->
`_gemv_wide_kernel`); the weight layout, the PyTorch reference and the launcher live in `w4a16.py`.
Weights: qweight (K//8, N) int32, group b's int32 row b*P + p holds in nibble j the value q[n, b*g + j*P + p]
(P = g // 8); scales and zeros (K//g, N) fp16. Each program owns BLOCK_N output columns of one activation row
and a range of whole groups; with split-K, the last program of a tile to finish adds the partials in order.
"""
from __future__ import annotations

import triton
import triton.language as tl

from pipeline.kernels.pdl import gdc_launch, gdc_wait


@triton.jit
def _gemv_kernel(x_ptr, q_ptr, s_ptr, z_ptr, b_ptr, y_ptr, ws_ptr, cnt_ptr, M, N, K, stride_xm, stride_ym,
                 split_k, GROUP: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT: tl.constexpr,
                 HAS_BIAS: tl.constexpr, ACT: tl.constexpr, PDL: tl.constexpr = False):
    # CUDA-core GEMV for tiny M: grid (N tiles, split_k, M), one activation row per program.
    # Nibble -> fp32 by OR-ing into the mantissa of 2**23; (2**23 + q) - (2**23 + z) = q - z exactly.
    # Products accumulate elementwise in a (P, BLOCK_N) fp32 tile, reduced over P once at the end.
    gdc_launch(PDL)
    gdc_wait(PDL)
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    m = tl.program_id(2)
    P: tl.constexpr = GROUP // 8
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_n = tl.max_contiguous(tl.multiple_of(offs_n, BLOCK_N), BLOCK_N)
    offs_p = tl.arange(0, P)
    mask_n = offs_n < N
    g_lo, g_hi = _group_range(pid_k, K, split_k, GROUP)
    q_ptrs = q_ptr + offs_p[:, None] * N + offs_n[None, :]  # (P, BN)
    x_row = x_ptr + m * stride_xm + offs_p  # (P,)
    acc = tl.zeros((P, BLOCK_N), dtype=tl.float32)
    for g in range(g_lo, g_hi):
        q = tl.load(q_ptrs + g * P * N, mask=mask_n[None, :], other=0)  # (P, BN) int32
        s = tl.load(s_ptr + g * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        zc = tl.load(z_ptr + g * N + offs_n, mask=mask_n, other=0.0).to(tl.float32) + 8388608.0
        part = tl.zeros((P, BLOCK_N), dtype=tl.float32)
        for j in tl.static_range(8):
            xj = _load_x(x_row + g * GROUP + j * P, K, True, ACT).to(tl.float32)  # (P,)
            wj = (((q >> (4 * j)) & 0xF) | 0x4B000000).to(tl.float32, bitcast=True) - zc[None, :]
            part += xj[:, None] * wj
        acc += part * s[None, :]
    y = tl.sum(acc, axis=0)  # (BN,)
    _write_row(y, m, pid_n, pid_k, offs_n, mask_n, M, N, split_k, b_ptr, y_ptr, ws_ptr, cnt_ptr, stride_ym,
               BLOCK_N, SPLIT, HAS_BIAS)


@triton.jit
def _group_range(pid_k, K, split_k, GROUP: tl.constexpr):
    # the whole groups [g_lo, g_hi) of split pid_k when K's groups are cut into split_k near-equal ranges
    n_groups = K // GROUP
    per_split = tl.cdiv(n_groups, split_k)
    g_lo = pid_k * per_split
    return g_lo, tl.minimum(g_lo + per_split, n_groups)


@triton.jit
def _write_row(y, m, pid_n, pid_k, offs_n, mask_n, M, N, split_k, b_ptr, y_ptr, ws_ptr, cnt_ptr, stride_ym,
               BLOCK_N: tl.constexpr, SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr):
    # one activation row's BLOCK_N fp32 outputs of the CUDA-core GEMVs: + bias and store, or (split-K) this
    # split's partial through _finish_split, counted at the row's tile (m, pid_n)
    y_ptrs = y_ptr + m * stride_ym + offs_n
    if not SPLIT:
        if HAS_BIAS:
            y += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=mask_n)
    else:
        _finish_split(y[None, :], (m * N + offs_n)[None, :], mask_n[None, :], offs_n, mask_n, ws_ptr,
                      cnt_ptr + m * tl.cdiv(N, BLOCK_N) + pid_n, b_ptr, y_ptrs[None, :], pid_k, M * N, split_k,
                      HAS_BIAS)


# _dot8_h2's PTX (also the Gluon GEMV's, w4a16_gluon_gemv._dot8): $0 fp32 out; $1 the packed word; $2 fp16x2
# (1024 + z, 1024 + z); $3..$6 fp16x2 pairs (x_j / 16, x_j+4 / 16) for j = 0..3
DOT8_H2_ASM = tl.constexpr("""{
        .reg .b32 t, u, a;
        .reg .f16 lo, hi;
        .reg .f32 flo, fhi;
        lop3.b32 t, $1, 0x000f000f, 0x64006400, 0xea;
        sub.f16x2 t, t, $2;
        mul.rn.f16x2 a, t, $3;
        shr.u32 u, $1, 4;
        lop3.b32 t, u, 0x000f000f, 0x64006400, 0xea;
        sub.f16x2 t, t, $2;
        fma.rn.f16x2 a, t, $4, a;
        shr.u32 u, $1, 8;
        lop3.b32 t, u, 0x000f000f, 0x64006400, 0xea;
        sub.f16x2 t, t, $2;
        fma.rn.f16x2 a, t, $5, a;
        shr.u32 u, $1, 12;
        lop3.b32 t, u, 0x000f000f, 0x64006400, 0xea;
        sub.f16x2 t, t, $2;
        fma.rn.f16x2 a, t, $6, a;
        mov.b32 {lo, hi}, a;
        cvt.f32.f16 flo, lo;
        cvt.f32.f16 fhi, hi;
        add.f32 $0, flo, fhi;
        }""")


@triton.jit
def _dot8_h2(q, zz, x04, x15, x26, x37):
    # q int32 of 8 nibbles; zz = fp16x2 (1024 + z, 1024 + z); x_ab = fp16x2 (x_a / 16, x_b / 16) ->
    # fp32 sum_j x_j (q_j - z) / 16. Each lop3 makes nibbles i and i + 4 into the fp16 pair (1024 + q_i,
    # 1024 + q_i+4), one sub.f16x2 makes them exact q - z, one fma.f16x2 accumulates two products: about
    # 2.5 instructions per weight instead of 4 in fp32. Four products per lane are summed in fp16 (x is
    # pre-scaled by 1/16 so |sum| <= 3.75 max|x| cannot overflow), the two lanes in fp32. GPU only.
    return tl.inline_asm_elementwise(
        asm=DOT8_H2_ASM,
        constraints="=f,r,r,r,r,r,r",
        args=[q, zz, x04, x15, x26, x37], dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def _half_pair(a, b):
    # two fp16 tensors -> int32 holding the fp16x2 pair (a low, b high)
    lo = a.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    hi = b.to(tl.int16, bitcast=True).to(tl.int32) << 16
    return lo | hi


@triton.jit
def _x_pair(x_rows, da, db, K, mask, ACT: tl.constexpr, KS: tl.constexpr, P: tl.constexpr, BN: tl.constexpr):
    # planes at offsets da, db of the (KS, P) activation rows, scaled by 1/16 -> fp16x2 int32 (KS, P, BN)
    a = (_load_x(x_rows + da, K, mask, ACT).to(tl.float32) * 0.0625).to(tl.float16)
    b = (_load_x(x_rows + db, K, mask, ACT).to(tl.float32) * 0.0625).to(tl.float16)
    return tl.broadcast_to(_half_pair(a, b)[:, :, None], (KS, P, BN))


@triton.jit
def _gemv_wide_kernel(x_ptr, q_ptr, s_ptr, z_ptr, b_ptr, y_ptr, ws_ptr, cnt_ptr, M, N, K, stride_xm, stride_ym,
                      split_k, GROUP: tl.constexpr, BLOCK_N: tl.constexpr, KS: tl.constexpr, SPLIT: tl.constexpr,
                      HAS_BIAS: tl.constexpr, ACT: tl.constexpr, H2: tl.constexpr, PDL: tl.constexpr = False):
    # CUDA-core GEMV that issues all of its weight loads at once. Program t = (m * split_k + pid_k) *
    # cdiv(N, BLOCK_N) + pid_n owns KS whole groups of BLOCK_N columns for activation row m and reads them
    # as one (KS, P, BLOCK_N) int32 tile (no loop: every byte of the program is in flight together).
    # H2 (fp16 on a GPU): _dot8_h2 per int32; else nibble -> fp32 through the mantissa of 2**23.
    # PDL: the weight tile is loaded before gdc_wait, i.e. while the previous kernel is still running.
    gdc_launch(PDL)
    t = tl.program_id(0)
    tiles_n = tl.cdiv(N, BLOCK_N)
    pid_n = t % tiles_n
    pid_k = (t // tiles_n) % split_k
    m = t // (tiles_n * split_k)
    P: tl.constexpr = GROUP // 8
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_n = tl.max_contiguous(tl.multiple_of(offs_n, BLOCK_N), BLOCK_N)
    mask_n = offs_n < N
    offs_g = pid_k * KS + tl.arange(0, KS)  # (KS,)
    mask_g = offs_g < K // GROUP
    offs_p = tl.arange(0, P)
    rows = offs_g[:, None] * P + offs_p[None, :]  # (KS, P) int32 rows of qweight
    q = tl.load(q_ptr + rows[:, :, None] * N + offs_n[None, None, :],
                mask=mask_g[:, None, None] & mask_n[None, None, :], other=0)  # (KS, P, BN)
    gs = offs_g[:, None] * N + offs_n[None, :]  # (KS, BN)
    mask_s = mask_g[:, None] & mask_n[None, :]
    s = tl.load(s_ptr + gs, mask=mask_s, other=0.0).to(tl.float32)
    z = tl.load(z_ptr + gs, mask=mask_s, other=0.0).to(tl.float32)
    gdc_wait(PDL)  # x, the split workspace and y belong to the kernels before and after this one
    x_rows = x_ptr + m * stride_xm + offs_g[:, None] * GROUP + offs_p[None, :]  # (KS, P): plane 0
    mask_x = mask_g[:, None]
    if H2:
        zz = _half_pair((z + 1024.0).to(tl.float16), (z + 1024.0).to(tl.float16))  # (KS, BN)
        x04 = _x_pair(x_rows, 0, 4 * P, K, mask_x, ACT, KS, P, BLOCK_N)
        x15 = _x_pair(x_rows, P, 5 * P, K, mask_x, ACT, KS, P, BLOCK_N)
        x26 = _x_pair(x_rows, 2 * P, 6 * P, K, mask_x, ACT, KS, P, BLOCK_N)
        x37 = _x_pair(x_rows, 3 * P, 7 * P, K, mask_x, ACT, KS, P, BLOCK_N)
        d = _dot8_h2(q, tl.broadcast_to(zz[:, None, :], (KS, P, BLOCK_N)), x04, x15, x26, x37)  # (KS, P, BN)
        part = tl.sum(d, axis=1) * 16.0  # (KS, BN)
    else:
        zc = z[:, None, :] + 8388608.0
        acc = tl.zeros((KS, P, BLOCK_N), dtype=tl.float32)
        for j in tl.static_range(8):
            xj = _load_x(x_rows + j * P, K, mask_x, ACT).to(tl.float32)  # (KS, P)
            wj = (((q >> (4 * j)) & 0xF) | 0x4B000000).to(tl.float32, bitcast=True) - zc
            acc += xj[:, :, None] * wj
        part = tl.sum(acc, axis=1)  # (KS, BN)
    y = tl.sum(part * s, axis=0)  # (BN,)
    _write_row(y, m, pid_n, pid_k, offs_n, mask_n, M, N, split_k, b_ptr, y_ptr, ws_ptr, cnt_ptr, stride_ym,
               BLOCK_N, SPLIT, HAS_BIAS)


@triton.jit
def _load_x(ptrs, K, mask, ACT: tl.constexpr):
    # the activation tile; ACT: rows are [gate | up] (2K wide) and the tile is silu(gate) * up, rounded to
    # x's dtype as the separate silu_mul kernel would round it
    x = tl.load(ptrs, mask=mask, other=0.0)
    if ACT:
        u = tl.load(ptrs + K, mask=mask, other=0.0).to(tl.float32)
        g = x.to(tl.float32)
        x = (g * tl.sigmoid(g) * u).to(x.dtype)
    return x


@triton.jit
def _finish_split(acc, offs, mask, offs_n, mask_n, ws_ptr, cnt_ptr, b_ptr, y_ptrs, pid_k, MN, split_k,
                  HAS_BIAS: tl.constexpr):
    # acc, offs, mask: (rows, BLOCK_N). Split-K without a second launch: every program stores its fp32
    # partial tile to ws (split_k, M, N),
    # then counts itself in at its tile's counter; the last to arrive sums the split_k partials in split
    # order (the same sum whichever finishes last), adds the bias, writes y and re-arms the counter to 0.
    # The barriers make the counter's release/acquire cover every thread's stores/loads of the tile.
    tl.store(ws_ptr + pid_k * MN + offs, acc, mask=mask)
    tl.debug_barrier()
    arrived = tl.atomic_add(cnt_ptr, 1, sem="acq_rel")
    if arrived == split_k - 1:
        tl.debug_barrier()
        tot = tl.zeros(acc.shape, dtype=tl.float32)
        for i0 in range(0, split_k, 4):  # 4 independent loads per round trip, summed in split order
            for j in tl.static_range(4):
                live = mask & ((offs * 0 + i0 + j) < split_k)
                tot += tl.load(ws_ptr + (i0 + j) * MN + offs, mask=live, other=0.0, cache_modifier=".cg")
        if HAS_BIAS:
            b = tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
            tot += b[None, :]
        tl.store(y_ptrs, tot.to(y_ptrs.dtype.element_ty), mask=mask)
        tl.atomic_xchg(cnt_ptr, 0)
