"""W4A16 decode GEMM, persistent and stream-K: the swapped-operand tile (`w4a16_swap.py`) in a fixed grid of programs,
each streaming one contiguous run of (tile, quantization group) steps.

Used through `pipeline.kernels.w4a16.w4a16_linear` (configs `swapk_*`); reference: `w4a16.w4a16_linear_ref`.

Why: the decode kernels' times fit `fixed + bytes / rate` per config over the four Llama-7B shapes (session 21's
tuning times at M = 16, residuals under 2.5 us): split-K configs with few programs an SM (c4) pay ~9 us fixed but
stream at ~1.5 TB/s; more programs or wider tiles stream at 2.0-2.5 TB/s but pay 12-23 us fixed (their ramps and
split-K finishes, or a second wave where shared memory does not hold them all). A 4096 x 12288 linear's int4 bytes
take ~9 us at 3 TB/s, so the fixed part is most of a decode call. Here the grid is the SMs times CTAS programs
(one wave), every program's run has the same length (total steps / programs, within one), its cp.async ring streams
across tile boundaries without draining, and only the tiles cut between two (or a few) programs take the split-K
finish: one partial each, summed by the last to arrive in program order (deterministic, as `_finish_split`, whose
loop over the parts is unrolled to MAX_PARTS). A run's middle tiles are whole; only the tiles at its two ends can be
cut, so the main loop stores those parts and the arrival and sum come after it: a barrier in the loop (the part's
stores before the arrival) kept Triton 3.6 from pipelining the loop (no cp.async ring in the sm_90 SASS).

Iterations: tile t = it // G (G = K / g groups), group it % G; tiles are (M tiles) x (N tiles) with the M index
fastest, so consecutive tiles share weights. Program p owns [p * T // P, (p + 1) * T // P) of T = tiles * G; the
owner of step i is ((i + 1) * P - 1) // T (tests check both against a brute-force count); tile t's parts are the
programs owning its first and last step and those between (`max_parts` bounds them for the workspace).
Per group the tile's math is the swap kernel's: the `_pr` pair unpack (PAIRS 1) or KW nibble planes a dot (KW * g/8
>= 16, plain or natural pairs), the scale folded into fp16/fp32 weights, bf16 scaling each group's fp32 sum.
"""
from __future__ import annotations

import triton
import triton.language as tl

from pipeline.kernels.pdl import gdc_launch, gdc_wait
from pipeline.kernels.w4a16_swap import _dot, _pair_planes, _planes, _xt, _xt_pairs


