"""Helpers for kernel tests: the Triton interpreter, fresh seeds, errors against a reference.

tests/conftest.py sets TRITON_INTERPRET=1 before triton is imported when there is no CUDA, so in CI
every `@triton.jit` kernel (and Triton's own `tl.sum`, ...) is interpreted and kernel launchers accept
CPU tensors. `interpreted(name, monkeypatch)` returns `pipeline.kernels.<name>` for an interpreter
test, forces PIPELINE_KERNELS=triton for the test, and skips on a GPU machine (compiled kernels).
"""
from __future__ import annotations

import importlib
import os
import random

import pytest
import torch

if not torch.cuda.is_available():  # also in tests/conftest.py; here too in case this module runs first
    os.environ.setdefault("TRITON_INTERPRET", "1")


def interpreted(name: str, monkeypatch):
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton interpreter not active (CUDA present): see tests/conftest.py")
    mod = importlib.import_module(f"pipeline.kernels.{name}")
    if not any(type(v).__name__ == "InterpretedFunction" for v in vars(mod).values()):
        raise RuntimeError(f"pipeline.kernels.{name} was compiled, not interpreted: triton was imported "
                           "before TRITON_INTERPRET=1 was set (tests/conftest.py must run first)")
    monkeypatch.setenv("PIPELINE_KERNELS", "triton")
    return mod


def fresh_seed() -> int:
    """A new seed per test (fresh inputs every run); put it in assertion messages to reproduce."""
    seed = random.SystemRandom().randrange(2**31)
    torch.manual_seed(seed)
    return seed


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64; NaN anywhere gives inf (never passes)."""
    out, ref = out.double(), ref.double()
    if not torch.isfinite(out).all():
        return float("inf")
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def cuda_ok() -> bool:
    return torch.cuda.is_available()
