"""The GEMM tuner's choice logic (CPU: a fake timer stands in for CUDA events) and its tuning file (a fake
device identity stands in for the GPU's name)."""
import json
import logging
import multiprocessing

import pytest
import torch

from pipeline.kernels import tuner as tuner_mod
from pipeline.kernels.tuner import Tuner


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    """Every test gets its own cache folder (nothing touches ~/.cache) and persistence on."""
    monkeypatch.setenv("PIPELINE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("PIPELINE_TUNE_CACHE", raising=False)
    return tmp_path / "cache"


@pytest.fixture
def gpu(monkeypatch):
    """A fake GPU: `gpu["name"]` is what device_identity reports for any device."""
    ident = {"name": "Fake GPU 80GB, cc 9.0, 132 SMs"}
    monkeypatch.setattr(tuner_mod, "device_identity", lambda device: ident["name"])
    return ident


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


def test_threads_launch_every_candidate_before_the_serial_timing(monkeypatch):
    """PIPELINE_TUNE_THREADS=N: every candidate is launched once from worker threads (their compiles overlap), then
    checked and timed one by one in the caller's thread as without it; the same pick. A launch that tunes a nested
    call (the unfused SwiGLU's plain GEMM) takes that call's default in a worker: nothing is timed beside others."""
    import threading
    monkeypatch.setenv("PIPELINE_TUNE_THREADS", "3")
    main, launched = threading.get_ident(), []
    timer, calls = fake_timer({"a": 2.0, "b": 1.0, "c": None, "d": 3.0})
    inner = Tuner("TEST_INNER", timer=fake_timer({"x": 1.0, "y": 0.5})[0])
    nested = []

    def launch(name):
        launched.append((name, threading.get_ident()))
        if name == "d":   # a candidate whose launch tunes another call
            nested.append(inner.choose(("inner",), ("x", "y"), lambda n: n, default="x", device="cpu"))
        return name
    t = Tuner("TEST_TUNE", timer=timer)
    assert t.choose(("k",), ("a", "b", "c", "d"), launch, default="a", device="cpu") == "b"
    workers = [n for n, tid in launched if tid != main]
    assert sorted(workers) == ["a", "b", "c", "d"] and calls == ["a", "b", "c", "d"]
    assert nested[0] == "x" and nested[-1] == "y"      # default in the worker; tuned in the serial pass
    monkeypatch.setenv("PIPELINE_TUNE_THREADS", "many")
    with pytest.raises(ValueError, match="PIPELINE_TUNE_THREADS='many' is not a whole number"):
        Tuner("TEST_TUNE2", timer=timer).choose(("k",), ("a", "b"), launch, default="a", device="cpu")


def test_compile_threads_default_to_eight_on_a_gpu_only(monkeypatch):
    """A first start on a GPU compiles each shape's candidates on min(8, CPUs) threads (measured: 89 s instead of 212
    s for a 7B's 60 shapes); on a CPU nothing is precompiled; the variable overrides both."""
    from pipeline.kernels.tuner import tune_threads
    monkeypatch.delenv("PIPELINE_TUNE_THREADS", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr("os.cpu_count", lambda: 16)
    assert tune_threads("cuda:0") == 8 and tune_threads("cpu") == 0 and tune_threads() == 0
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    assert tune_threads("cuda") == 2
    monkeypatch.setenv("PIPELINE_TUNE_THREADS", "0")
    assert tune_threads("cuda:0") == 0
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("PIPELINE_TUNE_THREADS")
    assert tune_threads("cuda:0") == 0


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


KEY = (0, torch.float16, 16, 4096, 11008, 128, False, True)   # the shapes of w4a16's keys, a dtype included
LAUNCH = lambda name: name  # noqa: E731


def test_choices_saved_and_reloaded_without_timing(gpu, cache_dir, caplog):
    timer, calls = fake_timer({"a": 2.0, "b": 1.0, "c": None})
    t = Tuner("TEST_TUNE", timer=timer, version="1")
    assert t.choose(KEY, ("a", "b", "c"), LAUNCH, default="a", device="cuda:0") == "b"
    assert t.choose(("k", 2), ("a", "b"), LAUNCH, default="a", device="cuda:0") == "b"
    path = cache_dir / "tuning" / "TEST_TUNE.json"
    data = json.loads(path.read_text())
    (ctx, entries), = data["contexts"].items()
    assert "Fake GPU" in ctx and "version 1" in ctx and "triton" in ctx
    e = entries[repr((0, "torch.float16", 16, 4096, 11008, 128, False, True))]
    assert e == {"config": "b", "ms": {"a": 2.0, "b": 1.0}, "failed": ["c"]}   # the error is not a timing
    assert not list(path.parent.glob("*.tmp"))

    timer2, calls2 = fake_timer({"a": 2.0, "b": 1.0, "c": None})
    t2 = Tuner("TEST_TUNE", timer=timer2, version="1")
    with caplog.at_level(logging.INFO, logger="pipeline.kernels.tuner"):
        assert t2.choose(KEY, ("a", "b", "c"), LAUNCH, default="a", device="cuda:0") == "b"
        assert t2.choose(("k", 2), ("a", "b"), LAUNCH, default="a", device="cuda:0") == "b"
    assert calls2 == [] and KEY in t2.loaded and t2.record(KEY) == ("b", {"a": 2.0, "b": 1.0})
    loaded = [r.getMessage() for r in caplog.records if "loaded" in r.getMessage()]
    assert len(loaded) == 1 and "loaded 2 tuned" in loaded[0] and str(path) in loaded[0]   # once per tuner


def test_other_gpu_or_version_or_candidates_retune(gpu):
    timer, calls = fake_timer({"a": 2.0, "b": 1.0, "d": 0.5})
    Tuner("TEST_TUNE", timer=timer, version="1").choose(KEY, ("a", "b"), LAUNCH, "a", "cuda:0")
    assert calls == ["a", "b"]
    calls.clear()
    Tuner("TEST_TUNE", timer=timer, version="2").choose(KEY, ("a", "b"), LAUNCH, "a", "cuda:0")
    assert calls == ["a", "b"]                            # a new kernel version retunes
    calls.clear()
    gpu["name"] = "Other GPU, cc 8.0, 108 SMs"
    Tuner("TEST_TUNE", timer=timer, version="1").choose(KEY, ("a", "b"), LAUNCH, "a", "cuda:0")
    assert calls == ["a", "b"]                            # another GPU retunes
    calls.clear()
    gpu["name"] = "Fake GPU 80GB, cc 9.0, 132 SMs"
    assert Tuner("TEST_TUNE", timer=timer, version="1").choose(KEY, ("a",), LAUNCH, "a", "cuda:0") == "a"
    assert calls == ["a"]                                 # the saved choice is no longer a candidate
    calls.clear()
    assert Tuner("TEST_TUNE", timer=timer, version="1").choose(KEY, ("a", "b", "d"), LAUNCH, "a", "cuda:0") == "d"
    assert calls == ["a", "b", "d"]                       # a new candidate was never timed against it
    calls.clear()
    assert Tuner("TEST_TUNE", timer=timer, version="1").choose(KEY, ("b", "d"), LAUNCH, "a", "cuda:0") == "d"
    assert calls == []                                    # a subset of what was timed: the saved choice holds


def test_failed_tuning_is_not_saved(gpu, cache_dir):
    timer, calls = fake_timer({"a": None, "b": None})
    Tuner("TEST_TUNE", timer=timer, version="1").choose(KEY, ("a", "b"), LAUNCH, "a", "cuda:0")
    assert not (cache_dir / "tuning" / "TEST_TUNE.json").exists()


def test_corrupt_file_warns_once_and_is_retuned_over(gpu, cache_dir, caplog):
    path = cache_dir / "tuning" / "TEST_TUNE.json"
    path.parent.mkdir(parents=True)
    path.write_text('{"format": 1, "contexts": {"trunc')
    timer, calls = fake_timer({"a": 2.0, "b": 1.0})
    t = Tuner("TEST_TUNE", timer=timer, version="1")
    with caplog.at_level(logging.INFO, logger="pipeline.kernels.tuner"):
        assert t.choose(KEY, ("a", "b"), LAUNCH, "a", "cuda:0") == "b"
        assert t.choose(("k", 2), ("a", "b"), LAUNCH, "a", "cuda:0") == "b"
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "ignoring the tuning cache" in warnings[0].getMessage()
    assert calls == ["a", "b", "a", "b"]
    assert len(json.loads(path.read_text())["contexts"].popitem()[1]) == 2    # replaced by a valid file
    for bad in ("[1, 2]", '{"format": 1, "contexts": {"x": {"k": {"config": 3}}}}', "\x00\xff"):
        path.write_text(bad)                              # not ours / a bad entry / garbage: never a crash
        calls.clear()
        assert Tuner("TEST_TUNE", timer=timer, version="1").choose(KEY, ("a", "b"), LAUNCH, "a", "cuda:0") == "b"
        assert calls == ["a", "b"]


def test_two_tuners_merge_on_write(gpu):
    timer, calls = fake_timer({"a": 2.0, "b": 1.0})
    t1, t2 = Tuner("TEST_TUNE", timer=timer, version="1"), Tuner("TEST_TUNE", timer=timer, version="1")
    t2.choose(("k", 1), ("a", "b"), LAUNCH, "a", "cuda:0")    # t2 read the file (empty) and wrote k1
    t1.choose(("k", 2), ("a", "b"), LAUNCH, "a", "cuda:0")    # t1 read k1, wrote k1 + k2
    t2.choose(("k", 3), ("a", "b"), LAUNCH, "a", "cuda:0")    # t2 never read k2: the write merges it
    calls.clear()
    t3 = Tuner("TEST_TUNE", timer=timer, version="1")
    for i in (1, 2, 3):
        assert t3.choose(("k", i), ("a", "b"), LAUNCH, "a", "cuda:0") == "b"
    assert calls == []


def _tune_keys(first: int) -> None:  # in a forked child: the fake GPU is inherited
    timer, _ = fake_timer({"a": 2.0, "b": 1.0})
    t = Tuner("TEST_TUNE", timer=timer, version="1")
    for i in range(first, first + 10):
        t.choose(("k", i), ("a", "b"), LAUNCH, "a", "cuda:0")


@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="needs fork")
def test_concurrent_processes_keep_every_key(gpu):
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_tune_keys, args=(10 * p,)) for p in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    timer, calls = fake_timer({"a": 2.0, "b": 1.0})
    t = Tuner("TEST_TUNE", timer=timer, version="1")
    assert all(t.choose(("k", i), ("a", "b"), LAUNCH, "a", "cuda:0") == "b" for i in range(40)) and calls == []


