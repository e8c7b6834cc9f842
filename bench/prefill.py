"""Engine prefill speed: prompt tokens/s of one prefill step, synthetic Llama-2-7B (random int4 weights), one GPU.

    python bench/prefill.py                      # w4a16 and w4a16_kv8, four chunk layouts, writes prefill.json
    python bench/prefill.py --out DIR --rows w4a16
    python bench/prefill.py --ablate-batching    # also the per-chunk attention loop, same run
    python bench/prefill.py --dry-run            # CPU, tiny shapes: the same code paths, no meaningful times

A prefill step is `ModelRunner.prefill` on one batch of prompt chunks (what `Engine._prefill` sends), timed with the
GPU synchronised before and after (median of --reps after one untimed call that tunes the GEMMs). Layouts:
1x512 and 1x2048 (one whole prompt), 4x512, 16x128 (several whole prompts) and 2x1024+1024 (two second chunks: 1024 new
tokens each after 1024 cached ones, the masked attention path). Baselines measured in the same run:
- fp16 linears: the same step's seven linears per layer plus the lm_head rows as fp16 cuBLAS `F.linear` at the
  same M, i.e. what the matmuls alone cost a dense fp16 model (the step can only beat it where int4 GEMMs do);
- FLOP floor: matmul + attention FLOPs over the fp16 cuBLAS TFLOP/s of the M = T (4096 x 11008) product.
Per layout also the host's time to enqueue the step (near the step's time: launch-bound), the step as one CUDA-graph
launch where the engine's prefill graphs take it (`graph_ms`, what serving runs) and, for whole prompts, the
same prompts through `Engine.generate` with one new token (a time to first token without HTTP).
Two mixed layouts (serving's steps with decoders as one-token chunks): a prefix-workload arrival's step and its 26
decoders alone. Then one step of the 4x512 layout and one of the prefix arrival's under torch.profiler: the top kernels by GPU time, the GPU busy time and the
wall time (their difference is time the GPU waited for the host). Writes <out>/prefill.json after every row (a run
cut off by a time limit keeps what it measured) and prints a table last. About 3 minutes on an H100 for both rows.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import engine as eb  # noqa: E402  (bench/engine.py: workspace builders, shapes)
from pipeline.engine import Engine, SamplingParams  # noqa: E402

LAYOUTS = {"1x512": [(512, 512)], "1x2048": [(2048, 2048)], "4x512": [(512, 512)] * 4, "16x128": [(128, 128)] * 16,
           "2x1024+1024": [(1024, 2048)] * 2,   # (new tokens n, context after the chunk)
           # serving's mixed steps (decoders ride along as one-token chunks): a prefix-workload arrival, 160 question
           # tokens past a cached 1,024-token prefix, beside 26 decoders at context 700, and those decoders alone
           "mix160+1024_26x700": [(160, 1184)] + [(1, 700)] * 26, "26x700": [(1, 700)] * 26}
ROWS = {"w4a16": 0, "w4a16_kv8": 4, "w4a16_kv8_fullcache": 4}  # row -> quant_policy
# rows whose engine sizes its KV cache like the server does (cache_max_entry_count of the free memory), not just
# what the layouts need: shows whether a nearly full device changes the step (allocator retries, cudaMalloc/Free)
FULL_CACHE = {"w4a16_kv8_fullcache"}


def step_inputs(eng: Engine, layout, seed: int = 0, host: bool = False):
    """Tokens, positions, slots, per-sequence meta and the rows whose logits a real step would sample: device
    tensors for `ModelRunner.prefill`, or (host=True) the host lists and tables `PrefillGraphs.run` takes."""
    bs, dev = eng.block_size, eng.runner.device
    gen = torch.Generator().manual_seed(seed)
    tokens, positions, slots, meta, select = [], [], [], [], []
    next_block = 0
    for n, ctx in layout:
        nb = -(-ctx // bs)
        blocks = list(range(next_block, next_block + nb))
        next_block += nb
        meta.append((len(tokens), n, eng._host_table(blocks) if host else eng._table(blocks), ctx))
        tokens += torch.randint(0, eng.runner.args.vocab_size, (n,), generator=gen).tolist()
        positions += list(range(ctx - n, ctx))
        slots += [eng._slot(blocks, p) for p in range(ctx - n, ctx)]
        select.append(len(tokens) - 1)
    if host:
        return tokens, positions, slots, meta, select
    t, p, s = eng._dev(tokens, positions, slots)
    return t, p, s, meta, torch.tensor(select, dtype=torch.long, device=dev)


def timed(fn, reps: int) -> float:
    fn()
    eb.sync()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        eb.sync()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def enqueue_s(fn, reps: int) -> float:
    """Host seconds until `fn` returns, GPU idle at the start (its kernels queued, not finished): when this is
    close to the synchronised time, the step is bound by the host issuing launches, not by the GPU."""
    ts = []
    for _ in range(reps):
        eb.sync()
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
        eb.sync()
    return statistics.median(ts)


def alloc_stats() -> dict:
    """Counters of the CUDA caching allocator (zeros on a CPU)."""
    st = torch.cuda.memory_stats() if eb.DEV == "cuda" else {}
    return {k: st.get(k, 0) for k in ("num_alloc_retries", "num_device_alloc", "num_device_free")}


def engine_s(eng: Engine, layout, reps: int) -> float:
    """Seconds of `Engine.generate` answering one token for whole prompts of this layout (the engine's own
    scheduling, host lists, prefill, sampling and detokenisation: a time-to-first-token without HTTP)."""
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, eng.runner.args.vocab_size, (n,), generator=gen).tolist() for n, _ in layout]
    params = SamplingParams(max_new_tokens=1, ignore_eos=True)
    return timed(lambda: eng.generate(prompts, params), reps)


def flops(args, layout) -> float:
    """Matmul FLOPs of the decoder linears and the selected lm_head rows, plus attention (causal where n = ctx)."""
    per_token = sum(2 * N * K for N, K in eb.linear_shapes(args).values()) * args.n_layers
    T = sum(n for n, _ in layout)
    attn = 0.0
    for n, ctx in layout:
        pairs = n * (n + 1) / 2 if n == ctx else n * (ctx - n) + n * (n + 1) / 2  # (query, key) pairs attended
        attn += 4 * pairs * args.n_heads * args.head_dim * args.n_layers
    return per_token * T + attn + 2 * len(layout) * args.dim * args.vocab_size


def fp16_linears_s(args, T: int, n_sel: int, reps: int) -> float:
    """One layer's seven linears at M = T in fp16 cuBLAS, times the layer count, plus the lm_head rows."""
    x = {K: torch.randn(T, K, device=eb.DEV, dtype=torch.float16) for _, K in eb.linear_shapes(args).values()}
    ws = {n: torch.randn(N, K, device=eb.DEV, dtype=torch.float16) * K ** -0.5
          for n, (N, K) in eb.linear_shapes(args).items()}
    head = torch.randn(args.vocab_size, args.dim, device=eb.DEV, dtype=torch.float16)
    layer = timed(lambda: [F.linear(x[w.shape[1]], w) for w in ws.values()], reps)
    lm = timed(lambda: F.linear(x[args.dim][:n_sel], head), reps)
    return layer * args.n_layers + lm


