"""W4A16 kernel configs: the named set the tuner chooses from, per M bucket (`pipeline.kernels.w4a16` launches them).

Every name here is exercised by `tests/test_kernel_w4a16.py` on a GPU (`candidates(M)` at real sizes).
"""
from __future__ import annotations

# name -> (BLOCK_M, BLOCK_N, split, num_warps, num_stages, sliced, px); split > 0: that many programs
# along K; split < 0: split K until about -split programs per SM; sliced 1: 8 dots of K = g/8 per group
# (g = 128 only) instead of one reshaped dot of K = g. ("fma", BLOCK_N, split, warps, stages): the
# CUDA-core GEMV, one program per activation row. ("wide", BLOCK_N, KS, warps, h2): the CUDA-core GEMV
# that loads KS whole groups at once (split = K/g/KS programs along K), h2: fp16x2 inline-PTX arithmetic
# (fp16 on a GPU; elsewhere fp32). None: Triton dequantize + cuBLAS. px (`_px`): the 8 slices
# unpacked by inline PTX, two nibbles per instruction (fp16 on a GPU; elsewhere the plain unpack).
# ("swap", BLOCK_M, BLOCK_N, split, warps, stages, kw): `w4a16_swap._w4a16_swap_kernel`, y^T = W x^T with the
# dequantized weights as the MMA's register operand; split as above; kw nibble planes (of g/8 inputs) per dot;
# an 8th field 1 (`_pr`, fp16): the pair unpack (`w4a16_swap._pairs`: one lop3 per two weights, the inputs of a
# group reordered to match, one dot of K = g), 21-40% fewer instructions a group for 16-32-row tiles (sm_90 SASS).
# `_s8`: a deeper cp.async ring (8 stages: 6 groups' loads outstanding instead of 2, per the sm_90 SASS). Of the deeper
# rings timed on an H100 (session 19: 16 x 64 pairs at c4 / c2, 32 x 64 and 64 x 64 `_k8` at 6 stages) only this one
# won a 7B shape: 4096 x 12288 at M = 2-16, 26.4 against 27.8 us at M = 16 (docs/perf-log.md, session 19).
# an 8th field 2 (`_np`, fp16): natural pairs (`w4a16_swap._np_plane`: words p and p + 1 of a plane made one fp16 pair
# by prmt + lop3, ~1.1 instructions a weight): the group's k order is the layout's own, so the activations reach the
# MMA as loaded; in the sm_90 SASS of the 16 x 64 tile (g64) the loop has no shared-memory permutation, fence or
# second barrier and its four wgmmas are not each waited for (`DEPBAR.LE gsb0, 0x3`): 175 instructions against 156
# (`_pr`, which waits for all four) and 214 (`_k8`). Not yet timed on a GPU.
# a 9th field U (`_u2`): the group loop unrolled U times before Triton pipelines it (`tl.range(loop_unroll_factor)`),
# so the ring's index arithmetic, barriers and wgmma fences are paid once per U groups: sm_90 SASS, g64, loop
# instructions per group 175 -> 135 (16 x 64 `_np`), 156 -> 135 (`_pr`), 213 -> 177 (32 x 64 `_k8`); a 16-row tile's
# four warps issue ~4 x 175 instructions a group on each scheduler at 4 programs an SM, about the time its 8 KB
# take at 3 TB/s, so the decode tiles are near issue-bound. Not yet timed on a GPU.
CONFIGS = {
    "wide_n64_s4": ("wide", 64, 4, 4, 0),
    "wide_n128_s2": ("wide", 128, 2, 4, 0),
    "wide_n64_s4_h2": ("wide", 64, 4, 4, 1),
    "wide_n128_s2_h2": ("wide", 128, 2, 4, 1),
    "wide_n32_s8_h2": ("wide", 32, 8, 4, 1),
    "wide_n32_s4_w2_h2": ("wide", 32, 4, 2, 1),
    "wide_n128_s4_h2": ("wide", 128, 4, 4, 1),
    "wide_n64_s8_h2": ("wide", 64, 8, 4, 1),
    "fma_n128_c4": ("fma", 128, -4, 4, 4),
    "fma_n64_c8": ("fma", 64, -8, 2, 4),
    "fma_n256_c2": ("fma", 256, -2, 8, 3),
    "gemv_n64_c8_sl": (16, 64, -8, 4, 4, 1, 0),
    "gemv_n32_c8_sl": (16, 32, -8, 2, 4, 1, 0),
    "gemv_n64_c4": (16, 64, -4, 4, 4, 0, 0),
    "gemv_n64_c8": (16, 64, -8, 4, 3, 0, 0),
    "gemv_n64_c4_sl": (16, 64, -4, 4, 4, 1, 0),
    "gemv_n128_c8_sl": (16, 128, -8, 4, 3, 1, 0),
    "gemv_n32_c8_px": (16, 32, -8, 2, 4, 1, 1),
    "gemv_n64_c8_px": (16, 64, -8, 4, 4, 1, 1),
    "gemv_n64_c4_px": (16, 64, -4, 4, 4, 1, 1),
    "gemv_n128_c8_px": (16, 128, -8, 4, 3, 1, 1),
    "gemv_n64_c16_px": (16, 64, -16, 4, 4, 1, 1),
    "tile_m32_n64_c4_sl": (32, 64, -4, 4, 4, 1, 0),
    "swap_m16_n64_c4": ("swap", 16, 64, -4, 4, 4, 1),
    "swap_m16_n64_c8": ("swap", 16, 64, -8, 4, 3, 1),
    "swap_m32_n128_c2": ("swap", 32, 128, -2, 4, 3, 1),
    "swap_m16_n64_c8_k8": ("swap", 16, 64, -8, 4, 3, 8),
    "swap_m32_n128_c2_k8": ("swap", 32, 128, -2, 4, 3, 8),
    "swap_m32_n64_c4_k8": ("swap", 32, 64, -4, 4, 4, 8),
    "swap_m16_n64_c4_pr": ("swap", 16, 64, -4, 4, 4, 8, 1),
    "swap_m16_n64_c8_pr": ("swap", 16, 64, -8, 4, 3, 8, 1),
    "swap_m16_n128_c4_pr": ("swap", 16, 128, -4, 4, 3, 8, 1),
    "swap_m16_n128_c8_pr": ("swap", 16, 128, -8, 4, 3, 8, 1),
    "swap_m32_n64_c4_pr": ("swap", 32, 64, -4, 4, 4, 8, 1),
    "swap_m32_n128_c2_pr": ("swap", 32, 128, -2, 4, 3, 8, 1),
    "swap_m32_n256_c2_pr": ("swap", 32, 256, -2, 8, 3, 8, 1),
    "swap_m64_n128_c2_pr": ("swap", 64, 128, -2, 8, 3, 8, 1),
    "swap_m64_n128_c1_pr": ("swap", 64, 128, -1, 8, 3, 8, 1),
    "swap_m16_n64_c2_s8_pr": ("swap", 16, 64, -2, 4, 8, 8, 1),
    "swap_m16_n64_c4_np": ("swap", 16, 64, -4, 4, 4, 8, 2),
    "swap_m16_n64_c8_np": ("swap", 16, 64, -8, 4, 3, 8, 2),
    "swap_m16_n64_c2_s8_np": ("swap", 16, 64, -2, 4, 8, 8, 2),
    "swap_m32_n64_c4_np": ("swap", 32, 64, -4, 4, 4, 8, 2),
    "swap_m64_n64_c2_np": ("swap", 64, 64, -2, 4, 4, 8, 2),
    "swap_m16_n64_c4_np_u2": ("swap", 16, 64, -4, 4, 4, 8, 2, 2),
    "swap_m16_n64_c8_np_u2": ("swap", 16, 64, -8, 4, 3, 8, 2, 2),
    "swap_m16_n64_c2_s8_np_u2": ("swap", 16, 64, -2, 4, 8, 8, 2, 2),
    "swap_m16_n64_c4_pr_u2": ("swap", 16, 64, -4, 4, 4, 8, 1, 2),
    "swap_m32_n64_c4_np_u2": ("swap", 32, 64, -4, 4, 4, 8, 2, 2),
    "swap_m32_n64_c4_k8_u2": ("swap", 32, 64, -4, 4, 4, 8, 0, 2),
    "swap_m64_n64_c4_k8": ("swap", 64, 64, -4, 4, 4, 8),
    "swap_m64_n64_c2_k8": ("swap", 64, 64, -2, 4, 4, 8),
    "swap_m128_n128_c1": ("swap", 128, 128, -1, 8, 3, 1),
    "swap_m128_n128_c1_k4": ("swap", 128, 128, -1, 8, 3, 4),
    "swap_m128_n64_c1_k8": ("swap", 128, 64, -1, 4, 3, 8),
    "swap_m128_n64_c2_k4": ("swap", 128, 64, -2, 4, 3, 4),
    "swap_m256_n128_c1_k4": ("swap", 256, 128, -1, 8, 3, 4),
    # ("swapk", BLOCK_M, BLOCK_N, ctas, warps, stages, kw, pairs[, nested]): `w4a16_streamk`, the swap tile
    # persistent and stream-K: ctas programs an SM, one wave, each streaming an equal run of (tile, group) steps
    # across tile boundaries; only tiles cut between programs take a split-K finish. The decode configs' times fit
    # ~9-23 us fixed + bytes at 1.5-2.5 TB/s (session 21's tuning times, M = 16): this aims at the fixed part.
    # Not yet timed.
    "swapk_m16_n64_c2_np": ("swapk", 16, 64, 2, 4, 4, 8, 2),
    "swapk_m16_n64_c4_np": ("swapk", 16, 64, 4, 4, 4, 8, 2),
    "swapk_m16_n64_c2_s8_np": ("swapk", 16, 64, 2, 4, 8, 8, 2),
    "swapk_m16_n64_c2_pr": ("swapk", 16, 64, 2, 4, 4, 8, 1),
    "swapk_m16_n128_c2_np": ("swapk", 16, 128, 2, 4, 4, 8, 2),
    "swapk_m16_n64_c4_k8": ("swapk", 16, 64, 4, 4, 4, 8, 0),
    "swapk_m32_n64_c2_np": ("swapk", 32, 64, 2, 4, 4, 8, 2),
    "swapk_m32_n64_c4_np": ("swapk", 32, 64, 4, 4, 4, 8, 2),
    "swapk_m32_n64_c2_k8": ("swapk", 32, 64, 2, 4, 4, 8, 0),
    "swapk_m64_n64_c2_np": ("swapk", 64, 64, 2, 4, 4, 8, 2),
    # a 9th field 1 (`_nl`): a loop over the run's tiles around the pipelined loop over groups, so the accumulator is
    # not read in the pipelined loop and its wgmmas are not each waited for (the ring drains at a tile end instead)
    "swapk_m16_n64_c2_np_nl": ("swapk", 16, 64, 2, 4, 4, 8, 2, 1),
    "swapk_m16_n64_c4_np_nl": ("swapk", 16, 64, 4, 4, 4, 8, 2, 1),
    "swapk_m16_n64_c2_s8_np_nl": ("swapk", 16, 64, 2, 4, 8, 8, 2, 1),
    "swapk_m32_n64_c2_np_nl": ("swapk", 32, 64, 2, 4, 4, 8, 2, 1),
    "dequant_cublas": None,
    # the same with W dequantized as (N, K), then F.linear: the GEMM fp16 checkpoints (and the bench's fp16 baseline)
    # run, TN, where the (K, N) scratch makes cuBLAS run NN (session 7's profile: different kernels). Not yet timed.
    "dequant_cublas_nk": ("dequant_nk",),
}
SWAP_DECODE = ("swap_m16_n64_c4", "swap_m16_n64_c8", "swap_m16_n64_c8_k8", "swap_m16_n64_c4_pr", "swap_m16_n64_c8_pr",
               "swap_m16_n128_c4_pr", "swap_m16_n128_c8_pr", "swap_m16_n64_c2_s8_pr",
               "swap_m16_n64_c4_np", "swap_m16_n64_c8_np", "swap_m16_n64_c2_s8_np", "swap_m16_n64_c4_np_u2",
               "swap_m16_n64_c8_np_u2", "swap_m16_n64_c2_s8_np_u2", "swap_m16_n64_c4_pr_u2",
               "swapk_m16_n64_c2_np", "swapk_m16_n64_c4_np", "swapk_m16_n64_c2_s8_np", "swapk_m16_n64_c2_pr",
               "swapk_m16_n128_c2_np", "swapk_m16_n64_c4_k8", "swapk_m16_n64_c2_np_nl", "swapk_m16_n64_c4_np_nl",
               "swapk_m16_n64_c2_s8_np_nl")
