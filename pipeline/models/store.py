"""Read and write the `load` stage's artifact: model.safetensors (canonical names), config.json, tokenizer/, and
for a pre-quantized checkpoint (pipeline/models/prequant.py) its int4 linears as they are in w4.safetensors:
    layers.{i}.{q|k|v|o|gate|up|down}.{qweight (K, N/8) int32 (AutoAWQ order, pipeline/quant/w4.py),
    scales (K/g, N) fp16, zeros (K/g, N) uint8}, metadata group_size.
    write_w4(out, w4, group_size); read_w4(load_dir) -> {linear: (q, scales, zeros)} or None"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Optional

import torch
from safetensors import safe_open

from .llama import ModelArgs, Transformer, build_model
from ..cache import save_safetensors

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def parse_dtype(name: str, device: Optional[torch.device] = None) -> torch.dtype:
    if name == "auto":
        return torch.float16 if device is not None and device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ValueError(f"dtype {name!r} is not one of {['auto', *DTYPES]}")
    return DTYPES[name]


def write_model(out: Path, args: ModelArgs, tensors: dict[str, torch.Tensor]) -> None:
    args.to_json(out / "config.json")
    save_safetensors({k: v.contiguous().cpu() for k, v in tensors.items()}, out / "model.safetensors",
              metadata={"format": "pt", "layout": "canonical"})


W4_FILE = "w4.safetensors"


def write_w4(out: Path, w4: dict, group_size: int) -> None:
    from ..quant.w4 import pack_cols
    t = {}
    for k, (q, sc, z) in w4.items():
        t.update({k + ".qweight": pack_cols(q.T, 4), k + ".scales": sc, k + ".zeros": z})
    save_safetensors(t, Path(out) / W4_FILE, metadata={"format": "pt", "group_size": str(group_size)})


def read_w4(d: Path, device="cpu") -> Optional[dict]:
    """The checkpoint's own int4 linears (quantizer format), or None when load wrote none (16-bit source)."""
    from ..quant.w4 import unpack_cols
    f = Path(d) / W4_FILE
    if not f.exists():
        return None
    t = read_tensors_file(f, device)
    return {k[: -len(".qweight")]: (unpack_cols(v, 4, t[k[:-8] + ".scales"].shape[1]).T.contiguous(),
                                    t[k[:-8] + ".scales"], t[k[:-8] + ".zeros"])
            for k, v in t.items() if k.endswith(".qweight")}


def read_tensors_file(f: Path, device="cpu") -> dict:
    with safe_open(str(f), framework="pt", device=str(device)) as fh:
        return {k: fh.get_tensor(k) for k in fh.keys()}


def read_args(d: Path) -> ModelArgs:
    return ModelArgs.from_json(Path(d) / "config.json")


def read_tensors(d: Path, names: Optional[Iterable[str]] = None, device="cpu",
                 dtype: Optional[torch.dtype] = None) -> dict[str, torch.Tensor]:
    """Canonical tensors (all, or `names`), read lazily from model.safetensors."""
    out = {}
    with safe_open(str(Path(d) / "model.safetensors"), framework="pt", device="cpu") as f:
        for k in (names if names is not None else f.keys()):
            t = f.get_tensor(k)
            out[k] = t.to(device=device, dtype=dtype or t.dtype)
    return out


def tensor_names(d: Path) -> list[str]:
    with safe_open(str(Path(d) / "model.safetensors"), framework="pt", device="cpu") as f:
        return list(f.keys())


def read_model(d: Path, device="cpu", dtype: Optional[torch.dtype] = None) -> Transformer:
    return build_model(read_args(d), read_tensors(d, device=device, dtype=dtype), device=device, dtype=dtype)


def read_tokenizer(d: Path):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(Path(d) / "tokenizer"))
