"""Benchmark sections for decode and prefill attention, RMSNorm, SiLU-mul and rope_kv_write (registered in
bench/kernels.py).

    python bench/kernels.py --only attention_decode,attention_aux     # both sections, one GPU call
    python bench/kernels.py --only attention_prefill                  # BENCH_SWEEP=1: also a few tile configs
    python bench/kernels.py --only attention_decode --quick            # fewer shapes, smoke run
    BENCH_SWEEP=1 python bench/kernels.py --only attention_decode        # also time a few kernel configs
    BENCH_SPLITS=1 python bench/kernels.py --only attention_decode       # also the context split x block_n (B <= 16)

attention_decode: one query token per sequence, head_dim 128, paged KV (block 16, shuffled blocks):
ours fp16 / int8 / int4 (static per-head scales, and dynamic per-token scales) against
F.scaled_dot_product_attention on contiguous fp16 KV under the cuDNN and the flash backends, all in
one run, calls captured in CUDA graphs, small caches rotated through copies so L2 cannot serve them.
Roofline = the KV bytes (codes + scales) read once at the measured device-to-device copy bandwidth.
attention_aux: rms_norm (+residual), silu_mul, rope_kv_write against their byte floors and against
the same computation in eager PyTorch.
attention_prefill: one layer's prefill attention of a step's chunks (7B shapes: 32 query heads, 32 or 8 KV heads,
head_dim 128, the engine's 64-token cache blocks, shuffled; fp16 and static int8 KV; chunk layouts 1x2048, 4x512,
16x128 and 4x512 after 1024 cached tokens): the paged_prefill_attention kernel (one launch from a prebuilt plan)
against the engine's gather + SDPA path (ModelRunner._batch_plan / _batched_prefill_attention, or its per-chunk
loop where it does not batch), both eager and in CUDA graphs, caches rotated through copies; the error is against
paged_prefill_attention_ref (the tests' reference).
"""
from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F

from pipeline.kernels import attention, norm, prefill_attention, rope_kv

L2_DEFEAT_BYTES = 256 << 20
BLOCK = 16
D = 128


def _kb():
    import kernels  # bench/kernels.py: copy_bandwidth, time_calls (imported late: it imports this module)
    return kernels


def _copies(nbytes: int) -> int:
    return max(1, min(64, math.ceil(L2_DEFEAT_BYTES / nbytes)))


def _kv(fmt: str, num_blocks: int, n_kv: int, dev, block: int = BLOCK):
    """One paged K/V pair with its parameters: fmt in fp16, int8, int4, int8_dyn, int4_dyn."""
    bits = 16 if fmt == "fp16" else int(fmt[3])
    mode = "none" if bits == 16 else ("dynamic" if fmt.endswith("_dyn") else "static")
    shape = (num_blocks, n_kv, block, D // 2 if bits == 4 else D)
    if bits == 16:
        k, v = (torch.empty(shape, dtype=torch.float16, device=dev).normal_() for _ in range(2))
    else:
        lo, hi, dt = (-128, 128, torch.int8) if bits == 8 else (0, 256, torch.uint8)
        k, v = (torch.randint(lo, hi, shape, dtype=dt, device=dev) for _ in range(2))
    if mode == "static":
        p = {n: torch.rand(n_kv, device=dev) * 0.02 + 0.005 for n in ("k_scale", "v_scale")}
        p.update({n: torch.randn(n_kv, device=dev) * 0.1 for n in ("k_zp", "v_zp")})
    elif mode == "dynamic":
        p = {n: torch.rand(num_blocks, n_kv, block, device=dev) * 0.02 + 0.005 for n in ("k_scale", "v_scale")}
        p.update({n: torch.randn(num_blocks, n_kv, block, device=dev) * 0.1 for n in ("k_zp", "v_zp")})
    else:
        p = {}
    nbytes = 2 * k.numel() * k.element_size() + sum(t.numel() * 4 for t in p.values())
    return dict(k=k, v=v, mode=mode, bits=bits, params=p, bytes=nbytes)


def _sdpa(backend):
    from torch.nn.attention import sdpa_kernel

    def run(q4, k, v, scale, gqa):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q4, k, v, scale=scale, enable_gqa=gqa)
    return run


