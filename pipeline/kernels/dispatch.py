"""Choose, per call, between a Triton kernel and its PyTorch reference; per engine, its backend.

Rules (in order):
  PIPELINE_KERNELS=reference  -> always the PyTorch reference
  PIPELINE_KERNELS=triton     -> always Triton (on CPU tensors this needs TRITON_INTERPRET=1)
  PIPELINE_KERNELS=native     -> the engine runs the torch-native backend (pipeline/engine/native.py) on any
                                 device, the GPU included; single kernels called directly take their reference
  auto (default)              -> Triton on a CUDA device of compute capability >= the kernel's
                                 minimum, the reference everywhere else (CPU, old GPUs); the engine runs the
                                 torch-native backend wherever the kernels would not be Triton (`use_native`).
Without a GPU and without the interpreter a Triton launch fails with "0 active drivers",
so `auto` never sends CPU tensors to Triton.
"""
from __future__ import annotations

import functools
import logging
import os

import torch

log = logging.getLogger(__name__)

_MODES = ("auto", "triton", "reference", "native")


def cdiv(a: int, b: int) -> int:
    """Host-side ceil(a / b) for launch grids (triton.cdiv goes through Triton's constexpr wrapper: ~2-3 us a call
    on the host, several per launch)."""
    return -(-a // b)


def env_count(name: str, default: int) -> int:
    """A whole, non-negative count from the environment variable `name` (default when unset); a ValueError naming
    the variable for anything else."""
    v = os.environ.get(name, str(default))
    try:
        n = int(v)
    except ValueError:
        raise ValueError(f"{name}={v!r} is not a whole number") from None
    if n < 0:
        raise ValueError(f"{name}={v!r} is negative")
    return n


def next_pow2(n: int) -> int:
    """Host-side smallest power of two >= n (n >= 1), for block sizes (triton.next_power_of_2 costs ~3 us a call on
    the host through the same wrapper)."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def mode() -> str:
    m = os.environ.get("PIPELINE_KERNELS", "auto")
    if m not in _MODES:
        raise ValueError(f"PIPELINE_KERNELS={m!r} is not one of {_MODES}")
    return m


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def triton_importable() -> bool:
    try:
        import triton  # noqa: F401
        return True
    except Exception:  # pragma: no cover - depends on the install
        return False


def device_capability(device: torch.device) -> tuple[int, int] | None:
    """Compute capability of a CUDA device, or None for other devices. Tests monkeypatch this."""
    if device.type != "cuda":
        return None
    return _cuda_capability(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _cuda_capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def sm_count(device: torch.device, cpu: int) -> int:
    """Multiprocessors of a CUDA device; `cpu` elsewhere (the interpreter's stand-in, chosen per kernel so
    that small CPU tests still exercise its split paths)."""
    if device.type != "cuda":
        return cpu
    return _cuda_sms(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _cuda_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


_reported: set[tuple[str, torch.device, bool]] = set()
_last_path: dict[str, str] = {}


def last_path(kernel: str) -> str | None:
    """What the latest `use_triton` call chose for `kernel`: "triton", "reference", or None if never asked."""
    return _last_path.get(kernel)


def use_triton(t: torch.Tensor, kernel: str, min_capability: tuple[int, int] = (8, 0)) -> bool:
    """True when `kernel` should run through Triton for tensors living where `t` lives."""
    m = mode()
    if m in ("reference", "native") or not triton_importable():
        choice = False
    elif m == "triton":
        choice = True
    else:
        cap = device_capability(t.device)
        choice = cap is not None and tuple(cap) >= tuple(min_capability)
    _last_path[kernel] = "triton" if choice else "reference"
    key = (kernel, t.device, choice)
    if key not in _reported:
        _reported.add(key)
        log.info("kernel %s on %s: %s", kernel, t.device, "triton" if choice else "pytorch reference")
    return choice


def use_native(device: torch.device) -> bool:
    """True when the engine on `device` should run the torch-native backend: PIPELINE_KERNELS=native, or auto where
    the Triton kernels would not run (a CPU without the interpreter, a CUDA device below sm_80)."""
    m = mode()
    if m != "auto":
        return m == "native"
    if device.type == "cpu":
        return not interpreting()
    cap = device_capability(device)
    return cap is not None and tuple(cap) < (8, 0)


_counters: dict[str, torch.Tensor] = {}
MAX_COUNTERS = 1 << 16


def arrival_counters(device, n: int) -> torch.Tensor:
    """int32 counters for kernels whose last-arriving program finishes a split reduction (W4A16 split-K,
    decode attention's split merge). Zero between launches: each finishing program re-arms its own.
    One fixed table per device (never reallocated: CUDA graphs keep its address); launches on one stream
    run one after another and share it; concurrent launches on two streams of a device are not supported."""
    if n > MAX_COUNTERS:
        raise ValueError(f"a launch needs {n} split counters, more than the table's {MAX_COUNTERS}")
    key = str(device)
    if key not in _counters:
        _counters[key] = torch.zeros(MAX_COUNTERS, dtype=torch.int32, device=device)
    return _counters[key]
