"""Paged decode attention: Triton (interpreter on CPU, compiled on GPU) against the PyTorch reference."""
import pytest
import torch

from kernel_interp import cuda_ok, fresh_seed, interpreted, rel_err
from pipeline.kernels import attention as compiled_attention
from pipeline.kernels import dispatch, kvcache

MODES = [("none", 16), ("static", 8), ("static", 4), ("dynamic", 8), ("dynamic", 4)]
TOL = {torch.float16: 3e-3, torch.bfloat16: 2e-2}


def make_case(B, H, n_kv, D, bs, lens, kv_mode, kv_bits, dtype, device, symmetric=False):
    """Random q, a paged cache with shuffled blocks (plus spare blocks), quantized as configured."""
    max_blocks = max(-(-n // bs) for n in lens) + 1
    num_blocks = B * max_blocks + 3
    q = torch.randn(B, H, D, device=device).to(dtype)
    k = torch.randn(num_blocks, n_kv, bs, D, device=device) * 2 + 0.5
    v = torch.randn(num_blocks, n_kv, bs, D, device=device)
    tables = torch.randperm(num_blocks, device=device)[: B * max_blocks].view(B, max_blocks).int()
    params = {}
    if kv_mode == "none":
        kc, vc = k.to(dtype), v.to(dtype)
    elif kv_mode == "static":
        kt, vt = k.transpose(1, 2), v.transpose(1, 2)  # (blocks, bs, n_kv, D): heads on axis -2
        ks, kz = kvcache.kv_qparams_from_stats(kt.amin((0, 1, 3)), kt.amax((0, 1, 3)), kt.abs().amax((0, 1, 3)),
                                               kv_bits, symmetric)
        vs, vz = kvcache.kv_qparams_from_stats(vt.amin((0, 1, 3)), vt.amax((0, 1, 3)), vt.abs().amax((0, 1, 3)),
                                               kv_bits, not symmetric)
        kc = kvcache.kv_quantize_static(kt, ks, kz, kv_bits).transpose(1, 2).contiguous()
        vc = kvcache.kv_quantize_static(vt, vs, vz, kv_bits).transpose(1, 2).contiguous()
        params = dict(k_scale=ks, k_zp=kz, v_scale=vs, v_zp=vz)
    else:
        kc, ks, kz = kvcache.kv_quantize_dynamic(k, kv_bits)
        vc, vs, vz = kvcache.kv_quantize_dynamic(v, kv_bits)
        params = dict(k_scale=ks, k_zp=kz, v_scale=vs, v_zp=vz)
    lens = torch.tensor(lens, dtype=torch.int32, device=device)
    return q, kc, vc, tables, lens, params


def check(mod, device, dtype, B, H, n_kv, D, bs, lens, kv_mode, kv_bits, num_splits, block_n=None, **kw):
    seed = fresh_seed()
    q, kc, vc, tables, lens_t, params = make_case(B, H, n_kv, D, bs, lens, kv_mode, kv_bits, dtype, device, **kw)
    scale = D ** -0.5
    ref = compiled_attention.paged_decode_attention_ref(q, kc, vc, tables, lens_t, scale, kv_mode, kv_bits, **params)
    out = torch.full_like(q, float("nan"))
    mod._launch(q, kc, vc, tables, lens_t, scale, kv_mode, kv_bits, **params, out=out,
                num_splits=num_splits, block_n=block_n)
    err = rel_err(out, ref)
    assert err < TOL[dtype], f"{kv_mode}/{kv_bits} {dtype} splits={num_splits} seed={seed}: rel err {err:.2e}"
    assert int(mod.arrival_counters(q.device, 1).abs().sum()) == 0, "split counters not re-armed to 0"
    return out, (q, kc, vc, tables, lens_t, scale, kv_mode, kv_bits, params)


@pytest.mark.parametrize("kv_mode,kv_bits", MODES)
@pytest.mark.parametrize("num_splits", [1, 3])
def test_interpreter_gqa(kv_mode, kv_bits, num_splits, monkeypatch):
    mod = interpreted("attention", monkeypatch)
    check(mod, "cpu", torch.float16, B=3, H=6, n_kv=2, D=32, bs=16, lens=[37, 5, 70],
          kv_mode=kv_mode, kv_bits=kv_bits, num_splits=num_splits, block_n=16)


@pytest.mark.parametrize("kv_mode,kv_bits", [("none", 16), ("static", 4), ("dynamic", 8)])
def test_interpreter_mha_odd_block(kv_mode, kv_bits, monkeypatch):
    # G = 1, block_size 8 smaller than the tile (a tile spans several paged blocks), symmetric K
    mod = interpreted("attention", monkeypatch)
    check(mod, "cpu", torch.float16, B=2, H=3, n_kv=3, D=64, bs=8, lens=[1, 53],
          kv_mode=kv_mode, kv_bits=kv_bits, num_splits=2, block_n=32, symmetric=True)


def test_public_function_dispatches_to_triton(monkeypatch):
    mod = interpreted("attention", monkeypatch)
    q, kc, vc, tables, lens, params = make_case(2, 4, 2, 32, 16, [20, 9], "static", 8, torch.float16, "cpu")
    out = mod.paged_decode_attention(q, kc, vc, tables, lens, 0.2, "static", 8, **params)
    ref = mod.paged_decode_attention_ref(q, kc, vc, tables, lens, 0.2, "static", 8, **params)
    assert dispatch.last_path("paged_decode_attention") == "triton"
    assert rel_err(out, ref) < TOL[torch.float16]


def test_launcher_errors_name_the_bad_value():
    q, kc, vc, tables, lens, params = make_case(2, 4, 2, 32, 16, [20, 9], "static", 8, torch.float16, "cpu")
    with pytest.raises(ValueError, match="block_tables"):
        compiled_attention._launch(q, kc, vc, tables.long(), lens, 0.2, "static", 8, **params)
    with pytest.raises(ValueError, match="int8"):
        compiled_attention._launch(q, kc.float(), vc, tables, lens, 0.2, "static", 8, **params)
    with pytest.raises(ValueError, match="k_scale"):
        compiled_attention._launch(q, kc, vc, tables, lens, 0.2, "static", 8, **{**params, "k_scale": None})
    with pytest.raises(ValueError, match="kv_mode"):
        compiled_attention._launch(q, kc, vc, tables, lens, 0.2, "weird", 8, **params)
    with pytest.raises(ValueError, match="n_heads=5"):
        compiled_attention._launch(q[:, :1].expand(2, 5, 32), kc, vc, tables, lens, 0.2, "static", 8, **params)


@pytest.mark.gpu
@pytest.mark.skipif(not cuda_ok(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kv_mode,kv_bits", MODES)
@pytest.mark.parametrize("H,n_kv", [(32, 32), (32, 8)])
def test_gpu_real_sizes(dtype, kv_mode, kv_bits, H, n_kv):
    lens = [1, 777, 4096, 2500, 16, 1000, 3333]
    for splits in (None, 1):
        check(compiled_attention, "cuda", dtype, B=len(lens), H=H, n_kv=n_kv, D=128, bs=16, lens=lens,
              kv_mode=kv_mode, kv_bits=kv_bits, num_splits=splits)


@pytest.mark.gpu
@pytest.mark.skipif(not cuda_ok(), reason="needs CUDA")
def test_gpu_split_merge_bit_identical_over_many_launches():
    """The last split program merges in split order: every launch gives the same bits."""
    first, (q, kc, vc, tables, lens, scale, mode, bits, params) = check(
        compiled_attention, "cuda", torch.float16, B=4, H=32, n_kv=8, D=128, bs=64, lens=[4096, 100, 2048, 3000],
        kv_mode="static", kv_bits=8, num_splits=None)
    for _ in range(200):
        out = compiled_attention._launch(q, kc, vc, tables, lens, scale, mode, bits, **params)
        assert torch.equal(out, first)


@pytest.mark.parametrize("kv_mode,kv_bits", [("none", 16), ("static", 8)])
@pytest.mark.parametrize("num_splits,block_n,lens", [(1, 16, [37, 5, 70]), (3, 16, [37, 5, 70]), (2, 32, [1, 53, 9])])
def test_interpreter_fma_variant_mha(kv_mode, kv_bits, num_splits, block_n, lens, monkeypatch):
    """The CUDA-core variant for one query head per KV head (`variant="fma"`, per-row online softmax merged at the
    end) against the reference, with context splits and tiles spanning several paged blocks."""
    mod = interpreted("attention", monkeypatch)
    seed = fresh_seed()
    q, kc, vc, tables, lens_t, params = make_case(3, 4, 4, 32, 8, lens, kv_mode, kv_bits, torch.float16, "cpu")
    ref = compiled_attention.paged_decode_attention_ref(q, kc, vc, tables, lens_t, 32 ** -0.5, kv_mode, kv_bits,
                                                        **params)
    out = torch.full_like(q, float("nan"))
    mod._launch(q, kc, vc, tables, lens_t, 32 ** -0.5, kv_mode, kv_bits, **params, out=out, num_splits=num_splits,
                block_n=block_n, variant="fma")
    err = rel_err(out, ref)
    assert err < TOL[torch.float16], f"fma {kv_mode}/{kv_bits} splits={num_splits} seed={seed}: rel err {err:.2e}"
    assert int(mod.arrival_counters(q.device, 1).abs().sum()) == 0, "split counters not re-armed to 0"


def test_fma_variant_refuses_what_it_does_not_serve():
    q, kc, vc, tables, lens_t, params = make_case(1, 4, 2, 32, 8, [9], "static", 8, torch.float16, "cpu")
    with pytest.raises(ValueError, match="one query head per KV head"):
        compiled_attention._launch(q, kc, vc, tables, lens_t, 1.0, "static", 8, **params, variant="fma")


@pytest.mark.gpu
@pytest.mark.skipif(not cuda_ok(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kv_mode,kv_bits", [("none", 16), ("static", 8)])
@pytest.mark.parametrize("splits,block_n,warps", [(None, None, 4), (1, 16, 1), (2, 16, 2), (4, 64, 8)])
def test_gpu_fma_variant_real_sizes(dtype, kv_mode, kv_bits, splits, block_n, warps):
    lens = [1, 777, 4096, 2500, 16, 1000, 3333]
    q, kc, vc, tables, lens_t, params = make_case(len(lens), 32, 32, 128, 64, lens, kv_mode, kv_bits, dtype, "cuda")
    ref = compiled_attention.paged_decode_attention_ref(q, kc, vc, tables, lens_t, 128 ** -0.5, kv_mode, kv_bits,
                                                        **params)
    out = compiled_attention._launch(q, kc, vc, tables, lens_t, 128 ** -0.5, kv_mode, kv_bits, **params,
                                     num_splits=splits, block_n=block_n, num_warps=warps, variant="fma")
    assert rel_err(out, ref) < TOL[dtype], f"fma {kv_mode}/{kv_bits} {dtype} splits={splits} bn={block_n}"


@pytest.mark.slow
@pytest.mark.skipif(not __import__("triton").__version__.startswith("3.6."),
                    reason="sm_90 SASS checked with Triton 3.6")
def test_offline_sm90_fma_int8_codes_four_a_word():
    """The fma decode kernel's int8 codes become fp16 four a 32-bit word on a GPU (`_kv_i8`: xor, two byte
    permutes, two sub.f16x2): its main loop has at least 15% fewer instructions than with the per-code widen
    (measured 344 against 454 for 32 keys x 128 dims), no spills. Timed on an H100 it was 11-15% slower all the same
    (bench/results/decode_profile_attn_h100_s17.json): off by default, PIPELINE_KV_I8_ASM=1."""
    from sm90_sass import measure
    on, off = measure("attn_fma", "1"), measure("attn_fma", "0")
    assert on["byte_prmt"] >= 1 and off["byte_prmt"] == 0 and not on["local"]
    assert 0 < on["loop"] <= 0.85 * off["loop"], (on, off)
