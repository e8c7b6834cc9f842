"""load: a model source (hf folder or Hub id | gguf file | embedded SmolLM2 | synthetic) -> canonical checkpoint.

Artifact: model.safetensors (canonical names, model.dtype), config.json (ModelArgs), tokenizer/ (with
chat template).
"""
from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import OmegaConf

from ..models.hub import is_repo_id, resolve
from ..models.llama import ModelArgs
from ..models.sources import (SOURCES, embedded_gguf, load_gguf, load_hf_folder, save_byte_tokenizer,
                              save_tokenizer, synthetic_tensors)
from ..models.store import parse_dtype, write_model

VERSION = 1
READS = ["model"]
log = logging.getLogger(__name__)


def inputs(cfg) -> list[str]:
    return []


def validate(mcfg) -> None:
    """Checks that need no loading; called by the runner before anything runs."""
    if mcfg.source not in SOURCES:
        raise ValueError(f"model.source={mcfg.source!r} is not one of {list(SOURCES)}")
    if mcfg.source in ("hf", "gguf") and not mcfg.path:
        raise ValueError(f"model.source={mcfg.source} needs model.path (a {'folder' if mcfg.source == 'hf' else '.gguf file'})")
    if mcfg.source in ("hf", "gguf") and not Path(mcfg.path).exists() and not (mcfg.source == "hf" and is_repo_id(mcfg.path)):
        raise ValueError(f"model.path={mcfg.path!r} does not exist; give a local Hugging Face folder or a Hub id "
                         "org/name (model.source=hf), a .gguf file (model.source=gguf), or model.source=embedded|synthetic")
    parse_dtype(mcfg.dtype)


def run(ctx) -> dict:
    m = ctx.cfg.model
    validate(m)
    dtype = parse_dtype(m.dtype)
    if m.source == "synthetic":
        args = ModelArgs.from_dict(OmegaConf.to_container(m.shape))
        dev = ctx.device
        tensors = synthetic_tensors(args, m.seed, dtype, device=dev)
        save_byte_tokenizer(ctx.out / "tokenizer", args.vocab_size)
    else:
        if m.source == "hf":
            args, tensors, tok_src = load_hf_folder(resolve(m.path, m.get("revision")))
        else:
            src = embedded_gguf(ctx.download_dir) if m.source == "embedded" else Path(m.path)
            args, tensors, tok_src = load_gguf(src)
        save_tokenizer(tok_src, ctx.out / "tokenizer")
        tensors = {k: v.to(dtype) for k, v in tensors.items()}
    write_model(ctx.out, args, tensors)
    n = sum(t.numel() for t in tensors.values())
    return {"arch": args.arch, "layers": args.n_layers, "params_M": round(n / 1e6, 1), "dtype": m.dtype}
