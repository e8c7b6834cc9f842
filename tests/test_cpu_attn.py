"""The CPU decode attention (pipeline/kernels/cpu_attn.py, csrc/attn_cpu.c), each ISA build this CPU runs:

- it equals its PyTorch reference (`attn_cpu_ref`: the runner's gather + dequantize + SDPA of before) up to fp32
  summation order, over batches 1 / 3 / 8 with ragged contexts (one row, exactly one block, several blocks, block
  ids out of order), head dims 64 / 128, GQA groups 1 / 3, and every cache it takes: int8 and int4 static / dynamic,
  bf16 and fp32 16-bit;
- threads (csrc/pool.h) split (sequence, KV head) tasks: the same sums as one thread;
- the torch-native runner decodes through it where it takes the cache (not with PIPELINE_CPU_KERNEL=0): the greedy
  tokens of the gather + SDPA path (test_native.py's greedy tests run it against the reference path, every KV kind).
"""
from __future__ import annotations

import pytest
import torch

from pipeline.engine import Engine
from pipeline.kernels import cpu_attn, cpu_build
from pipeline.kernels.cpu_attn import PagedAttnCPU, attn_cpu_ref, supports
from pipeline.kernels.kvcache import kv_dynamic_params, pack_int4, qrange

from test_engine import PROMPTS, tiny  # noqa: F401  (the module fixture: fp16 and w4 workspaces)
from test_native import GREEDY

ISAS = [isa for isa in cpu_build.cpu_isas() if cpu_attn.library(isa) is not None]
pytestmark = pytest.mark.skipif(not ISAS, reason="no C compiler or no AVX2 here: the kernel is not built")

KV = [(8, "static"), (8, "dynamic"), (4, "static"), (4, "dynamic"), (16, torch.bfloat16), (16, torch.float32)]
BS = 16


