"""The GEMM tuner's choice logic (CPU: a fake timer stands in for CUDA events)."""
import torch

from pipeline.kernels.tuner import Tuner


def fake_timer(ms: dict):
    calls = []

    def timer(fn, device):
        name = fn()
        calls.append(name)
        if ms[name] is None:
            raise RuntimeError(f"{name}: out of shared memory")
        return ms[name]
    return timer, calls


def test_picks_fastest_once_per_key_and_records_failures():
    timer, calls = fake_timer({"a": 2.0, "b": 1.0, "c": None})
    t = Tuner("TEST_TUNE", timer=timer)
    launch = lambda name: name  # noqa: E731
    assert t.choose(("k", 1), ("a", "b", "c"), launch, default="a", device="cpu") == "b"
    assert t.choose(("k", 1), ("a", "b", "c"), launch, default="a", device="cpu") == "b"
    assert calls == ["a", "b", "c"]                      # timed once per key
    chosen, times = t.record(("k", 1))
    assert chosen == "b" and times["c"] == float("inf") and "shared memory" in t.errors["c"]
    assert t.record(("other",)) == (None, {})


def test_env_switch_returns_default_without_timing(monkeypatch):
    timer, calls = fake_timer({"a": 2.0, "b": 1.0})
    t = Tuner("TEST_TUNE", timer=timer)
    monkeypatch.setenv("TEST_TUNE", "0")
    assert t.choose(("k",), ("a", "b"), lambda n: n, default="a", device="cpu") == "a"
    assert calls == [] and t.record(("k",)) == (None, {})


def test_no_timing_during_capture(monkeypatch):
    timer, calls = fake_timer({"a": 2.0, "b": 1.0})
    t = Tuner("TEST_TUNE", timer=timer)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert t.choose(("k",), ("a", "b"), lambda n: n, default="b", device="cpu") == "b" and calls == []