def bench_attention_decode(args) -> dict:
    from torch.nn.attention import SDPBackend
    kb = _kb()
    dev = torch.device("cuda")
    bw = kb.copy_bandwidth()
    heads = [(32, 32), (32, 8)]
    ctxs = [4096] if args.quick else [4096, 16384]
    batches = [1, 16] if args.quick else [1, 16, 64]
    fmts = ["fp16", "int8", "int4", "int8_dyn", "int4_dyn"]
    sweep = os.environ.get("BENCH_SWEEP") == "1"
    variants = [(bn, w, s) for bn in (64, 128) for w in (4, 8) for s in (2, 3)] if sweep else []
    # BENCH_SPLITS=1: the context split's programs per SM (attention.WAVES) x block_n, B <= 16, fp16/int8
    splits = [(wv, bn) for wv in (3, 6, 12) for bn in (64, 128)] if os.environ.get("BENCH_SPLITS") == "1" else []
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
           "triton": __import__("triton").__version__, "copy_bw_GBps": bw / 1e9, "head_dim": D,
           "block_size": BLOCK, "timing": "CUDA graph replay, median of 7, L2 defeated by rotating copies",
           "rows": [], "notes": []}
    sdpa = {"cudnn": _sdpa(SDPBackend.CUDNN_ATTENTION), "flash": _sdpa(SDPBackend.FLASH_ATTENTION)}
    for H, n_kv in heads:
        for ctx in ctxs:
            for B in batches:
                torch.manual_seed(B * ctx + H + n_kv)
                nb = ctx // BLOCK
                num_blocks = B * nb
                tables = torch.randperm(num_blocks, device=dev).view(B, nb).int()
                lens = torch.full((B,), ctx, dtype=torch.int32, device=dev)
                q = torch.randn(B, H, D, device=dev, dtype=torch.float16)
                scale = D ** -0.5
                row = {"H": H, "n_kv": n_kv, "ctx": ctx, "B": B, "us": {}, "roof_us": {}, "err": {}}
                fp16_bytes = 2 * B * ctx * n_kv * D * 2
                # contiguous fp16 peers
                kc = torch.empty(B, n_kv, ctx, D, device=dev, dtype=torch.float16).normal_()
                vc = torch.empty_like(kc).normal_()
                ncp = _copies(fp16_bytes)
                kvs = [(kc, vc)] + [(kc.clone(), vc.clone()) for _ in range(ncp - 1)]
                q4 = q[:, :, None, :]
                for name, fn in sdpa.items():
                    try:
                        fn(q4, kc, vc, scale, H != n_kv)
                        row["us"][name] = 1e6 * kb.time_calls(
                            [lambda k=k, v=v, fn=fn: fn(q4, k, v, scale, H != n_kv) for k, v in kvs], graph=True)
                    except Exception as e:
                        res["notes"].append(f"sdpa {name} H={H}/{n_kv} ctx={ctx} B={B}: {e!r}"[:240])
                del kvs, kc, vc
                row["roof_us"]["fp16"] = 1e6 * fp16_bytes / bw
                for fmt in fmts:
                    kv0 = _kv(fmt, num_blocks, n_kv, dev)
                    ncp = _copies(kv0["bytes"])
                    kvl = [kv0] + [_kv(fmt, num_blocks, n_kv, dev) for _ in range(ncp - 1)]
                    row["roof_us"][fmt] = 1e6 * kv0["bytes"] / bw

                    def call(kv, **kw):
                        return attention._launch(q, kv["k"], kv["v"], tables, lens, scale, kv["mode"], kv["bits"],
                                                 **kv["params"], max_context_len=ctx, **kw)
                    out = call(kv0)
                    if B <= 16:  # spot check against the reference (first sequences)
                        n = min(B, 4)
                        ref = attention.paged_decode_attention_ref(q[:n], kv0["k"], kv0["v"], tables[:n], lens[:n],
                                                                   scale, kv0["mode"], kv0["bits"], **kv0["params"])
                        row["err"][fmt] = kb.rel_err(out[:n], ref.double())
                    row["us"][fmt] = 1e6 * kb.time_calls([lambda kv=kv: call(kv) for kv in kvl], graph=True)
                    if fmt == "int8":
                        row["us"]["int8_eager"] = 1e6 * kb.time_calls([lambda kv=kv: call(kv) for kv in kvl],
                                                                      graph=False)
                    swept = fmt in ("fp16", "int8", "int4") and B in (1, 64) and ctx == max(ctxs)
                    for wv, bn in splits if fmt in ("fp16", "int8") and B <= 16 else []:
                        key = f"{fmt}_waves{wv}_bn{bn}"
                        row["us"][key] = 1e6 * kb.time_calls(
                            [lambda kv=kv: call(kv, block_n=bn, waves=wv) for kv in kvl], graph=True)
                    for bn, w, s in variants if swept else []:
                        key = f"{fmt}_bn{bn}_w{w}_s{s}"
                        try:
                            row["us"][key] = 1e6 * kb.time_calls(
                                [lambda kv=kv: call(kv, block_n=bn, num_warps=w, num_stages=s) for kv in kvl],
                                graph=True)
                        except Exception as e:
                            res["notes"].append(f"{key}: {e!r}"[:200])
                    del kvl, kv0
                    torch.cuda.empty_cache()
                res["rows"].append(row)
                us, rf = row["us"], row["roof_us"]
                print(f"H={H}/{n_kv} ctx={ctx} B={B}: " + ", ".join(f"{k}={v:.1f}" for k, v in us.items()
                                                                    if "_bn" not in k), flush=True)
                for k in sorted(k for k in us if "_waves" in k):
                    print(f"    {k}: {us[k]:.1f} us = {us[k] / rf[k.split('_waves')[0]]:.2f}x", flush=True)
    lines = [f"Decode attention, head_dim {D}, paged block {BLOCK}, {res['device']}, copy {bw / 1e9:.0f} GB/s; "
             "x = time / own KV-bytes roofline (cudnn, flash: fp16 roofline)",
             "H/kv  |   ctx |  B | cudnn x | flash x | fp16 x | int8 x | int4 x | i8dyn x | int8/fp16 | int8/cudnn"]
    for r in res["rows"]:
        us, rf = r["us"], r["roof_us"]

        def x(k, roof=None):
            return f"{us[k] / rf[roof or k]:6.2f}x" if k in us else "     - "
        sp = f"{us['fp16'] / us['int8']:5.2f}x" if "int8" in us else "-"
        sc = f"{us['cudnn'] / us['int8']:5.2f}x" if "cudnn" in us and "int8" in us else "   -  "
        lines.append(f"{r['H']:2}/{r['n_kv']:<2} | {r['ctx']:5} | {r['B']:2} | {x('cudnn', 'fp16')} | "
                     f"{x('flash', 'fp16')} | {x('fp16')} | {x('int8')} | {x('int4')} | {x('int8_dyn')}  | "
                     f"  {sp}   |   {sc}")
    res["table"] = lines
    return res


