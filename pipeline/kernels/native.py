"""Torch-native linears: each workspace weight type repacked ONCE at load for PyTorch's own kernels.

Usage:
    lin = int4_layout(w, torch.bfloat16)               # W4Weight; Int8Dynamic(w8, dtype), Dense(w, dtype)
    lin = int4_layout(w, torch.bfloat16, dense_rows=32)   # int4 on a CPU: batches of >= 32 rows on a bf16 copy
    y = lin(x, bias)                                   # x (..., K) any float dtype -> (..., N) in lin.dtype
    head = native_head(lm_head, act_dtype)             # the logits' linear (int8 weight-only on a CPU in bf16)

Which layout a workspace linear gets is its weight type's `native` (pipeline/weights; `native_linear(w, dtype)`
there). Every layout casts its input to its activation dtype (`dtype`) and returns that dtype.

    W4Weight  CPU (x86 with AVX2 or AVX512-VNNI, a C compiler; K % 64, N % 16, group % 64): `Int4CPU`
              (kernels/cpu_linear.py), int4 x int8-quantized activations in integer dot products, fp32 out: 1.6x the
              int4 op below at 1 row on one thread, 2.6x at 8 rows (docs/perf-log.md, session 11); from dense_rows
              rows (prefill) the oneDNN bf16 copy below. PIPELINE_CPU_KERNEL=0 turns it off.
              Elsewhere, bf16 activations: `Int4Packed`, the int4 GEMM of PyTorch (CPU: `_weight_int4pack_mm_for_cpu`, AVX512
              kernels for bf16 inputs; CUDA sm_80+: `_weight_int4pack_mm`, tinygemm). Its convention is
              W = (q - 8) * s + m per group, with (s, m) packed as (K/g, N, 2) bf16; ours is W = (q - z) * s, so
              m = (8 - z) * s (computed in fp32, rounded once to bf16). The op wants N % 16 == 0 on a CPU (CUDA:
              N % 8, K % 32); other shapes and fp32 activations get `Dense`, the weight dequantized once.
              With dense_rows > 0 (CPU), inputs of at least that many rows (prefill) run on a bf16 copy of the
              weight prepacked for oneDNN (`OneDNNLinear`): the int4 op's cost grows ~linearly with the rows
              (~2.5x oneDNN's bf16 GEMM from 16 rows); at decode sizes the int4 op reads 4x fewer bytes.
    W8Weight  `Int8Dynamic`: per-token int8 activations (the reference's exact rounding), `torch._int_mm`
              (CPU: any M; CUDA: through int8_gemm's cuBLASLt path), the reference's epilogue: equal to
              `int8_linear_ref` up to the fp32 rounding of the epilogue.
    Tensor    `Dense`: the weight in the activation dtype, `F.linear` (MKL / oneDNN on a CPU).
    lm_head   CPU, bf16 mode: int8 per output channel (llama.cpp's GGUF of this model has a Q8_0 output tensor), the
              input as two int8 terms, fp32 logits: `Int8CPU` (our C kernel, kernels/cpu_linear.py) where it takes
              the shape, else `Int8Head` (oneDNN's u8 x s8 GEMM, or `torch._int_mm`); otherwise `Dense`.
"""
from __future__ import annotations

import logging
import os

import torch
import torch.nn.functional as F

from . import cpu_linear
from .cpu_linear import swiglu_bf16
from .int8_gemm import int8_linear
from .quant_act import quantize_per_token_ref
from .w4a16 import W4Weight, dequantize_w4, unpack_w4
from ..quant.w8 import W8Weight, quantize_w8

log = logging.getLogger(__name__)


class Dense:
    """y = x @ W.T (+ b) with W stored in the activation dtype."""

    def __init__(self, weight: torch.Tensor, dtype: torch.dtype):
        self.weight, self.dtype = weight.to(dtype).contiguous(), dtype   # (N, K)

    def __call__(self, x: torch.Tensor, bias=None) -> torch.Tensor:
        return F.linear(x.to(self.dtype), self.weight, bias)


