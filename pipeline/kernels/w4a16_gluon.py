"""W4A16 GEMM for Hopper (sm_90) in Gluon: async wgmma with the dequantized int4 weights as the register operand.

Usage:
    from pipeline.kernels.w4a16_gluon import available, w4a16_gluon_linear
    if available(x.device):
        y = w4a16_gluon_linear(x, w, bias, config="gl_m64_n64_k16_s4_c2")   # x (M, K) fp16/bf16, w: W4Weight
    Normally reached through `pipeline.kernels.w4a16.w4a16_linear`, whose tuner times the `gl_*` configs next
    to the Triton kernels for M >= 16 on sm_90 (`w4a16_configs.gluon_candidates`); reference: `w4a16_linear_ref`.

Problem transposed, as in `w4a16_swap.py`: y^T (N, M) = W (N, K) @ x^T (K, M). One program owns a (BLOCK_N,
BLOCK_M) tile of y^T and a range of quantization groups (split-K); per group it
  - streams, by TMA into a STAGES-deep shared-memory ring (one mbarrier per stage), the group's packed weights
    (P = g/8 rows of qweight, (P, BLOCK_N) int32, loaded KW times side by side, see below) and the activation
    tile (BLOCK_M, g) cut into g/KT slices of (BLOCK_M, KT);
  - per slice j, dequantizes (BLOCK_N, KT) weights straight into the register layout of a wgmma's A operand
    ((q - z) * s, one rounding like the reference's fp16 weight) and issues an *async* wgmma on it and the
    transposed activation slice (shared memory); then `warpgroup_mma_wait(1)` retires the previous one only, so the
    next slice's dequantization runs while this MMA is in flight. All slices chain into one fp32 accumulator.
KT = KW * P: an MMA slice is KW nibble planes of one group (plane jj holds inputs jj*P .. jj*P + P - 1, see
`w4a16.py`): consecutive planes are consecutive inputs, so the activation slice is a plain (BLOCK_M, KT) box,
and column c of the weight slice is nibble (j*KW + c // P) of packed word c % P. To read those words in the
MMA's register layout without shuffles, the packed tile is loaded KW times into a (KW * P, BLOCK_N) buffer:
element (n, c) of its transposed view is exactly word c % P of column n (read through a plain row-major view of
the buffer: see `_load_packed`). `dequantize_gluon` runs just that operand path and returns the weights it makes.
Split-K (split > 1): fp32 partial tiles and a last-arriving-program finish, like `_finish_split` in
`w4a16_gemv.py` (deterministic: partials summed in split order). Split 0 (configs `_tl`, `tail_split`): the tiles of
the full waves whole and only the last partial wave's split, so that it fills the SMs (a 1-D grid; the whole tiles
take the same finish as a split of one). TMA zero-fills rows past M and columns past N.
act="silu_mul" (x = [gate | up]): both halves arrive by TMA and the MMA warps write silu(gate) * up of each group
to a double-buffered shared tile that the wgmmas read.
ptxas keeps the wgmmas asynchronous only if the loop has no zero-trip path (`gl.assume(n_iter > 0)`): without it,
it serialized every wgmma (C7515, "non wgmma instructions defining accumulator registers") of the SwiGLU variant
and of 256-row tiles with split K or a producer warp, until 2026-12-07 (tests/test_kernel_w4a16_gluon.py checks).
Warp specialization (configs `_ws`): a one-warp producer partition (24 registers) issues the TMA copies as soon as
the MMA warps release a stage (`empty` mbarriers), so the MMA warps skip the per-copy barriers that the compiler
puts before each refill they issue themselves.
Programmatic dependent launch (`pdl=True`, what the tuner passes where pdl.py enables it: int4 decode on Hopper):
the kernel lets the next one launch first thing, and issues the prologue's weight copies before
`griddepcontrol.wait` (inline PTX: Gluon 3.6 has no builtin), the activation copies after it, as the Triton GEMVs
do; the warp-specialized variant waits before it forks.
Limits: N % 4 == 0 (TMA's 16-byte row pitch of qweight), fp16/bf16 activations. Gluon compiles for the GPU only
(no interpreter): `available(device)` gates it to sm_90 with a Triton that ships Gluon's Hopper API; written against Triton 3.6.
"""
from __future__ import annotations

import functools

import os

import torch
import triton

from pipeline.kernels.dispatch import arrival_counters, cdiv, device_capability, interpreting, sm_count
from pipeline.kernels.pdl import launch_kwargs
from pipeline.kernels.tiles import no_empty_split, split_for

try:  # Gluon's Hopper API (Triton >= 3.5); absent or different elsewhere: the module still imports
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                                warpgroup_mma_wait)
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    HAVE_GLUON = True
except Exception:  # pragma: no cover - depends on the Triton install
    HAVE_GLUON = False