def bench_attention_aux(args) -> dict:
    kb = _kb()
    dev = torch.device("cuda")
    bw = kb.copy_bandwidth()
    res = {"device": torch.cuda.get_device_name(), "copy_bw_GBps": bw / 1e9, "rows": [], "notes": []}
    dt = torch.float16

    def add(kernel, shape, nbytes, ours, torch_fns):
        row = {"kernel": kernel, "shape": shape, "bytes": nbytes, "floor_us": 1e6 * nbytes / bw,
               "ours_us": 1e6 * kb.time_calls(ours, graph=True),
               "ours_eager_us": 1e6 * kb.time_calls(ours, graph=False),
               "torch_eager_us": 1e6 * kb.time_calls(torch_fns, graph=False)}
        res["rows"].append(row)
        print(f"{kernel} {shape}: ours {row['ours_us']:.2f} us (eager {row['ours_eager_us']:.2f}), "
              f"torch eager {row['torch_eager_us']:.2f} us, floor {row['floor_us']:.2f} us", flush=True)

    for T, N in [(1, 4096), (64, 4096), (2048, 4096), (2048, 8192)]:
        nbytes = 5 * T * N * 2 + N * 2  # read x, residual, weight; write y, new residual
        xs = [(torch.randn(T, N, device=dev, dtype=dt), torch.randn(T, N, device=dev, dtype=dt))
              for _ in range(_copies(nbytes))]
        w = torch.rand(N, device=dev, dtype=dt)
        got, ref = norm._launch_rms_norm(xs[0][0], w, 1e-5, xs[0][1]), norm.rms_norm_ref(xs[0][0], w, 1e-5, xs[0][1])
        res["notes"].append(f"rms_norm T={T} N={N}: rel err {kb.rel_err(got[0], ref[0].double()):.1e}")
        add("rms_norm+residual", [T, N], nbytes, [lambda a=a, b=b: norm._launch_rms_norm(a, w, 1e-5, b) for a, b in xs],
            [lambda a=a, b=b: norm.rms_norm_ref(a, w, 1e-5, b) for a, b in xs])
    for T, N in [(1, 11008), (64, 11008), (2048, 11008)]:
        nbytes = 3 * T * N * 2  # read gate and up, write the product
        xs = [torch.randn(T, 2 * N, device=dev, dtype=dt) for _ in range(_copies(nbytes))]
        add("silu_mul", [T, N], nbytes, [lambda a=a: norm._launch_silu_mul(a) for a in xs],
            [lambda a=a: norm.silu_mul_ref(a) for a in xs])
    inv = 1.0 / 10000.0 ** (torch.arange(0, D, 2, device=dev).float() / D)
    freqs = torch.outer(torch.arange(32768, device=dev).float(), inv)
    cos, sin = freqs.cos(), freqs.sin()
    for T, H, n_kv in [(1, 32, 8), (64, 32, 32), (64, 32, 8), (2048, 32, 8), (2048, 32, 32)]:
        nbytes = T * (H + 2 * n_kv) * D * 2 + T * H * D * 2 + T * 2 * n_kv * D + T * D * 4  # q,k,v in; q out; int8 K,V; cos,sin
        num_blocks = T // BLOCK + 8
        inputs = []
        for _ in range(_copies(nbytes)):
            qkv = [torch.randn(T, h, D, device=dev, dtype=dt) for h in (H, n_kv, n_kv)]
            caches = [torch.empty(num_blocks, n_kv, BLOCK, D, device=dev, dtype=torch.int8) for _ in range(2)]
            slots = torch.randperm(num_blocks * BLOCK, device=dev)[:T]
            pos = torch.randint(0, cos.shape[0], (T,), device=dev)
            inputs.append((qkv, caches, slots, pos))
        p = {n: torch.rand(n_kv, device=dev) * 0.05 + 0.01 for n in ("k_scale", "v_scale")}
        p.update({n: torch.zeros(n_kv, device=dev) for n in ("k_zp", "v_zp")})

        def fn(launch, i, **kw):
            (q, k, v), (kc, vc), slots, pos = i
            return lambda: launch(q, k, v, pos, cos, sin, kc, vc, slots, "static", 8, **p, **kw)
        add(f"rope_kv_write int8 H={H}/{n_kv}", [T, H, n_kv, D], nbytes,
            [fn(rope_kv._launch, i) for i in inputs], [fn(rope_kv.rope_kv_write_ref, i) for i in inputs])
        if T >= rope_kv.PROGRAMS:  # the same call in the decode layout (one program per token, every head, 4 warps)
            add(f"rope_kv_write int8 H={H}/{n_kv}, one program per token", [T, H, n_kv, D], nbytes,
                [fn(rope_kv._launch, i, chunks=1) for i in inputs], [fn(rope_kv.rope_kv_write_ref, i) for i in inputs])
    lines = [f"RMSNorm / SiLU-mul / rope_kv_write, fp16, {res['device']}; x = time / byte floor at copy bandwidth",
             "kernel                         | shape              | ours us (graph) | x floor | ours eager | torch eager us"]
    for r in res["rows"]:
        lines.append(f"{r['kernel']:30} | {str(r['shape']):18} | {r['ours_us']:15.2f} | "
                     f"{r['ours_us'] / r['floor_us']:6.2f}x | {r['ours_eager_us']:10.2f} | {r['torch_eager_us']:8.2f}")
    res["table"] = lines
    return res


