"""Our C kernels for x86 CPUs (pipeline/kernels/csrc/*.c): compiled once per machine, loaded with ctypes.

Usage:
    lib = load("cpu_kernels")           # csrc/cpu_kernels.c (every kernel) for the best ISA this CPU has, or None
    lib = load("cpu_kernels", "avx2")   # another ISA's build (tests)
    cpu_isas()                          # ("avx512_vnni", "avx2") on an AVX512-VNNI machine

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
ISAS = {
    "avx512_vnni": ({"avx512f", "avx512bw", "avx512vl", "avx512_vnni"},
                    ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512vnni", "-mavx2", "-mfma"]),
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


def isa_of(lib: ctypes.CDLL) -> str:
    return lib._isa_name


def load(name: str, isa: Optional[str] = None) -> Optional[ctypes.CDLL]:
    """csrc/<name>.c built for `isa` (default: the best this CPU runs), or None (see the module docstring)."""
    if os.environ.get("PIPELINE_CPU_KERNEL", "1") == "0":
        return None
    if isa is None:
        isas = cpu_isas()
        if not isas:
            return None
        isa = isas[0]
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
        log.info("CPU kernel %s: %s (%s)", name, lib._isa_name, path.name)
    _libs[name, isa] = lib
    return lib
