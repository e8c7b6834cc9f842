"""Where the W4A16 decode GEMM's time goes: every decode config against its floors, one GPU run.

    python bench/w4a16_decode.py                         # M = 1, 4, 16 on the four Llama-2-7B linears
    python bench/w4a16_decode.py --ms 1 --configs wide_n64_s4_h2,gemv_n32_c8_sl
    python bench/w4a16_decode.py --ncu wide_n64_s4_h2    # a few launches of one config, for `ncu`

Per linear (K, N), fp16 activations, group 128, L2 defeated by rotating weight copies, calls replayed in
one CUDA graph (bench/kernels.py's timing):
- roofline: int4 weights + fp16 scale and zero read once at the measured copy bandwidth;
- launch floor: an empty Triton kernel with the same grid as a `wide` config (graph launch + drain);
- stream floor: a Triton kernel that only reads the same bytes, one-shot loads like the `wide` kernel,
  and writes N values: what streaming this weight can cost in Triton with no arithmetic at all;
- every config in `w4a16.candidates(M)` (rel err against an fp64 reference checked first).
Writes <out>/w4a16_decode.json (out = --out, else $OUT, else bench/results) and prints a table last.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kernels import L2_DEFEAT_BYTES, LLAMA_LINEARS, copy_bandwidth, rel_err, time_calls  # noqa: E402
from pipeline.kernels import w4a16 as w4  # noqa: E402


@triton.jit
def _empty_kernel(y_ptr):
    pass


@triton.jit
def _stream_kernel(q_ptr, s_ptr, z_ptr, y_ptr, N, P: tl.constexpr, KS: tl.constexpr, BLOCK_N: tl.constexpr):
    # reads KS groups (KS, P, BN) int32 + scales + zeros in one load each, like _gemv_wide_kernel
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_g = pid_k * KS + tl.arange(0, KS)
    rows = offs_g[:, None] * P + tl.arange(0, P)[None, :]
    q = tl.load(q_ptr + rows[:, :, None] * N + offs_n[None, None, :], mask=mask_n[None, None, :], other=0)
    gs = offs_g[:, None] * N + offs_n[None, :]
    s = tl.load(s_ptr + gs, mask=mask_n[None, :], other=0.0)
    z = tl.load(z_ptr + gs, mask=mask_n[None, :], other=0.0)
    v = tl.sum(tl.sum(q, axis=1), axis=0) + tl.sum(s.to(tl.int16, bitcast=True) ^ z.to(tl.int16, bitcast=True),
                                                   axis=0).to(tl.int32)
    tl.store(y_ptr + pid_k * N + offs_n, v, mask=mask_n)  # (split, N): every program writes, no load is dead


def make_weights(K, N, g, dev, copies):
    ws = []
    for _ in range(copies):
        q = torch.randint(0, 16, (N, K), dtype=torch.uint8, device=dev)
        s = (torch.rand(K // g, N, device=dev) * 0.01 + 1e-3).half()
        z = torch.randint(0, 16, (K // g, N), device=dev).half()
        ws.append(w4.pack_w4(q, s, z, g))
    return ws


def bench(args) -> dict:
    dev = torch.device("cuda")
    g = 128
    bw = copy_bandwidth()
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "copy_bw_GBps": bw / 1e9, "group_size": g, "shapes": []}
    only = set(args.configs.split(",")) if args.configs else None
    for K, N in LLAMA_LINEARS:
        torch.manual_seed(K + N)
        nbytes = K * N // 2 + 2 * 2 * (K // g) * N
        ws = make_weights(K, N, g, dev, max(2, math.ceil(L2_DEFEAT_BYTES / nbytes)))
        entry = {"K": K, "N": N, "int4_bytes": nbytes, "roofline_us": nbytes / bw * 1e6, "M": {}}
        y32 = torch.empty(K // g, N, device=dev, dtype=torch.int32)
        grid = (triton.cdiv(N, 64), triton.cdiv(K // g, 4))
        entry["launch_floor_us"] = time_calls([lambda: _empty_kernel[grid](y32)], graph=True) * 1e6
        for BN, KS, warps in ((64, 4, 4), (128, 2, 4), (64, 8, 8)):
            grid_s = (triton.cdiv(N, BN), triton.cdiv(K // g, KS))
            fns = [lambda w=w: _stream_kernel[grid_s](w.qweight, w.scales, w.zeros, y32, N, P=g // 8, KS=KS,
                                                       BLOCK_N=BN, num_warps=warps) for w in ws]
            entry[f"stream_floor_n{BN}_s{KS}_us"] = time_calls(fns, graph=True) * 1e6
        for M in args.ms:
            x = torch.randn(M, K, device=dev, dtype=torch.float16)
            ref = x.double() @ w4.dequantize_w4(ws[0], torch.float64).T
            row = {}
            for name in w4.candidates(M):
                if only and name not in only or w4.CONFIGS[name] is None:
                    continue
                err = rel_err(w4.w4a16_linear(x, ws[0], config=name), ref)
                t = time_calls([lambda w=w: w4.w4a16_linear(x, w, config=name) for w in ws], graph=True)
                row[name] = {"us": t * 1e6, "x_roofline": t * 1e6 / entry["roofline_us"], "rel_err": err}
                print(f"K={K} N={N} M={M} {name:18s} {t * 1e6:7.2f} us  {row[name]['x_roofline']:.2f}x  "
                      f"err {err:.1e}", flush=True)
            entry["M"][str(M)] = row
        print(f"K={K} N={N}: roofline {entry['roofline_us']:.2f} us, launch floor {entry['launch_floor_us']:.2f} us, "
              + ", ".join(f"{k} {v:.2f}" for k, v in entry.items() if k.startswith("stream_floor")), flush=True)
        res["shapes"].append(entry)
    return res


def table(res) -> str:
    lines = []
    roof = sum(e["roofline_us"] for e in res["shapes"])
    names = sorted({n for e in res["shapes"] for m in e["M"].values() for n in m})
    floors = ["launch_floor_us"] + sorted(k for k in res["shapes"][0] if k.startswith("stream_floor"))
    lines.append(f"sum of the four linears: roofline {roof:.1f} us at {res['copy_bw_GBps']:.0f} GB/s; " + ", ".join(
        f"{f} {sum(e[f] for e in res['shapes']) / roof:.2f}x" for f in floors))
    for M in res["shapes"][0]["M"]:
        rows = []
        for n in names:
            if all(n in e["M"][M] for e in res["shapes"]):
                t = sum(e["M"][M][n]["us"] for e in res["shapes"])
                per = " ".join(f"{e['M'][M][n]['x_roofline']:.2f}" for e in res["shapes"])
                rows.append((t, f"M={M:>2} {n:18s} {t:7.1f} us {t / roof:.2f}x  (per shape {per})"))
        lines += [r for _, r in sorted(rows)]
    return "\n".join(lines)


def ncu_target(name: str, M: int = 1):
    """A few launches of one config on the (4096, 22016) linear: `ncu -k regex:_gemv|_w4a16 ...`."""
    K, N = 4096, 22016
    w = make_weights(K, N, 128, torch.device("cuda"), 1)[0]
    x = torch.randn(M, K, device="cuda", dtype=torch.float16)
    for _ in range(3):
        w4.w4a16_linear(x, w, config=name)
    torch.cuda.synchronize()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ms", type=lambda s: [int(v) for v in s.split(",")], default=[1, 4, 16])
    ap.add_argument("--configs", default="", help="comma-separated config names (default: every candidate)")
    ap.add_argument("--ncu", default="", help="run a few launches of this config only (for ncu)")
    ap.add_argument("--out", default=os.environ.get("OUT") or str(Path(__file__).parent / "results"))
    args = ap.parse_args()
    if args.ncu:
        return ncu_target(args.ncu)
    res = bench(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "w4a16_decode.json").write_text(json.dumps(res, indent=1))
    print(table(res))


if __name__ == "__main__":
    main()
