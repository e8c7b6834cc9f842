"""W4A16 tensor-core kernel with swapped operands: y^T = dequant(W) @ x^T, the weights as the left operand.

Used through `pipeline.kernels.w4a16.w4a16_linear` (configs `swap_*`); layout, reference and launcher live in
`w4a16.py`. Why swap: in `_w4a16_kernel` the dequantized weight tile is the right-hand operand of the dot, and
on Hopper a wgmma reads that operand from shared memory only, so every dequantized fp16 tile is stored to
shared memory and read back. The left operand of a wgmma may come from registers: with the weights on the left
the dequantized tile can go straight from the unpack into the MMA, and only the small packed int32 tile (one
value per 8 weights) and the activations take the shared-memory path. The activation count M becomes the
MMA's N dimension, which may be as small as 8, so the same kernel also serves decode-sized M.
With fp16 (and fp32) activations the group's scale is folded into the dequantized weights ((q - z) is exact, so
(q - z) * s rounds once, as the reference's fp16 weight does): the dots accumulate straight into one accumulator
instead of each group's sum being scaled in fp32 (bf16 keeps that: it cannot hold an fp16 scale exactly).
Triton waits for every wgmma whose left operand is in registers before the next one, so `KW` nibble planes (of g/8
inputs each) are joined in registers into one (BN, KW * g/8) operand per dot: KW = 8 makes one wait per group.
Groups of 64 (or 32) take the same path when KW * g/8 >= 16 (the `_k8` configs): the scale folded in and one
dot per group chained into the accumulator; with KW = 1 they fall back to one reshaped dot of K = g per group
whose fp32 sum is scaled (3.4x slower for w13 at M = 32, g = 64: bench/results/decode_profile_nopdl_g64.json).
PAIRS (the `_pr` configs, fp16): the unpack above costs ~3.3 instructions a weight in the sm_90 SASS (a shift, mask
and or per nibble, then shuffles to pair neighbours along k for the MMA's fp16x2 registers), and at 16-32 rows
the loop is bound by instruction issue more than by bytes. A group's inputs may be summed in any order, so the
pair order takes nibbles s and s + 4 of a word (16 bits apart: one `lop3` makes both, already a pair) as
neighbours along k, and the activations are permuted to match in registers on their way to shared memory:
21-40% fewer loop instructions for 16-32-row tiles (tests/sm90_sass.py), more spills from 128 rows up.
NATURAL PAIRS (the `_np` configs, PAIRS = 2, fp16): neighbours along k of a nibble plane (words p and p + 1) made one
fp16 pair by `prmt` + `lop3` (`_np_plane`): the k order stays the layout's, so the activations reach the MMA as
loaded; the sm_90 main loop loses `_pairs`' permutation through shared memory, its fence and second barrier, and its
wait for every wgmma (tests/test_kernel_w4a16.py, offline SASS).
UNROLL (the `_u2` configs): the group loop unrolled before Triton pipelines it, so the cp.async ring's index
arithmetic, its barriers and the wgmma fences are paid once per UNROLL groups (sm_90, g64: 175 -> 135 loop
instructions a group for the 16 x 64 natural-pair tile); a trip count that UNROLL does not divide gets a remainder loop.
Measured: bench/results/w4a16_swap_v*.json, docs/perf-log.md "W4A16 v10".
"""
from __future__ import annotations

import triton
import triton.language as tl

from pipeline.kernels.pdl import gdc_launch, gdc_wait
from pipeline.kernels.tiles import tile_offsets
from pipeline.kernels.w4a16_gemv import _finish_split, _group_range, _load_x


@triton.jit
def _nibbles_to_qz(nib, zc, DKIND: tl.constexpr):
    # nib: int32 in 0..15; zc: zero + magic offset, fp32; returns q - z exactly in the dot dtype
    if DKIND == 1:
        w = (nib | 0x6400).to(tl.int16).to(tl.float16, bitcast=True)  # 1024 + q exactly
        w = w - zc.to(tl.float16)
    elif DKIND == 2:
        w = (nib | 0x4300).to(tl.int16).to(tl.bfloat16, bitcast=True)  # 128 + q exactly
        w = w - zc.to(tl.bfloat16)
    else:
        w = nib.to(tl.float32) - zc
    return w


