"""The tuner's timing (tuner.bench_ms) with its L2 flush as a read (today) and as a zeroed buffer (before session 21),
alternating in one process, on three Llama-2-7B decode shapes at group 64: what the zeroed buffer's write-back cost.

    python bench/tuner_flush_ab.py      # GPU; writes $OUT/tuner_flush_ab.json (else /tmp)
"""
import json, os, sys, torch
sys.path.insert(0, "bench"); sys.path.insert(0, ".")
from w4a16_decode import make_weights
import pipeline.kernels.w4a16 as w4
import pipeline.kernels.tuner as t
dev = "cuda"
zero = torch.empty(64 << 20, dtype=torch.uint8, device=dev)
def zero_flush(device):
    zero.zero_()
res = {}
for K, N in ((4096, 12288), (4096, 22016), (11008, 4096)):
    (w,) = make_weights(K, N, 64, dev, 1)
    for M, cfg in ((16, "swap_m16_n64_c4_pr"), (32, "swap_m32_n64_c4_np")):
        x = torch.randn(M, K, device=dev, dtype=torch.float16)
        fn = lambda: w4.w4a16_linear(x, w, config=cfg)
        r = {"read": [], "zero": []}
        for rnd in range(3):
            for mode in ("read", "zero"):
                orig = t.flush_l2
                if mode == "zero":
                    t.flush_l2 = zero_flush
                try:
                    r[mode].append(round(t.bench_ms(fn, dev, reps=16) * 1e3, 2))
                finally:
                    t.flush_l2 = orig
        res[f"{K}x{N} M={M} {cfg}"] = r
        print(f"{K}x{N} M={M} {cfg}: read {r['read']} us, zero {r['zero']} us", flush=True)
json.dump({"device": torch.cuda.get_device_name(), "us": res}, open(os.environ.get("OUT", "/tmp") + "/tuner_flush_ab.json", "w"), indent=1)