def test_switched_off_or_cpu_never_touches_files(gpu, cache_dir, monkeypatch):
    timer, calls = fake_timer({"a": 2.0, "b": 1.0})
    monkeypatch.setenv("PIPELINE_TUNE_CACHE", "0")
    assert Tuner("TEST_TUNE", timer=timer, version="1").choose(KEY, ("a", "b"), LAUNCH, "a", "cuda:0") == "b"
    assert not cache_dir.exists()
    monkeypatch.delenv("PIPELINE_TUNE_CACHE")
    Tuner("TEST_TUNE", timer=timer, version="1").choose(KEY, ("a", "b"), LAUNCH, "a", "cuda:0")
    monkeypatch.setenv("PIPELINE_TUNE_CACHE", "0")
    calls.clear()
    Tuner("TEST_TUNE", timer=timer, version="1").choose(KEY, ("a", "b"), LAUNCH, "a", "cuda:0")
    assert calls == ["a", "b"]                            # nor is a saved file read


def test_cpu_device_identity_is_none_and_nothing_is_written(cache_dir, monkeypatch):
    assert tuner_mod.device_identity("cpu") is None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert tuner_mod.device_identity("cuda:0") is None
    timer, calls = fake_timer({"a": 2.0, "b": 1.0})
    t = Tuner("TEST_TUNE", timer=timer, version="1")
    assert t.choose(KEY, ("a", "b"), LAUNCH, "a", "cpu") == "b" and calls == ["a", "b"]
    assert not cache_dir.exists()


