"""The quant_w8 stage's artifact: a compressed-tensors int8 W8A8 checkpoint that vLLM / llm-compressor read.

    model.safetensors   Hugging Face names; per linear `.weight` int8 (N, K) + `.weight_scale` (N, 1) fp16
                        (+ `.bias`); norms with the smoothing folded in, embeddings, lm_head: checkpoint dtype
    config.json         transformers config + quantization_config (format int-quantized, see pipeline/quant/w8.py)
    model_args.json     the reference model's ModelArgs (what `apply_w8a8` and the engine read)
    kv_qparams.safetensors  static KV qparams of the *smoothed* model (pipeline/artifacts/kv_qparams.py)
    tokenizer/

    write_w8a8(out, tensors, args, load_dir)   # tensors by Hugging Face name
    apply_w8a8(model, quant_w8_dir)            # reference model -> W8A8Linear layers (evaluate)
    read_w8(quant_w8_dir, "layers.0.q")        # (weight int8 (N, K), weight_scale (N,) fp16, bias or None)
    read_quant_w8(quant_w8_dir, load_dir, args)  # (canonical tensors without the linears, {linear: W8Weight})
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors import safe_open

from . import check_format, safetensors_format
from ..models.store import tensor_names
from ..quant.blockwise import LINEARS
from ..quant.w8 import W8A8Linear, W8Weight, compressed_tensors_config, hf_config, hf_name
from ..cache import save_safetensors

FORMAT = 1
REBUILD = "python -m pipeline.runner pipeline=evaluate quant=w8a8 (the quant_w8 stage)"
FILE = "model.safetensors"


def write_w8a8(out: Path, tensors: dict, args, load_dir: Path) -> None:
    out, load_dir = Path(out), Path(load_dir)
    save_safetensors(tensors, out / FILE, metadata={"format": "pt", "format_version": str(FORMAT)})
    cfg = hf_config(args) | {"quantization_config": compressed_tensors_config()}
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    shutil.copy(load_dir / "config.json", out / "model_args.json")
    shutil.copytree(load_dir / "tokenizer", out / "tokenizer")


def check(d: Path) -> None:
    check_format(safetensors_format(Path(d) / FILE), FORMAT, "quant_w8 artifact", d, REBUILD)


def read_w8(d: Path, prefix: str, device="cpu"):
    """(weight int8 (N, K), weight_scale (N,) fp16, bias or None) of one linear, by canonical prefix."""
    with safe_open(str(Path(d) / FILE), framework="pt", device=str(device)) as f:
        keys = set(f.keys())
        b = hf_name(prefix + ".bias")
        return (f.get_tensor(hf_name(prefix + ".weight")), f.get_tensor(hf_name(prefix + ".weight_scale")).reshape(-1),
                f.get_tensor(b) if b in keys else None)


def read_quant_w8(qdir: Path, load_dir: Path, args) -> tuple[dict, dict]:
    """A quant_w8 artifact (Hugging Face names) -> (canonical tensors without the linears' weights,
    {"layers.0.q": W8Weight(int8 (N, K), scales (N,) fp16), ...})."""
    check(qdir)
    lin = {f"layers.{i}.{n}" for i in range(args.n_layers) for n in LINEARS}
    names = [n for n in tensor_names(load_dir) if not (n.endswith(".weight") and n[: -len(".weight")] in lin)]
    with safe_open(str(Path(qdir) / FILE), framework="pt", device="cpu") as f:
        tensors = {n: f.get_tensor(hf_name(n)) for n in names}
    w8 = {}
    for n in sorted(lin):
        q, s, _ = read_w8(qdir, n)
        w8[n] = W8Weight(q, s)
    return tensors, w8


@torch.no_grad()
def apply_w8a8(model, d) -> None:
    """Load a quant_w8 artifact into the reference model: W8A8Linear layers, folded norms, the rest."""
    d = Path(d)
    check(d)
    dev = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    for i, block in enumerate(model.layers):
        for n in LINEARS:
            q, s, b = read_w8(d, f"layers.{i}.{n}", dev)
            setattr(block, n, W8A8Linear(q, s, None if b is None else b.to(dtype)))
    with safe_open(str(d / FILE), framework="pt", device="cpu") as f:
        keys = set(f.keys())
        for name, prm in model.named_parameters():
            if isinstance(model.get_submodule(name.rsplit(".", 1)[0]), W8A8Linear):
                continue
            hf = hf_name(name)
            if hf not in keys:
                raise ValueError(f"quant_w8 artifact {d} has no tensor {hf} (for {name})")
            prm.copy_(f.get_tensor(hf).to(dev, prm.dtype))
