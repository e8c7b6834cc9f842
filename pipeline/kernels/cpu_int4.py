"""W4A16 on an x86 CPU: int4 weights times int8-quantized activations with integer dot products (llama.cpp's
Q4 x Q8 design), in a small C kernel (csrc/int4_cpu.c) compiled once per machine and loaded with ctypes.

Usage:
    lin = Int4CPU(w)                 # w: W4Weight (K % 64 == 0, N % 16 == 0, group % 64 == 0); repacked once
    y = lin(x)                       # x (..., K) float -> (..., N) fp32
    y_ref = int4_cpu_ref(x, lin)     # the PyTorch reference of the same arithmetic
    available()                      # False where no C compiler / no AVX2 (PIPELINE_CPU_KERNEL=0 turns it off)

The math, per activation row m and output column n (codes q in [0, 15], per-group scale s and zero z):
    x is quantized per block b of 64 in two int8 terms: d = max|x_b| / 127, q1 = round(x_b / d),
    q2 = round((x_b - d q1) * 256 / d), so x_b ~= d (q1 + q2 / 256) to ~15 bits
    y[m, n] = sum_b s[n, g(b)] d[m, b] (256 q_n.q1 + q_n.q2)_b / 256  -  sum_g s[n, g] z[n, g] sum_{b in g} x_b~
i.e. (q - z) * s against x, with the dot products in int32 (AVX512-VNNI `vpdpbusd`, or AVX2). The int4 bytes a
token reads are those of PyTorch's int4 op; the integer dots make the kernel memory-bound at one row where
`_weight_int4pack_mm_for_cpu` (bf16 FMAs) is compute-bound at ~19 GMAC/s a core (docs/perf-log.md, session 11).
One int8 term (llama.cpp's Q8 activations) moved SmolLM2's perplexity 0.54% off the evaluate stage's; the second
term keeps the input as precise as a bf16 one (tests/test_native_smollm2.py runs every row through this kernel).

The library: built once per machine by pipeline/kernels/cpu_build.py (the system's C compiler, the best ISA this
CPU reports: AVX512-VNNI, else AVX2 + FMA). No compiler or no AVX2: `available()` is False and int4 linears stay on
PyTorch's int4 op. `Int4CPU(w, isa="avx2")` loads another ISA's build (the tests run both).
"""
from __future__ import annotations

import ctypes
import os
from typing import Optional

import torch

from . import cpu_build
from .w4a16 import W4Weight, unpack_w4

QB = 64                      # activation block: 64 codes
NT = 16                      # output columns a tile interleaves
def library(isa: Optional[str] = None) -> Optional[ctypes.CDLL]:
    """csrc/int4_cpu.c built for `isa` (default: the best this CPU runs; cpu_build.load), or None."""
    lib = cpu_build.load("int4_cpu", isa)
    if lib is not None and lib.int4_cpu_linear.argtypes is None:
        lib.int4_cpu_linear.restype = ctypes.c_int
        lib.int4_cpu_linear.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int] * 5
    return lib


def kernel_threads() -> int:
    """OpenMP threads of a kernel call: PIPELINE_CPU_KERNEL_THREADS (default 1: with OMP_WAIT_POLICY=passive, which
    pipeline/__init__.py sets for torch's sake, waking a second thread for each ~40 us call cost more than it gave:
    a batch-1 decode step 2.2x slower on the 2-core VM)."""
    return int(os.environ.get("PIPELINE_CPU_KERNEL_THREADS", 1))


def available() -> bool:
    return library() is not None


def supports(w: W4Weight) -> bool:
    return w.K % QB == 0 and w.N % NT == 0 and (w.group_size % QB == 0 or w.group_size == w.K)