@triton.jit
def _dot(a, b, acc, DKIND: tl.constexpr):
    if DKIND == 0:
        return tl.dot(a, b, acc, input_precision="ieee")
    return tl.dot(a, b, acc)


@triton.jit
def _plane(q, zc, sw, j: tl.constexpr, DKIND: tl.constexpr):
    # nibble plane j of q (BN, P): (q_j - z) * sw in the dot dtype, inputs j*P .. j*P + P - 1 of the group
    return _nibbles_to_qz((q >> (4 * j)) & 0xF, zc[:, None], DKIND) * sw


@triton.jit
def _planes(q, zc, sw, j0: tl.constexpr, KW: tl.constexpr, DKIND: tl.constexpr, NP: tl.constexpr = False,
            ASM: tl.constexpr = False):
    # planes j0 .. j0 + KW - 1 side by side, (BN, KW * P) in natural k order, built by joins whose new
    # minor dims are permuted in front of P: register moves only, no shared-memory round trip. NP: each plane
    # by natural pairs (`_np_plane`, fp16)
    BN: tl.constexpr = q.shape[0]
    P: tl.constexpr = q.shape[1]
    if NP:
        q4 = q >> 4   # the odd nibbles' words, shifted once for all four odd planes
    else:
        q4 = q
    if KW == 1:
        w = _any_plane(q, q4, zc, sw, j0, DKIND, NP, ASM)
    elif KW == 2:
        w = tl.join(_any_plane(q, q4, zc, sw, j0, DKIND, NP, ASM),
                    _any_plane(q, q4, zc, sw, j0 + 1, DKIND, NP, ASM))  # (BN, P, 2)
        w = tl.reshape(tl.permute(w, (0, 2, 1)), (BN, 2 * P))
    elif KW == 4:
        a = tl.join(_any_plane(q, q4, zc, sw, j0, DKIND, NP, ASM), _any_plane(q, q4, zc, sw, j0 + 1, DKIND, NP, ASM))
        b = tl.join(_any_plane(q, q4, zc, sw, j0 + 2, DKIND, NP, ASM),
                    _any_plane(q, q4, zc, sw, j0 + 3, DKIND, NP, ASM))
        w = tl.reshape(tl.permute(tl.join(a, b), (0, 3, 2, 1)), (BN, 4 * P))  # (BN, P, 2, 2): plane 2*d3 + d2
    else:
        a = tl.join(_any_plane(q, q4, zc, sw, j0, DKIND, NP, ASM), _any_plane(q, q4, zc, sw, j0 + 1, DKIND, NP, ASM))
        b = tl.join(_any_plane(q, q4, zc, sw, j0 + 2, DKIND, NP, ASM),
                    _any_plane(q, q4, zc, sw, j0 + 3, DKIND, NP, ASM))
        c = tl.join(_any_plane(q, q4, zc, sw, j0 + 4, DKIND, NP, ASM),
                    _any_plane(q, q4, zc, sw, j0 + 5, DKIND, NP, ASM))
        d = tl.join(_any_plane(q, q4, zc, sw, j0 + 6, DKIND, NP, ASM),
                    _any_plane(q, q4, zc, sw, j0 + 7, DKIND, NP, ASM))
        w = tl.join(tl.join(a, b), tl.join(c, d))  # (BN, P, 2, 2, 2): plane 4*d4 + 2*d3 + d2
        w = tl.reshape(tl.permute(w, (0, 4, 3, 2, 1)), (BN, 8 * P))
    return w


@triton.jit
def _any_plane(q, q4, zc, sw, j: tl.constexpr, DKIND: tl.constexpr, NP: tl.constexpr, ASM: tl.constexpr):
    if NP and ASM:
        return _np_plane(q, q4, zc, sw, j)
    return _plane(q, zc, sw, j, DKIND)   # also the interpreter's natural pairs: the same values


