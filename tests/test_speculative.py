"""Prompt-lookup speculative decoding (pipeline/engine/speculative.py, Engine._decode_spec): the proposer and the
acceptance rule, and on the CPU engine: greedy outputs identical with it on and off (drafts kept and refused, length
and stop-token ends, several sequences in one step, the row budget), its counters, and the CLI flag."""
from __future__ import annotations

import pytest

from pipeline.engine import Engine, SamplingParams
from pipeline.engine.speculative import accepted, propose
from tests.test_engine import PROMPTS, tiny  # noqa: F401 - the tiny workspaces fixture


def test_propose_copies_what_followed_the_latest_longest_match():
    t = [1, 2, 3, 9, 9, 1, 2, 3, 7, 8, 5, 1, 2, 3]
    assert propose(t, 3) == [7, 8, 5]                 # the latest "2 3" (3-gram "1 2 3" first) was followed by 7 8 5
    assert propose(t, 10) == [7, 8, 5, 1, 2, 3]       # up to the end
    assert propose([4, 5, 6, 4, 5], 2, max_n=3) == [6, 4]   # n = 2 where no 3-gram repeats
    assert propose([1, 2, 3, 4], 3) == [] and propose([1, 1], 3) == [] and propose(t, 0) == []
    assert propose([7, 7, 7, 7], 2) == [7]             # the one match of "7 7 7" has one token after it


def test_accepted_keeps_drafts_while_they_match_the_choice_before_them():
    assert accepted([], [5]) == [5]
    assert accepted([4, 6], [4, 6, 9]) == [4, 6, 9]    # both kept, and the choice after the last
    assert accepted([4, 6], [4, 7, 9]) == [4, 7]       # the second refused: the choice at its row instead
    assert accepted([3, 6], [4, 6, 9]) == [4]          # the first refused


def _run(eng, prompts, params):
    hs = [eng.submit(p, sp) for p, sp in zip(prompts, params)]
    while any(not h.done_pushed for h in hs):
        eng.step()
    return [[t for o in h for t in o.token_ids] for h in hs]


@pytest.mark.parametrize("k", [1, 4])
def test_greedy_outputs_equal_with_drafts_checked(tiny, k):  # noqa: F811
    """Several greedy requests of different lengths (one ending on a stop token id, one at its max_new_tokens inside
    a step's drafts, one repeating its prompt) give the same tokens as plain decoding, and drafts were kept."""
    ws = tiny["root"] / "w4"
    plain = Engine.from_workspace(ws, "cpu", {"session_len": 256})
    spec = Engine.from_workspace(ws, "cpu", {"session_len": 256, "speculative_tokens": k})
    loop = [40, 41, 42, 43] * 6
    base = _run(plain, [PROMPTS[1]], [SamplingParams(max_new_tokens=30, ignore_eos=True)])[0]
    prompts = [PROMPTS[0], PROMPTS[1], loop, PROMPTS[3]]
    params = [SamplingParams(max_new_tokens=n, ignore_eos=True) for n in (25, 30, 40, 7)]
    params[1] = SamplingParams(max_new_tokens=30, ignore_eos=True, stop_token_ids=[base[20]])
    want = _run(plain, prompts, params)
    got = _run(spec, prompts, params)
    assert got == want and [len(x) for x in got][0] == 25 and len(got[3]) == 7
    st = spec.stats()["steps"]
    assert st["spec_steps"] > 0 and 0 < st["spec_accepted"] <= st["spec_drafted"]
    assert st["decode_steps"] < plain.stats()["steps"]["decode_steps"]    # kept drafts are tokens without a step
    assert spec.stats()["free_blocks"] == spec.stats()["total_blocks"]


def test_row_budget_and_sampled_requests(tiny):  # noqa: F811
    """A full batch leaves no rows for drafts (max_batch_size rows a step) and still decodes; a sampled request in
    the batch turns the step back into plain decoding (drafts are checked against the argmax only)."""
    ws = tiny["root"] / "w4"
    opts = {"session_len": 256, "max_batch_size": 2}
    plain = Engine.from_workspace(ws, "cpu", opts)
    spec = Engine.from_workspace(ws, "cpu", {**opts, "speculative_tokens": 3})
    loop = [40, 41, 42, 43] * 6
    sp = SamplingParams(max_new_tokens=12, ignore_eos=True)
    assert _run(spec, [loop, loop], [sp, sp]) == _run(plain, [loop, loop], [sp, sp])
    assert spec.stats()["steps"]["spec_drafted"] == 0            # 2 sequences in 2 rows: no room for a draft
    mixed = [sp, SamplingParams(max_new_tokens=12, ignore_eos=True, temperature=1.0, seed=3)]
    before = spec.stats()["steps"]["spec_steps"]
    assert _run(spec, [loop, loop], mixed) == _run(plain, [loop, loop], mixed)
    assert spec.stats()["steps"]["spec_steps"] == before
    with pytest.raises(ValueError, match="speculative_tokens=-1 is out of range"):
        Engine.from_workspace(ws, "cpu", {**opts, "speculative_tokens": -1})


@pytest.mark.gpu
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs CUDA")
def test_gpu_drafts_in_the_decode_graphs_equal_plain(tiny):  # noqa: F811
    """On a GPU the drafts ride in the captured decode graphs (rows of one bucket): the same tokens as plain greedy
    decoding (graphs and look-ahead on), drafts kept. (Exact equality asks the GPU kernels for the same argmax at
    every row count the steps use, as vLLM's n-gram tests do; a near-tie flipped by another tile's summation order
    would show here first.)"""
    ws = tiny["root"] / "w4"
    opts = {"session_len": 256, "max_batch_size": 8}
    plain = Engine.from_workspace(ws, "cuda", opts)
    spec = Engine.from_workspace(ws, "cuda", {**opts, "speculative_tokens": 3})
    assert spec.graphs is not None
    loop = [40, 41, 42, 43] * 6
    prompts, params = [PROMPTS[1], loop], [SamplingParams(max_new_tokens=n, ignore_eos=True) for n in (30, 40)]
    assert _run(spec, prompts, params) == _run(plain, prompts, params)
    assert spec.stats()["steps"]["spec_accepted"] > 0
