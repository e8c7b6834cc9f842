"""The stream-K Gluon W4A16 tile (`w4a16_gluon_sk`): its configs and candidates (CPU), its sm_90 compile (offline,
Triton 3.6), and its outputs against the reference on an sm_90 GPU (marked gpu).

    pytest tests/test_kernel_w4a16_gluon_sk.py                          # CPU
    python -m pytest -m "gpu or slow" tests/test_kernel_w4a16_gluon_sk.py   # the GPU machine / offline compile
"""
import pytest
import torch

from pipeline.kernels import w4a16 as w4
from pipeline.kernels import w4a16_gluon as wg
from pipeline.kernels import w4a16_gluon_sk as sk
from tests.test_kernel_w4a16 import TOL, make_quant, ref64, rel_err
from tests.test_kernel_w4a16_gluon import COMPILED_WITH, compile_sm90, on_sm90, q_desc_type

offline = pytest.mark.skipif(not (wg.HAVE_GLUON and __import__("triton").__version__.startswith(COMPILED_WITH)),
                             reason=f"offline compile checked with Triton {COMPILED_WITH}x only")


def test_every_config_is_a_candidate_fits_and_runs_one_program_an_sm():
    """Every config is offered at some M (16..1024, none below or above), serves groups 64 and 128 in shared memory,
    and asks for one program an SM (a warp-specialized program holds 255 registers a thread)."""
    assert {n for M in (16, 32, 64, 256) for n in sk.candidates(M)} == set(sk.SK_CONFIGS)
    assert sk.candidates(8) == sk.candidates(2048) == () and sk.candidates(65) == ("glk_m128_n128_k16_s4_c1",)
    assert all(sk.SK_CONFIGS[n][0] == 16 for n in sk.candidates(9))
    for name, (BM, BN, KT, stages, warps, ctas, _) in sk.SK_CONFIGS.items():
        assert ctas == 1 and BN % (16 * warps) == 0 and BM % 8 == 0, name
        assert sk.fits(name, 64, False) and sk.fits(name, 128, False), name
        assert wg.stages_for(BM, BN, KT, 128, stages) >= (4 if BM <= 64 else 3), name    # a deep ring is the point


def test_tuned_through_w4a16_only_on_sm90(monkeypatch):
    """The tuner routes `glk_*` names to this kernel; off sm_90 (or with PIPELINE_W4A16_GLUON=0) none is offered."""
    assert w4._config("glk_m16_n128_k16_s8_c1") == ("gluon_sk", "glk_m16_n128_k16_s8_c1")
    assert not wg.enabled(torch.device("cpu"))


class _Shim:
    """Enough of `gluon.language` to run the stream-K helpers' bodies on host ints (0-d int64 tensors)."""
    int32 = torch.int32
    pid = 0

    @staticmethod
    def maximum(a, b):
        return torch.maximum(torch.as_tensor(a), torch.as_tensor(b))

    @staticmethod
    def minimum(a, b):
        return torch.minimum(torch.as_tensor(a), torch.as_tensor(b))

    @staticmethod
    def where(c, a, b):
        return torch.where(c, a, b)

    @staticmethod
    def cdiv(a, b):
        return (a + b - 1) // b

    @classmethod
    def program_id(cls, axis):
        return torch.tensor(cls.pid)


def _on_host(jit_fn):
    """A @gluon.jit (or @triton.jit) helper's own Python body, its `gl` (`tl`) the shim: a kernel's arithmetic, run
    on the CPU."""
    import types
    fn = jit_fn.fn
    return types.FunctionType(fn.__code__, {**fn.__globals__, "gl": _Shim, "tl": _Shim}, fn.__name__, fn.__defaults__)


