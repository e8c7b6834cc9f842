"""A small GEMM tuner: times a named config set once per shape key and keeps the fastest.

Usage (one per kernel family):
    TUNER = Tuner("W4A16_TUNE", version=...)               # env W4A16_TUNE=0 -> always the default config
    name = TUNER.choose(key, ("a", "b"), lambda name: launch(name), default="a", device=x.device)
    TUNER.record(key) -> (chosen, {config: ms})            # what it measured, for benchmarks
It times outside CUDA-graph capture only (inside a capture it returns the tuned choice or the default), and
a config that fails to compile or launch here, or whose output differs from the default config's (relative
error above `CHECK_TOL`: a new kernel's bug must not win on speed), is recorded in `errors` and never chosen.

Tuned choices persist across processes in `<cache>/tuning/<env>.json` (`cache_dir()`: PIPELINE_CACHE_DIR, else
$XDG_CACHE_HOME/llm-pipeline or ~/.cache/llm-pipeline), so a second server start on the same GPU skips tuning;
PIPELINE_TUNE_CACHE=0 turns that off. One file per kernel family: each tuner reads, locks and rewrites only its
own, and one family's file can be deleted alone. Entries are grouped by context (`device_identity`: GPU name,
compute capability, SM count; Triton's version; the tuner's `version`, which the kernel module bumps when its
kernels change and which carries a digest of its config table, `config_version`; how calls were timed, `TIMING`)
and keyed by the repr of the normalized shape key:
    {"format": 1, "tuner": "W4A16_TUNE", "contexts": {"<gpu> | triton 3.9.0 | version 1+ab12cd34 | read-flush":
        {"(0, 'torch.float16', 1, 4096, 4096, 128, False, False, True)":
            {"config": "wide_n64_s4", "ms": {"wide_n64_s4": 0.011, ...}, "failed": []}}}}
Only keys whose chosen config timed successfully are saved; a saved choice is used only if it is among the
current candidates and no current candidate went untimed then. Each save merges with the file on disk under a
lock file and replaces it atomically (temp file + os.replace); an unreadable file is warned about once and
retuned over. Nothing is read or written for non-CUDA devices or under Triton's interpreter.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import math
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Iterable

import torch

from .dispatch import env_count

log = logging.getLogger(__name__)
_flush: dict[str, torch.Tensor] = {}
FORMAT = 1


# How bench_ms times: part of every tuning context, so that choices timed another way are not reused. "read-flush":
# L2 emptied by reading 64 MB (clean lines, as serving leaves it: the previous layer's weights and KV are reads);
# the first method zeroed the buffer, leaving ~50 MB of dirty lines whose write-back the timed kernel's reads paid
# (0-10% on W4A16 decode GEMMs on an H100, bench/tuner_flush_ab.py, session 21).
TIMING = "read-flush"


def flush_l2(device) -> None:
    """Evict L2 by reading 64 MB (a reduction into one element): the lines left behind are clean."""
    flush = _flush.get(str(device))
    if flush is None:   # made once (setdefault would fill a new 64 MB buffer, a write, at every call)
        flush = _flush[str(device)] = torch.zeros(16 << 20, dtype=torch.int32, device=device)
    flush.amax()


def bench_ms(fn: Callable[[], object], device, reps: int = 8) -> float:
    """Median ms of `fn` on a CUDA device, L2 flushed before each call (decode weights would otherwise sit in
    L2; `flush_l2`); a GPU sleep queued ahead keeps the host's launch latency out of the events."""
    fn()
    flush_l2(device)
    torch.cuda.synchronize()
    torch.cuda._sleep(20_000_000)
    ts = []
    for _ in range(reps):
        flush_l2(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        ts.append((start, end))
    torch.cuda.synchronize()
    return sorted(s.elapsed_time(e) for s, e in ts)[reps // 2]


# ----------------------------------------------------------------------------------------- persistence
def cache_dir() -> Path:
    """PIPELINE_CACHE_DIR, else $XDG_CACHE_HOME/llm-pipeline, else ~/.cache/llm-pipeline."""
    d = os.environ.get("PIPELINE_CACHE_DIR")
    if d:
        return Path(d).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "llm-pipeline"


def persistence_enabled() -> bool:
    return os.environ.get("PIPELINE_TUNE_CACHE", "1") != "0"


def device_identity(device) -> str | None:
    """What tuned choices are valid for: GPU name, compute capability and SM count (a MIG slice or a smaller
    SKU has fewer SMs, and split-K configs depend on them); None where choices are not persisted (non-CUDA
    devices, Triton's interpreter). Tests monkeypatch this."""
    device = torch.device(device)
    if device.type != "cuda" or os.environ.get("TRITON_INTERPRET") == "1" or not torch.cuda.is_available():
        return None
    return _cuda_identity(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _cuda_identity(index: int) -> str:
    p = torch.cuda.get_device_properties(index)
    return f"{p.name}, cc {p.major}.{p.minor}, {p.multi_processor_count} SMs"


def config_version(base: str, configs: dict) -> str:
    """A tuner version: `base` (bump it when a kernel changes) + a digest of the config table, so that editing,
    adding or removing a config retunes without anyone remembering to bump."""
    digest = hashlib.sha1(repr(sorted(configs.items())).encode()).hexdigest()[:8]
    return f"{base}+{digest}"


def _norm(v):
    if v is None or isinstance(v, (bool, str)):
        return v
    if isinstance(v, int):
        return int(v)
    if isinstance(v, float):
        return v if math.isfinite(v) else repr(v)
    if isinstance(v, (torch.dtype, torch.device)):
        return str(v)
    if isinstance(v, (tuple, list)):
        return tuple(_norm(x) for x in v)
    raise TypeError(f"cannot persist a tuner key holding {type(v).__name__}")


def key_repr(key: tuple) -> str | None:
    """A stable string for a shape key (ints, strings, bools, None, dtypes, devices, nested tuples); None for a
    key holding anything else (such a key is tuned but not persisted)."""
    try:
        return repr(_norm(key))
    except TypeError:
        return None


def _valid_entry(e) -> bool:
    if not isinstance(e, dict) or not isinstance(e.get("config"), str):
        return False
    ms, failed = e.get("ms", {}), e.get("failed", [])
    return (isinstance(ms, dict) and all(isinstance(t, (int, float)) for t in ms.values())
            and isinstance(failed, list) and all(isinstance(n, str) for n in failed))


def _read(path: Path) -> dict[str, dict[str, dict]]:
    """{context: {key repr: entry}} of a tuning file; {} when there is none. Raises ValueError when the file is
    unreadable or not one of ours."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read: {e}") from e
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"not JSON: {e}") from e
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("contexts"), dict):
        raise ValueError(f"not a format-{FORMAT} tuning file")
    return {ctx: {k: e for k, e in entries.items() if _valid_entry(e)}
            for ctx, entries in data["contexts"].items() if isinstance(entries, dict)}


@contextlib.contextmanager
def _file_lock(path: Path, timeout: float = 10.0):
    """An exclusive flock on `path` (released by the OS if the holder dies); after `timeout` s, or where flock is
    missing, it goes on without (the caller still re-reads before replacing, so only a racing write can be
    lost, never the file)."""
    try:
        import fcntl
    except ImportError:  # not POSIX
        yield
        return
    with open(path, "a") as f:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError:
                if time.monotonic() > deadline:
                    log.warning("tuning cache: %s still locked after %.0f s; writing without the lock", path,
                                timeout)
                    yield
                    return
                time.sleep(0.01)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _write_atomic(path: Path, data: dict) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide it from other users of a shared cache folder
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


CHECK_TOL = 2e-2  # relative (Frobenius) error against the default config's output; reorderings are ~1e-3


def _reference(launch: Callable[[str], object], default: str) -> torch.Tensor | None:
    """The default config's output (a candidate or not), when it is a tensor; else None: no check."""
    try:
        out = launch(default)
    except Exception:  # the default itself failing is recorded by the timing loop
        return None
    return out.detach().float().clone() if isinstance(out, torch.Tensor) else None


def _check_output(name: str, out, ref: torch.Tensor) -> None:
    err = ((out.float() - ref).norm() / ref.norm().clamp_min(1e-30)).item()
    if not err <= CHECK_TOL:  # NaN fails too
        raise ValueError(f"{name}: output differs from the default config's (relative error {err:.2e})")


_local = threading.local()   # precompiling: this thread is one of precompile()'s


def tune_threads(device=None) -> int:
    """PIPELINE_TUNE_THREADS=N: candidates launched once by N threads before the timing, so their compiles overlap
    (Triton's compile releases the GIL for much of its work); the timing itself stays serial. Default: on a GPU
    min(8, CPUs), elsewhere 0 (off). Measured on an H100 host of 16 CPUs (session 19, bench/serve.py's first start
    of a 7B): 8 threads tuned the 60 GEMM shapes in 89.4 s, against 212.1 s without (session 18, 4 configs fewer)."""
    cuda = device is not None and torch.device(device).type == "cuda" and torch.cuda.is_available()
    return env_count("PIPELINE_TUNE_THREADS", min(8, os.cpu_count() or 1) if cuda else 0)


def precompile(names: tuple, launch: Callable[[str], object], device) -> None:
    """Launch every candidate once from tune_threads() threads (none: nothing), each on the caller's CUDA stream, and
    wait: what a candidate needs compiled is then cached for the serial checks and timing. Errors are dropped here
    (the serial pass records them)."""
    n = min(tune_threads(device), len(names))
    if n <= 1:
        return
    from concurrent.futures import ThreadPoolExecutor
    cuda = torch.device(device).type == "cuda"
    stream = torch.cuda.current_stream(device) if cuda else None

    def one(name: str) -> None:
        _local.precompiling = True   # a launch that tunes a nested call takes its default here (choose)
        try:
            with torch.cuda.stream(stream) if cuda else contextlib.nullcontext():
                launch(name)
        except Exception:  # noqa: BLE001 - recorded by the serial pass
            pass
    with ThreadPoolExecutor(n, thread_name_prefix="tune-compile") as ex:
        list(ex.map(one, names))
    if cuda:
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------------------------- tuner
TUNERS: list["Tuner"] = []   # every tuner made in this process (engine start-up reports: tuning_summary)


def tuning_summary() -> dict[str, int]:
    """Shape keys whose choice this process read from the tuning files (`loaded`) or timed itself (`timed`)."""
    loaded = sum(len(t.loaded) for t in TUNERS)
    return {"tuning_loaded_keys": loaded, "tuning_timed_keys": sum(len(t.times) for t in TUNERS) - loaded}


class Tuner:
    def __init__(self, env: str, timer: Callable = bench_ms, version: str = "0"):
        self.env, self.timer, self.version = env, timer, version
        self.tuned: dict[tuple, str] = {}               # key -> chosen config
        self.times: dict[tuple, dict[str, float]] = {}  # key -> {config: ms} (for a loaded key: as saved)
        self.errors: dict[str, str] = {}                # config -> last error while tuning
        self.loaded: set[tuple] = set()                 # keys whose choice came from the tuning file
        self._lock = threading.Lock()
        self._path: Path | None = None                  # the file `_disk` was read from
        self._disk: dict[str, dict[str, dict]] = {}     # {context: {key repr: entry}}, as last read or written
        self._mine: dict[str, dict[str, dict]] = {}     # what this process tuned (re-merged on every write)
        self._warned: set[str] = set()
        TUNERS.append(self)

    def record(self, key: tuple) -> tuple[str | None, dict[str, float]]:
        return self.tuned.get(key), self.times.get(key, {})

    def file(self) -> Path:
        return cache_dir() / "tuning" / f"{self.env}.json"

    def choose(self, key: tuple, names: Iterable[str], launch: Callable[[str], object], default: str,
               device) -> str:
        if key in self.tuned:
            return self.tuned[key]
        if os.environ.get(self.env, "1") == "0":
            return default
        names = tuple(names)
        ctx = self._context(device)
        skey = key_repr(key) if ctx is not None else None
        if skey is not None:
            saved = self._saved(ctx, skey, names)
            if saved is not None:
                self.tuned[key], self.times[key] = saved["config"], dict(saved.get("ms", {}))
                self.loaded.add(key)
                return saved["config"]
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            return default
        if getattr(_local, "precompiling", False):   # never time beside other threads' launches
            return default
        times = {}
        ref = _reference(launch, default)
        precompile(names, launch, device)
        for name in names:
            try:
                if ref is not None and name != default:
                    _check_output(name, launch(name), ref)
                times[name] = self.timer(lambda: launch(name), device)
            except Exception as e:  # a config that does not compile or fit here (e.g. shared memory)
                times[name] = float("inf")
                self.errors[name] = repr(e)[:300]
        self.times[key] = times
        self.tuned[key] = min(times, key=times.get)
        if skey is not None and math.isfinite(times[self.tuned[key]]):
            self._save(ctx, skey, {"config": self.tuned[key],
                                   "ms": {n: float(t) for n, t in times.items() if math.isfinite(t)},
                                   "failed": sorted(n for n, t in times.items() if not math.isfinite(t))})
        return self.tuned[key]

    # ------------------------------------------------------------------ persistence
    def _context(self, device) -> str | None:
        if not persistence_enabled():
            return None
        ident = device_identity(device)
        if ident is None:
            return None
        import triton
        return f"{ident} | triton {triton.__version__} | version {self.version} | {TIMING}"

    def _warn_once(self, what: str, msg: str, *args) -> None:
        if what not in self._warned:
            self._warned.add(what)
            log.warning(msg, *args)

    def _saved(self, ctx: str, skey: str, names: tuple[str, ...]) -> dict | None:
        """The saved entry for this key, if its choice is still a candidate and no candidate is new since."""
        with self._lock:
            try:
                path = self.file()
            except Exception as e:  # no home folder to find
                self._warn_once("cache folder", "%s: no folder for the tuning cache (%s); set PIPELINE_CACHE_DIR",
                                self.env, e)
                return None
            if path != self._path:
                self._path, self._disk = path, {}
                try:
                    self._disk = _read(path)
                except Exception as e:  # unreadable, not JSON, not ours: never the server's problem
                    self._warn_once(f"read {path}", "%s: ignoring the tuning cache %s (%s); retuning", self.env,
                                    path, e)
                n = len(self._disk.get(ctx, {}))
                if n:
                    log.info("%s: loaded %d tuned GEMM configs for [%s] from %s: tuning skipped for those shapes",
                             self.env, n, ctx, path)
                else:
                    log.info("%s: no tuned GEMM configs for [%s] in %s yet: tuning, and saving there", self.env,
                             ctx, path)
            e = self._disk.get(ctx, {}).get(skey)
        if e is None or e["config"] not in names:
            return None
        timed = set(e.get("ms", {})) | set(e.get("failed", []))
        return e if set(names) <= timed else None

    def _save(self, ctx: str, skey: str, entry: dict) -> None:
        """Merge this entry (and all this process tuned) into the file on disk, under its lock, atomically.
        Never raises: a cache that cannot be written costs only the next start's tuning."""
        with self._lock:
            self._mine.setdefault(ctx, {})[skey] = entry
            try:
                path = self.file()
                path.parent.mkdir(parents=True, exist_ok=True)
                with _file_lock(path.with_name(path.name + ".lock")):
                    try:
                        disk = _read(path)
                    except Exception:
                        disk = {}  # unreadable: warned when loaded (or just replaced by another process)
                    for c, entries in self._mine.items():
                        disk.setdefault(c, {}).update(entries)
                    _write_atomic(path, {"format": FORMAT, "tuner": self.env, "contexts": disk})
                self._path, self._disk = path, disk
            except Exception as e:  # read-only home, full disk, ...
                self._warn_once("write", "%s: cannot save tuned configs (%s); the next start tunes again",
                                self.env, e)
