"""Quality table in one run: perplexity of every 4-bit method on two corpora, with each method's quantization time.

    python bench/quality.py                                   # -> bench/results/quality_smollm2.json
    python bench/quality.py --quants fp16,w4a16 --out FILE    # fewer methods

One multirun of the runner (BENCHMARKS.md's proof-sweep protocol: SmolLM2-135M-Instruct, calibration on
wikitext-2 valid, 32 x 512 tokens; evaluation on the first 40 windows of 512 tokens) over --quants x two corpora:
  wikitext2   ../shared/data/wikitext-2/test.txt (prose, the calibration's domain)
  python      CPython's own Lib/typing.py (code: another domain, ships with every Python)
in a fresh cache folder, so that every stage runs once in this run (jobs that share a stage read it from the cache:
AWQ + GPTQ reuses AWQ's calibrate and awq). A method's quantization time = the seconds of the stages it needs
(calibrate, awq, gptq, pack; not load or evaluate), each counted from the job that ran it. The machine is shared:
the load average is sampled every 10 s during the run and stored beside the numbers.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
import typing
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WIKI = "../shared/data/wikitext-2"
QUANT_STAGES = ("calibrate", "awq", "gptq", "pack")


def sample_load(stop: threading.Event, out: list, every: float = 10.0) -> None:
    while not stop.is_set():
        out.append(os.getloadavg()[0])
        stop.wait(every)


def collect(sweep: Path, corpora: dict) -> dict:
    """{rows: [{quant, corpus, ppl, stages}], quant_seconds: {quant: {stage: s, total: s}}} from the jobs' reports."""
    reports = [json.loads(p.read_text()) for p in sorted(sweep.glob("*/report.json"))]
    ran = {(s["name"], s["key"]): s["seconds"] for r in reports for s in r["stages"] if s["status"] == "ran"}
    by_path = {v: k for k, v in corpora.items()}
    rows, quant_s = [], {}
    for r in reports:
        ov = dict(o.split("=", 1) for o in r["overrides"])
        q = ov["quant"]
        ev = next((s for s in r["stages"] if s["name"] == "evaluate"), None)
        rows.append({"quant": q, "corpus": by_path[ov["eval.path"]], "ok": r["ok"],
                     "ppl": ev["summary"]["ppl"] if ev and r["ok"] else None, "error": r["error"]})
        stages = {s["name"]: ran.get((s["name"], s["key"])) for s in r["stages"] if s["name"] in QUANT_STAGES}
        if r["ok"]:
            quant_s[q] = {**stages, "total": round(sum(v for v in stages.values() if v), 2)}
    return {"rows": rows, "quant_seconds": quant_s}


def shown(cmd: list, work: Path, corpora: dict) -> str:
    """The command as stored: no path of this machine (the temp folder, Python's install)."""
    return " ".join(cmd[1:]).replace(corpora["python"], "$(python -c 'import typing; print(typing.__file__)')") \
        .replace(str(work), "WORK")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quants", default="fp16,w4a16_rtn,w4a16,w4a16_gptq,w4a16_awq_gptq")
    ap.add_argument("--out", default=str(REPO / "bench/results/quality_smollm2.json"))
    ap.add_argument("--work", default=None, help="cache and sweep folder (default: a fresh temp folder)")
    a = ap.parse_args()
    work = Path(a.work or tempfile.mkdtemp(prefix="quality-"))
    corpora = {"wikitext2": f"{WIKI}/test.txt", "python": typing.__file__}
    cmd = [sys.executable, "-m", "pipeline.runner", "-m", f"quant={a.quants}",
           f"eval.path={corpora['wikitext2']},{corpora['python']}", "pipeline=evaluate",
           "quant.calib.dataset=file", f"quant.calib.path={WIKI}/valid.txt",
           f"cache_dir={work / 'cache'}", f"hydra.sweep.dir={work / 'sweep'}"]
    print(" ".join(cmd), flush=True)
    loads, stop = [], threading.Event()
    threading.Thread(target=sample_load, args=(stop, loads), daemon=True).start()
    t0 = time.time()
    p = subprocess.run(cmd, cwd=REPO)
    wall = time.time() - t0
    stop.set()
    res = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "host": platform.node(),
           "cpus": os.cpu_count(), "command": shown(cmd, work, corpora), "returncode": p.returncode, "wall_s": round(wall, 1),
           "load_avg_1min": {"min": min(loads), "mean": round(sum(loads) / len(loads), 2), "max": max(loads)},
           "corpora": {"wikitext2": "wikitext-2 test", "python": f"CPython {platform.python_version()} typing.py"},
           **collect(work / "sweep", corpora)}
    Path(a.out).write_text(json.dumps(res, indent=1))
    for q, t in res["quant_seconds"].items():
        ppl = {r["corpus"]: r["ppl"] for r in res["rows"] if r["quant"] == q}
        print(f"{q:16s} wikitext2 {ppl.get('wikitext2')}  python {ppl.get('python')}  quantization {t['total']} s")
    print(f"load average (1 min) during the run: {res['load_avg_1min']}; wrote {a.out}")
    sys.exit(p.returncode)


if __name__ == "__main__":
    main()
