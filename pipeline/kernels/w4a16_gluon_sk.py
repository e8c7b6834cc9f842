"""W4A16 GEMM for Hopper (sm_90) in Gluon, persistent and stream-K: `w4a16_gluon`'s warp-specialized tile
(a TMA producer warp, async register-operand wgmma) in one wave of programs, each streaming an equal run of
(tile, quantization group) steps through its ring across tile ends.

Usage:
    from pipeline.kernels.w4a16_gluon_sk import SK_CONFIGS, w4a16_gluon_sk_linear
    y = w4a16_gluon_sk_linear(x, w, bias, config="glk_m16_n128_k16_s8_c1")   # x (M, K) fp16/bf16 on sm_90
    Normally reached through `w4a16.w4a16_linear`, whose tuner times the `glk_*` configs for 16 <= M <= 1024 where
    `w4a16_gluon.enabled` (`candidates`); reference: `w4a16.w4a16_linear_ref`.

Why: the decode configs' times fit `fixed + bytes / rate` (docs/perf-log.md, session 22): the Gluon tiles stream
fastest (2.2-2.5 TB/s) but pay the most fixed cost (15-23 us a call), their split-K ramps and finishes; the
stream-K partition (as `w4a16_streamk.py` does for the Triton tile) pays one ramp an SM and finishes only the tiles
cut between runs. Program p owns steps [p T // P, (p + 1) T // P) of T = tiles * G (G = K / g; tile t = it // G with
the M tile fastest, so consecutive tiles share weights); the producer warp and the MMA warps step the same (tile,
group) sequence. At a tile's last step in this run the MMA warps retire their wgmmas and store the tile (or, cut
between runs, its fp32 part); the next tile's first wgmma starts from zero (`use_acc` false: no instruction but
the wgmmas writes the accumulator, which kept ptxas from serializing them, see `w4a16_gluon`). After the loop the
(at most two) cut tiles at the run's ends are finished by the last of their runs to arrive, parts summed in run
order (deterministic). Warp-specialized only (a producer warp); fp16/bf16, N % 4 == 0; `fits` as the base kernel.
With PDL the producer issues its first ring's weight copies before waiting for the previous kernel.
"""
from __future__ import annotations

import torch

from pipeline.kernels.dispatch import arrival_counters, cdiv, sm_count
from pipeline.kernels.pdl import launch_kwargs
from pipeline.kernels import w4a16_gluon as base
from pipeline.kernels.w4a16_streamk import plan

# name -> (BLOCK_M, BLOCK_N, KT, STAGES, num_warps, programs an SM, nested); as `w4a16_gluon.GLUON_CONFIGS`
# otherwise. nested (`_nl`): the MMA warps loop over the run's tiles around a loop over the tile's groups, whose N
# offsets, masks and scale pointers stay put and whose part is stored after it (flat: one loop over the run's steps,
# the next step's tile worked out every step and the store in a branch of the loop: its steady-state body is ~15%
# longer than the split-K `_ws` tile's, 280 against 243 instructions at 16 x 64, g128, offline sm_90 SASS). One
# program an SM: a warp-specialized kernel is compiled for 255 registers a thread (the producer gives its own back
# with setmaxnreg, the MMA warps take them), so a second program never fits beside the first (the split-K `_ws` decode
# configs at 4 programs an SM ran in waves: gl_m16_n64_k16_s4_c4_ws 48 against 25 us unsplit-ws, session 21); the
# ring is deep instead, ~100-190 KB of copies in flight an SM.
SK_CONFIGS = {
    "glk_m16_n128_k16_s8_c1": (16, 128, 16, 8, 4, 1, False),
    "glk_m16_n128_k16_s14_c1": (16, 128, 16, 14, 4, 1, False),
    "glk_m16_n64_k16_s12_c1": (16, 64, 16, 12, 4, 1, False),
    "glk_m16_n256_k16_s8_c1": (16, 256, 16, 8, 8, 1, False),
    "glk_m32_n128_k16_s8_c1": (32, 128, 16, 8, 4, 1, False),
    "glk_m16_n64_k16_s12_c1_nl": (16, 64, 16, 12, 4, 1, True),
    "glk_m16_n128_k16_s8_c1_nl": (16, 128, 16, 8, 4, 1, True),
    "glk_m32_n128_k16_s8_c1_nl": (32, 128, 16, 8, 4, 1, True),
    "glk_m32_n256_k16_s6_c1": (32, 256, 16, 6, 8, 1, False),
    "glk_m64_n128_k16_s6_c1": (64, 128, 16, 6, 4, 1, False),
    # prefill and mixed-step sizes (96 rows up): stream-K as the end of wave quantization (M = 256 runs 172 tiles of
    # 128 x 128 at N = 22016 on 132 SMs; the tail-split `_tl` tiles won three of four shapes there, session 21).
    # Not 128 x 256 or 256 x 128: their in-loop store (a pointer per accumulator element) spills ~1.2 KB a thread
    "glk_m128_n128_k16_s4_c1": (128, 128, 16, 4, 8, 1, False),
}


