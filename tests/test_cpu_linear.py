"""The CPU int4 kernel (pipeline/kernels/cpu_linear.py, csrc/linear_cpu.c), each ISA build this CPU runs:

- its layout round-trips (pack_tiles / unpack_tiles);
- it equals its PyTorch reference (`int4_cpu_ref`: the same int8 activation blocks, integer dots in fp64) up to
  fp32 summation order, over odd shapes, group sizes 64 / 128, 1-9 rows, both OpenMP thread counts;
- against the exact W4A16 linear (weights dequantized, fp32 activations) it is off by the int8 rounding of the
  activations alone (~0.5% of the output's norm on Gaussian inputs; bound 1.5%);
- the int8 kernel (the CPU lm_head) equals its reference, and the exact int8 linear up to the input's rounding;
- the torch-native layouts pick them on a CPU where they take the shape, PyTorch's ops where they do not.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pipeline.kernels import cpu_build, cpu_linear
from pipeline.kernels.cpu_linear import Int4CPU, Int8CPU, int4_cpu_ref, int8_cpu_ref, pack_tiles, unpack_tiles
from pipeline.kernels.native import ByRows, Int4Packed, Int8Head, int4_layout, native_head, swiglu_down
from pipeline.quant.w8 import quantize_w8
from pipeline.kernels.kvcache import pack_int4, qrange
from pipeline.kernels.w4a16 import dequantize_w4

from test_native import w4

ISAS = [isa for isa in cpu_build.cpu_isas() if cpu_linear.library(isa) is not None]
pytestmark = pytest.mark.skipif(not ISAS, reason="no C compiler or no AVX2 here: the kernel is not built")


def test_tiles_round_trip():
    q = torch.randint(0, 16, (48, 192), dtype=torch.uint8)
    p = pack_tiles(q)
    assert p.shape == (3, 24, 16, 4) and torch.equal(unpack_tiles(p), q)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("N,K,g", [(16, 64, 64), (48, 192, 64), (3072, 576, 64), (80, 512, 128), (32, 384, 128)])
@pytest.mark.parametrize("M", [1, 3, 4, 9])
@pytest.mark.parametrize("terms", [2, 1])
def test_kernel_equals_reference(isa, N, K, g, M, terms):
    w = w4(N, K, g)
    lin = Int4CPU(w, threads=1, isa=isa, terms=terms)
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(1000 * M + N + K)) * 3
    ref = int4_cpu_ref(x, lin)
    got = lin(x)
    assert got.shape == (M, N) and got.dtype == torch.float32
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    exact = F.linear(x, dequantize_w4(w))
    # one int8 term: each activation within max|x|/254 of its block; on a 16-column, 64-long dot that reached 2.8%
    # of the exact product's norm in 3,000 random draws (an unseeded x made the former 1.5% bound flaky)
    assert (got - exact).norm() <= (1e-4 if terms == 2 else 0.04) * exact.norm()


@pytest.mark.parametrize("isa", ISAS)
def test_threads_bias_and_batch_shape(isa):
    w = w4(256, 576, 64, seed=3)
    x, bias = torch.randn(2, 5, 576), torch.randn(256)
    one, two = Int4CPU(w, threads=1, isa=isa), Int4CPU(w, threads=2, isa=isa)
    y = one(x, bias)
    assert y.shape == (2, 5, 256)
    torch.testing.assert_close(two(x, bias), y, rtol=0, atol=0)         # threads split columns: same sums
    torch.testing.assert_close(y, int4_cpu_ref(x, one) + bias, rtol=1e-5, atol=1e-4)
    assert torch.equal(one(torch.zeros(0, 576)), torch.zeros(0, 256))


def test_layout_picks_the_kernel_where_it_fits():
    assert isinstance(int4_layout(w4(64, 256, 64), torch.bfloat16), Int4CPU)
    assert isinstance(int4_layout(w4(48, 96, 32), torch.bfloat16), Int4Packed)     # group 32: PyTorch's int4 op
    both = int4_layout(w4(64, 256, 64), torch.bfloat16, dense_rows=4)
    assert isinstance(both, ByRows) and isinstance(both.small, Int4CPU)
    x = torch.randn(6, 256)
    torch.testing.assert_close(both(x[:2]), both.small(x[:2]))
    torch.testing.assert_close(both(x).float(), F.linear(x.bfloat16().float(), dequantize_w4(w4(64, 256, 64))),
                               rtol=0.02, atol=0.02)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("N,K,M", [(16, 64, 1), (4096, 576, 1), (208, 192, 5), (64, 128, 8)])
def test_int8_kernel_equals_reference(isa, N, K, M):
    gen = torch.Generator().manual_seed(4)
    q, s = quantize_w8(torch.randn(N, K, generator=gen))
    x = torch.randn(M, K, generator=gen) * 2
    one, two = Int8CPU(q, s, threads=1, isa=isa), Int8CPU(q, s, threads=2, isa=isa)
    got = one(x)
    torch.testing.assert_close(got, int8_cpu_ref(x, one), rtol=1e-5, atol=1e-5 * got.abs().max().item())
    assert torch.equal(two(x), got)
    exact = x @ (q.float() * s[:, None]).t()
    assert (got - exact).norm() <= 1e-4 * exact.norm()        # the two-term input: ~15 bits


def test_head_picks_the_kernel_where_it_fits():
    assert isinstance(native_head(torch.randn(4096, 576), torch.bfloat16), Int8CPU)
    assert isinstance(native_head(torch.randn(4000, 96), torch.bfloat16), Int8Head)   # N % 16, K % 64: oneDNN


@pytest.mark.parametrize("T,D", [(1, 576), (5, 100), (3, 64)])
def test_add_rms_norm_equals_torch(T, D):
    gen = torch.Generator().manual_seed(5)
    res, add = (torch.randn(T, D, generator=gen) * 3 for _ in range(2))
    w = torch.rand(D, generator=gen) + 0.5
    want_res = res + add
    want = F.rms_norm(want_res, (D,), w, 1e-5)
    got_res, got = cpu_linear.add_rms_norm(res, add, w, 1e-5)
    assert got_res is res                                  # in place
    torch.testing.assert_close(got_res, want_res, rtol=0, atol=0)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(cpu_linear.add_rms_norm(want_res.clone(), None, w, 1e-5)[1], want, rtol=1e-6, atol=1e-6)


def bf16_ulps(a: torch.Tensor, b: torch.Tensor) -> int:
    return (a.view(torch.int16).int() - b.view(torch.int16).int()).abs().max().item()


@pytest.mark.parametrize("T,D", [(1, 576), (37, 100), (3, 64)])
def test_add_rms_norm_bf16_add_and_out_equals_torch(T, D):
    """The prefill path's norm: a bf16 linear's output added (widened exactly, as torch promotes it), the norm
    written as bf16 for the next bf16 linear (to nearest even: at most the one ulp of fp32 rounding before it)."""
    gen = torch.Generator().manual_seed(8)
    res, add = torch.randn(T, D, generator=gen) * 3, (torch.randn(T, D, generator=gen) * 3).bfloat16()
    w = torch.rand(D, generator=gen) + 0.5
    want_res = res + add
    want = F.rms_norm(want_res, (D,), w, 1e-5)
    got_res, got = cpu_linear.add_rms_norm(res, add, w, 1e-5, out_dtype=torch.bfloat16)
    assert got_res is res and got.dtype == torch.bfloat16
    assert torch.equal(got_res, want_res)
    assert bf16_ulps(got, want.bfloat16()) <= 1


@pytest.mark.parametrize("M,K", [(1, 1536), (37, 64), (5, 48)])
def test_swiglu_bf16_equals_torch(M, K):
    gen = torch.Generator().manual_seed(9)
    gate_up = (torch.randn(M, 2 * K, generator=gen) * 4).bfloat16()
    gate_up[0, :3] = torch.tensor([-100.0, 100.0, 0.0])                      # exp's range ends, silu(0)
    got = cpu_linear.swiglu_bf16(gate_up)
    if K % 16:
        assert got is None                                                    # not taken: the caller's torch ops
        return
    g, u = gate_up.float().chunk(2, -1)
    assert got.shape == (M, K)                               # within one bf16 rounding (2^-8 relative) of torch's
    torch.testing.assert_close(got.float(), (F.silu(g) * u).bfloat16().float(), rtol=2 ** -8, atol=1e-30)
    assert cpu_linear.swiglu_bf16(gate_up.float()) is None                    # fp32: not this kernel's


@pytest.mark.parametrize("kind", [torch.int8, torch.uint8, torch.bfloat16, torch.float32])
def test_rope_kv_equals_the_runners_torch_ops(kind):
    """Rotary + the KV write of every cache kind the C call takes, bit for bit NativeRunner's torch ops (_run's
    rotary, _write_kv's codes / packing / dtype cast)."""
    gen = torch.Generator().manual_seed(6)
    T, nh, nkv, hd, rows_n = 3, 6, 2, 64, 40
    qkv = torch.randn(T, nh + 2 * nkv, hd, generator=gen) * 4
    ang = torch.rand(T, hd // 2, generator=gen) * 6
    cos = torch.cat([ang.cos(), ang.cos()], -1)
    sin = torch.cat([-ang.sin(), ang.sin()], -1)
    scale, zp = torch.rand(2, nkv, generator=gen) * 0.05 + 0.01, torch.randn(2, nkv, generator=gen) * 0.1
    bits = {torch.int8: 8, torch.uint8: 4}.get(kind)
    qkv[0, nh, :2] = torch.tensor([float("inf"), -1e30])                         # clamped codes, bf16's inf
    if bits is None:
        qkv[1, nh + 1, 5] = float("nan")                                          # bf16's NaN
    qr = qrange(bits) if bits else None
    slots = torch.tensor([7, 0, 33])
    want_qkv = qkv.clone()
    qk = want_qkv[:, :nh + nkv]
    torch.add(qk * cos[:, None], torch.roll(qk, hd // 2, -1) * sin[:, None], out=qk)
    kv = want_qkv[:, nh:].view(T, 2, nkv, hd)
    if bits:
        codes = torch.round((kv - zp[..., None]) / scale[..., None]).clamp_(*qr).to(torch.int8)
        new = pack_int4(codes) if bits == 4 else codes
    else:
        new = kv.to(kind)
    want_rows = torch.zeros(rows_n, *new.shape[1:], dtype=kind)
    want_rows.index_copy_(0, slots, new)
    rows = torch.zeros_like(want_rows)
    assert cpu_linear.rope_kv(qkv, cos, sin, nh, nkv, rows, slots, scale, zp, qr)
    assert torch.equal(qkv.nan_to_num(), want_qkv.nan_to_num())                      # bit for bit (NaN == NaN)
    if bits:
        assert torch.equal(rows, want_rows)
    else:           # every value bit for bit (bf16 -> fp32 is exact); a NaN a NaN (torch's bits for it vary by path)
        got, want = rows.float(), want_rows.float()
        assert torch.equal(got.isnan(), want.isnan()) and got.isnan().any()
        assert torch.equal(got.nan_to_num(), want.nan_to_num())
    assert not cpu_linear.rope_kv(qkv, cos, sin, nh, nkv, rows.double(), slots, scale, zp, qr)   # not a cache kind
    if bits:        # quantized kinds need their scales
        assert not cpu_linear.rope_kv(qkv, cos, sin, nh, nkv, rows, slots, None, None, qr)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("M", [1, 5])
def test_swiglu_down_equals_the_unfused_ops(isa, M):
    w = w4(96, 192, 64, seed=7)
    lin = Int4CPU(w, threads=1, isa=isa)
    gate_up = torch.randn(M, 384) * 4
    gate, up = gate_up.chunk(2, -1)
    act = F.silu(gate) * up
    torch.testing.assert_close(lin.swiglu(gate_up), lin(act), rtol=1e-4, atol=1e-4 * lin(act).abs().max().item())
    small = int4_layout(w, torch.bfloat16, dense_rows=4)          # ByRows: decode rows fused, prefill rows unfused

    torch.testing.assert_close(swiglu_down(small, gate_up).float(), small(act).float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("isa", ISAS[:1])
def test_a_forked_child_computes_without_the_parents_workers(isa):
    import multiprocessing as mp
    w = w4(256, 576, 64, seed=8)
    lin, x = Int4CPU(w, threads=2, isa=isa), torch.randn(8, 576)
    want = lin(x)                                          # the parent's pool now has a worker
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=lambda: q.put(lin(x).tolist()))   # plain lists: no tensor fds to outlive the child
    p.start()
    got = q.get(timeout=60)
    p.join(60)
    assert p.exitcode == 0 and torch.equal(torch.tensor(got), want)


AMX = "avx512_amx" in ISAS


@pytest.mark.skipif(not AMX, reason="no AMX tile unit here (or the OS did not grant its state)")
@pytest.mark.parametrize("N,K,g", [(48, 192, 64), (80, 512, 128), (64, 1536, 64)])
@pytest.mark.parametrize("terms", [2, 1])
def test_amx_tiles_give_the_vnni_bits(N, K, g, terms):
    """The AMX path (M >= 4 by default; full chunks of 8 rows and a last one of M % 8) computes the same exact integer
    dots as VNNI and the same float epilogue in the same order: equal bits, one or two threads."""
    w = w4(N, K, g, seed=N + K)
    vnni = Int4CPU(w, threads=1, isa="avx512_vnni", terms=terms)
    amx1, amx2 = (Int4CPU(w, threads=t, isa="avx512_amx", terms=terms) for t in (1, 2))
    for M in (1, 2, 7, 8, 9, 16, 21):
        x = torch.randn(M, K, generator=torch.Generator().manual_seed(M)) * 3
        want = vnni(x)
        assert torch.equal(amx1(x), want) and torch.equal(amx2(x), want), M
    gate_up = torch.randn(9, 2 * K) * 2
    assert torch.equal(amx2.swiglu(gate_up), vnni.swiglu(gate_up))


@pytest.mark.skipif(not AMX, reason="no AMX tile unit here (or the OS did not grant its state)")
@pytest.mark.parametrize("M", [2, 8, 13])
def test_amx_int8_head_gives_the_vnni_bits(M):
    gen = torch.Generator().manual_seed(M)
    q, s = quantize_w8(torch.randn(224, 576, generator=gen))
    x = torch.randn(M, 576, generator=gen) * 2
    want = Int8CPU(q, s, threads=1, isa="avx512_vnni")(x)
    assert torch.equal(Int8CPU(q, s, threads=2, isa="avx512_amx")(x), want)


@pytest.mark.skipif(not AMX, reason="no AMX tile unit here (or the OS did not grant its state)")
def test_an_amx_build_the_os_refuses_gives_way_to_vnni(monkeypatch):
    """Where the OS does not grant the tile state (an older kernel, a sandbox), the loader skips the AMX build and
    takes the next ISA's: the kernels stay available."""
    monkeypatch.setattr(cpu_build, "_libs", {})
    monkeypatch.setattr(cpu_build, "_amx_ready", lambda lib: False)
    assert cpu_build.load("cpu_kernels", "avx512_amx") is None
    assert cpu_build.isa_of(cpu_build.load("cpu_kernels")) == "avx512_vnni"
