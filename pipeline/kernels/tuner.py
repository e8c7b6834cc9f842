"""A small GEMM tuner: times a named config set once per shape key and keeps the fastest.

Usage (one per kernel family):
    TUNER = Tuner("W4A16_TUNE")                            # env W4A16_TUNE=0 -> always the default config
    name = TUNER.choose(key, ("a", "b"), lambda name: launch(name), default="a", device=x.device)
    TUNER.record(key) -> (chosen, {config: ms})            # what it measured, for benchmarks
It times outside CUDA-graph capture only (inside a capture it returns the tuned choice or the default), and
a config that fails to compile or launch here is recorded in `errors` and never chosen.
"""
from __future__ import annotations

import os
from typing import Callable, Iterable

import torch

_flush: dict[str, torch.Tensor] = {}


def bench_ms(fn: Callable[[], object], device, reps: int = 8) -> float:
    """Median ms of `fn` on a CUDA device, L2 flushed before each call (decode weights would otherwise sit in
    L2); a GPU sleep queued ahead keeps the host's launch latency out of the events."""
    fn()
    flush = _flush.setdefault(str(device), torch.empty(64 << 20, dtype=torch.uint8, device=device))
    torch.cuda.synchronize()
    torch.cuda._sleep(20_000_000)
    ts = []
    for _ in range(reps):
        flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        ts.append((start, end))
    torch.cuda.synchronize()
    return sorted(s.elapsed_time(e) for s, e in ts)[reps // 2]


class Tuner:
    def __init__(self, env: str, timer: Callable = bench_ms):
        self.env, self.timer = env, timer
        self.tuned: dict[tuple, str] = {}               # key -> chosen config
        self.times: dict[tuple, dict[str, float]] = {}  # key -> {config: ms}
        self.errors: dict[str, str] = {}                # config -> last error while tuning

    def record(self, key: tuple) -> tuple[str | None, dict[str, float]]:
        return self.tuned.get(key), self.times.get(key, {})

    def choose(self, key: tuple, names: Iterable[str], launch: Callable[[str], object], default: str,
               device) -> str:
        if key in self.tuned:
            return self.tuned[key]
        capturing = torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
        if capturing or os.environ.get(self.env, "1") == "0":
            return default
        times = {}
        for name in names:
            try:
                times[name] = self.timer(lambda: launch(name), device)
            except Exception as e:  # a config that does not compile or fit here (e.g. shared memory)
                times[name] = float("inf")
                self.errors[name] = repr(e)[:300]
        self.times[key] = times
        self.tuned[key] = min(times, key=times.get)
        return self.tuned[key]
