"""The tuner's timing (tuner.bench_ms) with its L2 flush as a read (today) and as a zeroed buffer (before session 21),
alternating in one process, on three Llama-2-7B decode shapes at group 64: what the zeroed buffer's write-back cost.

    python bench/tuner_flush_ab.py      # GPU; writes $OUT/tuner_flush_ab.json (else /tmp)
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from w4a16_decode import make_weights  # noqa: E402
import pipeline.kernels.tuner as tuner  # noqa: E402
import pipeline.kernels.w4a16 as w4  # noqa: E402

SHAPES = ((4096, 12288), (4096, 22016), (11008, 4096))            # (K, N)
CALLS = ((16, "swap_m16_n64_c4_pr"), (32, "swap_m32_n64_c4_np"))  # (M, config)


def main() -> None:
    dev = "cuda"
    zero = torch.empty(64 << 20, dtype=torch.uint8, device=dev)
    flushes = {"read": tuner.flush_l2, "zero": lambda device: zero.zero_()}
    res = {}
    for K, N in SHAPES:
        (w,) = make_weights(K, N, 64, dev, 1)
        for M, cfg in CALLS:
            x = torch.randn(M, K, device=dev, dtype=torch.float16)
            r = {mode: [] for mode in flushes}
            for _ in range(3):   # rounds, the two methods alternating
                for mode, flush in flushes.items():
                    tuner.flush_l2 = flush       # bench_ms calls the module's flush_l2
                    try:
                        r[mode].append(round(tuner.bench_ms(lambda: w4.w4a16_linear(x, w, config=cfg), dev, 16) * 1e3, 2))
                    finally:
                        tuner.flush_l2 = flushes["read"]
            res[f"{K}x{N} M={M} {cfg}"] = r
            print(f"{K}x{N} M={M} {cfg}: read {r['read']} us, zero {r['zero']} us", flush=True)
    out = Path(os.environ.get("OUT", "/tmp")) / "tuner_flush_ab.json"
    out.write_text(json.dumps({"device": torch.cuda.get_device_name(), "us": res}, indent=1))


if __name__ == "__main__":
    main()
