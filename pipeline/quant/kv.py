"""KV-cache quantization parameters and the evaluation hook (math: pipeline/kernels/kvcache.py).

    qp = kv_qparams(stats, n_layers)                 # {name: (n_kv_heads,) fp32}, 8/4 bits x asym/sym
    attach_kv_fake_quant(model, cfg.quant, kv_dir)   # static (kv_dir) or dynamic (kv_dir None)

Per layer and KV head (statistics reduced over head_dim and all calibration tokens):
    asymmetric: zp = (min + max) / 2, scale = (max - min) / (2^bits - 1)
    symmetric:  zp = 0,               scale = absmax / (2^(bits-1) - 1)
Names (kv_qparams.safetensors): layers.{i}.{k|v}.int{8|4}.{asym|sym}.{scale|zp}
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file

from ..kernels.kvcache import kv_fake_quant, kv_qparams_from_stats

VARIANTS = [(bits, sym) for bits in (8, 4) for sym in (False, True)]
FILE = "kv_qparams.safetensors"


def variant(bits: int, sym: bool) -> str:
    return f"int{bits}.{'sym' if sym else 'asym'}"


def kv_qparams(stats: dict[str, torch.Tensor], n_layers: int) -> dict[str, torch.Tensor]:
    out = {}
    for i in range(n_layers):
        for t in ("k", "v"):
            p = f"layers.{i}.{t}."
            mn, mx, am = (stats[p + s].amin(-1) if s == "min" else stats[p + s].amax(-1)
                          for s in ("min", "max", "absmax"))                     # (nkv,)
            for bits, sym in VARIANTS:
                scale, zp = kv_qparams_from_stats(mn, mx, am, bits, sym)
                out[f"{p}{variant(bits, sym)}.scale"], out[f"{p}{variant(bits, sym)}.zp"] = scale, zp
    return out


def check_kv(q) -> None:
    if q.kv_bits not in (4, 8):
        raise ValueError(f"quant.kv_bits={q.kv_bits!r}: quantized KV supports 4 or 8 (null: 16-bit)")
    if q.kv_mode not in ("static", "dynamic"):
        raise ValueError(f"quant.kv_mode={q.kv_mode!r} is not one of ['static', 'dynamic']")


def attach_kv_fake_quant(model, q, kv_dir: Optional[Path]) -> None:
    """Set every block's kv_quant hook: K and V are quantized and dequantized before attention."""
    check_kv(q)
    bits = q.kv_bits
    if q.kv_mode == "dynamic":
        for block in model.layers:
            block.kv_quant = lambda k, v: tuple(
                kv_fake_quant(t.transpose(1, 2), "dynamic", bits).transpose(1, 2) for t in (k, v))
        return
    if kv_dir is None:
        raise ValueError("quant.kv_mode=static needs the kv_qparams artifact (or use quant.kv_mode=dynamic)")
    qp = load_file(str(Path(kv_dir) / FILE))
    dev = next(model.parameters()).device
    name = variant(bits, q.kv_sym)
    for i, block in enumerate(model.layers):
        sk, zk, sv, zv = (qp[f"layers.{i}.{t}.{name}.{s}"].to(dev) for t in "kv" for s in ("scale", "zp"))

        def hook(k, v, sk=sk, zk=zk, sv=sv, zv=zv):                             # k, v (B, nkv, T, hd)
            k = kv_fake_quant(k.transpose(1, 2), "static", bits, sk, zk).transpose(1, 2)
            v = kv_fake_quant(v.transpose(1, 2), "static", bits, sv, zv).transpose(1, 2)
            return k, v
        block.kv_quant = hook
