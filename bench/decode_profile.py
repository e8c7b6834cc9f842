"""Where a batched decode step's GPU time goes: the captured decode graph of a synthetic Llama-2-7B replayed at
serving batch sizes and contexts, timed, profiled by kernel, and set against its byte floor.

    python bench/decode_profile.py --out results.json                      # GPU: w4a16_kv8, g64
    python bench/decode_profile.py --points 1x512,26x672,32x1024 --group 128

Per point (batch B, context C): every sequence at context C in its own blocks (distinct block ids, so the
attention reads B * C rows of KV from memory, not one cached block), positions C - 1, slots writing row C - 1.
Reported: graph replay ms per step (CUDA events, 50 replays), the floor (weight bytes + B * C * KV bytes per
token) / copy bandwidth, their ratio, and the kernels' GPU ms per step (torch.profiler, 10 replays), grouped by
kernel name. The same engine (Engine.from_workspace, CUDA graphs) the server runs.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import engine as eb  # noqa: E402  (bench/engine.py: workspace builder, byte counts, copy bandwidth)
from pipeline.engine import Engine  # noqa: E402


def fill(g, B: int, C: int, block_size: int) -> None:
    nb = -(-C // block_size)
    ids = torch.arange(B * nb, dtype=torch.int32, device="cuda").view(B, nb)
    g.block_tables.zero_()
    g.block_tables[:B, :nb].copy_(ids)
    g.context_lens[:B].fill_(C)
    g.positions[:B].fill_(C - 1)
    g.slots[:B].copy_(ids[:, -1].long() * block_size + (C - 1) % block_size)
    g.tokens[:B].fill_(1)


def point(eng, B: int, C: int, bw: float, wb: int, kvb: float, steps: int = 50) -> dict:
    from torch.profiler import ProfilerActivity, profile
    g = eng.graphs
    b, c = g.bucket(B), g.ctx_bucket(C)
    if (b, c) not in g.graphs:
        g._capture(b, c)
    fill(g, b, C, eng.block_size)
    graph = g.graphs[b, c]
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    for _ in range(steps):
        graph.replay()
    e1.record()
    torch.cuda.synchronize()
    ms = e0.elapsed_time(e1) / steps
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            graph.replay()
        torch.cuda.synchronize()
    by = {}
    for ev in prof.key_averages():
        t = getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0)
        if t and ev.key != "cudaGraphLaunch":
            by[ev.key[:80]] = round(t / 10 / 1e3, 4)
    floor_ms = (wb + B * C * kvb) / bw * 1e3
    return {"batch": B, "bucket": b, "context": C, "ctx_bucket": c, "replay_ms": round(ms, 3),
            "floor_ms": round(floor_ms, 3), "x_floor": round(ms / floor_ms, 2),
            "weight_ms_floor": round(wb / bw * 1e3, 3), "kv_ms_floor": round(B * C * kvb / bw * 1e3, 3),
            "tokens_per_s": round(B / ms * 1e3, 1), "kernel_sum_ms": round(sum(by.values()), 3),
            "kernels_ms": dict(sorted(by.items(), key=lambda kv: -kv[1])[:16])}


def attention_sweep(B: int, C: int, bw: float, bs: int = 64, H: int = 32, D: int = 128, only: str | None = None,
                    rounds: int = 3) -> dict:
    """One layer's int8 (static) decode attention at batch B, context C (distinct blocks): the launcher's default
    (MMA kernel), the CUDA-core kernel's default, both with the inline-PTX int8 conversion (`_asm`), and other
    splits / tile lengths / warps / stages; `only`: a comma list of variant names. Timing: per variant a CUDA graph
    of 20 launches, replayed 5 times per round, `rounds` rounds with the variants in turn (so drift hits each
    alike); us per call (the median round) and x the KV floor, plus each round's us."""
    from pipeline.kernels.attention import _launch
    nb = -(-C // bs)
    kc = torch.randint(-128, 127, (B * nb, H, bs, D), dtype=torch.int8, device="cuda")
    vc = torch.randint(-128, 127, (B * nb, H, bs, D), dtype=torch.int8, device="cuda")
    bt = torch.arange(B * nb, dtype=torch.int32, device="cuda").view(B, nb)
    cl = torch.full((B,), C, dtype=torch.int32, device="cuda")
    q = torch.randn(B, H, D, dtype=torch.float16, device="cuda")
    par = [torch.rand(H, device="cuda") * 0.02 for _ in range(4)]
    floor_us = 2 * B * C * H * D / bw * 1e6
    ctx_bucket = 1 << max(8, (C - 1).bit_length())
    out = {"batch": B, "context": C, "kv_floor_us": round(floor_us, 2), "rounds": rounds}
    variants = {"default": {}, "fma_default": dict(variant="fma"), "default_asm": dict(asm=True),
                "fma_default_asm": dict(variant="fma", asm=True)}
    for ns in (1, 2, 3, 4, 6):
        for bn in (64, 128):
            for nw, st in ((4, 2), (4, 3), (8, 2)):
                variants[f"s{ns}_bn{bn}_w{nw}_st{st}"] = dict(num_splits=ns, block_n=bn, num_warps=nw, num_stages=st)
    for ns in (1, 2, 4):   # the CUDA-core kernel for one query head per KV head (attention.py, variant "fma"):
        for bn, nw in ((16, 1), (16, 2), (32, 4), (64, 8)):   # tiles that compile without spills (ptxas, sm_90)
            variants[f"fma_s{ns}_bn{bn}_w{nw}"] = dict(variant="fma", num_splits=ns, block_n=bn, num_warps=nw)
    if only:
        unknown = set(only.split(",")) - set(variants)
        if unknown:
            raise SystemExit(f"--sweep-variants: unknown {sorted(unknown)}; known: {sorted(variants)}")
        variants = {k: v for k, v in variants.items() if k in only.split(",")}
    graphs = {}
    for name, kw in variants.items():
        fn = lambda kw=kw: _launch(q, kc, vc, bt, cl, D ** -0.5, "static", 8, *par, max_context_len=ctx_bucket, **kw)  # noqa
        try:
            fn()   # compile outside the capture
            torch.cuda.synchronize()
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                for _ in range(20):
                    fn()
            graphs[name] = g
        except Exception as e:  # noqa: BLE001 - a variant that does not compile is reported, not fatal
            out[name] = {"error": f"{type(e).__name__}: {e}"[:200]}
    times = {name: [] for name in graphs}
    for _ in range(rounds):
        for name, g in graphs.items():
            g.replay()
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
            for _ in range(5):
                g.replay()
            e1.record()
            torch.cuda.synchronize()
            times[name].append(e0.elapsed_time(e1) / 100 * 1e3)
    for name, ts in times.items():
        us = sorted(ts)[len(ts) // 2]
        out[name] = {"us": round(us, 2), "x_floor": round(us / floor_us, 2), "rounds_us": [round(t, 2) for t in ts]}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="decode_profile.json")
    ap.add_argument("--points", default="1x512,8x672,16x672,26x672,32x672,32x1024,32x2048")
    ap.add_argument("--group", type=int, default=64)
    ap.add_argument("--qp", type=int, default=4, help="quant_policy: 0 fp16 KV, 4 int8, 8 int4")
    ap.add_argument("--attention-sweep", default=None, help="BxC points (e.g. 32x672,8x672): only sweep one layer's "
                    "int8 decode attention launch settings there")
    ap.add_argument("--sweep-variants", default=None, help="only these sweep variants (comma list), e.g. "
                    "default,default_asm,fma_default,fma_default_asm")
    a = ap.parse_args()
    pts = [tuple(int(v) for v in p.split("x")) for p in a.points.split(",")]
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
           "model": "synthetic-llama2-7b", "group_size": a.group, "quant_policy": a.qp, "points": []}
    import triton
    res["triton"] = triton.__version__
    if a.attention_sweep:
        bw = eb.copy_bw()
        res["bandwidth_GBps"] = round(bw / 1e9, 1)
        res["attention_sweep"] = []
        for p in a.attention_sweep.split(","):
            r = attention_sweep(*(int(v) for v in p.split("x")), bw, only=a.sweep_variants)
            res["attention_sweep"].append(r)
            best = sorted(((k, v["us"]) for k, v in r.items() if isinstance(v, dict) and "us" in v), key=lambda kv: kv[1])
            print(p, "floor", r["kv_floor_us"], "default", r.get("default"), "best", best[:4], flush=True)
            Path(a.out).write_text(json.dumps(res, indent=1))
        return
    root = Path("/tmp/decode_profile")
    root.mkdir(parents=True, exist_ok=True)
    ws = eb.build_ws(root, eb.LLAMA7B, "w4", g=a.group)
    B = max(b for b, _ in pts)
    need = sum(-(-c // 64) for _, c in pts) + B * (-(-max(c for _, c in pts) // 64)) + 64
    eng = Engine.from_workspace(ws, "cuda", {"quant_policy": a.qp, "session_len": 4096, "max_batch_size": B,
                                             "num_blocks": need})
    res["bandwidth_GBps"] = round((bw := eb.copy_bw()) / 1e9, 1)
    wb, kvb = eb.weight_bytes(eng), eb.kv_bytes_per_token(eng)
    res.update(weight_bytes=wb, kv_bytes_per_token=kvb, block_size=eng.block_size)
    for B_, C in pts:
        r = point(eng, B_, C, bw, wb, kvb)
        r["gemm_tuning"] = eb.gemm_tuning(eng, r["bucket"])   # at the graph bucket's M
        res["points"].append(r)
        print(json.dumps(r), flush=True)
        Path(a.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
