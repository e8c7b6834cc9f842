"""Programmatic dependent launch (PDL, Hopper and newer): a kernel starts while the one before it finishes.

A kernel launched with `launch_pdl=True` may be scheduled as soon as every program of the kernel before
it in the stream has called `gdc_launch_dependents` (ours do it first thing), instead of after that kernel
has drained. It must call `gdc_wait` before it reads anything the earlier kernels wrote and before it
writes anything: the wait returns once the earlier kernel has completed and its writes are visible (and,
since that kernel waited for its own predecessor the same way, every earlier kernel too). What a program
reads before the wait must never be written by a kernel: the W4A16 GEMVs load their weights there, so a
decode step's weight stream starts while the RMSNorm or attention before it is still running.

Usage inside a kernel (PDL: tl.constexpr, from `enabled(device)` at launch):
    gdc_launch(PDL)        # let the next kernel be scheduled
    w = tl.load(weights)   # inputs no kernel writes
    gdc_wait(PDL)          # everything after this sees the previous kernels' writes
and launch with `kernel[grid](..., PDL=on, **launch_kwargs(on))`.

When it is used: `PIPELINE_PDL=1` forces it on, `=0` off; unset, the process default decides (`set_default`,
off until something turns it on). The engine turns it on for W4A16 weights, where it was measured faster (H100,
batch-1 decode of Llama-2-7B shapes), and leaves it off for W8A8, where it was measured slower with PDL on the int8
GEMM too, and fp16 (not measured); the figures: docs/perf-log.md, "Engine, session 4: programmatic dependent launch".
It is always off on CPUs, in the interpreter, below compute capability 9.0 and on Triton builds without the
`launch_pdl` option.
"""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from pipeline.kernels.dispatch import interpreting

try:  # Triton >= 3.4
    from triton.language.extra.cuda import gdc_launch_dependents as _gdc_launch_dependents
    from triton.language.extra.cuda import gdc_wait as _gdc_wait
except ImportError:  # pragma: no cover - depends on the Triton build
    _gdc_launch_dependents = _gdc_wait = None


@functools.lru_cache(maxsize=None)
def supported_by_triton() -> bool:
    """This Triton has the device-side calls and the `launch_pdl` launch option."""
    if _gdc_wait is None:
        return False
    try:
        from triton.backends.nvidia.compiler import CUDAOptions
    except Exception:  # pragma: no cover
        return False
    return "launch_pdl" in getattr(CUDAOptions, "__dataclass_fields__", {})


_default = {"on": False}


def set_default(on: bool) -> None:
    """What `enabled` answers (where the hardware allows) while PIPELINE_PDL is unset."""
    _default["on"] = bool(on)


def enabled(device: torch.device) -> bool:
    """Launch this device's decode kernels with PDL?"""
    env = os.environ.get("PIPELINE_PDL", "")
    if env not in ("", "0", "1"):
        raise ValueError(f"PIPELINE_PDL={env!r}: must be 0, 1 or unset")
    if env == "0" or (env == "" and not _default["on"]) or interpreting() or device.type != "cuda":
        return False
    return _hopper_or_newer(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _hopper_or_newer(index: int) -> bool:
    return torch.cuda.get_device_capability(index) >= (9, 0) and supported_by_triton()


def launch_kwargs(on: bool) -> dict:
    """Extra launch keyword for a kernel that calls gdc_wait (empty when PDL is off)."""
    return {"launch_pdl": True} if on else {}


@triton.jit
def gdc_wait(PDL: tl.constexpr):
    if PDL:
        _gdc_wait()


@triton.jit
def gdc_launch(PDL: tl.constexpr):
    if PDL:
        _gdc_launch_dependents()
