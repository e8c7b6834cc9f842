"""What a weight type declares: how one linear of its kind is held, cut and joined for tensor parallelism, named in
the workspace's files, converted from what the quantizer wrote, and applied by the engine.

A linear's record is what the serving kernels take (a dense (N, K) tensor, a `W4Weight`, a `W8Weight`, ...): the
engine's layers hold records, the workspace stores them one file per part, and every method below takes or returns
one. `along` is OUT (output features: column-parallel shards, the fused [q | k | v] and [gate | up] rows) or IN
(input features: row-parallel shards of wo and w2).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from ..kernels.norm import rms_norm, silu_mul

OUT, IN = "out", "in"


class WeightType:
    name: str = ""
    record: type = object                # the Python type of one linear
    files: tuple[str, ...] = ()          # its workspace files: <prefix>.<part> for each part
    canonical_suffix: str = ""           # reassemble's name for a linear: "<linear><suffix>" ("layers.0.q")
    act_dtype: torch.dtype = torch.float16   # the engine's activations on a GPU
    label: str = ""                      # the quant name served models report (w4a16, ...; default: name)
    pdl: bool = False                    # programmatic dependent launch by default (where measured faster)
    native_dense_copy: bool = False      # `native` on a CPU keeps a bf16 copy for prefill (2 N K bytes)

    # ------------------------------------------------------------------ tensor parallelism
    def cut(self, w, a: int, b: int, along: str):
        """Output rows a:b (along=OUT) or input columns a:b (along=IN) of w."""
        raise NotImplementedError

    def cat(self, parts: list, along: str):
        """Records joined along their output (OUT) or input (IN) features; one part is returned as it is."""
        raise NotImplementedError

    # ------------------------------------------------------------------ files and conversions
    def parts(self, w) -> dict[str, torch.Tensor]:
        """part name (one of `files`) -> tensor, as written to the workspace."""
        raise NotImplementedError

    def from_parts(self, get: Callable[[str], torch.Tensor], group_size: int):
        """The record from its parts (get(part) reads one); group_size: config.ini's."""
        raise NotImplementedError

    def from_canonical(self, x):
        """What the quantizer (or a checkpoint reader) hands the workspace writer -> the record."""
        return x

    def to_canonical(self, w):
        """Exact inverse of from_canonical (the workspace's `reassemble`)."""
        return w

    def group_size(self, w) -> Optional[int]:
        """The record's own quantization group (config.ini's group_size), None when it has none."""
        return None

    def cast(self, w, dtype: torch.dtype):
        """The record as the engine holds it for compute dtype `dtype` (16-bit weights cast; codes kept)."""
        return w

    # ------------------------------------------------------------------ the engine
    def apply(self, x: torch.Tensor, w, b: Optional[torch.Tensor] = None) -> torch.Tensor:
        """y = x @ W.T (+ b): x (..., K) -> (..., N)."""
        raise NotImplementedError

    def norm_apply(self, x, residual, norm, eps, w, b=None):
        """RMSNorm(x [+ residual]) * norm, then this linear: (y, the new residual stream x [+ residual])."""
        if residual is None:
            h, residual = rms_norm(x, norm, eps), x
        else:
            h, residual = rms_norm(x, norm, eps, residual=residual)
        return self.apply(h, w, b), residual

    def swiglu_down(self, gate_up: torch.Tensor, w) -> torch.Tensor:
        """w2(silu(gate) * up) for gate_up (T, 2I)."""
        return self.apply(silu_mul(gate_up), w)

    def native(self, w, act_dtype: torch.dtype, dense_rows: int = 0):
        """The record repacked once for PyTorch's own kernels (pipeline/kernels/native.py): a callable (x, bias)."""
        raise NotImplementedError
