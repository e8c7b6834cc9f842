"""Text sources for calibration and evaluation.

    embedded_corpus()   English prose that ships with Python itself (pydoc's topic help), so the
                        default run needs nothing from the network
    read_text(path)     a local .txt, .jsonl (field "text") or .parquet (column "text") file
"""
from __future__ import annotations

import json
from pathlib import Path


def embedded_corpus() -> str:
    from pydoc_data.topics import topics
    return "\n\n".join(topics[k] for k in sorted(topics))


def read_text(path: str | Path, field: str = "text") -> str:
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"text file {str(p)!r} does not exist (expected a .txt, .jsonl or .parquet file)")
    if p.suffix == ".jsonl":
        rows = [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
        missing = [i for i, r in enumerate(rows) if field not in r]
        if missing:
            raise ValueError(f"{p}: line {missing[0] + 1} has no {field!r} field (keys: {sorted(rows[missing[0]])})")
        return "\n\n".join(r[field] for r in rows)
    if p.suffix == ".parquet":
        import pyarrow.parquet as pq
        table = pq.read_table(p)
        if field not in table.column_names:
            raise ValueError(f"{p}: no {field!r} column (columns: {table.column_names})")
        return "\n\n".join(table.column(field).to_pylist())
    return p.read_text(encoding="utf-8")


def eval_text(path) -> str:
    return read_text(path) if path else embedded_corpus()
