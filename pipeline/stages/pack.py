"""pack: apply the AWQ result and write an int-packed checkpoint in AutoAWQ's GEMM layout.

Reads quant.{w_bits, group_size, zero_point}; inputs: load, awq, and gptq for the GPTQ methods (its codes are
packed as they are; otherwise the AWQ-scaled weights are rounded to nearest with the AWQ clips).
Artifact: pipeline/artifacts/packed_w4.py (its readers: read_unpacked, apply_packed).
"""
from __future__ import annotations

import torch
from safetensors.torch import load_file

from ..artifacts.packed_w4 import write_packed
from ..methods import select
from ..models.store import read_args, read_tensors, tensor_names
from ..quant import awq
from ..quant.blockwise import LINEARS
from ..quant.w4 import pack, quantize

VERSION = 1
READS = ["quant.w_bits", "quant.group_size", "quant.zero_point"]


def inputs(cfg) -> list[str]:
    return ["load", "awq"] + (["gptq"] if "gptq" in select(cfg).stages() else [])


@torch.no_grad()
def run(ctx) -> dict:
    q = ctx.cfg.quant
    load_dir = ctx.inputs["load"]
    args = read_args(load_dir)
    res = load_file(str(ctx.inputs["awq"] / "awq.safetensors"))
    codes = load_file(str(ctx.inputs["gptq"] / "gptq.safetensors")) if "gptq" in ctx.inputs else None
    names = tensor_names(load_dir)
    out = read_tensors(load_dir, [n for n in names if not n.startswith("layers.")])
    dev = ctx.device
    for i in ctx.track(range(args.n_layers), total=args.n_layers, description="pack"):
        p = f"layers.{i}."
        t = read_tensors(load_dir, [n for n in names if n.startswith(p)], device=dev)
        t = awq.apply(t, i, res, args)
        for n in LINEARS:
            w = t.pop(p + n + ".weight")
            if codes is not None:
                qq, sc, zz = (codes[f"{p}{n}.{k}"] for k in ("codes", "scales", "zeros"))
            else:
                qq, sc, zz = quantize(w, q.w_bits, q.group_size, q.zero_point, res[p + n + ".clip"].to(dev))
            for k, v in pack(qq, sc, zz, q.w_bits).items():
                out[f"{p}{n}.{k}"] = v.cpu()
        out.update({k: v.cpu() for k, v in t.items()})
    write_packed(ctx.out, out, load_dir, bits=q.w_bits, group_size=q.group_size, zero_point=q.zero_point)
    nbytes = sum(v.numel() * v.element_size() for v in out.values())
    return {"bits": q.w_bits, "group_size": q.group_size, "bytes": nbytes,
            "linears": args.n_layers * len(LINEARS)}