def pack_tiles(q: torch.Tensor) -> torch.Tensor:
    """Codes (N, K) uint8 in [0, 15] -> (N/16, K/8, 16, 4) uint8: for 16 rows and 8 codes k0..k0+7, byte i of a
    row holds codes k0 + i (low nibble) and k0 + 4 + i (high)."""
    N, K = q.shape
    t = q.reshape(N // NT, NT, K // 8, 2, 4)
    return (t[:, :, :, 0] | (t[:, :, :, 1] << 4)).permute(0, 2, 1, 3).contiguous()


def unpack_tiles(p: torch.Tensor) -> torch.Tensor:
    """Inverse of pack_tiles: (N/16, K/8, 16, 4) uint8 -> (N, K) uint8."""
    T, C = p.shape[:2]
    t = torch.stack([p & 0xF, p >> 4], 3)                             # (T, K/8, 16, 2, 4)
    return t.permute(0, 2, 1, 3, 4).reshape(T * NT, C * 8)


def tile_cols(v: torch.Tensor) -> torch.Tensor:
    """(G, N) per-group values -> (N/16, G, 16) fp32, the kernel's order."""
    G, N = v.shape
    return v.float().reshape(G, N // NT, NT).permute(1, 0, 2).contiguous()


class Int4CPU:
    """A W4A16 linear on the C kernel: the weight repacked once (pack_tiles; fp32 s and s * z per group, tiled)."""

    def __init__(self, w: W4Weight, threads: Optional[int] = None, isa: Optional[str] = None):
        if not supports(w):
            raise ValueError(f"Int4CPU needs K % 64 == 0, N % 16 == 0 and group % 64 == 0 (got K={w.K}, N={w.N}, "
                             f"group={w.group_size})")
        q, s, z = unpack_w4(w)                                        # (N, K) uint8, (G, N) fp16 x2
        self.packed = pack_tiles(q)                                   # (N/16, K/8, 16, 4) uint8
        self.ws = tile_cols(s)                                        # (N/16, G, 16) fp32
        self.wm = tile_cols(s.float() * z.float())                    # s * z, (N/16, G, 16) fp32
        self.N, self.K, self.group_size = w.N, w.K, w.group_size
        self.threads = threads or kernel_threads()
        self.dtype = torch.float32
        lib = library(isa)
        if lib is None:
            raise RuntimeError(f"the CPU int4 kernel is not available ({isa or 'best ISA'}; see cpu_int4.library)")
        self.isa = cpu_build.isa_of(lib)
        self._fn = lib.int4_cpu_linear
        self._ptrs = (self.packed.data_ptr(), self.ws.data_ptr(), self.wm.data_ptr())

    def __call__(self, x: torch.Tensor, bias=None) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.K)                                    # (M, K)
        if x2.dtype != torch.float32 or not x2.is_contiguous():
            x2 = x2.float().contiguous()
        M = x2.shape[0]
        y = torch.empty(M, self.N, dtype=torch.float32)
        if M:
            rc = self._fn(x2.data_ptr(), *self._ptrs, y.data_ptr(), M, self.N, self.K, self.group_size, self.threads)
            if rc:
                raise MemoryError(f"int4_cpu_linear: no scratch memory for {x2.shape[0]} x {self.K} activations")
        if bias is not None:
            y += bias.float()
        return y.reshape(*shape[:-1], self.N)


def quantize_blocks_ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (M, K) fp32 -> (q1, q2 (M, K/64, 64) int8 values as fp32, d (M, K/64) fp32): the kernel's activation
    rounding, x ~= d * (q1 + q2 / 256)."""
    xb = x.float().reshape(x.shape[0], -1, QB)
    d = xb.abs().amax(-1) / 127
    inv = torch.where(d > 0, 1 / d, torch.zeros_like(d))[..., None]
    q1 = torch.round(xb * inv)
    q2 = torch.round((xb - q1 * d[..., None]) * (inv * 256)).clamp_(-128, 127)
    return q1, q2, d


def int4_cpu_ref(x: torch.Tensor, lin: Int4CPU) -> torch.Tensor:
    """PyTorch reference of int4_cpu.c: (..., K) -> (..., N) fp32, the same quantization and sums (fp64 dots)."""
    shape, N, K, g = x.shape, lin.N, lin.K, lin.group_size
    q1, q2, d = quantize_blocks_ref(x.reshape(-1, K))                 # (M, KB, 64) x2, (M, KB)
    a = q1.double() + q2.double() / 256                               # the activations the kernel multiplies, / d
    q = unpack_tiles(lin.packed).double().reshape(N, K // QB, QB)     # (N, KB, 64)
    dots = torch.einsum("mbk,nbk->mnb", a, q)                         # (M, N, KB)
    gb = g // QB
    ws, wm = (v.permute(0, 2, 1).reshape(N, -1).double() for v in (lin.ws, lin.wm))   # (N, G)
    y = (dots * ws.repeat_interleave(gb, 1)[None] * d.double()[:, None]).sum(-1)       # (M, N)
    dsum = (d.double() * a.sum(-1)).reshape(a.shape[0], -1, gb).sum(-1)               # (M, G)
    y = y - dsum @ wm.t()
    return y.float().reshape(*shape[:-1], N)
