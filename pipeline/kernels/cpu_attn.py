"""Decode attention on an x86 CPU over the torch-native runner's paged KV cache, read in place (no gather, no
dequantized copy), in a small C kernel (csrc/attn_cpu.c) compiled once per machine and loaded with ctypes.

Usage:
    attn = PagedAttnCPU(runner.kv_cache, runner.kv, runner.kv_bits, runner.kv_mode, n_heads, runner.scale)
    o = attn(l, q, block_tables, context_lens)     # q (B, nh, hd) fp32 -> (B, nh * hd) fp32, layer l
    attend = attn.step(block_tables, context_lens) # a decode step: tables checked once; attend(l, q) per layer
    o_ref = attn_cpu_ref(q, runner.kv_cache[l], runner.kv[l], runner.kv_bits, runner.kv_mode, block_tables,
                         context_lens, runner.scale)              # today's gather + dequantize + softmax attention
    supports(cache, kv_bits, kv_mode, n_heads)     # False: the caller keeps its torch path
    available()                                    # False where no C compiler / no AVX2 (PIPELINE_CPU_KERNEL=0)

The cache of a layer: (num_blocks, block_size, 2, n_kv, hd') with K then V of a cache row side by side; hd' = hd
(int8 codes, or bf16 / fp32 values for a 16-bit KV) or hd / 2 (int4: uint8, two codes a byte, kvcache.pack_int4).
The KV params (runner.kv[l]): static {"scale", "zp"} (2, n_kv, 1) fp32, dynamic (num_blocks * block_size, 2, n_kv)
fp32, none for 16 bits; a row dequantizes as c * scale + zp. The kernel folds that into the attention, per query
head h of KV group g = h / (nh / n_kv), sequence b, cached row j < context_lens[b]:
    score_j = softmax_scale * (s_k(j) * (q_h . c_k(j)) + z_k(j) * sum(q_h))
    out_h = sum_j p_j * (s_v(j) * c_v(j) + z_v(j)) / sum_j p_j,    p_j = exp(score_j - max)
in one pass with an online softmax, fp32 sums; each K / V row is converted once for the group's query heads.

Supported: head_dim % 16 == 0 and <= 256, n_heads % n_kv == 0; caches of int8 (static / dynamic), int4 (uint8,
static / dynamic), bf16 and fp32 (16-bit KV). Not supported (`supports` is False, the runner keeps gather + SDPA):
an fp16 cache (the runner's 16-bit cache on a CPU is bf16 or fp32 unless PIPELINE_NATIVE_DTYPE=fp16), other head
dims, a cache not on a CPU or not contiguous. The caches and params are read in place through pointers taken once:
they must outlive the PagedAttnCPU and never be reallocated (the runner's are, until allocate_cache runs again).

The library: built once per machine by pipeline/kernels/cpu_build.py (AVX512, else AVX2 + FMA). `isa="avx2"` loads
another ISA's build (the tests run both).
"""
from __future__ import annotations

import ctypes
import math
from typing import Callable, Optional

import torch

from . import cpu_build
from .cpu_linear import kernel_threads, thread_rows
from .kvcache import unpack_int4

DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.int8: 2, torch.uint8: 3}     # csrc/attn_cpu.c DT_*
MODES = {"none": 0, "static": 1, "dynamic": 2}                                     # KV_*
HD_MAX = 256


class _Step(ctypes.Structure):
    """csrc/attn_cpu.c's attn_step: a decode step's arguments, shared by its layers."""
    _fields_ = [("bt", ctypes.c_void_p), ("ctx", ctypes.c_void_p)] + [
        (n, ctypes.c_int) for n in ("max_blocks", "num_blocks", "B", "nh", "nkv", "hd", "bs", "dtype", "mode",
                                    "threads")] + [("sm", ctypes.c_float)]


