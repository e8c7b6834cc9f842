"""Weight-only int4 (3/8 accepted for evaluation): AWQ (scale and clip search on calibration data) and RTN
(round to nearest, identity scales: no calibration). Both run the awq stage, then pack; the artifact is
pipeline/artifacts/packed_w4.py. Only 4-bit is served (the W4A16 kernel)."""
from __future__ import annotations

from ..artifacts.packed_w4 import apply_packed, read_dense, read_unpacked
from ..quant.blockwise import LINEARS
from ..quant.w4 import check_bits, check_group, check_group_size
from .base import WeightMethod


class AWQ(WeightMethod):
    name = "awq"
    stages = ("calibrate", "awq", "pack")
    artifact = "pack"
    weight_type = "int4"

    def matches(self, q) -> bool:
        return q.w_bits is not None and q.a_bits is None and bool(q.search or q.clip) and not q.gptq

    def validate(self, cfg) -> None:
        q = cfg.quant
        check_bits(q.w_bits)
        check_group(q.group_size)
        if cfg.model.source == "synthetic":  # the shape is known before anything runs: refuse a bad group now
            check_group_size(cfg.model.shape, q.group_size, f" of model {cfg.model.name}")

    def served(self, q) -> bool:
        return q.w_bits == 4

    def apply(self, model, inputs) -> None:
        apply_packed(model, inputs["pack"])

    def read(self, inputs, args, device):
        pdir = inputs["pack"]
        w4 = {f"layers.{i}.{n}": read_unpacked(pdir, f"layers.{i}.{n}", device)
              for i in range(args.n_layers) for n in LINEARS}
        return read_dense(pdir), w4, self.weight_type


class RTN(AWQ):
    """quant.search=false quant.clip=false: the awq stage writes identity scales and clips, without calibrate."""
    name = "rtn"
    stages = ("awq", "pack")

    def matches(self, q) -> bool:
        return q.w_bits is not None and q.a_bits is None and not (q.search or q.clip or q.gptq)
