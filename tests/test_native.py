"""The torch-native backend (CPU): its linears against the kernels' references, the engine against the reference path.

- int4 on PyTorch's op (`Int4Packed`, `_weight_int4pack_mm_for_cpu`, bf16 activations; our C kernel, which a CPU
  takes where it fits, has tests/test_cpu_linear.py) equals `w4a16_linear_ref` on
  the same bf16-rounded input within bf16 rounding of the scales (2^-8 of the output's magnitude), for group sizes
  32/64/128, asymmetric zero points 0..15 and odd shapes (N not a multiple of 16 takes the dequantized layout);
  so do its prefill-size batches on the oneDNN bf16 copy (dense_rows).
- The lm_head (`Int8Head`: two int8 input terms, oneDNN's u8 x s8 GEMM on a prepacked weight) equals the same
  integer products through `torch._int_mm` (exact) for any row count.
- W8A8 (`Int8Dynamic`, `torch._int_mm`) equals `int8_linear_ref` on the reference's own per-token quantization
  (integer products exact: only the fp32 epilogue's rounding may differ).
- The engine: greedy tokens of the native path in exact mode (PIPELINE_NATIVE_DTYPE=fp32) equal the reference
  path's (PIPELINE_KERNELS=reference) for fp16, W4A16 and W8A8 workspaces, with 16-bit, int8 and int4 KV, static and
  dynamic. The fast mode (bf16 activations, int8 lm_head) on W4A16 + int8 KV: this random model's logits move by
  2.6% of their mean magnitude on average (bf16 rounding of every linear's input, amplified by int8 KV codes that
  flip); its accuracy on a real model is test_native_smollm2.py's perplexity test.
"""
from __future__ import annotations

import pytest
import torch

from pipeline.engine import Engine, SamplingParams
from pipeline.engine.native import NativeRunner
from pipeline.kernels.native import ByRows, Dense, Int4Packed, Int8Dynamic, Int8Head
from pipeline.weights import native_linear
from pipeline.kernels.quant_act import quantize_per_token_ref
from pipeline.kernels.int8_gemm import int8_linear_ref
from pipeline.kernels.w4a16 import pack_w4, w4a16_linear_ref
from pipeline.quant.w8 import W8Weight, quantize_w8

from test_engine import PROMPTS, tiny  # noqa: F401  (the module fixture: fp16 and w4 workspaces)
from test_engine_w8a8 import tiny as tiny_w8  # noqa: F401

GREEDY = SamplingParams(max_new_tokens=12, ignore_eos=True)