def cublas_tflops(T: int, reps: int) -> float:
    a = torch.randn(T, 4096, device=eb.DEV, dtype=torch.float16)
    b = torch.randn(11008, 4096, device=eb.DEV, dtype=torch.float16)
    return 2 * T * 4096 * 11008 / timed(lambda: F.linear(a, b), reps) / 1e12


def profile_step(eng: Engine, inputs) -> dict:
    from torch.profiler import ProfilerActivity, profile as tprofile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if eb.DEV == "cuda" else [])
    eb.sync()
    t0 = time.perf_counter()
    with tprofile(activities=acts) as prof:
        eng.runner.prefill(*inputs)
        eb.sync()
    wall = time.perf_counter() - t0
    by = {}
    for ev in prof.key_averages():
        t = getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0)
        if t and ev.device_type.name == "CUDA":
            by[ev.key[:70]] = (by.get(ev.key[:70], (0, 0))[0] + t / 1e3, ev.count)
    busy = sum(t for t, _ in by.values())
    top = {k: {"ms": round(t, 3), "calls": c} for k, (t, c) in sorted(by.items(), key=lambda kv: -kv[1][0])[:14]}
    return {"wall_ms_under_profiler": round(wall * 1e3, 2), "gpu_kernel_ms": round(busy, 2),
            "kernel_launches": sum(c for _, c in by.values()), "top_kernels": top}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT") or str(Path(__file__).parent / "results"))
    ap.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated of {list(ROWS)}")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--ablate-batching", action="store_true",
                    help="also time multi-chunk layouts with one attention call per chunk (the engine's loop)")
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, chunks of 1/4 the length")
    a = ap.parse_args()
    rows = a.rows.split(",")
    for r in rows:
        if r not in ROWS:
            ap.error(f"--rows {r!r}: must be one of {list(ROWS)}")
    layouts = LAYOUTS
    if a.dry_run:
        eb.DEV, a.reps = "cpu", 1
        layouts = {k: [(max(1, n // 16), c // 16) for n, c in v] for k, v in LAYOUTS.items()}
    args = eb.TINY if a.dry_run else eb.LLAMA7B
    res = {"device": torch.cuda.get_device_name() if eb.DEV == "cuda" else "cpu (dry run)", "torch": torch.__version__,
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "model": "tiny" if a.dry_run else "synthetic-llama2-7b", "layouts": layouts, "rows": {}, "baselines": {}}
    outp = Path(a.out)
    outp.mkdir(parents=True, exist_ok=True)
    save = lambda: (outp / "prefill.json").write_text(json.dumps(res, indent=1))  # noqa: E731  after every row
    t_start = time.time()
    root = Path("/tmp/prefillbench")
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    ws = eb.build_ws(root, args, "w4")
    print(f"workspace built in {time.time() - t_start:.0f} s", flush=True)
    for L, layout in layouts.items():
        T = sum(n for n, _ in layout)
        fp16 = fp16_linears_s(args, T, len(layout), a.reps)
        res["baselines"][L] = {"tokens": T, "fp16_linears_ms": round(fp16 * 1e3, 2),
                               "cublas_tflops": float(f"{cublas_tflops(T, a.reps):.4g}"), "flops": flops(args, layout)}
        print(L, res["baselines"][L], flush=True)
    save()
    for row in rows:
        need = max(sum(c for _, c in layout) for layout in layouts.values())  # tokens cached at once, at most
        sizing = {} if row in FULL_CACHE else {"num_blocks": need // 16 + 32}  # blocks of >= 16 tokens
        eng = Engine.from_workspace(ws, eb.DEV, {"quant_policy": ROWS[row], "session_len": 4096, "max_batch_size": 32,
                                                 **sizing})   # the server's batch: its prefill graphs take 32 chunks
        mem0 = alloc_stats()
        out = {}
        for L, layout in layouts.items():
            T = sum(n for n, _ in layout)
            inputs = step_inputs(eng, layout)
            s = timed(lambda: eng.runner.prefill(*inputs), a.reps)
            b = res["baselines"][L]
            out[L] = {"ms": round(s * 1e3, 2), "tokens_per_s": round(b["tokens"] / s),
                      "x_fp16_linears": round(s * 1e3 / b["fp16_linears_ms"], 2),
                      "of_flop_floor": round(b["flops"] / (b["cublas_tflops"] * 1e12) / s, 3),
                      "host_enqueue_ms": round(enqueue_s(lambda: eng.runner.prefill(*inputs), a.reps) * 1e3, 2)}
            pg = eng.prefill_graphs   # the step as the engine runs it where it fits: one CUDA-graph launch
            if pg is not None and pg.fits(T, len(layout)):
                hin = step_inputs(eng, layout, host=True)
                out[L]["graph_ms"] = round(timed(lambda: pg.run(*hin), a.reps) * 1e3, 2)
            if all(n == c for n, c in layout):  # whole prompts: the same step through Engine.generate
                out[L]["engine_generate_ms"] = round(engine_s(eng, layout, a.reps) * 1e3, 2)
                if row in FULL_CACHE:  # and with the engine stepping in its own thread, as the server runs it
                    eng.start()
                    out[L]["engine_thread_ms"] = round(engine_s(eng, layout, a.reps) * 1e3, 2)
                    eng.stop()
            if a.ablate_batching and len(layout) > 1:  # the same step with one attention call per chunk
                eng.runner.batched_prefill = False
                loop = timed(lambda: eng.runner.prefill(*inputs), a.reps)
                eng.runner.batched_prefill = True
                out[L]["per_chunk_attention_ms"] = round(loop * 1e3, 2)
            print(row, L, out[L], flush=True)
            res["rows"][row] = out
            save()
        mem1 = alloc_stats()
        out["kv_cache_tokens"] = eng.blocks.num_blocks * eng.block_size
        out["allocator_during_row"] = {k: mem1[k] - mem0[k] for k in mem0}   # cudaMalloc/cudaFree calls, retries
        out["profile_4x512"] = profile_step(eng, step_inputs(eng, layouts["4x512"]))
        out["profile_mix160+1024_26x700"] = profile_step(eng, step_inputs(eng, layouts["mix160+1024_26x700"]))
        save()
        del eng
        eb.free()
    shutil.rmtree(root, ignore_errors=True)
    res["seconds"] = round(time.time() - t_start, 1)
    save()
    print(json.dumps({r: v["profile_4x512"] for r, v in res["rows"].items()}, indent=1))
    for r, v in res["rows"].items():
        print(f"{r}: KV cache {v['kv_cache_tokens']} tokens, allocator during the row {v['allocator_during_row']}")
    print(f"{'row':10s} {'layout':18s} {'ms':>8s} {'tok/s':>8s} {'x fp16 linears':>15s} {'of FLOP floor':>14s} "
          f"{'host enqueue ms':>16s} {'graph ms':>9s} {'engine ms':>10s}")
    nan = float("nan")
    for row, v in res["rows"].items():
        for L in layouts:
            r = v[L]
            print(f"{row:10s} {L:18s} {r['ms']:8.2f} {r['tokens_per_s']:8d} {r['x_fp16_linears']:15.2f} "
                  f"{r['of_flop_floor']:14.3f} {r['host_enqueue_ms']:16.2f} {r.get('graph_ms', nan):9.2f} "
                  f"{r.get('engine_generate_ms', nan):10.2f}")


if __name__ == "__main__":
    main()