def library(isa: Optional[str] = None) -> Optional[ctypes.CDLL]:
    """Our CPU kernels (csrc/cpu_kernels.c: attn_cpu.c among them) for `isa` (cpu_build.load), or None."""
    lib = cpu_build.load("cpu_kernels", isa)
    if lib is not None and lib.attn_cpu_decode.argtypes is None:
        lib.attn_cpu_check.restype = ctypes.c_int
        lib.attn_cpu_check.argtypes = [ctypes.POINTER(_Step)]
        lib.attn_cpu_decode.restype = None
        lib.attn_cpu_decode.argtypes = [ctypes.c_void_p, ctypes.c_long] + [ctypes.c_void_p] * 4 + [
            ctypes.POINTER(_Step)]
    return lib


def available() -> bool:
    return library() is not None


def supports(cache: torch.Tensor, kv_bits: int, kv_mode: str, n_heads: int) -> bool:
    """Whether the kernel takes this layer's cache (num_blocks, block_size, 2, n_kv, hd')."""
    n_kv, hdc = cache.shape[3], cache.shape[4]
    hd = 2 * hdc if kv_bits == 4 else hdc
    want = {16: (torch.float32, torch.bfloat16), 8: (torch.int8,), 4: (torch.uint8,)}.get(kv_bits, ())
    return (cache.device.type == "cpu" and cache.is_contiguous() and cache.dtype in want and kv_mode in MODES
            and (kv_mode == "none") == (kv_bits == 16) and hd % 16 == 0 and hd <= HD_MAX and n_heads % n_kv == 0)


