"""kv_qparams: static KV-cache quantization parameters per layer and KV head, from calibrate's K/V stats.

Reads no config; input: calibrate (and load for the model shape). Computes every variant (int8/int4 x
asymmetric/symmetric) so that kv8 and kv4 configs share one artifact, and every serving tp too: the workspace
writer gives each rank its KV heads' qparams (pipeline/artifacts/workspace.py `kv_heads`).
Artifact: pipeline/artifacts/kv_qparams.py (kv_qparams.safetensors, all heads), kv_qparams.json (summary).
"""
from __future__ import annotations

import json

from safetensors.torch import load_file

from ..artifacts.kv_qparams import write_kv_qparams
from ..models.store import read_args
from ..quant.kv import kv_qparams

VERSION = 1
# The retired quant.num_tp, hashed at its one value (graph.RETIRED) and read by nothing: listed only so that the
# keys of cached artifacts stay valid (the per-rank files it once sized are no longer written).
READS = ["quant.num_tp"]


def inputs(cfg) -> list[str]:
    return ["load", "calibrate"]


def run(ctx) -> dict:
    args = read_args(ctx.inputs["load"])
    stats = load_file(str(ctx.inputs["calibrate"] / "stats.safetensors"))
    qp = kv_qparams(stats, args.n_layers)
    write_kv_qparams(ctx.out, qp)
    k8 = [qp[f"layers.{i}.k.int8.asym.scale"].max().item() for i in range(args.n_layers)]
    res = {"layers": args.n_layers, "kv_heads": args.n_kv_heads,
           "variants": sorted({k.split(".", 3)[3].rsplit(".", 1)[0] for k in qp}),
           "max_k_scale_int8": round(max(k8), 5)}
    (ctx.out / "kv_qparams.json").write_text(json.dumps(res, indent=2))
    return res
