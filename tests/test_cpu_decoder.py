"""A CPU decode step's layers in one C call (pipeline/kernels/cpu_decoder.py, csrc/decoder_cpu.c):

- the torch-native runner takes it for a W4A16 workspace with a 16-bit KV cache or int8 / int4 KV with static
  scales, and its decode logits are bit for bit those of the per-op loop (the same C functions with the same
  arguments), with 1 and 3 sequences of ragged contexts, one or two threads, with and without q/k/v and output
  biases; the greedy tokens are the same;
- it is not taken where some op of the loop is not C (dynamic KV scales, fp32 exact mode's dense linears) or when
  turned off (PIPELINE_CPU_FUSED=0, PIPELINE_CPU_KERNEL=0), and the loop then runs as before.
"""
from __future__ import annotations

import pytest
import torch

from pipeline.engine import Engine
from pipeline.engine.native import NativeRunner
from pipeline.kernels import cpu_linear
from pipeline.kernels.cpu_decoder import FusedDecoder

from test_engine import PROMPTS, tiny  # noqa: F401  (the module fixture: fp16 and w4 workspaces)
from test_native import GREEDY

pytestmark = pytest.mark.skipif(not cpu_linear.available(), reason="no C compiler or no AVX2 here: no kernels")


def native(monkeypatch, tiny, overrides, dtype="bf16"):  # noqa: F811
    monkeypatch.setenv("PIPELINE_KERNELS", "native")
    monkeypatch.setenv("PIPELINE_NATIVE_DTYPE", dtype)
    return Engine.from_workspace(tiny["root"] / "w4", "cpu", {"session_len": 256, **overrides})


def decode_logits(eng, prompts):
    """(greedy tokens, every decode step's logits) of one generate call."""
    r, seen = eng.runner, []
    decode = type(r).decode

    def spy(*a, **k):
        out = decode(r, *a, **k)
        seen.append(out.clone())
        return out
    r.decode = spy
    try:
        return eng.generate(prompts, GREEDY), seen
    finally:
        del r.decode


KINDS = {"int8": {"quant_policy": 4, "kv_mode": "static"}, "int4": {"quant_policy": 8, "kv_mode": "static"},
         "bf16": {"quant_policy": 0}}


@pytest.mark.parametrize("n_prompts,thread_rows,bias,kv", [
    (1, 1, False, "int8"), (3, 1, False, "int8"), (3, 64, False, "int8"), (3, 1, True, "int8"), (1, 64, True, "int8"),
    (3, 1, False, "int4"), (3, 1, True, "bf16"), (1, 1, False, "bf16")])
def test_fused_decode_is_bit_for_bit_the_per_op_loop(monkeypatch, tiny, n_prompts, thread_rows, bias, kv):  # noqa: F811
    monkeypatch.setenv("PIPELINE_CPU_KERNEL_THREAD_ROWS", str(thread_rows))   # 64: every call on the caller alone
    eng = native(monkeypatch, tiny, KINDS[kv])
    r = eng.runner
    assert r.fused is not None and r.attn_cpu is not None
    if bias:    # the workspace has none: give every layer q/k/v and output biases (bf16, as the runner keeps them)
        g = torch.Generator().manual_seed(0)
        for L in r.layers:
            L.b_qkv = torch.randn(L.w_qkv.small.N if hasattr(L.w_qkv, "small") else L.w_qkv.N, generator=g).bfloat16()
            L.b_o = torch.randn(r.args.dim, generator=g).bfloat16()
        r.fused = FusedDecoder.build(r)
    prompts = PROMPTS[:n_prompts]
    fused = r.fused
    got_tokens, got = decode_logits(eng, prompts)
    r.fused = None
    want_tokens, want = decode_logits(eng, prompts)
    assert got_tokens == want_tokens
    assert len(got) == len(want) == GREEDY.max_new_tokens - 1
    for a, b in zip(got, want):
        assert a.shape == (n_prompts, r.args.vocab_size) and torch.equal(a, b)
    r.fused = fused


@pytest.mark.parametrize("overrides,env,dtype", [
    ({"quant_policy": 4, "kv_mode": "dynamic"}, {}, "bf16"), ({"quant_policy": 8, "kv_mode": "dynamic"}, {}, "bf16"),
    ({"quant_policy": 0}, {}, "fp32"),
    ({"quant_policy": 4, "kv_mode": "static"}, {"PIPELINE_CPU_FUSED": "0"}, "bf16"),
    ({"quant_policy": 4, "kv_mode": "static"}, {"PIPELINE_CPU_KERNEL": "0"}, "bf16")])
def test_not_taken_where_an_op_is_not_ours_or_when_off(monkeypatch, tiny, overrides, env, dtype):  # noqa: F811
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    eng = native(monkeypatch, tiny, overrides, dtype)
    assert eng.runner.fused is None
    tokens = eng.generate(PROMPTS, GREEDY)
    assert len(tokens) == len(PROMPTS) and all(len(t) == GREEDY.max_new_tokens for t in tokens)


@pytest.mark.parametrize("kv", ["int8", "int4", "bf16"])
def test_prefill_of_several_prompts_through_the_row_attention_equals_sdpa(monkeypatch, tiny, kv):  # noqa: F811
    """A prefill step of several chunks attends through the C decode attention, each row a query over its own
    sequence's rows (NativeRunner._prefill_rows): the first layer's attention equals the SDPA path's
    (PIPELINE_CPU_PREFILL_ROWS_CONTEXT=0) up to fp32 summation order, and the greedy tokens are the same. (Later
    layers' outputs drift further apart, as between any two summation orders: a 1e-7 change can flip an int8 KV
    code or a bf16 rounding, which the next layers carry on.)"""
    eng = native(monkeypatch, tiny, KINDS[kv])
    seen, run = [], NativeRunner._run

    def spy(self, tokens, positions, slots, attend, select=None):
        def first(l, q):
            o = attend(l, q)
            if l == 0 and select is not None:              # a prefill step's first layer
                seen.append((tokens.shape[0], q.clone(), o.clone()))
            return o
        return run(self, tokens, positions, slots, first, select)
    monkeypatch.setattr(NativeRunner, "_run", spy)
    rows = eng.generate(PROMPTS, GREEDY)
    monkeypatch.setenv("PIPELINE_CPU_PREFILL_ROWS_CONTEXT", "0")
    sdpa = eng.generate(PROMPTS, GREEDY)
    assert rows == sdpa
    (T, q1, got), (T2, q2, want) = seen[0], seen[-1]
    assert T == T2 == sum(len(p) for p in PROMPTS) and torch.equal(q1, q2)     # one step of all the prompts
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
