"""Sweeps through Hydra's launcher plugins (real processes, tiny-random model, one shared cache).

joblib (hydra/launcher=local, 2 workers) and submitit's local executor (hydra/launcher=submitit, 2 jobs
at a time) run a 4-job sweep over a downstream setting: the shared upstream stage (load) runs once, the
end-of-sweep report (pipeline/report.py) lists 4 rows. A sweep SIGKILLed while a job holds a lock is
followed by one that takes the stale lock over. A job with a bad value fails alone, is named with its
rerun command, and the fixed rerun runs only it. Ray: marked slow, where hydra-ray-launcher installs.
"""
from __future__ import annotations

import csv
import importlib.util
import shlex

import pytest

from runner_proc import TINY, artifacts, job_reports, kill_group, ran_count, report, run, start, statuses, wait_for

SEQLENS = "eval.seqlen=16,24,32,40"


def installed(module: str) -> bool:
    """Whether `module` can be imported. find_spec of a dotted name imports its parents and raises
    ModuleNotFoundError when one is missing (no Hydra plugin package installed: no `hydra_plugins` namespace),
    which made `pytest -m gpu` fail at collection."""
    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:
        return False


def sweep_args(tmp, *extra):
    return ["-m", *TINY, f"cache_dir={tmp / 'cache'}", f"hydra.sweep.dir={tmp / 'sweep'}", *extra]


def check_four_job_sweep(tmp, out):
    reps = job_reports(tmp / "sweep")
    assert len(reps) == 4 and all(r["ok"] for r in reps), out[-3000:]
    assert ran_count(reps, "load") == 1                                 # shared upstream stage: once
    assert ran_count(reps, "evaluate") == 4
    assert len(artifacts(tmp / "cache", "load")) == 1
    rows = list(csv.DictReader(open(tmp / "sweep" / "report.csv")))
    assert len(rows) == 4 and {r["status"] for r in rows} == {"ok"}
    assert sorted(r["overrides"] for r in rows) == [f"eval.seqlen={s}" for s in (16, 24, 32, 40)]
    assert all(float(r["ppl"]) > 1 and float(r["wall_s"]) > 0 for r in rows)
    assert "4 jobs, 4 ok, 0 not ok" in out                               # printed once, at the end
    assert out.count("4 jobs, 4 ok") == 1


# Two "GPUs" by name: with no CUDA here, torch still runs on the CPU, but the runner's GPU spreading
# (pipeline/gpus.py) narrows CUDA_VISIBLE_DEVICES to one device per job process, which report.json records.
TWO_GPUS = {"CUDA_VISIBLE_DEVICES": "0,1"}


def test_joblib_two_workers(tmp_path):
    _, out = run(sweep_args(tmp_path, SEQLENS, "hydra/launcher=local", "launch.jobs=2"), **TWO_GPUS)
    assert "n_jobs=2" in out
    check_four_job_sweep(tmp_path, out)
    # joblib reuses 2 worker processes: each keeps one device, and two live workers never share one
    device_of = {}
    for r in job_reports(tmp_path / "sweep"):
        assert device_of.setdefault(r["pid"], r["cuda_visible_devices"]) == r["cuda_visible_devices"]
    assert set(device_of.values()) <= {"0", "1"}
    assert len(set(device_of.values())) == len(device_of)


@pytest.mark.slow   # ~25 s on 2 cores; the joblib launcher's test covers parallel sweeps in the default run
def test_submitit_local_two_at_a_time(tmp_path):
    _, out = run(sweep_args(tmp_path, SEQLENS, "hydra/launcher=submitit", "hydra.sweeper.max_batch_size=2"),
                 **TWO_GPUS)
    assert (tmp_path / "sweep" / ".submitit").is_dir()
    check_four_job_sweep(tmp_path, out)
    # submitit hands every job both devices (gpus_per_node=${gpu_count:}); the runner keeps job_num % 2
    for d in sorted((tmp_path / "sweep").glob("[0-9]*")):
        assert report(d)["cuda_visible_devices"] == str(int(d.name.split("-")[0]) % 2)


def test_killed_lock_holder_is_taken_over_by_next_sweep(tmp_path):
    sweep = sweep_args(tmp_path, "eval.seqlen=16,24", "hydra/launcher=local", "launch.jobs=2")
    first = sweep_args(tmp_path, "eval.seqlen=16", "hydra/launcher=local", "launch.jobs=1")
    p = start(first, PIPELINE_TEST_PAUSE="load:120")                   # its job holds load's lock, paused
    locks = tmp_path / "cache" / "load" / ".locks"
    wait_for(lambda: locks.exists() and list(locks.glob("*.lock")), what="load's lock")
    kill_group(p)                                                       # SIGKILL the sweep and its jobs
    (lock,) = locks.glob("*.lock")                                      # left behind by the dead job
    assert artifacts(tmp_path / "cache", "load") == []
    _, out = run(sweep)
    reps = job_reports(tmp_path / "sweep")
    assert len(reps) == 2 and all(r["ok"] for r in reps)
    assert ran_count(reps, "load") == 1
    logs = "".join(f.read_text() for f in (tmp_path / "sweep").glob("*/*.log"))
    assert "taking over a stale lock" in logs + out


def test_failed_job_is_named_and_rerun_alone(tmp_path):
    texts = {}
    for name in ("a", "b"):
        texts[name] = tmp_path / f"{name}.txt"
        texts[name].write_text(f"corpus {name}: " + "the quick brown fox jumps over the lazy dog. " * 8)
    missing = tmp_path / "typo.txt"
    rc, out = run(sweep_args(tmp_path, f"eval.path={texts['a']},{missing},{texts['b']}", "hydra/launcher=local",
                             "launch.jobs=2"), expect_rc=1)             # non-zero: a job failed
    rows = {r["job"]: r for r in csv.DictReader(open(tmp_path / "sweep" / "report.csv"))}
    assert [rows[j]["status"] for j in "012"] == ["ok", "failed", "ok"]
    assert "typo.txt" in rows["1"]["error"]
    rerun = rows["1"]["rerun"]
    assert rerun.startswith("python -m pipeline.runner ") and f"eval.path={missing}" in rerun
    assert rerun in out and rerun in (tmp_path / "sweep" / "rerun_failed.sh").read_text()
    assert "3 jobs, 2 ok, 1 not ok" in out
    # fix the value and rerun only that job: load comes from the cache, the other jobs do not run
    missing.write_text("the fixed corpus: " + "a stitch in time saves nine. " * 10)
    cmd = shlex.split(rerun)[3:] + [f"hydra.run.dir={tmp_path / 'rerun'}"]
    run(cmd)
    assert statuses(report(tmp_path / "rerun")) == {"load": "cached", "evaluate": "ran"}
    assert len(artifacts(tmp_path / "cache", "evaluate")) == 3


@pytest.mark.slow
@pytest.mark.skipif(not installed("hydra_plugins.hydra_ray_launcher"),
                    reason="hydra-ray-launcher not installed (pip install -e '.[ray]' in its own environment)")
def test_ray_local_cluster(tmp_path):
    _, out = run(sweep_args(tmp_path, "eval.seqlen=16,24", "hydra/launcher=ray_jobs", "launch.gpus_per_job=0"))
    reps = job_reports(tmp_path / "sweep")
    assert len(reps) == 2 and all(r["ok"] for r in reps), out[-3000:]
    assert ran_count(reps, "load") == 1
    assert "2 jobs, 2 ok" in (tmp_path / "sweep" / "report.md").read_text()
