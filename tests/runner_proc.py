"""Helpers for tests that drive `python -m pipeline.runner` as real processes (test_cache, test_sweeps)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TINY = ["pipeline=evaluate", "quant=fp16", "model=tiny-random", "eval.windows=2", "eval.seqlen=32", "eval.batch_size=2"]


def env(**extra: str) -> dict:
    e = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "160", "HYDRA_FULL_ERROR": "1", **extra}
    e.pop("PIPELINE_TEST_PAUSE", None)
    e.update(extra)
    return e


def start(args: list[str], **extra_env: str) -> subprocess.Popen:
    """Start the runner in its own process group (so a test can SIGKILL it with its workers)."""
    return subprocess.Popen([sys.executable, "-m", "pipeline.runner", *args], cwd=REPO, env=env(**extra_env),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def run(args: list[str], expect_rc: int | None = 0, timeout: float = 240, **extra_env: str) -> tuple[int, str]:
    p = start(args, **extra_env)
    try:
        out, _ = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(p)
        raise
    if expect_rc is not None:
        assert p.returncode == expect_rc, f"runner exited {p.returncode}, expected {expect_rc}:\n{out[-4000:]}"
    return p.returncode, out


def kill_group(p: subprocess.Popen) -> None:
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    p.communicate()


def wait_for(cond, timeout: float = 90, what: str = "condition"):
    t0 = time.time()
    while time.time() - t0 < timeout:
        got = cond()
        if got:
            return got
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def report(run_dir: Path) -> dict:
    return json.loads((Path(run_dir) / "report.json").read_text())


def statuses(rep: dict) -> dict[str, str]:
    """stage -> cached | ran | failed, from one job's report.json."""
    return {s["name"]: s["status"] for s in rep["stages"]}


def job_reports(sweep_dir: Path) -> list[dict]:
    return [report(d) for d in sorted(Path(sweep_dir).iterdir()) if (d / "report.json").exists()]


def artifacts(cache_dir: Path, stage: str) -> list[Path]:
    """Committed artifact folders of a stage (not temp folders, not locks)."""
    d = Path(cache_dir) / stage
    return sorted(p for p in d.iterdir() if not p.name.startswith(".")) if d.exists() else []


def ran_count(reports: list[dict], stage: str) -> int:
    return sum(statuses(r).get(stage) == "ran" for r in reports)