class PagedAttnCPU:
    """The C decode attention over one runner's per-layer caches and KV params (their pointers cached: the runner
    allocates them once)."""

    def __init__(self, caches: list[torch.Tensor], params: list[dict], kv_bits: int, kv_mode: str, n_heads: int,
                 scale: float, threads: Optional[int] = None, isa: Optional[str] = None):
        if not all(supports(c, kv_bits, kv_mode, n_heads) for c in caches):
            raise ValueError(f"PagedAttnCPU does not take these caches ({caches[0].dtype}, {tuple(caches[0].shape)}, "
                             f"kv_bits={kv_bits}, kv_mode={kv_mode!r}, n_heads={n_heads}); see cpu_attn.supports")
        lib = library(isa)
        if lib is None:
            raise RuntimeError(f"the CPU attention kernel is not available ({isa or 'best ISA'}; see cpu_attn.library)")
        self.isa = cpu_build.isa_of(lib)
        self._fn, self._check = lib.attn_cpu_decode, lib.attn_cpu_check
        c = caches[0]
        self.n_heads, self.n_kv, self.num_blocks, self.block_size = n_heads, c.shape[3], c.shape[0], c.shape[1]
        self.head_dim = 2 * c.shape[4] if kv_bits == 4 else c.shape[4]
        self.scale, self.threads, self.thread_rows = float(scale), threads or kernel_threads(), thread_rows()
        self.dtype, self.mode = DTYPES[c.dtype], MODES[kv_mode]
        if not all(v.is_contiguous() and v.dtype == torch.float32 for p in params for v in p.values()):
            raise ValueError("PagedAttnCPU reads the KV params in place: they must be contiguous fp32")
        self._keep = (caches, params)                                 # the tensors the pointers below point into
        self._ptrs = [(c.data_ptr(), p["scale"].data_ptr() if p else None, p["zp"].data_ptr() if p else None)
                      for c, p in zip(caches, params)]

    def step_args(self, block_tables: torch.Tensor, context_lens: torch.Tensor) -> _Step:
        """csrc's attn_step for a decode step's sequences: the block tables (B, max_blocks) and context lengths (B,)
        (this token's row included) checked and converted once for all layers; it keeps (`.keep`) the tensors its
        pointers point into. kernels/cpu_decoder.py passes it to the one-call decode step."""
        bt = block_tables if block_tables.dtype == torch.int32 and block_tables.is_contiguous() \
            else block_tables.to(torch.int32).contiguous()           # (B, max_blocks)
        ctx = context_lens if context_lens.dtype == torch.int32 and context_lens.is_contiguous() \
            else context_lens.to(torch.int32).contiguous()          # (B,)
        B, nh, hd = ctx.shape[0], self.n_heads, self.head_dim
        st = _Step(bt.data_ptr(), ctx.data_ptr(), bt.shape[1], self.num_blocks, B, nh, self.n_kv, hd,
                   self.block_size, self.dtype, self.mode, self.threads if B >= self.thread_rows else 1, self.scale)
        rc = self._check(st)
        if rc:
            raise ValueError(f"attn_cpu: " + ("unsupported shape" if rc == -1 else "a context longer than its block "
                             f"table, or a block id outside the cache's {self.num_blocks}"))
        st.keep = (bt, ctx)
        return st

    def step(self, block_tables: torch.Tensor, context_lens: torch.Tensor) -> Callable[[int, torch.Tensor],
                                                                                       torch.Tensor]:
        """attend(l, q (B, nh, hd) fp32) -> (B, nh * hd) fp32 for a decode step's sequences (step_args). The output
        is one buffer of the step, rewritten by each layer's call."""
        st = self.step_args(block_tables, context_lens)
        B, nh, hd = st.B, self.n_heads, self.head_dim
        out = torch.empty(B, nh * hd, dtype=torch.float32)
        fn, ptrs, out_ptr, arg = self._fn, self._ptrs, out.data_ptr(), ctypes.byref(st)

        def attend(l: int, q: torch.Tensor) -> torch.Tensor:
            if q.dtype != torch.float32 or q.stride(2) != 1 or q.stride(1) != hd:
                q = q.float().contiguous()                            # (B, nh, hd); rows may be strided
            if q.shape != (B, nh, hd):
                raise ValueError(f"attn_cpu: q {tuple(q.shape)}, the step's are {(B, nh, hd)}")
            fn(q.data_ptr(), q.stride(0), *ptrs[l], out_ptr, arg)
            return out
        attend.keep = st                                              # what the pointers point into
        return attend

    def __call__(self, l: int, q: torch.Tensor, block_tables: torch.Tensor, context_lens: torch.Tensor) -> torch.Tensor:
        """One layer's attention: q (B, nh, hd) fp32 -> (B, nh * hd) fp32 (a new tensor)."""
        return self.step(block_tables, context_lens)(l, q)


def attn_cpu_ref(q: torch.Tensor, cache: torch.Tensor, params: dict, kv_bits: int, kv_mode: str,
                 block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """PyTorch reference: NativeRunner's decode attention as it was before the kernel (each sequence's blocks
    gathered, dequantized to fp32 as `_read_kv` does, softmax attention with grouped-query heads); (B, nh * hd)."""
    B, nh, hd = q.shape
    bs, out = cache.shape[1], []
    for b in range(B):
        n = int(context_lens[b])
        blocks = block_tables[b, :math.ceil(n / bs)].long()
        x = cache.index_select(0, blocks).flatten(0, 1)[:n]          # (n, 2, n_kv, hd')
        if kv_mode == "none":
            x = x.float()
        else:
            c = unpack_int4(x) if kv_bits == 4 else x
            if kv_mode == "static":
                x = c * params["scale"] + params["zp"]
            else:
                r = (blocks[:, None] * bs + torch.arange(bs)).flatten()[:n]          # (n,) cache rows
                x = c * params["scale"][r][..., None] + params["zp"][r][..., None]
        k, v = x[:, 0].transpose(0, 1), x[:, 1].transpose(0, 1)     # (n_kv, n, hd)
        o = torch.nn.functional.scaled_dot_product_attention(q[b][:, None], k, v, scale=scale, enable_gqa=True)
        out.append(o.reshape(nh * hd))
    return torch.stack(out)
