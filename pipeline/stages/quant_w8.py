"""quant_w8: fold the SmoothQuant scales, quantize every decoder linear to int8 per output channel (W8A8).

Reads quant.{w_bits, a_bits}; inputs: load, smooth, calibrate (K/V statistics for the KV qparams).
Activations are quantized per token at run time (dynamic), so nothing about them is stored.
Artifact: pipeline/artifacts/w8a8.py (a compressed-tensors int8 W8A8 checkpoint that vLLM / llm-compressor
read, plus kv_qparams.safetensors: the static KV qparams of the *smoothed* model: v's channels are divided
by the o group's scales, so calibrate's V ranges are rescaled before pipeline.quant.kv.kv_qparams).
"""
from __future__ import annotations

import torch
from safetensors.torch import load_file

from ..artifacts.kv_qparams import write_kv_qparams
from ..artifacts.w8a8 import write_w8a8
from ..methods import require
from ..models.store import read_args, read_tensors, tensor_names
from ..quant import awq
from ..quant.blockwise import LINEARS
from ..quant.kv import kv_qparams
from ..quant.w8 import hf_name, quantize_w8

VERSION = 1
READS = ["quant.w_bits", "quant.a_bits"]


def inputs(cfg) -> list[str]:
    require(cfg, "quant_w8")        # W8A8 (smoothquant): w_bits=8, a_bits=8, checked
    return ["load", "smooth", "calibrate"]


def smoothed_kv_stats(stats: dict, scales: dict, args) -> dict:
    """calibrate's K/V statistics as the smoothed model sees them: V channel c divided by the o scale."""
    out = dict(stats)
    rep = args.n_heads // args.n_kv_heads
    for i in range(args.n_layers):
        s = scales[f"layers.{i}.o.scale"].float().reshape(args.n_kv_heads, rep, args.head_dim)[:, 0]  # (nkv, hd)
        for k in ("min", "max", "absmax"):
            out[f"layers.{i}.v.{k}"] = stats[f"layers.{i}.v.{k}"].float() / s
    return out


@torch.no_grad()
def run(ctx) -> dict:
    load_dir = ctx.inputs["load"]
    args = read_args(load_dir)
    scales = load_file(str(ctx.inputs["smooth"] / "smooth.safetensors"))
    names = tensor_names(load_dir)
    out = {hf_name(k): v.contiguous() for k, v in read_tensors(load_dir, [n for n in names if not n.startswith("layers.")]).items()}
    err = []
    for i in ctx.track(range(args.n_layers), total=args.n_layers, description="quant_w8"):
        p = f"layers.{i}."
        t = awq.apply(read_tensors(load_dir, [n for n in names if n.startswith(p)], device=ctx.device), i, scales, args)
        for n in LINEARS:
            w = t.pop(p + n + ".weight")
            q, s = quantize_w8(w)
            err.append(float((q.float() * s[:, None] - w.float()).norm() / w.float().norm()))
            out[hf_name(p + n + ".weight")] = q.cpu()
            out[hf_name(p + n + ".weight_scale")] = s.to(torch.float16).reshape(-1, 1).cpu()
        out.update({hf_name(k): v.cpu().contiguous() for k, v in t.items()})
    write_w8a8(ctx.out, out, args, load_dir)
    stats = load_file(str(ctx.inputs["calibrate"] / "stats.safetensors"))
    write_kv_qparams(ctx.out, kv_qparams(smoothed_kv_stats(stats, scales, args), args.n_layers))
    nbytes = sum(v.numel() * v.element_size() for v in out.values())
    return {"linears": args.n_layers * len(LINEARS), "bytes": nbytes,
            "weight_rel_err_max": round(max(err), 5), "weight_rel_err_mean": round(sum(err) / len(err), 5)}