@pytest.mark.skipif(not wg.HAVE_GLUON, reason="no Gluon in this Triton")
def test_kernel_step_arithmetic_walks_the_host_plan():
    """The Gluon kernel's own step arithmetic (`_run`, `_next`, `_parts`: the twin of `w4a16_streamk`'s, which the
    interpreter tests run), executed on host ints: each program starts at p T // P with the (tile, group, M tile,
    N tile) of that step, `_next` walks its run in step order (M tile fastest), and where a run's part of a tile
    ends, `_parts` names the tile's first run and its number of runs as the host's `owner`, within `plan`'s
    workspace slots; the tiles at the run's two ends are the ones `_sk_kernel` finishes; the nested consumer's loop
    over tiles and `_groups_of` walk the same steps; the Triton stream-K kernel's `_next` and `_parts` (its twin,
    which the interpreter tests run) give the same answers at every step."""
    from pipeline.kernels import w4a16_streamk as stk
    run, nxt, parts, groups = _on_host(sk._run), _on_host(sk._next), _on_host(sk._parts), _on_host(sk._groups_of)
    tnext, tparts = _on_host(stk._next), _on_host(stk._parts)
    i64 = lambda v: torch.tensor(v, dtype=torch.int64)   # noqa: E731
    for M, N, K, g, BM, BN, n_sm in [(16, 1000, 1024, 64, 16, 128, 132), (33, 4100, 768, 64, 32, 256, 132),
                                     (200, 12288, 4096, 128, 128, 128, 132), (9, 256, 256, 128, 16, 64, 5),
                                     (64, 4096, 11008, 128, 64, 128, 132), (16, 128, 640, 128, 16, 128, 7)]:
        G, n_m = K // g, -(-M // BM)
        tiles = n_m * -(-N // BN)
        P, slots = stk.plan(tiles, G, n_sm, 1)
        T = tiles * G
        cut = {}
        for p in range(P):
            _Shim.pid = p
            it_lo, n_iter, t, gg, pm, pn, G_k, n_m_k, total = (int(v) for v in run(i64(M), i64(K), i64(N), i64(P),
                                                                                     g, BM, BN))
            assert (it_lo, n_iter, G_k, n_m_k, total) == (p * T // P, (p + 1) * T // P - p * T // P, G, n_m, T)
            state = [i64(v) for v in (t, gg, pm, pn)]
            for it in range(it_lo, it_lo + n_iter):
                t, gg, pm, pn = (int(v) for v in state)
                assert (t, gg, pm, pn) == (it // G, it % G, it // G % n_m, it // G // n_m), (M, N, K, p, it)
                if gg == G - 1 or it == it_lo + n_iter - 1:   # the consumer's store point
                    first, n_parts = (int(v) for v in parts(i64(t), i64(G), i64(T), i64(P)))
                    assert first == stk.owner(t * G, T, P) and 0 <= p - first < max(slots, 1)
                    assert n_parts == stk.owner(t * G + G - 1, T, P) - first + 1 <= slots
                    if n_parts > 1:
                        cut.setdefault(t, []).append(p)
                    assert n_parts == 1 or t in (it_lo // G, (it_lo + n_iter - 1) // G)   # finished after the loop
                state = list(nxt(*state, i64(G), i64(n_m)))
            steps = [(t, gg) for t in range(it_lo // G, (it_lo + n_iter - 1) // G + 1)   # the nested consumer's loops
                     for gg in range(*(int(v) for v in groups(i64(t), i64(it_lo), i64(it_lo + n_iter), i64(G))))]
            assert steps == [(it // G, it % G) for it in range(it_lo, it_lo + n_iter)], (M, N, K, p)
            for it in range(it_lo, it_lo + n_iter):   # the Triton stream-K kernel's twin steps the same way
                st = lambda: (i64(it // G), i64(it % G), i64(it // G % n_m), i64(it // G // n_m))  # noqa: E731
                # (fresh tensors for each: `g += 1` in the bodies adds in place on a host tensor)
                assert [int(v) for v in nxt(*st(), i64(G), i64(n_m))] == \
                    [int(v) for v in tnext(*st(), i64(G), i64(n_m))]
                assert [int(v) for v in parts(i64(it // G), i64(G), i64(T), i64(P))] == \
                    [int(v) for v in tparts(i64(it // G), i64(G), i64(T), i64(P))]
        for t, runs in cut.items():   # every run of a cut tile stores one part, in run order from `first`
            first, n_parts = (int(v) for v in parts(i64(t), i64(G), i64(T), i64(P)))
            assert runs == list(range(first, first + n_parts)), t


@pytest.mark.slow
@offline
@pytest.mark.parametrize("g", [64, 128])
@pytest.mark.parametrize("name", list(sk.SK_CONFIGS))
def test_offline_sm90_compile(name, g):
    """Each config compiles for sm_90 without a GPU: TMA copies, async register-operand wgmmas with one left in flight
    while the next slice is dequantized (wait_group 1 per slice; `WARPGROUP.DEPBAR.LE gsb0, 0x1` in the SASS), no
    serialized wgmmas (C7515: the next tile's first wgmma ignores the accumulator instead of zeros written to it),
    no spills, within shared memory, the first weight copies before the PDL wait; the fused SwiGLU too."""
    from triton.runtime.jit import mangle_type
    from tests.sm90_sass import ptxas_info, sass_text
    BM, BN, KT, stages, warps, _, nested = sk.SK_CONFIGS[name]
    K = 4096
    for act in (False, True):
        if not sk.fits(name, g, act):
            continue
        width = 2 * K if act else K
        x_l = wg.layouts(BM, BN, KT, g, torch.float16)[0]
        xd = wg.TensorDescriptor(torch.empty(64, width, dtype=torch.float16), [64, width], [width, 1], [BM, KT], x_l)
        sig = {"x_desc": mangle_type(xd), "q_desc": q_desc_type(BM, BN, KT, g), "s_ptr": "*fp16", "z_ptr": "*fp16",
               "b_ptr": "*fp16", "y_ptr": "*fp16", "ws_ptr": "*fp32", "cnt_ptr": "*i32", "M": "i32", "N": "i32",
               "K": "i32", "stride_ym": "i32", "n_progs": "i32"}
        cst = dict(MAX_PARTS=3, GROUP=g, BLOCK_M=BM, BLOCK_N=BN, KT=KT,
                   STAGES=wg.stages_for(BM, BN, KT, g, stages, act), HAS_BIAS=True, DKIND=1, ACT=act,
                   num_warps=warps, PDL=True, NESTED=nested)
        k = compile_sm90(sk._sk_kernel, sig, cst, warps)
        ptx, info = k.asm["ptx"], ptxas_info(k.asm["ptx"])
        assert k.metadata.shared <= wg.SMEM_BYTES + 1024 and "cp.async.bulk.tensor.2d" in ptx
        assert ptx.count("wgmma.wait_group.sync.aligned 1;") == g // KT, (name, act)
        assert "C7515" not in info and " 0 bytes spill stores" in info, info
        assert "WARPGROUP.DEPBAR.LE gsb0, 0x1" in sass_text(k.asm["cubin"])
        if nested:   # `_nl`: the groups' loop holds no store (the flat loop's tile-end branch has them)
            from tests.sm90_sass import mma_loop_body
            assert not any("STG" in x for x in mma_loop_body(k.asm["cubin"])), (name, act)
        # PDL: the producer's first weight copies are issued before its wait for the previous kernel
        head = ptx.split("griddepcontrol.wait")[0]
        assert "griddepcontrol.wait" in ptx and head.count("cp.async.bulk.tensor") >= 1, (name, act)


@pytest.mark.gpu
@on_sm90
@pytest.mark.parametrize("g,dtype", [(128, torch.float16), (64, torch.float16), (64, torch.bfloat16)])
def test_gpu_streamk_odd_shapes(g, dtype):
    """Against the reference over N not a multiple of any tile, rows from 16 to 64 (partial row tiles), runs holding
    whole tiles and tiles cut between runs, a bias at odd M, the fused SwiGLU; the same bits on every launch (parts
    summed in run order) and the split counters back at 0."""
    from pipeline.kernels.dispatch import arrival_counters
    from pipeline.kernels.norm import silu_mul_ref
    for N, K in ((1000, 1024), (4100, 768), (12288, 4096)):
        w = w4.pack_w4(*make_quant(N, K, g, seed=N + g), g).to("cuda")
        bias = torch.randn(N, device="cuda").to(dtype)
        for M in (16, 9, 33, 64, 200):
            x = torch.randn(M, K, device="cuda").to(dtype)
            b = bias if M % 2 else None
            ref = ref64(x, w, b)
            for name in sk.candidates(max(M, 16)):
                if not sk.fits(name, g, False):
                    continue
                y = sk.w4a16_gluon_sk_linear(x, w, b, config=name)
                assert y.shape == (M, N) and y.dtype == dtype
                err = rel_err(y, ref)
                assert err < TOL[dtype], f"{name} g={g} M={M} N={N} K={K} {dtype}: rel err {err:.2e}"
                assert all(torch.equal(sk.w4a16_gluon_sk_linear(x, w, b, config=name), y) for _ in range(3)), name
        gate_up = torch.randn(16, 2 * K, device="cuda").to(dtype)
        y = sk.w4a16_gluon_sk_linear(gate_up, w, config="glk_m16_n128_k16_s8_c1", act="silu_mul")
        assert rel_err(y, ref64(silu_mul_ref(gate_up), w)) < TOL[dtype]
    torch.cuda.synchronize()
    assert int(arrival_counters(torch.device("cuda"), 1).abs().sum()) == 0