def paged_cache(n_kv, hd, bits, mode, num_blocks=24, seed=0):
    """A filled layer cache (num_blocks, BS, 2, n_kv, hd') and its KV params, as NativeRunner._write_kv writes them."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(num_blocks * BS, 2, n_kv, hd, generator=g) * 2 + torch.randn(2, n_kv, 1, generator=g)
    if bits == 16:
        return x.to(mode).view(num_blocks, BS, 2, n_kv, hd), {}
    if mode == "static":
        lo, hi = x.amin((0, 3), keepdim=True)[0], x.amax((0, 3), keepdim=True)[0]       # (2, n_kv, 1)
        p = {"scale": (hi - lo) / (2 ** bits - 1), "zp": (lo + hi) / 2}
        s, z = p["scale"], p["zp"]
    else:
        s, z = kv_dynamic_params(x, bits)                                               # (rows, 2, n_kv)
        p = {"scale": s, "zp": z}
        s, z = s[..., None], z[..., None]
    codes = torch.round((x - z) / s).clamp_(*qrange(bits)).to(torch.int8)
    codes = pack_int4(codes) if bits == 4 else codes
    return codes.view(num_blocks, BS, 2, n_kv, -1), p


def tables(ctx, max_blocks=12, num_blocks=24, seed=0):
    """Block tables (B, max_blocks) int32 of distinct, shuffled block ids (unused entries 0) for these contexts."""
    ids = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(seed)).to(torch.int32)
    bt, used = torch.zeros(len(ctx), max_blocks, dtype=torch.int32), 0
    for b, n in enumerate(ctx):
        k = -(-n // BS)
        bt[b, :k] = ids[used:used + k]
        used += k
    return bt, torch.tensor(ctx, dtype=torch.int32)


CTX = {1: [37], 3: [1, BS, 3 * BS + 5], 8: [1, 2, BS, BS + 1, 17, 40, 3 * BS, 5]}


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("bits,mode", KV, ids=lambda v: str(v).replace("torch.", ""))
@pytest.mark.parametrize("hd,nh,n_kv", [(64, 9, 3), (128, 4, 4), (64, 2, 2), (128, 6, 2)])
def test_kernel_equals_reference(isa, bits, mode, hd, nh, n_kv):
    cache, p = paged_cache(n_kv, hd, bits, mode, seed=hd + nh)
    kv_mode = "none" if bits == 16 else mode
    assert supports(cache, bits, kv_mode, nh)
    attn = PagedAttnCPU([cache], [p], bits, kv_mode, nh, hd ** -0.5, threads=1, isa=isa)
    for B, ctx in CTX.items():
        bt, ctx = tables(ctx, seed=hd + B)
        q = torch.randn(B, nh + 2 * n_kv, hd)[:, :nh]        # strided rows, as the runner passes them
        got = attn(0, q, bt, ctx)
        ref = attn_cpu_ref(q, cache, p, bits, kv_mode, bt, ctx, hd ** -0.5)
        assert got.shape == (B, nh * hd) and got.dtype == torch.float32
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=2e-5 * ref.abs().max().item())


@pytest.mark.parametrize("isa", ISAS)
def test_threads_split_tasks(isa):
    cache, p = paged_cache(3, 64, 8, "dynamic")
    bt, ctx = tables(CTX[8])
    q = torch.randn(8, 9, 64)
    one, two = (PagedAttnCPU([cache], [p], 8, "dynamic", 9, 0.125, threads=t, isa=isa) for t in (1, 2))
    assert torch.equal(one(0, q, bt, ctx), two(0, q, bt, ctx))


def test_bad_tables_raise():
    cache, p = paged_cache(3, 64, 8, "static", num_blocks=4)
    attn, q = PagedAttnCPU([cache], [p], 8, "static", 9, 0.125, threads=1), torch.randn(1, 9, 64)
    for bt, n in [([[0, 1]], 2 * BS + 1), ([[0, 4]], BS + 1), ([[-1, 0]], 3)]:     # too long; block ids 4, -1
        with pytest.raises(ValueError, match="block"):
            attn(0, q, torch.tensor(bt, dtype=torch.int32), torch.tensor([n], dtype=torch.int32))
    attend = attn.step(torch.tensor([[2, 3]]), torch.tensor([BS + 1]))              # int64 tables converted
    with pytest.raises(ValueError, match="q"):
        attend(0, torch.randn(2, 9, 64))


def test_supports():
    cache, _ = paged_cache(3, 64, 8, "static", num_blocks=2)
    assert supports(cache, 8, "static", 9) and not supports(cache, 8, "static", 8)       # 8 heads over 3 groups
    assert not supports(cache.view(torch.uint8), 8, "static", 9)                          # int8 codes only
    assert not supports(torch.zeros(2, BS, 2, 3, 64, dtype=torch.float16), 16, "none", 9)  # fp16: torch path
    assert not supports(torch.zeros(2, BS, 2, 3, 40), 16, "none", 9)                      # head_dim % 16


@pytest.mark.parametrize("ws,qp,kv_mode", [("fp16", 0, None), ("w4", 8, "dynamic"), ("w4", 4, "static")])
def test_runner_decodes_through_the_kernel(monkeypatch, tiny, ws, qp, kv_mode):  # noqa: F811
    monkeypatch.setenv("PIPELINE_KERNELS", "native")
    monkeypatch.setenv("PIPELINE_NATIVE_DTYPE", "fp32")
    overrides = {"session_len": 256, "quant_policy": qp, "kv_mode": kv_mode}
    eng = Engine.from_workspace(tiny["root"] / ws, "cpu", overrides)
    r, calls = eng.runner, []
    assert isinstance(r.attn_cpu, PagedAttnCPU)
    step = PagedAttnCPU.step

    def checked(self, bt, ctx):                          # each call against the reference on the live cache
        attend = step(self, bt, ctx)

        def check(l, q):
            o = attend(l, q)
            ref = attn_cpu_ref(q, r.kv_cache[l], r.kv[l], r.kv_bits, r.kv_mode, bt, ctx, r.scale)
            torch.testing.assert_close(o, ref, rtol=1e-5, atol=1e-5)
            calls.append(ctx.tolist())
            return o
        return check
    monkeypatch.setattr(PagedAttnCPU, "step", checked)
    got = eng.generate(PROMPTS, GREEDY)
    assert len(calls) == 2 * (GREEDY.max_new_tokens - 1) and len(calls[0]) == len(PROMPTS)
    if qp == 0:     # 16-bit KV: the tokens of the torch path (int8 / int4 codes that flip on a 1e-7 change can
        r.attn_cpu = None   # move this random model's greedy tokens: test_native.py checks them against the reference)
        assert eng.generate(PROMPTS, GREEDY) == got
    monkeypatch.setenv("PIPELINE_CPU_KERNEL", "0")
    assert Engine.from_workspace(tiny["root"] / ws, "cpu", overrides).runner.attn_cpu is None
