"""Run the stage graph described by conf/ (Hydra).

    python -m pipeline.runner                                    # embedded default model, whole graph
    python -m pipeline.runner quant=w4a16_kv8 model=llama2-7b-chat model.path=/models/llama-2-7b-chat
    python -m pipeline.runner -m quant=fp16,kv8,w4a16,w4a16_kv8  # sweep; shared stages run once
    python -m pipeline.runner pipeline=evaluate eval.path=data/test.txt eval.windows=40
    python -m pipeline.runner -m hydra/launcher=local launch.jobs=2 eval.seqlen=256,512  # parallel jobs
    python -m pipeline.runner quant=w4a16 pipeline.dry_run=true   # the plan: stages, keys, cached or why not
Rerunning a command skips every stage whose artifact is in the cache (cache_dir); a killed run resumes
at the first stage without a complete artifact. A multirun ends with one summary of all its jobs
(pipeline/report.py) and exits non-zero when any job failed.
"""
from __future__ import annotations

import json
import logging
import os
import shlex
import sys
import time
import traceback
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from . import graph, gpus, report
from .cache import Cache
from .graph import PATH_KEYS
from .models.hub import is_repo_id
from .schema import register

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"  # absolute: also right when imported by a launcher
log = logging.getLogger("pipeline")
console = Console(highlight=False)
register()
if not OmegaConf.has_resolver("gpu_count"):
    OmegaConf.register_new_resolver("gpu_count", gpus.gpu_count)  # launcher presets


def task_overrides() -> list[str]:
    try:
        return list(HydraConfig.get().overrides.task)
    except ValueError:
        return []


def resume_command() -> str:
    return " ".join(["python -m pipeline.runner", *map(shlex.quote, task_overrides())])


def absolutize(cfg: DictConfig, base: Path) -> None:
    """Make path-valued settings absolute (relative to where the command was started)."""
    with open_dict(cfg):
        for key in (*PATH_KEYS, "cache_dir", "download_dir"):
            val = OmegaConf.select(cfg, key)
            if val and not Path(val).is_absolute() and not (key == "model.path" and is_repo_id(val, base)):
                OmegaConf.update(cfg, key, str((base / val).resolve()))


def summary_text(summary: dict) -> str:
    keep = {k: v for k, v in summary.items() if not isinstance(v, (dict, list))}
    return ", ".join(f"{k}={v}" for k, v in list(keep.items())[:6])


def closing_table(results) -> Table:
    t = Table(title="stages")
    for col in ("stage", "key", "status", "result"):
        t.add_column(col)
    for r in results:
        status = {"cached": "cached", "ran": f"ran in {r.seconds:.1f} s", "failed": f"failed after {r.seconds:.1f} s"}[r.status]
        t.add_row(r.name, r.key, status, summary_text(r.summary))
    return t


def prepare(cfg: DictConfig) -> tuple[list, Cache]:
    """Validate and plan (nothing runs); the planned stages and the cache. Raises on a bad config."""
    from .stages import load
    load.validate(cfg.model)
    steps = graph.plan(cfg)
    return steps, Cache(Path(cfg.cache_dir), verify=cfg.verify, stale_after=cfg.lock_stale_after)


def show_plan(cfg: DictConfig) -> list:
    """pipeline.dry_run=true: print each planned stage in order with its key, cached or not and why; runs
    nothing. Returns StageResults with status cached | planned (for report.json)."""
    steps, cache = prepare(cfg)
    states = graph.status(steps, cache)
    todo = sum(not s.cached for s in states)
    console.print(f"plan ({cfg.pipeline.name}: {', '.join(cfg.pipeline.targets)}): {len(states)} stages, "
                  f"{len(states) - todo} cached, {todo} to run; cache {cache.root}", soft_wrap=True)
    width = max(len(s.stage.name) for s in states)
    for s in states:
        what = "cached" if s.cached else f"runs: {s.why}"
        if s.owner:
            what += f" (being computed now by pid {s.owner.get('pid')} on {s.owner.get('host')})"
        console.print(f"  {s.stage.name:<{width}}  {s.stage.key}  {what}", soft_wrap=True, markup=False)
    console.print("dry run: nothing ran (drop pipeline.dry_run=true to run it)")
    return [graph.StageResult(s.stage.name, s.stage.key, "cached" if s.cached else "planned") for s in states]


