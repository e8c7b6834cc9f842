"""Kernel benchmarks on one GPU: each section times our kernels against named baselines in one run.

    python bench/kernels.py                    # every section
    python bench/kernels.py --only w4a16       # one section (comma-separated list allowed)
    python bench/kernels.py --only w4a16 --quick   # fewer M values, for a smoke run
    python bench/kernels.py --only w4a16 --ms 64,256   # chosen M values

Writes <out>/kernels_<section>.json (out = --out, else $OUT, else bench/results) and prints a short
table per section, last. Other kernels add a function to SECTIONS.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
# "ours" is what the engine runs: on sm_90 the Gluon GEMMs are among the tuner's candidates by default (the one-row
# Gluon GEMVs only with PIPELINE_W4A16_GLUON_GEMV=1); the "gluon" row is the fastest Gluon config at tuning

from pipeline.kernels import w4a16 as w4  # noqa: E402

L2_DEFEAT_BYTES = 256 << 20  # rotate weight copies until this many bytes are touched


# ---------------------------------------------------------------------------------------- timing
def copy_bandwidth(n_bytes: int = 1 << 30) -> float:
    """Device-to-device copy, bytes read + written per second (median of 20)."""
    a = torch.empty(n_bytes, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    ts = []
    for _ in range(23):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        b.copy_(a)
        e.record()
        e.synchronize()
        ts.append(s.elapsed_time(e) / 1e3)
    return 2 * n_bytes / statistics.median(ts[3:])


def time_calls(fns, graph: bool, rounds: int = 7) -> float:
    """Seconds per call of a list of calls (each on its own weight copy), run back to back.
    graph=True: the whole list captured in one CUDA graph and replayed; else plain launches."""
    calls = fns * max(1, math.ceil(24 / len(fns)))
    for f in fns:
        f()
    torch.cuda.synchronize()
    if graph:
        g = torch.cuda.CUDAGraph()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for f in calls:  # warm the graph pool's allocations outside capture
                f()
            with torch.cuda.graph(g, stream=stream):
                for f in calls:
                    f()
        torch.cuda.synchronize()
        run = g.replay
    else:
        def run():
            for f in calls:
                f()
    run()
    ts = []
    for _ in range(rounds):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        run()
        e.record()
        e.synchronize()
        ts.append(s.elapsed_time(e) / 1e3 / len(calls))
    return statistics.median(ts)


def fixed_and_rate(nbytes: list, us: list) -> tuple[float, float]:
    """A config's times over the shapes fitted as fixed + bytes / rate (least squares): (fixed us, rate TB/s). The
    decode tiles' fixed part is most of a call (docs/perf-log.md, session 22); the stream-K tiles aim at it."""
    n = len(us)
    mx, my = sum(nbytes) / n, sum(us) / n
    var = sum((b - mx) ** 2 for b in nbytes)
    slope = sum((b - mx) * (t - my) for b, t in zip(nbytes, us)) / var if var else 0.0   # us per byte
    return my - slope * mx, (1 / slope / 1e6) if slope > 0 else float("inf")   # bytes/us -> TB/s


def rel_err(y, ref) -> float:
    return float((y.double() - ref).norm() / ref.norm())


# ----------------------------------------------------------------------------------------- w4a16
LLAMA_LINEARS = [(4096, 12288), (4096, 4096), (4096, 22016), (11008, 4096)]  # (K, N)


def _tinygemm_pack(q, s, z, g, hi_first=True):
    """torch's tinygemm: w = (q - 8) * scale + zero; weights (N, K/2) uint8 -> int4pack."""
    qi = q.to(torch.int32)
    a, b = (qi[:, ::2], qi[:, 1::2]) if hi_first else (qi[:, 1::2], qi[:, ::2])
    packed = torch.ops.aten._convert_weight_to_int4pack((a << 4 | b).to(torch.uint8), 8)
    sz = torch.stack([s.float(), (8 - z.float()) * s.float()], dim=-1)  # (K//g, N, 2)
    return packed, sz


def _gemlite_layer(q, s, z, dtype):
    from gemlite.helper import A16W4_HQQ_INT
    return A16W4_HQQ_INT(dtype=dtype).from_weights(q, s.t().contiguous(), z.t().contiguous())


