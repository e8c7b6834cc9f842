"""GPTQ weight-only int4 (pipeline/quant/gptq.py): the awq stage (identity scales for GPTQ alone; AWQ's scale and
clip search for AWQ + GPTQ), then gptq on those scaled weights, then pack, which packs GPTQ's codes in the same
format as AWQ's (pipeline/artifacts/packed_w4.py): evaluation, the workspace and serving are AWQ's."""
from __future__ import annotations

from .awq import AWQ


class GPTQ(AWQ):
    """quant.gptq=true quant.search=false quant.clip=false."""
    name = "gptq"
    stages = ("calibrate", "awq", "gptq", "pack")

    def matches(self, q) -> bool:
        return q.w_bits is not None and q.a_bits is None and q.gptq and not (q.search or q.clip)

    def validate(self, cfg) -> None:
        super().validate(cfg)
        q = cfg.quant
        if not 0 <= q.gptq_damp < 1:
            raise ValueError(f"quant.gptq_damp={q.gptq_damp} must be in [0, 1) (a fraction of H's mean diagonal)")
        if not 0 <= q.gptq_feedback <= 1:
            raise ValueError(f"quant.gptq_feedback={q.gptq_feedback} must be in [0, 1] (1: GPTQ, 0: round to nearest)")
        if q.gptq_block < 1 or q.gptq_block % q.group_size:
            raise ValueError(f"quant.gptq_block={q.gptq_block} must be a positive multiple of "
                             f"quant.group_size={q.group_size}")


class AWQGPTQ(GPTQ):
    """quant.gptq=true with the AWQ search (quant.search and/or quant.clip): GPTQ on the AWQ-scaled weights."""
    name = "awq_gptq"

    def matches(self, q) -> bool:
        return q.w_bits is not None and q.a_bits is None and q.gptq and bool(q.search or q.clip)