def run_pipeline(cfg: DictConfig, run_dir: Path, results: list | None = None) -> list:
    """Validate, plan and execute; returns the StageResults, also appended to `results` when given (so the
    caller keeps those of the stages before a failure). Raises on a bad config or a failing stage."""
    results = [] if results is None else results
    steps, cache = prepare(cfg)
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=console, transient=True) as progress:
        overall = progress.add_task("pipeline", total=len(steps))

        def track(it, total=None, description=""):
            task = progress.add_task(f"  {description}", total=total)
            for x in it:
                yield x
                progress.advance(task)
            progress.remove_task(task)

        def on_start(st):
            progress.update(overall, description=f"running {st.name} [{st.key}]")
            if not st.cached:
                progress.stop()  # a terminal stage (serve) owns the terminal: chat input, streamed text
            log.info("stage %s [%s]: running", st.name, st.key)

        def on_wait(st, owner):
            log.info("stage %s [%s]: waiting for pid %s on %s, which is computing it", st.name, st.key,
                     owner.get("pid"), owner.get("host"))

        try:
            graph.execute(cfg, steps, cache, run_dir, track=track, on_start=on_start, on_wait=on_wait,
                          results=results)
        finally:
            progress.update(overall, completed=len(results))
    return results


def write_report(run_dir: Path, results, ok: bool, error: str | None = None, wall_s: float = 0.0,
                 dry_run: bool = False) -> None:
    rep = {"ok": ok, "error": error, **({"dry_run": True} if dry_run else {}), "overrides": task_overrides(), "resume": resume_command(),
           "wall_s": round(wall_s, 2), "pid": os.getpid(), "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
           "stages": [{"name": r.name, "key": r.key, "status": r.status, "seconds": round(r.seconds, 2),
                       "summary": r.summary, "path": str(r.path) if r.path else None} for r in results]}
    (run_dir / "report.json").write_text(json.dumps(rep, indent=2, default=str))
    for r in results:
        if r.summary:
            (run_dir / f"{r.name}.json").write_text(json.dumps(r.summary, indent=2, default=str))


def job(cfg: DictConfig):
    """One run (one job of a multirun). Undecorated and module-level, so process launchers pickle it by
    reference (joblib, submitit and Ray re-import pipeline.runner in their workers)."""
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    multirun = HydraConfig.get().mode == RunMode.MULTIRUN
    if multirun and not cfg.pipeline.dry_run and cfg.launch.spread_gpus and cfg.device in ("auto", "cuda"):
        gpus.pin_job_gpu(HydraConfig.get().job.num, Path(HydraConfig.get().sweep.dir) / ".gpus")
    absolutize(cfg, Path.cwd())
    (run_dir / "config.resolved.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    t0 = time.time()
    dry_run = bool(cfg.pipeline.dry_run)
    results: list = []
    try:
        if dry_run:
            results = show_plan(cfg)
        else:
            run_pipeline(cfg, run_dir, results)
    except Exception as e:  # noqa: BLE001 - every failure ends in one clear message and the resume command
        msg = " ".join(str(e).split()) or type(e).__name__
        log.debug("%s", traceback.format_exc())
        (run_dir / "traceback.txt").write_text(traceback.format_exc())
        if results:
            console.print(closing_table(results))
        console.print(f"[bold red]error:[/] {type(e).__name__}: {msg}")
        console.print(f"resume with: {resume_command()}")
        write_report(run_dir, results, False, msg, time.time() - t0)
        if multirun:
            return {"ok": False, "error": msg}
        sys.exit(1)
    if dry_run:
        write_report(run_dir, results, True, wall_s=time.time() - t0, dry_run=True)
        return {"ok": True, "dry_run": True, "stages": {r.name: r.status for r in results}}
    console.print(closing_table(results))
    console.print(f"done in {time.time() - t0:.1f} s; run folder: {run_dir}")
    write_report(run_dir, results, True, wall_s=time.time() - t0)
    return {"ok": True, "stages": {r.name: r.summary for r in results}}


main = hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")(job)


if __name__ == "__main__":
    # call main through the importable module, not __main__: process launchers (joblib, submitit, Ray)
    # pickle the task function by reference and re-import it in their workers
    from pipeline import report as _report, runner as _runner
    try:
        _runner.main()
    finally:
        _report.finish()  # the sweep report, when a launcher raised before Hydra's multirun-end callback
    sys.exit(_report.exit_code())
