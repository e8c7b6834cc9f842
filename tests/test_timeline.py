"""The device timeline's accounting (pipeline/engine/timeline.py) with a fake device clock standing in for CUDA
events (CPU): busy time per step, gaps only between chained steps, none across a pause (the engine idle), steps
counted only once their end event has run, and a step queued while its predecessor runs leaving no gap."""
import torch

from pipeline.engine import timeline


class FakeDevice:
    """A stream that runs queued work in order: `now` is how far the device has got (ms)."""

    def __init__(self):
        self.now, self.queue_end = 0.0, 0.0

    def event(self, enable_timing=True):
        dev = self

        class Event:
            def record(self, stream=None):
                self.t = dev.queue_end            # the device reaches it once the work before it is done

            def query(self):
                return dev.now >= self.t

            def elapsed_time(self, other):
                return other.t - self.t
        return Event()

    def work(self, ms: float, host_at: float) -> None:
        """Queue ms of device work, issued by the host at time host_at (the device idles until then)."""
        self.queue_end = max(self.queue_end, host_at) + ms


def test_busy_and_gaps_from_the_device_clock(monkeypatch):
    dev = FakeDevice()
    monkeypatch.setattr(torch.cuda, "Event", dev.event)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: None)
    tl = timeline.DeviceTimeline(torch.device("cuda"))

    def step(host_at: float, ms: float) -> None:
        dev.queue_end = max(dev.queue_end, host_at)   # begin: recorded when the host issues the step
        tl.begin()
        dev.work(ms, host_at)
        tl.end()

    step(0.0, 5.0)              # 0-5
    step(6.0, 5.0)              # issued 1 ms after the device went idle: 6-11, a 1 ms gap
    step(8.0, 5.0)              # issued while the previous runs: 11-16, no gap
    assert tl.counters()["device_gaps"] == 0          # nothing has run yet on the fake device
    dev.now = 16.0
    tl.settle()
    assert tl.counters() == {"device_busy_s": 0.015, "device_gap_s": 0.001, "device_gaps": 2}
    tl.pause()                  # the engine idles: the next gap is not the host's
    step(100.0, 4.0)            # 100-104
    step(104.5, 1.0)            # 104.5-105.5: 0.5 ms gap
    dev.now = 200.0
    tl.settle()
    c = tl.counters()
    assert abs(c["device_busy_s"] - 0.020) < 1e-9 and abs(c["device_gap_s"] - 0.0015) < 1e-9 and c["device_gaps"] == 3
