"""W4A16 GEMV (one activation row) for Hopper in Gluon: the int4 weights streamed by TMA through a shared ring.

Usage:
    from pipeline.kernels.w4a16_gluon_gemv import GEMV_CONFIGS, w4a16_gluon_gemv
    y = w4a16_gluon_gemv(x, w, bias, config="glv_n128_r32_s4_c4", pdl=True)   # x (1, K) fp16 on sm_90, w: W4Weight
    Normally reached through `pipeline.kernels.w4a16.w4a16_linear`, whose tuner times these configs next to the wide
    Triton GEMVs at M = 1 when opted in (PIPELINE_W4A16_GLUON_GEMV=1: 1.2-1.5x slower than those on an H100, session
    15); reference: `w4a16_linear_ref`.

Why: the wide Triton GEMV (`w4a16_gemv._gemv_wide_kernel`) keeps its whole weight tile in registers, so registers
cap how many bytes an SM has in flight (1.72-1.83x the int4 roofline with PDL, session 14). Here TMA copies tiles of
ROWS packed rows (whole groups) x BLOCK_N columns of qweight into a STAGES-deep shared-memory ring, issued by a
producer warp (`_produce`, configs `_ws`: its register budget leaves one program an SM) or by the consumer warps
themselves as they free a stage (128 or fewer registers: several programs an SM, the ring's first STAGES copies
issued before the PDL wait), and the consumer warps (`_consume`) turn each tile into fp32 partial sums on CUDA
cores: per packed word, `_dot8` makes sum_j x_j (q_j - z) / 16 of its 8 nibbles with fp16x2 arithmetic (lop3 to 1024
+ q, sub.f16x2 for q - z, fma.f16x2 with x / 16 pairs: about 2.5 instructions a weight, as `w4a16_gemv._dot8_h2`),
scaled by the group's scale into a (ROWS, BLOCK_N) fp32 accumulator that is summed over its rows once, at the end.
Split-K: fp32 partials and a last-arriving-program finish, in split order (deterministic), as the other W4A16
kernels.
Programmatic dependent launch (pdl=True): the kernel lets the next one launch first; the producer never reads what
a kernel writes (weights only), so it streams while the previous kernel finishes; the consumers wait
(`griddepcontrol.wait`, inline PTX) before they read x or write anything.
act="silu_mul" (x = [gate | up]): silu(gate) * up made per activation pair, rounded to fp16 as the Triton GEMVs do.
Limits: one row (M = 1), fp16 activations, N % 4 == 0 (TMA's 16-byte row pitch), sm_90 only.
Gluon compiles for the GPU only: tests/test_kernel_w4a16_gluon.py compiles it for sm_90 offline (Triton 3.6) and
checks it against the reference on a GPU.
"""
from __future__ import annotations

import torch

from pipeline.kernels.dispatch import arrival_counters, cdiv
from pipeline.kernels.pdl import launch_kwargs
from pipeline.kernels.tiles import split_for
from pipeline.kernels.w4a16_gluon import HAVE_GLUON, packed_layout

if HAVE_GLUON:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    from pipeline.kernels.w4a16_gemv import DOT8_H2_ASM
    from pipeline.kernels.w4a16_gluon import _gdc_launch, _gdc_wait, _ring_barriers
    _DOT8: gl.constexpr = gl.constexpr(DOT8_H2_ASM.value)

# name -> (BLOCK_N, ROWS, STAGES, num_warps of the consumers, split, ws): a stage holds ROWS packed rows (ROWS / (g/8)
# whole groups) of BLOCK_N columns; split < 0: about -split programs per SM; ws: a producer warp streams the ring
# (warp specialization: its register budget leaves one program per SM), else the consumers refill it themselves
GEMV_CONFIGS = {
    "glv_n128_r32_s6_c4_ws": (128, 32, 6, 4, -4, 1),
    "glv_n128_r32_s8_c2_ws": (128, 32, 8, 4, -2, 1),
    "glv_n128_r32_s4_c4": (128, 32, 4, 4, -4, 0),
    "glv_n64_r32_s4_c8": (64, 32, 4, 4, -8, 0),
    "glv_n128_r64_s3_c4": (128, 64, 3, 4, -4, 0),
}
SMEM_BYTES = 200 * 1024


