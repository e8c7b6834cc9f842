"""Host cost of one eager kernel call (what a prefill step, which runs outside CUDA graphs, pays per launch).

    python bench/host_overhead.py                 # one GPU: every row, a cProfile of two calls, writes host_overhead.json
    python bench/host_overhead.py --out DIR --calls 500

Per row: the same small call enqueued --calls times back to back, the GPU synchronised only before and after, so the
wall time per call is the host's cost of issuing it (the kernels themselves take a few microseconds); beside it the
GPU time of one call from a CUDA-graph replay of the same calls, to show the host is the bound. Rows: our W4A16 linear
at M = 1 / 16 / 64 (Triton kernels) and M = 2048 (dequantize kernel + cuBLAS), RMSNorm, SiLU-mul, rope_kv_write, with
PDL off and on, and baselines measured in the same run: an fp16 `F.linear` (one cuBLAS launch) and a two-argument
Triton kernel (Triton's own launch path with nothing of ours around it). Then cProfile of the W4A16 M = 1 call and of
RMSNorm: the top functions by own time, and a breakdown of those two calls timed piece by piece (allocations, the
dispatcher, our Python with the launch stubbed, Triton's JIT launch alone, the compiled kernel launched directly).
"""
from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.kernels import norm, pdl, rope_kv  # noqa: E402
from pipeline.kernels import w4a16 as w4  # noqa: E402


@triton.jit
def _copy_kernel(X, Y, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(Y + offs, tl.load(X + offs))


def host_us(fn, calls: int) -> float:
    """Wall microseconds per call of `calls` back-to-back enqueues (GPU idle before, drained after)."""
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - t0) / calls)
    return 1e6 * best


def gpu_us(fn, calls: int = 50) -> float:
    """GPU microseconds per call, from one CUDA graph of `calls` calls."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, stream=s):
            for _ in range(calls):
                fn()
    torch.cuda.synchronize()
    g.replay()
    torch.cuda.synchronize()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    g.replay()
    e1.record()
    torch.cuda.synchronize()
    return 1e3 * e0.elapsed_time(e1) / calls


def profile_text(fn, calls: int, top: int = 18) -> str:
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(calls):
        fn()
    pr.disable()
    torch.cuda.synchronize()
    buf = io.StringIO()
    pstats.Stats(pr, stream=buf).sort_stats("tottime").print_stats(top)
    return buf.getvalue()


def rows(dev):
    """name -> zero-argument call on small inputs."""
    g, K, N = 128, 4096, 4096
    q = torch.randint(0, 16, (N, K), dtype=torch.uint8, device=dev)
    s = (torch.rand(K // g, N, device=dev) * 0.01 + 1e-3).half()
    z = torch.full((K // g, N), 8.0, device=dev).half()
    w = w4.pack_w4(q, s, z, g)
    xs = {m: torch.randn(m, K, device=dev, dtype=torch.float16) for m in (1, 16, 64, 2048)}
    wf = torch.randn(N, K, device=dev, dtype=torch.float16)
    h = torch.randn(16, 4096, device=dev, dtype=torch.float16)
    res = torch.randn_like(h)
    nw = torch.ones(4096, device=dev, dtype=torch.float16)
    gu = torch.randn(16, 2 * 11008, device=dev, dtype=torch.float16)
    T, H, KV, D, bs = 16, 32, 8, 128, 16
    qq, kk, vv = (torch.randn(T, n, D, device=dev, dtype=torch.float16) for n in (H, KV, KV))
    pos = torch.arange(T, device=dev)
    cos, sin = torch.randn(4096, D // 2, device=dev), torch.randn(4096, D // 2, device=dev)
    kc, vc = (torch.zeros(64, KV, bs, D, device=dev, dtype=torch.int8) for _ in range(2))
    kvp = {n: torch.rand(KV, device=dev) for n in ("k_scale", "k_zp", "v_scale", "v_zp")}
    slots = torch.arange(T, device=dev)
    a, b = torch.randn(4096, device=dev), torch.empty(4096, device=dev)
    out = {f"w4a16 M={m}": (lambda x=x: w4.w4a16_linear(x, w)) for m, x in xs.items()}
    out.update({
        "rms_norm+residual": lambda: norm.rms_norm(h, nw, 1e-5, residual=res),
        "silu_mul": lambda: norm.silu_mul(gu),
        "rope_kv_write int8": lambda: rope_kv.rope_kv_write(qq, kk, vv, pos, cos, sin, kc, vc, slots, "static", 8,
                                                            **kvp),
        "baseline: F.linear fp16 M=1": lambda: F.linear(xs[1], wf),
        "baseline: 2-arg Triton kernel": lambda: _copy_kernel[(4,)](a, b, BLOCK=1024),
    })
    return out


class _Recorder:
    """Stands in for a @triton.jit kernel: remembers the last launch's grid, args and kwargs; forwards it or not."""
    def __init__(self, fn, forward: bool):
        self.fn, self.forward, self.last = fn, forward, None

    def __getitem__(self, grid):
        def call(*args, **kwargs):
            self.last = (grid, args, kwargs)
            return self.fn[grid](*args, **kwargs) if self.forward else None
        return call


