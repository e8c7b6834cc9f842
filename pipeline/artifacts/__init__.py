"""Artifact formats: one module per on-disk format, each with its writer, its readers and a FORMAT version.

    packed_w4     the pack stage's int4 checkpoint (AutoAWQ GEMM layout, canonical names)
    w8a8          the quant_w8 stage's int8 W8A8 checkpoint (compressed-tensors, Hugging Face names)
    kv_qparams    static KV-cache quantization parameters (kv_qparams stage; quant_w8 for the smoothed model)
    workspace     the turbomind stage's serving workspace (TurboMind layout, config.ini, TP shards)

Stages write and read their artifacts through these modules and never import each other; this package
imports no stage.

Versions: each module's FORMAT is written into what it writes (config.ini's format_version, the safetensors
metadata's format_version); a reader refuses another version with `check_format`, naming both versions and
the command that rebuilds the artifact. Bump FORMAT (and the writing stage's VERSION, so cached artifacts are
rebuilt) whenever the layout changes.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional


class FormatError(ValueError):
    """An artifact written in another format version than this code reads."""


def check_format(found: Optional[int], expected: int, what: str, path, rebuild: str) -> None:
    """Refuse an artifact of another format version. found None: written before versions were recorded (1)."""
    found = 1 if found is None else int(found)
    if found != expected:
        raise FormatError(f"{what} {path} has format_version {found}, but this code reads format_version "
                          f"{expected}: rebuild it with `{rebuild}`")


def safetensors_format(path: Path) -> Optional[int]:
    """format_version from a safetensors file's metadata (None when absent)."""
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        v = (f.metadata() or {}).get("format_version")
    return None if v is None else int(v)