# name -> (BLOCK_M, BLOCK_N, KT, STAGES, num_warps, split, ws); split > 0: that many programs along K, split < 0:
# split K until about -split programs per SM (as `w4a16_configs`), split 0: only the last partial wave's tiles split
# (`tail_split`). BLOCK_M is the wgmma's N (8..256, multiple of 8), BLOCK_N its M (64 per warpgroup), KT the K of one
# wgmma (16, 32 or 64; at least g/8). ws: a producer warp streams the ring (warp specialization); else the MMA warps
# refill it themselves.
GLUON_CONFIGS = {
    "gl_m16_n64_k16_s4_c4": (16, 64, 16, 4, 4, -4, 0),
    "gl_m16_n64_k16_s4_c4_ws": (16, 64, 16, 4, 4, -4, 1),
    "gl_m16_n64_k32_s4_c8": (16, 64, 32, 4, 4, -8, 0),
    "gl_m16_n64_k16_s8_c4": (16, 64, 16, 8, 4, -4, 0),      # deeper rings and wider weight tiles (BLOCK_N 128 won
    "gl_m16_n128_k16_s4_c4": (16, 128, 16, 4, 4, -4, 0),    # at M = 64 on the H100, 2026-12-07): more bytes in
    "gl_m16_n128_k16_s8_c4": (16, 128, 16, 8, 4, -4, 0),    # flight per program
    "gl_m16_n256_k16_s4_c4": (16, 256, 16, 4, 8, -4, 0),
    "gl_m32_n128_k16_s4_c4": (32, 128, 16, 4, 4, -4, 0),
    "gl_m32_n64_k16_s4_c4": (32, 64, 16, 4, 4, -4, 0),
    "gl_m32_n64_k16_s4_c4_ws": (32, 64, 16, 4, 4, -4, 1),
    "gl_m64_n64_k16_s4_c2": (64, 64, 16, 4, 4, -2, 0),
    "gl_m64_n64_k16_s4_c2_ws": (64, 64, 16, 4, 4, -2, 1),
    "gl_m64_n128_k16_s4_c2": (64, 128, 16, 4, 4, -2, 0),
    "gl_m64_n128_k16_s6_c2": (64, 128, 16, 6, 4, -2, 0),
    "gl_m64_n256_k16_s4_c2": (64, 256, 16, 4, 8, -2, 0),
    "gl_m32_n256_k16_s4_c4": (32, 256, 16, 4, 8, -4, 0),    # 256 wide: half the activation re-reads of 128 (its
                                                             # wgmmas pipelined only since the assume, see _consume)
    "gl_m128_n128_k16_s4": (128, 128, 16, 4, 8, 1, 0),
    "gl_m128_n128_k16_s4_ws": (128, 128, 16, 4, 8, 1, 1),
    "gl_m128_n128_k32_s3": (128, 128, 32, 3, 8, 1, 0),
    "gl_m256_n128_k16_s3": (256, 128, 16, 3, 8, 1, 0),
    "gl_m128_n256_k16_s3_ws": (128, 256, 16, 3, 8, 1, 1),
    # prefill sizes where whole tiles leave SMs idle (M = 256: 64 tiles of 128 x 128 at N = 4096, 192 at 12288 on
    # 132 SMs, 2026-12-07): half as many rows a tile (two programs an SM fit), or K in two programs (`_k2`)
    "gl_m64_n128_k16_s4": (64, 128, 16, 4, 4, 1, 0),
    "gl_m128_n128_k16_s4_ws_k2": (128, 128, 16, 4, 8, 2, 1),
    "gl_m256_n128_k16_s3_k4": (256, 128, 16, 3, 8, 4, 0),
    # the M = 256 and 2048 pick (2026-12-07) with K in two programs: 4096 x 22016 at M = 256 is 172 tiles of 128 x 256
    # on 132 SMs (1.3 waves, 0.66x cuBLAS); 344 fill 2.6 waves, for one partial written and read back a tile
    "gl_m128_n256_k16_s3_ws_k2": (128, 256, 16, 3, 8, 2, 1),
    # split 0 (`_tl`): whole tiles, and only the last partial wave's tiles split along K to fill the SMs (`tail_split`):
    # 4096 x 22016 at M = 256 ran 172 tiles of 128 x 128 (its pick, 111.5 us against cuBLAS's 73.8, 2026-12-07) in
    # two rounds on 132 SMs; here 132 whole, then 40 tiles in 3 parts, 120 programs
    "gl_m128_n128_k16_s4_ws_tl": (128, 128, 16, 4, 8, 0, 1),
    "gl_m128_n256_k16_s3_ws_tl": (128, 256, 16, 3, 8, 0, 1),
    # 256 rows a tile with the producer warp: at M = 256 each weight is dequantized once, not once per 128-row tile
    # (the same MMA area as 128 x 256, whose two warpgroups each hold 128 weight columns)
    "gl_m256_n128_k16_s3_ws": (256, 128, 16, 3, 8, 1, 1),
    "gl_m256_n128_k16_s3_ws_tl": (256, 128, 16, 3, 8, 0, 1),
}
SMEM_BYTES = 220 * 1024  # of the H100's 227 KB, leaving room for the barriers and the epilogue's scratch


def available(device) -> bool:
    """Gluon kernels run here: a CUDA sm_90 device, Gluon's Hopper API importable, not Triton's interpreter."""
    device = torch.device(device)
    return HAVE_GLUON and not interpreting() and device_capability(device) == (9, 0)


def enabled(device) -> bool:
    """The tuner times the Gluon configs next to the Triton kernels: `available` and not turned off
    (PIPELINE_W4A16_GLUON=0). On by default since session 16's H100 A/B (alternating fresh servers, the 7B's serving
    run, `bench/results/serve_ab_gluon_h100_s16.log`): 1.09x / 1.13x the output tok/s of the Triton kernels alone,
    decode steps 3616 against 3220 tok/s, once ptxas no longer serialized the fused-SwiGLU variant's wgmmas (see the
    module docstring). Costs ~1 min more tuning at a first start (then cached)."""
    return os.environ.get("PIPELINE_W4A16_GLUON", "1") != "0" and available(device)


def gemv_enabled(device) -> bool:
    """The one-row TMA GEMVs (`w4a16_gluon_gemv`) too: opt-in (PIPELINE_W4A16_GLUON_GEMV=1), 1.2-1.5x slower than
    the Triton wide GEMV on every Llama-7B shape on an H100 (session 15), so not worth their tuning time."""
    return os.environ.get("PIPELINE_W4A16_GLUON_GEMV", "0") == "1" and enabled(device)


