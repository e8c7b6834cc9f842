"""Where the W4A16 decode GEMM's time goes: every decode config against its floors, one GPU run.

    python bench/w4a16_decode.py                         # M = 1, 4, 16 on the four Llama-2-7B linears
    python bench/w4a16_decode.py --ms 1 --configs wide_n64_s4_h2,gemv_n32_c8_sl
    python bench/w4a16_decode.py --ncu wide_n64_s4_h2    # a few launches of one config, for `ncu`
    python bench/w4a16_decode.py --ms 64,256 --pdl off --no-floors --cublas   # tile configs beside fp16 cuBLAS

Per linear (K, N), fp16 activations, group 128 (--group), L2 defeated by rotating weight copies, calls replayed in
one CUDA graph (bench/kernels.py's timing):
- roofline: int4 weights + fp16 scale and zero read once at the measured copy bandwidth;
- launch floor: an empty Triton kernel with the same grid as a `wide` config (graph launch + drain);
- stream floors: Triton kernels that only read the same bytes and write a few values, no arithmetic:
  (KS, P, BN) tiles like the `wide` kernel on the (K//8, N) layout, with and without the scale/zero loads
  (`nosz`), with scale and zero as one int32 pair per (group, column) in a separate array (`sz32`) or in a
  row right after each group's codes (`slab`), on a column-blocked copy (each tile one contiguous run), and
  1-D contiguous blocks (`flat`);
- every config in `w4a16.candidates(M)` (rel err against an fp64 reference checked first), with programmatic
  dependent launch off and on (`--pdl`; rows `<config>+pdl`): back-to-back launches on different weight copies,
  so with PDL each launch loads its weights while the one before it finishes, as consecutive layers do.
Writes <out>/w4a16_decode.json (out = --out, else $OUT, else bench/results) after each shape and prints a table last.
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

from kernels import L2_DEFEAT_BYTES, LLAMA_LINEARS, copy_bandwidth, fixed_and_rate, rel_err, time_calls  # noqa: E402
from pipeline.kernels import pdl  # noqa: E402
from pipeline.kernels import w4a16 as w4  # noqa: E402
from pipeline.kernels import w4a16_gluon, w4a16_gluon_sk  # noqa: E402


@triton.jit
def _empty_kernel(y_ptr):
    pass


@triton.jit
def _stream_kernel(q_ptr, s_ptr, z_ptr, y_ptr, N, n_groups, stride_qb, stride_qr, P: tl.constexpr, KS: tl.constexpr,
                   BLOCK_N: tl.constexpr, SZ: tl.constexpr = True):
    # reads KS groups (KS, P, BN) int32 + scales + zeros in one load each, like _gemv_wide_kernel
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_g = pid_k * KS + tl.arange(0, KS)
    rows = offs_g[:, None] * P + tl.arange(0, P)[None, :]
    CONT: tl.constexpr = 64 if BLOCK_N > 64 else BLOCK_N
    cols = tl.max_contiguous(tl.multiple_of((offs_n // 64) * stride_qb + offs_n % 64, CONT), CONT)
    mask_g = offs_g < n_groups
    q = tl.load(q_ptr + rows[:, :, None] * stride_qr + cols[None, None, :],
                mask=mask_g[:, None, None] & mask_n[None, None, :], other=0)
    gs = offs_g[:, None] * N + offs_n[None, :]
    v = tl.sum(tl.sum(q, axis=1), axis=0)
    if SZ:
        s = tl.load(s_ptr + gs, mask=mask_g[:, None] & mask_n[None, :], other=0.0)
        z = tl.load(z_ptr + gs, mask=mask_g[:, None] & mask_n[None, :], other=0.0)
        v += tl.sum(s.to(tl.int16, bitcast=True) ^ z.to(tl.int16, bitcast=True), axis=0).to(tl.int32)
    tl.store(y_ptr + pid_k * N + offs_n, v, mask=mask_n)  # (split, N): every program writes, no load is dead


@triton.jit
def _stream_sz_kernel(q_ptr, sz_ptr, y_ptr, N, n_groups, rows_per_group, sz_group_stride, P: tl.constexpr,
                      KS: tl.constexpr, BLOCK_N: tl.constexpr):
    # the wide kernel's tiles with scale and zero as ONE int32 (an fp16 pair) per (group, column): codes of group
    # g at int32 rows g * rows_per_group + p, its pairs at sz_ptr + g * sz_group_stride (a separate (K//g, N)
    # array: rows_per_group = P, stride N; or a row right after the group's codes: P + 1, (P + 1) * N)
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_n = tl.max_contiguous(tl.multiple_of(offs_n, BLOCK_N), BLOCK_N)
    mask_n = offs_n < N
    offs_g = pid_k * KS + tl.arange(0, KS)
    mask_g = offs_g < n_groups
    rows = offs_g[:, None] * rows_per_group + tl.arange(0, P)[None, :]
    q = tl.load(q_ptr + rows[:, :, None] * N + offs_n[None, None, :],
                mask=mask_g[:, None, None] & mask_n[None, None, :], other=0)
    sz = tl.load(sz_ptr + offs_g[:, None] * sz_group_stride + offs_n[None, :],
                 mask=mask_g[:, None] & mask_n[None, :], other=0)
    v = tl.sum(tl.sum(q, axis=1), axis=0) + tl.sum(sz, axis=0)
    tl.store(y_ptr + pid_k * N + offs_n, v, mask=mask_n)


def sz_layouts(w: w4.W4Weight):
    """(scale|zero pairs (K//g, N) int32, slab (K//g, P + 1, N) int32: each group's codes then its pairs)."""
    G, P = w.K // w.group_size, w.group_size // 8
    pair = ((w.scales.view(torch.int16).to(torch.int32) & 0xFFFF)
            | (w.zeros.view(torch.int16).to(torch.int32) << 16)).contiguous()
    slab = torch.cat([w.qweight.reshape(G, P, w.N), pair.reshape(G, 1, w.N)], dim=1).contiguous()
    return pair, slab


@triton.jit
def _stream_flat_kernel(q_ptr, y_ptr, n, BLOCK: tl.constexpr):
    # reads BLOCK contiguous int32 per program: the same byte count as the weight, no layout at all
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    v = tl.sum(tl.load(q_ptr + offs, mask=offs < n, other=0), axis=0)
    tl.store(y_ptr + tl.program_id(0), v)


def make_weights(K, N, g, dev, copies):
    ws = []
    for _ in range(copies):
        q = torch.randint(0, 16, (N, K), dtype=torch.uint8, device=dev)
        s = (torch.rand(K // g, N, device=dev) * 0.01 + 1e-3).half()
        z = torch.randint(0, 16, (K // g, N), device=dev).half()
        ws.append(w4.pack_w4(q, s, z, g))
    return ws


def blocked(w: w4.W4Weight) -> w4.W4Weight:
    """The same weight with qweight column-blocked: (N/64, K//8, 64), each 64-column block contiguous."""
    rows, n = w.qweight.shape
    assert n % 64 == 0, n
    qb = w.qweight.reshape(rows, n // 64, 64).permute(1, 0, 2).contiguous()
    return w4.W4Weight(qb, w.scales, w.zeros, w.K, w.N, w.group_size)


def bench(args, save=lambda res: None) -> dict:
    dev = torch.device("cuda")
    g = args.group
    bw = copy_bandwidth()
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "copy_bw_GBps": bw / 1e9, "group_size": g, "pdl_supported": pdl.enabled(dev), "shapes": []}
    only = set(args.configs.split(",")) if args.configs else None
    for K, N in LLAMA_LINEARS:
        torch.manual_seed(K + N)
        nbytes = K * N // 2 + 2 * 2 * (K // g) * N
        ws = make_weights(K, N, g, dev, max(2, math.ceil(L2_DEFEAT_BYTES / nbytes)))
        entry = {"K": K, "N": N, "int4_bytes": nbytes, "roofline_us": nbytes / bw * 1e6, "M": {}}
        y32 = torch.empty(K // g, N, device=dev, dtype=torch.int32)
        grid = (triton.cdiv(N, 64), triton.cdiv(K // g, 4))
        entry["launch_floor_us"] = time_calls([lambda: _empty_kernel[grid](y32)], graph=True) * 1e6
        if args.floors:
            nq = ws[0].qweight.numel() + ws[0].scales.numel()  # int32 words of weights + scales and zeros
            flat = [torch.empty(nq, device=dev, dtype=torch.int32) for _ in ws]
            yf = torch.empty(triton.cdiv(nq, 1024), device=dev, dtype=torch.int32)
            for block, warps in ((2048, 4), (4096, 4), (4096, 8), (8192, 8)):
                fns = [lambda f=f: _stream_flat_kernel[(triton.cdiv(nq, block),)](f, yf, nq, BLOCK=block, num_warps=warps)
                       for f in flat]
                entry[f"stream_floor_flat{block}_w{warps}_us"] = time_calls(fns, graph=True) * 1e6
            del flat
            grid_s = grid  # the wide kernel's n64_s4 tiles
            fns = [lambda w=w: _stream_kernel[grid_s](w.qweight, w.scales, w.zeros, y32, N, K // g, 64, N, P=g // 8, KS=4,
                                                       BLOCK_N=64, SZ=False, num_warps=4) for w in ws]
            entry["stream_floor_nosz_n64_s4_w4_us"] = time_calls(fns, graph=True) * 1e6
            szs = [sz_layouts(w) for w in ws]
            P = g // 8
            fns = [lambda w=w, sz=sz: _stream_sz_kernel[grid_s](w.qweight, sz[0], y32, N, K // g, P, N, P=P, KS=4,
                                                                BLOCK_N=64, num_warps=4) for w, sz in zip(ws, szs)]
            entry["stream_floor_sz32_n64_s4_w4_us"] = time_calls(fns, graph=True) * 1e6
            fns = [lambda sz=sz: _stream_sz_kernel[grid_s](sz[1], sz[1].view(-1)[P * N:], y32, N, K // g, P + 1,
                                                           (P + 1) * N, P=P, KS=4, BLOCK_N=64, num_warps=4) for sz in szs]
            entry["stream_floor_slab_n64_s4_w4_us"] = time_calls(fns, graph=True) * 1e6
            del szs
            wbs = [blocked(w) for w in ws]
            for BN, KS, warps in ((64, 4, 4), (64, 2, 4), (128, 2, 4)):
                grid_s = (triton.cdiv(N, BN), triton.cdiv(K // g, KS))
                fns = [lambda w=w: _stream_kernel[grid_s](w.qweight, w.scales, w.zeros, y32, N, K // g,
                                                           w.qweight.stride(0), 64,
                                                           P=g // 8, KS=KS, BLOCK_N=BN, num_warps=warps) for w in wbs]
                entry[f"stream_floor_blocked_n{BN}_s{KS}_w{warps}_us"] = time_calls(fns, graph=True) * 1e6
            for BN, KS, warps in ((64, 4, 4), (128, 2, 4), (64, 8, 8), (64, 4, 8), (32, 4, 4), (64, 2, 4)):
                grid_s = (triton.cdiv(N, BN), triton.cdiv(K // g, KS))
                fns = [lambda w=w: _stream_kernel[grid_s](w.qweight, w.scales, w.zeros, y32, N, K // g, 64, N,
                                                           P=g // 8, KS=KS,
                                                           BLOCK_N=BN, num_warps=warps) for w in ws]
                entry[f"stream_floor_n{BN}_s{KS}_w{warps}_us"] = time_calls(fns, graph=True) * 1e6
        for M in args.ms:
            x = torch.randn(M, K, device=dev, dtype=torch.float16)
            ref = x.double() @ w4.dequantize_w4(ws[0], torch.float64).T
            row = {}
            names = w4.candidates(M) + (w4a16_gluon_sk.candidates(M) if w4a16_gluon.enabled(dev) else ())
            for name, mode in [(n, m) for n in names for m in args.pdl]:
                if only and name not in only:
                    continue
                os.environ["PIPELINE_PDL"] = "1" if mode == "on" else "0"
                key = name + ("+pdl" if mode == "on" else "")
                err = rel_err(w4.w4a16_linear(x, ws[0], config=name), ref)
                t = time_calls([lambda w=w: w4.w4a16_linear(x, w, config=name) for w in ws], graph=True)
                row[key] = {"us": t * 1e6, "x_roofline": t * 1e6 / entry["roofline_us"], "rel_err": err}
                print(f"K={K} N={N} M={M} {key:22s} {t * 1e6:7.2f} us  {row[key]['x_roofline']:.2f}x  "
                      f"err {err:.1e}", flush=True)
            if args.cublas:  # fp16 cuBLAS on the dequantized weights, same shapes, same run (speed baseline)
                n16 = max(2, math.ceil(L2_DEFEAT_BYTES / (2 * K * N)))
                w16 = [w4.dequantize_w4(ws[i % len(ws)], torch.float16) for i in range(n16)]
                t = time_calls([lambda W=W: torch.nn.functional.linear(x, W) for W in w16], graph=True)
                row["fp16_cublas"] = {"us": t * 1e6, "x_roofline": t * 1e6 / entry["roofline_us"], "rel_err": 0.0}
                print(f"K={K} N={N} M={M} {'fp16_cublas':22s} {t * 1e6:7.2f} us", flush=True)
                del w16
            entry["M"][str(M)] = row
        print(f"K={K} N={N}: roofline {entry['roofline_us']:.2f} us, launch floor {entry['launch_floor_us']:.2f} us, "
              + ", ".join(f"{k} {v:.2f}" for k, v in entry.items() if k.startswith("stream_floor")), flush=True)
        res["shapes"].append(entry)
        save(res)   # after each shape: a run cut by its time limit keeps the shapes it finished
    res["ptx_order"] = ptx_order()
    return res


def ptx_order() -> dict:
    """Per compiled W4A16 kernel with PDL: how many global loads its PTX issues before griddepcontrol.wait (the
    wide GEMV must issue its weight loads there for PDL to overlap them with the previous kernel)."""
    out = {}
    for kern in (w4._gemv_wide_kernel, w4._gemv_kernel, w4._w4a16_kernel, w4._w4a16_swap_kernel):
        try:
            caches = [c[0] if isinstance(c, tuple) else c for c in kern.device_caches.values()]
            for cache in caches:
                for i, ck in enumerate(cache.values()):
                    ptx = ck.asm["ptx"]
                    wg = [ln.strip() for ln in ptx.splitlines() if "wgmma.mma_async" in ln]
                    # MMA kind and operand sources (a wgmma with A in registers lists A as a {%r..} vector)
                    out[f"{kern.fn.__name__}#{i}_mma"] = {
                        "wgmma": len(wg), "mma_sync": ptx.count("mma.sync"), "st_shared": ptx.count("st.shared"),
                        "ldmatrix": ptx.count("ldmatrix"), "first_wgmma": wg[0][:200] if wg else ""}
                    if "griddepcontrol.wait" in ptx:
                        head = ptx.split("griddepcontrol.wait")[0]
                        out[f"{kern.fn.__name__}#{i}"] = {"ld_global_before_wait": head.count("ld.global"),
                                                        "ld_global_total": ptx.count("ld.global")}
        except Exception as e:  # attribute layout differs between Triton versions
            out[kern.fn.__name__] = f"unavailable: {type(e).__name__}: {e}"
    return out


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
                fixed, rate = fixed_and_rate([e["int4_bytes"] for e in res["shapes"]],
                                             [e["M"][M][n]["us"] for e in res["shapes"]])
                rows.append((t, f"M={M:>2} {n:22s} {t:7.1f} us {t / roof:.2f}x  (per shape {per}; "
                                f"{fixed:.1f} us + bytes at {rate:.2f} TB/s)"))
        lines += [r for _, r in sorted(rows)]
    return "\n".join(lines)


def ncu_target(name: str, M: int = 1):
    """A few launches of one config on the (4096, 22016) linear: `ncu -k regex:_gemv|_w4a16|_stream ...`.
    name: a config, or stream3d / stream3d_nosz / stream3d_blocked / flat (the floors)."""
    K, N, g = 4096, 22016, 128
    w = make_weights(K, N, g, torch.device("cuda"), 1)[0]
    x = torch.randn(M, K, device="cuda", dtype=torch.float16)
    y32 = torch.empty(K // g, N, device="cuda", dtype=torch.int32)
    grid = (triton.cdiv(N, 64), triton.cdiv(K // g, 4))
    for _ in range(3):
        if name == "flat":
            nq = w.qweight.numel() + w.scales.numel()
            f = torch.empty(nq, device="cuda", dtype=torch.int32)
            _stream_flat_kernel[(triton.cdiv(nq, 2048),)](f, y32, nq, BLOCK=2048, num_warps=4)
        elif name.startswith("stream3d"):
            wb = blocked(w) if name.endswith("blocked") else w
            sb, sr = (wb.qweight.stride(0), 64) if name.endswith("blocked") else (64, N)
            _stream_kernel[grid](wb.qweight, w.scales, w.zeros, y32, N, K // g, sb, sr, P=g // 8, KS=4, BLOCK_N=64,
                                 SZ=not name.endswith("nosz"), num_warps=4)
        else:
            w4.w4a16_linear(x, w, config=name)
    torch.cuda.synchronize()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ms", type=lambda s: [int(v) for v in s.split(",")], default=[1, 4, 16])
    ap.add_argument("--group", type=int, default=128, help="quantization group size (the serving presets: 64)")
    ap.add_argument("--configs", default="", help="comma-separated config names (default: every candidate)")
    ap.add_argument("--pdl", type=lambda s: s.split(","), default=["off", "on"],
                    help="programmatic dependent launch for the configs: off, on, or off,on (default)")
    ap.add_argument("--no-floors", dest="floors", action="store_false", help="skip the read-only stream floors")
    ap.add_argument("--cublas", action="store_true", help="also time fp16 cuBLAS (F.linear) on each shape and M")
    ap.add_argument("--ncu", default="", help="run a few launches of this config only (for ncu)")
    ap.add_argument("--out", default=os.environ.get("OUT") or str(Path(__file__).parent / "results"))
    args = ap.parse_args()
    if args.ncu:
        return ncu_target(args.ncu)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "w4a16_decode.json"
    res = bench(args, save=lambda r: path.write_text(json.dumps(r, indent=1)))
    path.write_text(json.dumps(res, indent=1))
    print(json.dumps(res["ptx_order"]))
    print(table(res))


if __name__ == "__main__":
    main()