PAIR_ASM = tl.constexpr("lop3.b32 $0, $1, 0x000f000f, 0x64006400, 0xea;")   # $1 = $2: the word, twice


@triton.jit
def _pairs(q, zc, sw, s: tl.constexpr, ASM: tl.constexpr):
    # nibbles s and s + 4 of each word of q (BN, P) as the fp16 pairs (q_s - z, q_s+4 - z) * sw, (BN, 2P) in the
    # pair order: element 2p + b is nibble s + 4b of word p, i.e. input (s + 4b) * P + p of the group. One
    # `lop3` makes a pair (1024 + q_s, 1024 + q_s+4) straight from the shifted word (two nibbles 16 bits apart),
    # so the unpack costs one instruction per two weights and the pair stays in one register: the fp16 MMA
    # operand holds consecutive k in pairs. ASM False (the interpreter): the same values from plain Triton.
    BN: tl.constexpr = q.shape[0]
    P: tl.constexpr = q.shape[1]
    qs = q >> (4 * s)
    if ASM:
        qq = tl.reshape(tl.join(qs, qs), (BN, 2 * P))
        w = tl.inline_asm_elementwise(PAIR_ASM, "=r,r,r", [qq], dtype=tl.float16, is_pure=True, pack=2)
    else:
        nib = tl.reshape(tl.join(qs & 0xF, (qs >> 16) & 0xF), (BN, 2 * P))
        w = (nib | 0x6400).to(tl.int16).to(tl.float16, bitcast=True)
    return (w - zc.to(tl.float16)) * sw     # zc = 1024 + z and sw (BN, 1): q - z exact, times s rounded once


@triton.jit
def _pair_planes(q, zc, sw, ASM: tl.constexpr):
    # the group's 8 planes as one (BN, 8P) operand in pair order: element s * 2P + 2p + b is input (s + 4b) * P + p
    BN: tl.constexpr = q.shape[0]
    P: tl.constexpr = q.shape[1]
    a = tl.join(_pairs(q, zc, sw, 0, ASM), _pairs(q, zc, sw, 1, ASM))           # (BN, 2P, 2): slice s = d2
    b = tl.join(_pairs(q, zc, sw, 2, ASM), _pairs(q, zc, sw, 3, ASM))
    w = tl.join(a, b)                                                           # (BN, 2P, 2, 2): s = 2 * d3 + d2
    return tl.reshape(tl.permute(w, (0, 3, 2, 1)), (BN, 8 * P))


# NATURAL PAIRS (PAIRS == 2): the two neighbours along k of a plane, words p and p + 1 at the same nibble, as one fp16
# pair: `prmt` takes byte c of each word into bytes 0 and 2, `lop3` keeps their low nibbles under 0x6400 (odd nibbles:
# the words shifted by 4 first, once for all four odd planes). The group's k order stays the layout's own (plane by
# plane), so the activations go to the MMA as loaded (no permutation through shared memory, no fence, no second
# barrier a group), at ~1.1 instructions a weight for the unpack against ~1.0 for `_pairs`.
NP_ASM0 = tl.constexpr("prmt.b32 $0, $1, $2, 0x4400; lop3.b32 $0, $0, 0x000f000f, 0x64006400, 0xea;")
NP_ASM1 = tl.constexpr("prmt.b32 $0, $1, $2, 0x5511; lop3.b32 $0, $0, 0x000f000f, 0x64006400, 0xea;")
NP_ASM2 = tl.constexpr("prmt.b32 $0, $1, $2, 0x6622; lop3.b32 $0, $0, 0x000f000f, 0x64006400, 0xea;")
NP_ASM3 = tl.constexpr("prmt.b32 $0, $1, $2, 0x7733; lop3.b32 $0, $0, 0x000f000f, 0x64006400, 0xea;")