def programs(tiles: int, n_groups: int, n_sm: int, ctas: int) -> int:
    """Programs of a stream-K launch: ctas an SM, but never fewer than 2 steps each."""
    return max(1, min(n_sm * ctas, tiles * n_groups // 2))


def max_parts(tiles: int, n_groups: int, n_progs: int) -> int:
    """An upper bound on the programs that share one tile (its workspace slots): a tile's G steps meet at most
    (G - 1) // L + 2 runs of at least L = T // P steps."""
    return min(n_progs, (n_groups - 1) // max(1, tiles * n_groups // n_progs) + 2)


def plan(tiles: int, n_groups: int, n_sm: int, ctas: int) -> tuple[int, int]:
    """(programs, workspace parts) of a stream-K launch; ValueError where its int32 step arithmetic would overflow."""
    progs = programs(tiles, n_groups, n_sm, ctas)
    if (progs + 1) * tiles * n_groups >= 2 ** 31:
        raise ValueError(f"stream-K W4A16: {tiles} tiles x {n_groups} groups x {progs} programs overflow int32")
    return progs, max_parts(tiles, n_groups, progs)


def owner(i: int, total: int, n_progs: int) -> int:
    """The program whose run holds step i (host mirror of the kernel's arithmetic, for tests)."""
    return ((i + 1) * n_progs - 1) // total


@triton.jit
def _group_step(acc, q_ptr, s_ptr, z_ptr, x_ptr, g, pid_m, pid_n, q_rel, x_rel, ar_n, mask_m, mask_n, N, K, stride_xm,
                C: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DKIND: tl.constexpr,
                ACT: tl.constexpr, KW: tl.constexpr, PAIRS: tl.constexpr, ASM: tl.constexpr):
    # acc (BN, BM) += dequant(W[tile's columns, group g]) @ x[tile's rows, group g]^T, as the swap kernel's group
    P: tl.constexpr = GROUP // 8
    q = tl.load(q_ptr + (g * P * N + pid_n * BLOCK_N) + q_rel, mask=mask_n[:, None], other=0)
    sc = tl.load(s_ptr + (g * N + pid_n * BLOCK_N) + ar_n, mask=mask_n, other=0.0)   # (BN,) fp16
    zc = tl.load(z_ptr + (g * N + pid_n * BLOCK_N) + ar_n, mask=mask_n, other=0.0).to(tl.float32) + C
    x_ptrs = x_ptr + (pid_m * BLOCK_M * stride_xm + g * GROUP) + x_rel                # (BM, KX)
    if PAIRS == 1 and DKIND == 1:
        acc = _dot(_pair_planes(q, zc[:, None], sc[:, None], ASM), _xt_pairs(x_ptrs, K, mask_m, ACT), acc, DKIND)
    elif DKIND != 2:   # the scale folded into the weights, the dots chained into acc
        sw = sc.to(x_ptr.dtype.element_ty)[:, None]
        for j in tl.static_range(8 // KW):
            xj = _xt(x_ptrs + j * KW * P, K, mask_m, ACT)   # (KW * P, BM)
            acc = _dot(_planes(q, zc, sw, j * KW, KW, DKIND, PAIRS == 2 and DKIND == 1, ASM), xj, acc, DKIND)
    else:              # bf16: each group's fp32 sum scaled
        d = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        for j in tl.static_range(8 // KW):
            d = _dot(_planes(q, zc, 1.0, j * KW, KW, DKIND), _xt(x_ptrs + j * KW * P, K, mask_m, ACT), d, DKIND)
        acc += sc.to(tl.float32)[:, None] * d
    return acc


@triton.jit
def _store_part(acc, t, pid, G, total, n_progs, offs_m, offs_n, mask_m, mask_n, M, N, stride_ym, b_ptr, y_ptr,
                ws_ptr, HAS_BIAS: tl.constexpr):
    # this run's part of tile t: the tile itself (+ bias) when the run holds all of it, else its fp32 part, which
    # the tile's last run to arrive sums after the loops (`_finish_cut`)
    first, n_parts = _parts(t, G, total, n_progs)
    out = tl.trans(acc)                                   # (BM, BN)
    mask = mask_m[:, None] & mask_n[None, :]
    if n_parts == 1:
        if HAS_BIAS:
            out += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], out.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(ws_ptr + (pid - first) * M * N + offs_m[:, None] * N + offs_n[None, :], out, mask=mask)


@triton.jit
def _w4a16_swapk_kernel(x_ptr, q_ptr, s_ptr, z_ptr, b_ptr, y_ptr, ws_ptr, cnt_ptr, M, N, K, stride_xm, stride_ym,
                        n_progs, MAX_PARTS: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr, DKIND: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr,
                        KW: tl.constexpr = 8, PDL: tl.constexpr = False, PAIRS: tl.constexpr = 0,
                        ASM: tl.constexpr = False, NESTED: tl.constexpr = False):
    # grid (n_progs,): program p runs steps [p * T // P, (p + 1) * T // P) of T = tiles * G (module doc). NESTED: a loop
    # over the run's tiles around a pipelined loop over each one's groups (the ring drains at a tile end, but the
    # accumulator is not read inside the pipelined loop, so its wgmmas are not each waited for); else one loop over
    # the run's steps, the ring streaming across tile ends
    gdc_launch(PDL)
    gdc_wait(PDL)
    pid = tl.program_id(0)
    P: tl.constexpr = GROUP // 8
    C: tl.constexpr = 1024.0 if DKIND == 1 else 128.0 if DKIND == 2 else 0.0   # _nibbles_to_qz's magic on z too
    G = K // GROUP
    n_m = tl.cdiv(M, BLOCK_M)
    total = n_m * tl.cdiv(N, BLOCK_N) * G
    it_lo = pid * total // n_progs   # int32, as `_parts`
    it_hi = (pid + 1) * total // n_progs
    offs_p = tl.arange(0, P)
    if PAIRS == 1 and DKIND == 1:
        KX: tl.constexpr = GROUP      # one dot of K = g a group, activations in the pair order
    else:
        KX: tl.constexpr = KW * P     # one dot of K = KW * g/8 per KW nibble planes
    # addresses as a step's scalar offset plus these loop-invariant tensors (recomputed from the tile's offsets, they
    # cost ~40 more instructions a step in the sm_90 SASS)
    ar_m = tl.arange(0, BLOCK_M)
    ar_n = tl.arange(0, BLOCK_N)
    q_rel = offs_p[None, :] * N + ar_n[:, None]                                          # (BN, P)
    x_rel = ar_m[:, None] * stride_xm + tl.arange(0, KX)[None, :]                         # (BM, KX)
    t_a = it_lo // G
    t_b = (it_hi - 1) // G
    if NESTED:
        for t in range(t_a, t_b + 1):
            pid_n = t // n_m
            pid_m = t - pid_n * n_m
            offs_m = pid_m * BLOCK_M + ar_m
            offs_n = pid_n * BLOCK_N + ar_n
            mask_m = offs_m < M
            mask_n = offs_n < N
            acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)  # y^T tile
            for g in tl.range(tl.maximum(it_lo - t * G, 0), tl.minimum(it_hi - t * G, G)):
                acc = _group_step(acc, q_ptr, s_ptr, z_ptr, x_ptr, g, pid_m, pid_n, q_rel, x_rel, ar_n, mask_m,
                                  mask_n, N, K, stride_xm, C, GROUP, BLOCK_M, BLOCK_N, DKIND, ACT, KW, PAIRS, ASM)
            _store_part(acc, t, pid, G, total, n_progs, offs_m, offs_n, mask_m, mask_n, M, N, stride_ym, b_ptr, y_ptr,
                        ws_ptr, HAS_BIAS)
    else:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)  # y^T tile
        # the step's tile t = (pid_n, pid_m) and group g, stepped along instead of divided out at every step (an
        # integer division by a runtime value is ~20 instructions in the sm_90 SASS)
        t = t_a
        g = it_lo - t * G
        pid_n = t // n_m
        pid_m = t - pid_n * n_m
        for it in tl.range(it_lo, it_hi):
            offs_m = pid_m * BLOCK_M + ar_m
            offs_n = pid_n * BLOCK_N + ar_n
            mask_m = offs_m < M
            mask_n = offs_n < N
            acc = _group_step(acc, q_ptr, s_ptr, z_ptr, x_ptr, g, pid_m, pid_n, q_rel, x_rel, ar_n, mask_m, mask_n, N,
                              K, stride_xm, C, GROUP, BLOCK_M, BLOCK_N, DKIND, ACT, KW, PAIRS, ASM)
            if (g == G - 1) | (it == it_hi - 1):   # this program's part of tile t ends here
                _store_part(acc, t, pid, G, total, n_progs, offs_m, offs_n, mask_m, mask_n, M, N, stride_ym, b_ptr,
                            y_ptr, ws_ptr, HAS_BIAS)
                acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
            t, g, pid_m, pid_n = _next(t, g, pid_m, pid_n, G, n_m)
    # Only the tiles at a run's two ends can be cut between runs. Their finish waits for the loops' end: a barrier
    # inside the pipelined loop (the part's stores before the arrival) would keep Triton from pipelining it.
    tl.debug_barrier()
    _finish_cut(t_a, pid, G, total, n_progs, M, N, stride_ym, b_ptr, y_ptr, ws_ptr, cnt_ptr, MAX_PARTS, BLOCK_M,
                BLOCK_N, HAS_BIAS)
    if t_b != t_a:
        _finish_cut(t_b, pid, G, total, n_progs, M, N, stride_ym, b_ptr, y_ptr, ws_ptr, cnt_ptr, MAX_PARTS, BLOCK_M,
                    BLOCK_N, HAS_BIAS)


@triton.jit
def _next(t, g, pid_m, pid_n, G, n_m):
    # the step after (t, g): the next group, or the next tile's first (M tile fastest); `w4a16_gluon_sk` has the same
    # in Gluon (a Gluon kernel cannot call this), tests run both on host ints
    g += 1
    wrap = g == G
    g = tl.where(wrap, 0, g)
    t += wrap.to(tl.int32)
    pid_m += wrap.to(tl.int32)
    row_wrap = pid_m == n_m
    return t, g, tl.where(row_wrap, 0, pid_m), pid_n + row_wrap.to(tl.int32)


@triton.jit
def _parts(t, G, total, n_progs):
    # (first run, number of runs) of tile t: the owners of its first and last steps and those between
    first = ((t * G + 1) * n_progs - 1) // total   # int32: the launcher checks that n_progs * total fits
    return first, ((t * G + G) * n_progs - 1) // total - first + 1


@triton.jit
def _finish_cut(t, pid, G, total, n_progs, M, N, stride_ym, b_ptr, y_ptr, ws_ptr, cnt_ptr, MAX_PARTS: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_BIAS: tl.constexpr):
    # tile t cut between runs (else nothing to do): count this run in; the last to arrive sums the parts in run
    # order (the same sum whoever is last), adds the bias, writes y and re-arms the counter (as `_finish_split`)
    first, n_parts = _parts(t, G, total, n_progs)
    if n_parts > 1:
        if tl.atomic_add(cnt_ptr + t, 1, sem="acq_rel") == n_parts - 1:
            tl.debug_barrier()
            n_m = tl.cdiv(M, BLOCK_M)
            offs_m = (t % n_m) * BLOCK_M + tl.arange(0, BLOCK_M)
            offs_n = (t // n_m) * BLOCK_N + tl.arange(0, BLOCK_N)
            mask_n = offs_n < N
            mask = (offs_m < M)[:, None] & mask_n[None, :]
            offs = offs_m[:, None] * N + offs_n[None, :]
            tot = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for i in tl.static_range(MAX_PARTS):
                tot += tl.load(ws_ptr + i * M * N + offs, mask=mask & ((offs * 0 + i) < n_parts), other=0.0,
                               cache_modifier=".cg")
            if HAS_BIAS:
                tot += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
            tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], tot.to(y_ptr.dtype.element_ty), mask=mask)
            tl.atomic_xchg(cnt_ptr + t, 0)