def applicable(x2: torch.Tensor, w, act: bool) -> bool:
    """This call's shapes and dtypes fit the kernel (the tuner skips it otherwise)."""
    return w.N % 4 == 0 and x2.dtype in (torch.float16, torch.bfloat16)


def fits(name: str, g: int, act: bool) -> bool:
    """Config `name` serves group size g (KT a multiple of g/8, at most g) within shared memory."""
    BM, BN, KT, stages, *_ = GLUON_CONFIGS[name]
    depth = stages_for(BM, BN, KT, g, stages, act)
    return KT % (g // 8) == 0 and KT <= g and depth * smem_per_stage(BM, BN, KT, g, act) + (
        2 * BM * g * 2 if act else 0) <= SMEM_BYTES


def smem_per_stage(BM: int, BN: int, KT: int, g: int, act: bool = False, itemsize: int = 2) -> int:
    return BM * g * itemsize * (2 if act else 1) + KT * BN * 4


def stages_for(BM: int, BN: int, KT: int, g: int, stages: int, act: bool = False, itemsize: int = 2) -> int:
    """Ring depth that fits shared memory: per stage the activation tile (BM * g; gate and up with act) and
    KW = KT // (g/8) copies of the packed (g/8, BN) int32 tile; act adds two silu(gate) * up tiles."""
    per_stage = smem_per_stage(BM, BN, KT, g, act, itemsize)
    fixed = 2 * BM * g * itemsize if act else 0
    while stages > 2 and stages * per_stage + fixed > SMEM_BYTES:
        stages -= 1
    return stages


def _plane_asm(src: str) -> str:
    # _plane_f16x2's PTX on the low ($1) or high ($2) half-pair: shift the plane's nibbles down, lop3 them into
    # fp16 1024 + q, subtract 1024 + z and multiply by the scale, two weights per instruction
    return f"""{{
    .reg .b32 t;
    shr.u32 t, {src}, $3;
    lop3.b32 t, t, 0x000f000f, 0x64006400, 0xea;
    sub.f16x2 t, t, $5;
    mul.f16x2 $0, t, $6;
    }}"""


