"""Gluon W4A16 kernel (sm_90): odd shapes against the reference on an H100, and every config compiling offline.

    python -m pytest -m gpu tests/test_kernel_w4a16_gluon.py   # on an sm_90 GPU
    python -m pytest -m slow tests/test_kernel_w4a16_gluon.py  # offline sm_90 compile (Triton 3.6, no GPU needed)
"""
import pytest
import torch

from pipeline.kernels import w4a16 as w4
from pipeline.kernels import w4a16_configs as c
from pipeline.kernels import w4a16_gluon as wg
from pipeline.kernels import w4a16_gluon_gemv as wv
from tests.test_kernel_w4a16 import TOL, make_quant, ref64, rel_err

on_sm90 = pytest.mark.skipif(not (torch.cuda.is_available() and wg.available(torch.device("cuda"))),
                             reason="needs an sm_90 GPU with Gluon")
COMPILED_WITH = "3.6."  # the Triton the kernel is written against (its Gluon API moves between releases)


def test_every_gluon_config_is_a_candidate_and_fits():
    names = {n for M in (16, 32, 64, 128, 2048) for n in c.gluon_candidates(M)}
    assert names == set(wg.GLUON_CONFIGS)
    assert c.gluon_candidates(1) == c.gluon_candidates(8) == ()
    for name, (BM, BN, KT, stages, warps, _, _) in wg.GLUON_CONFIGS.items():
        assert BM % 8 == 0 and BM <= 256 and BN % (16 * warps) == 0, name
        assert wg.fits(name, 128, False), f"{name} does not serve g = 128"
        for g in (32, 64, 128):
            if wg.fits(name, g, False):
                assert wg.stages_for(BM, BN, KT, g, stages) * (BM * g * 2 + KT * BN * 4) <= wg.SMEM_BYTES, (name, g)
    assert not wg.fits("gl_m256_n128_k16_s3", 128, True)  # the SwiGLU's gate, up and product tiles: too big


