"""Sweep report: one table over every job of a multirun, written once after all jobs end.

    python -m pipeline.runner -m quant=fp16,kv8,w4a16 pipeline=evaluate   # writes <sweep dir>/report.{md,csv,png}
    python -m pipeline.runner -m hydra/launcher=local launch.jobs=2 eval.seqlen=256,512
    python -m pipeline.report outputs/multirun/2026-11-25/10-00-00        # the same, by hand

SweepReport is a Hydra callback (conf/config.yaml: hydra.callbacks.sweep_report). Hydra calls
on_multirun_end in the process that launched the sweep after every job ended, whichever launcher ran
them (basic, joblib, submitit local/SLURM, Ray); rows come from each job's report.json (the runner
writes one per job folder), so cluster launchers need the sweep folder on a shared filesystem. When a
launcher raises instead (a job process killed outright), the runner's entry point calls finish(), so
the report is still written, and the runner exits 1 when any job did not succeed (exit_code()).

One row per job: job number, the overrides that vary across the sweep, model, quant, status (ok |
failed | crashed: started, wrote no report.json | not run: the launcher never started it), wall time,
the evaluate stage's perplexity, its delta to the fp16 job of the same model, weight MB and KV bytes
per token; the CSV adds the stages that ran / came from the cache, the error and, for every job that
did not succeed, the command that reruns only it (also in rerun_failed.sh and printed last).
"""
from __future__ import annotations

import csv
import json
import logging
import shlex
import sys
from pathlib import Path
from typing import Any, Optional

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.table import Table

log = logging.getLogger(__name__)
COLUMNS = ["job", "overrides", "model", "quant", "status", "wall_s", "ppl", "delta_vs_fp16", "weight_MB",
           "kv_bytes_per_token"]
EXTRA = ["ran", "cached", "error", "rerun", "folder"]   # CSV only
_state: dict[str, Any] = {"pending": None, "failed": 0}


def rerun_command(overrides: list[str]) -> str:
    return " ".join(["python -m pipeline.runner", *map(shlex.quote, overrides)])


def sweep_jobs(overrides: list[str]) -> list[list[str]]:
    """The jobs the basic sweeper makes of these overrides (`quant=fp16,kv8` -> two jobs). Raises on a
    syntax it does not know."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser
    parsed = OverridesParser.create().parse_overrides(list(overrides))
    return [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]


def expected_jobs(config: DictConfig) -> list[list[str]]:
    """The jobs the basic sweeper makes of the command line's overrides ([] when it cannot tell)."""
    try:
        return sweep_jobs(list(config.hydra.overrides.task))
    except Exception as e:  # noqa: BLE001 - another sweeper's syntax: the job folders alone
        log.debug("cannot expand the sweep's overrides: %s", e)
        return []


def read_job(folder: Path) -> Optional[dict]:
    """A job folder's report.json with a status, a 'crashed' record from Hydra's files, or None."""
    try:
        rep = json.loads((folder / "report.json").read_text())
        return rep | {"status": "ok" if rep.get("ok") else "failed"}
    except (OSError, ValueError):
        pass
    try:
        overrides = list(OmegaConf.load(folder / ".hydra" / "overrides.yaml"))
    except (OSError, ValueError):
        return None
    return {"status": "crashed", "overrides": overrides, "stages": [],
            "error": "the job ended without writing report.json (killed?)"}


def job_num(folder: Path) -> Optional[int]:
    """Hydra's job number, from the job's saved hydra config (the folder name is only a convention)."""
    try:
        return int(OmegaConf.load(folder / ".hydra" / "hydra.yaml").hydra.job.num)
    except Exception:  # noqa: BLE001 - not a job folder
        return None


def varying_keys(reps: list[dict]) -> set[str]:
    """Override keys whose value differs between jobs (or that only some jobs have)."""
    seen: dict[str, set] = {}
    for r in reps:
        for o in r.get("overrides") or []:
            k, _, v = o.partition("=")
            seen.setdefault(k, set()).add(v)
    return {k for k, vals in seen.items()
            if len(vals) > 1 or any(k not in {o.partition("=")[0] for o in r.get("overrides") or []} for r in reps)}


