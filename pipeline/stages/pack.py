"""pack: apply the AWQ result and write an int-packed checkpoint in AutoAWQ's GEMM layout.

Reads quant.{w_bits, group_size, zero_point}; inputs: load, awq.
Artifact (canonical tensor names, see pipeline/models/llama.py, not Hugging Face names):
    model.safetensors   layers.{i}.{q|k|v|o|gate|up|down}.{qweight (K, N/8) int32, qzeros (K/g, N/8) int32,
                        scales (K/g, N) fp16} (+ .bias), every other tensor (norms with the AWQ scales
                        folded in, embed, lm_head) in the checkpoint's dtype
    config.json         ModelArgs + quantization_config {quant_method: awq, bits, group_size,
                        zero_point, version: gemm}
    tokenizer/          copied from load
Use:
    apply_packed(model, pack_dir)       # dequantize into the reference model's linears (evaluate)
    read_unpacked(pack_dir, "layers.0.q")   # q (N, K) uint8, scales (K/g, N), zeros (K/g, N)
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
from ..quant.w4 import dequantize, pack, quantize, unpack

VERSION = 1
READS = ["quant.w_bits", "quant.group_size", "quant.zero_point"]


def inputs(cfg) -> list[str]:
    return ["load", "awq"]


@torch.no_grad()
def run(ctx) -> dict:
    q = ctx.cfg.quant
    load_dir = ctx.inputs["load"]
    args = read_args(load_dir)
    res = load_file(str(ctx.inputs["awq"] / "awq.safetensors"))
    names = tensor_names(load_dir)
    out = read_tensors(load_dir, [n for n in names if not n.startswith("layers.")])
    dev = ctx.device
    for i in ctx.track(range(args.n_layers), total=args.n_layers, description="pack"):
        p = f"layers.{i}."
        t = read_tensors(load_dir, [n for n in names if n.startswith(p)], device=dev)
        t = awq.apply(t, i, res, args)
        for n in LINEARS:
            w = t.pop(p + n + ".weight")
            qq, sc, zz = quantize(w, q.w_bits, q.group_size, q.zero_point, res[p + n + ".clip"].to(dev))
            for k, v in pack(qq, sc, zz, q.w_bits).items():
                out[f"{p}{n}.{k}"] = v.cpu()
        out.update({k: v.cpu() for k, v in t.items()})
    save_file(out, str(ctx.out / "model.safetensors"), metadata={"format": "pt", "layout": "canonical-awq-gemm"})
    cfg = json.loads((load_dir / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "awq", "bits": q.w_bits, "group_size": q.group_size,
                                  "zero_point": q.zero_point, "version": "gemm"}
    (ctx.out / "config.json").write_text(json.dumps(cfg, indent=2))
    shutil.copytree(load_dir / "tokenizer", ctx.out / "tokenizer")
    nbytes = sum(v.numel() * v.element_size() for v in out.values())
    return {"bits": q.w_bits, "group_size": q.group_size, "bytes": nbytes,
            "linears": args.n_layers * len(LINEARS)}


def read_unpacked(pack_dir: Path, prefix: str, device="cpu"):
    """(q (N, K) uint8, scales (K/g, N) fp16, zeros (K/g, N) uint8) of one packed linear."""
    bits = json.loads((Path(pack_dir) / "config.json").read_text())["quantization_config"]["bits"]
    with safe_open(str(Path(pack_dir) / "model.safetensors"), framework="pt", device=str(device)) as f:
        return unpack(f.get_tensor(prefix + ".qweight"), f.get_tensor(prefix + ".qzeros"),
                      f.get_tensor(prefix + ".scales"), bits)


@torch.no_grad()
def apply_packed(model, pack_dir) -> None:
    """Load a pack artifact into the reference model: dequantized linears, folded norms, the rest."""
    pack_dir = Path(pack_dir)
    qc = json.loads((pack_dir / "config.json").read_text())["quantization_config"]
    dev = next(model.parameters()).device
    params = dict(model.named_parameters())
    with safe_open(str(pack_dir / "model.safetensors"), framework="pt", device="cpu") as f:
        keys = set(f.keys())
        for name, prm in params.items():
            base = name[: -len(".weight")]
            if base + ".qweight" in keys:
                qq, sc, zz = unpack(f.get_tensor(base + ".qweight"), f.get_tensor(base + ".qzeros"),
                                    f.get_tensor(base + ".scales"), qc["bits"])
                prm.copy_(dequantize(qq.to(dev), sc.to(dev), zz.to(dev), qc["group_size"], prm.dtype))
            elif name in keys:
                prm.copy_(f.get_tensor(name).to(dev, prm.dtype))
            else:
                raise ValueError(f"pack artifact {pack_dir} has no tensor for {name} (nor {base}.qweight)")
