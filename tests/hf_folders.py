"""Test helpers: a tiny model written as a Hugging Face folder (Llama names, config.json, tokenizer), and that
folder placed in a Hugging Face cache in the Hub's own layout."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from pipeline.models.llama import ModelArgs
from pipeline.models.sources import save_byte_tokenizer, synthetic_tensors
from pipeline.quant.w8 import hf_config, hf_name

# tiny-random's shapes (conf/model/tiny-random.yaml)
TINY = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, hidden_dim=128, vocab_size=320,
                 max_seq_len=512)


def write_hf_folder(d: Path, args: ModelArgs = TINY, tensors: dict | None = None, dtype=torch.float16,
                    extra_config: dict | None = None) -> dict:
    """A Hugging Face model folder: model.safetensors (HF names), config.json, byte tokenizer. tensors:
    HF name -> tensor (default: tiny-random's seeded weights). Returns the canonical tensors written."""
    d = Path(d)
    d.mkdir(parents=True, exist_ok=True)
    canon = synthetic_tensors(args, 0, dtype)
    save_file(tensors if tensors is not None else {hf_name(k): v for k, v in canon.items()},
              str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps(hf_config(args) | (extra_config or {})))
    save_byte_tokenizer(d, args.vocab_size)
    return canon


def hub_cache(cache: Path, repo_id: str, folder: Path, commit: str = "0123456789abcdef0123456789abcdef01234567",
              ref: str = "main") -> Path:
    """Copy `folder` into `cache` as huggingface_hub lays a downloaded snapshot out:
    models--org--name/{snapshots/<commit>/..., refs/<ref>}. Returns the snapshot folder."""
    repo = Path(cache) / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / commit
    shutil.copytree(folder, snap)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / ref).write_text(commit)
    return snap