def w4(N: int, K: int, g: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (N, K), generator=gen, dtype=torch.uint8)
    s = (torch.rand(K // g, N, generator=gen) * 0.02 + 0.001).half()
    z = torch.randint(0, 16, (K // g, N), generator=gen).half()
    return pack_w4(q, s, z, g)


@pytest.mark.parametrize("N,K,g", [(48, 96, 32), (160, 192, 64), (64, 384, 128), (3072, 576, 64), (40, 256, 128)])
@pytest.mark.parametrize("M,dense_rows", [(1, 0), (5, 0), (1, 4), (5, 4)])
def test_int4_linear_matches_reference(monkeypatch, N, K, g, M, dense_rows):
    monkeypatch.setenv("PIPELINE_CPU_KERNEL", "0")    # PyTorch's int4 op (our C kernel: tests/test_cpu_linear.py)
    w = w4(N, K, g)
    lin = native_linear(w, torch.bfloat16, dense_rows)
    small = lin.small if isinstance(lin, ByRows) else lin
    assert isinstance(small, Int4Packed if N % 16 == 0 else Dense)
    x = torch.randn(M, K).bfloat16().float()          # the bf16 input both sides see
    bias = torch.randn(N)
    ref = w4a16_linear_ref(x, w, bias)
    got = lin(x, bias.bfloat16()).float()
    assert got.shape == (M, N) and got.dtype == torch.float32
    assert (got - ref).abs().max() <= 2 ** -7 * ref.abs().max(), (got - ref).abs().max() / ref.abs().max()
    exact = native_linear(w, torch.float32)            # exact mode: dequantized once, fp32
    torch.testing.assert_close(exact(x, bias), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_int4_packed_takes_a_strided_input(device):
    """A column slice (the SwiGLU's gate half, as NativeRunner.warmup_gemms passes it) gives the contiguous input's
    result: PyTorch's CUDA int4 op raised 'Expected A.is_contiguous()' on it (the forced native backend on an H100,
    2026-12-07)."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    w = w4(64, 256, 64)
    w = w.to(device)
    lin = Int4Packed(w)
    wide = torch.randn(5, 512, device=device).bfloat16()
    x = wide[:, :256]
    assert not x.is_contiguous()
    torch.testing.assert_close(lin(x).float(), lin(x.contiguous()).float(), rtol=0, atol=0)
    ref = w4a16_linear_ref(x.float(), w)
    assert (lin(x).float() - ref).abs().max() <= 2 ** -7 * ref.abs().max()


@pytest.mark.parametrize("N,K,M", [(64, 128, 1), (72, 200, 7), (256, 576, 17)])
def test_int8_linear_matches_reference(N, K, M):
    gen = torch.Generator().manual_seed(1)
    q, s = quantize_w8(torch.randn(N, K, generator=gen))
    x, bias = torch.randn(M, K, generator=gen), torch.randn(N, generator=gen)
    lin = native_linear(W8Weight(q, s.half()), torch.float32)
    assert isinstance(lin, Int8Dynamic)
    xq, xs = quantize_per_token_ref(x)
    ref = int8_linear_ref(xq, xs, q, s.half(), bias, out_dtype=torch.float32)
    torch.testing.assert_close(lin(x, bias), ref, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("T", [1, 3, 8])
def test_int8_head_onednn_equals_int_mm(T):
    gen = torch.Generator().manual_seed(2)
    head = Int8Head(torch.randn(4000, 96, generator=gen))
    assert head.packed is not None                      # this torch has oneDNN's int8 linear
    x = torch.randn(T, 96, generator=gen)
    got = head(x)
    head.packed = None                                  # the torch._int_mm path
    torch.testing.assert_close(got, head(x), rtol=1e-6, atol=1e-6)


def engines(monkeypatch, ws, overrides, dtype="fp32"):
    """(reference-path engine, native engine) on the same workspace."""
    monkeypatch.setenv("PIPELINE_KERNELS", "reference")
    ref = Engine.from_workspace(ws, "cpu", overrides)
    monkeypatch.setenv("PIPELINE_KERNELS", "native")
    monkeypatch.setenv("PIPELINE_NATIVE_DTYPE", dtype)
    nat = Engine.from_workspace(ws, "cpu", overrides)
    assert isinstance(nat.runner, NativeRunner) and not isinstance(ref.runner, NativeRunner)
    return ref, nat


@pytest.mark.parametrize("ws,qp,kv_mode", [("fp16", 0, None), ("w4", 0, None), ("w4", 4, "static"),
                                           ("w4", 4, "dynamic"), ("w4", 8, "static"), ("w4", 8, "dynamic")])
def test_engine_native_greedy_equals_reference(monkeypatch, tiny, ws, qp, kv_mode):  # noqa: F811
    # chunked prefill too; fcfs: this random model's greedy tokens with int4 dynamic KV change with the rows that share
    # a prefill step (in both paths, one prompt at a time vs batched), and the two paths agree bit for bit on this
    # composition, not on every one
    ref, nat = engines(monkeypatch, tiny["root"] / ws, {"session_len": 256, "quant_policy": qp, "kv_mode": kv_mode,
                                                        "max_prefill_tokens": 16, "schedule": "fcfs"})
    assert nat.runner.kv_mode == ref.runner.kv_mode and nat.runner.kv_bits == ref.runner.kv_bits
    if qp != 8:
        assert nat.generate(PROMPTS, GREEDY) == ref.generate(PROMPTS, GREEDY)
        return
    # int4 KV: a code is 1/15 of a head's range, so the two paths' ~1e-5 differences in K and V round some values to
    # neighbouring codes, and this random model's logprobs move by up to ~0.05 (on one Xeon, at main: 73 vs 147 at
    # step 7 of prompt 2, 0.045 apart in the reference). Greedy tokens must agree up to a step where the reference's
    # top two are that close (a near-tie), after which the two sequences are different prompts.
    lp = SamplingParams(max_new_tokens=GREEDY.max_new_tokens, ignore_eos=True, logprobs=2)
    runs = [logprob_runs(e, PROMPTS, lp) for e in (ref, nat)]
    assert all(len(r) == GREEDY.max_new_tokens for rs in runs for r in rs)
    for want, got in zip(*runs):
        for (tw, (_, ids, top)), (tg, _) in zip(want, got):
            if tw != tg:
                assert tg in ids and top[0] - top[ids.index(tg)] < 0.1, (tw, tg, ids, top)
                break


def logprob_runs(eng, prompts, params) -> list[list[tuple[int, list]]]:
    """Per prompt, (token, [logprob, top ids, top logprobs]) for each generated token."""
    handles = [eng.submit(p, params) for p in prompts]
    while any(not h.done_pushed for h in handles):
        eng.step()
    return [[(t, lp) for out in h for t, lp in zip(out.token_ids, out.logprobs)] for h in handles]


@pytest.mark.parametrize("qp", [0, 4])
def test_engine_native_w8a8_greedy_equals_reference(monkeypatch, tiny_w8, qp):  # noqa: F811
    ref, nat = engines(monkeypatch, tiny_w8["root"] / "w8", {"session_len": 256, "quant_policy": qp})
    assert nat.generate(PROMPTS, GREEDY) == ref.generate(PROMPTS, GREEDY)


@pytest.mark.gpu
def test_engine_native_forced_on_cuda_warms_up_and_matches_reference(monkeypatch, tiny):  # noqa: F811
    """The old-GPU path (PIPELINE_KERNELS=native on a CUDA device): the engine builds, warms up (its GEMMs at every
    prefill size: this crashed on an H100 on a strided input) and gives the reference path's logits within bf16's
    error."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    monkeypatch.setenv("PIPELINE_KERNELS", "reference")
    ref = Engine.from_workspace(tiny["root"] / "w4", "cuda", {"session_len": 256, "quant_policy": 4})
    monkeypatch.setenv("PIPELINE_KERNELS", "native")
    nat = Engine.from_workspace(tiny["root"] / "w4", "cuda", {"session_len": 256, "quant_policy": 4})
    assert isinstance(nat.runner, NativeRunner) and nat.runner.device.type == "cuda"
    prompt = list(range(3, 60))
    lr, ln = ref.prompt_logits(prompt).float().cpu(), nat.prompt_logits(prompt).float().cpu()
    assert (lr - ln).abs().mean() <= 4e-2 * lr.abs().mean()
    assert len(nat.generate(PROMPTS, GREEDY)[0]) == GREEDY.max_new_tokens


@pytest.mark.gpu
def test_engine_native_cuda_graphs_give_the_eager_tokens(monkeypatch, tiny):  # noqa: F811
    """The native runner's decode steps captured as CUDA graphs (on a GPU by default; masked keys, padding rows on
    the scratch block) give the greedy tokens of the same engine without graphs."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    monkeypatch.setenv("PIPELINE_KERNELS", "native")
    monkeypatch.delenv("PIPELINE_NATIVE_CUDA_GRAPHS", raising=False)
    eng = Engine.from_workspace(tiny["root"] / "w4", "cuda", {"session_len": 256, "quant_policy": 4})
    assert eng.graphs is not None and eng.graphs.graphs, "no decode graph was captured"
    with_graphs = eng.generate(PROMPTS, GREEDY)
    eng.graphs = None
    assert eng.generate(PROMPTS, GREEDY) == with_graphs


def test_engine_native_bf16_logits_close_to_reference(monkeypatch, tiny):  # noqa: F811
    ref, nat = engines(monkeypatch, tiny["root"] / "w4", {"session_len": 256, "quant_policy": 4}, dtype="bf16")
    prompt = list(range(3, 60))
    lr, ln = ref.prompt_logits(prompt), nat.prompt_logits(prompt)
    assert (lr - ln).abs().mean() <= 4e-2 * lr.abs().mean()          # measured 2.6e-2
    assert (lr.argmax(-1) == ln.argmax(-1)).float().mean() >= 0.9     # measured 0.965


def test_dispatch_picks_native_where_triton_does_not_run(monkeypatch):
    from pipeline.kernels import dispatch
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    monkeypatch.setenv("PIPELINE_KERNELS", "auto")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert dispatch.use_native(cpu)
    monkeypatch.setattr(dispatch, "device_capability", lambda device: (6, 1))   # a P40
    assert dispatch.use_native(gpu)
    monkeypatch.setattr(dispatch, "device_capability", lambda device: (9, 0))   # an H100: Triton kernels
    assert not dispatch.use_native(gpu)
    monkeypatch.setenv("PIPELINE_KERNELS", "native")                            # forced, on any device
    assert dispatch.use_native(gpu) and not dispatch.use_triton(torch.zeros(1), "k_native")
    monkeypatch.setenv("PIPELINE_KERNELS", "reference")
    assert not dispatch.use_native(cpu)
    monkeypatch.setenv("PIPELINE_KERNELS", "auto")
    monkeypatch.setenv("TRITON_INTERPRET", "1")                                 # the test suite's kernels' path
    assert not dispatch.use_native(cpu)


def test_graph_shaped_decode_step_matches_eager_and_padding_writes_only_scratch(monkeypatch, tiny):  # noqa: F811
    """What a CUDA graph of the native runner replays (engine/graphs.py), on the CPU: a decode step shaped by the
    context bucket (`max_context_len`: keys masked past each context, no host read of the lengths) with padding rows
    (slot -1, context 1, block 0) gives the real rows' logits of the eager step, and the padding rows' K/V land in
    the scratch block only (the blocks of real sequences keep their bits)."""
    import pipeline.engine.native as native_mod
    monkeypatch.setenv("PIPELINE_KERNELS", "native")
    monkeypatch.setenv("PIPELINE_CPU_KERNEL", "0")     # torch's ops: the path a GPU runs
    monkeypatch.setattr(native_mod, "scratch_blocks", lambda device: 1)
    eng = Engine.from_workspace(tiny["root"] / "w4", "cpu", {"session_len": 256, "quant_policy": 4,
                                                             "warmup": False})
    r = eng.runner
    assert isinstance(r, NativeRunner) and r.attn_cpu is None and r.scratch_slot == r.num_blocks * r.block_size
    bs = r.block_size
    lens = [37, 90]                                    # two sequences, ragged, in blocks 1.. and 3..
    tables = [torch.tensor([1, 2, 0, 0], dtype=torch.int32), torch.tensor([3, 4, 0, 0], dtype=torch.int32)]
    for L, bt in zip(lens, tables):
        ids = torch.arange(3, 3 + L)
        pos = torch.arange(L)
        slots = torch.tensor([int(bt[p // bs]) * bs + p % bs for p in range(L)])
        r.prefill(ids, pos, slots, [(0, L, bt, L)], torch.tensor([L - 1]))
    tok = torch.tensor([5, 6])
    pos = torch.tensor(lens)
    slots = torch.tensor([int(bt[p // bs]) * bs + p % bs for bt, p in zip(tables, lens)])
    bt = torch.stack(tables)
    ctx = torch.tensor([L + 1 for L in lens], dtype=torch.int32)
    eager = r.decode(tok, pos, slots, bt, ctx).clone()
    before = [c[:r.num_blocks].clone() for c in r.kv_cache]
    pad = 2                                            # the graph's bucket of 4 rows, context bucket 256
    graph = r.decode(torch.cat([tok, torch.zeros(pad, dtype=torch.long)]),
                     torch.cat([pos, torch.zeros(pad, dtype=torch.long)]),
                     torch.cat([slots, torch.full((pad,), -1)]),
                     torch.cat([bt, torch.zeros(pad, 4, dtype=torch.int32)]),
                     torch.cat([ctx, torch.ones(pad, dtype=torch.int32)]), max_context_len=256)
    assert torch.allclose(graph[:2], eager, rtol=1e-4, atol=1e-4), (graph[:2] - eager).abs().max()
    for c, b in zip(r.kv_cache, before):               # the real rows rewrote the same K/V; padding went to scratch
        assert torch.equal(c[:r.num_blocks], b)
        assert c[r.num_blocks, 0].abs().sum() > 0
