"""export_ct: the pack stage's int4 weights as a compressed-tensors W4A16 checkpoint, the Hugging Face folder
vLLM and transformers load (pack-quantized), on demand:

    python -m pipeline.runner quant=w4a16 pipeline.targets=[export_ct]   # -> <cache_dir>/export_ct/<key>/

Reads nothing of its own: the pack artifact decides (bits, group, zero point); input: pack.
Artifact: pipeline/artifacts/compressed_w4.py (model.safetensors, config.json, tokenizer files).
"""
from __future__ import annotations

from ..artifacts.compressed_w4 import write_compressed_w4
from ..methods import select

VERSION = 1
READS: list[str] = []


def inputs(cfg) -> list[str]:
    """Refuses, while planning, a quant config that makes no int4 pack artifact."""
    m = select(cfg)
    if m.weight.artifact != "pack" or cfg.quant.w_bits != 4:
        raise ValueError(f"stage export_ct exports 4-bit pack artifacts (quant=w4a16, w4a16_rtn, ...); "
                         f"quant={cfg.quant.name} (weight method {m.weight.name}, w_bits={cfg.quant.w_bits}) makes none")
    return ["pack"]


def run(ctx) -> dict:
    qc = write_compressed_w4(ctx.inputs["pack"], ctx.out)
    w = qc["config_groups"]["group_0"]["weights"]
    return {"format": qc["format"], "group_size": w["group_size"], "symmetric": w["symmetric"]}
