"""fp16: the checkpoint's weights as load wrote them (nothing to quantize): 16-bit, or a pre-quantized
checkpoint's own int4 linears (load's w4.safetensors) for serving, their dequantized weights for evaluation."""
from __future__ import annotations

from ..models.store import read_tensors, read_w4
from .base import WeightMethod


class FP16(WeightMethod):
    name = "fp16"

    def matches(self, q) -> bool:
        return q.w_bits is None and q.a_bits is None

    def read(self, inputs, args, device):
        w4 = read_w4(inputs["load"], device)        # a pre-quantized checkpoint's own int4 linears, or None
        return read_tensors(inputs["load"]), w4, "int4" if w4 else None