def test_cache_folder_and_key_repr(monkeypatch, tmp_path):
    monkeypatch.delenv("PIPELINE_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert Tuner("W4A16_TUNE").file() == tmp_path / "xdg" / "llm-pipeline" / "tuning" / "W4A16_TUNE.json"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert tuner_mod.cache_dir() == tmp_path / "home" / ".cache" / "llm-pipeline"
    assert tuner_mod.key_repr((0, torch.bfloat16, True, None, "x", (1, 2))) == \
        "(0, 'torch.bfloat16', True, None, 'x', (1, 2))"
    assert tuner_mod.key_repr((object(),)) is None       # tuned, but not persisted
    assert tuner_mod.config_version("1", {"a": (1, 2)}) != tuner_mod.config_version("1", {"a": (1, 3)})


def test_unwritable_cache_warns_once_and_tunes(gpu, tmp_path, monkeypatch, caplog):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    monkeypatch.setenv("PIPELINE_CACHE_DIR", str(blocker / "cache"))   # under a file: cannot be created
    timer, calls = fake_timer({"a": 2.0, "b": 1.0})
    t = Tuner("TEST_TUNE", timer=timer, version="1")
    with caplog.at_level(logging.WARNING, logger="pipeline.kernels.tuner"):
        assert t.choose(("k", 1), ("a", "b"), LAUNCH, "a", "cuda:0") == "b"
        assert t.choose(("k", 2), ("a", "b"), LAUNCH, "a", "cuda:0") == "b"
    assert len([r for r in caplog.records if "cannot save" in r.getMessage()]) == 1


def test_a_config_whose_output_differs_from_the_default_is_never_chosen():
    """A fast but wrong kernel (a new config's bug) loses: each output is checked against the default's first."""
    y = torch.randn(16, 64)
    outs = {"a": y, "fast_wrong": y + 0.5, "nan": y * float("nan"), "b": y + 1e-4 * torch.randn(16, 64)}
    ms = {"a": 2.0, "fast_wrong": 0.5, "nan": 0.1, "b": 1.0}
    t = Tuner("TEST_TUNE", timer=lambda fn, device: ms[next(k for k, v in outs.items() if v is fn())])
    assert t.choose(("k",), tuple(outs), lambda name: outs[name], default="a", device="cpu") == "b"
    _, times = t.record(("k",))
    assert times["fast_wrong"] == times["nan"] == float("inf") and times["b"] == 1.0
    assert "differs from the default" in t.errors["fast_wrong"] and "differs" in t.errors["nan"]
