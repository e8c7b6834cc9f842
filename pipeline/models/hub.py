"""model.path as a Hugging Face Hub id: `org/name` (+ model.revision) -> a local snapshot folder.

    folder = resolve("HuggingFaceTB/SmolLM2-135M-Instruct", revision=None)   # Path of the snapshot

A local path that exists always wins. Otherwise an `org/name` id is looked up in the local Hugging Face cache
first (HF_HUB_CACHE / HF_HOME, the Hub's own layout), then downloaded with huggingface_hub's snapshot_download
(config, tokenizer and *.safetensors files only; pytorch_model*.bin only when the repository has no
safetensors). HF_HUB_OFFLINE=1 is honoured: the cache only. A model neither cached nor reachable is a
ValueError naming the id, the revision and what to do.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
FILES = ["*.json", "*.safetensors", "*.model", "*.tiktoken", "*.txt", "*.py"]   # no .bin/.gguf/.onnx duplicates
BIN_FILES = ["pytorch_model*.bin"]


def is_repo_id(path: str, base: Path = Path(".")) -> bool:
    """`org/name` that is not an existing path (relative to base)."""
    return bool(REPO_ID.fullmatch(str(path))) and not (Path(base) / path).exists()


def _has_weights(d: Path) -> bool:
    return (d / "config.json").exists() and (any(d.glob("*.safetensors")) or any(d.glob("pytorch_model*.bin")))


def resolve(path: str, revision: Optional[str] = None) -> Path:
    """A local folder (as given), or the snapshot folder of Hub id `path` at `revision` (None: main)."""
    if not is_repo_id(path):
        return Path(path)
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled
    try:   # the cache first: no network when a complete snapshot is there
        d = Path(snapshot_download(path, revision=revision, allow_patterns=FILES, local_files_only=True))
        if _has_weights(d):
            return d
    except (LocalEntryNotFoundError, OfflineModeIsEnabled):
        pass
    try:
        d = Path(snapshot_download(path, revision=revision, allow_patterns=FILES))
        if not any(d.glob("*.safetensors")):
            d = Path(snapshot_download(path, revision=revision, allow_patterns=BIN_FILES))
        return d
    except (LocalEntryNotFoundError, OfflineModeIsEnabled, HfHubHTTPError, OSError, ValueError) as e:
        why = str(e).strip().splitlines()[0][:300].rstrip(".") if str(e).strip() else type(e).__name__
        rev = revision or "main"
        offline = " (HF_HUB_OFFLINE=1: the cache only)" if constants.HF_HUB_OFFLINE else ""
        raise ValueError(
            f"model.path={path!r} (model.revision={rev!r}) is not a local folder, not in the Hugging Face cache "
            f"{constants.HF_HUB_CACHE}{offline}, and could not be downloaded: {type(e).__name__}: {why}. "
            f"Download it where the Hub is reachable (`hf download {path} --revision {rev}`) and point "
            "HF_HUB_CACHE (or HF_HOME) at that cache, log in for a gated model (`hf auth login`), check the id "
            "and revision, or give a local folder") from None
