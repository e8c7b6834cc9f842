"""W4A16 GEMM: layout round trip, Triton interpreter on small odd shapes (CPU), real sizes on a GPU.

    pytest tests/test_kernel_w4a16.py                 # CPU: interpreter + reference
    python -m pytest -m gpu tests/test_kernel_w4a16.py  # on the GPU machine
"""
import importlib
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the @triton.jit decoration

import pipeline.kernels.w4a16 as w4  # noqa: E402
from pipeline.kernels.dispatch import arrival_counters  # noqa: E402

if os.environ.get("TRITON_INTERPRET") == "1" and type(w4._w4a16_kernel).__name__ != "InterpretedFunction":
    w4 = importlib.reload(w4)  # imported earlier without the interpreter: re-decorate the kernels

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def make_quant(N, K, g, device="cpu", seed=None):
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    q = torch.randint(0, 16, (N, K), dtype=torch.uint8, generator=gen)
    scales = (torch.rand(K // g, N, generator=gen) * 0.02 + 1e-3).half()
    zeros = torch.randint(0, 16, (K // g, N), generator=gen).to(torch.float16)
    return q.to(device), scales.to(device), zeros.to(device)


def rel_err(y, ref):
    assert torch.isfinite(y).all(), "non-finite output (unwritten or poisoned element)"
    return ((y.double() - ref).norm() / ref.norm()).item()


def ref64(x, w, bias=None):
    y = x.double() @ w4.dequantize_w4(w, torch.float64).T
    return y if bias is None else y + bias.double()


@pytest.fixture
def poisoned(monkeypatch):
    """Outputs the kernel must overwrite start as NaN."""
    real = w4._alloc_out

    def alloc(M, N, dtype, device):
        return real(M, N, dtype, device).fill_(float("nan"))

    monkeypatch.setattr(w4, "_alloc_out", alloc)


@pytest.mark.parametrize("N,K,g", [(1, 32, 32), (37, 96, 32), (40, 192, 64), (13, 384, 128)])
def test_pack_roundtrip_bit_exact(N, K, g):
    q, s, z = make_quant(N, K, g)
    w = w4.pack_w4(q, s, z.to(torch.int64), g)  # any integer dtype for zeros
    assert w.qweight.dtype == torch.int32 and tuple(w.qweight.shape) == (K // 8, N)
    q2, s2, z2 = w4.unpack_w4(w)
    assert torch.equal(q2, q) and q2.dtype == torch.uint8
    assert torch.equal(s2, s) and torch.equal(z2, z)
    W = w4.dequantize_w4(w)
    gi = torch.arange(K) // g
    assert torch.equal(W, (q.float() - z.float()[gi].T) * s.float()[gi].T)


def test_pack_rejects_bad_inputs():
    q, s, z = make_quant(8, 64, 32)
    with pytest.raises(ValueError, match="group_size=48"):
        w4.pack_w4(q, s, z, 48)
    with pytest.raises(ValueError, match="scales shape"):
        w4.pack_w4(q, s[:1], z, 32)
    with pytest.raises(ValueError, match="0..15"):
        w4.pack_w4(q + 16, s, z, 32)
    with pytest.raises(ValueError, match="integer-valued"):
        w4.pack_w4(q, s, z + 0.5, 32)
    w = w4.pack_w4(q, s, z, 32)
    with pytest.raises(ValueError, match="x.shape"):
        w4.w4a16_linear(torch.randn(2, 63), w)


def test_auto_dispatch_on_cpu_uses_reference(monkeypatch):
    monkeypatch.setenv("PIPELINE_KERNELS", "auto")
    w = w4.pack_w4(*make_quant(24, 64, 32), 32)
    x = torch.randn(2, 3, 64)
    y = w4.w4a16_linear(x, w)
    assert y.shape == (2, 3, 24)
    assert torch.allclose(y, w4.w4a16_linear_ref(x, w))


# raw configs (BLOCK_M, BLOCK_N, split, warps, stages, sliced, px): split-K GEMV (partials finished by the
# last program), single split, 8-slice dots (g = 128; px falls back to the plain unpack off-GPU), tile
INTERP_CONFIGS = {"gemv_split3": (16, 32, 3, 4, 1, 0, 0), "gemv_split1": (16, 16, 1, 4, 1, 0, 0),
                  "sliced_split2": (16, 32, 2, 4, 1, 1, 0), "tile": (32, 64, 1, 4, 1, 0, 0),
                  "px_split3": (16, 32, 3, 4, 1, 1, 1),
                  "fma_split3": ("fma", 32, 3, 4, 1), "fma_split1": ("fma", 64, 1, 4, 1),
                  "wide_ks2": ("wide", 32, 2, 4, 1), "wide_ks4": ("wide", 64, 4, 4, 0),
                  "swap_split3": ("swap", 16, 32, 3, 4, 1, 1), "swap_tile": ("swap", 32, 64, 1, 4, 1, 1),
                  "swap_k8": ("swap", 16, 32, 2, 4, 1, 8), "swap_k2": ("swap", 32, 32, 1, 4, 1, 2),
                  "swap_k4": ("swap", 16, 32, 3, 4, 1, 4), "swap_pairs": ("swap", 16, 32, 2, 4, 1, 8, 1),
                  "swap_pairs_tile": ("swap", 32, 64, 1, 4, 1, 8, 1), "swap_np": ("swap", 16, 32, 2, 4, 1, 8, 2),
                  "swap_np_tile": ("swap", 32, 64, 1, 4, 1, 8, 2), "swap_np_u2": ("swap", 16, 32, 3, 4, 1, 8, 2, 2),
                  "swap_k8_u2": ("swap", 32, 64, 1, 4, 1, 8, 0, 2), "swap_pairs_u2": ("swap", 16, 32, 2, 4, 1, 8, 1, 2)}


@pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter test runs on CPU machines")
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("M,N,K,g,cfg", [(1, 40, 192, 32, "gemv_split3"), (3, 33, 256, 64, "gemv_split1"),
                                         (5, 72, 256, 128, "gemv_split3"), (19, 50, 128, 64, "tile"),
                                         (2, 40, 384, 128, "sliced_split2"), (1, 40, 384, 128, "fma_split3"),
                                         (1, 40, 640, 128, "px_split3"),
                                         (3, 70, 192, 64, "fma_split3"), (2, 33, 128, 32, "fma_split1"),
                                         (1, 40, 640, 128, "wide_ks2"), (2, 70, 192, 64, "wide_ks4"),
                                         (1, 33, 128, 32, "wide_ks4"), (3, 72, 384, 64, "wide_ks4"),
                                         (3, 40, 640, 128, "swap_split3"), (19, 70, 192, 64, "swap_tile"),
                                         (2, 33, 128, 32, "swap_split3"), (3, 40, 384, 128, "swap_k8"),
                                         (17, 40, 256, 128, "swap_k2"), (19, 70, 192, 64, "swap_k8"),
                                         (5, 40, 640, 64, "swap_k2"), (3, 33, 256, 32, "swap_k4"),
                                         (2, 40, 256, 64, "swap_tile"), (24, 40, 256, 128, "swap_split3"),
                                         (3, 40, 384, 128, "swap_pairs"), (19, 70, 192, 64, "swap_pairs_tile"),
                                         (2, 33, 128, 32, "swap_pairs"), (3, 40, 384, 128, "swap_np"),
                                         (19, 70, 192, 64, "swap_np_tile"), (2, 33, 128, 32, "swap_np"),
                                         (3, 40, 640, 64, "swap_np_u2"), (19, 70, 448, 64, "swap_k8_u2"),
                                         (2, 40, 1152, 128, "swap_pairs_u2")])
def test_interpreter_matches_reference(monkeypatch, poisoned, dtype, M, N, K, g, cfg):
    monkeypatch.setenv("PIPELINE_KERNELS", "triton")
    w = w4.pack_w4(*make_quant(N, K, g), g)
    x = torch.randn(M, K).to(dtype)
    bias = torch.randn(N).to(dtype) if M % 2 else None
    y = w4.w4a16_linear(x, w, bias, config=INTERP_CONFIGS[cfg])
    assert y.shape == (M, N) and y.dtype == dtype
    assert rel_err(y, ref64(x, w, bias)) < TOL[dtype]
    # fresh partials every call: a second call gives the same result
    assert torch.allclose(w4.w4a16_linear(x, w, bias, config=INTERP_CONFIGS[cfg]), y, rtol=1e-3, atol=1e-3)


@pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter test runs on CPU machines")
@pytest.mark.parametrize("cfg", ["dequant_cublas", "dequant_cublas_nk"])
def test_interpreter_dequant_path_and_batch_dims(monkeypatch, cfg):
    """Dequantize then cuBLAS (here torch's CPU matmul), with the scratch as W^T (K, N) or as W (N, K); a partial
    column block (N = 200 of 128-wide programs) and a bias on the second."""
    monkeypatch.setenv("PIPELINE_KERNELS", "triton")
    w = w4.pack_w4(*make_quant(24, 128, 32), 32)
    x = torch.randn(2, 3, 128).half()
    y = w4.w4a16_linear(x, w, config=cfg)
    assert y.shape == (2, 3, 24)
    assert rel_err(y, ref64(x, w)) < TOL[torch.float16]
    w = w4.pack_w4(*make_quant(200, 256, 64), 64)
    x, bias = torch.randn(5, 256).half(), torch.randn(200).half()
    assert rel_err(w4.w4a16_linear(x, w, bias, config=cfg), ref64(x, w, bias)) < TOL[torch.float16]


# ----------------------------------------------------------------------------------------- GPU
LLAMA = [(4096, 12288), (4096, 4096), (4096, 22016), (11008, 4096)]  # (K, N)


@gpu
@needs_cuda
@pytest.mark.parametrize("K,N", LLAMA)
def test_gpu_real_sizes_every_config(poisoned, K, N):
    w = w4.pack_w4(*make_quant(N, K, 128), 128).to("cuda")
    bias = torch.randn(N, device="cuda").half()
    for M in (1, 4, 16, 64, 256, 2048):
        x = torch.randn(M, K, device="cuda").half()
        ref = ref64(x, w, bias)
        for name in w4.candidates(M):
            y = w4.w4a16_linear(x, w, bias, config=name)
            err = rel_err(y, ref)
            assert err < TOL[x.dtype], f"M={M} K={K} N={N} config {name}: rel err {err:.2e}"
        y = w4.w4a16_linear(x, w, bias)  # tuned choice
        assert rel_err(y, ref) < TOL[x.dtype]
        assert rel_err(w4.w4a16_linear(x, w, bias), ref) < TOL[x.dtype]  # repeatable


@gpu
@needs_cuda
@pytest.mark.parametrize("K,N", LLAMA)
def test_gpu_bf16(poisoned, K, N):
    w = w4.pack_w4(*make_quant(N, K, 128), 128).to("cuda")
    for M, name in ((1, "gemv_n64_c4"), (1, "wide_n128_s2"), (3, "wide_n64_s4_h2"), (16, "gemv_n128_c8_sl"),
                    (64, "tile_m32_n64_c4_sl"), (2048, "dequant_cublas"), (16, "swap_m16_n64_c4"),
                    (256, "swap_m128_n128_c1"), (256, "swap_m128_n64_c1_k8"),
                    (64, "swap_m64_n64_c4_k8")):
        x = torch.randn(M, K, device="cuda").bfloat16()
        err = rel_err(w4.w4a16_linear(x, w, config=name), ref64(x, w))
        assert err < TOL[torch.bfloat16], f"bf16 M={M} {name}: rel err {err:.2e}"


@gpu
@needs_cuda
@pytest.mark.parametrize("K,N", LLAMA)
def test_gpu_group_64_every_config(poisoned, K, N):
    """Groups of 64 (the serving presets'): every candidate at decode and mid sizes (the `_k8` swap configs take
    the folded-scale path there)."""
    w = w4.pack_w4(*make_quant(N, K, 64), 64).to("cuda")
    for M in (1, 16, 32, 64, 256):
        x = torch.randn(M, K, device="cuda").half()
        ref = ref64(x, w)
        for name in w4.candidates(M):
            err = rel_err(w4.w4a16_linear(x, w, config=name), ref)
            assert err < TOL[x.dtype], f"g=64 M={M} K={K} N={N} config {name}: rel err {err:.2e}"
        gu = torch.randn(M, 2 * K, device="cuda").half()
        from pipeline.kernels.norm import silu_mul_ref
        for name in w4.candidates(M):
            err = rel_err(w4.w4a16_linear(gu, w, config=name, act="silu_mul"), ref64(silu_mul_ref(gu), w))
            assert err < TOL[x.dtype], f"g=64 silu_mul M={M} {name}: rel err {err:.2e}"


@gpu
@needs_cuda
@pytest.mark.parametrize("g", [32, 64])
def test_gpu_small_groups_and_odd_shapes(poisoned, g):
    for M, N, K in ((1, 4099, 1024), (7, 333, 512), (130, 1000, 2048)):
        w = w4.pack_w4(*make_quant(N, K, g), g).to("cuda")
        x = torch.randn(M, K, device="cuda").half()
        assert rel_err(w4.w4a16_linear(x, w), ref64(x, w)) < TOL[torch.float16]


@pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter test runs on CPU machines")
@pytest.mark.parametrize("cfg", ["gemv_split3", "sliced_split2", "fma_split3", "tile", "px_split3", "wide_ks2",
                                 "swap_split3", "swap_k8", "swap_pairs", "swap_np"])
def test_interpreter_fused_silu_mul_and_counters_rearmed(monkeypatch, poisoned, cfg):
    """act="silu_mul" equals silu_mul then the GEMM; split-K counters are back to 0 after every launch."""
    from pipeline.kernels.norm import silu_mul_ref
    monkeypatch.setenv("PIPELINE_KERNELS", "triton")
    M, N, K, g = 3, 40, 384, 128
    w = w4.pack_w4(*make_quant(N, K, g), g)
    gate_up = torch.randn(2, M, 2 * K).half()
    y = w4.w4a16_linear(gate_up, w, config=INTERP_CONFIGS[cfg], act="silu_mul")
    assert y.shape == (2, M, N)
    assert rel_err(y, ref64(silu_mul_ref(gate_up), w)) < TOL[torch.float16]
    assert int(arrival_counters(torch.device("cpu"), 1).abs().sum()) == 0
    with pytest.raises(ValueError, match="2 \\* weight K"):
        w4.w4a16_linear(gate_up[..., :K], w, act="silu_mul")
    with pytest.raises(ValueError, match="act='gelu'"):
        w4.w4a16_linear(gate_up, w, act="gelu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter test runs on CPU machines")
def test_interpreter_unfused_swiglu_candidate(monkeypatch, poisoned):
    """act="silu_mul" calls also offer the tuner the product as its own kernel + the plain GEMM (UNFUSED, by name
    like any config): same result; plain calls do not offer it."""
    from pipeline.kernels.norm import silu_mul_ref
    monkeypatch.setenv("PIPELINE_KERNELS", "triton")
    M, N, K, g = 5, 40, 256, 64
    w = w4.pack_w4(*make_quant(N, K, g), g)
    gate_up = torch.randn(M, 2 * K).half()
    y = w4.w4a16_linear(gate_up, w, config=w4.UNFUSED, act="silu_mul")
    assert rel_err(y, ref64(silu_mul_ref(gate_up), w)) < TOL[torch.float16]
    offered = {}
    monkeypatch.setattr(w4.TUNER, "choose", lambda key, names, launch, default, device: offered.setdefault(
        key[7], tuple(names)) and default)
    w4._choose(gate_up, w, None, torch.float16, act=True)
    w4._choose(gate_up[:, :K], w, None, torch.float16, act=False)
    assert w4.UNFUSED in offered[True] and w4.UNFUSED not in offered[False]
    monkeypatch.setenv("PIPELINE_W4A16_UNFUSED", "0")
    offered.clear()
    w4._choose(gate_up, w, None, torch.float16, act=True)
    assert w4.UNFUSED not in offered[True]


def test_streamk_tiles_offered_at_decode_rows_unless_switched_off(monkeypatch):
    """The tuner offers the stream-K tiles from 16 to 64 rows; PIPELINE_W4A16_STREAMK=0 leaves every one out."""
    w = w4.pack_w4(*make_quant(64, 256, 64), 64)
    offered = []
    monkeypatch.setattr(w4.TUNER, "tuned", {})
    monkeypatch.setattr(w4.TUNER, "choose",
                        lambda key, names, launch, default, device: offered.append(names) or default)
    for M in (16, 32, 64, 128):
        w4._choose(torch.randn(M, 256).half(), w, None, torch.float16)
    assert [any(n.startswith("swapk_") for n in names) for names in offered] == [True, True, True, False]
    monkeypatch.setenv("PIPELINE_W4A16_STREAMK", "0")
    offered.clear()
    w4._choose(torch.randn(16, 256).half(), w, None, torch.float16)
    assert not any(n.startswith(("swapk_", "glk_")) for n in offered[0])


@gpu
@needs_cuda
@pytest.mark.parametrize("g", [64, 128])
def test_gpu_streamk_every_config_real_sizes(poisoned, g):
    """The stream-K tiles alone (a short first check on a GPU, before they are timed): every `swapk_*` config at the
    Llama-7B shapes and the rows it is offered at, plain and with the fused SwiGLU, with a bias at odd rows."""
    from pipeline.kernels.norm import silu_mul_ref
    names = [n for n in w4.CONFIGS if n.startswith("swapk_")]
    for K, N in LLAMA:
        w = w4.pack_w4(*make_quant(N, K, g), g).to("cuda")
        bias = torch.randn(N, device="cuda").half()
        for M in (16, 9, 32, 33, 64):
            x, gu = torch.randn(M, K, device="cuda").half(), torch.randn(M, 2 * K, device="cuda").half()
            b = bias if M % 2 else None
            ref, ref_act = ref64(x, w, b), ref64(silu_mul_ref(gu), w)
            for name in (n for n in names if w4.CONFIGS[n][1] <= max(16, M) * 2):
                err = rel_err(w4.w4a16_linear(x, w, b, config=name), ref)
                assert err < TOL[x.dtype], f"g={g} M={M} K={K} N={N} {name}: rel err {err:.2e}"
                err = rel_err(w4.w4a16_linear(gu, w, config=name, act="silu_mul"), ref_act)
                assert err < TOL[x.dtype], f"g={g} silu_mul M={M} K={K} N={N} {name}: rel err {err:.2e}"


@gpu
@needs_cuda
def test_gpu_fused_silu_mul_every_decode_config(poisoned):
    from pipeline.kernels.norm import silu_mul_ref
    K, N = 11008, 4096
    w = w4.pack_w4(*make_quant(N, K, 128), 128).to("cuda")
    for M in (1, 4, 16, 64, 256):
        gate_up = torch.randn(M, 2 * K, device="cuda").half()
        ref = ref64(silu_mul_ref(gate_up), w)
        for name in w4.candidates(M) + (w4.UNFUSED,):
            err = rel_err(w4.w4a16_linear(gate_up, w, config=name, act="silu_mul"), ref)
            assert err < TOL[torch.float16], f"M={M} config {name}: rel err {err:.2e}"
    assert int(arrival_counters(torch.device("cuda", torch.cuda.current_device()), 1).abs().sum()) == 0


@gpu
@needs_cuda
def test_gpu_split_k_bit_identical_over_many_launches():
    """The in-kernel split-K finish sums partials in split order: every launch gives the same bits (a
    cross-program ordering race would show up as a differing call)."""
    w = w4.pack_w4(*make_quant(12288, 4096, 128), 128).to("cuda")
    for M, name in ((1, "gemv_n32_c8_sl"), (4, "gemv_n64_c8_sl"), (3, "fma_n64_c8"), (16, "gemv_n64_c4"),
                    (16, "swapk_m16_n64_c2_np"), (32, "swapk_m32_n64_c4_np")):   # stream-K: parts in run order
        x = torch.randn(M, 4096, device="cuda").half()
        first = w4.w4a16_linear(x, w, config=name)
        outs = [w4.w4a16_linear(x, w, config=name) for _ in range(300)]
        bad = sum(not torch.equal(o, first) for o in outs)
        assert bad == 0, f"M={M} {name}: {bad}/300 launches differ from the first"
        assert rel_err(first, ref64(x, w)) < TOL[torch.float16]


def test_swap_pipeline_depth_fits_shared_memory():
    """The fused SwiGLU reads gate and up tiles: the deepest swap configs drop stages instead of failing to compile
    (a 256-row tile with 3 stages needed 305 KB of the H100's 227 KB)."""
    assert w4._swap_stages(128, 128, 128, 3, False, 2) == 3
    assert w4._swap_stages(256, 128, 128, 3, False, 2) == 3
    assert w4._swap_stages(256, 128, 128, 3, True, 2) == 1
    for name, cfg in w4.CONFIGS.items():
        if cfg and cfg[0] in ("swap", "swapk"):
            _, BM, BN, _, _, stages, *_ = cfg
            for act in (False, True):
                depth = w4._swap_stages(BM, BN, 128, stages, act, 2)
                assert 1 <= depth <= stages and depth * (BN * 64 + BM * 256 * (2 if act else 1)) <= 220 * 1024, name


def test_streamk_runs_cover_every_step_once_and_parts_bound_the_tiles():
    """Stream-K (`w4a16_streamk`): the programs' runs [p T // P, (p + 1) T // P) tile the steps, `owner` names the run
    that holds each step, and `max_parts` is at least the programs any tile is cut between (brute force)."""
    from pipeline.kernels import w4a16_streamk as sk
    for tiles, G, n_sm, ctas in [(1, 1, 132, 2), (3, 5, 4, 1), (192, 64, 132, 2), (64, 32, 132, 4), (7, 172, 132, 2),
                                 (344, 64, 132, 4), (5, 3, 2, 8)]:
        T, P = tiles * G, sk.programs(tiles, G, n_sm, ctas)
        assert 1 <= P <= n_sm * ctas and (P == 1 or T // P >= 2)
        runs = [range(p * T // P, (p + 1) * T // P) for p in range(P)]
        assert sorted(i for r in runs for i in r) == list(range(T)) and all(len(r) >= 1 for r in runs)
        assert all(sk.owner(i, T, P) == p for p, r in enumerate(runs) for i in r)
        parts = max(sk.owner(t * G + G - 1, T, P) - sk.owner(t * G, T, P) + 1 for t in range(tiles))
        assert parts <= sk.max_parts(tiles, G, P) <= P
        assert sk.plan(tiles, G, n_sm, ctas) == (P, sk.max_parts(tiles, G, P))
    with pytest.raises(ValueError, match="overflow int32"):   # the kernels' step arithmetic is int32
        sk.plan(200_000, 1_000, 132, 4)


@pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter test runs on CPU machines")
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("M,N,K,g,cfg", [(1, 40, 192, 64, ("swapk", 16, 32, 2, 4, 1, 8, 2)),
                                         (3, 72, 640, 128, ("swapk", 16, 32, 3, 4, 1, 8, 0)),
                                         (19, 70, 384, 64, ("swapk", 16, 32, 1, 4, 1, 8, 1)),
                                         (5, 33, 256, 32, ("swapk", 16, 32, 4, 4, 1, 8, 2)),
                                         (2, 200, 128, 128, ("swapk", 16, 64, 1, 4, 1, 8, 0)),
                                         (24, 40, 1152, 128, ("swapk", 32, 32, 2, 4, 1, 8, 1)),
                                         (1, 40, 192, 64, ("swapk", 16, 32, 2, 4, 1, 8, 2, 1)),
                                         (19, 70, 384, 64, ("swapk", 16, 32, 1, 4, 1, 8, 1, 1)),
                                         (2, 200, 128, 128, ("swapk", 16, 64, 1, 4, 1, 8, 0, 1)),
                                         (24, 40, 1152, 128, ("swapk", 32, 32, 2, 4, 1, 8, 1, 1))])
def test_interpreter_streamk_matches_reference(monkeypatch, poisoned, dtype, M, N, K, g, cfg):
    """The stream-K swap tile over odd shapes, one loop over a run's steps or a loop over its tiles around one over
    groups (`_nl`): tiles whole in one run, cut between two or more runs (partials summed by the last to arrive),
    several tiles a run, partial row and column tiles; the same result on a second call, counters back to 0; with
    the fused SwiGLU too."""
    from pipeline.kernels.norm import silu_mul_ref
    monkeypatch.setenv("PIPELINE_KERNELS", "triton")
    w = w4.pack_w4(*make_quant(N, K, g), g)
    x = torch.randn(M, K).to(dtype)
    bias = torch.randn(N).to(dtype) if M % 2 else None
    y = w4.w4a16_linear(x, w, bias, config=cfg)
    assert y.shape == (M, N) and y.dtype == dtype
    assert rel_err(y, ref64(x, w, bias)) < TOL[dtype]
    assert torch.equal(w4.w4a16_linear(x, w, bias, config=cfg), y)
    assert int(arrival_counters(torch.device("cpu"), 1).abs().sum()) == 0
    if dtype == torch.float16:
        gate_up = torch.randn(M, 2 * K).half()
        assert rel_err(w4.w4a16_linear(gate_up, w, config=cfg, act="silu_mul"), ref64(silu_mul_ref(gate_up), w)) \
            < TOL[dtype]


@pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter test runs on CPU machines")
def test_streamk_refuses_a_dot_under_16(monkeypatch):
    monkeypatch.setenv("PIPELINE_KERNELS", "triton")
    w = w4.pack_w4(*make_quant(40, 128, 32), 32)
    with pytest.raises(ValueError, match="kw \\* g/8 = 8 < 16"):
        w4.w4a16_linear(torch.randn(2, 128), w, config=("swapk", 16, 32, 2, 4, 1, 2, 0))


def test_tuner_row_buckets_have_a_half_step_where_flops_bound():
    """A mixed step of a prefix-cache hit (~190 rows) gets a choice tuned at 192 rows, not one tuned at 256 (two
    128-row tiles computing 256); decode sizes keep power-of-two buckets; the warm-up list covers every bucket."""
    b = w4._m_bucket
    assert [b(m) for m in (1, 3, 12, 17, 24, 33, 64)] == [1, 4, 16, 32, 32, 64, 64]
    assert [b(m) for m in (65, 96, 97, 129, 186, 192, 193, 300, 385, 2048)] == [96, 96, 128, 192, 192, 192, 256, 384,
                                                                                  512, 2048]
    sizes = w4.tuning_sizes(2048)
    assert sizes == [1, 2, 4, 8, 16, 32, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048]
    assert {b(m) for m in range(1, 2049)} == set(sizes)
    assert w4.tuning_sizes(100)[-2:] == [96, 100] and w4.tuning_sizes(1) == [1]   # a limit off the buckets: itself


def test_every_named_config_is_tuned_somewhere():
    """The GPU every-config test walks `candidates(M)`: a name outside every set would never be compiled in a test."""
    from pipeline.kernels import w4a16_configs as c
    tuned = {n for M in (1, 2, 4, 8, 16, 32, 64, 128, 2048) for n in c.candidates(M)} | set(c.WIDE_SET)
    assert set(c.CONFIGS) == tuned
    assert all(c.default_config(M) in c.CONFIGS for M in (1, 16, 64, 256))


@pytest.mark.slow
@pytest.mark.skipif(not __import__("triton").__version__.startswith("3.6."),
                    reason="sm_90 SASS checked with Triton 3.6")
@pytest.mark.parametrize("name,g", [("swapk_m16_n64_c2_np", 64), ("swapk_m16_n64_c2_pr", 128),
                                    ("swapk_m16_n64_c4_k8", 64), ("swapk_m32_n64_c2_np", 64),
                                    ("swapk_m16_n64_c4_np", 128), ("swapk_m64_n64_c2_np", 64),
                                    ("swapk_m16_n64_c2_np_nl", 64), ("swapk_m32_n64_c2_np_nl", 128)])
def test_offline_sm90_streamk_loop_is_pipelined(name, g):
    """The stream-K loop streams through a cp.async ring across its tile ends (LDGSTS in the main loop and a wait that
    leaves groups in flight), with no spills: the split finish after the loop, not in it (a barrier in the loop kept
    Triton 3.6 from pipelining it: plain LDGs, each group's loads waited for at once); and its programs an SM fit
    one wave."""
    from sm90_sass import measure
    r = measure("swapk", name, str(g))
    assert r["ldgsts"] >= 4 and r["depbar"] and all(int(d.rsplit("0x", 1)[1], 16) > 0 for d in r["depbar"]), r
    assert r["wgmma"] >= 1 and not r["local"], r
    if name.endswith("_nl"):   # the accumulator is not read in the pipelined loop: its wgmmas are not each waited for
        assert not r["wait_all_wgmma"], r
    ctas = w4.CONFIGS[name][3]   # one wave: the programs an SM it asks for fit its registers and shared memory
    assert ctas * -(-r["regs"] // 8) * 8 * 32 * r["warps"] <= 65536 and ctas * (r["smem"] + 1024) <= 228 * 1024, r


@pytest.mark.slow
@pytest.mark.skipif(not __import__("triton").__version__.startswith("3.6."),
                    reason="sm_90 SASS checked with Triton 3.6")
@pytest.mark.parametrize("g", [64, 128])
@pytest.mark.parametrize("name,base", [("swap_m16_n64_c8_pr", "swap_m16_n64_c8_k8"),
                                       ("swap_m32_n64_c4_pr", "swap_m32_n64_c4_k8"),
                                       ("swap_m32_n128_c2_pr", "swap_m32_n128_c2_k8")])
def test_offline_sm90_pair_unpack_cuts_the_loop(name, base, g):
    """The pair unpack compiles for sm_90 (one lop3 per two weights in the PTX, no spills) and its main loop has
    at least 15% fewer instructions than the same tile's plane unpack (measured 21-40%)."""
    from sm90_sass import measure
    pr, base = measure("swap", name, str(g)), measure("swap", base, str(g))
    assert pr["pair_lop3"] >= 4 and not pr["local"] and not base["local"]
    assert 0 < pr["loop"] <= 0.85 * base["loop"], (pr, base)


@pytest.mark.slow
@pytest.mark.skipif(not __import__("triton").__version__.startswith("3.6."),
                    reason="sm_90 SASS checked with Triton 3.6")
@pytest.mark.parametrize("name,base", [("swap_m16_n64_c8_np", "swap_m16_n64_c8_k8"),
                                       ("swap_m32_n64_c4_np", "swap_m32_n64_c4_k8")])
def test_offline_sm90_natural_pairs_keep_the_activations_as_loaded(name, base):
    """Natural pairs (`_np`): the main loop has no shared-memory permutation of the activations (no STS, no MEMBAR),
    no wait for every wgmma, no spills, and fewer instructions than the same tile's plane unpack (`_k8`)."""
    from sm90_sass import measure
    np_, k8 = measure("swap", name, "64"), measure("swap", base, "64")
    assert not np_["sts"] and not np_["membar"] and not np_["wait_all_wgmma"] and not np_["local"], np_
    assert np_["pair_lop3"] >= 4 and 0 < np_["loop"] < k8["loop"], (np_, k8)


@pytest.mark.slow
@pytest.mark.skipif(not __import__("triton").__version__.startswith("3.6."),
                    reason="sm_90 SASS checked with Triton 3.6")
@pytest.mark.parametrize("name,base", [("swap_m16_n64_c4_np_u2", "swap_m16_n64_c4_np"),
                                       ("swap_m16_n64_c4_pr_u2", "swap_m16_n64_c4_pr"),
                                       ("swap_m32_n64_c4_k8_u2", "swap_m32_n64_c4_k8")])
def test_offline_sm90_unrolled_group_loop_costs_fewer_instructions_a_group(name, base):
    """`_u2`: the group loop unrolled twice before pipelining; its main loop (two groups) has at least 10% fewer
    instructions a group than the same tile's loop of one group (measured 14-23%), and no spills."""
    from sm90_sass import measure
    u2, one = measure("swap", name, "64"), measure("swap", base, "64")
    assert not u2["local"] and 0 < u2["loop"] / 2 <= 0.9 * one["loop"], (u2, one)
