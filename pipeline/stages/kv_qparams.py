"""kv_qparams: static KV-cache quantization parameters per layer and KV head, from calibrate's K/V stats.

Reads `quant.num_tp`; input: calibrate (and load for the model shape). Computes every variant
(int8/int4 x asymmetric/symmetric) so that kv8 and kv4 configs share one artifact.
Artifact: pipeline/artifacts/kv_qparams.py (kv_qparams.safetensors, all heads; tp{r}/kv_qparams.safetensors
per tensor-parallel rank), kv_qparams.json (summary).
"""
from __future__ import annotations

import json

from safetensors.torch import load_file

from ..artifacts.kv_qparams import write_kv_qparams
from ..models.store import read_args
from ..quant.kv import kv_qparams, split_tp

VERSION = 1
READS = ["quant.num_tp"]


def inputs(cfg) -> list[str]:
    return ["load", "calibrate"]


def run(ctx) -> dict:
    args = read_args(ctx.inputs["load"])
    stats = load_file(str(ctx.inputs["calibrate"] / "stats.safetensors"))
    qp = kv_qparams(stats, args.n_layers)
    ranks = split_tp(qp, ctx.cfg.quant.num_tp, args.n_kv_heads)
    write_kv_qparams(ctx.out, qp, ranks)
    k8 = [qp[f"layers.{i}.k.int8.asym.scale"].max().item() for i in range(args.n_layers)]
    res = {"layers": args.n_layers, "kv_heads": args.n_kv_heads, "num_tp": len(ranks),
           "variants": sorted({k.split(".", 3)[3].rsplit(".", 1)[0] for k in qp}),
           "max_k_scale_int8": round(max(k8), 5)}
    (ctx.out / "kv_qparams.json").write_text(json.dumps(res, indent=2))
    return res
