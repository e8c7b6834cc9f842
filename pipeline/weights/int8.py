"""W8A8: int8 codes per output channel (`W8Weight`: qweight (N, K) int8, scales (N,) fp16; pipeline/quant/w8.py)
with per-token int8 activations quantized at run time. Files `<prefix>.qweight`, `.scales`. A column-parallel
shard holds its rows and their scales; a row-parallel shard its input columns and all N scales (the same on
every rank)."""
from __future__ import annotations

import torch

from ..kernels.int8_gemm import int8_linear
from ..kernels.native import Int8Dynamic
from ..kernels.quant_act import rms_norm_quant
from ..quant.w8 import W8Weight, w8a8_linear
from .base import OUT, WeightType


class Int8(WeightType):
    name = "int8"
    record = W8Weight
    files = ("qweight", "scales")
    label = "w8a8"

    def cut(self, w, a, b, along):
        if along == OUT:
            return W8Weight(w.qweight[a:b], w.scales[a:b])
        return W8Weight(w.qweight[:, a:b], w.scales)      # per output channel scales: every input slice keeps all N

    def cat(self, parts, along):
        if len(parts) == 1:
            return parts[0]
        if along == OUT:
            return W8Weight(torch.cat([p.qweight for p in parts]), torch.cat([p.scales for p in parts]))
        s = parts[0].scales
        if not all(torch.equal(p.scales, s) for p in parts[1:]):
            raise ValueError("row-parallel int8 shards carry different scales: every rank must hold all N "
                             "scales of the whole linear (rebuild the workspace)")
        return W8Weight(torch.cat([p.qweight for p in parts], 1), s)

    def parts(self, w):
        return {"qweight": w.qweight, "scales": w.scales}

    def from_parts(self, get, group_size):
        return W8Weight(get("qweight"), get("scales"))

    def apply(self, x, w, b=None):
        return w8a8_linear(x, w, b)

    def norm_apply(self, x, residual, norm, eps, w, b=None):
        """The norm and the activations' per-token int8 quantization are one kernel."""
        if residual is None:
            (q, s), residual = rms_norm_quant(x, norm, eps), x
        else:
            q, s, residual = rms_norm_quant(x, norm, eps, residual=residual)
        return int8_linear(q, s, w.qweight, w.scales, b, out_dtype=x.dtype), residual

    def native(self, w, act_dtype, dense_rows=0):   # dense_rows: int4's alone
        return Int8Dynamic(w, act_dtype)