@triton.jit
def _np_plane(q, q4, zc, sw, j: tl.constexpr):
    # plane j of q (BN, P) as (q_j - z) * sw in fp16, natural order (element p = input j * P + p); q4 = q >> 4
    qs = q if j % 2 == 0 else q4
    if j // 2 == 0:
        w = tl.inline_asm_elementwise(NP_ASM0, "=r,r,r", [qs], dtype=tl.float16, is_pure=True, pack=2)
    elif j // 2 == 1:
        w = tl.inline_asm_elementwise(NP_ASM1, "=r,r,r", [qs], dtype=tl.float16, is_pure=True, pack=2)
    elif j // 2 == 2:
        w = tl.inline_asm_elementwise(NP_ASM2, "=r,r,r", [qs], dtype=tl.float16, is_pure=True, pack=2)
    else:
        w = tl.inline_asm_elementwise(NP_ASM3, "=r,r,r", [qs], dtype=tl.float16, is_pure=True, pack=2)
    return (w - zc.to(tl.float16)[:, None]) * sw


@triton.jit
def _xt_pairs(ptrs, K, mask_m, ACT: tl.constexpr):
    # the group's activations (BM, g), loaded in input order (contiguous rows), handed to the dot transposed in
    # the pair order of `_pair_planes`: (BM, 2, 4, P) [b, s, p] -> (BM, 4, P, 2) [s, p, b] -> (BM, g)
    x = _load_x(ptrs, K, mask_m[:, None], ACT)
    BM: tl.constexpr = x.shape[0]
    P: tl.constexpr = x.shape[1] // 8
    x = tl.reshape(tl.permute(tl.reshape(x, (BM, 2, 4, P)), (0, 2, 3, 1)), (BM, 8 * P))
    return tl.trans(x)


@triton.jit
def _xt(ptrs, K, mask_m, ACT: tl.constexpr):
    # an activation slice loaded row-major (BM, P), contiguous along K, and handed to the dot transposed: the
    # transpose is a shared-memory descriptor flag for the MMA, so the load can go straight to shared memory
    return tl.trans(_load_x(ptrs, K, mask_m[:, None], ACT))


@triton.jit
def _store_tile(acc, pid, pid_k, offs_m, offs_n, mask_m, mask_n, M, N, b_ptr, y_ptr, ws_ptr, cnt_ptr, stride_ym,
                split_k, SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr):
    # acc (BM, BN) fp32: + bias and store, or (split-K) this split's partial through _finish_split
    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
    mask = mask_m[:, None] & mask_n[None, :]
    if not SPLIT:
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        offs = offs_m[:, None] * N + offs_n[None, :]
        _finish_split(acc, offs, mask, offs_n, mask_n, ws_ptr, cnt_ptr + pid, b_ptr, y_ptrs, pid_k, M * N,
                      split_k, HAS_BIAS)


