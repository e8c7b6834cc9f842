"""The stage cache under real runs: keys, resume after SIGKILL, corruption, concurrent processes, multirun.

Every test drives `python -m pipeline.runner model=tiny-random ...` as real processes with its own
cache_dir and run folder. PIPELINE_TEST_PAUSE=<stage>:<s> (pipeline/graph.py) holds a stage, after its
files are written and before its commit, so a process can be killed in the middle of it.
"""
from __future__ import annotations

import json
import signal
import os

from runner_proc import TINY, artifacts, job_reports, kill_group, report, run, start, statuses, wait_for


def args(tmp, *extra, run_dir="run"):
    return [*TINY, f"cache_dir={tmp / 'cache'}", f"hydra.run.dir={tmp / run_dir}", *extra]


def test_keys_rerun_only_what_changed(tmp_path):
    run(args(tmp_path, run_dir="r1"))
    assert statuses(report(tmp_path / "r1")) == {"load": "ran", "evaluate": "ran"}
    run(args(tmp_path, run_dir="r2"))                                  # identical: nothing runs
    assert statuses(report(tmp_path / "r2")) == {"load": "cached", "evaluate": "cached"}
    run(args(tmp_path, "eval.seqlen=48", run_dir="r3"))                 # only evaluate reads eval.*
    assert statuses(report(tmp_path / "r3")) == {"load": "cached", "evaluate": "ran"}
    run(args(tmp_path, "model.seed=1", run_dir="r4"))                   # the model: everything
    assert statuses(report(tmp_path / "r4")) == {"load": "ran", "evaluate": "ran"}
    assert len(artifacts(tmp_path / "cache", "load")) == 2
    assert len(artifacts(tmp_path / "cache", "evaluate")) == 3


def test_sigkill_mid_stage_leaves_nothing_used_and_resume(tmp_path):
    p = start(args(tmp_path, run_dir="r1"), PIPELINE_TEST_PAUSE="evaluate:120")
    ev = tmp_path / "cache" / "evaluate"
    # evaluate has written its files into its temp folder and holds the lock: kill it there
    tmp_dirs = wait_for(lambda: [d for d in ev.glob(".tmp-*") if any(d.iterdir())] if ev.exists() else [],
                        what="evaluate's temp folder")
    wait_for(lambda: list((ev / ".locks").glob("*.lock")), what="evaluate's lock")
    os.killpg(p.pid, signal.SIGKILL)
    kill_group(p)
    assert artifacts(tmp_path / "cache", "evaluate") == []             # nothing committed
    assert len(artifacts(tmp_path / "cache", "load")) == 1             # the stage before it was
    _, out = run(args(tmp_path, run_dir="r2"))
    assert statuses(report(tmp_path / "r2")) == {"load": "cached", "evaluate": "ran"}
    assert "taking over a stale lock" in out
    assert not any(d.exists() for d in tmp_dirs)                        # the dead run's temp folder is gone
    assert len(artifacts(tmp_path / "cache", "evaluate")) == 1


def test_flipped_byte_is_detected_and_recomputed(tmp_path):
    run(args(tmp_path, run_dir="r1"))
    (load_dir,) = artifacts(tmp_path / "cache", "load")
    f = load_dir / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x01
    f.write_bytes(bytes(data))
    _, out = run(args(tmp_path, run_dir="r2"))
    assert "fails its checksum" in out
    assert statuses(report(tmp_path / "r2")) == {"load": "ran", "evaluate": "cached"}
    man = json.loads((load_dir / "manifest.json").read_text())
    from pipeline.cache import file_sha256
    assert file_sha256(f) == man["files"]["model.safetensors"]["sha256"]


def test_two_processes_same_key_compute_once(tmp_path):
    # the load stage is held 3 s after computing, so the second process surely finds it locked
    procs = [start(args(tmp_path, run_dir=f"r{i}"), PIPELINE_TEST_PAUSE="load:3") for i in range(2)]
    outs = [p.communicate(timeout=240)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    reps = [statuses(report(tmp_path / f"r{i}")) for i in range(2)]
    assert sorted(r["load"] for r in reps) == ["cached", "ran"]
    assert sorted(r["evaluate"] for r in reps) == ["cached", "ran"]
    assert any("waiting for pid" in o for o in outs)
    assert len(artifacts(tmp_path / "cache", "load")) == 1


def test_multirun_shares_upstream_and_reruns_nothing(tmp_path):
    sweep = [*TINY, f"cache_dir={tmp_path / 'cache'}", "eval.seqlen=32,48"]
    run(["-m", *sweep, f"hydra.sweep.dir={tmp_path / 'm1'}"])
    reps = job_reports(tmp_path / "m1")
    assert len(reps) == 2 and all(r["ok"] for r in reps)
    assert sum(statuses(r)["load"] == "ran" for r in reps) == 1
    assert all(statuses(r)["evaluate"] == "ran" for r in reps)
    assert "2 jobs, 2 ok" in (tmp_path / "m1" / "report.md").read_text()
    run(["-m", *sweep, f"hydra.sweep.dir={tmp_path / 'm2'}"])           # the same sweep again
    reps = job_reports(tmp_path / "m2")
    assert len(reps) == 2 and all(set(statuses(r).values()) == {"cached"} for r in reps)
