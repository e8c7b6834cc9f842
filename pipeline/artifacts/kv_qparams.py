"""Static KV-cache quantization parameters: the kv_qparams stage's artifact (quant_w8 writes the same file
for the smoothed model). Names and math: pipeline/quant/kv.py.

    kv_qparams.safetensors   layers.{i}.{k|v}.int{8|4}.{asym|sym}.{scale|zp}, (n_kv_heads,) fp32 each
    (entries cached before this version may also hold tp{r}/kv_qparams.safetensors, per-rank slices: unread)

    write_kv_qparams(out, qp)
    qp = read_kv_qparams(d)                              # name -> tensor
    per_layer = read_static(d, n_layers, bits, sym)      # layer -> (k_scale, k_zp, v_scale, v_zp)
"""
from __future__ import annotations

from pathlib import Path

from safetensors.torch import load_file

from . import check_format, safetensors_format
from ..quant.kv import FILE, variant
from ..cache import save_safetensors

FORMAT = 1
REBUILD = "python -m pipeline.runner pipeline=quantize quant=<the quant> (the kv_qparams stage)"


def write_kv_qparams(out: Path, qp: dict) -> None:
    save_safetensors(qp, Path(out) / FILE, metadata={"format_version": str(FORMAT)})


def check(d: Path) -> None:
    check_format(safetensors_format(Path(d) / FILE), FORMAT, "KV qparams", d, REBUILD)


def read_kv_qparams(d: Path) -> dict:
    check(d)
    return load_file(str(Path(d) / FILE))


def read_static(d: Path, n_layers: int, bits: int, sym: bool) -> dict:
    """layer -> (k_scale, k_zp, v_scale, v_zp), each (n_kv_heads,) fp32."""
    qp = read_kv_qparams(d)
    v = variant(bits, sym)
    return {i: tuple(qp[f"layers.{i}.{t}.{v}.{s}"] for t in "kv" for s in ("scale", "zp")) for i in range(n_layers)}
