"""quant_w8: fold the SmoothQuant scales, quantize every decoder linear to int8 per output channel (W8A8).

Reads quant.{w_bits, a_bits}; inputs: load, smooth, calibrate (K/V statistics for the KV qparams).
Activations are quantized per token at run time (dynamic), so nothing about them is stored.
Artifact, a compressed-tensors int8 W8A8 checkpoint that vLLM / llm-compressor read (see pipeline/quant/w8.py):
    model.safetensors   Hugging Face names; per linear `.weight` int8 (N, K) + `.weight_scale` (N, 1) fp16
                        (+ `.bias`); norms with the smoothing folded in, embeddings, lm_head: checkpoint dtype
    config.json         transformers config + quantization_config (format int-quantized, ...)
    model_args.json     the reference model's ModelArgs (what `apply_w8a8` and the engine read)
    kv_qparams.safetensors  static KV qparams of the *smoothed* model (v's channels are divided by the o
                        group's scales, so calibrate's V ranges are rescaled before pipeline.quant.kv.kv_qparams)
    tokenizer/
Use:
    apply_w8a8(model, quant_w8_dir)     # reference model -> W8A8Linear layers (evaluate)
    read_w8(quant_w8_dir, "layers.0.q")  # (weight int8 (N, K), weight_scale (N,) fp16, bias or None)
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ..models.store import read_args, read_tensors, tensor_names
from ..quant import awq
from ..quant.blockwise import LINEARS
from ..quant.kv import FILE as KV_FILE
from ..quant.kv import kv_qparams
from ..quant.w8 import W8A8Linear, compressed_tensors_config, hf_config, hf_name, quantize_w8

VERSION = 1
READS = ["quant.w_bits", "quant.a_bits"]


def inputs(cfg) -> list[str]:
    return ["load", "smooth", "calibrate"]


def check(q) -> None:
    if q.a_bits != 8 or q.w_bits != 8:
        raise ValueError(f"quant_w8 makes W8A8: needs quant.w_bits=8 and quant.a_bits=8, got "
                         f"w_bits={q.w_bits}, a_bits={q.a_bits}")


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
    check(ctx.cfg.quant)
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
    save_file(out, str(ctx.out / "model.safetensors"), metadata={"format": "pt"})
    cfg = hf_config(args) | {"quantization_config": compressed_tensors_config()}
    (ctx.out / "config.json").write_text(json.dumps(cfg, indent=2))
    shutil.copy(load_dir / "config.json", ctx.out / "model_args.json")
    stats = load_file(str(ctx.inputs["calibrate"] / "stats.safetensors"))
    save_file(kv_qparams(smoothed_kv_stats(stats, scales, args), args.n_layers), str(ctx.out / KV_FILE))
    shutil.copytree(load_dir / "tokenizer", ctx.out / "tokenizer")
    nbytes = sum(v.numel() * v.element_size() for v in out.values())
    return {"linears": args.n_layers * len(LINEARS), "bytes": nbytes,
            "weight_rel_err_max": round(max(err), 5), "weight_rel_err_mean": round(sum(err) / len(err), 5)}


def read_w8(d: Path, prefix: str, device="cpu"):
    """(weight int8 (N, K), weight_scale (N,) fp16, bias or None) of one linear, by canonical prefix."""
    with safe_open(str(Path(d) / "model.safetensors"), framework="pt", device=str(device)) as f:
        keys = set(f.keys())
        b = hf_name(prefix + ".bias")
        return (f.get_tensor(hf_name(prefix + ".weight")), f.get_tensor(hf_name(prefix + ".weight_scale")).reshape(-1),
                f.get_tensor(b) if b in keys else None)


@torch.no_grad()
def apply_w8a8(model, d) -> None:
    """Load a quant_w8 artifact into the reference model: W8A8Linear layers, folded norms, the rest."""
    d = Path(d)
    dev = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    for i, block in enumerate(model.layers):
        for n in LINEARS:
            q, s, b = read_w8(d, f"layers.{i}.{n}", dev)
            setattr(block, n, W8A8Linear(q, s, None if b is None else b.to(dtype)))
    with safe_open(str(d / "model.safetensors"), framework="pt", device="cpu") as f:
        keys = set(f.keys())
        for name, prm in model.named_parameters():
            if isinstance(model.get_submodule(name.rsplit(".", 1)[0]), W8A8Linear):
                continue
            hf = hf_name(name)
            if hf not in keys:
                raise ValueError(f"quant_w8 artifact {d} has no tensor {hf} (for {name})")
            prm.copy_(f.get_tensor(hf).to(dev, prm.dtype))