def fits(name: str, g: int, K: int | None = None) -> bool:
    """Config `name` serves group size g (and K): a stage is whole groups, its rows fill the consumer warps' rows
    (8 a warp), K's groups split into whole stages, and the ring fits shared memory."""
    BN, rows, stages, warps, _, _ = GEMV_CONFIGS[name]
    P = g // 8
    return (rows % P == 0 and rows % (8 * warps) == 0 and stages * rows * BN * 4 <= SMEM_BYTES
            and (K is None or (K // g) % (rows // P) == 0))


if HAVE_GLUON:
    @gluon.jit
    def _dot8(q, zz, x04, x15, x26, x37):
        # q int32 of 8 nibbles (nibble j: input j * P + p of the group); zz fp16x2 (1024 + z, 1024 + z); x_ab fp16x2
        # (x_a / 16, x_b / 16) -> fp32 sum_j x_j (q_j - z) / 16 (w4a16_gemv._dot8_h2's arithmetic)
        return gl.inline_asm_elementwise(
            asm=_DOT8,
            constraints="=f,r,r,r,r,r,r", args=[q, zz, x04, x15, x26, x37], dtype=gl.float32, is_pure=True, pack=1)

    @gluon.jit
    def _add(a, b):
        return a + b

    @gluon.jit
    def _x(x_ptr, offs, K, ACT: gl.constexpr):
        # the activations at offs / 16 in fp16; ACT: x is [gate | up] (2K wide) and the value is silu(gate) * up,
        # rounded to fp16 first, as `w4a16_gemv._load_x` rounds it
        v = gl.load(x_ptr + offs)
        if ACT:
            g = v.to(gl.float32)
            v = (g / (1.0 + gl.exp(-g)) * gl.load(x_ptr + offs + K).to(gl.float32)).to(gl.float16)
        return (v.to(gl.float32) * 0.0625).to(gl.float16)

    @gluon.jit
    def _pair(x_ptr, offs, da, db, K, ACT: gl.constexpr):
        # fp16x2 (x[offs + da] / 16, x[offs + db] / 16) as int32: the planes a and b of a packed word's row
        a = _x(x_ptr, offs + da, K, ACT)
        b = _x(x_ptr, offs + db, K, ACT)
        return (a.to(gl.int16, bitcast=True).to(gl.int32) & 0xFFFF) | (b.to(gl.int16, bitcast=True).to(gl.int32) << 16)

    @gluon.jit
    def _produce(q_desc, q_smem, ready, empty, c_lo, n_iter, off_n, ROWS: gl.constexpr, STAGES: gl.constexpr):
        # one warp: chunk c_lo + i of ROWS packed rows into stage i % STAGES once the consumers have released it
        for i in range(n_iter):
            s = i % STAGES
            mbarrier.wait(empty.index(s), ((i // STAGES) & 1) ^ 1)
            mbarrier.expect(ready.index(s), q_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(q_desc, [(c_lo + i) * ROWS, off_n], ready.index(s), q_smem.index(s))

    @gluon.jit
    def _consume(q_desc, x_ptr, s_ptr, z_ptr, q_smem, ready, empty, N, K, c_lo, n_iter, off_n, GROUP: gl.constexpr,
                 ROWS: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr, PDL: gl.constexpr,
                 WS: gl.constexpr, ACT: gl.constexpr, num_warps: gl.constexpr):
        # (ROWS, BLOCK_N) fp32 partial products of chunks [c_lo, c_lo + n_iter): row r of a chunk is packed row
        # r % P of its group r // P; thread rows along the tile's rows, 4 consecutive columns a thread
        P: gl.constexpr = GROUP // 8
        KS: gl.constexpr = ROWS // P
        L: gl.constexpr = gl.BlockedLayout([ROWS // (8 * num_warps), 4], [8, 4], [num_warps, 1], [1, 0])
        rows_l: gl.constexpr = gl.SliceLayout(1, L)
        cols_l: gl.constexpr = gl.SliceLayout(0, L)
        q_plain: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [1, 0])   # TMA's unswizzled row-major tile
        if PDL:
            _gdc_wait()   # x and the split workspace belong to the kernels before and after this one
        r = gl.arange(0, ROWS, layout=rows_l)
        c = off_n + gl.arange(0, BLOCK_N, layout=cols_l)
        cmask = gl.expand_dims(c < N, 0)
        xrow = (r // P) * GROUP + (r % P)                  # plane 0's input of each row, within the chunk
        acc = gl.zeros((ROWS, BLOCK_N), dtype=gl.float32, layout=L)
        for i in range(n_iter):
            s = i % STAGES
            g0 = (c_lo + i) * KS                           # the chunk's first group
            base = g0 * GROUP
            x04 = gl.expand_dims(_pair(x_ptr, base + xrow, 0, 4 * P, K, ACT), 1)
            x15 = gl.expand_dims(_pair(x_ptr, base + xrow, P, 5 * P, K, ACT), 1)
            x26 = gl.expand_dims(_pair(x_ptr, base + xrow, 2 * P, 6 * P, K, ACT), 1)
            x37 = gl.expand_dims(_pair(x_ptr, base + xrow, 3 * P, 7 * P, K, ACT), 1)
            sz = gl.expand_dims((g0 + r // P) * N, 1) + gl.expand_dims(c, 0)   # (ROWS, BN): each row's group
            sc = gl.load(s_ptr + sz, mask=cmask, other=0.0).to(gl.float32)
            zc = gl.load(z_ptr + sz, mask=cmask, other=0.0).to(gl.float32) + 1024.0
            zh = zc.to(gl.float16).to(gl.int16, bitcast=True).to(gl.int32) & 0xFFFF
            zz = zh | (zh << 16)
            mbarrier.wait(ready.index(s), (i // STAGES) & 1)
            q = q_smem.index(s)._reinterpret(gl.int32, [ROWS, BLOCK_N], q_plain).load(L)
            gl.thread_barrier()                            # every consumer warp has its words: release the stage
            if WS:
                mbarrier.arrive(empty.index(s))
            else:                                          # refill it with the chunk STAGES ahead ourselves
                nxt = i + STAGES
                mbarrier.expect(ready.index(s), q_desc.block_type.nbytes, pred=nxt < n_iter)
                tma.async_copy_global_to_shared(q_desc, [(c_lo + nxt) * ROWS, off_n], ready.index(s),
                                                q_smem.index(s), pred=nxt < n_iter)
            acc += _dot8(q, zz, x04, x15, x26, x37) * (sc * 16.0)
        return (gl.reduce(acc, 0, _add), )   # not gl.sum: its combine is a triton.jit, interpreted under
        #                                       TRITON_INTERPRET=1, where the offline compile test runs

    @gluon.jit
    def _gemv(q_desc, x_ptr, s_ptr, z_ptr, b_ptr, y_ptr, ws_ptr, cnt_ptr, N, K, split_k, GROUP: gl.constexpr,
              ROWS: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr, SPLIT: gl.constexpr,
              HAS_BIAS: gl.constexpr, PDL: gl.constexpr, WS: gl.constexpr, ACT: gl.constexpr,
              num_warps: gl.constexpr):
        # grid (cdiv(N, BLOCK_N), split_k): columns [off_n, off_n + BLOCK_N), chunks of ROWS packed rows [c_lo, ...)
        if PDL:
            _gdc_launch()
        pid_n = gl.program_id(0)
        pid_k = gl.program_id(1)
        off_n = pid_n * BLOCK_N
        n_chunks = K // 8 // ROWS
        per_split = gl.cdiv(n_chunks, split_k)
        c_lo = pid_k * per_split
        n_iter = gl.minimum(per_split, n_chunks - c_lo)
        q_smem = gl.allocate_shared_memory(gl.int32, [STAGES, ROWS, BLOCK_N], q_desc.layout)
        ready, empty = _ring_barriers(STAGES)
        if WS:
            res = gl.warp_specialize([
                (_consume, (q_desc, x_ptr, s_ptr, z_ptr, q_smem, ready, empty, N, K, c_lo, n_iter, off_n, GROUP,
                            ROWS, BLOCK_N, STAGES, PDL, WS, ACT, num_warps)),
                (_produce, (q_desc, q_smem, ready, empty, c_lo, n_iter, off_n, ROWS, STAGES)),
            ], [1], [24])
        else:   # the consumers stream the ring themselves; the first STAGES chunks go out before any wait
            for st in gl.static_range(STAGES):
                mbarrier.expect(ready.index(st), q_desc.block_type.nbytes, pred=st < n_iter)
                tma.async_copy_global_to_shared(q_desc, [(c_lo + st) * ROWS, off_n], ready.index(st),
                                                q_smem.index(st), pred=st < n_iter)
            res = _consume(q_desc, x_ptr, s_ptr, z_ptr, q_smem, ready, empty, N, K, c_lo, n_iter, off_n, GROUP, ROWS,
                           BLOCK_N, STAGES, PDL, WS, ACT, num_warps)
        y = res[0]
        for st in gl.static_range(STAGES):
            mbarrier.invalidate(ready.index(st))
            mbarrier.invalidate(empty.index(st))
        out_l: gl.constexpr = gl.BlockedLayout([1], [32], [num_warps], [0])
        y = gl.convert_layout(y, out_l)
        on = off_n + gl.arange(0, BLOCK_N, layout=out_l)
        mask = on < N
        if SPLIT:   # this split's partial; the last program of the column tile to arrive sums them in split order
            gl.store(ws_ptr + pid_k * N + on, y, mask=mask)
            gl.thread_barrier()
            arrived = gl.atomic_add(cnt_ptr + pid_n, 1, sem="acq_rel")
            if arrived == split_k - 1:
                gl.thread_barrier()
                y = gl.zeros((BLOCK_N, ), dtype=gl.float32, layout=out_l)
                for k in range(split_k):
                    y += gl.load(ws_ptr + k * N + on, mask=mask, other=0.0, cache_modifier=".cg")
                if HAS_BIAS:
                    y += gl.load(b_ptr + on, mask=mask, other=0.0).to(gl.float32)
                gl.store(y_ptr + on, y.to(y_ptr.dtype.element_ty), mask=mask)
                gl.atomic_xchg(cnt_ptr + pid_n, 0)
        else:
            if HAS_BIAS:
                y += gl.load(b_ptr + on, mask=mask, other=0.0).to(gl.float32)
            gl.store(y_ptr + on, y.to(y_ptr.dtype.element_ty), mask=mask)


def applicable(x2: torch.Tensor, w, act: bool) -> bool:
    """This call fits the GEMV: one fp16 row, N % 4 == 0 (the tuner skips it otherwise)."""
    return x2.shape[0] == 1 and x2.dtype == torch.float16 and w.N % 4 == 0


def w4a16_gluon_gemv(x: torch.Tensor, w, bias: torch.Tensor | None = None, config: str = "glv_n128_r32_s4_c4",
                     out: torch.Tensor | None = None, pdl: bool = False, act: str | None = None) -> torch.Tensor:
    """y = x @ dequant(w).T (+ bias) for one row x (1, K) fp16 on an sm_90 GPU; w: `W4Weight` with N % 4 == 0.
    act="silu_mul": x is (1, 2K) = [gate | up] and y = silu_mul(x) @ dequant(w).T."""
    BN, rows, stages, warps, split, ws_ = GEMV_CONFIGS[config]
    x2 = x.reshape(-1, x.shape[-1])
    N, K, g = w.N, w.K, w.group_size
    if not applicable(x2, w, act is not None) or x2.shape[1] != (2 * K if act else K) or not fits(config, g, K):
        raise ValueError(f"gluon W4A16 GEMV: unsupported call (x {tuple(x2.shape)} {x2.dtype}, N={N}, K={K}, g={g}, "
                         f"config {config})")
    x2 = x2.contiguous()
    split = split_for(1, N, K, rows * 8, 1, BN, split, x2.device)   # K cut in chunks of `rows` packed rows
    y = out if out is not None else torch.empty(1, N, device=x2.device, dtype=x2.dtype)
    q_desc = TensorDescriptor(w.qweight, [K // 8, N], [N, 1], [rows, BN], packed_layout())
    ws = torch.empty(split, N, device=x2.device, dtype=torch.float32) if split > 1 else y
    cnt = arrival_counters(x2.device, cdiv(N, BN)) if split > 1 else y
    _gemv[(cdiv(N, BN), split)](q_desc, x2, w.scales, w.zeros, bias if bias is not None else y, y, ws, cnt, N, K, split,
                                GROUP=g, ROWS=rows, BLOCK_N=BN, STAGES=stages, SPLIT=split > 1,
                                HAS_BIAS=bias is not None, PDL=pdl, WS=bool(ws_), ACT=act is not None,
                                num_warps=warps,
                                **launch_kwargs(pdl))
    return y.reshape(*x.shape[:-1], N)
