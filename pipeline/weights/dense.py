"""16-bit weights: the (N, K) tensor itself, fp16 or bf16 (the source checkpoint's); files `<prefix>.weight`."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..kernels.native import Dense as NativeDense
from .base import OUT, WeightType


class Dense(WeightType):
    record = torch.Tensor
    files = ("weight",)
    canonical_suffix = ".weight"

    def __init__(self, name: str, dtype: torch.dtype):
        self.name, self.dtype, self.act_dtype = name, dtype, dtype

    def cut(self, w, a, b, along):
        return w[a:b] if along == OUT else w[:, a:b]

    def cat(self, parts, along):
        return parts[0] if len(parts) == 1 else torch.cat(parts, 0 if along == OUT else 1)

    def parts(self, w):
        return {"weight": w}

    def from_parts(self, get, group_size):
        return get("weight")

    def from_canonical(self, x):
        return x.to(self.dtype)

    def cast(self, w, dtype):
        return w.to(dtype)

    def apply(self, x, w, b=None):
        return F.linear(x, w, b)

    def native(self, w, act_dtype, dense_rows=0):   # dense_rows: int4's alone
        return NativeDense(w, act_dtype)
