"""Read and write the `load` stage's artifact: model.safetensors (canonical names), config.json, tokenizer/."""
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
