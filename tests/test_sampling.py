"""Batched next-token choice (pipeline/engine/sampling.py, processors.py) against plain per-row references and the
OpenAI / Hugging Face definitions of the penalties, worked by hand."""
from __future__ import annotations

import torch

from pipeline.engine import processors
from pipeline.engine.params import SamplingParams
from pipeline.engine.sampling import ARGMAX_CHUNK, argmax, filter_top_k_top_p, sample_device


class Seq:
    """What processors.apply reads of an engine Sequence: params and state."""

    def __init__(self, params: SamplingParams, prompt: list[int]):
        self.params = params
        self.state = processors.RowState(params, prompt) if processors.needs_state(params) else None


def sample(logits, seqs, generators) -> list[int]:
    return sample_device(processors.apply(logits, seqs), [s.params for s in seqs], generators).tolist()


def filter_row_ref(row: torch.Tensor, k: int, p: float) -> torch.Tensor:
    """One row, the textbook way: keep the k largest, then the smallest sorted prefix whose mass reaches p."""
    row = row.clone()
    if 0 < k < row.numel():
        row[row < torch.sort(row, descending=True).values[k - 1]] = float("-inf")
    if p < 1.0:
        srt, order = torch.sort(row, descending=True)
        probs = srt.softmax(-1)
        keep = (probs.cumsum(-1) - probs) < p
        row[order[~keep]] = float("-inf")
    return row


def test_filter_matches_per_row_reference_with_mixed_settings():
    torch.manual_seed(0)
    V = 1000
    ks = [0, 1, 7, 50, V, V + 5, 3, 0]
    ps = [1.0, 0.9, 0.5, 1.0, 0.3, 0.99, 1.0, 0.05]
    logits = torch.randn(len(ks), V) * 3
    got = filter_top_k_top_p(logits, ks, ps)
    for i, (k, p) in enumerate(zip(ks, ps)):
        want = filter_row_ref(logits[i], k, p)
        assert torch.equal(torch.isinf(got[i]), torch.isinf(want)), f"row {i} (top_k={k}, top_p={p})"
        assert torch.equal(got[i][~torch.isinf(got[i])], logits[i][~torch.isinf(want)])
    assert not torch.isinf(got[0]).any() and (~torch.isinf(got[1])).sum() == 1   # off; top-1


def test_seeded_sampling_does_not_depend_on_the_batch():
    """A seeded request draws the same tokens alone or beside greedy, penalized and other sampled rows."""
    torch.manual_seed(1)
    V = 500
    p = SamplingParams(temperature=0.8, top_p=0.9, top_k=40)
    others = [SamplingParams(), SamplingParams(temperature=1.3, top_k=5, min_p=0.1),
              SamplingParams(repetition_penalty=1.5)]
    alone, batched = [], []
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    for _ in range(20):
        logits = torch.randn(4, V)
        alone.append(sample(logits[:1], [Seq(p, [])], [g1])[0])
        seqs = [Seq(p, [])] + [Seq(o, [1, 2, 3]) for o in others]
        out = sample(logits, seqs, [g2] + [torch.Generator().manual_seed(3)] * 3)
        batched.append(out[0])
        assert out[1] == int(logits[1].argmax())            # greedy row
        pen = logits[3].clone()
        pen[[1, 2, 3]] = torch.where(pen[[1, 2, 3]] > 0, pen[[1, 2, 3]] / 1.5, pen[[1, 2, 3]] * 1.5)
        assert out[3] == int(pen.argmax())                   # penalized greedy row
    assert alone == batched and len(set(alone)) > 1


def test_penalties_match_the_definitions_by_hand():
    """OpenAI: logit[v] -= frequency * count(v) + presence * (count(v) > 0), counts over the output only; Hugging Face's
    repetition penalty over prompt + output: positive logits / r, negative * r."""
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, 1.0]])
    s = Seq(SamplingParams(presence_penalty=0.5, frequency_penalty=0.25, repetition_penalty=2.0), prompt=[4])
    processors.apply(logits, [s])                       # the first step: nothing generated yet
    for t in [0, 0, 1]:                                 # the output so far: token 0 twice, token 1 once
        assert s.state.accept(t)
    got = processors.apply(logits, [s])[0]
    want = [2.0 / 2 - 0.25 * 2 - 0.5,                   # 0: seen (r), counted twice
            -1.0 * 2 - 0.25 - 0.5,                      # 1: seen (r), once
            0.5,                                        # 2: untouched
            3.0,                                        # 3: untouched
            1.0 / 2]                                    # 4: in the prompt: r only (OpenAI's penalties count output)
    assert torch.allclose(got, torch.tensor(want)), got
    assert torch.equal(logits, torch.tensor([[2.0, -1.0, 0.5, 3.0, 1.0]]))   # the input is never changed


def test_logit_bias_and_min_p():
    logits = torch.tensor([[0.0, 5.0, 4.0, -3.0]])
    g = [torch.Generator().manual_seed(0)]
    assert sample_device(logits, [SamplingParams(logit_bias={3: 100})], g).tolist() == [3]    # forced
    assert sample_device(logits, [SamplingParams(logit_bias={1: -100})], g).tolist() == [2]   # forbidden
    # p2 / p1 = e^-1 = 0.37 and p0, p3 are under 0.01 of p1: min_p=0.5 keeps token 1 only, min_p=0.3 tokens 1 and 2
    hot = SamplingParams(temperature=1.0, min_p=0.5)
    assert {sample_device(logits, [hot], g)[0].item() for _ in range(50)} == {1}
    warm = SamplingParams(temperature=1.0, min_p=0.3)
    assert {sample_device(logits, [warm], g)[0].item() for _ in range(200)} == {1, 2}


def test_cpu_argmax_is_torch_argmax_on_ties_nan_and_inf():
    """The chunked CPU argmax picks what torch.argmax picks: the first of tied maxima (within a chunk and across
    chunks), a NaN, an all -inf row's 0; odd vocabularies and strided rows take torch's own."""
    V = 48 * ARGMAX_CHUNK
    g = torch.Generator().manual_seed(0)
    x = torch.randn(9, V, generator=g)
    x[1, [5, 6000, V - 1]] = 50.0                        # ties across chunks
    x[2, [ARGMAX_CHUNK + 3, ARGMAX_CHUNK + 9]] = 50.0     # ties inside one chunk
    x[3, [70, 30000]] = float("nan")
    x[4] = float("-inf")
    x[5, 123] = float("inf")
    x[6] = 0.0
    x[7] = x[7].to(torch.bfloat16).float()               # many exact ties among bf16-rounded values
    for logits in (x, x[:, :V - 7], x[:, ::2], x[:1], x[:4], torch.randn(4, 2 * ARGMAX_CHUNK, generator=g)):
        assert torch.equal(argmax(logits), logits.argmax(-1))