def candidates(M: int) -> tuple[str, ...]:
    """The stream-K Gluon configs worth timing at M rows (from 16, as the split-K Gluon tiles; none past 1024, where
    dequantize + cuBLAS and the whole-tile kernels hold the SMs busy anyway)."""
    if M < 16 or M > 1024:
        return ()
    rows = (16,) if M <= 16 else (32,) if M <= 32 else (32, 64) if M <= 64 else (128,)
    return tuple(n for n, c in SK_CONFIGS.items() if c[0] in rows)


def fits(name: str, g: int, act: bool) -> bool:
    BM, BN, KT, stages, *_ = SK_CONFIGS[name]
    depth = base.stages_for(BM, BN, KT, g, stages, act)
    return KT % (g // 8) == 0 and KT <= g and depth * base.smem_per_stage(BM, BN, KT, g, act) + (
        2 * BM * g * 2 if act else 0) <= base.SMEM_BYTES


if base.HAVE_GLUON:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import mbarrier, warpgroup_mma, warpgroup_mma_wait
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    @gluon.jit
    def _run(M, K, N, n_progs, GROUP: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr):
        # this program's steps [it_lo, it_lo + n_iter) and the (tile, group, M tile, N tile) of its first
        G = K // GROUP
        n_m = gl.cdiv(M, BLOCK_M)
        total = n_m * gl.cdiv(N, BLOCK_N) * G
        pid = gl.program_id(0)   # int32 throughout: the launcher checks that n_progs * total fits
        it_lo = pid * total // n_progs
        n_iter = (pid + 1) * total // n_progs - it_lo
        t = it_lo // G
        pid_n = t // n_m
        return it_lo, n_iter, t, it_lo - t * G, t - pid_n * n_m, pid_n, G, n_m, total

    @gluon.jit
    def _next(t, g, pid_m, pid_n, G, n_m):
        # the step after (t, g): the next group, or the next tile's first (M tile fastest)
        g += 1
        wrap = g == G
        g = gl.where(wrap, 0, g)
        t += wrap.to(gl.int32)
        pid_m += wrap.to(gl.int32)
        row_wrap = pid_m == n_m
        return t, g, gl.where(row_wrap, 0, pid_m), pid_n + row_wrap.to(gl.int32)

    @gluon.jit
    def _groups_of(t, it_lo, it_hi, G):
        # the groups [g_lo, g_hi) of tile t that the run [it_lo, it_hi) holds (the nested consumer's inner loop)
        return gl.maximum(it_lo - t * G, 0), gl.minimum(it_hi - t * G, G)

    @gluon.jit
    def _parts(t, G, total, n_progs):
        # (first run, number of runs) of tile t: the owners of its first and last steps and those between
        first = ((t * G + 1) * n_progs - 1) // total
        return first, ((t * G + G) * n_progs - 1) // total - first + 1

    @gluon.jit
    def _sk_produce(x_desc, q_desc, x_smem, u_smem, q_smem, ready, empty, M, K, N, n_progs,
                    GROUP: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, KT: gl.constexpr,
                    KW: gl.constexpr, STAGES: gl.constexpr, ACT: gl.constexpr, PDL: gl.constexpr):
        # the producer warp: each step's copies into the ring as soon as the MMA warps release its stage. PDL: the
        # first ring's weight copies go out before the wait for the previous kernel (they read nothing it writes),
        # its activation copies after; the MMA warps touch y and the workspace only after data that came after it
        it_lo, n_iter, t, g, pid_m, pid_n, G, n_m, total = _run(M, K, N, n_progs, GROUP, BLOCK_M, BLOCK_N)
        i0 = 0
        if PDL:
            n0 = gl.minimum(n_iter, STAGES)
            t0, g0, pm0, pn0 = t, g, pid_m, pid_n
            for i in range(n0):   # the stages start empty: no wait
                base._issue_loads(x_desc, q_desc, x_smem, u_smem, q_smem, ready.index(i), g, i, pid_m * BLOCK_M,
                                  pid_n * BLOCK_N, K, True, GROUP, KT, KW, ACT, 1)
                t, g, pid_m, pid_n = _next(t, g, pid_m, pid_n, G, n_m)
            base._gdc_wait()
            for i in range(n0):
                base._issue_loads(x_desc, q_desc, x_smem, u_smem, q_smem, ready.index(i), g0, i, pm0 * BLOCK_M,
                                  pn0 * BLOCK_N, K, True, GROUP, KT, KW, ACT, 2)
                t0, g0, pm0, pn0 = _next(t0, g0, pm0, pn0, G, n_m)
            i0 = n0
        for i in range(i0, n_iter):
            s = i % STAGES
            mbarrier.wait(empty.index(s), ((i // STAGES) & 1) ^ 1)
            base._issue_loads(x_desc, q_desc, x_smem, u_smem, q_smem, ready.index(s), g, s, pid_m * BLOCK_M,
                              pid_n * BLOCK_N, K, True, GROUP, KT, KW, ACT)
            t, g, pid_m, pid_n = _next(t, g, pid_m, pid_n, G, n_m)

    @gluon.jit
    def _mma_step(x_desc, x_smem, u_smem, a_smem, q_smem, ready, empty, i, sc_g, zc_g, acc, a_prev, fresh,
                  a_l: gl.constexpr, x_l: gl.constexpr, GROUP: gl.constexpr, BLOCK_N: gl.constexpr, KT: gl.constexpr,
                  STAGES: gl.constexpr, DKIND: gl.constexpr, ACT: gl.constexpr):
        # ring step i (one group of the tile): dequantize each KT slice while the previous slice's wgmma runs; fresh:
        # the tile's first step in this run (its first wgmma ignores the accumulator: no other instruction writes it,
        # so ptxas keeps the wgmmas pipelined, see `w4a16_gluon`); frees step i - 1's stage once its MMAs retired
        P: gl.constexpr = GROUP // 8
        KW: gl.constexpr = KT // P
        NJ: gl.constexpr = GROUP // KT
        s = i % STAGES
        mbarrier.wait(ready.index(s), (i // STAGES) & 1)
        qr, hv, sh_c, sc_i, zc_i = base._group_operands(q_smem.index(s), sc_g, zc_g, a_l, GROUP, KT, BLOCK_N, DKIND)
        b_smem, b0 = base._b_operand(x_smem, u_smem, a_smem, s, i, NJ, x_l, ACT)
        for j in gl.static_range(NJ):
            a = base._dequant_slice(qr, hv, sh_c, sc_i, zc_i, j, KW, DKIND)
            xt = b_smem.index(b0 + j).permute((1, 0))
            if j == 0:
                acc = warpgroup_mma(a, xt, acc, use_acc=not fresh, is_async=True)
            else:
                acc = warpgroup_mma(a, xt, acc, is_async=True)
            acc, a_prev = warpgroup_mma_wait(num_outstanding=1, deps=(acc, a_prev))
            a_prev = a
            if j == 0:  # the previous step's MMAs are retired (in every warpgroup): its stage is free
                mbarrier.arrive(empty.index((i + STAGES - 1) % STAGES), pred=i > 0)
        return acc, a_prev

    @gluon.jit
    def _store_part(acc, a_prev, t, pid_m, pid_n, on_mma, om_mma, G, total, n_progs, M, N, stride_ym, b_ptr, y_ptr,
                    ws_ptr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, HAS_BIAS: gl.constexpr):
        # this run's part of tile t, its MMAs retired: the whole tile (y) or one of the parts the last run to arrive
        # sums in run order (`_sk_finish`)
        acc, a_prev = warpgroup_mma_wait(num_outstanding=0, deps=(acc, a_prev))
        on = pid_n * BLOCK_N + on_mma
        om = pid_m * BLOCK_M + om_mma
        mask = gl.expand_dims(on < N, 1) & gl.expand_dims(om < M, 0)
        first, n_parts = _parts(t, G, total, n_progs)
        if n_parts == 1:
            base._store_tile(acc, y_ptr + gl.expand_dims(om, 0) * stride_ym + gl.expand_dims(on, 1), b_ptr, on, mask,
                             N, HAS_BIAS)
        else:
            gl.store(ws_ptr + (gl.program_id(0) - first) * M * N + gl.expand_dims(om, 0) * N + gl.expand_dims(on, 1),
                     acc, mask=mask)
        return acc, a_prev

    @gluon.jit
    def _sk_consume(x_desc, q_desc, x_smem, u_smem, a_smem, q_smem, ready, empty, s_ptr, z_ptr, b_ptr, y_ptr, ws_ptr,
                    M, N, K, stride_ym, n_progs, GROUP: gl.constexpr, BLOCK_M: gl.constexpr,
                    BLOCK_N: gl.constexpr, KT: gl.constexpr, STAGES: gl.constexpr, DKIND: gl.constexpr,
                    ACT: gl.constexpr, HAS_BIAS: gl.constexpr, num_warps: gl.constexpr, NESTED: gl.constexpr):
        # the MMA warps: dequantize + async wgmma step by step; a tile's end in this run stores it (whole) or its part.
        # Flat: one loop over the run's steps, the next step's (tile, group) by `_next`, the store in a branch of it.
        # NESTED: a loop over the run's tiles around one over the tile's groups (`_groups_of`), whose offsets, masks
        # and scale pointers stay put and which holds no store; the ring's step counter i runs on across tiles
        dt: gl.constexpr = x_desc.dtype
        mma: gl.constexpr = base._mma_layout(BLOCK_M, num_warps)
        a_l: gl.constexpr = base._a_layout(BLOCK_M, num_warps)
        col_l: gl.constexpr = gl.SliceLayout(1, a_l)
        TK: gl.constexpr = KT // 8
        x_l: gl.constexpr = gl.BlockedLayout([1, 8], [32 // TK, TK], [num_warps, 1], [1, 0])
        it_lo, n_iter, t, g, pid_m, pid_n, G, n_m, total = _run(M, K, N, n_progs, GROUP, BLOCK_M, BLOCK_N)
        gl.assume(n_iter > 0)
        ar_n = gl.arange(0, BLOCK_N, layout=col_l)
        on_mma = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, mma))
        om_mma = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, mma))
        acc = gl.zeros((BLOCK_N, BLOCK_M), dtype=gl.float32, layout=mma)
        a_prev = gl.zeros((BLOCK_N, KT), dtype=dt, layout=a_l)
        if NESTED:
            it_hi = it_lo + n_iter
            i = 0
            for tt in range(t, (it_hi - 1) // G + 1):
                pn = tt // n_m
                pm = tt - pn * n_m
                g_lo, g_hi = _groups_of(tt, it_lo, it_hi, G)
                offs_n = pn * BLOCK_N + ar_n
                mask_n = offs_n < N
                sc = gl.load(s_ptr + g_lo * N + offs_n, mask=mask_n, other=0.0)
                zc = gl.load(z_ptr + g_lo * N + offs_n, mask=mask_n, other=0.0)
                for gg in range(g_lo, g_hi):
                    sc_g = sc
                    zc_g = zc
                    live = mask_n & (gg + 1 < g_hi)   # the next group's scale and zero, one step ahead
                    sc = gl.load(s_ptr + (gg + 1) * N + offs_n, mask=live, other=0.0)
                    zc = gl.load(z_ptr + (gg + 1) * N + offs_n, mask=live, other=0.0)
                    acc, a_prev = _mma_step(x_desc, x_smem, u_smem, a_smem, q_smem, ready, empty, i, sc_g, zc_g, acc,
                                            a_prev, gg == g_lo, a_l, x_l, GROUP, BLOCK_N, KT, STAGES, DKIND, ACT)
                    i += 1
                acc, a_prev = _store_part(acc, a_prev, tt, pm, pn, on_mma, om_mma, G, total, n_progs, M, N,
                                          stride_ym, b_ptr, y_ptr, ws_ptr, BLOCK_M, BLOCK_N, HAS_BIAS)
        else:
            # this step's scale and zero, then always one step ahead in registers
            offs_n = pid_n * BLOCK_N + ar_n
            sc = gl.load(s_ptr + g * N + offs_n, mask=offs_n < N, other=0.0)
            zc = gl.load(z_ptr + g * N + offs_n, mask=offs_n < N, other=0.0)
            for i in range(n_iter):
                t1, g1, pid_m1, pid_n1 = _next(t, g, pid_m, pid_n, G, n_m)
                sc_g = sc
                zc_g = zc
                offs_n1 = pid_n1 * BLOCK_N + ar_n
                live = (i + 1 < n_iter) & (offs_n1 < N)
                sc = gl.load(s_ptr + g1 * N + offs_n1, mask=live, other=0.0)
                zc = gl.load(z_ptr + g1 * N + offs_n1, mask=live, other=0.0)
                acc, a_prev = _mma_step(x_desc, x_smem, u_smem, a_smem, q_smem, ready, empty, i, sc_g, zc_g, acc,
                                        a_prev, (g == 0) | (i == 0), a_l, x_l, GROUP, BLOCK_N, KT, STAGES, DKIND, ACT)
                if (g == G - 1) | (i == n_iter - 1):   # this run's part of tile t ends here
                    acc, a_prev = _store_part(acc, a_prev, t, pid_m, pid_n, on_mma, om_mma, G, total, n_progs, M, N,
                                              stride_ym, b_ptr, y_ptr, ws_ptr, BLOCK_M, BLOCK_N, HAS_BIAS)
                t, g, pid_m, pid_n = t1, g1, pid_m1, pid_n1
        acc, a_prev = warpgroup_mma_wait(num_outstanding=0, deps=(acc, a_prev))
        return (acc, )

    @gluon.jit
    def _sk_finish(t, G, total, n_progs, M, N, stride_ym, b_ptr, y_ptr, ws_ptr, cnt_ptr, MAX_PARTS: gl.constexpr,
                   BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, HAS_BIAS: gl.constexpr, num_warps: gl.constexpr):
        # tile t cut between runs (else nothing): count this run in; the last to arrive sums the parts in run order
        first, n_parts = _parts(t, G, total, n_progs)
        if n_parts > 1:
            if gl.atomic_add(cnt_ptr + t, 1, sem="acq_rel") == n_parts - 1:
                gl.thread_barrier()
                out_l: gl.constexpr = gl.BlockedLayout([4, 1], [32, 1], [1, num_warps], [0, 1])
                n_m = gl.cdiv(M, BLOCK_M)
                on = (t // n_m) * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, out_l))
                om = (t % n_m) * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, out_l))
                mask = gl.expand_dims(on < N, 1) & gl.expand_dims(om < M, 0)
                offs = gl.expand_dims(om, 0) * N + gl.expand_dims(on, 1)
                tot = gl.zeros((BLOCK_N, BLOCK_M), dtype=gl.float32, layout=out_l)
                for k in gl.static_range(MAX_PARTS):
                    tot += gl.load(ws_ptr + k * M * N + offs, mask=mask & (offs * 0 + k < n_parts), other=0.0,
                                   cache_modifier=".cg")
                base._store_tile(tot, y_ptr + gl.expand_dims(om, 0) * stride_ym + gl.expand_dims(on, 1), b_ptr, on,
                                 mask, N, HAS_BIAS)
                gl.atomic_xchg(cnt_ptr + t, 0)

    @gluon.jit
    def _sk_kernel(x_desc, q_desc, s_ptr, z_ptr, b_ptr, y_ptr, ws_ptr, cnt_ptr, M, N, K, stride_ym, n_progs,
                   MAX_PARTS: gl.constexpr, GROUP: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                   KT: gl.constexpr, STAGES: gl.constexpr, HAS_BIAS: gl.constexpr, DKIND: gl.constexpr,
                   ACT: gl.constexpr, num_warps: gl.constexpr, PDL: gl.constexpr = False,
                   NESTED: gl.constexpr = False):
        # grid (n_progs,): see the module docstring
        if PDL:
            base._gdc_launch()
        P: gl.constexpr = GROUP // 8
        KW: gl.constexpr = KT // P
        NJ: gl.constexpr = GROUP // KT
        x_smem, u_smem, a_smem, q_smem, ready, empty = base._ring(x_desc, q_desc, STAGES, NJ, KW * P, BLOCK_M, BLOCK_N,
                                                                  KT, ACT)
        gl.warp_specialize([
            (_sk_consume, (x_desc, q_desc, x_smem, u_smem, a_smem, q_smem, ready, empty, s_ptr, z_ptr, b_ptr, y_ptr,
                           ws_ptr, M, N, K, stride_ym, n_progs, GROUP, BLOCK_M, BLOCK_N, KT, STAGES, DKIND, ACT,
                           HAS_BIAS, num_warps, NESTED)),
            (_sk_produce, (x_desc, q_desc, x_smem, u_smem, q_smem, ready, empty, M, K, N, n_progs, GROUP, BLOCK_M,
                           BLOCK_N, KT, KW, STAGES, ACT, PDL)),
        ], [1], [24])
        for st in gl.static_range(STAGES):
            mbarrier.invalidate(ready.index(st))
            mbarrier.invalidate(empty.index(st))
        # the cut tiles at this run's two ends: every MMA warp's part stored before the arrival
        gl.thread_barrier()
        it_lo, n_iter, t_a, g_a, pm_a, pn_a, G, n_m, total = _run(M, K, N, n_progs, GROUP, BLOCK_M, BLOCK_N)
        t_b = (it_lo + n_iter - 1) // G
        _sk_finish(t_a, G, total, n_progs, M, N, stride_ym, b_ptr, y_ptr, ws_ptr, cnt_ptr, MAX_PARTS, BLOCK_M,
                   BLOCK_N, HAS_BIAS, num_warps)
        if t_b != t_a:
            _sk_finish(t_b, G, total, n_progs, M, N, stride_ym, b_ptr, y_ptr, ws_ptr, cnt_ptr, MAX_PARTS, BLOCK_M,
                       BLOCK_N, HAS_BIAS, num_warps)


def w4a16_gluon_sk_linear(x: torch.Tensor, w, bias: torch.Tensor | None = None,
                          config: str | tuple = "glk_m16_n128_k16_s8_c1", act: str | None = None,
                          out: torch.Tensor | None = None, pdl: bool = False) -> torch.Tensor:
    """y = x @ dequant(w).T (+ bias) by the stream-K Gluon tile; x (..., K) fp16/bf16 on an sm_90 GPU (act="silu_mul":
    x is (..., 2K) = [gate | up]); pdl: launched with programmatic dependent launch."""
    BM, BN, KT, stages, warps, ctas, nested = SK_CONFIGS[config] if isinstance(config, str) else config
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1 or x2.data_ptr() % 16 or (x2.stride(0) * x2.element_size()) % 16:
        x2 = x2.contiguous()
    M, N, K, g = x2.shape[0], w.N, w.K, w.group_size
    if (not base.applicable(x2, w, act is not None) or x2.shape[1] != (2 * K if act else K)
            or (isinstance(config, str) and not fits(config, g, act is not None)) or KT % (g // 8) or KT > g):
        raise ValueError(f"gluon stream-K W4A16: unsupported call (x {tuple(x2.shape)} {x2.dtype}, N={N}, K={K}, "
                         f"g={g}, KT={KT}, act={act})")
    stages = base.stages_for(BM, BN, KT, g, stages, act is not None, x2.element_size())
    tiles = cdiv(M, BM) * cdiv(N, BN)
    progs, parts = plan(tiles, K // g, sm_count(x2.device, cpu=4), ctas)
    y = out if out is not None else torch.empty(M, N, device=x2.device, dtype=x2.dtype)
    x_l, q_l = base.layouts(BM, BN, KT, g, x2.dtype)
    x_desc = TensorDescriptor(x2, [M, x2.shape[1]], [x2.stride(0), 1], [BM, KT], x_l)
    q_desc = TensorDescriptor(w.qweight, [K // 8, N], [N, 1], [g // 8, BN], q_l)
    ws = torch.empty(parts, M, N, device=x2.device, dtype=torch.float32) if parts > 1 else y
    _sk_kernel[(progs,)](x_desc, q_desc, w.scales, w.zeros, bias if bias is not None else y, y, ws,
                         arrival_counters(x2.device, tiles), M, N, K, y.stride(0), progs, MAX_PARTS=parts, GROUP=g,
                         BLOCK_M=BM, BLOCK_N=BN, KT=KT, STAGES=stages, HAS_BIAS=bias is not None,
                         DKIND=base._DKIND[x2.dtype], ACT=act is not None, num_warps=warps, PDL=pdl, NESTED=nested,
                         **launch_kwargs(pdl))
    return y.reshape(*x.shape[:-1], N)

