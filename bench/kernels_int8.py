"""Benchmark section `int8` (registered in bench/kernels.py): the W8A8 GEMM on Llama-2-7B linears.

    python bench/kernels.py --only int8            # M = 1, 16, 64, 256, 1024, 4096
    python bench/kernels.py --only int8 --quick    # M = 1, 256, 4096

Per (K, N) and M, measured in one run, on random data, weights rotated through copies so L2 cannot
serve them, eager launches and CUDA-graph replay both:
  ours          int8_linear (Triton, tuned per shape), per-token and per-channel scales in the epilogue
  ours_quant    quantize_per_token(x fp16) + int8_linear: what a linear with dynamic activations costs
  fp16          F.linear, fp16 (cuBLAS)
  int_mm        torch._int_mm alone (int32 out; M padded to 17 below 17)
  int_mm_scaled torch._int_mm + the scales and the fp16 cast in PyTorch
Targets (H100): M >= 1024: ours >= 1.6x fp16 TFLOP/s; M <= 16: ours >= 1.8x faster than fp16.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from pipeline.kernels import int8_gemm as g8
from pipeline.kernels.quant_act import quantize_per_token

L2_DEFEAT_BYTES = 256 << 20
LLAMA_LINEARS = [(4096, 12288), (4096, 4096), (4096, 22016), (11008, 4096)]  # (K, N)


def _kb():
    import kernels  # bench/kernels.py: time_calls, rel_err (imported late: it imports this module)
    return kernels


def _int_mm_scaled(x, xs, w, ws):
    M = x.shape[0]
    a = x if M > 16 else torch.cat([x, x.new_zeros(17 - M, x.shape[1])])
    return (torch._int_mm(a, w.t())[:M].float() * xs[:, None] * ws.float()[None, :]).half()


def _int_mm(x, w):
    M = x.shape[0]
    a = x if M > 16 else torch.cat([x, x.new_zeros(17 - M, x.shape[1])])
    return torch._int_mm(a, w.t())


def bench_int8(args) -> dict:
    kb = _kb()
    dev = torch.device("cuda")
    Ms = [1, 256, 4096] if args.quick else [1, 16, 64, 256, 1024, 4096]
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
           "triton": __import__("triton").__version__, "out_dtype": "float16", "shapes": [], "notes": []}
    for K, N in LLAMA_LINEARS:
        torch.manual_seed(K + N)
        n8 = max(2, math.ceil(L2_DEFEAT_BYTES / (K * N)))
        n16 = max(2, math.ceil(L2_DEFEAT_BYTES / (2 * K * N)))
        wqs = [torch.randint(-127, 128, (N, K), dtype=torch.int8, device=dev) for _ in range(n8)]
        wss = [(torch.rand(N, device=dev) * 0.01 + 1e-3).half() for _ in range(n8)]
        w16 = [(torch.randn(N, K, device=dev) * 0.02).half() for _ in range(n16)]
        entry = {"K": K, "N": N, "copies_int8": n8, "copies_fp16": n16, "M": {}}
        for M in Ms:
            x16 = torch.randn(M, K, device=dev, dtype=torch.float16)
            xq, xs = quantize_per_token(x16)
            y = g8.int8_linear(xq, xs, wqs[0], wss[0])  # tunes outside capture
            row = {"config": g8.tuning_record(xq, wqs[0])[0],
                   "tune_ms": g8.tuning_record(xq, wqs[0])[1],
                   "err_ours": kb.rel_err(y, g8.int8_linear_ref(xq, xs, wqs[0], wss[0], None, torch.float64)),
                   "err_int_mm_scaled": kb.rel_err(_int_mm_scaled(xq, xs, wqs[0], wss[0]),
                                                   g8.int8_linear_ref(xq, xs, wqs[0], wss[0], None,
                                                                      torch.float64))}
            methods = {
                "ours": [lambda w=w, s=s: g8.int8_linear(xq, xs, w, s) for w, s in zip(wqs, wss)],
                "ours_quant": [lambda w=w, s=s: g8.int8_linear(*quantize_per_token(x16), w, s)
                               for w, s in zip(wqs, wss)],
                "fp16": [lambda W=W: F.linear(x16, W) for W in w16],
                "int_mm": [lambda w=w: _int_mm(xq, w) for w in wqs],
                "int_mm_scaled": [lambda w=w, s=s: _int_mm_scaled(xq, xs, w, s) for w, s in zip(wqs, wss)],
            }
            for name, fns in methods.items():
                for mode in ("eager", "graph"):
                    try:
                        row[f"{name}_{mode}_s"] = kb.time_calls(fns, graph=mode == "graph")
                    except Exception as e:
                        res["notes"].append(f"{name} {mode} M={M} K={K} N={N}: {e!r}"[:200])
            row["flops"] = 2 * M * K * N
            entry["M"][M] = row
            print(f"K={K} N={N} M={M}: " + ", ".join(f"{k}={v * 1e6:.1f}us" for k, v in row.items()
                                                    if k.endswith("_s")) + f" [{row['config']}]", flush=True)
        res["shapes"].append(entry)
        del wqs, wss, w16
        torch.cuda.empty_cache()

    summary = {}
    for M in Ms:
        s = {"flops": sum(e["M"][M]["flops"] for e in res["shapes"])}
        for k in res["shapes"][0]["M"][M]:
            if k.endswith("_s") and all(k in e["M"][M] for e in res["shapes"]):
                s[k[:-2] + "_us"] = sum(e["M"][M][k] for e in res["shapes"]) * 1e6
        summary[M] = s
    res["summary"] = summary
    res["tune_errors"] = dict(g8.TUNER.errors)
    lines = [f"W8A8 int8 GEMM, four Llama-2-7B linears summed, fp16 out, {res['device']}: speed vs fp16 F.linear "
             "(time_fp16 / time_x; >1 = faster); TOPS of ours",
             "mode  |    M | ours  | ours+quant | int_mm | int_mm+scales | ours TOPS | fp16 TFLOP/s"]
    for mode in ("eager", "graph"):
        for M in Ms:
            s = summary[M]
            f16 = s.get(f"fp16_{mode}_us")

            def r(name):
                v = s.get(f"{name}_{mode}_us")
                return f"{f16 / v:5.2f}x" if v and f16 else "    -"
            o = s.get(f"ours_{mode}_us")
            tops = f"{s['flops'] / o / 1e6:9.1f}" if o else "        -"
            ftf = f"{s['flops'] / f16 / 1e6:9.1f}" if f16 else "        -"
            lines.append(f"{mode:5} | {M:4} | {r('ours')} | {r('ours_quant')}     | {r('int_mm')} | "
                         f"{r('int_mm_scaled')}        | {tops} | {ftf}")
    res["table"] = lines
    return res