def test_every_gemv_config_serves_the_llama_shapes_at_group_64_and_128():
    """The TMA GEMVs' stages are whole groups filling their consumer warps' rows: each config takes K = 4096 at both
    group sizes, and the tuner never offers one where K's groups do not split into whole stages."""
    for name in wv.GEMV_CONFIGS:
        assert wv.fits(name, 64, 4096) and wv.fits(name, 128, 4096), name
    for name, (_, rows, *_) in wv.GEMV_CONFIGS.items():          # K = 11008: 86 groups of 128, 172 of 64
        assert wv.fits(name, 128, 11008) == (86 % (rows // 16) == 0) and wv.fits(name, 64, 11008) == (
            172 % (rows // 8) == 0), name


def test_not_available_off_sm90(monkeypatch):
    assert not wg.available(torch.device("cpu"))
    monkeypatch.setattr(wg, "available", lambda d: True)
    monkeypatch.delenv("PIPELINE_W4A16_GLUON", raising=False)
    monkeypatch.delenv("PIPELINE_W4A16_GLUON_GEMV", raising=False)
    assert wg.enabled("cuda") and not wg.gemv_enabled("cuda")   # on by default; the one-row GEMVs opt-in
    monkeypatch.setenv("PIPELINE_W4A16_GLUON_GEMV", "1")
    assert wg.gemv_enabled("cuda")
    monkeypatch.setenv("PIPELINE_W4A16_GLUON", "0")
    assert not wg.enabled("cuda") and not wg.gemv_enabled("cuda")
    monkeypatch.undo()
    monkeypatch.setattr(wg, "device_capability", lambda d: (8, 0))
    assert not wg.available(torch.device("cuda"))


@pytest.mark.gpu
@on_sm90
@pytest.mark.parametrize("g,dtype", [(128, torch.float16), (128, torch.bfloat16), (64, torch.float16),
                                     (32, torch.float16)])
def test_gpu_gluon_odd_shapes(g, dtype):
    """N not a multiple of any tile, K a multiple of the group; the configs tuned at each M (split-K at small M),
    a bias at odd M."""
    for N, K in ((1000, 1024), (4100, 768)):
        w = w4.pack_w4(*make_quant(N, K, g, seed=N + g), g).to("cuda")
        bias = torch.randn(N, device="cuda").to(dtype)
        for M in (16, 17, 33, 64, 256, 2048):
            x = torch.randn(M, K, device="cuda").to(dtype)
            b = bias if M % 2 else None
            ref = ref64(x, w, b)
            for name in c.gluon_candidates(M):
                if not wg.fits(name, g, False):
                    continue
                y = wg.w4a16_gluon_linear(x, w, b, config=name)
                assert y.shape == (M, N) and y.dtype == dtype
                err = rel_err(y, ref)
                assert err < TOL[dtype], f"{name} g={g} M={M} N={N} K={K} {dtype}: rel err {err:.2e}"


@pytest.mark.gpu
@on_sm90
def test_gpu_gluon_tail_split_whole_waves_then_split_tiles():
    """Split-0 configs (`_tl`): a grid of whole tiles for the full waves, then the last partial wave's tiles split
    along K: 5 tiles past one wave of this GPU's SMs, and fewer tiles than SMs (every tile split); against the
    reference, with a bias, the same bits on every launch."""
    from pipeline.kernels.dispatch import sm_count
    n_sm, g, K = sm_count(torch.device("cuda"), cpu=4), 128, 1024
    assert wg.tail_split(n_sm + 5, K // g, n_sm) == (n_sm, K // g)
    for N, M in ((128 * (n_sm + 5), 128), (1000, 256)):
        w = w4.pack_w4(*make_quant(N, K, g, seed=N), g).to("cuda")
        x, bias = torch.randn(M, K, device="cuda").half(), torch.randn(N, device="cuda").half()
        ref = ref64(x, w, bias)
        y = wg.w4a16_gluon_linear(x, w, bias, config="gl_m128_n128_k16_s4_ws_tl")
        assert rel_err(y, ref) < TOL[torch.float16], N
        assert all(torch.equal(wg.w4a16_gluon_linear(x, w, bias, config="gl_m128_n128_k16_s4_ws_tl"), y)
                   for _ in range(20))


def test_tail_split_fills_about_one_wave_and_leaves_no_split_empty():
    assert wg.tail_split(172, 32, 132) == (132, 3)      # 4096 x 22016 at M = 256, 128 x 128 tiles: 132 + 40 x 3
    assert wg.tail_split(264, 32, 132) == (264, 1)      # whole waves: nothing split
    assert wg.tail_split(64, 32, 132) == (0, 2)         # one partial wave: every tile in 2
    assert wg.tail_split(140, 5, 132) == (132, 5)       # the split never exceeds the groups
    n_full, split = wg.tail_split(140, 86, 132)
    assert (n_full, split) == (132, 15) and (split - 1) * -(-86 // split) < 86     # no empty split of 86 groups


@pytest.mark.gpu
@on_sm90
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_gluon_operand_is_the_reference_weight(dtype):
    """The MMA's register operand (TMA copies, register layout, dequantization) is dequantize_w4's weight, bit for
    bit, for every config shape and group size; N = 200 leaves a partial tile."""
    for g in (32, 64, 128):
        w = w4.pack_w4(*make_quant(200, 256, g, seed=g), g).to("cuda")
        ref = w4.dequantize_w4(w, dtype)
        for name in wg.GLUON_CONFIGS:
            if wg.fits(name, g, False):
                assert torch.equal(wg.dequantize_gluon(w, dtype, name), ref), (name, g, dtype)


@pytest.mark.gpu
@on_sm90
@pytest.mark.parametrize("g", [128, 64])
def test_gpu_gluon_fused_silu_mul(g):
    """act="silu_mul": x = [gate | up], y = silu(gate) * up @ W^T; every config that fits, odd N."""
    from pipeline.kernels.norm import silu_mul_ref
    N, K = 1000, 1024
    w = w4.pack_w4(*make_quant(N, K, g, seed=g), g).to("cuda")
    for M in (16, 33, 256):
        gu = torch.randn(M, 2 * K, device="cuda").half()
        ref = ref64(silu_mul_ref(gu), w)
        for name in c.gluon_candidates(M):
            if wg.fits(name, g, True):
                err = rel_err(wg.w4a16_gluon_linear(gu, w, config=name, act="silu_mul"), ref)
                assert err < TOL[torch.float16], f"{name} g={g} M={M} silu_mul: rel err {err:.2e}"


@pytest.mark.gpu
@on_sm90
def test_gpu_gluon_tuned_through_w4a16_linear_and_repeatable(monkeypatch):
    """Opted in, the tuner times the gluon configs next to the Triton ones; split-K launches give the same bits."""
    monkeypatch.setenv("PIPELINE_W4A16_GLUON", "1")
    K, N = 4096, 4096
    w = w4.pack_w4(*make_quant(N, K, 128, seed=1), 128).to("cuda")
    for M in (16, 64, 256):
        x = torch.randn(M, K, device="cuda").half()
        y = w4.w4a16_linear(x, w)
        assert rel_err(y, ref64(x, w)) < TOL[torch.float16]
        _, ms = w4.tuning_record(x, w)
        assert set(c.gluon_candidates(M)) <= set(ms), f"M={M}: gluon configs not timed ({sorted(ms)})"
        name = c.gluon_candidates(M)[0]
        first = w4.w4a16_linear(x, w, config=name)
        assert all(torch.equal(w4.w4a16_linear(x, w, config=name), first) for _ in range(50)), name
    with pytest.raises(ValueError, match="unsupported"):  # the 256-row tile's SwiGLU buffers exceed shared memory
        wg.w4a16_gluon_linear(torch.randn(256, 2 * K, device="cuda").half(), w, config="gl_m256_n128_k16_s3",
                              act="silu_mul")


@pytest.mark.gpu
@on_sm90
@pytest.mark.parametrize("g", [64, 128])
@pytest.mark.parametrize("pdl", [False, True])
def test_gpu_gluon_gemv_matches_reference(g, pdl):
    """Every TMA GEMV config on one row against the reference, plain and with the fused SwiGLU: the four Llama-2-7B
    linears (split-K and the bias) and N not a multiple of the tile (TMA zero-fills the columns past N); repeat
    launches give the same bits."""
    for K, N in ((4096, 12288), (4096, 4096), (4096, 22016), (11008, 4096), (1024, 4100)):
        w = w4.pack_w4(*make_quant(N, K, g, seed=K + N), g).to("cuda")
        x = torch.randn(1, K, device="cuda").half()
        bias = torch.randn(N, device="cuda").half()
        ref = ref64(x, w, bias)
        gu = torch.randn(1, 2 * K, device="cuda").half()
        from pipeline.kernels.norm import silu_mul_ref
        ref_act = ref64(silu_mul_ref(gu), w, bias)
        for name in wv.GEMV_CONFIGS:
            if not wv.fits(name, g, K):
                continue
            y = wv.w4a16_gluon_gemv(x, w, bias, config=name, pdl=pdl)
            assert rel_err(y, ref) < TOL[torch.float16], f"{name} g={g} K={K} N={N}: {rel_err(y, ref):.2e}"
            assert all(torch.equal(wv.w4a16_gluon_gemv(x, w, bias, config=name, pdl=pdl), y) for _ in range(5))
            y = wv.w4a16_gluon_gemv(gu, w, bias, config=name, pdl=pdl, act="silu_mul")   # the fused SwiGLU
            assert rel_err(y, ref_act) < TOL[torch.float16], f"{name} silu_mul g={g} K={K}: {rel_err(y, ref_act):.2e}"


@pytest.mark.gpu
@on_sm90
def test_gpu_gluon_gemv_tuned_at_one_row(monkeypatch):
    """Opted in, the tuner times the TMA GEMVs beside the wide Triton GEMVs for one row (and not for two)."""
    monkeypatch.setenv("PIPELINE_W4A16_GLUON_GEMV", "1")
    w = w4.pack_w4(*make_quant(4096, 4096, 64, seed=5), 64).to("cuda")
    for M, want in ((1, True), (2, False)):
        x = torch.randn(M, 4096, device="cuda").half()
        assert rel_err(w4.w4a16_linear(x, w), ref64(x, w)) < TOL[torch.float16]
        _, ms = w4.tuning_record(x, w)
        assert (set(wv.GEMV_CONFIGS) <= set(ms)) == want, sorted(ms)


offline = pytest.mark.skipif(not (wg.HAVE_GLUON and __import__("triton").__version__.startswith(COMPILED_WITH)),
                             reason=f"offline compile checked with Triton {COMPILED_WITH}x only")


def compile_sm90(fn, sig: dict, cst: dict, warps: int):
    """Compile Gluon kernel fn for sm_90 without a GPU (sig: argument -> type string; cst: the constexprs)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource
    sig = {**sig, **{k: "constexpr" for k in cst}}
    src = GluonASTSource(fn=fn, signature=sig, constexprs={(list(sig).index(k),): v for k, v in cst.items()})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})


def q_desc_type(BM, BN, KT, g, N=4096, K=4096):
    from triton.runtime.jit import mangle_type
    q_l = wg.layouts(BM, BN, KT, g, torch.float16)[1]
    return mangle_type(wg.TensorDescriptor(torch.empty(K // 8, N, dtype=torch.int32), [K // 8, N], [N, 1],
                                           [g // 8, BN], q_l))


@pytest.mark.slow
@offline
@pytest.mark.parametrize("name", list(wg.GLUON_CONFIGS))
def test_offline_sm90_compile_every_config(name):
    """Each config compiles to an sm_90 cubin without a GPU: async register-operand wgmma, wait_group 1, TMA; and
    ptxas keeps those wgmmas pipelined: one in flight while the next slice is dequantized, the SASS waiting for at
    most one (`WARPGROUP.DEPBAR.LE gsb0, 0x1`). Until 2026-12-07 it serialized the 256-row tiles at 8 warps with
    split K or a producer warp (C7515, a wait for 0 after every HGMMA): the loop's zero-trip path (see _consume)."""
    from triton.runtime.jit import mangle_type
    BM, BN, KT, stages, warps, split, ws = wg.GLUON_CONFIGS[name]
    g, K = 128, 4096
    x_l = wg.layouts(BM, BN, KT, g, torch.float16)[0]
    xd = wg.TensorDescriptor(torch.empty(64, K, dtype=torch.float16), [64, K], [K, 1], [BM, KT], x_l)
    sig = {"x_desc": mangle_type(xd), "q_desc": q_desc_type(BM, BN, KT, g), "s_ptr": "*fp16", "z_ptr": "*fp16",
           "b_ptr": "*fp16", "y_ptr": "*fp16", "ws_ptr": "*fp32", "cnt_ptr": "*i32", "M": "i32", "N": "i32",
           "K": "i32", "stride_ym": "i32", "split_k": "i32", "n_full": "i32"}
    cst = dict(GROUP=g, BLOCK_M=BM, BLOCK_N=BN, KT=KT, STAGES=wg.stages_for(BM, BN, KT, g, stages),
               SPLIT=split != 1, HAS_BIAS=True, DKIND=1, ACT=False, WS=bool(ws), num_warps=warps, TAIL=split == 0)
    k = compile_sm90(wg._kernel, sig, cst, warps)
    ptx = k.asm["ptx"]
    assert len(k.asm["cubin"]) > 0 and k.metadata.shared <= wg.SMEM_BYTES + 1024
    # one wait(1) per MMA slice (g // KT a group): the next slice is dequantized while this one runs
    assert ptx.count("wgmma.wait_group.sync.aligned 1;") == g // KT and ptx.count("wgmma.mma_async") % (g // KT) == 0
    assert "cp.async.bulk.tensor.2d" in ptx and "mbarrier.try_wait" in ptx
    assert ("setmaxnreg.dec.sync.aligned.u32" in ptx) == bool(ws)  # the producer warp gives its registers away
    from tests.sm90_sass import ptxas_info, sass_text
    info = ptxas_info(ptx)
    assert "C7515" not in info, info
    assert "WARPGROUP.DEPBAR.LE gsb0, 0x1" in sass_text(k.asm["cubin"])


@pytest.mark.slow
@offline
@pytest.mark.parametrize("name", ["gl_m16_n128_k16_s4_c4", "gl_m32_n128_k16_s4_c4", "gl_m64_n64_k16_s4_c2_ws"])
@pytest.mark.parametrize("act", [False, True])
def test_offline_pdl_streams_weights_before_the_wait(name, act):
    """With PDL the kernel lets the next one launch first thing, issues the first groups' weight copies (TMA) before
    `griddepcontrol.wait` and every activation copy after it (the warp-specialized variant waits before it forks)."""
    from triton.runtime.jit import mangle_type
    BM, BN, KT, stages, warps, split, ws = wg.GLUON_CONFIGS[name]
    g, K = 128, 4096
    x_l = wg.layouts(BM, BN, KT, g, torch.float16)[0]
    xd = wg.TensorDescriptor(torch.empty(64, 2 * K, dtype=torch.float16), [64, 2 * K], [2 * K, 1], [BM, KT], x_l)
    sig = {"x_desc": mangle_type(xd), "q_desc": q_desc_type(BM, BN, KT, g), "s_ptr": "*fp16", "z_ptr": "*fp16",
           "b_ptr": "*fp16", "y_ptr": "*fp16", "ws_ptr": "*fp32", "cnt_ptr": "*i32", "M": "i32", "N": "i32",
           "K": "i32", "stride_ym": "i32", "split_k": "i32", "n_full": "i32"}
    cst = dict(GROUP=g, BLOCK_M=BM, BLOCK_N=BN, KT=KT, STAGES=wg.stages_for(BM, BN, KT, g, stages, act),
               SPLIT=split != 1, HAS_BIAS=False, DKIND=1, ACT=act, WS=bool(ws), num_warps=warps, PDL=True,
               TAIL=split == 0)
    k = compile_sm90(wg._kernel, sig, cst, warps)
    ptx = k.asm["ptx"]
    from tests.sm90_sass import ptxas_info
    assert "C7515" not in ptxas_info(ptx)   # wgmmas pipelined, the SwiGLU's product tiles too
    launch, wait = ptx.find("griddepcontrol.launch_dependents"), ptx.find("griddepcontrol.wait")
    assert 0 <= launch < wait
    copies = [i for i in range(len(ptx)) if ptx.startswith("cp.async.bulk.tensor", i)]
    before = [i for i in copies if i < wait]
    if ws:
        assert not before
    else:   # the packed-weight copies of the prologue's STAGES - 1 groups (KW of them a group; x's are all after)
        P = g // 8
        assert len(before) == (cst["STAGES"] - 1) * (KT // P), (len(before), cst["STAGES"], KT // P)
    assert len(copies) > len(before)


@pytest.mark.slow
@offline
@pytest.mark.parametrize("name", list(wv.GEMV_CONFIGS))
@pytest.mark.parametrize("g,act", [(64, False), (128, False), (64, True)])
def test_offline_sm90_compile_gemv(name, g, act):
    """Each TMA GEMV config compiles to an sm_90 cubin without a GPU, with PDL: the next kernel released first; the
    consumers' wait before x; without a producer warp, the ring's first copies issued before that wait."""
    from triton.runtime.jit import mangle_type
    BN, rows, stages, warps, split, ws = wv.GEMV_CONFIGS[name]
    K, N = 4096, 4096
    qd = wv.TensorDescriptor(torch.empty(K // 8, N, dtype=torch.int32), [K // 8, N], [N, 1], [rows, BN],
                             wg.packed_layout())
    sig = {"q_desc": mangle_type(qd), "x_ptr": "*fp16", "s_ptr": "*fp16", "z_ptr": "*fp16", "b_ptr": "*fp16",
           "y_ptr": "*fp16", "ws_ptr": "*fp32", "cnt_ptr": "*i32", "N": "i32", "K": "i32", "split_k": "i32"}
    cst = dict(GROUP=g, ROWS=rows, BLOCK_N=BN, STAGES=stages, SPLIT=True, HAS_BIAS=True, PDL=True, WS=bool(ws),
               ACT=act, num_warps=warps)
    k = compile_sm90(wv._gemv, sig, cst, warps)
    ptx = k.asm["ptx"]
    assert len(k.asm["cubin"]) > 0 and k.metadata.shared <= wv.SMEM_BYTES + 1024
    launch, wait = ptx.find("griddepcontrol.launch_dependents"), ptx.find("griddepcontrol.wait")
    assert 0 <= launch < wait
    assert ptx.count("lop3.b32") == 4 * rows * BN // (32 * warps)   # 4 lop3 a packed word, a thread's share
    if not ws:
        assert 0 <= ptx.find("cp.async.bulk.tensor") < wait


@pytest.mark.slow
@offline
@pytest.mark.parametrize("name,g,dtype", [("gl_m16_n64_k16_s4_c4", 128, "fp16"),
                                          ("gl_m128_n128_k32_s3", 64, "bf16"),
                                          ("gl_m64_n64_k16_s4_c2", 32, "fp16"),
                                          ("gl_m128_n256_k16_s3_ws", 128, "bf16")])
def test_offline_operand_reads_the_packed_words_across_rows(name, g, dtype):
    """The register operand's packed words: consecutive k of a thread are BN words apart in the TMA's row-major
    (KT, BN) buffer, so every shared load is a scalar 32-bit one. The s10 bug (Triton 3.6 reading a transposed
    view of an unswizzled NVMMA buffer as untransposed) showed as ld.shared.v2 pairs along k."""
    BM, BN, KT, _, warps, _, _ = wg.GLUON_CONFIGS[name]
    sig = {"q_desc": q_desc_type(BM, BN, KT, g), "s_ptr": "*fp16", "z_ptr": "*fp16", "w_ptr": f"*{dtype}",
           "N": "i32", "K": "i32"}
    cst = dict(GROUP=g, BLOCK_M=BM, BLOCK_N=BN, KT=KT, DKIND=1 if dtype == "fp16" else 2, num_warps=warps)
    ptx = compile_sm90(wg._dequant_kernel, sig, cst, warps).asm["ptx"]
    loads = [ln.split()[0] for ln in ptx.splitlines() if ln.strip().startswith("ld.shared")]
    assert len(loads) == KT * BN // (32 * warps), loads  # each word of the (BN, KT) tile once, one per load
    assert set(loads) == {"ld.shared.b32"}, set(loads)
