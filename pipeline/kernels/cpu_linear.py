"""The CPU backend's linears on our C kernels (csrc/linear_cpu.c, compiled once per machine, loaded with ctypes):
int4 (W4A16) and int8 (the lm_head) weights times int8-quantized activations in integer dot products (llama.cpp's
Q4 x Q8 design, with a second activation term), plus the decoder layer's small fused steps.

Usage:
    lin = Int4CPU(w)                 # w: W4Weight (K % 64 == 0, N % 16 == 0, group % 64 == 0); repacked once
    y = lin(x)                       # x (..., K) float -> (..., N) fp32
    y_ref = int4_cpu_ref(x, lin)     # the PyTorch reference of the same arithmetic
    head = Int8CPU(q, s)             # int8 codes (N, K) with per-row scales: the CPU lm_head; int8_cpu_ref
    res, h = add_rms_norm(res, x, w, eps)   # res += x in place; h = rms_norm(res) * w
    rope_kv(qkv, cos, sin, nh, nkv, rows, slots, scale, zp, (-128, 127))   # rotary + KV write (int8/int4/bf16/fp32)
    available()                      # False where no C compiler / no AVX2 (PIPELINE_CPU_KERNEL=0 turns it off)

The math, per activation row m and output column n (codes q in [0, 15], per-group scale s and zero z):
    x is quantized per block b of 64 in two int8 terms: d = max|x_b| / 127, q1 = round(x_b / d),
    q2 = round((x_b - d q1) * 256 / d), so x_b ~= d (q1 + q2 / 256) to ~15 bits
    y[m, n] = sum_b s[n, g(b)] d[m, b] (256 q_n.q1 + q_n.q2)_b / 256  -  sum_g s[n, g] z[n, g] sum_{b in g} x_b~
i.e. (q - z) * s against x, with the dot products in int32 (AVX512-VNNI `vpdpbusd`, or AVX2). The int4 bytes a
token reads are those of PyTorch's int4 op; the integer dots make the kernel memory-bound at one row where
`_weight_int4pack_mm_for_cpu` (bf16 FMAs) is compute-bound at ~19 GMAC/s a core (docs/perf-log.md, session 11).
One int8 term (llama.cpp's Q8 activations; PIPELINE_CPU_ACT_TERMS=1) is 0.5% off the exact product and moved
SmolLM2's perplexity by +1.0% over 8 windows; two terms are 2e-5 off (a bf16 input: 2.5e-3) and -0.16%
(tests/test_native_smollm2.py runs every row through this kernel).

The library: built once per machine by pipeline/kernels/cpu_build.py (the system's C compiler, the best ISA this
CPU reports: AVX512-VNNI with AMX-INT8 (the int8 dots of calls of >= PIPELINE_CPU_AMX_ROWS rows on the tile
unit, the same bits), else AVX512-VNNI, else AVX2 + FMA). No compiler or no AVX2: `available()` is False and int4 linears stay on
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
    """Our CPU kernels (csrc/cpu_kernels.c: linear_cpu.c among them) for `isa` (cpu_build.load), or None."""
    lib = cpu_build.load("cpu_kernels", isa)
    if lib is not None and lib.int4_cpu_linear.argtypes is None:
        lib.int4_cpu_linear.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int] * 6
        lib.int4_cpu_swiglu_linear.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int] * 6
        lib.int8_cpu_linear.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int] * 4
        lib.rmsnorm_cpu.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int, ctypes.c_int, ctypes.c_float]
        lib.rmsnorm2_cpu.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
                                     ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_float]
        lib.swiglu_bf16_cpu.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_void_p]
        lib.rope_kv_cpu.argtypes = ([ctypes.c_void_p] * 3 + [ctypes.c_int] * 4 + [ctypes.c_void_p] * 4
                                    + [ctypes.c_int] * 3)
    return lib


def kernel_threads() -> int:
    """Threads of a kernel call with at least thread_rows() rows: PIPELINE_CPU_KERNEL_THREADS, else torch's intra-op
    threads when the layout is made."""
    return int(os.environ.get("PIPELINE_CPU_KERNEL_THREADS", 0)) or torch.get_num_threads()


def thread_rows() -> int:
    """PIPELINE_CPU_KERNEL_THREAD_ROWS: rows (tokens of a step) from which a kernel call uses kernel_threads(), below
    which it runs on the caller alone. Default 1: every call. On the 2-core VM of bench/cpu.py, a batch-1 decode step
    takes 5.5-6.5 ms with both cores against 7.0-7.8 ms on the caller alone (one process, alternating runs,
    docs/perf-log.md session 12: a GEMV's weights stream from DRAM, and one core draws ~half the bandwidth two do).
    Session 11's opposite finding (80 against 112 tok/s) was made with a pool per library, whose workers spun against
    each other."""
    return int(os.environ.get("PIPELINE_CPU_KERNEL_THREAD_ROWS", 1))


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


class _CLinear:
    """A linear on one of linear_cpu.c's entry points: fp32 (..., K) in, fp32 (..., N) out. A subclass sets _fn
    (the C function), _ptrs (its packed weight's pointers) and _ints (its int arguments after M)."""
    N: int
    K: int
    dtype = torch.float32

    def _load(self, isa: Optional[str], threads: Optional[int]) -> ctypes.CDLL:
        lib = library(isa)
        if lib is None:
            raise RuntimeError(f"the CPU kernels are not available ({isa or 'best ISA'}; see cpu_build.load)")
        self.isa, self.threads, self.thread_rows = cpu_build.isa_of(lib), threads or kernel_threads(), thread_rows()
        return lib

    def __call__(self, x: torch.Tensor, bias=None, fn=None, K=None) -> torch.Tensor:
        shape, K = x.shape, K or self.K
        x2 = x.reshape(-1, K)                                         # (M, K)
        if x2.dtype != torch.float32 or not x2.is_contiguous():
            x2 = x2.float().contiguous()
        M = x2.shape[0]
        y = torch.empty(M, self.N, dtype=torch.float32)
        threads = self.threads if M >= self.thread_rows else 1
        if M and (fn or self._fn)(x2.data_ptr(), *self._ptrs, y.data_ptr(), M, *self._ints, threads):
            raise MemoryError(f"{type(self).__name__}: no scratch memory for {M} x {self.K} activations")
        if bias is not None:
            y += bias.float()
        return y.reshape(*shape[:-1], self.N)


class Int4CPU(_CLinear):
    """A W4A16 linear on the C kernel: the weight repacked once (pack_tiles; fp32 s and s * z per group, tiled)."""

    def __init__(self, w: W4Weight, threads: Optional[int] = None, isa: Optional[str] = None,
                 terms: Optional[int] = None):
        if not supports(w):
            raise ValueError(f"Int4CPU needs K % 64 == 0, N % 16 == 0 and group % 64 == 0 (got K={w.K}, N={w.N}, "
                             f"group={w.group_size})")
        lib = self._load(isa, threads)
        fn = lib.int4_cpu_linear
        q, s, z = unpack_w4(w)                                        # (N, K) uint8, (G, N) fp16 x2
        self.packed = pack_tiles(q)                                   # (N/16, K/8, 16, 4) uint8
        self.ws = tile_cols(s)                                        # (N/16, G, 16) fp32
        self.wm = tile_cols(s.float() * z.float())                    # s * z, (N/16, G, 16) fp32
        self.N, self.K, self.group_size = w.N, w.K, w.group_size
        self._fn, self._ptrs = fn, (self.packed.data_ptr(), self.ws.data_ptr(), self.wm.data_ptr())
        self.terms = terms or int(os.environ.get("PIPELINE_CPU_ACT_TERMS", 2))
        if self.terms not in (1, 2):
            raise ValueError(f"activation terms must be 1 or 2 (PIPELINE_CPU_ACT_TERMS), got {self.terms}")
        self._ints = (self.N, self.K, self.group_size, self.terms)
        self._swiglu_fn = lib.int4_cpu_swiglu_linear

    def swiglu(self, gate_up: torch.Tensor) -> torch.Tensor:
        """(silu(gate) * up) @ W.T for gate_up (..., 2K): a SwiGLU MLP's down projection, the product made in C."""
        return self(gate_up, fn=self._swiglu_fn, K=2 * self.K)


class Int8CPU(_CLinear):
    """An int8 linear with per-output-row scales on the C kernel (the CPU lm_head: `native_head`): W = q * s,
    q = quantize_w8's codes, repacked once (pack_tiles8); fp32 input (two int8 terms per 64-block, as Int4CPU),
    fp32 out. N % 16 == 0, K % 64 == 0."""

    def __init__(self, q: torch.Tensor, s: torch.Tensor, threads: Optional[int] = None, isa: Optional[str] = None):
        N, K = q.shape
        if N % NT or K % QB:
            raise ValueError(f"Int8CPU needs N % 16 == 0 and K % 64 == 0 (got N={N}, K={K})")
        fn = self._load(isa, threads).int8_cpu_linear
        self.packed = pack_tiles8(q.to(torch.int8))                   # (N/16, K/4, 16, 4) int8
        self.scales = s.float().reshape(-1).contiguous()              # (N,)
        self.N, self.K = N, K
        self._fn, self._ptrs, self._ints = fn, (self.packed.data_ptr(), self.scales.data_ptr()), (N, K)


def pack_tiles8(q: torch.Tensor) -> torch.Tensor:
    """int8 (N, K) -> (N/16, K/4, 16, 4): for 16 rows and 4 columns k0..k0+3, a row's 4 bytes."""
    N, K = q.shape
    return q.reshape(N // NT, NT, K // 4, 4).permute(0, 2, 1, 3).contiguous()


def int8_cpu_ref(x: torch.Tensor, lin: Int8CPU) -> torch.Tensor:
    """PyTorch reference of int8_cpu_linear: the same activation terms, fp64 dots."""
    q1, q2, d = quantize_blocks_ref(x.reshape(-1, lin.K))
    a = ((q1.double() + q2.double() / 256) * d.double()[..., None]).reshape(q1.shape[0], -1)   # (M, K)
    w = lin.packed.permute(0, 2, 1, 3).reshape(lin.N, lin.K).double()
    return ((a @ w.t()) * lin.scales.double()).float().reshape(*x.shape[:-1], lin.N)


BF16_F32 = (torch.bfloat16, torch.float32)


def _cpu(t: torch.Tensor, dtype: torch.dtype = torch.float32) -> bool:
    return t.dtype == dtype and t.is_cpu and t.is_contiguous()


def add_rms_norm(res: torch.Tensor, add: Optional[torch.Tensor], weight: torch.Tensor, eps: float,
                 lib: Optional[ctypes.CDLL] = None, out_dtype: torch.dtype = torch.float32
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """The residual add and RMSNorm of a decoder layer in one C call: res (T, D) fp32 += add (fp32 or bf16; None:
    nothing), in place; returns (res, rms_norm(res) * weight), the latter in out_dtype (fp32, or bf16 for a bf16
    linear next: rounded as torch rounds). Tensors that are not contiguous CPU ones of those dtypes, or no kernel:
    torch's ops (res + add is then a new tensor, the norm fp32). lib: library(), where the caller holds it (a
    decode step makes ~60 of these ~4 us calls; the lookup would add 2 us to each)."""
    lib = lib or library()
    if lib is None or not (_cpu(res) and _cpu(weight) and (add is None or _cpu(add, add.dtype))
                           and (add is None or add.dtype in BF16_F32) and out_dtype in BF16_F32):
        res = res if add is None else res + add
        return res, torch.nn.functional.rms_norm(res, (res.shape[-1],), weight, eps)
    out = torch.empty(res.shape, dtype=out_dtype)
    lib.rmsnorm2_cpu(res.data_ptr(), None if add is None else add.data_ptr(),
                     int(add is not None and add.dtype == torch.bfloat16), weight.data_ptr(), out.data_ptr(),
                     int(out_dtype == torch.bfloat16), res.numel() // res.shape[-1], res.shape[-1], eps)
    return res, out


def swiglu_bf16(gate_up: torch.Tensor, lib: Optional[ctypes.CDLL] = None) -> Optional[torch.Tensor]:
    """silu(gate) * up for gate_up (..., 2K) bf16 contiguous on a CPU, in fp32 and rounded once to bf16 (..., K);
    None where the kernel does not take it (no kernel, another dtype or device, K % 16)."""
    lib = lib or library()
    K = gate_up.shape[-1] // 2
    if lib is None or not _cpu(gate_up, torch.bfloat16) or K % 16:
        return None
    out = torch.empty(*gate_up.shape[:-1], K, dtype=torch.bfloat16)
    if lib.swiglu_bf16_cpu(gate_up.data_ptr(), gate_up.numel() // (2 * K), K, out.data_ptr()):
        raise MemoryError(f"swiglu_bf16: no scratch memory for {3 * K} floats")
    return out


KV_KINDS = {torch.int8: 0, torch.uint8: 1, torch.bfloat16: 2, torch.float32: 3}   # csrc's KV_INT8 .. KV_F32


def rope_kv(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, n_heads: int, n_kv: int, rows: torch.Tensor,
            slots: torch.Tensor, scale: Optional[torch.Tensor], zp: Optional[torch.Tensor],
            qrange: Optional[tuple[int, int]], lib: Optional[ctypes.CDLL] = None) -> bool:
    """Rotary on q and k of qkv (T, n_heads + 2 n_kv, hd) fp32 in place, then k and v written at cache rows `slots`
    (T,) int64 of rows (num_rows, 2, n_kv, hd'), by rows' dtype: int8 codes with static scale / zp (2, n_kv) fp32 in
    qrange; uint8: int4 codes in qrange (-8, 7), two a byte (kvcache.pack_int4's layout, hd' = hd / 2); bf16 or fp32:
    the values (scale, zp, qrange unused). cos / sin (T, hd) as NativeRunner's tables (rotate_half's sign in sin).
    The same roundings as the runner's torch ops. False (nothing done) where there is no kernel or a tensor is not the
    contiguous CPU dtype expected. lib: as add_rms_norm's."""
    lib = lib or library()
    kind = KV_KINDS.get(rows.dtype)
    if lib is None or kind is None or qkv.shape[-1] > 1024 or not (
            _cpu(qkv) and _cpu(cos) and _cpu(sin) and _cpu(rows, rows.dtype) and _cpu(slots, torch.int64)):
        return False
    if kind <= 1 and (scale is None or zp is None or qrange is None or not (_cpu(scale) and _cpu(zp))):
        return False
    T, hd = qkv.shape[0], qkv.shape[-1]
    lo, hi = qrange or (0, 0)
    lib.rope_kv_cpu(qkv.data_ptr(), cos.data_ptr(), sin.data_ptr(), T, n_heads, n_kv, hd, rows.data_ptr(),
                    slots.data_ptr(), None if kind > 1 else scale.data_ptr(), None if kind > 1 else zp.data_ptr(),
                    lo, hi, kind)
    return True


def quantize_blocks_ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (M, K) fp32 -> (q1, q2 (M, K/64, 64) int8 values as fp32, d (M, K/64) fp32): the kernel's activation
    rounding, x ~= d * (q1 + q2 / 256)."""
    xb = x.float().reshape(x.shape[0], -1, QB)
    d = xb.abs().amax(-1) / 127
    inv = torch.where(d > 0, 1 / d, torch.zeros_like(d))[..., None]
    q1 = torch.round(xb * inv)
    q2 = torch.round((xb - q1 * d[..., None]) * (inv * 256)).clamp_(-127, 127)
    return q1, q2, d


def int4_cpu_ref(x: torch.Tensor, lin: Int4CPU) -> torch.Tensor:
    """PyTorch reference of linear_cpu.c: (..., K) -> (..., N) fp32, the same quantization and sums (fp64 dots)."""
    shape, N, K, g = x.shape, lin.N, lin.K, lin.group_size
    q1, q2, d = quantize_blocks_ref(x.reshape(-1, K))                 # (M, KB, 64) x2, (M, KB)
    a = q1.double() + (q2.double() / 256 if lin.terms == 2 else 0)   # the activations the kernel multiplies, / d
    q = unpack_tiles(lin.packed).double().reshape(N, K // QB, QB)     # (N, KB, 64)
    dots = torch.einsum("mbk,nbk->mnb", a, q)                         # (M, N, KB)
    gb = g // QB
    ws, wm = (v.permute(0, 2, 1).reshape(N, -1).double() for v in (lin.ws, lin.wm))   # (N, G)
    y = (dots * ws.repeat_interleave(gb, 1)[None] * d.double()[:, None]).sum(-1)       # (M, N)
    dsum = (d.double() * a.sum(-1)).reshape(a.shape[0], -1, gb).sum(-1)               # (M, G)
    y = y - dsum @ wm.t()
    return y.float().reshape(*shape[:-1], N)