if HAVE_GLUON:
    _PLANE_LO = gl.constexpr(_plane_asm("$1"))
    _PLANE_HI = gl.constexpr(_plane_asm("$2"))

    @gluon.jit
    def _dequant_bf16(qr, sh, zc, sc):
        # qr (BN, KT) int32 packed words, sh: the nibble shift (scalar or (1, KT)); zc (BN,) bf16 128 + zero, sc (BN,)
        # fp32 scale -> (BN, KT) bf16 (q - z) * s, rounded once (as the reference's weight): 0x4300 | q is bf16
        # 128 + q exactly, and the fp16 scale is applied in fp32 (bf16 cannot hold it)
        w = (((qr >> sh) & 0xF).to(gl.int16) | 0x4300).to(gl.bfloat16, bitcast=True)
        return ((w - gl.expand_dims(zc, 1)).to(gl.float32) * gl.expand_dims(sc, 1)).to(gl.bfloat16)

    @gluon.jit
    def _dequant_f16x2(qr, sh, zc, sc):
        # fp16 (q - z) * s, two weights per step: the pair (c, c + 1) of the A operand's registers comes
        # from words a, b of the same column; prmt joins their shifted low halves and one lop3 makes both
        # nibbles fp16 1024 + q (0x6400 | q), then one sub.f16x2 and one mul.f16x2: ~3 instructions a weight
        return gl.inline_asm_elementwise(
            asm="""{
            .reg .b32 a, b, t;
            shr.u32 a, $1, $3;
            shr.u32 b, $2, $4;
            prmt.b32 t, a, b, 0x5410;
            lop3.b32 t, t, 0x000f000f, 0x64006400, 0xea;
            sub.f16x2 t, t, $5;
            mul.f16x2 $0, t, $6;
            }""",
            constraints="=r,r,r,r,r,r,r", args=[qr, sh, zc, sc], dtype=gl.float16, is_pure=True, pack=2)

    @gluon.jit
    def _halves(qr):
        # pairs (c, c + 1) of packed words a, b -> (low16(a) | low16(b) << 16, high16(a) | high16(b) << 16): the
        # nibble planes 0..3 and 4..7 of both columns side by side, made once per group for _plane_f16x2
        return gl.inline_asm_elementwise(
            asm="""
            prmt.b32 $0, $2, $3, 0x5410;
            prmt.b32 $1, $2, $3, 0x7632;
            """,
            constraints="=r,=r,r,r", args=[qr], dtype=gl.int32, is_pure=True, pack=2)

    @gluon.jit
    def _plane_f16x2(hv, sh, zc, sc, HI: gl.constexpr):
        # nibble plane (HI * 4 + sh / 4) of _halves' pair -> two weights (q - z) * s: shr, lop3 (0x6400 | q, i.e.
        # fp16 1024 + q, in both halves), sub.f16x2, mul.f16x2
        if HI:
            asm: gl.constexpr = _PLANE_HI
        else:
            asm: gl.constexpr = _PLANE_LO
        return gl.inline_asm_elementwise(asm=asm, constraints="=r,r,r,r,r,r,r", args=[hv, sh, zc, sc],
                                         dtype=gl.float16, is_pure=True, pack=2)

    @triton.constexpr_function
    def _mma_layout(BLOCK_M, num_warps):
        # the fp32 accumulator (BN, BM) of y^T: one warpgroup per 64 of BN, wgmma N = BM
        return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, BLOCK_M, 16])

    @triton.constexpr_function
    def _a_layout(BLOCK_M, num_warps):
        # the wgmma's register A operand (BN, KT): pairs of consecutive k per register (k_width 2)
        return gl.DotOperandLayout(operand_index=0, parent=_mma_layout(BLOCK_M, num_warps), k_width=2)

    @gluon.jit
    def _load_packed(q_buf, a_l: gl.constexpr, KT: gl.constexpr, BLOCK_N: gl.constexpr):
        # q_buf (KT, BN) int32 (KW copies of the packed tile) -> (BN, KT) registers in a_l: word c % P of column
        # n. Through a plain row-major view of the buffer (TMA's unswizzled layout): Triton 3.6 reads a
        # *transposed* view of an unswizzled NVMMA layout as if it were not transposed (element (n, c) from word
        # n * KT + c of the buffer), which gave every config of this kernel wrong outputs on the first H100 run
        q_plain: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [1, 0])
        return q_buf._reinterpret(gl.int32, [KT, BLOCK_N], q_plain).permute((1, 0)).load(a_l)

    @gluon.jit
    def _group_operands(q_buf, sc, zc, a_l: gl.constexpr, GROUP: gl.constexpr, KT: gl.constexpr,
                        BLOCK_N: gl.constexpr, DKIND: gl.constexpr):
        # one group's packed words (and, fp16 with one plane per slice, their half-word pairs), the shift of each
        # slice column's nibble plane, and the scale / 1024-or-128 + zero in the dequantization's dtypes
        P: gl.constexpr = GROUP // 8
        KW: gl.constexpr = KT // P
        qr = _load_packed(q_buf, a_l, KT, BLOCK_N)
        if DKIND == 1 and KW == 1:
            hv = _halves(qr)
        else:
            hv = qr
        if KW == 1:
            sh_c = 0
        else:  # column c of a slice is nibble plane c // P
            sh_c = gl.expand_dims((gl.arange(0, KT, layout=gl.SliceLayout(0, a_l)) // P) * 4, 0)
        if DKIND == 1:
            sc_i = sc
            zc_i = zc + 1024.0
        else:
            sc_i = sc.to(gl.float32)
            zc_i = (zc.to(gl.float32) + 128.0).to(gl.bfloat16)
        return qr, hv, sh_c, sc_i, zc_i

    @gluon.jit
    def _dequant_slice(qr, hv, sh_c, sc_i, zc_i, j: gl.constexpr, KW: gl.constexpr, DKIND: gl.constexpr):
        # slice j of the group: (BN, KT) weights (q - z) * s, columns j * KT .. j * KT + KT - 1 of the group
        if DKIND == 1 and KW == 1:  # one plane per slice: the halves made once per group
            a = _plane_f16x2(hv, 4 * (j % 4), gl.expand_dims(zc_i, 1), gl.expand_dims(sc_i, 1), j >= 4)
        elif DKIND == 1:
            a = _dequant_f16x2(qr, sh_c + 4 * KW * j, gl.expand_dims(zc_i, 1), gl.expand_dims(sc_i, 1))
        else:
            a = _dequant_bf16(qr, sh_c + 4 * KW * j, zc_i, sc_i)
        return a

    @gluon.jit
    def _ring_barriers(STAGES: gl.constexpr):
        # a shared-memory ring's mbarriers: `ready` (its copies landed) and `empty` (its readers are done), one each
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for st in gl.static_range(STAGES):
            mbarrier.init(ready.index(st), count=1)
            mbarrier.init(empty.index(st), count=1)
        return ready, empty

    @gluon.jit
    def _ring(x_desc, q_desc, STAGES: gl.constexpr, NJ: gl.constexpr, KP: gl.constexpr, BLOCK_M: gl.constexpr,
              BLOCK_N: gl.constexpr, KT: gl.constexpr, ACT: gl.constexpr):
        # the ring's buffers: per stage NJ activation slices (BM, KT) and KP = KW * g/8 rows of packed weights;
        # with ACT the up slices too, and silu(gate) * up (two buffers: one may still be read by the MMAs in
        # flight); and its mbarriers
        dt: gl.constexpr = x_desc.dtype
        x_smem = gl.allocate_shared_memory(dt, [STAGES * NJ, BLOCK_M, KT], x_desc.layout)
        if ACT:
            u_smem = gl.allocate_shared_memory(dt, [STAGES * NJ, BLOCK_M, KT], x_desc.layout)
            a_smem = gl.allocate_shared_memory(dt, [2 * NJ, BLOCK_M, KT], x_desc.layout)
        else:
            u_smem = x_smem
            a_smem = x_smem
        q_smem = gl.allocate_shared_memory(gl.int32, [STAGES, KP, BLOCK_N], q_desc.layout)
        ready, empty = _ring_barriers(STAGES)
        return x_smem, u_smem, a_smem, q_smem, ready, empty

    @gluon.jit
    def _gdc_launch():
        # programmatic dependent launch (pdl.py): the next kernel in the stream may be scheduled now
        gl.inline_asm_elementwise("griddepcontrol.launch_dependents; // dummy $0", "=r", [], dtype=gl.int32,
                                  is_pure=False, pack=1)

    @gluon.jit
    def _gdc_wait():
        # programmatic dependent launch: from here on the previous kernels' writes are visible
        gl.inline_asm_elementwise("griddepcontrol.wait; // dummy $0", "=r", [], dtype=gl.int32, is_pure=False,
                                  pack=1)

    @gluon.jit
    def _issue_loads(x_desc, q_desc, x_smem, u_smem, q_smem, bar, grp, s, off_m, off_n, K, pred,
                     GROUP: gl.constexpr, KT: gl.constexpr, KW: gl.constexpr, ACT: gl.constexpr,
                     PART: gl.constexpr = 0):
        # group grp into stage s, arriving on bar: its g/KT activation slices (BM, KT) (with ACT the gate's and the
        # up's) and KW copies of its packed (g/8, BN) tile. PART 1: the barrier's byte count and the packed weights
        # only (no kernel writes them: issued before a PDL wait); PART 2: the activations only (after the wait)
        P: gl.constexpr = GROUP // 8
        NJ: gl.constexpr = GROUP // KT
        nx: gl.constexpr = 2 if ACT else 1
        if PART != 2:
            mbarrier.expect(bar, nx * NJ * x_desc.block_type.nbytes + KW * q_desc.block_type.nbytes, pred=pred)
        if PART != 1:
            for j in gl.static_range(NJ):
                tma.async_copy_global_to_shared(x_desc, [off_m, grp * GROUP + j * KT], bar, x_smem.index(s * NJ + j),
                                                pred=pred)
                if ACT:  # x is [gate | up]: the up slices are K inputs further
                    tma.async_copy_global_to_shared(x_desc, [off_m, K + grp * GROUP + j * KT], bar,
                                                    u_smem.index(s * NJ + j), pred=pred)
        if PART != 2:
            _issue_q_loads(q_desc, q_smem.index(s), bar, grp, off_n, pred, P, KW)

    @gluon.jit
    def _issue_q_loads(q_desc, q_buf, bar, grp, off_n, pred, P: gl.constexpr, KW: gl.constexpr):
        # KW copies of group grp's packed (P, BN) tile side by side into q_buf (KW * P, BN), arriving on bar
        for jj in gl.static_range(KW):
            tma.async_copy_global_to_shared(q_desc, [grp * P, off_n], bar, q_buf.slice(jj * P, P), pred=pred)

    @gluon.jit
    def _produce(x_desc, q_desc, x_smem, u_smem, q_smem, ready, empty, g_lo, n_iter, off_m, off_n, K,
                 GROUP: gl.constexpr, KT: gl.constexpr, KW: gl.constexpr, STAGES: gl.constexpr, ACT: gl.constexpr):
        # warp-specialized producer (one warp): refill each stage as soon as the consumers release it
        for i in range(n_iter):
            s = i % STAGES
            mbarrier.wait(empty.index(s), ((i // STAGES) & 1) ^ 1)
            _issue_loads(x_desc, q_desc, x_smem, u_smem, q_smem, ready.index(s), g_lo + i, s, off_m, off_n, K, True,
                         GROUP, KT, KW, ACT)

    @gluon.jit
    def _consume(x_desc, q_desc, x_smem, u_smem, a_smem, q_smem, ready, empty, s_ptr, z_ptr, N, K, g_lo, n_iter,
                 off_m, off_n, GROUP: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, KT: gl.constexpr,
                 STAGES: gl.constexpr, DKIND: gl.constexpr, ACT: gl.constexpr, WS: gl.constexpr,
                 num_warps: gl.constexpr):
        # dequantize + async wgmma over groups [g_lo, g_lo + n_iter) -> the fp32 (BN, BM) tile of y^T.
        # WS: a producer warp refills the ring (stages released through `empty`); else this loop refills
        # the previous group's stage itself, once that group's MMAs are retired.
        P: gl.constexpr = GROUP // 8
        KW: gl.constexpr = KT // P
        NJ: gl.constexpr = GROUP // KT
        dt: gl.constexpr = x_desc.dtype
        mma: gl.constexpr = _mma_layout(BLOCK_M, num_warps)
        a_l: gl.constexpr = _a_layout(BLOCK_M, num_warps)
        col_l: gl.constexpr = gl.SliceLayout(1, a_l)  # (BN,) per output column n (a row of the A operand)
        TK: gl.constexpr = KT // 8  # threads along KT, 8 inputs each, for the SwiGLU's (BM, KT) slices
        x_l: gl.constexpr = gl.BlockedLayout([1, 8], [32 // TK, TK], [num_warps, 1], [1, 0])
        n_groups = K // GROUP
        # split_for leaves no split empty; said to the compiler, the loop has no zero-trip path, whose accumulator
        # zeros would end the wgmma pipeline early: ptxas serialized every wgmma of the 256-row tiles at 8 warps
        # with split K or a producer warp (C7515, "non wgmma instructions defining accumulator registers")
        gl.assume(n_iter > 0)

        offs_n = off_n + gl.arange(0, BLOCK_N, layout=col_l)
        mask_n = offs_n < N
        # the first group's scale and zero (then always one group ahead, in registers)
        sc = gl.load(s_ptr + g_lo * N + offs_n, mask=mask_n, other=0.0)
        zc = gl.load(z_ptr + g_lo * N + offs_n, mask=mask_n, other=0.0)
        acc = gl.zeros((BLOCK_N, BLOCK_M), dtype=gl.float32, layout=mma)
        a_prev = gl.zeros((BLOCK_N, KT), dtype=dt, layout=a_l)
        for i in range(n_iter):
            s = i % STAGES
            grp = g_lo + i
            sc_g = sc
            zc_g = zc
            nxt = gl.minimum(grp + 1, n_groups - 1)
            sc = gl.load(s_ptr + nxt * N + offs_n, mask=mask_n, other=0.0)
            zc = gl.load(z_ptr + nxt * N + offs_n, mask=mask_n, other=0.0)
            mbarrier.wait(ready.index(s), (i // STAGES) & 1)
            qr, hv, sh_c, sc_i, zc_i = _group_operands(q_smem.index(s), sc_g, zc_g, a_l, GROUP, KT, BLOCK_N, DKIND)
            b_smem, b0 = _b_operand(x_smem, u_smem, a_smem, s, i, NJ, x_l, ACT)
            for j in gl.static_range(NJ):
                a = _dequant_slice(qr, hv, sh_c, sc_i, zc_i, j, KW, DKIND)
                xt = b_smem.index(b0 + j).permute((1, 0))  # (KT, BM): the transposed activation slice
                acc = warpgroup_mma(a, xt, acc, is_async=True)
                # retire all but this MMA: the previous slice's registers and buffers are free again
                acc, a_prev = warpgroup_mma_wait(num_outstanding=1, deps=(acc, a_prev))
                a_prev = a
                if j == 0:  # the previous group's MMAs are retired (in every warpgroup): its stage is free
                    prev = (i + STAGES - 1) % STAGES
                    if WS:
                        mbarrier.arrive(empty.index(prev), pred=i > 0)
                    else:
                        gl.thread_barrier()
                        ahead = i + STAGES - 1
                        _issue_loads(x_desc, q_desc, x_smem, u_smem, q_smem, ready.index(prev), g_lo + ahead, prev,
                                     off_m, off_n, K, ahead < n_iter, GROUP, KT, KW, ACT)
        acc, a_prev = warpgroup_mma_wait(num_outstanding=0, deps=(acc, a_prev))
        return (acc, )

    @gluon.jit
    def _b_operand(x_smem, u_smem, a_smem, s, i, NJ: gl.constexpr, x_l: gl.constexpr, ACT: gl.constexpr):
        # the wgmmas' activation slices of ring stage s (step i) and the index of its first: the stage itself, or
        # with ACT silu(gate) * up of it written to a_smem[i % 2] (step i - 2's MMAs, its readers, are retired)
        if ACT:
            b0 = (i % 2) * NJ
            gl.thread_barrier()
            for j in gl.static_range(NJ):
                gate = x_smem.index(s * NJ + j).load(x_l).to(gl.float32)
                up = u_smem.index(s * NJ + j).load(x_l).to(gl.float32)
                a_smem.index(b0 + j).store((gate / (1.0 + gl.exp(-gate)) * up).to(a_smem.dtype))
            fence_async_shared()
            gl.thread_barrier()
            res = (a_smem, b0)
        else:
            res = (x_smem, s * NJ)
        return res

    @gluon.jit
    def _store_tile(acc, y_ptrs, b_ptr, on, mask, N, HAS_BIAS: gl.constexpr):
        if HAS_BIAS:
            acc += gl.expand_dims(gl.load(b_ptr + on, mask=on < N, other=0.0).to(gl.float32), 1)
        gl.store(y_ptrs, acc.to(y_ptrs.dtype.element_ty), mask=mask)

    @gluon.jit
    def _kernel(x_desc, q_desc, s_ptr, z_ptr, b_ptr, y_ptr, ws_ptr, cnt_ptr, M, N, K, stride_ym, split_k, n_full,
                GROUP: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, KT: gl.constexpr,
                STAGES: gl.constexpr, SPLIT: gl.constexpr, HAS_BIAS: gl.constexpr, DKIND: gl.constexpr,
                ACT: gl.constexpr, WS: gl.constexpr, num_warps: gl.constexpr, PDL: gl.constexpr = False,
                TAIL: gl.constexpr = False):
        # grid (tiles of y^T in grouped order, split_k); TAIL: a 1-D grid of n_full whole tiles, then split_k
        # programs for each later tile (the last partial wave split along K); see the module docstring
        if PDL:
            _gdc_launch()
        P: gl.constexpr = GROUP // 8
        KW: gl.constexpr = KT // P
        NJ: gl.constexpr = GROUP // KT
        GROUP_M: gl.constexpr = 8

        # output tile (pid_m, pid_n) in grouped order, and this split's groups [g_lo, g_lo + n_iter)
        if TAIL:
            pid = gl.program_id(0)
            whole = pid < n_full
            rest = gl.maximum(pid - n_full, 0)
            tile = gl.where(whole, pid, n_full + rest // split_k)
            pid_k = gl.where(whole, 0, rest % split_k)
            sk = gl.where(whole, 1, split_k)
        else:
            tile = gl.program_id(0)
            pid_k = gl.program_id(1)
            sk = split_k
        num_m = gl.cdiv(M, BLOCK_M)
        num_n = gl.cdiv(N, BLOCK_N)
        in_group = GROUP_M * num_n
        first_m = (tile // in_group) * GROUP_M
        size_m = gl.minimum(num_m - first_m, GROUP_M)
        pid_m = first_m + (tile % in_group) % size_m
        pid_n = (tile % in_group) // size_m
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        n_groups = K // GROUP
        per_split = gl.cdiv(n_groups, sk)
        g_lo = pid_k * per_split
        n_iter = gl.minimum(per_split, n_groups - g_lo)

        x_smem, u_smem, a_smem, q_smem, ready, empty = _ring(x_desc, q_desc, STAGES, NJ, KW * P, BLOCK_M, BLOCK_N,
                                                             KT, ACT)
        if WS:
            if PDL:  # the producer warp reads activations from its first copy on
                _gdc_wait()
            res = gl.warp_specialize([
                (_consume, (x_desc, q_desc, x_smem, u_smem, a_smem, q_smem, ready, empty, s_ptr, z_ptr, N, K, g_lo,
                            n_iter, off_m, off_n, GROUP, BLOCK_M, BLOCK_N, KT, STAGES, DKIND, ACT, WS, num_warps)),
                (_produce, (x_desc, q_desc, x_smem, u_smem, q_smem, ready, empty, g_lo, n_iter, off_m, off_n, K,
                            GROUP, KT, KW, STAGES, ACT)),
            ], [1], [24])
        else:
            for st in gl.static_range(STAGES - 1):  # prologue: the first STAGES - 1 groups in flight
                _issue_loads(x_desc, q_desc, x_smem, u_smem, q_smem, ready.index(st), g_lo + st, st, off_m, off_n, K,
                             st < n_iter, GROUP, KT, KW, ACT, 1 if PDL else 0)
            if PDL:  # the weights stream while the previous kernel finishes; its outputs (x) only after the wait
                _gdc_wait()
                for st in gl.static_range(STAGES - 1):
                    _issue_loads(x_desc, q_desc, x_smem, u_smem, q_smem, ready.index(st), g_lo + st, st, off_m,
                                 off_n, K, st < n_iter, GROUP, KT, KW, ACT, 2)
            res = _consume(x_desc, q_desc, x_smem, u_smem, a_smem, q_smem, ready, empty, s_ptr, z_ptr, N, K, g_lo,
                           n_iter, off_m, off_n, GROUP, BLOCK_M, BLOCK_N, KT, STAGES, DKIND, ACT, WS, num_warps)
        acc = res[0]
        for st in gl.static_range(STAGES):
            mbarrier.invalidate(ready.index(st))
            mbarrier.invalidate(empty.index(st))

        # epilogue: y[m, n] = acc[n, m] (+ bias), stored with n contiguous across threads
        out_l: gl.constexpr = gl.BlockedLayout([4, 1], [32, 1], [1, num_warps], [0, 1])
        acc = gl.convert_layout(acc, out_l)
        on = off_n + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, out_l))
        om = off_m + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, out_l))
        mask = gl.expand_dims(on < N, 1) & gl.expand_dims(om < M, 0)
        offs = gl.expand_dims(om, 0) * N + gl.expand_dims(on, 1)
        y_ptrs = y_ptr + gl.expand_dims(om, 0) * stride_ym + gl.expand_dims(on, 1)
        if SPLIT:  # this split's partial, then the last program of the tile to arrive sums them in split order
            # (TAIL: a whole tile too, as a split of one: a branch around this path did not lower in Triton 3.6)
            MN = M * N
            gl.store(ws_ptr + pid_k * MN + offs, acc, mask=mask)
            gl.thread_barrier()
            arrived = gl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel")
            if arrived == sk - 1:
                gl.thread_barrier()
                acc = gl.zeros((BLOCK_N, BLOCK_M), dtype=gl.float32, layout=out_l)
                for k in range(sk):
                    acc += gl.load(ws_ptr + k * MN + offs, mask=mask, other=0.0, cache_modifier=".cg")
                _store_tile(acc, y_ptrs, b_ptr, on, mask, N, HAS_BIAS)
                gl.atomic_xchg(cnt_ptr + tile, 0)
        else:
            _store_tile(acc, y_ptrs, b_ptr, on, mask, N, HAS_BIAS)

    @gluon.jit
    def _dequant_kernel(q_desc, s_ptr, z_ptr, w_ptr, N, K, GROUP: gl.constexpr, BLOCK_M: gl.constexpr,
                        BLOCK_N: gl.constexpr, KT: gl.constexpr, DKIND: gl.constexpr, num_warps: gl.constexpr):
        # grid (cdiv(N, BN), K // g): program (pid_n, grp) writes its (BN, g) weights to w (N, K) exactly as
        # `_consume` hands them to the wgmmas (same TMA copies, register layout and dequantization); a probe
        P: gl.constexpr = GROUP // 8
        KW: gl.constexpr = KT // P
        a_l: gl.constexpr = _a_layout(BLOCK_M, num_warps)
        off_n = gl.program_id(0) * BLOCK_N
        grp = gl.program_id(1)
        q_buf = gl.allocate_shared_memory(gl.int32, [KT, BLOCK_N], q_desc.layout)
        bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        mbarrier.init(bar, count=1)
        mbarrier.expect(bar, KW * q_desc.block_type.nbytes)
        _issue_q_loads(q_desc, q_buf, bar, grp, off_n, True, P, KW)
        mbarrier.wait(bar, 0)
        mbarrier.invalidate(bar)
        offs_n = off_n + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, a_l))
        offs_k = gl.arange(0, KT, layout=gl.SliceLayout(0, a_l))
        mask_n = offs_n < N
        sc = gl.load(s_ptr + grp * N + offs_n, mask=mask_n, other=0.0)
        zc = gl.load(z_ptr + grp * N + offs_n, mask=mask_n, other=0.0)
        qr, hv, sh_c, sc_i, zc_i = _group_operands(q_buf, sc, zc, a_l, GROUP, KT, BLOCK_N, DKIND)
        for j in gl.static_range(GROUP // KT):
            a = _dequant_slice(qr, hv, sh_c, sc_i, zc_i, j, KW, DKIND)
            ptrs = w_ptr + gl.expand_dims(offs_n, 1) * K + grp * GROUP + j * KT + gl.expand_dims(offs_k, 0)
            gl.store(ptrs, a, mask=gl.expand_dims(mask_n, 1))


_GL_DTYPE = {torch.float16: "float16", torch.bfloat16: "bfloat16"}
_DKIND = {torch.float16: 1, torch.bfloat16: 2}


@functools.lru_cache(maxsize=None)
def layouts(BM: int, BN: int, KT: int, g: int, dtype: torch.dtype):
    """Shared-memory layouts of an activation slice (BM, KT) and the packed weight buffer (KW * g/8, BN)."""
    x_l = gl.NVMMASharedLayout.get_default_for([BM, KT], getattr(gl, _GL_DTYPE[dtype]))
    return x_l, packed_layout()


def packed_layout():
    """Shared-memory layout of TMA tiles of qweight: unswizzled int32 rows (sliced by g/8 rows, read row-major)."""
    return gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=32, rank=2)


def dequantize_gluon(w, dtype: torch.dtype = torch.float16, config: str = "gl_m64_n64_k16_s4_c2") -> torch.Tensor:
    """(N, K) weights of `w` as config's MMAs see them (the kernel's TMA copies, register layout and dequantization,
    no MMA): equals `w4a16.dequantize_w4(w, dtype)` exactly when the operand is right. A probe (w on an sm_90 GPU)."""
    BM, BN, KT, _, warps, _, _ = GLUON_CONFIGS[config]
    N, K, g = w.N, w.K, w.group_size
    if not fits(config, g, False) or N % 4:
        raise ValueError(f"gluon dequantize: config {config} does not serve g={g}, N={N}")
    out = torch.empty(N, K, device=w.device, dtype=dtype)
    q_desc = TensorDescriptor(w.qweight, [K // 8, N], [N, 1], [g // 8, BN], layouts(BM, BN, KT, g, dtype)[1])
    _dequant_kernel[(cdiv(N, BN), K // g)](q_desc, w.scales, w.zeros, out, N, K, GROUP=g, BLOCK_M=BM, BLOCK_N=BN,
                                          KT=KT, DKIND=_DKIND[dtype], num_warps=warps)
    return out


def tail_split(tiles: int, n_groups: int, n_sm: int) -> tuple[int, int]:
    """(whole tiles, the split of each later one) for a split-0 (`_tl`) config: the full waves of tiles run whole, and
    each tile of the last partial wave is split along K so that they fill about one wave, never into an empty split
    (e.g. 172 tiles on 132 SMs: 132 whole, then 40 x 3 programs, ~1.33 waves of work instead of 2)."""
    rem = tiles % n_sm if tiles >= n_sm else tiles
    split = no_empty_split(n_groups, n_sm // rem if rem else 1)
    return (tiles, 1) if rem == 0 or split == 1 else (tiles - rem, split)


def w4a16_gluon_linear(x: torch.Tensor, w, bias: torch.Tensor | None = None,
                       config: str | tuple = "gl_m64_n64_k16_s4_c2", act: str | None = None,
                       out: torch.Tensor | None = None, pdl: bool = False) -> torch.Tensor:
    """y = x @ dequant(w).T (+ bias); x (..., K) fp16/bf16 on an sm_90 GPU, w: `W4Weight` (N % 4 == 0).
    act="silu_mul": x is (..., 2K) = [gate | up] and y = silu_mul(x) @ dequant(w).T. pdl: launched with programmatic
    dependent launch (pdl.py): the first groups' weight copies are issued before the wait for the previous kernel."""
    BM, BN, KT, stages, warps, split, ws_ = GLUON_CONFIGS[config] if isinstance(config, str) else config
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1 or x2.data_ptr() % 16 or (x2.stride(0) * x2.element_size()) % 16:
        x2 = x2.contiguous()
    M, N, K, g = x2.shape[0], w.N, w.K, w.group_size
    P = g // 8
    if (not applicable(x2, w, act is not None) or x2.shape[1] != (2 * K if act else K)
            or (isinstance(config, str) and not fits(config, g, act is not None)) or KT % P or KT > g):
        raise ValueError(f"gluon W4A16: unsupported call (x {tuple(x2.shape)} {x2.dtype}, N={N}, K={K}, g={g}, "
                         f"KT={KT}, act={act})")
    stages = stages_for(BM, BN, KT, g, stages, act is not None, x2.element_size())
    tiles = cdiv(M, BM) * cdiv(N, BN)
    n_full, grid = tiles, None
    if split == 0:   # whole tiles, the last partial wave split along K to fill the SMs
        n_full, split = tail_split(tiles, K // g, sm_count(x2.device, cpu=4))
        grid = (n_full + (tiles - n_full) * split,) if split > 1 else None
    else:
        split = split_for(M, N, K, g, BM, BN, split, x2.device)
    y = out if out is not None else torch.empty(M, N, device=x2.device, dtype=x2.dtype)
    x_l, q_l = layouts(BM, BN, KT, g, x2.dtype)
    x_desc = TensorDescriptor(x2, [M, x2.shape[1]], [x2.stride(0), 1], [BM, KT], x_l)
    q_desc = TensorDescriptor(w.qweight, [K // 8, N], [N, 1], [P, BN], q_l)
    ws = torch.empty(split, M, N, device=x2.device, dtype=torch.float32) if split > 1 else y
    cnt = arrival_counters(x2.device, tiles) if split > 1 else y
    _kernel[grid or (tiles, split)](x_desc, q_desc, w.scales, w.zeros, bias if bias is not None else y, y, ws, cnt,
                                    M, N, K, y.stride(0), split, n_full, GROUP=g, BLOCK_M=BM, BLOCK_N=BN, KT=KT,
                                    STAGES=stages, SPLIT=split > 1, HAS_BIAS=bias is not None,
                                    DKIND=_DKIND[x2.dtype], ACT=act is not None, WS=bool(ws_), num_warps=warps,
                                    PDL=pdl, TAIL=grid is not None, **launch_kwargs(pdl))
    return y.reshape(*x.shape[:-1], N)
