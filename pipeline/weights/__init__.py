"""Weight types, one table: each kind of linear the workspace stores and the engine runs (16-bit, W4A16 int4, W8A8
int8) is one WeightType (pipeline/weights/base.py) that owns its tensor-parallel cut and join, its workspace file
names, its conversion from the quantizer's output, and how the engine applies it (Triton kernels or their PyTorch
references; `native`: PyTorch's own kernels). config.ini's `weight_type` names a row of WEIGHT_TYPES; a quantization
method's `read` (pipeline/methods) returns its linears with the row's name.

    wt = WEIGHT_TYPES["int4"]                    # or of(w): the row of a record
    shard = wt.cut(w, a, b, OUT)                 # rows a:b (column-parallel); IN: input columns a:b (row-parallel)
    fused = wt.cat([q, k, v], OUT)               # [q | k | v] rows; IN joins row-parallel shards
    files = wt.parts(w); w = wt.from_parts(lambda part: files[part], group_size)
    y = wt.apply(x, w, bias)                     # also norm_apply (RMSNorm + linear), swiglu_down (w2 of SwiGLU)

Adding a weight type: a module here with a WeightType subclass (its record: what its kernel takes) and one row in
WEIGHT_TYPES; a quantization method whose `read` returns linears under that name gets them written, sharded,
loaded and served.
"""
from __future__ import annotations

import torch

from .base import IN, OUT, WeightType
from .dense import Dense
from .int4 import Int4
from .int8 import Int8

__all__ = ["IN", "OUT", "WEIGHT_TYPES", "WeightType", "dense_type", "native_linear", "of", "table_row"]

WEIGHT_TYPES: dict[str, WeightType] = {
    "fp16": Dense("fp16", torch.float16),
    "bf16": Dense("bf16", torch.bfloat16),   # a bf16 source checkpoint's 16-bit weights (bf16 activations)
    "int4": Int4(),                          # W4A16
    "int8": Int8(),                          # W8A8
}
_BY_RECORD: dict[type, WeightType] = {}
for _wt in WEIGHT_TYPES.values():
    _BY_RECORD.setdefault(_wt.record, _wt)   # a dense tensor's row: fp16 (both dense rows apply alike)


def table_row(name: str) -> WeightType:
    """The row config.ini's weight_type names."""
    if name not in WEIGHT_TYPES:
        raise ValueError(f"weight_type={name!r} is not one of {list(WEIGHT_TYPES)} (pipeline/weights)")
    return WEIGHT_TYPES[name]


def dense_type(dtype: torch.dtype) -> WeightType:
    """The 16-bit row for weights of dtype (bf16 stays bf16; anything else is written fp16)."""
    return WEIGHT_TYPES["bf16" if dtype == torch.bfloat16 else "fp16"]


def of(w) -> WeightType:
    """The row of a record (a dense tensor, W4Weight, W8Weight, or a subclass of one)."""
    wt = _BY_RECORD.get(type(w))
    if wt is None:
        wt = next((_BY_RECORD[t] for t in type(w).__mro__ if t in _BY_RECORD), None)
        if wt is None:
            raise TypeError(f"a {type(w).__name__} is no weight type's record; known: "
                            f"{sorted(t.__name__ for t in _BY_RECORD)}")
        _BY_RECORD[type(w)] = wt
    return wt


def native_linear(w, act_dtype: torch.dtype, dense_rows: int = 0):
    """The torch-native layout of a workspace linear (its row's `native`; dense_rows: see `Int4Packed`)."""
    return of(w).native(w, act_dtype, dense_rows)
