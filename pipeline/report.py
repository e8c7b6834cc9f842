"""End-of-sweep report: one table over every job of a multirun, written once after all jobs end.

    python -m pipeline.runner -m hydra/launcher=local quant=fp16,kv8 eval.seqlen=256,512
    # -> <sweep dir>/summary.md, summary.csv, rerun_failed.sh; the table is printed; exit code 1 if a job failed

SweepReport is a Hydra callback (registered in conf/config.yaml under hydra.callbacks.sweep_report).
Hydra calls on_multirun_end in the process that launched the sweep, after every job ended, whichever
launcher ran them (basic, joblib, submitit local/SLURM, Ray): the report reads each job's report.json
(written by the runner) from the sweep folder, so cluster launchers need that folder on a shared
filesystem. When a launcher raises (a job process killed outright), the runner's entry point calls
finish() so the report is still written.

One row per job: job number, the overrides that vary across the sweep, status (ok | failed | crashed:
started but wrote no report | not run), wall time, stages that ran vs came from the cache, the key
result (evaluate's ppl) and, for every job that did not succeed, the command that reruns only it.
Extend `job_row` for more columns (they flow into the markdown and the CSV).

Quantization columns (from the evaluate summary): quant, ppl, delta_vs_fp16 (against the fp16 job of
the same model in the sweep), weight_MB, kv_bytes_per_token; the table is printed with rich, and
summary.png plots perplexity against weight MB (marker area: KV bytes per token).
"""
from __future__ import annotations

import csv
import io
import json
import logging
import shlex
from pathlib import Path
from typing import Any, Optional

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)
_state: dict[str, Any] = {"pending": None, "failed": 0}


def rerun_command(overrides: list[str]) -> str:
    return " ".join(["python -m pipeline.runner", *map(shlex.quote, overrides)])


def expected_jobs(config: DictConfig) -> list[list[str]]:
    """The jobs the basic sweeper makes from the command line's overrides ([] when it cannot tell)."""
    try:
        from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
        from hydra.core.override_parser.overrides_parser import OverridesParser
        parsed = OverridesParser.create().parse_overrides(list(config.hydra.overrides.task))
        return [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]
    except Exception as e:  # noqa: BLE001 - another sweeper's syntax: fall back to the job folders
        log.debug("cannot expand the sweep's overrides: %s", e)
        return []


def read_job(folder: Path) -> Optional[dict]:
    """A job folder's report.json (status from the runner), or a 'crashed' record from Hydra's files."""
    try:
        rep = json.loads((folder / "report.json").read_text())
        rep["status"] = "ok" if rep.get("ok") else "failed"
        return rep
    except (OSError, ValueError):
        pass
    try:
        overrides = list(OmegaConf.load(folder / ".hydra" / "overrides.yaml"))
    except (OSError, ValueError):
        return None
    return {"status": "crashed", "overrides": overrides, "error": "the job ended without writing report.json",
            "stages": []}


def job_row(num: int, rep: dict, varying: list[str]) -> dict:
    """One table row; extend here for more columns."""
    overrides = list(rep.get("overrides") or [])
    stages = rep.get("stages") or []
    result = {}
    for st in stages:
        result.update({k: v for k, v in (st.get("summary") or {}).items()
                       if k in ("ppl", "quant", "weight_bytes", "kv_bytes_per_token") and st["name"] == "evaluate"})
    model = next((o.split("=", 1)[1] for o in overrides if o.startswith("model=")), "")
    ok = rep["status"] == "ok"
    return {
        "job": num,
        "overrides": " ".join(o for o in overrides if o.split("=", 1)[0] in varying) or " ".join(overrides),
        "status": rep["status"],
        "wall_s": rep.get("wall_s"),
        "ran": ",".join(s["name"] for s in stages if s.get("status") == "ran"),
        "cached": ",".join(s["name"] for s in stages if s.get("status") == "cached"),
        "model": model,
        "quant": result.get("quant", ""),
        "ppl": result.get("ppl"),
        "delta_vs_fp16": None,  # filled in by collect()
        "weight_MB": round(result["weight_bytes"] / 2 ** 20, 2) if "weight_bytes" in result else None,
        "kv_bytes_per_token": result.get("kv_bytes_per_token"),
        "error": rep.get("error") or "",
        "rerun": "" if ok else rep.get("resume") or rerun_command(overrides),
        "folder": rep.get("folder", ""),
    }


