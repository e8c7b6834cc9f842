"""Batched next-token choice (pipeline/engine/sampling.py) against a plain per-row reference."""
from __future__ import annotations

import torch

from pipeline.engine.params import SamplingParams
from pipeline.engine.sampling import filter_top_k_top_p, sample


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
    others = [SamplingParams(), SamplingParams(temperature=1.3, top_k=5), SamplingParams(repetition_penalty=1.5)]
    alone, batched = [], []
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    for _ in range(20):
        logits = torch.randn(4, V)
        alone.append(sample(logits[:1], [p], [[]], [g1])[0])
        out = sample(logits, [p] + others, [[], [], [], [1, 2, 3]], [g2] + [torch.Generator().manual_seed(3)] * 3)
        batched.append(out[0])
        assert out[1] == int(logits[1].argmax())            # greedy row
        pen = logits[3].clone()
        pen[[1, 2, 3]] = torch.where(pen[[1, 2, 3]] > 0, pen[[1, 2, 3]] / 1.5, pen[[1, 2, 3]] * 1.5)
        assert out[3] == int(pen.argmax())                   # penalized greedy row
    assert alone == batched and len(set(alone)) > 1
