"""Calibration data: `samples` windows of `seqlen` tokens from a text source.

    ids = calib_tokens(cfg.quant.calib, tokenizer)     # (samples, seqlen) int64

Sources (quant.calib.dataset):
    embedded   Python's own pydoc topics (ships with Python: nothing from the network)
    file       a local .txt / .jsonl / .parquet file named by quant.calib.path
    c4 | wikitext2 | ptb | pileval   through `datasets` (network or its local cache)
Windows start at seeded random offsets in the tokenized text (as LMDeploy / AutoAWQ sample them);
they may overlap when the text holds fewer than samples * seqlen tokens.
"""
from __future__ import annotations

import os
import socket

import torch

from ..data import embedded_corpus, read_text

# name -> (datasets path, config, split, text field)
NAMED = {
    "c4": ("allenai/c4", "en", "validation", "text"),
    "wikitext2": ("wikitext", "wikitext-2-raw-v1", "train", "text"),
    "ptb": ("ptb_text_only", "penn_treebank", "train", "sentence"),
    "pileval": ("mit-han-lab/pile-val-backup", None, "validation", "text"),
}
SOURCES = ("embedded", "file", *NAMED)


def _offline() -> bool:
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on")
               for v in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"))


def _hub_reachable(timeout: float = 3.0) -> bool:
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def named_text(name: str, max_chars: int = 20_000_000) -> str:
    """Text of a named set; fails fast (no long retries) when it cannot be had."""
    path, conf, split, field = NAMED[name]
    hint = (f"quant.calib.dataset={name} needs the Hugging Face hub or a local `datasets` cache of {path}. "
            "Point at a local text file instead: quant.calib.dataset=file quant.calib.path=/path/to/text.txt "
            "(.txt, .jsonl with a 'text' field, or .parquet with a 'text' column), or use "
            "quant.calib.dataset=embedded (no network).")
    offline = _offline()
    if not offline and not _hub_reachable():
        os.environ["HF_DATASETS_OFFLINE"] = "1"  # try the local cache only, then fail with the hint
        offline = True
    try:
        import datasets
        if offline:
            datasets.config.HF_DATASETS_OFFLINE = True
            datasets.config.HF_HUB_OFFLINE = True
        kw = {"streaming": True} if name == "c4" else {}
        ds = datasets.load_dataset(path, conf, split=split, **kw)
    except Exception as e:  # noqa: BLE001 - any failure here means "not reachable": one clear message
        raise ValueError(f"{hint} (datasets said: {type(e).__name__}: {' '.join(str(e).split())[:300]})") from None
    parts, n = [], 0
    for row in ds:
        parts.append(row[field])
        n += len(row[field])
        if n >= max_chars:
            break
    return "\n\n".join(parts)


def calib_text(c) -> str:
    if c.dataset == "embedded":
        return embedded_corpus()
    if c.dataset == "file":
        if not c.path:
            raise ValueError("quant.calib.dataset=file needs quant.calib.path=/path/to/text (.txt, .jsonl, .parquet)")
        return read_text(c.path)
    if c.dataset in NAMED:
        return named_text(c.dataset)
    raise ValueError(f"quant.calib.dataset={c.dataset!r} is not one of {list(SOURCES)}")


def sample_windows(ids: torch.Tensor, samples: int, seqlen: int, seed: int) -> torch.Tensor:
    """(samples, seqlen) windows at seeded random offsets of the 1-D token tensor ids."""
    if samples < 1 or seqlen < 1:
        raise ValueError(f"quant.calib.samples={samples} and seqlen={seqlen} must be positive")
    if ids.numel() < seqlen + 1:
        raise ValueError(f"the calibration text has {ids.numel()} tokens, fewer than quant.calib.seqlen={seqlen}")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen, (samples,), generator=g)
    return torch.stack([ids[s: s + seqlen] for s in starts.tolist()])


def calib_tokens(c, tokenizer) -> torch.Tensor:
    ids = torch.tensor(tokenizer(calib_text(c), add_special_tokens=False).input_ids, dtype=torch.long)
    return sample_windows(ids, c.samples, c.seqlen, c.seed)