def job_row(num: int, rep: dict, varying: set[str]) -> dict:
    overrides = list(rep.get("overrides") or [])
    stages = rep.get("stages") or []
    ev = next((s.get("summary") for s in stages if s["name"] == "evaluate"), None) or {}
    load = next((s.get("summary") for s in stages if s["name"] == "load"), None) or {}
    value = {k: v for k, _, v in (o.partition("=") for o in overrides)}
    return {
        "job": num,
        "overrides": " ".join(o for o in overrides if o.partition("=")[0] in varying) or " ".join(overrides),
        "model": value.get("model") or load.get("arch", ""),
        "quant": ev.get("quant") or value.get("quant", ""),
        "status": rep["status"],
        "wall_s": rep.get("wall_s"),
        "ppl": ev.get("ppl"),
        "delta_vs_fp16": None,
        "weight_MB": round(ev["weight_bytes"] / 2 ** 20, 2) if "weight_bytes" in ev else None,
        "kv_bytes_per_token": ev.get("kv_bytes_per_token"),
        "ran": ",".join(s["name"] for s in stages if s.get("status") == "ran"),
        "cached": ",".join(s["name"] for s in stages if s.get("status") == "cached"),
        "error": rep.get("error") or "",
        "rerun": "" if rep["status"] == "ok" else rep.get("resume") or rerun_command(overrides),
        "folder": rep.get("folder", ""),
    }


def job_rows(sweep_dir: Path, expected: Optional[list[list[str]]] = None) -> list[dict]:
    """Rows for every job folder under sweep_dir, plus 'not run' rows for expected jobs with none."""
    found: dict[int, dict] = {}
    for d in sorted(p for p in Path(sweep_dir).iterdir() if p.is_dir() and not p.name.startswith(".")):
        rep, num = read_job(d), job_num(d)
        if rep is not None and num is not None:
            found[num] = rep | {"folder": str(d)}
    for i, overrides in enumerate(expected or []):
        if i not in found:
            found[i] = {"status": "not run", "overrides": overrides, "stages": [],
                        "error": "the launcher never started it"}
    varying = varying_keys(list(found.values()))
    rows = [job_row(n, found[n], varying) for n in sorted(found)]
    for r in rows:
        ref = next((x for x in rows if x["quant"] == "fp16" and x["model"] == r["model"] and x["ppl"]), None)
        if ref and r["ppl"]:
            r["delta_vs_fp16"] = round(r["ppl"] - ref["ppl"], 4)
    return rows


def fmt(v) -> str:
    return "" if v is None else (f"{v:+.3f}" if isinstance(v, float) and v != abs(v) else str(v))


def write_report(sweep_dir: Path, console: Console | None = None, expected=None) -> list[dict]:
    """Print the table; write report.md, report.csv, report.png and rerun_failed.sh into sweep_dir."""
    sweep_dir = Path(sweep_dir)
    rows = job_rows(sweep_dir, expected)
    if not rows:
        return rows
    console = console or Console(highlight=False, width=200)
    bad = [r for r in rows if r["status"] != "ok"]
    table = Table(title=f"sweep: {sweep_dir}")
    for c in COLUMNS:
        table.add_column(c, justify="left" if c in ("job", "overrides", "model", "quant", "status") else "right")
    for r in rows:
        table.add_row(*(fmt(r[c]) for c in COLUMNS), style="red" if r["status"] != "ok" else None)
    console.print(table)
    head = f"{len(rows)} jobs, {len(rows) - len(bad)} ok, {len(bad)} not ok"
    md = [f"# Sweep {sweep_dir}", "", head, "", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    md += ["| " + " | ".join(fmt(r[c]).replace("|", "\\|") for c in COLUMNS) + " |" for r in rows]
    if bad:
        md += ["", "## Rerun only the jobs that did not succeed", ""]
        md += [f"- job {r['job']} ({r['status']}: {r['error']}):\n\n      {r['rerun']}\n" for r in bad]
    (sweep_dir / "report.md").write_text("\n".join(md) + "\n")
    with open(sweep_dir / "report.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS + EXTRA)
        w.writeheader()
        w.writerows(rows)
    rerun = sweep_dir / "rerun_failed.sh"
    if bad:
        rerun.write_text("#!/bin/sh\n# the jobs of this sweep that did not succeed, one command each\n"
                         + "".join(f"{r['rerun']}\n" for r in bad))
        console.print(f"[bold red]{head}[/]; rerun only the failed ones ({rerun}):")
        for r in bad:
            console.print(f"  job {r['job']} ({r['status']}: {r['error']}):\n    {r['rerun']}", soft_wrap=True)
    else:
        rerun.unlink(missing_ok=True)
        console.print(head)
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

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        _state["pending"] = config

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        finish(config)


def finish(config: Optional[DictConfig] = None) -> None:
    """Write the report of the sweep this process launched, unless already written."""
    config = config if config is not None else _state["pending"]
    _state["pending"] = None
    if config is None:
        return
    sweep_dir = Path(str(config.hydra.sweep.dir))
    if sweep_dir.is_dir():
        rows = write_report(sweep_dir, expected=expected_jobs(config))
        _state["failed"] = sum(r["status"] != "ok" for r in rows)


def exit_code() -> int:
    """Non-zero when a job of the sweep this process launched did not succeed."""
    return 1 if _state["failed"] else 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m pipeline.report <multirun sweep folder>")
    write_report(Path(sys.argv[1]))
