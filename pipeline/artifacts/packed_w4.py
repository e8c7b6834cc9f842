"""The pack stage's artifact: an int-packed checkpoint in AutoAWQ's GEMM layout, canonical tensor names.

    model.safetensors   layers.{i}.{q|k|v|o|gate|up|down}.{qweight (K, N/8) int32, qzeros (K/g, N/8) int32,
                        scales (K/g, N) fp16} (+ .bias), every other tensor (norms with the AWQ scales
                        folded in, embed, lm_head) in the checkpoint's dtype
    config.json         ModelArgs + quantization_config {quant_method: awq, bits, group_size,
                        zero_point, version: gemm}
    tokenizer/          copied from load

    write_packed(out, tensors, load_dir, bits=4, group_size=128, zero_point=True)
    apply_packed(model, pack_dir)            # dequantize into the reference model's linears (evaluate)
    read_unpacked(pack_dir, "layers.0.q")    # q (N, K) uint8, scales (K/g, N), zeros (K/g, N)
    read_dense(pack_dir)                     # every tensor but the packed linears' parts
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors import safe_open

from . import check_format, safetensors_format
from ..models.store import read_tensors, tensor_names
from ..quant.w4 import dequantize, unpack
from ..cache import save_safetensors

FORMAT = 1
REBUILD = "python -m pipeline.runner pipeline=quantize quant=<the quant> (the pack stage)"
FILE = "model.safetensors"
PARTS = (".qweight", ".qzeros", ".scales")


def write_packed(out: Path, tensors: dict, load_dir: Path, *, bits: int, group_size: int, zero_point: bool) -> None:
    """tensors: canonical names -> tensors, packed linears as `<linear>.{qweight,qzeros,scales}`."""
    out, load_dir = Path(out), Path(load_dir)
    save_safetensors(tensors, out / FILE, metadata={"format": "pt", "layout": "canonical-awq-gemm",
                                                   "format_version": str(FORMAT)})
    cfg = json.loads((load_dir / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "awq", "bits": bits, "group_size": group_size,
                                  "zero_point": zero_point, "version": "gemm"}
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    shutil.copytree(load_dir / "tokenizer", out / "tokenizer")


def check(pack_dir: Path) -> None:
    check_format(safetensors_format(Path(pack_dir) / FILE), FORMAT, "pack artifact", pack_dir, REBUILD)


def quant_config(pack_dir: Path) -> dict:
    return json.loads((Path(pack_dir) / "config.json").read_text())["quantization_config"]


def read_unpacked(pack_dir: Path, prefix: str, device="cpu"):
    """(q (N, K) uint8, scales (K/g, N) fp16, zeros (K/g, N) uint8) of one packed linear."""
    check(pack_dir)
    bits = quant_config(pack_dir)["bits"]
    with safe_open(str(Path(pack_dir) / FILE), framework="pt", device=str(device)) as f:
        return unpack(f.get_tensor(prefix + ".qweight"), f.get_tensor(prefix + ".qzeros"),
                      f.get_tensor(prefix + ".scales"), bits)


def read_dense(pack_dir: Path) -> dict:
    """Canonical name -> tensor for everything but the packed linears (norms, embed, lm_head, biases)."""
    check(pack_dir)
    return read_tensors(pack_dir, [n for n in tensor_names(pack_dir) if not n.endswith(PARTS)])


@torch.no_grad()
def apply_packed(model, pack_dir) -> None:
    """Load a pack artifact into the reference model: dequantized linears, folded norms, the rest."""
    pack_dir = Path(pack_dir)
    check(pack_dir)
    qc = quant_config(pack_dir)
    dev = next(model.parameters()).device
    params = dict(model.named_parameters())
    with safe_open(str(pack_dir / FILE), framework="pt", device="cpu") as f:
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
