"""Whole prefill steps as CUDA graphs per token bucket (pipeline/engine/graphs.py PrefillGraphs): the buckets,
the padded step they replay (CPU, Triton's interpreter: padding rows change nothing), and on a GPU the graph's
logits and the engine's tokens against eager prefill."""
from __future__ import annotations

import pytest
import torch

from pipeline.engine import Engine, SamplingParams
from pipeline.engine.graphs import capture_chunks, prefill_buckets
from test_engine import ARGS, PROMPTS, tiny  # noqa: F401 - the module's workspace fixture


def test_prefill_buckets():
    assert prefill_buckets(2048) == [16, 24, 32, 48, 64, 96, 128, 192, 256, 320, 384, 448, 512, 640, 768, 896, 1024,
                                     1280, 1536, 1792, 2048]
    assert prefill_buckets(100) == [16, 24, 32, 48, 64, 96, 100]
    assert prefill_buckets(300) == [16, 24, 32, 48, 64, 96, 128, 192, 256, 300]
    assert prefill_buckets(16) == [16]
    b = prefill_buckets(4096)
    assert all(y <= 1.5 * x for x, y in zip(b, b[1:]))        # padding at most a third of a bucket
    assert all(y <= 1.25 * x for x, y in zip(b, b[1:]) if x >= 256)   # a fifth where the step is compute-bound


def test_a_bucket_larger_than_one_block_table_is_captured_as_several_prompts(tiny):  # noqa: F811
    """With a short session a step's token budget is still filled by several sequences: buckets go up to max_seqs
    block tables, and a bucket past one table's tokens is captured as whole-table chunks whose dummy step runs.
    (Session 16's device run: at session_len 256 every prefill graph failed to capture, 'table (4,)', and the
    engine prefilled eagerly.)"""
    eng = Engine.from_workspace(tiny["root"] / "w4", "cpu", {"session_len": 64, "max_batch_size": 2})
    r, cap = eng.runner, eng.max_blocks * eng.block_size
    table = torch.zeros(eng.max_blocks, dtype=torch.int32)
    b = prefill_buckets(min(eng.max_prefill_tokens, 2 * cap))[-1]
    assert b == 2 * cap
    dummy = capture_chunks(b, cap, table)
    assert [(off, n, ctx) for off, n, _, ctx in dummy] == [(0, cap, cap), (cap, cap, cap)]
    assert [n for _, n, _, _ in capture_chunks(cap + 5, cap, table)] == [cap, 5]
    pos = [p for _, n, _, _ in dummy for p in range(n)]
    out = r.prefill(torch.zeros(b, dtype=torch.long), torch.tensor(pos), torch.full((b,), -1), dummy,
                    torch.zeros(2, dtype=torch.long), plan=r.prefill_plan(dummy, b, max_seqs=2))
    assert out.shape == (2, ARGS.vocab_size) and torch.isfinite(out).all()


def chunks(eng, gen):
    """A step of two whole prompts and a later chunk of a third (its first 16 tokens prefilled before)."""
    r = eng.runner
    blocks = {i: list(range(4 * i, 4 * i + 4)) for i in range(3)}
    first = torch.randint(0, ARGS.vocab_size, (16,), generator=gen).tolist()
    r.prefill(*eng._dev(first, list(range(16)), [eng._slot(blocks[1], p) for p in range(16)]),
              [(0, 16, eng._table(blocks[1]), 16)])
    tokens, pos, slots, meta = [], [], [], []
    for i, (n, ctx) in enumerate([(9, 9), (4, 20), (17, 17)]):
        meta.append((len(tokens), n, eng._table(blocks[i]), ctx))
        tokens += torch.randint(0, ARGS.vocab_size, (n,), generator=gen).tolist()
        pos += list(range(ctx - n, ctx))
        slots += [eng._slot(blocks[i], p) for p in range(ctx - n, ctx)]
    return tokens, pos, slots, meta


@pytest.mark.parametrize("qp", [0, 4])
def test_padded_step_with_a_bucket_plan_equals_the_step(tiny, qp):  # noqa: F811
    """What a graph replays: tokens padded to the bucket (slot -1, position 0), a plan for the bucket and for
    more chunks than the step has, fixed-size select: the selected rows' logits equal the unpadded step's."""
    eng = Engine.from_workspace(tiny["root"] / "w4", "cpu", {"session_len": 256, "quant_policy": qp})
    r = eng.runner
    tokens, pos, slots, meta = chunks(eng, torch.Generator().manual_seed(0))
    T, b, S = len(tokens), 48, 8
    select = [8, 12, T - 1]
    ref = r.prefill(*eng._dev(tokens, pos, slots, select)[:3], meta, torch.tensor(select))
    pad = b - T
    plan = r.prefill_plan(meta, b, max_seqs=S)
    got = r.prefill(torch.tensor(tokens + [0] * pad), torch.tensor(pos + [0] * pad), torch.tensor(slots + [-1] * pad),
                    meta, torch.tensor(select + [0] * (S - len(select))), plan=plan)
    assert got.shape == (S, ARGS.vocab_size)
    assert (got[:3] - ref).abs().max() <= 1e-3 * ref.abs().max()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("qp", [0, 4])
