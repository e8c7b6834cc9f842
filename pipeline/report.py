"""Sweep report: one table of every job's evaluation, written once at the end of a multirun.

    python -m pipeline.runner -m quant=fp16,kv8,w4a16 pipeline=evaluate   # writes <sweep dir>/report.{md,csv,png}
    python -m pipeline.report outputs/multirun/2026-11-25/10-00-00        # the same, by hand

Rows come from each job's report.json (the runner writes one per job folder): the `evaluate` stage's
summary: perplexity, delta to the fp16 job of the same model, weight bytes and KV bytes per token.
Registered in conf/config.yaml under hydra.callbacks (SweepReport.on_multirun_end). Jobs without an
evaluate summary (failed, or another pipeline) are listed with an empty result.
"""
from __future__ import annotations

import csv
import json
import re
import sys
from pathlib import Path

from hydra.experimental.callback import Callback
from rich.console import Console
from rich.table import Table

COLUMNS = ["job", "model", "quant", "ppl", "delta_vs_fp16", "weight_MB", "kv_bytes_per_token", "ok"]


def job_rows(sweep_dir: Path) -> list[dict]:
    rows = []
    for rep_file in sorted(Path(sweep_dir).glob("*/report.json"),
                           key=lambda p: (int(m.group()) if (m := re.match(r"\d+", p.parent.name)) else 1 << 30,
                                          p.parent.name)):
        rep = json.loads(rep_file.read_text())
        ev = next((s["summary"] for s in rep.get("stages", []) if s["name"] == "evaluate"), {}) or {}
        load = next((s for s in rep.get("stages", []) if s["name"] == "load"), {})
        model = next((o.split("=", 1)[1] for o in rep.get("overrides", []) if o.startswith("model=")), "")
        rows.append({"job": rep_file.parent.name, "model": model or (load.get("summary") or {}).get("arch", ""),
                     "quant": ev.get("quant", ""), "ppl": ev.get("ppl"), "delta_vs_fp16": None,
                     "weight_MB": round(ev["weight_bytes"] / 2 ** 20, 2) if "weight_bytes" in ev else None,
                     "kv_bytes_per_token": ev.get("kv_bytes_per_token"), "ok": rep.get("ok", False)})
    for r in rows:
        ref = next((x for x in rows if x["quant"] == "fp16" and x["model"] == r["model"] and x["ppl"]), None)
        if ref and r["ppl"]:
            r["delta_vs_fp16"] = round(r["ppl"] - ref["ppl"], 4)
    return rows


def fmt(v) -> str:
    return "" if v is None else (f"{v:+.3f}" if isinstance(v, float) and v != abs(v) else str(v))


def write_report(sweep_dir: Path, console: Console | None = None) -> list[dict]:
    sweep_dir = Path(sweep_dir)
    rows = job_rows(sweep_dir)
    if not rows:
        return rows
    table = Table(title=f"sweep: {sweep_dir}")
    for c in COLUMNS:
        table.add_column(c, justify="right" if c not in ("job", "model", "quant") else "left")
    for r in rows:
        table.add_row(*(fmt(r[c]) for c in COLUMNS))
    (console or Console(highlight=False)).print(table)
    with open(sweep_dir / "report.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(rows)
    md = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    md += ["| " + " | ".join(fmt(r[c]) for c in COLUMNS) + " |" for r in rows]
    (sweep_dir / "report.md").write_text("\n".join(md) + "\n")
    plot(rows, sweep_dir / "report.png")
    return rows


def plot(rows: list[dict], path: Path) -> None:
    """Perplexity against bytes: weight MB (x) and KV bytes per token (marker size)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    pts = [r for r in rows if r["ppl"] and r["weight_MB"]]
    if not pts:
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    kv_max = max(r["kv_bytes_per_token"] or 1 for r in pts)
    for r in pts:
        ax.scatter(r["weight_MB"], r["ppl"], s=40 + 200 * (r["kv_bytes_per_token"] or 0) / kv_max, alpha=0.7)
        ax.annotate(f"{r['quant']} ({r['model']})" if len({x['model'] for x in pts}) > 1 else r["quant"],
                    (r["weight_MB"], r["ppl"]), textcoords="offset points", xytext=(6, 4), fontsize=8)
    ax.set_xlabel("weight MB (marker area: KV bytes per token)")
    ax.set_ylabel("perplexity")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


class SweepReport(Callback):
    """Hydra callback: at the end of a multirun, the report of all its jobs (see module doc)."""

    def on_multirun_end(self, config, **kwargs) -> None:
        write_report(Path(config.hydra.sweep.dir))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m pipeline.report <multirun sweep folder>")
    write_report(Path(sys.argv[1]))
