"""fp16: the checkpoint's 16-bit weights, as load wrote them (nothing to quantize)."""
from __future__ import annotations

from ..models.store import read_tensors
from .base import WeightMethod


class FP16(WeightMethod):
    name = "fp16"

    def matches(self, q) -> bool:
        return q.w_bits is None and q.a_bits is None

    def read(self, inputs, args, device):
        return read_tensors(inputs["load"]), None, None