PREFILL_BLOCK = 64         # the engine's default cache block (cache_block_seq_len)
PREFILL_MAX_BLOCKS = 64    # block tables' length: session_len 4096
PREFILL_LAYOUTS = {"1x2048": ([2048], 0), "4x512": ([512] * 4, 0), "16x128": ([128] * 16, 0),
                   "4x512+1024": ([512] * 4, 1024)}  # name: (chunk lengths, tokens already cached per sequence)


def _sdpa_prefill(H: int, n_kv: int, kv: dict):
    """The engine's gather + SDPA prefill attention over one layer's cache `kv`: a ModelRunner without weights."""
    from types import SimpleNamespace
    from pipeline.engine.model import ModelRunner
    r = ModelRunner.__new__(ModelRunner)
    r.args = SimpleNamespace(n_heads=H, n_kv_heads=n_kv, head_dim=D)
    r.k_cache, r.v_cache = [kv["k"]], [kv["v"]]
    r.kv = [{"kv_mode": kv["mode"], "kv_bits": kv["bits"], **kv["params"]}]
    r.kv_mode, r.kv_bits, r.dtype = kv["mode"], kv["bits"], torch.float16
    r.block_size, r.batched_prefill, r.scale = PREFILL_BLOCK, True, D ** -0.5
    return r