class Int4Packed:
    """W4A16 on PyTorch's int4 GEMM (bf16 activations, fp32 accumulation inside the op)."""

    def __init__(self, w: W4Weight):
        q, s, z = unpack_w4(w)                                    # (N, K) uint8, (K/g, N) fp16 x2
        s32 = s.float()
        self.scales_zeros = torch.stack([s32, (8 - z.float()) * s32], -1).to(torch.bfloat16).contiguous()  # (K/g, N, 2)
        self.group_size, self.N, self.dtype = w.group_size, w.N, torch.bfloat16
        if q.device.type == "cpu":
            self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).contiguous(), 1)
            self._mm = torch.ops.aten._weight_int4pack_mm_for_cpu
        else:                                                     # CUDA: two codes a byte, the even one high
            pairs = (q[:, ::2] << 4 | q[:, 1::2]).contiguous()    # (N, K/2) uint8
            self.packed = torch.ops.aten._convert_weight_to_int4pack(pairs, 2)
            self._mm = torch.ops.aten._weight_int4pack_mm

    def __call__(self, x: torch.Tensor, bias=None) -> torch.Tensor:
        if x.dim() != 2:
            return self(x.reshape(-1, x.shape[-1]), bias).reshape(*x.shape[:-1], self.N)
        # contiguous: PyTorch's int4 ops (CUDA and CPU) reject a strided input, e.g. a slice gate_up[:, :hidden]
        y = self._mm(x.to(torch.bfloat16).contiguous(), self.packed, self.group_size, self.scales_zeros)
        return y if bias is None else y + bias


class ByRows:
    """Batches of fewer than `rows` rows on `small` (decode), larger ones (prefill) on `large`."""

    def __init__(self, small, large, rows: int):
        self.small, self.large, self.rows, self.dtype = small, large, rows, small.dtype

    def _pick(self, x: torch.Tensor):
        return self.large if x.numel() // x.shape[-1] >= self.rows else self.small

    def __call__(self, x: torch.Tensor, bias=None) -> torch.Tensor:
        return self._pick(x)(x, bias)

    def swiglu(self, gate_up: torch.Tensor) -> torch.Tensor:
        return swiglu_down(self._pick(gate_up), gate_up)


def swiglu_down(lin, gate_up: torch.Tensor) -> torch.Tensor:
    """lin(silu(gate) * up) for gate_up (..., 2K): in one call where the layout has `swiglu` (our C kernel)."""
    fused = getattr(lin, "swiglu", None)
    if fused is not None:
        return fused(gate_up)
    gate, up = gate_up.chunk(2, -1)
    return lin(F.silu(gate).mul_(up))


class OneDNNLinear:
    """y = x @ W.T (+ b), W (N, K) bf16 reordered once into oneDNN's blocked layout (`mkldnn._linear_pointwise`);
    a plain F.linear where this torch has no oneDNN."""

    def __init__(self, weight: torch.Tensor, rows: int):
        self.weight, self.dtype = weight.contiguous(), weight.dtype
        try:
            self.packed = torch.ops.mkldnn._reorder_linear_weight(self.weight, rows)
            self(torch.zeros(1, weight.shape[1], dtype=self.dtype))
        except (RuntimeError, AttributeError) as e:
            log.warning("oneDNN linear unavailable (%s): plain F.linear", str(e)[:200])
            self.packed = None

    def swiglu(self, gate_up: torch.Tensor) -> torch.Tensor:
        """self(silu(gate) * up) for gate_up (..., 2K): the product in one C call on a bf16 CPU input, else torch's."""
        act = swiglu_bf16(gate_up)
        if act is None:
            gate, up = gate_up.chunk(2, -1)
            act = F.silu(gate).mul_(up)
        return self(act)

    def __call__(self, x: torch.Tensor, bias=None) -> torch.Tensor:
        x = x.to(self.dtype)
        if self.packed is None:
            return F.linear(x, self.weight, bias)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, bias, "none", [], "")


def int4_packable(w: W4Weight) -> bool:
    """Shapes PyTorch's int4 GEMM takes on w's device."""
    if w.device.type == "cpu":
        return w.N % 16 == 0 and w.K % 2 == 0
    return w.N % 8 == 0 and w.K % 32 == 0 and w.group_size in (32, 64, 128, 256)


def dense_rows_from_env() -> int:
    """PIPELINE_NATIVE_DENSE_ROWS: rows from which a CPU int4 linear runs on its bf16 copy (0: never; default 32)."""
    return int(os.environ.get("PIPELINE_NATIVE_DENSE_ROWS", "32"))


def int4_layout(w: W4Weight, dtype: torch.dtype, dense_rows: int = 0):
    """bf16 mode: on a CPU `Int4CPU` (our C kernel) where it is built and takes w, else `Int4Packed` where PyTorch's
    int4 GEMM takes w; on a CPU, batches of >= dense_rows rows on a oneDNN bf16 copy. Otherwise (fp32 exact mode, or
    neither op) `Dense` of w dequantized."""
    if dtype == torch.bfloat16:
        small = None
        if w.device.type == "cpu" and cpu_linear.supports(w) and cpu_linear.available():
            small = cpu_linear.Int4CPU(w)
        elif int4_packable(w):
            try:
                small = Int4Packed(w)
            except RuntimeError as e:   # an old GPU / a build without the op: the dequantized weight instead
                log.warning("int4 GEMM unavailable on %s (%s): W4A16 runs dequantized", w.device, str(e)[:200])
        if small is not None:
            if w.device.type == "cpu" and dense_rows:
                return ByRows(small, OneDNNLinear(dequantize_w4(w, torch.float32).to(torch.bfloat16), dense_rows),
                              dense_rows)
            return small
    return Dense(dequantize_w4(w, torch.float32), dtype)


