"""CPU decode attention of one layer: the C kernel over the paged cache (pipeline/kernels/cpu_attn.py) against the
torch path NativeRunner.decode took before it (`_read_kv`: gather + dequantize, then SDPA with the ragged mask).

    python bench/cpu_attn.py [--kv int8_static int8_dynamic bf16] [--rounds 7] [--out bench/results/cpu_attn.json]

SmolLM2-135M's attention (9 query heads, 3 KV heads, head_dim 64), 64-row blocks in shuffled order, batch 1 and 8
(8: ragged contexts ctx..ctx+7, as concurrent sequences), contexts ~100 and ~700, one thread (a decode step's).
Old and new alternate in one process, `--rounds` rounds of `--iters` calls each (the machine is shared); per case
the min and median time of a layer's call (a step's tables, mask and kernel arguments made once, outside the timing,
as the runner makes them), the ratio old / new of the medians. The two must agree (checked, 1e-4).
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
from types import SimpleNamespace

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import pipeline  # noqa: E402,F401  (before torch: OMP_WAIT_POLICY=passive)
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from pipeline.engine.native import NativeRunner  # noqa: E402
from pipeline.kernels.cpu_attn import PagedAttnCPU  # noqa: E402
from pipeline.kernels.kvcache import kv_dynamic_params  # noqa: E402

NH, NKV, HD, BS = 9, 3, 64, 64
KV = {"int8_static": (8, "static", torch.int8), "int8_dynamic": (8, "dynamic", torch.int8),
      "bf16": (16, "none", torch.bfloat16)}


def layer(kv: str, num_blocks: int):
    """A runner-like namespace with one filled layer cache of this KV kind (NativeRunner's attribute names)."""
    bits, mode, dt = KV[kv]
    x = torch.randn(num_blocks * BS, 2, NKV, HD)
    if mode == "none":
        cache, p = x.to(dt), {}
    elif mode == "static":
        s = x.abs().amax((0, 3))[..., None] / 127                                       # (2, n_kv, 1)
        p, cache = {"scale": s, "zp": torch.zeros_like(s)}, torch.round(x / s).clamp(-128, 127).to(dt)
    else:
        s, z = kv_dynamic_params(x, 8)
        p, cache = {"scale": s, "zp": z}, torch.round((x - z[..., None]) / s[..., None]).clamp(-128, 127).to(dt)
    cache = cache.view(num_blocks, BS, 2, NKV, HD)
    return SimpleNamespace(kv_cache=[cache], kv=[p], kv_bits=bits, kv_mode=mode, block_size=BS, scale=HD ** -0.5)


def old_step(r, block_tables, context_lens):
    """NativeRunner.decode's attend before the kernel (the same ops; layer l), its tables and mask made once."""
    B, ctx = context_lens.shape[0], context_lens.tolist()
    n_max = max(ctx)
    blocks = block_tables[:, :math.ceil(n_max / BS)].long()
    if B == 1 or min(ctx) == n_max:
        n, mask = n_max, None
    else:
        n = None
        keys = torch.arange(blocks.shape[1] * BS)
        mask = (keys[None, :] < context_lens[:, None])[:, None, None, :]

    def attend(l, q):
        k, v = NativeRunner._read_kv(r, l, blocks, n)
        o = F.scaled_dot_product_attention(q[:, :, None], k, v, attn_mask=mask, scale=r.scale, enable_gqa=True)
        return o.view(B, -1)
    return attend


def timed(fn, iters: int) -> float:
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t) / iters * 1e6


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--kv", nargs="+", default=list(KV), choices=list(KV))
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    torch.set_num_threads(1)
    rows = []
    for kv in a.kv:
        for B in (1, 8):
            for ctx in (100, 700):
                per = math.ceil((ctx + B) / BS)
                r = layer(kv, B * per + 3)
                ids = torch.randperm(B * per + 3)[:B * per].to(torch.int32).view(B, per)
                bt = torch.cat([ids, torch.zeros(B, 4, dtype=torch.int32)], 1)          # (B, max_blocks)
                lens = torch.tensor([ctx + b for b in range(B)], dtype=torch.int32)
                q = torch.randn(B, NH + 2 * NKV, HD)[:, :NH]                           # strided, as the runner's
                kernel = PagedAttnCPU(r.kv_cache, r.kv, r.kv_bits, r.kv_mode, NH, r.scale, threads=1)
                with torch.inference_mode():
                    old, new = old_step(r, bt, lens), kernel.step(bt, lens)     # once a step, as the runner
                    diff = (new(0, q) - old(0, q)).abs().max().item()
                    assert diff < 1e-4, diff
                    t = {"old": [], "new": []}
                    for _ in range(a.rounds):
                        t["old"].append(timed(lambda: old(0, q), a.iters))
                        t["new"].append(timed(lambda: new(0, q), a.iters))
                row = {"kv": kv, "B": B, "ctx": ctx, "isa": kernel.isa, "max_abs_diff": diff,
                       **{f"{k}_us_{s}": round(f(v), 1) for k, v in t.items() for s, f in (("min", min),
                                                                                     ("median", statistics.median))}}
                row["speedup_median"] = round(row["old_us_median"] / row["new_us_median"], 2)
                rows.append(row)
                print(json.dumps(row), flush=True)
    out = {"load_avg": os.getloadavg(), "torch": torch.__version__, "rows": rows}
    if a.out:
        Path(a.out).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
