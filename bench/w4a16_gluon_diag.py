"""Where the Gluon W4A16 kernel goes wrong (GPU): per config, error / correlation against the reference on small
shapes, and one-hot input probes.

    PYTHONPATH=. python3 bench/w4a16_gluon_diag.py     # an sm_90 GPU; output: bench/results/w4a16_gluon_diag_h100_s10.log
"""
import torch
from pipeline.kernels import w4a16 as w4, w4a16_gluon as wg
from tests.test_kernel_w4a16 import make_quant, ref64
torch.set_printoptions(precision=3, linewidth=200)
for (M, N, K, g) in ((16, 128, 256, 128), (64, 128, 128, 128), (16, 64, 128, 64)):
    w = w4.pack_w4(*make_quant(N, K, g, seed=0), g).to("cuda")
    x = torch.randn(M, K, device="cuda").half()
    r = ref64(x, w).float()
    for name in wg.GLUON_CONFIGS:
        if not wg.fits(name, g, False):
            continue
        try:
            y = wg.w4a16_gluon_linear(x, w, config=name).float()
        except Exception as e:
            print(M, N, K, g, name, "ERR", repr(e)[:200]); continue
        err = ((y - r).norm() / r.norm()).item()
        c = torch.corrcoef(torch.stack([y.flatten(), r.flatten()]))[0, 1].item()
        bad = ((y - r).abs() > 0.05 * r.abs().mean() + 1e-3)
        print(M, N, K, g, name, f"err {err:.3f} corr {c:.3f} |y| {y.abs().mean():.3f} |r| {r.abs().mean():.3f} "
              f"bad rows {bad.any(1).nonzero().flatten()[:12].tolist()} bad cols {bad.any(0).nonzero().flatten()[:12].tolist()}")
    y = wg.w4a16_gluon_linear(x, w, config="gl_m16_n64_k16_s4_c4" if M == 16 else "gl_m64_n64_k16_s4_c2").float()
    print("y", y[:3, :8]); print("r", r[:3, :8])
    # single-group probes: x with one nonzero input column k
    for k in (0, 1, 8, 16):
        xe = torch.zeros(M, K, device="cuda").half(); xe[:, k] = 1
        ye = wg.w4a16_gluon_linear(xe, w, config="gl_m16_n64_k16_s4_c4" if M == 16 else "gl_m64_n64_k16_s4_c2").float()
        re = ref64(xe, w).float()
        match = [(k2, ((ye[0] - ref64((lambda t: (t.__setitem__((slice(None), k2), 1), t)[1])(torch.zeros(M, K, device="cuda").half()), w).float()[0]).abs().max().item())) for k2 in range(min(K, 32))]
        best = min(match, key=lambda t: t[1])
        print(f"e_{k}: err vs e_{k} {((ye-re).norm()/re.norm()).item():.3f}; best matching input column {best}")