def bench_w4a16(args) -> dict:
    dev = torch.device("cuda")
    dtype = torch.float16
    g = args.group
    Ms = args.ms or ([1, 16, 256] if args.quick else [1, 4, 16, 64, 256, 2048])
    bw = copy_bandwidth()
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
           "triton": __import__("triton").__version__, "copy_bw_GBps": bw / 1e9, "group_size": g,
           "dtype": "float16", "shapes": [], "notes": []}
    try:
        import gemlite  # noqa: F401
        have_gemlite = True
        res["gemlite"] = getattr(gemlite, "__version__", "?")
    except Exception as e:
        have_gemlite = False
        res["notes"].append(f"gemlite not available: {e!r}"[:200])

    for K, N in LLAMA_LINEARS:
        torch.manual_seed(K + N)
        int4_bytes = K * N // 2 + 2 * 2 * (K // g) * N  # int4 weights + fp16 scale and zero per group
        n4 = max(2, math.ceil(L2_DEFEAT_BYTES / int4_bytes))
        n16 = max(2, math.ceil(L2_DEFEAT_BYTES / (2 * K * N)))
        quants = []
        for _ in range(n4):
            q = torch.randint(0, 16, (N, K), dtype=torch.uint8, device=dev)
            s = (torch.rand(K // g, N, device=dev) * 0.01 + 1e-3).half()
            z = torch.randint(0, 16, (K // g, N), device=dev).half()
            quants.append((q, s, z))
        ws = [w4.pack_w4(q, s, z, g) for q, s, z in quants]
        w16 = [w4.dequantize_w4(ws[i % n4], dtype) for i in range(n16)]
        entry = {"K": K, "N": N, "int4_bytes": int4_bytes, "roofline_s": int4_bytes / bw,
                 "copies_int4": n4, "copies_fp16": n16, "M": {}, "check": {}}
        # baselines' packing, checked against the reference once
        xc = torch.randn(16, K, device=dev, dtype=dtype)
        ref = xc.double() @ w4.dequantize_w4(ws[0], torch.float64).T
        entry["check"]["ours"] = rel_err(w4.w4a16_linear(xc, ws[0]), ref)
        tiny = None
        for hi_first in (True, False):
            try:
                cand = [_tinygemm_pack(q, s, z, g, hi_first) for q, s, z in quants]
                for tdt in (torch.float16, torch.bfloat16):
                    try:
                        sz = cand[0][1].to(tdt)
                        y = torch.ops.aten._weight_int4pack_mm(xc.to(tdt), cand[0][0], g, sz)
                    except Exception as e:
                        res["notes"].append(f"tinygemm {tdt}: {e!r}"[:200])
                        continue
                    err = rel_err(y, ref)
                    if err < 2e-2:
                        tiny = ([(p, s_.to(tdt)) for p, s_ in cand], tdt)
                        entry["check"]["tinygemm"] = {"err": err, "hi_nibble_first": hi_first,
                                                      "dtype": str(tdt)}
                        break
                if tiny:
                    break
            except Exception as e:
                res["notes"].append(f"tinygemm pack: {e!r}"[:200])
        gl = None
        if have_gemlite:
            try:
                gl = [_gemlite_layer(q, s, z, dtype) for q, s, z in quants]
                entry["check"]["gemlite"] = rel_err(gl[0](xc), ref)
                if entry["check"]["gemlite"] > 1e-2:
                    gl = None
            except Exception as e:
                res["notes"].append(f"gemlite: {e!r}"[:200])
                gl = None
        del quants

        for M in Ms:
            x = torch.randn(M, K, device=dev, dtype=dtype)
            w4.w4a16_linear(x, ws[0])  # tune outside capture
            chosen, tune_ms = w4.tuning_record(x, ws[0])
            methods = {
                "ours": [lambda w=w: w4.w4a16_linear(x, w) for w in ws],
                "fp16_cublas": [lambda W=W: F.linear(x, W) for W in w16],
            }
            gl_names = {**w4.w4a16_gluon.GLUON_CONFIGS, **w4.w4a16_gluon_gemv.GEMV_CONFIGS}
            gl_ms = {n: t for n, t in tune_ms.items() if n in gl_names and math.isfinite(t)}
            if gl_ms:  # the fastest Gluon config at tuning (sm_90), timed as its own row
                gl_best = min(gl_ms, key=gl_ms.get)
                methods["gluon"] = [lambda w=w: w4.w4a16_linear(x, w, config=gl_best) for w in ws]
            if tiny:
                xt = x.to(tiny[1])
                methods["tinygemm"] = [lambda p=p, sz=sz: torch.ops.aten._weight_int4pack_mm(xt, p, g, sz)
                                       for p, sz in tiny[0]]
            if gl:
                methods["gemlite"] = [lambda L=L: L(x) for L in gl]
            Wd = w4.dequantize_w4(ws[0], torch.float64)
            row = {"config": chosen, "tune_ms": tune_ms, "gluon_config": min(gl_ms, key=gl_ms.get) if gl_ms else None,
                   "rel_err": rel_err(w4.w4a16_linear(x, ws[0]), x.double() @ Wd.T)}
            del Wd
            for name, fns in methods.items():
                for mode in ("graph", "eager"):
                    try:
                        row[f"{name}_{mode}_s"] = time_calls(fns, graph=mode == "graph")
                    except Exception as e:
                        res["notes"].append(f"{name} {mode} M={M} K={K} N={N}: {e!r}"[:200])
            row["flops"] = 2 * M * K * N
            entry["M"][M] = row
            print(f"K={K} N={N} M={M}: " + ", ".join(f"{k}={v * 1e6:.1f}us" for k, v in row.items()
                                                    if k.endswith("_s")) + f" [{row['config']}, err {row['rel_err']:.1e}]",
                  flush=True)
        res["shapes"].append(entry)
        getattr(args, "save", lambda r: None)(res)   # after each shape: a run cut by its time limit keeps them
        del ws, w16, gl, tiny
        torch.cuda.empty_cache()

    # summary: the four linears of a layer
    roof = sum(e["roofline_s"] for e in res["shapes"])
    summary = {}
    for M in Ms:
        s = {"roofline_us": roof * 1e6}
        for k in res["shapes"][0]["M"][M]:
            if k.endswith("_s") and all(k in e["M"][M] for e in res["shapes"]):
                s[k[:-2] + "_us"] = sum(e["M"][M][k] for e in res["shapes"]) * 1e6
        summary[M] = s
    res["summary"] = summary
    # per M, each tuned config's line over the four shapes (the tuner's flushed single-launch times)
    res["fits"] = {M: {n: dict(zip(("fixed_us", "rate_TBps"), fixed_and_rate(
        [e["int4_bytes"] for e in res["shapes"]], [e["M"][M]["tune_ms"][n] * 1e3 for e in res["shapes"]])))
        for n in res["shapes"][0]["M"][M].get("tune_ms", {})
        if all(math.isfinite(e["M"][M].get("tune_ms", {}).get(n, math.inf)) for e in res["shapes"])} for M in Ms}
    res["tune_errors"] = dict(w4.TUNER.errors)
    lines = [f"W4A16, four Llama-2-7B linears, g={g}, fp16, {res['device']}, copy {bw / 1e9:.0f} GB/s, "
             f"int4 roofline {roof * 1e6:.1f} us",
             "mode  |    M | ours x roof | gluon x  | tinygemm x | gemlite x | fp16 x | ours/fp16 | gluon/fp16 speed"]
    for mode in ("graph", "eager"):
        for M in Ms:
            s = summary[M]

            def r(name):
                v = s.get(f"{name}_{mode}_us")
                return f"{v / s['roofline_us']:8.2f}x" if v else "       -"
            o, f16, gq = (s.get(f"{n}_{mode}_us") for n in ("ours", "fp16_cublas", "gluon"))
            sp = f"{f16 / o:6.2f}" if o and f16 else "-"
            sg = f"{f16 / gq:6.2f}" if gq and f16 else "-"
            lines.append(f"{mode:5} | {M:4} | {r('ours')}   | {r('gluon')} | {r('tinygemm')} | {r('gemlite')} | "
                         f"{r('fp16_cublas')} | {sp}    | {sg}")
    for M in Ms:   # the five configs with the least time over the four shapes, and their lines
        f = res["fits"][M]
        tot = {n: sum(e["M"][M]["tune_ms"][n] for e in res["shapes"]) * 1e3 for n in f}
        lines.append(f"M = {M} (tuner, flushed): " + "; ".join(
            f"{n} {tot[n]:.1f} us = {f[n]['fixed_us']:.1f} fixed + at {f[n]['rate_TBps']:.2f} TB/s"
            for n in sorted(tot, key=tot.get)[:5]))
    res["table"] = lines
    return res


SECTIONS = {"w4a16": bench_w4a16}

from kernels_attention import SECTIONS as _ATTENTION_SECTIONS  # noqa: E402  decode attention, norm, rope
SECTIONS.update(_ATTENTION_SECTIONS)

from kernels_int8 import bench_int8  # noqa: E402  (bench/ is on sys.path as the script folder)
SECTIONS["int8"] = bench_int8


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated of {list(SECTIONS)}")
    ap.add_argument("--out", default=os.environ.get("OUT") or "bench/results")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--group", type=int, default=128, help="w4a16: quantization group size (issue 26's tables: 128; "
                    "the serving presets build 64)")
    ap.add_argument("--ms", type=lambda v: [int(m) for m in v.split(",")], default=None,
                    help="W4A16 activation rows to time, e.g. 1,16,64,256,2048 (default: all six; --quick: 1,16,256)")
    args = ap.parse_args()
    names = [n for n in args.only.split(",") if n]
    bad = [n for n in names if n not in SECTIONS]
    if bad:
        ap.error(f"--only {bad} not among {list(SECTIONS)}")
    if not torch.cuda.is_available():
        sys.exit("bench/kernels.py needs a CUDA GPU")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tables = []
    for n in names:
        t0 = time.time()
        args.save = lambda r, n=n: (out / f"kernels_{n}.json").write_text(json.dumps(r, indent=1, default=str))
        res = SECTIONS[n](args)
        res["wall_s"] = time.time() - t0
        (out / f"kernels_{n}.json").write_text(json.dumps(res, indent=1, default=str))
        tables += res["table"]
    print("\n".join(tables))


if __name__ == "__main__":
    main()