SWAP_MID = ("swap_m32_n128_c2", "swap_m32_n128_c2_k8", "swap_m32_n64_c4_k8", "swap_m64_n64_c4_k8", "swap_m64_n64_c2_k8",
            "swap_m32_n64_c4_pr", "swap_m32_n128_c2_pr", "swap_m32_n256_c2_pr", "swap_m64_n128_c2_pr",
            "swap_m32_n64_c4_np", "swap_m64_n64_c2_np", "swap_m32_n64_c4_np_u2", "swap_m32_n64_c4_k8_u2",
            "swapk_m32_n64_c2_np", "swapk_m32_n64_c4_np", "swapk_m32_n64_c2_k8", "swapk_m64_n64_c2_np",
            "swapk_m32_n64_c2_np_nl")
SWAP_PREFILL = ("swap_m128_n128_c1", "swap_m128_n128_c1_k4", "swap_m128_n64_c1_k8", "swap_m128_n64_c2_k4",
                "swap_m256_n128_c1_k4", "swap_m64_n128_c1_pr")
DECODE_SET = ("gemv_n64_c4", "gemv_n64_c8", "gemv_n64_c4_sl", "gemv_n128_c8_sl", "gemv_n64_c8_sl",
              "gemv_n32_c8_sl", "gemv_n32_c8_px", "gemv_n64_c8_px", "gemv_n64_c4_px", "gemv_n128_c8_px",
              "gemv_n64_c16_px") + SWAP_DECODE