def bench_attention_prefill(args) -> dict:
    kb = _kb()
    dev = torch.device("cuda")
    heads = [(32, 8)] if args.quick else [(32, 32), (32, 8)]
    sweep = [(64, 4, 2), (64, 4, 3), (128, 8, 2), (128, 8, 3), (128, 4, 2)] if os.environ.get("BENCH_SWEEP") == "1" \
        else []
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
           "triton": __import__("triton").__version__, "head_dim": D, "block_size": PREFILL_BLOCK,
           "timing": "one layer; median of 7; graph: CUDA graph replay, eager: plain launches (host included); "
                     "ours from a plan built beforehand, sdpa from the engine's per-step index tensors",
           "rows": [], "notes": []}
    scale = D ** -0.5
    for H, n_kv in heads:
        for fmt in ("fp16", "int8"):
            for name, (ns, prior) in PREFILL_LAYOUTS.items():
                torch.manual_seed(len(ns) * 7 + prior + H + n_kv)
                ctxs = [prior + n for n in ns]
                need = [-(-c // PREFILL_BLOCK) for c in ctxs]
                num_blocks = sum(need) + 8
                perm = torch.randperm(num_blocks)
                seqs, off, used = [], 0, 0
                for n, ctx, nb in zip(ns, ctxs, need):
                    bt = torch.zeros(PREFILL_MAX_BLOCKS, dtype=torch.int32)
                    bt[:nb] = perm[used:used + nb].int()
                    seqs.append((off, n, bt, ctx))
                    off, used = off + n, used + nb
                T = off
                q = torch.randn(T, H, D, device=dev, dtype=torch.float16)
                out = torch.empty_like(q)
                kv0 = _kv(fmt, num_blocks, n_kv, dev, PREFILL_BLOCK)
                kvl = [kv0] + [_kv(fmt, num_blocks, n_kv, dev, PREFILL_BLOCK) for _ in range(_copies(kv0["bytes"]) - 1)]
                keys = sum(ctx - n + i + 1 for n, ctx in zip(ns, ctxs) for i in range(n))
                row = {"H": H, "n_kv": n_kv, "fmt": fmt, "layout": name, "T": T, "flop": 4 * H * D * keys,
                       "us": {}, "err": {}}

                def ours(kv, plan, **kw):
                    return prefill_attention._launch(q, kv["k"], kv["v"], None, scale, kv["mode"], kv["bits"],
                                                     **kv["params"], plan=plan, out=out, **kw)
                plan = prefill_attention.prefill_plan(seqs, H, n_kv, D, n_tokens=T, device=dev)
                ref = prefill_attention.paged_prefill_attention_ref(q, kv0["k"], kv0["v"], seqs, scale, kv0["mode"],
                                                                    kv0["bits"], **kv0["params"])
                row["err"]["ours"] = kb.rel_err(ours(kv0, plan), ref.double())
                for graph in (True, False):
                    key = "ours" if graph else "ours_eager"
                    row["us"][key] = 1e6 * kb.time_calls([lambda kv=kv: ours(kv, plan) for kv in kvl], graph=graph)
                for bm, w, st in sweep:
                    p = prefill_attention.prefill_plan(seqs, H, n_kv, D, n_tokens=T, block_m=bm, device=dev)
                    row["us"][f"ours_m{bm}_w{w}_s{st}"] = 1e6 * kb.time_calls(
                        [lambda kv=kv: ours(kv, p, num_warps=w, num_stages=st) for kv in kvl], graph=True)
                # the engine's path: index tensors once per step (host), then the per-layer gather + SDPA
                runners = [_sdpa_prefill(H, n_kv, kv) for kv in kvl]
                batched = runners[0]._batch_plan(seqs, dev)
                rows = None if batched is not None else [attention.kv_rows(bt.to(dev), ctx, PREFILL_BLOCK)
                                                         for _, _, bt, ctx in seqs]

                def sdpa(r):
                    if batched is not None:
                        return r._batched_prefill_attention(0, q, batched)
                    return r._looped_prefill_attention(0, q, seqs, rows)
                row["err"]["sdpa"] = kb.rel_err(sdpa(runners[0]), ref.double())
                row["sdpa_path"] = "batched" if batched is not None else "per chunk"
                for graph in (False, True):
                    key = "sdpa_graph" if graph else "sdpa"
                    try:
                        row["us"][key] = 1e6 * kb.time_calls([lambda r=r: sdpa(r) for r in runners], graph=graph)
                    except Exception as e:
                        res["notes"].append(f"{key} H={H}/{n_kv} {fmt} {name}: {e!r}"[:240])
                res["rows"].append(row)
                us = row["us"]
                print(f"H={H}/{n_kv} {fmt} {name}: " + ", ".join(f"{k}={v:.1f}" for k, v in us.items()) +
                      f" us; ours {row['flop'] / us['ours'] / 1e6:.0f} TFLOP/s; err {row['err']}", flush=True)
                del kvl, kv0, runners, batched, rows
                torch.cuda.empty_cache()
    lines = [f"Prefill attention (one layer), head_dim {D}, paged block {PREFILL_BLOCK}, {res['device']}; "
             "us per call; x = sdpa path / ours",
             "H/kv  | KV   | layout     |     T | ours graph | TFLOP/s | ours eager | sdpa eager | sdpa graph | "
             "x eager | x graph"]
    for r in res["rows"]:
        us = r["us"]

        def t(k):
            return f"{us[k]:10.1f}" if k in us else "         -"

        def x(a, b):
            return f"{us[a] / us[b]:6.2f}x" if a in us and b in us else "      -"
        lines.append(f"{r['H']:2}/{r['n_kv']:<2} | {r['fmt']:4} | {r['layout']:10} | {r['T']:5} | {t('ours')} | "
                     f"{r['flop'] / us['ours'] / 1e6:7.0f} | {t('ours_eager')} | {t('sdpa')} | {t('sdpa_graph')} | "
                     f"{x('sdpa', 'ours_eager')} | {x('sdpa_graph', 'ours')}")
        for k in sorted(k for k in us if k.startswith("ours_m")):
            lines.append(f"      {k}: {us[k]:.1f} us = {us[k] / us['ours']:.2f}x the default")
    res["table"] = lines
    return res


SECTIONS = {"attention_decode": bench_attention_decode, "attention_aux": bench_attention_aux,
            "attention_prefill": bench_attention_prefill}
