"""Launch an already compiled Triton kernel without the JIT's per-call bookkeeping.

`kernel[grid](*args, **meta)` on a @triton.jit function goes through JITFunction.run on every call: the binder
(argument specialisation), a cache key built from the launch options' text, checks of global values, launch hooks,
then the compiled kernel. On the H100 host that costs ~27-34 us per launch against ~13-15 us for launching the
compiled kernel directly (bench/host_overhead.py, breakdown), which adds up over the ~300 eager Triton launches of
one prefill step. Wrapping the kernel,

    @fast_launch
    @triton.jit
    def _my_kernel(...): ...

keeps the same call syntax. The first call with a new specialisation goes through Triton (compiling if needed) and
remembers the compiled kernel under (device, the binder's specialisation of every argument, the launch options);
later calls run Triton's own binder (the same specialisation Triton would compute: dtypes, 16-byte alignment,
integers equal to 1 or divisible by 16, constexpr values) and launch the remembered kernel. What is not re-checked
after the first call: changes to Triton's runtime knobs and to global values the kernel reads (ours read none).

Off (plain JIT launches) under TRITON_INTERPRET=1, with PIPELINE_FAST_LAUNCH=0, for callable grids, and for good
after the first failure of the direct path (a Triton whose internals differ): a warning is logged once and every
launch then goes through Triton as usual.
"""
from __future__ import annotations

import logging
import os

import torch

from pipeline.kernels.dispatch import interpreting

log = logging.getLogger(__name__)

_state = {"on": os.environ.get("PIPELINE_FAST_LAUNCH", "1") != "0", "broken": None}


def set_enabled(on: bool) -> None:
    """Turn the direct path on or off for the whole process (tests and A/B benchmarks)."""
    _state["on"] = bool(on)


def disabled_reason() -> str | None:
    """Why the direct path stopped working in this process (None while it works or was never tried)."""
    return _state["broken"]


class FastKernel:
    """A @triton.jit function whose repeated launches skip JITFunction.run (see the module doc)."""

    def __init__(self, fn):
        self.fn = fn
        self._compiled: dict[tuple, object] = {}

    def __getattr__(self, name):  # everything else (params, device_caches, ...) is the JIT function's
        return getattr(self.fn, name)

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self._launch(grid, args, kwargs)

    def _launch(self, grid, args, kwargs):
        if not _state["on"] or _state["broken"] or callable(grid) or interpreting():
            return self.fn[grid](*args, **kwargs)
        try:
            dev = torch.cuda.current_device()
            caches = self.fn.device_caches.get(dev)
            if caches is None:  # never launched on this device: Triton builds its binder on the first launch
                return self._first(grid, args, kwargs, dev)
            bound, spec, opts = caches[-1](*args, **kwargs)
            key = (dev, tuple(spec), tuple(opts.items()))
            kernel = self._compiled.get(key)
            if kernel is None:
                return self._first(grid, args, kwargs, dev, key)
            g = (grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1)
            kernel[g](*bound.values())
            return kernel
        except Exception as e:  # noqa: BLE001 - anything unexpected: Triton's own path from now on
            _state["broken"] = f"{type(e).__name__}: {e}"[:300]
            log.warning("direct Triton launches disabled (%s); using the JIT launch path", _state["broken"])
            return self.fn[grid](*args, **kwargs)

    def _first(self, grid, args, kwargs, dev, key=None):
        kernel = self.fn[grid](*args, **kwargs)
        if kernel is not None:
            if key is None:
                _, spec, opts = self.fn.device_caches[dev][-1](*args, **kwargs)
                key = (dev, tuple(spec), tuple(opts.items()))
            self._compiled[key] = kernel
        return kernel


def fast_launch(fn):
    """Wrap a @triton.jit function (under TRITON_INTERPRET=1 it is returned as is: the interpreter has no compiled
    kernels, and tests look for its InterpretedFunction objects)."""
    return fn if interpreting() else FastKernel(fn)
