"""How long the device waits for the host between engine steps, measured on the device itself.

Usage (engine.py):
    tl = DeviceTimeline(device)
    tl.begin()            # before a step's first launch
    ...launches...
    tl.end()              # after its last launch, before the host waits for it
    tl.pause()            # the engine has nothing to do: the next gap is not the host's
    tl.counters()         # {"device_busy_s", "device_gap_s", "device_gaps"}

Each step's work is bracketed by two CUDA events recorded in stream order as the host issues it. Once both have
run: busy += end - begin, and when the step followed another with work waiting in between, gap += its begin - the
previous end, i.e. the time the device sat idle while the host scheduled, built inputs or read tokens. A step issued
while its predecessor still runs (look-ahead decoding) begins the moment that one ends: a gap of ~0. Host timers
(`decode_s`, `prefill_s`) cannot tell these apart: they count the host's own work inside or outside a step, not
whether the device had anything queued. On a CPU every call is a no-op.
"""
from __future__ import annotations

from collections import deque
from typing import Optional

import torch


class DeviceTimeline:
    def __init__(self, device: torch.device):
        self.on, self.device = device.type == "cuda", device
        self.busy_s = self.gap_s = 0.0
        self.gaps = 0
        self._pending: deque = deque()          # (begin, end, chained) events not yet known to have run
        self._begin: Optional[torch.cuda.Event] = None
        self._chained = False                   # the next step follows one with no idle engine in between
        self._last_end: Optional[torch.cuda.Event] = None

    def _record(self) -> "torch.cuda.Event":
        ev = torch.cuda.Event(enable_timing=True)
        ev.record(torch.cuda.current_stream(self.device))   # the engine's device, whichever is current
        return ev

    def begin(self) -> None:
        if self.on and self._begin is None:
            self._begin = self._record()

    def end(self) -> None:
        if not self.on or self._begin is None:
            return
        self._pending.append((self._begin, self._record(), self._chained))
        self._begin, self._chained = None, True
        self.settle()

    def pause(self) -> None:
        self._chained = False
        self.settle()

    def settle(self) -> None:
        """Account the steps whose end event has run (oldest first; never waits)."""
        while self._pending and self._pending[0][1].query():
            b, e, chained = self._pending.popleft()
            self.busy_s += b.elapsed_time(e) / 1e3
            if chained and self._last_end is not None:
                self.gap_s += max(0.0, self._last_end.elapsed_time(b)) / 1e3
                self.gaps += 1
            self._last_end = e

    def counters(self) -> dict:
        """The totals so far (read from any thread; settled by the engine's own thread at end() and pause())."""
        return {"device_busy_s": self.busy_s, "device_gap_s": self.gap_s, "device_gaps": self.gaps}
