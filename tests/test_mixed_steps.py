"""Mixed steps: while requests decode, a new request's prompt chunks and every decoder's next token run in one
forward (each decoder a one-token chunk). Same tokens as separate prefill and decode steps (greedy and seeded
sampling, fp16 / int8 / int4 KV, chunked prompts), counted in the engine's step stats. CPU, the tiny random model."""
from __future__ import annotations

import pytest

from pipeline.engine import Engine, SamplingParams

from test_engine import ARGS
from test_prefix_cache import ws  # noqa: F401 - the fp16 workspace (static KV qparams) fixture


PROMPTS = [[(5 * i + 7 * j + 1) % ARGS.vocab_size for j in range(n)] for i, n in enumerate((9, 40, 3, 27, 70))]


def staggered(eng: Engine, params: list[SamplingParams]) -> list[list[int]]:
    """Each request joins two steps after the one before it (so the earlier ones are decoding when it prefills)."""
    handles = []
    for p, sp in zip(PROMPTS, params):
        handles.append(eng.submit(p, sp))
        eng.step()
        eng.step()
    while any(not h.done_pushed for h in handles):
        eng.step()
    return [[t for out in h for t in out.token_ids] for h in handles]


@pytest.mark.parametrize("overrides", [{}, {"quant_policy": 4}, {"max_prefill_tokens": 16},
                                       pytest.param({"quant_policy": 8}, marks=pytest.mark.slow)],
                         ids=["fp16", "int8", "chunked", "int4"])
def test_mixed_steps_give_the_same_tokens(ws, overrides):  # noqa: F811
    params = [SamplingParams(max_new_tokens=10 + i, ignore_eos=True) for i in range(4)] + \
             [SamplingParams(max_new_tokens=12, ignore_eos=True, temperature=0.8, top_k=20, seed=3)]
    base = {"session_len": 256, "cache_block_seq_len": 16, "lookahead": False, **overrides}
    sep = Engine.from_workspace(ws, "cpu", {**base, "mixed_steps": False})
    mixed = Engine.from_workspace(ws, "cpu", base)
    want = staggered(sep, params)
    assert staggered(mixed, params) == want
    assert [len(t) for t in want] == [10, 11, 12, 13, 12]
    st, st0 = mixed.stats()["steps"], sep.stats()["steps"]
    assert st0["mixed_steps"] == 0 and st["mixed_steps"] >= 4
    assert st["prefill_tokens"] == st0["prefill_tokens"] == sum(map(len, PROMPTS))   # prompt tokens only
    # every output token after a request's first comes from a decode step or rides in a mixed step
    assert st["decode_tokens"] + st["mixed_decode_tokens"] == st0["decode_tokens"] == sum(map(len, want)) - 5
    assert mixed.stats()["free_blocks"] == mixed.stats()["total_blocks"]
