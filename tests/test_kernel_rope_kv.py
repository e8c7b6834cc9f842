"""Fused rotary + KV quantize + paged cache write: Triton against the PyTorch reference."""
import pytest
import torch

from kernel_interp import cuda_ok, fresh_seed, interpreted, rel_err
from pipeline.kernels import kvcache
from pipeline.kernels import rope_kv as compiled_rope_kv

MODES = [("none", 16), ("static", 8), ("static", 4), ("dynamic", 8), ("dynamic", 4)]
POISON_CODE = 77  # an int8/uint8 cache row that must stay untouched reads back as 77


def rope_tables(max_pos, D, device, theta=10000.0):
    inv = 1.0 / theta ** (torch.arange(0, D, 2, device=device).float() / D)
    freqs = torch.outer(torch.arange(max_pos, device=device).float(), inv)
    return freqs.cos(), freqs.sin()


def make_caches(num_blocks, n_kv, bs, D, kv_mode, kv_bits, dtype, device):
    if kv_bits == 16:
        k = torch.full((num_blocks, n_kv, bs, D), float("nan"), dtype=dtype, device=device)
    else:
        dk = D // 2 if kv_bits == 4 else D
        k = torch.full((num_blocks, n_kv, bs, dk), POISON_CODE, dtype=torch.int8 if kv_bits == 8 else torch.uint8,
                       device=device)
    params = {}
    if kv_mode == "static":
        params = dict(k_scale=torch.rand(n_kv, device=device) * 0.05 + 0.01, k_zp=torch.randn(n_kv, device=device) * 0.2,
                      v_scale=torch.rand(n_kv, device=device) * 0.05 + 0.01, v_zp=torch.zeros(n_kv, device=device))
    if kv_mode == "dynamic":
        params = {n: torch.full((num_blocks, n_kv, bs), float("nan"), device=device)
                  for n in ("k_scale", "k_zp", "v_scale", "v_zp")}
    return k, k.clone(), params


def codes(c, kv_bits):
    return (kvcache.unpack_int4(c) if kv_bits == 4 else c).int()


def check(mod, device, dtype, T, H, n_kv, D, bs, num_blocks, kv_mode, kv_bits, chunks=None):
    seed = fresh_seed()
    cos, sin = rope_tables(4 * T + 50, D, device)
    q = torch.randn(T, H, D, device=device).to(dtype)
    k = (torch.randn(T, n_kv, D, device=device) * 2 + 0.3).to(dtype)
    v = torch.randn(T, n_kv, D, device=device).to(dtype)
    positions = torch.randint(0, cos.shape[0], (T,), device=device)
    slots = torch.randperm(num_blocks * bs, device=device)[:T]
    slots[T // 2] = -1  # a padding token: no cache write
    k1, v1, p1 = make_caches(num_blocks, n_kv, bs, D, kv_mode, kv_bits, dtype, device)
    k2, v2, p2 = k1.clone(), v1.clone(), {n: t.clone() for n, t in p1.items()}
    q_ref, kr_ref = compiled_rope_kv.rope_kv_write_ref(q, k, v, positions, cos, sin, k1, v1, slots, kv_mode, kv_bits,
                                                       **p1, return_k=True)
    q_out = torch.full_like(q, float("nan"))
    k_out = torch.full_like(k, float("nan"))
    mod._launch(q, k, v, positions, cos, sin, k2, v2, slots, kv_mode, kv_bits, **p2, return_k=True,
                q_out=q_out, k_out=k_out, chunks=chunks)
    tol = 1e-3 if dtype == torch.float16 else 8e-3
    msg = f"{kv_mode}/{kv_bits} {dtype} seed={seed}"
    assert rel_err(q_out, q_ref) < tol, msg
    assert rel_err(k_out, kr_ref) < tol, msg
    for ref_c, out_c in ((k1, k2), (v1, v2)):
        if kv_bits == 16:
            assert torch.equal(ref_c.isnan(), out_c.isnan()), f"{msg}: written rows differ"
            assert rel_err(out_c.nan_to_num(), ref_c.nan_to_num()) < tol, msg
        else:  # codes may differ by one level where the fp32 value sits on a rounding boundary
            diff = (codes(ref_c, kv_bits) - codes(out_c, kv_bits)).abs()
            assert diff.max() <= 1 and (diff > 0).float().mean() < 1e-3, f"{msg}: codes differ {diff.max()}"
    for name in p1:
        assert torch.equal(p1[name].isnan(), p2[name].isnan()), f"{msg}: {name} written rows differ"
        assert rel_err(p2[name].nan_to_num(), p1[name].nan_to_num()) < 1e-5, f"{msg}: {name}"


@pytest.mark.parametrize("kv_mode,kv_bits", MODES)
@pytest.mark.parametrize("chunks", [None, 1, 2])  # default (one KV head per program here), all heads, uneven split
def test_interpreter(kv_mode, kv_bits, chunks, monkeypatch):
    mod = interpreted("rope_kv", monkeypatch)
    check(mod, "cpu", torch.float16, T=5, H=6, n_kv=3, D=32, bs=8, num_blocks=7, kv_mode=kv_mode, kv_bits=kv_bits,
          chunks=chunks)


@pytest.mark.parametrize("kv_mode,kv_bits", MODES)
def test_interpreter_many_tokens_layout(kv_mode, kv_bits, monkeypatch):
    """The prefill layout (two KV heads per program, fewer warps), chosen from PROGRAMS tokens on: same results."""
    mod = interpreted("rope_kv", monkeypatch)
    monkeypatch.setattr(mod, "PROGRAMS", 4)
    check(mod, "cpu", torch.float16, T=6, H=8, n_kv=4, D=32, bs=8, num_blocks=7, kv_mode=kv_mode, kv_bits=kv_bits)


def test_public_function_and_errors(monkeypatch):
    mod = interpreted("rope_kv", monkeypatch)
    cos, sin = rope_tables(16, 16, "cpu")
    q, k = torch.randn(3, 4, 16).half(), torch.randn(3, 2, 16).half()
    kc = torch.zeros(4, 2, 4, 16, dtype=torch.half)
    out = mod.rope_kv_write(q, k, k.clone(), torch.arange(3), cos, sin, kc, kc.clone(), torch.arange(3))
    assert rel_err(out, mod.apply_rotary_ref(q, cos, sin, torch.arange(3))) < 1e-3
    with pytest.raises(ValueError, match="slot_mapping"):
        mod._launch(q, k, k, torch.arange(3), cos, sin, kc, kc, torch.arange(2))
    with pytest.raises(ValueError, match="cos"):
        mod._launch(q, k, k, torch.arange(3), cos[:, :4], sin, kc, kc, torch.arange(3))
    with pytest.raises(ValueError, match="k_cache"):
        mod._launch(q, k, k, torch.arange(3), cos, sin, kc.to(torch.int8), kc, torch.arange(3))


@pytest.mark.gpu
@pytest.mark.skipif(not cuda_ok(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kv_mode,kv_bits", MODES)
@pytest.mark.parametrize("T", [1, 7, 300])
def test_gpu_real_sizes(dtype, kv_mode, kv_bits, T):
    check(compiled_rope_kv, "cuda", dtype, T=T, H=32, n_kv=8, D=128, bs=16, num_blocks=64,
          kv_mode=kv_mode, kv_bits=kv_bits)
