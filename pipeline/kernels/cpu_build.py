"""Our C kernels for x86 CPUs (pipeline/kernels/csrc/*.c): compiled once per machine, loaded with ctypes.

Usage:
    lib = load("cpu_kernels")           # csrc/cpu_kernels.c (every kernel) for the best ISA this CPU has, or None
    lib = load("cpu_kernels", "avx2")   # another ISA's build (tests)
    cpu_isas()                          # ("avx512_vnni", "avx2") on an AVX512-VNNI machine; "avx512_amx" first
                                        # where the CPU has AMX-INT8 (that build only where the OS grants it)

A source is built with the system's C compiler (`cc`, or $CC) for an ISA of ISAS (-O3, no FMA contraction, with
OpenMP where the compiler has it; threads: csrc/pool.h), into `<cache>/cpu_kernels/<name>_<isa>_<key>.so`, key =
hash of the csrc/ sources, the flags and the compiler version, written atomically (a concurrent build wins or loses whole); later processes load the
file. Each source defines `const char *<name>_isa(void)`. No compiler, no ISA of ISAS, a failed build, or
PIPELINE_CPU_KERNEL=0: None (callers fall back to PyTorch's kernels).
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Optional

log = logging.getLogger(__name__)
CSRC = Path(__file__).parent / "csrc"

# the kernels' ISAs, best first: (what /proc/cpuinfo must list, the compiler's flags)
_VNNI = ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512vnni", "-mavx2", "-mfma"]
ISAS = {
    # AVX512-VNNI plus the AMX tile unit for the int8 dot products of linears of >= PIPELINE_CPU_AMX_ROWS rows
    # (linear_cpu.c); used only where the OS grants the tile state (the library's cpu_amx_enable)
    "avx512_amx": ({"avx512f", "avx512bw", "avx512vl", "avx512_vnni", "amx_tile", "amx_int8"},
                   [*_VNNI, "-mamx-tile", "-mamx-int8"]),
    "avx512_vnni": ({"avx512f", "avx512bw", "avx512vl", "avx512_vnni"}, _VNNI),
    "avx2": ({"avx2", "fma"}, ["-mavx2", "-mfma"]),
}
_libs: dict[tuple[str, str], Optional[ctypes.CDLL]] = {}


@functools.cache
def cpu_isas() -> tuple[str, ...]:
    """The kernel ISAs this CPU runs, best first (read once: /proc/cpuinfo takes ~0.1 ms)."""
    flags = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    return tuple(name for name, (need, _) in ISAS.items() if need <= flags)


def _build(source: Path, cache: Path, isa: str) -> Optional[Path]:
    """Compile `source` for `isa` into cache (once; keyed by source, flags, compiler); the .so path or None."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        log.info("CPU kernel %s not built: no C compiler (cc, or $CC)", source.stem)
        return None
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        version = ""
    src = b"".join(f.read_bytes() for f in [source, *sorted(source.parent.glob("*.[ch]"))])   # sources include others
    for omp in (["-fopenmp"], []):
        flags = ["-O3", "-ffp-contract=off", "-shared", "-fPIC", *ISAS[isa][1], *omp]
        key = hashlib.sha256(src + " ".join(flags).encode() + version.encode()).hexdigest()[:16]
        out = cache / f"{source.stem}_{isa}_{key}.so"
        if out.exists():
            return out
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            tmp_out = Path(tmp) / out.name
            r = subprocess.run([cc, *flags, str(source), "-o", str(tmp_out), "-lm"], capture_output=True, text=True)
            if r.returncode == 0:
                os.replace(tmp_out, out)   # atomic: a concurrent build wins or loses whole
                return out
            log.info("CPU kernel %s: build with %s failed: %s", source.stem, " ".join(flags), r.stderr[-500:])
    return None


def amx_rows() -> int:
    """PIPELINE_CPU_AMX_ROWS: rows (tokens of a call) from which an AMX build's linears use the tile unit (below it,
    VNNI; the same bits either way). 0 turns the tile unit off. Default 4: SmolLM2's 30 layers of linears at 2 / 3 /
    4 / 8 rows took 2.1-2.2 / 2.4 / 2.5-2.9 / 3.7-4.0 ms on AMX against 1.8 / 2.1 / 3.4-3.6 / 6.0-6.7 ms on VNNI
    (2 threads of a Xeon with AMX, docs/perf-log.md session 18)."""
    return int(os.environ.get("PIPELINE_CPU_AMX_ROWS", 4))


def _amx_ready(lib: ctypes.CDLL) -> bool:
    """Ask the OS for the AMX tile state (once per process) and set the row threshold: False where it refuses."""
    if not lib.cpu_amx_enable():
        return False
    rows = amx_rows()
    lib.cpu_amx_set_rows(ctypes.c_int(rows if rows > 0 else 1 << 30))
    return True


def isa_of(lib: ctypes.CDLL) -> str:
    return lib._isa_name


def load(name: str, isa: Optional[str] = None) -> Optional[ctypes.CDLL]:
    """csrc/<name>.c built for `isa` (default: the best this CPU runs), or None (see the module docstring)."""
    if os.environ.get("PIPELINE_CPU_KERNEL", "1") == "0":
        return None
    if isa is None:
        for isa in cpu_isas():      # the best that builds and runs here
            lib = load(name, isa)
            if lib is not None:
                return lib
        return None
    if (name, isa) in _libs:
        return _libs[name, isa]
    from .tuner import cache_dir
    try:
        path = _build(CSRC / f"{name}.c", cache_dir() / "cpu_kernels", isa)
    except OSError as e:
        log.warning("CPU kernel %s: no cache folder to build in (%s); set PIPELINE_CACHE_DIR", name, e)
        path = None
    lib = None
    if path is not None:
        lib = ctypes.CDLL(str(path))
        getattr(lib, f"{name}_isa").restype = ctypes.c_char_p
        lib._isa_name = getattr(lib, f"{name}_isa")().decode()
        if lib._isa_name == "avx512_amx" and not _amx_ready(lib):
            log.info("CPU kernel %s: the OS did not grant the AMX tile state; not using the %s build", name, isa)
            lib = None
        else:
            log.info("CPU kernel %s: %s (%s)", name, lib._isa_name, path.name)
    _libs[name, isa] = lib
    return lib