@triton.jit
def _w4a16_swap_kernel(x_ptr, q_ptr, s_ptr, z_ptr, b_ptr, y_ptr, ws_ptr, cnt_ptr, M, N, K, stride_xm, stride_ym,
                       split_k, GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       SPLIT: tl.constexpr, GROUP_M: tl.constexpr, DKIND: tl.constexpr, HAS_BIAS: tl.constexpr,
                       ACT: tl.constexpr, KW: tl.constexpr = 1, PDL: tl.constexpr = False,
                       PAIRS: tl.constexpr = 0, ASM: tl.constexpr = False, UNROLL: tl.constexpr = 1):
    # grid: (tiles of (M, N) in grouped order, split_k); each K step is one quantization group, whose
    # packed (P, BN) slab is read as (BN, P): row n holds the 8 nibble planes of column n's g inputs.
    gdc_launch(PDL)
    gdc_wait(PDL)
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m, offs_n, mask_m, mask_n = tile_offsets(pid, M, N, BLOCK_M, BLOCK_N, GROUP_M)
    P: tl.constexpr = GROUP // 8
    C: tl.constexpr = 1024.0 if DKIND == 1 else 128.0 if DKIND == 2 else 0.0   # _nibbles_to_qz's magic on z too
    offs_p = tl.arange(0, P)
    g_lo, g_hi = _group_range(pid_k, K, split_k, GROUP)
    q_ptrs = q_ptr + offs_p[None, :] * N + offs_n[:, None]  # (BN, P)
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)  # y^T tile
    if PAIRS == 1 and DKIND == 1:  # fp16: one dot of K = g a group, weights and activations in the pair order
        x_ptrs = x_ptr + offs_m[:, None] * stride_xm + tl.arange(0, GROUP)[None, :]  # (BM, g)
        for g in tl.range(g_lo, g_hi, loop_unroll_factor=UNROLL):
            q = tl.load(q_ptrs + g * P * N, mask=mask_n[:, None], other=0)  # (BN, P) int32
            sc = tl.load(s_ptr + g * N + offs_n, mask=mask_n, other=0.0)  # (BN,) fp16
            zc = tl.load(z_ptr + g * N + offs_n, mask=mask_n, other=0.0).to(tl.float32) + C
            xg = _xt_pairs(x_ptrs + g * GROUP, K, mask_m, ACT)  # (g, BM) in the pair order
            acc = _dot(_pair_planes(q, zc[:, None], sc[:, None], ASM), xg, acc, DKIND)
    elif KW * P >= 16:  # 8 // KW dots of K = KW * P (a wgmma's K is 16 at least), the planes side by side
        x_ptrs = x_ptr + offs_m[:, None] * stride_xm + tl.arange(0, KW * P)[None, :]  # (BM, KW*P), used transposed
        for g in tl.range(g_lo, g_hi, loop_unroll_factor=UNROLL):
            q = tl.load(q_ptrs + g * P * N, mask=mask_n[:, None], other=0)  # (BN, P) int32
            sc = tl.load(s_ptr + g * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)  # (BN,)
            zc = tl.load(z_ptr + g * N + offs_n, mask=mask_n, other=0.0).to(tl.float32) + C
            if DKIND != 2:  # fp16 / fp32: the scale folded into the weights, the dots chain into acc
                sw = sc.to(x_ptr.dtype.element_ty)[:, None]  # exact: scales are fp16
                for j in tl.static_range(8 // KW):  # one dot per KW planes (K = KW * P); PAIRS 2: natural pairs
                    xj = _xt(x_ptrs + g * GROUP + j * KW * P, K, mask_m, ACT)  # (KW * P, BM)
                    acc = _dot(_planes(q, zc, sw, j * KW, KW, DKIND, PAIRS == 2 and DKIND == 1, ASM), xj, acc, DKIND)
            else:  # bf16 cannot hold an fp16 scale exactly: scale each group's fp32 sum instead
                d = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
                for j in tl.static_range(8 // KW):
                    xj = _xt(x_ptrs + g * GROUP + j * KW * P, K, mask_m, ACT)
                    d = _dot(_planes(q, zc, 1.0, j * KW, KW, DKIND), xj, d, DKIND)
                acc += sc[:, None] * d
    else:  # KW * g/8 < 16 (g < 128, KW = 1): one dot of K = g on the unpacked tile, (BN, 8, P) -> (BN, g)
        x_ptrs = x_ptr + offs_m[:, None] * stride_xm + tl.arange(0, GROUP)[None, :]  # (BM, g)
        shifts = tl.arange(0, 8) * 4
        for g in range(g_lo, g_hi):
            q = tl.load(q_ptrs + g * P * N, mask=mask_n[:, None], other=0)
            sc = tl.load(s_ptr + g * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)
            zc = tl.load(z_ptr + g * N + offs_n, mask=mask_n, other=0.0).to(tl.float32) + C
            nib = (q[:, None, :] >> shifts[None, :, None]) & 0xF  # (BN, 8, P)
            w = tl.reshape(_nibbles_to_qz(nib, zc[:, None, None], DKIND), (BLOCK_N, GROUP))
            xt = _xt(x_ptrs + g * GROUP, K, mask_m, ACT)  # (g, BM)
            acc += sc[:, None] * _dot(w, xt, tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32), DKIND)
    _store_tile(tl.trans(acc), pid, pid_k, offs_m, offs_n, mask_m, mask_n, M, N, b_ptr, y_ptr, ws_ptr, cnt_ptr,
                stride_ym, split_k, SPLIT, HAS_BIAS)