def test_gpu_prefill_graph_logits_and_tokens_equal_eager(tiny, qp):  # noqa: F811
    opts = {"session_len": 256, "max_batch_size": 4, "max_prefill_tokens": 64, "quant_policy": qp}
    eng = Engine.from_workspace(tiny["root"] / "w4", "cuda", opts)
    pg = eng.prefill_graphs
    assert pg is not None and set(pg.graphs) == set(pg.buckets) == {16, 24, 32, 48, 64}
    tokens, pos, slots, meta = chunks(eng, torch.Generator().manual_seed(1))
    select = [8, 12, len(tokens) - 1]
    ref = eng.runner.prefill(*eng._dev(tokens, pos, slots), meta, torch.tensor(select, device="cuda"))
    host_meta = [(o, n, bt.cpu(), c) for o, n, bt, c in meta]
    got = pg.run(tokens, pos, slots, host_meta, select)
    assert (got - ref).abs().max() <= 2e-2 * ref.abs().max()
    eager = Engine.from_workspace(tiny["root"] / "w4", "cuda", {**opts, "prefill_graphs": False})
    assert eager.prefill_graphs is None
    p = SamplingParams(max_new_tokens=6, ignore_eos=True)
    prompts = PROMPTS + [list(range(3, 90))]                        # 90 tokens: two chunks of a 64-token step
    a, b = eng.generate(prompts, p), eager.generate(prompts, p)
    assert sum(x == y for x, y in zip(a, b)) >= len(a) - 1, (a, b)  # fp16 GEMMs at another M may flip one argmax
    assert eng.steps["prefill_steps"] > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_prefill_graphs_past_one_block_table(tiny):  # noqa: F811
    """session_len 64 with a 256-token step budget (session 16's bench/engine.py case, scaled down): every bucket
    up to max batch x one table captures, and a step of four whole prompts replays the largest one."""
    opts = {"session_len": 64, "max_batch_size": 4, "max_prefill_tokens": 512}
    eng = Engine.from_workspace(tiny["root"] / "w4", "cuda", opts)
    pg = eng.prefill_graphs
    assert pg is not None and set(pg.graphs) == set(pg.buckets) and pg.buckets[-1] == 4 * 64
    p = SamplingParams(max_new_tokens=4, ignore_eos=True)
    prompts = [list(range(3 + i, 63 + i)) for i in range(4)]          # 4 x 60 tokens: one 240-token step
    eager = Engine.from_workspace(tiny["root"] / "w4", "cuda", {**opts, "prefill_graphs": False})
    a, b = eng.generate(prompts, p), eager.generate(prompts, p)
    assert sum(x == y for x, y in zip(a, b)) >= len(a) - 1, (a, b)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("qp", [0, 4, 8])
def test_gpu_mixed_step_decode_rows_equal_the_decode_graph(tiny, qp):  # noqa: F811
    """A mixed step's decoders (one-token chunks in a prefill graph, beside a prompt chunk) get the logits the
    decode graph gives them, and a staggered workload gives (nearly) the tokens of separate steps."""
    opts = {"session_len": 256, "max_batch_size": 4, "max_prefill_tokens": 64, "quant_policy": qp}
    eng = Engine.from_workspace(tiny["root"] / "w4", "cuda", opts)
    gen = torch.Generator().manual_seed(2)
    ctxs = [37, 130, 5]
    blocks = {i: list(range(4 * i, 4 * i + 4)) for i in range(4)}   # 4 blocks of 64: session_len 256
    for i, c in enumerate(ctxs):     # each decoder's context (all but its last token) in the cache
        toks = torch.randint(0, ARGS.vocab_size, (c - 1,), generator=gen).tolist()
        eng.runner.prefill(*eng._dev(toks, list(range(c - 1)), [eng._slot(blocks[i], p) for p in range(c - 1)]),
                           [(0, c - 1, eng._table(blocks[i]), c - 1)])
    last = torch.randint(0, ARGS.vocab_size, (3,), generator=gen).tolist()
    pos = [c - 1 for c in ctxs]
    slots = [eng._slot(blocks[i], p) for i, p in enumerate(pos)]
    bt = torch.stack([eng._table(blocks[i]) for i in range(3)])
    ref = eng.graphs.run(*eng._dev(last, pos, slots), bt, torch.tensor(ctxs, dtype=torch.int32, device="cuda"),
                         max_context=max(ctxs)).clone()
    prompt = torch.randint(0, ARGS.vocab_size, (20,), generator=gen).tolist()
    tokens = last + prompt
    positions = pos + list(range(20))
    slot_all = slots + [eng._slot(blocks[3], p) for p in range(20)]
    meta = [(i, 1, eng._table(blocks[i]).cpu(), c) for i, c in enumerate(ctxs)] + \
           [(3, 20, eng._table(blocks[3]).cpu(), 20)]
    got = eng.prefill_graphs.run(tokens, positions, slot_all, meta, [0, 1, 2, 22])
    assert (got[:3] - ref).abs().max() <= 2e-2 * ref.abs().max()
    p = SamplingParams(max_new_tokens=8, ignore_eos=True)
    sep = Engine.from_workspace(tiny["root"] / "w4", "cuda", {**opts, "mixed_steps": False})
    outs = []
    for e in (eng, sep):
        hs = []
        for pr in PROMPTS:
            hs.append(e.submit(pr, p))
            e.step()
        while any(not h.done_pushed for h in hs):
            e.step()
        outs.append([[t for o in h for t in o.token_ids] for h in hs])
    assert eng.steps["mixed_steps"] > 0 and sep.steps["mixed_steps"] == 0
    assert sum(x == y for x, y in zip(*outs)) >= len(PROMPTS) - 1, outs   # kernels differ: one argmax may flip
