"""`python -m pipeline.workspace`: a workspace from a Hugging Face or AutoAWQ folder, without the stage graph.

The layout, its writer and readers live in pipeline/artifacts/workspace.py; this module re-exports them
for existing imports (`from pipeline.workspace import write_workspace`).

    python -m pipeline.workspace --hf /models/llama-2-7b-chat --out ./workspace --tp 1   # fp16 HF folder
    python -m pipeline.workspace --hf /models/llama-2-7b-awq --out ./workspace            # AutoAWQ folder
"""
from __future__ import annotations

import json
from pathlib import Path

from .artifacts.workspace import *  # noqa: F401,F403
from .artifacts.workspace import (COL, FORMAT, QUANT_POLICIES, ROW, SERVE_DEFAULTS, TOKENIZER, WEIGHTS,  # noqa: F401
                                  Workspace, check_tp, config_args, from_hf_folder, kv_heads, load_tensor,
                                  out_slices, read_config, reassemble, save_tensor, write_config, write_workspace)


def main(argv=None) -> None:
    import argparse
    ap = argparse.ArgumentParser(description="Build a workspace from a Hugging Face or AutoAWQ-format folder.")
    ap.add_argument("--hf", required=True, help="folder with config.json + *.safetensors (fp16, or AutoAWQ int4), "
                    "or a Hugging Face Hub id org/name (the local HF cache first)")
    ap.add_argument("--revision", default=None, help="Hub id only: branch, tag or commit (default main)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--name", default=None)
    a = ap.parse_args(argv)
    from .models.hub import resolve
    src = resolve(a.hf, a.revision)
    print(json.dumps(from_hf_folder(src, Path(a.out), tp=a.tp, model_name=a.name or Path(a.hf).name)))


if __name__ == "__main__":
    main()