class Int8Dynamic:
    """W8A8: x quantized per token (the reference's rounding), int8 x int8 -> int32, both scales in fp32."""

    def __init__(self, w: W8Weight, dtype: torch.dtype):
        self.qweight = w.qweight.contiguous()                     # (N, K) int8
        self.wt = self.qweight.t()                                # (K, N) column-major: what _int_mm wants
        self.scales = w.scales.float().reshape(-1).contiguous()   # (N,)
        self.dtype = dtype

    def __call__(self, x: torch.Tensor, bias=None) -> torch.Tensor:
        xq, xs = quantize_per_token_ref(x)                        # (..., K) int8, (...) fp32
        x2 = xq.reshape(-1, xq.shape[-1])
        if x2.device.type != "cpu":
            y = int8_linear(x2, xs.reshape(-1), self.qweight, self.scales, bias, self.dtype, path="int_mm")
        else:
            y = (torch._int_mm(x2, self.wt) * xs.reshape(-1, 1)).mul_(self.scales)   # (M, N) fp32
            if bias is not None:
                y = y + bias.float()
            y = y.to(self.dtype)
        return y.reshape(*x.shape[:-1], y.shape[-1])


class Int8Head:
    """The logits' linear: int8 weights per output channel, and the fp32 input as two int8 terms per token
    (x ~= s1 * q1 + s2 * q2, the second quantizing the first's error: ~16 bits of input), one integer GEMM over
    both, fp32 out. The logits need fp32 output: bf16 logits alone move a perplexity by ~0.3%.
    The GEMM: oneDNN's u8 x s8 (VNNI) on a weight prepacked once (any row count; the terms shifted by 128 to u8,
    the zero point 128 given back to it: exact), ~1.6x `torch._int_mm`, which reorders the weight on every call;
    `torch._int_mm` where this torch has no oneDNN."""

    def __init__(self, weight: torch.Tensor):
        q, s = quantize_w8(weight)                                # (V, D) int8, (V,) fp32
        self.qweight, self.scales, self.dtype = q.contiguous(), s.float().reshape(-1).contiguous(), torch.float32
        self.wt = self.qweight.t()                                # (D, V) column-major, for _int_mm
        self.zp = torch.zeros(self.scales.numel(), dtype=torch.int32)
        try:
            self.packed = torch.ops.onednn.qlinear_prepack(self.qweight, None)   # oneDNN's blocked layout
            self._onednn(torch.zeros(2, q.shape[1], dtype=torch.int8))
        except (RuntimeError, AttributeError) as e:
            log.warning("oneDNN int8 linear unavailable (%s): the lm_head runs on torch._int_mm", str(e)[:200])
            self.packed = None

    def _onednn(self, q: torch.Tensor) -> torch.Tensor:
        """(M, D) int8 -> (M, V) fp32 = (q @ W_q.T) * scales."""
        u = (q.to(torch.int16) + 128).to(torch.uint8)
        return torch.ops.onednn.qlinear_pointwise(u, 1.0, 128, self.packed, self.scales, self.zp, None, 1.0, 0,
                                                  torch.float32, "none", [], "")

    def __call__(self, x: torch.Tensor, bias=None) -> torch.Tensor:
        x = x.float()
        q1, s1 = quantize_per_token_ref(x)                        # (T, D) int8, (T,) fp32
        q2, s2 = quantize_per_token_ref(x - q1 * s1[:, None])
        q, T = torch.cat([q1, q2]), x.shape[0]
        if self.packed is not None:
            y = self._onednn(q)                                   # (2T, V) fp32, integer products exact
            return torch.addcmul(y[:T] * s1[:, None], y[T:], s2[:, None])
        acc = torch._int_mm(q, self.wt)                           # (2T, V) int32, exact
        return torch.addcmul(acc[:T] * s1[:, None], acc[T:], s2[:, None]).mul_(self.scales)


def native_head(weight: torch.Tensor, act_dtype: torch.dtype):
    """The lm_head: on a CPU in bf16 mode int8 weight-only (the head is the largest matrix of a small model) on our C
    kernel (`Int8CPU`) where it takes the shape, else `Int8Head`; otherwise dense."""
    if weight.device.type == "cpu" and act_dtype == torch.bfloat16:
        V, D = weight.shape
        if V % cpu_linear.NT == 0 and D % cpu_linear.QB == 0 and cpu_linear.available():
            return cpu_linear.Int8CPU(*quantize_w8(weight))
        return Int8Head(weight)
    return Dense(weight, act_dtype)