WIDE_SET = ("wide_n64_s4", "wide_n128_s2", "wide_n64_s4_h2", "wide_n128_s2_h2", "wide_n32_s8_h2",
            "wide_n32_s4_w2_h2", "wide_n128_s4_h2", "wide_n64_s8_h2")
FMA_SET = ("fma_n128_c4", "fma_n64_c8", "fma_n256_c2") + WIDE_SET  # tried too for M <= 4
MID_SET = ("gemv_n64_c4_sl", "tile_m32_n64_c4_sl") + SWAP_MID
PREFILL_SET = ("dequant_cublas", "dequant_cublas_nk") + SWAP_PREFILL
INTERPRET_CONFIG = (16, 32, 2, 4, 1, 0, 0)


def swap_fields(cfg: tuple) -> tuple:
    """A swap config's (BLOCK_M, BLOCK_N, split, warps, stages, kw, pairs, unroll): the 8th (pairs) and 9th (unroll)
    fields are optional, 0 and 1 where a config leaves them out."""
    return (*cfg, *(0, 1)[len(cfg) - 7:])[1:]


def uses_pairs(name: str) -> bool:
    """A swap config with a pair unpack (pairs 1 or 2; fp16 activations only)."""
    cfg = CONFIGS.get(name)
    if cfg and cfg[0] == "swapk":
        return cfg[7] in (1, 2)
    return bool(cfg and cfg[0] == "swap" and swap_fields(cfg)[6] in (1, 2))