def _all_args(fn, args, kwargs) -> list:
    """Every parameter of a JIT function in signature order (constexprs and defaults included), as Triton's own
    launch path hands them to the compiled kernel."""
    out = []
    for i, p in enumerate(fn.params):
        name = p.name
        out.append(args[i] if i < len(args) else kwargs[name] if name in kwargs else p.default)
    return out


def breakdown(dev, calls: int) -> dict:
    """Microseconds per call of the pieces of one eager W4A16 (M = 1) and RMSNorm call, each timed alone."""
    import pipeline.kernels.w4a16 as mod
    from pipeline.kernels import dispatch
    g, K, N = 128, 4096, 4096
    w = w4.pack_w4(torch.randint(0, 16, (N, K), dtype=torch.uint8, device=dev),
                   (torch.rand(K // g, N, device=dev) * 0.01 + 1e-3).half(), torch.full((K // g, N), 8.0, device=dev).half(), g)
    x = torch.randn(1, K, device=dev, dtype=torch.float16)
    h = torch.randn(16, 4096, device=dev, dtype=torch.float16)
    nw = torch.ones(4096, device=dev, dtype=torch.float16)
    w4.w4a16_linear(x, w)                                   # tuned
    cfg = mod.CONFIGS[mod._choose(x, w, None, x.dtype)]
    kname = {"wide": "_gemv_wide_kernel", "fma": "_gemv_kernel", "swap": "_w4a16_swap_kernel"}.get(cfg[0], "_w4a16_kernel")
    res = {"w4a16 config": cfg[0]}
    pieces = {
        "torch.empty (1, 4096) fp16": lambda: torch.empty(1, 4096, device=dev, dtype=torch.float16),
        "torch.empty (8, 1, 4096) fp32": lambda: torch.empty(8, 1, 4096, device=dev, dtype=torch.float32),
        "x.reshape(-1, K)": lambda: x.reshape(-1, K),
        "dispatch.use_triton": lambda: dispatch.use_triton(x, "w4a16"),
        "pdl.enabled": lambda: pdl.enabled(x.device),
        "w4a16._choose (tuned)": lambda: mod._choose(x, w, None, x.dtype),
        "torch.cuda.current_stream": lambda: torch.cuda.current_stream(),
    }
    for name, fn in pieces.items():
        res[name] = round(host_us(fn, calls), 2)
    for modname, kern_attr, call in ((mod, kname, lambda: w4.w4a16_linear(x, w)),
                                     (norm, "_rmsnorm_kernel", lambda: norm.rms_norm(h, nw, 1e-5, residual=h))):
        real = getattr(modname, kern_attr)
        stub = _Recorder(real, forward=False)
        setattr(modname, kern_attr, stub)
        try:
            res[f"{kern_attr}: our Python, launch stubbed"] = round(host_us(call, calls), 2)
        finally:
            setattr(modname, kern_attr, real)
        grid, args, kwargs = stub.last
        res[f"{kern_attr}: Triton JIT launch alone"] = round(host_us(lambda: real[grid](*args, **kwargs), calls), 2)
        try:  # the floor: the compiled kernel launched with its arguments already bound
            ck = real[grid](*args, **kwargs)
            full = _all_args(real, args, kwargs)
            launch = ck[tuple(grid) + (1,) * (3 - len(grid))]
            launch(*full)
            torch.cuda.synchronize()
            res[f"{kern_attr}: compiled kernel launched directly"] = round(host_us(lambda: launch(*full), calls), 2)
        except Exception as e:  # the CompiledKernel API differs on this Triton
            res[f"{kern_attr}: compiled kernel launched directly"] = f"failed: {e!r}"[:300]
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT") or str(Path(__file__).parent / "results"))
    ap.add_argument("--calls", type=int, default=300)
    args = ap.parse_args()
    dev = torch.device("cuda")
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "date": time.strftime("%Y-%m-%d"), "calls": args.calls, "rows": {}, "profiles": {}}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    fns = rows(dev)
    for on, tag in ((False, ""), (True, " (PDL)")):
        pdl.set_default(on)
        for name, fn in fns.items():
            if name.startswith("baseline") and on:
                continue
            key = f"{name}{tag}"
            res["rows"][key] = {"host_us": round(host_us(fn, args.calls), 2), "gpu_us": round(gpu_us(fn), 2)}
            print(f"{key:36s} host {res['rows'][key]['host_us']:8.2f} us   gpu {res['rows'][key]['gpu_us']:8.2f} us",
                  flush=True)
    pdl.set_default(True)
    for name in ("w4a16 M=1", "rms_norm+residual"):
        res["profiles"][name] = profile_text(fns[name], args.calls)
    res["breakdown_us"] = breakdown(dev, args.calls)
    print(json.dumps(res["breakdown_us"], indent=1))
    (out / "host_overhead.json").write_text(json.dumps(res, indent=1))
    for name, text in res["profiles"].items():
        print(f"--- cProfile, {args.calls} calls of {name} (PDL on) ---\n{text[:6000]}")
    print(f"{'call':36s} | host us/call | GPU us/call")
    for k, r in res["rows"].items():
        print(f"{k:36s} | {r['host_us']:12.2f} | {r['gpu_us']:10.2f}")


if __name__ == "__main__":
    main()
