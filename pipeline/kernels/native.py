"""Torch-native linears: each workspace weight type repacked ONCE at load for PyTorch's own kernels.

Usage:
    lin = int4_layout(w, act_dtype=torch.bfloat16)     # W4Weight; Int8Dynamic(w8, dtype), Dense(w, dtype)
    y = lin(x, bias)                                   # x (..., K) any float dtype -> (..., N) in lin.dtype
    head = native_head(lm_head, act_dtype)             # the logits' linear (int8 weight-only on a CPU in bf16)

Which layout a workspace linear gets is its weight type's `native` (pipeline/weights; `native_linear(w, dtype)`
there). Every layout casts its input to its activation dtype (`dtype`) and returns that dtype.

    W4Weight  bf16 activations: `Int4Packed`, the int4 GEMM of PyTorch (CPU: `_weight_int4pack_mm_for_cpu`, AVX512
              kernels for bf16 inputs; CUDA sm_80+: `_weight_int4pack_mm`, tinygemm). Its convention is
              W = (q - 8) * s + m per group, with (s, m) packed as (K/g, N, 2) bf16; ours is W = (q - z) * s, so
              m = (8 - z) * s (computed in fp32, rounded once to bf16). The op wants N % 16 == 0 on a CPU (CUDA:
              N % 8, K % 32); other shapes and fp32 activations get `Dense`, the weight dequantized once.
    W8Weight  `Int8Dynamic`: per-token int8 activations (the reference's exact rounding), `torch._int_mm`
              (CPU: any M; CUDA: through int8_gemm's cuBLASLt path), the reference's epilogue: equal to
              `int8_linear_ref` up to the fp32 rounding of the epilogue.
    Tensor    `Dense`: the weight in the activation dtype, `F.linear` (MKL / oneDNN on a CPU).
    lm_head   `Int8Head` (CPU, bf16 mode): int8 per output channel (llama.cpp's GGUF of this model has a Q8_0 output
              tensor), the input as two int8 terms, `torch._int_mm`, fp32 logits; otherwise `Dense`.
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

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
        y = self._mm(x.to(torch.bfloat16), self.packed, self.group_size, self.scales_zeros)
        return y if bias is None else y + bias


def int4_packable(w: W4Weight) -> bool:
    """Shapes PyTorch's int4 GEMM takes on w's device."""
    if w.device.type == "cpu":
        return w.N % 16 == 0 and w.K % 2 == 0
    return w.N % 8 == 0 and w.K % 32 == 0 and w.group_size in (32, 64, 128, 256)


def int4_layout(w: W4Weight, dtype: torch.dtype):
    """`Int4Packed` where PyTorch's int4 GEMM takes w (bf16 activations), else `Dense` of w dequantized."""
    if dtype == torch.bfloat16 and int4_packable(w):
        try:
            return Int4Packed(w)
        except RuntimeError as e:   # an old GPU / a build without the op: the dequantized weight instead
            log.warning("int4 GEMM unavailable on %s (%s): W4A16 runs dequantized", w.device, str(e)[:200])
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
    (x ~= s1 * q1 + s2 * q2, the second quantizing the first's error: ~16 bits of input), one `torch._int_mm` over
    both, fp32 out. The logits need fp32 output: bf16 logits alone move a perplexity by ~0.3%."""

    def __init__(self, weight: torch.Tensor):
        q, s = quantize_w8(weight)                                # (V, D) int8, (V,) fp32
        self.qweight, self.scales, self.dtype = q.contiguous(), s, torch.float32
        self.wt = self.qweight.t()                                # (D, V) column-major

    def __call__(self, x: torch.Tensor, bias=None) -> torch.Tensor:
        x = x.float()
        q1, s1 = quantize_per_token_ref(x)                        # (T, D) int8, (T,) fp32
        q2, s2 = quantize_per_token_ref(x - q1 * s1[:, None])
        acc = torch._int_mm(torch.cat([q1, q2]), self.wt)         # (2T, V) int32, exact
        T = x.shape[0]
        return torch.addcmul(acc[:T] * s1[:, None], acc[T:], s2[:, None]).mul_(self.scales)


def native_head(weight: torch.Tensor, act_dtype: torch.dtype):
    """The lm_head: `Int8Head` on a CPU in bf16 mode (the head is the largest matrix of a small model), else dense."""
    if weight.device.type == "cpu" and act_dtype == torch.bfloat16:
        return Int8Head(weight)
    return Dense(weight, act_dtype)