def candidates(M: int) -> tuple[str, ...]:
    if M <= 4:
        return FMA_SET + DECODE_SET
    return DECODE_SET if M <= 16 else MID_SET if M <= 64 else PREFILL_SET


# Gluon kernels (`w4a16_gluon.py`, sm_90 only; names -> `w4a16_gluon.GLUON_CONFIGS`): timed next to the above for
# M >= 16 where `w4a16_gluon.available(device)` and the call fits the kernel (see `gluon_candidates`).
GLUON_DECODE = ("gl_m16_n64_k16_s4_c4", "gl_m16_n64_k16_s4_c4_ws", "gl_m16_n64_k32_s4_c8", "gl_m16_n64_k16_s8_c4",
                "gl_m16_n128_k16_s4_c4", "gl_m16_n128_k16_s8_c4", "gl_m16_n256_k16_s4_c4")
GLUON_MID = ("gl_m32_n64_k16_s4_c4", "gl_m32_n64_k16_s4_c4_ws", "gl_m32_n128_k16_s4_c4", "gl_m64_n64_k16_s4_c2",
             "gl_m64_n64_k16_s4_c2_ws", "gl_m64_n128_k16_s4_c2", "gl_m64_n128_k16_s6_c2", "gl_m64_n256_k16_s4_c2",
             "gl_m32_n256_k16_s4_c4")
GLUON_PREFILL = ("gl_m128_n128_k16_s4", "gl_m128_n128_k16_s4_ws", "gl_m128_n128_k32_s3", "gl_m256_n128_k16_s3",
                 "gl_m128_n256_k16_s3_ws", "gl_m64_n128_k16_s4", "gl_m128_n128_k16_s4_ws_k2", "gl_m256_n128_k16_s3_k4",
                 "gl_m128_n256_k16_s3_ws_k2", "gl_m128_n128_k16_s4_ws_tl", "gl_m128_n256_k16_s3_ws_tl",
                 "gl_m256_n128_k16_s3_ws", "gl_m256_n128_k16_s3_ws_tl")


def gluon_candidates(M: int) -> tuple[str, ...]:
    """Gluon configs worth timing at M rows (none below 16: the GEMVs and BLOCK_M = 16 tiles own decode)."""
    return () if M < 16 else GLUON_DECODE if M <= 16 else GLUON_MID if M <= 64 else GLUON_PREFILL


def tuning_set(M: int, pdl: bool) -> tuple[str, ...]:
    """What the tuner times. With PDL at M = 1 only the wide GEMVs, which issue their weight loads before the
    wait: in launch chains with PDL they beat every looped kernel on all four Llama-7B shapes (1.58-2.35x of
    the roofline against 2.01-3.73x, bench/results/w4a16_decode_pdl_v1.json), which one launch timed alone
    cannot show. Not at M = 2..4: the wide GEMV reads the weights once per row, and at M = 4 with PDL it ran
    5.0-5.5x against 1.98-4.14x for gemv_n64_c4_sl (w4a16_decode_wtc_rejected.json)."""
    return WIDE_SET if pdl and M == 1 else candidates(M)


def default_config(M: int) -> str:
    return "gemv_n64_c4" if M <= 16 else "swap_m64_n64_c4_k8" if M <= 64 else "swap_m128_n128_c1"
