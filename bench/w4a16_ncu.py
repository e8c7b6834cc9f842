"""Why a W4A16 GEMM runs at its speed: Nsight Compute's counters for the tuner's best configs at one shape.

    python bench/w4a16_ncu.py --out DIR                        # GPU with `ncu`: 4096 x 12288, M = 16 and 64, group 64
    python bench/w4a16_ncu.py --K 11008 --N 4096 --ms 16,32 --group 128 --top 3 --out DIR

Per M: the tuner times every candidate in this process (as a server's first start does), then for each of its
--top fastest configs `ncu` runs this script again as a child (--child) that launches only that config: one launch
to compile, then --reps launches between cudaProfilerStart / Stop (`ncu --profile-from-start off`), each kernel
profiled with the SpeedOfLight, Occupancy, LaunchStats and WarpStateStats sections. The tuner's time per config
(L2 flushed) is printed beside ncu's. Writes DIR/w4a16_ncu.json (per M, per config: the tuner ms and, per kernel
of its launch, the sections' metrics averaged over the reps; with --keep-csv also ncu's own rows per config).
What to read: DRAM Throughput (% of peak) against the int4 roofline the kernel should reach, Achieved Occupancy,
Registers Per Thread, Warp Cycles Per Issued Instruction and Issue Slots Busy (issue-bound or latency-bound).
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SECTIONS = ("SpeedOfLight", "Occupancy", "LaunchStats", "WarpStateStats")
# where a warp's cycles between two issued instructions go (long_scoreboard: global/TMA data; barrier, wait,
# short_scoreboard, mio_throttle, math_pipe_throttle, ...): the WarpStateStats section draws them as a chart, which
# `--page details` does not print, so they are asked for by name; a run whose ncu refuses them goes on without
STALLS = r"regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio"
STALL_PREFIX = "smsp__average_warps_issue_stalled_"
# the metrics the summary keeps per kernel (ncu's display names, as in its `--page details` CSV)
KEEP = ("Duration", "DRAM Throughput", "Memory Throughput", "Compute (SM) Throughput", "Achieved Occupancy",
        "Theoretical Occupancy", "Registers Per Thread", "Grid Size", "Block Size", "Dynamic Shared Memory Per Block",
        "Warp Cycles Per Issued Instruction", "Issue Slots Busy", "Issued Warp Per Scheduler", "L1/TEX Hit Rate",
        "L2 Hit Rate", "Waves Per SM", "L1/TEX Cache Throughput", "L2 Cache Throughput",
        "DRAM Frequency", "SM Frequency", "Elapsed Cycles")


def operands(K: int, N: int, M: int, g: int, act: bool, dev):
    from pipeline.kernels import w4a16 as w4
    gen = torch.Generator(device=dev).manual_seed(K + N)
    q = torch.randint(0, 16, (N, K), dtype=torch.uint8, device=dev, generator=gen)
    s = (torch.rand(K // g, N, device=dev, generator=gen) * 0.01 + 1e-3).half()
    z = torch.randint(0, 16, (K // g, N), device=dev, generator=gen).half()
    x = torch.randn(M, 2 * K if act else K, device=dev, dtype=torch.float16, generator=gen)
    return x, w4.pack_w4(q, s, z, g)


def child(a) -> None:
    """Under ncu: one config, compiled by a first launch, then --reps launches inside the profiled range."""
    from pipeline.kernels import w4a16 as w4
    x, w = operands(a.K, a.N, a.ms[0], a.group, a.act, torch.device("cuda"))
    act = "silu_mul" if a.act else None
    w4.w4a16_linear(x, w, config=a.configs[0], act=act)
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStart()
    for _ in range(a.reps):
        w4.w4a16_linear(x, w, config=a.configs[0], act=act)
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()


TIME_US = {"nsecond": 1e-3, "usecond": 1.0, "msecond": 1e3, "second": 1e6}


def summarize(text: str) -> dict:
    """ncu's `--page details --csv` output -> {kernel name: {"launches": n, metric: mean over its launches}}, kernels
    in launch order (a config may launch several per call). Metric keys are "name (unit)"; Duration is in us."""
    start = text.find('"ID"')
    if start < 0:
        raise ValueError("no ncu CSV header (\"ID\", ...) in the output")
    per: dict[str, dict] = {}
    seen: dict[str, set] = {}
    for r in csv.DictReader(io.StringIO(text[start:])):
        name, metric, unit = r.get("Kernel Name", "?")[:90], r.get("Metric Name", ""), r.get("Metric Unit", "")
        if metric not in KEEP and not metric.startswith(STALL_PREFIX):
            continue
        try:
            v = float(r["Metric Value"].replace(",", ""))
        except (KeyError, ValueError):
            continue
        if metric == "Duration" and unit in TIME_US:
            v, unit = v * TIME_US[unit], "us"
        per.setdefault(name, {}).setdefault(f"{metric} ({unit})" if unit else metric, []).append(v)
        seen.setdefault(name, set()).add(r.get("ID"))
    return {name: {"launches": len(seen[name]), **{k: round(sum(v) / len(v), 3) for k, v in d.items()}}
            for name, d in per.items()}


def run_ncu(a, M: int, name: str, out: Path, stalls: bool = True) -> dict:
    cmd = ["ncu", "--csv", "--page", "details", "--profile-from-start", "off", "--target-processes", "all",
           *[x for s in SECTIONS for x in ("--section", s)], *(["--metrics", STALLS] if stalls else []),
           sys.executable, str(Path(__file__).resolve()), "--child", "--K", str(a.K), "--N", str(a.N), "--ms", str(M),
           "--group", str(a.group), "--configs", name, "--reps", str(a.reps)] + (["--act"] if a.act else [])
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=a.timeout)
    if a.keep_csv:
        (out / f"w4a16_ncu_{M}_{name.replace('+', '_')}.csv").write_text(p.stdout)
    if p.returncode or '"ID"' not in p.stdout:
        err = f"ncu exited {p.returncode}: {(p.stderr or p.stdout)[-600:]}"
        if stalls:   # the stall metrics' names are this ncu's to refuse: the sections alone, and say why
            return {**run_ncu(a, M, name, out, stalls=False), "stall_metrics_error": err[:300]}
        return {"error": err}
    return summarize(p.stdout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--K", type=int, default=4096)
    ap.add_argument("--N", type=int, default=12288)
    ap.add_argument("--ms", type=lambda s: [int(v) for v in s.split(",")], default=[16, 64])
    ap.add_argument("--group", type=int, default=64)
    ap.add_argument("--act", action="store_true", help="the fused-SwiGLU call (x is [gate | up], 2K wide)")
    ap.add_argument("--top", type=int, default=4, help="configs per M, the tuner's fastest first")
    ap.add_argument("--configs", type=lambda s: s.split(","), default=None, help="these configs instead of the top")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds per ncu child")
    ap.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    ap.add_argument("--keep-csv", action="store_true", help="also write ncu's CSV per config")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        return child(a)
    if not torch.cuda.is_available() or shutil.which("ncu") is None:
        raise SystemExit("needs a CUDA GPU and Nsight Compute's `ncu` on PATH")
    from pipeline.kernels import w4a16 as w4
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    res = {"device": torch.cuda.get_device_name(), "K": a.K, "N": a.N, "group": a.group, "act": a.act,
           "int4_bytes": a.K * a.N // 2 + 4 * (a.K // a.group) * a.N, "M": {}}
    path = out / "w4a16_ncu.json"
    for M in a.ms:
        x, w = operands(a.K, a.N, M, a.group, a.act, torch.device("cuda"))
        w4.w4a16_linear(x, w, act="silu_mul" if a.act else None)          # tunes this shape
        chosen, times = w4.tuning_record(x, w, act="silu_mul" if a.act else None)
        names = a.configs or sorted((n for n, t in times.items() if t != float("inf")), key=times.get)[:a.top]
        entry = res["M"][str(M)] = {"chosen": chosen, "configs": {}}
        for name in names:
            entry["configs"][name] = {"tuner_ms": times.get(name), "kernels": run_ncu(a, M, name, out)}
            path.write_text(json.dumps(res, indent=1))
            k = entry["configs"][name]["kernels"]
            top = None if "error" in k else max(k.values(), key=lambda d: d.get("Duration (us)", 0), default=None)
            print(f"M={M} {name}: tuner {times.get(name)} ms; " + (k["error"][:200] if "error" in k else
                  json.dumps({m: v for m, v in (top or {}).items() if m.split(" (")[0] in KEEP[:8]})), flush=True)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
