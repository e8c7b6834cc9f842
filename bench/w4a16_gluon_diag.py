"""Where the Gluon W4A16 kernel goes wrong (GPU), in one run, from the weights to the output:
  1. operand: `dequantize_gluon` (the kernel's TMA copies, register layout and dequantization, no MMA) against
     `dequantize_w4`, exact, per config shape / dtype / group; a mismatch names where its value really belongs;
  2. output: error and correlation of every config against the reference, fp16 and bf16;
  3. MMA: one-hot rows (x[m] = e_k(m)) make y[m] a weight column: a wrong row names the input column it took.
If 1 passes and 2 fails, the fault is in the MMA's B operand or the epilogue; 3 tells which.

    PYTHONPATH=. python3 bench/w4a16_gluon_diag.py     # an sm_90 GPU
The s10 run (before the fix of `_load_packed`): bench/results/w4a16_gluon_diag_h100_s10.log
"""
import torch
import triton

from pipeline.kernels import w4a16 as w4, w4a16_gluon as wg
from tests.test_kernel_w4a16 import make_quant, ref64

torch.set_printoptions(precision=3, linewidth=200)
print("torch", torch.__version__, "triton", triton.__version__, torch.cuda.get_device_name())
SHAPES = ((16, 128, 256, 128), (64, 200, 128, 64), (16, 64, 128, 32))  # (M, N, K, g); N = 200: a partial tile


def operand_probe(w, dtype, name):
    ref = w4.dequantize_w4(w, dtype)
    got = wg.dequantize_gluon(w, dtype, name)
    bad = (got != ref).nonzero()
    msg = f"operand {name} {str(dtype)[6:]} g={w.group_size}: {len(bad)} of {ref.numel()} weights differ"
    if len(bad):
        n, k = bad[0].tolist()
        g = w.group_size
        blk = ref[:, k // g * g:(k // g + 1) * g]  # where in this group the wrong value occurs (first few places)
        where = (blk == got[n, k]).nonzero()[:4].tolist()
        msg += (f"; first (n={n}, k={k}): {got[n, k].item():.4f} vs {ref[n, k].item():.4f}, that value sits at "
                f"(n, k - group start) {where}; bad k of row n: {bad[bad[:, 0] == n][:16, 1].tolist()}")
    print(msg)
    return len(bad) == 0


def onehot_probe(w, M, name, dtype=torch.float16):
    K = w.K
    ks = [(m * 37 + 5) % K for m in range(M)]
    x = torch.zeros(M, K, device="cuda", dtype=dtype)
    x[torch.arange(M), torch.tensor(ks)] = 1
    y = wg.w4a16_gluon_linear(x, w, config=name).float()
    W = w4.dequantize_w4(w, dtype).float()  # (N, K); y[m] should be W[:, ks[m]]
    wrong = []
    for m in range(M):
        d = (W - y[m][:, None]).abs().amax(0)  # per input column k: how far y[m] is from W[:, k]
        if d[ks[m]] > 1e-3:
            wrong.append((m, ks[m], int(d.argmin()), round(d.min().item(), 4)))
    print(f"one-hot {name} M={M} K={K}: {len(wrong)} of {M} rows wrong"
          + (f"; (row, its k, best-matching k, max diff): {wrong[:8]}" if wrong else ""))


for (M, N, K, g) in SHAPES:
    w = w4.pack_w4(*make_quant(N, K, g, seed=0), g).to("cuda")
    for dtype in (torch.float16, torch.bfloat16):
        seen = set()
        for name, (BM, BN, KT, _, warps, _, _) in wg.GLUON_CONFIGS.items():
            if wg.fits(name, g, False) and (BN, KT, warps) not in seen:
                seen.add((BN, KT, warps))
                operand_probe(w, dtype, name)
    for dtype in (torch.float16, torch.bfloat16):
        x = torch.randn(M, K, device="cuda").to(dtype)
        r = ref64(x, w).float()
        for name in wg.GLUON_CONFIGS:
            if not wg.fits(name, g, False):
                continue
            try:
                y = wg.w4a16_gluon_linear(x, w, config=name).float()
            except Exception as e:
                print(M, N, K, g, name, "ERR", repr(e)[:200])
                continue
            err = ((y - r).norm() / r.norm()).item()
            c = torch.corrcoef(torch.stack([y.flatten(), r.flatten()]))[0, 1].item()
            bad = (y - r).abs() > 0.05 * r.abs().mean() + 1e-3
            print(M, N, K, g, str(dtype)[6:], name, f"err {err:.4f} corr {c:.4f} |y| {y.abs().mean():.3f} "
                  f"|r| {r.abs().mean():.3f} bad rows {bad.any(1).nonzero().flatten()[:8].tolist()} "
                  f"bad cols {bad.any(0).nonzero().flatten()[:8].tolist()}")
    for name in ("gl_m16_n64_k16_s4_c4", "gl_m64_n64_k16_s4_c2_ws", "gl_m128_n128_k16_s4"):
        if wg.fits(name, g, False):
            onehot_probe(w, M, name)
