"""load: a model source (hf folder or Hub id | gguf file | embedded SmolLM2 | synthetic) -> canonical checkpoint.

Artifact: model.safetensors (canonical names, model.dtype), config.json (ModelArgs), tokenizer/ (with
chat template). A pre-quantized hf checkpoint (AutoAWQ, GPTQ, compressed-tensors W4A16; pipeline/models/prequant.py)
is dequantized into model.safetensors (what evaluate's quant=fp16 measures) and its int4 linears are kept as
they are in w4.safetensors (pipeline/models/store.py), which the turbomind stage serves under quant=fp16 / kv*.
"""
from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import OmegaConf

from ..models.hub import is_repo_id, resolve
from ..models.llama import ModelArgs
from ..models.sources import (SOURCES, embedded_gguf, load_gguf, load_hf_folder, save_byte_tokenizer,
                              save_tokenizer, synthetic_tensors)
from ..models.prequant import read_quantized
from ..models.store import parse_dtype, write_model, write_w4

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
    extra = {}
    if m.source == "synthetic":
        args = ModelArgs.from_dict(OmegaConf.to_container(m.shape))
        dev = ctx.device
        tensors = synthetic_tensors(args, m.seed, dtype, device=dev)
        save_byte_tokenizer(ctx.out / "tokenizer", args.vocab_size)
    else:
        if m.source == "hf":
            path = resolve(m.path, m.get("revision"))
            ck = read_quantized(path, dtype)
            if ck is not None:       # a pre-quantized checkpoint: dequantized weights + its own int4 linears
                args, tensors, tok_src = ck.args, ck.tensors, path
                if ck.w4:
                    write_w4(ctx.out, ck.w4, ck.group_size)
                extra = {"prequantized": ck.method, "w4_group_size": ck.group_size}
            else:
                args, tensors, tok_src = load_hf_folder(path)
        else:
            src = embedded_gguf(ctx.download_dir) if m.source == "embedded" else Path(m.path)
            args, tensors, tok_src = load_gguf(src)
        save_tokenizer(tok_src, ctx.out / "tokenizer")
        tensors = {k: v.to(dtype) for k, v in tensors.items()}
    write_model(ctx.out, args, tensors)
    n = sum(t.numel() for t in tensors.values())
    return {"arch": args.arch, "layers": args.n_layers, "params_M": round(n / 1e6, 1), "dtype": m.dtype, **extra}