def collect(sweep_dir: Path, expected: list[list[str]]) -> list[dict]:
    """Rows for every job folder under sweep_dir, plus 'not run' rows for expected jobs without one."""
    found: dict[int, dict] = {}
    for d in sorted(p for p in sweep_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
        rep = read_job(d)
        num = _job_num(d)
        if rep is not None and num is not None:
            found[num] = rep | {"folder": str(d)}
    for i, ov in enumerate(expected):
        if i not in found:
            found[i] = {"status": "not run", "overrides": ov, "stages": [], "error": "the launcher never started it"}
    keys = [[o.split("=", 1)[0] for o in (r.get("overrides") or [])] for r in found.values()]
    counts: dict[str, set] = {}
    for r in found.values():
        for o in r.get("overrides") or []:
            k, _, v = o.partition("=")
            counts.setdefault(k, set()).add(v)
    varying = [k for k, vals in counts.items() if len(vals) > 1 or sum(k in ks for ks in keys) < len(keys)]
    rows = [job_row(n, found[n], varying) for n in sorted(found)]
    for r in rows:
        ref = next((x for x in rows if x["quant"] == "fp16" and x["model"] == r["model"] and x["ppl"]), None)
        if ref and r["ppl"]:
            r["delta_vs_fp16"] = round(r["ppl"] - ref["ppl"], 4)
    return rows


def _job_num(folder: Path) -> Optional[int]:
    """Hydra's job number, from the job's saved hydra config (the folder name is a convention only)."""
    try:
        return int(OmegaConf.load(folder / ".hydra" / "hydra.yaml").hydra.job.num)
    except Exception:  # noqa: BLE001 - not a job folder
        return None


def markdown(rows: list[dict], cols: list[str]) -> str:
    def cell(v):
        return "" if v is None else str(v).replace("|", "\\|")
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write(sweep_dir: Path, rows: list[dict]) -> int:
    """Write summary.md / summary.csv / rerun_failed.sh, print the table; returns the failed-job count."""
    cols = list(dict.fromkeys(c for r in rows for c in r))
    short = [c for c in cols if c not in ("rerun", "error", "folder")]
    bad = [r for r in rows if r["status"] != "ok"]
    md = f"# Sweep {sweep_dir}\n\n{len(rows)} jobs, {len(rows) - len(bad)} ok, {len(bad)} not ok\n\n"
    md += markdown(rows, short)
    if bad:
        md += "\n## Rerun only the jobs that did not succeed\n\n"
        md += "\n".join(f"- job {r['job']} ({r['status']}: {r['error']}):\n\n      {r['rerun']}\n" for r in bad)
    (sweep_dir / "summary.md").write_text(md)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols)
    w.writeheader()
    w.writerows(rows)
    (sweep_dir / "summary.csv").write_text(buf.getvalue())
    rerun = sweep_dir / "rerun_failed.sh"
    if bad:
        rerun.write_text("#!/bin/sh\n# the jobs of this sweep that did not succeed, one command each\n"
                         + "".join(f"{r['rerun']}\n" for r in bad))
    else:
        rerun.unlink(missing_ok=True)
    print_table(sweep_dir, rows, short)
    plot(rows, sweep_dir / "summary.png")
    if bad:
        print(md[md.index("## Rerun"):], flush=True)
    return len(bad)


def print_table(sweep_dir: Path, rows: list[dict], cols: list[str]) -> None:
    from rich.console import Console
    from rich.table import Table
    ok = sum(r["status"] == "ok" for r in rows)
    t = Table(title=f"Sweep {sweep_dir}: {len(rows)} jobs, {ok} ok, {len(rows) - ok} not ok")
    for c in cols:
        t.add_column(c, overflow="fold")
    for r in rows:
        t.add_row(*("" if r.get(c) is None else str(r[c]) for c in cols))
    Console(highlight=False, width=200).print(t)


def plot(rows: list[dict], path: Path) -> None:
    """Perplexity against weight MB (marker area: KV bytes per token); nothing when no job has both."""
    pts = [r for r in rows if r.get("ppl") and r.get("weight_MB")]
    if not pts:
        return
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    kv_max = max(r["kv_bytes_per_token"] or 1 for r in pts)
    several = len({r["model"] for r in pts}) > 1
    for r in pts:
        ax.scatter(r["weight_MB"], r["ppl"], s=30 + 200 * (r["kv_bytes_per_token"] or 0) / kv_max, alpha=0.7)
        ax.annotate(f"{r['quant']} ({r['model']})" if several else r["quant"] or f"job {r['job']}",
                    (r["weight_MB"], r["ppl"]), textcoords="offset points", xytext=(6, 4), fontsize=8)
    ax.set_xlabel("weight MB (marker area: KV bytes per token)")
    ax.set_ylabel("perplexity")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


class SweepReport(Callback):
    """Hydra callback: the sweep report, once, after all jobs of a multirun ended."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        _state["pending"] = config

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        finish(config)


def finish(config: Optional[DictConfig] = None) -> None:
    """Write the report for the sweep started in this process, if not written yet."""
    config = config if config is not None else _state["pending"]
    _state["pending"] = None
    if config is None:
        return
    sweep_dir = Path(str(config.hydra.sweep.dir))
    if not sweep_dir.is_dir():
        return
    _state["failed"] = write(sweep_dir, collect(sweep_dir, expected_jobs(config)))


def exit_code() -> int:
    """Non-zero when a job of the sweep run by this process did not succeed."""
    return 1 if _state["failed"] else 0
