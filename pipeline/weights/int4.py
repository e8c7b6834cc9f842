"""W4A16: int4 codes with per-group fp16 scales and zeros, in the serving kernel's layout (`W4Weight`:
qweight (K//8, N) int32, scales/zeros (K//g, N) fp16; pipeline/kernels/w4a16.py). Files `<prefix>.qweight`,
`.scales`, `.zeros`. N is dim 1 of every part and K splits on whole groups (K//8 rows of qweight, K//g of the
scales), so tensor-parallel cuts and joins never unpack. The quantizer's format (q (N, K) uint8, scales,
zeros (K//g, N)) is packed once, when the workspace is written."""
from __future__ import annotations

import torch

from ..kernels.native import int4_layout
from ..kernels.w4a16 import W4Weight, pack_w4, unpack_w4, w4a16_linear
from .base import OUT, WeightType

FIELDS = ("qweight", "scales", "zeros")


class Int4(WeightType):
    name = "int4"
    record = W4Weight
    files = FIELDS
    label = "w4a16"
    pdl = True                                       # measured faster for the W4A16 GEMVs (kernels/pdl.py)
    native_dense_copy = True                         # CPU prefill on a bf16 copy (kernels/native.py)

    def cut(self, w, a, b, along):
        if along == OUT:
            return W4Weight(w.qweight[:, a:b], w.scales[:, a:b], w.zeros[:, a:b], w.K, b - a, w.group_size)
        g = w.group_size
        if a % g or b % g:
            raise ValueError(f"row-parallel split [{a}:{b}] of an int4 weight does not fall on group_size={g} "
                             "boundaries; choose a tp that divides the input dim into whole groups")
        return W4Weight(w.qweight[a // 8:b // 8], w.scales[a // g:b // g], w.zeros[a // g:b // g], b - a, w.N, g)

    def cat(self, parts, along):
        p = parts[0]
        if len(parts) == 1:
            return p
        dim = 1 if along == OUT else 0
        K, N = (p.K, sum(x.N for x in parts)) if along == OUT else (sum(x.K for x in parts), p.N)
        return W4Weight(*(torch.cat([getattr(x, f) for x in parts], dim) for f in FIELDS), K, N, p.group_size)

    def parts(self, w):
        return {f: getattr(w, f) for f in FIELDS}

    def from_parts(self, get, group_size):
        qw, s, z = (get(f) for f in FIELDS)
        return W4Weight(qw, s, z, qw.shape[0] * 8, qw.shape[1], group_size)

    def from_canonical(self, x):
        q, s, z = x                                  # q (N, K) uint8, scales/zeros (K//g, N)
        return pack_w4(q, s, z, q.shape[1] // s.shape[0])

    def to_canonical(self, w):
        return unpack_w4(w)

    def group_size(self, w):
        return w.group_size

    def apply(self, x, w, b=None):
        return w4a16_linear(x, w, b)

    def swiglu_down(self, gate_up, w):
        return w4a16_linear(gate_up, w, act="silu_mul")      # the product computed while loading its input

    def native(self, w, act_dtype, dense_rows=0):
        return int4_layout(w, act_dtype, dense_rows)

