"""Output-tile index helpers shared by the tiled GEMM kernels (`w4a16`, `w4a16_swap`, `int8_gemm`), and the split-K
count their launchers (Triton and Gluon W4A16) share."""
from __future__ import annotations

import triton
import triton.language as tl

from pipeline.kernels.dispatch import cdiv, sm_count


def split_for(M: int, N: int, K: int, g: int, BM: int, BN: int, split: int, device) -> int:
    """Programs along K: fixed (split > 0), or enough for about -split programs per SM; never an empty split."""
    G = K // g
    if split <= 0:
        split = cdiv(-split * sm_count(device, cpu=4), cdiv(M, BM) * cdiv(N, BN))
    return no_empty_split(G, split)


def no_empty_split(G: int, split: int) -> int:
    """`split` clamped to 1..G groups and lowered until every one of the splits gets at least one of the G groups."""
    split = max(1, min(G, split))
    return cdiv(G, cdiv(G, split))


@triton.jit
def tile_ids(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    # (pid_m, pid_n) of output tile pid in grouped order: GROUP_M row tiles share each column tile (L2 reuse)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    in_group = GROUP_M * num_pid_n
    first_m = (pid // in_group) * GROUP_M
    size_m = tl.minimum(num_pid_m - first_m, GROUP_M)
    return first_m + (pid % in_group) % size_m, (pid % in_group) // size_m


@triton.jit
def tile_offsets(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    # rows and columns of output tile pid (grouped order) and their bounds masks; columns hinted contiguous
    pid_m, pid_n = tile_ids(pid, M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_n = tl.max_contiguous(tl.multiple_of(offs_n, BLOCK_N), BLOCK_N)
    return offs_m, offs_n, offs_m < M, offs_n < N
