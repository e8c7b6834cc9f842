"""Quantization methods: which upstream stages a quant config needs (shared by evaluate and turbomind)."""
from __future__ import annotations


def upstream(cfg) -> list[str]:
    """load, plus pack (w_bits=4) or quant_w8 (W8A8), plus kv_qparams (static KV of a model without W8A8)."""
    ups = ["load"]
    if cfg.quant.a_bits:
        ups.append("quant_w8")  # W8A8; it also holds the KV qparams of the smoothed model
    elif cfg.quant.w_bits:
        ups.append("pack")
    if cfg.quant.kv_bits and cfg.quant.kv_mode == "static" and not cfg.quant.a_bits:
        ups.append("kv_qparams")
    return ups
