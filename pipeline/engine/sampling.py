"""Next-token choice per row: repetition penalty, temperature, top-k, top-p, seeded sampling, greedy."""
from __future__ import annotations

import torch

from .params import SamplingParams


def apply_repetition_penalty(logits: torch.Tensor, seen: list[int], penalty: float) -> torch.Tensor:
    """HF convention on one row (V,): positive logits of seen tokens / penalty, negative ones * penalty."""
    if penalty == 1.0 or not seen:
        return logits
    idx = torch.tensor(sorted(set(seen)), device=logits.device)
    x = logits[idx]
    logits[idx] = torch.where(x > 0, x / penalty, x * penalty)
    return logits


def filter_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Row (V,) of temperature-scaled logits -> same with excluded tokens at -inf."""
    if top_k and top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        srt, order = torch.sort(logits, descending=True)
        cum = srt.softmax(-1).cumsum(-1)
        drop = cum - srt.softmax(-1) > top_p          # keep the smallest prefix whose mass reaches top_p
        logits = logits.clone()
        logits[order[drop]] = float("-inf")
    return logits


def sample(logits: torch.Tensor, params: list[SamplingParams], seen: list[list[int]],
           generators: list[torch.Generator]) -> list[int]:
    """logits (B, V) fp32 -> one token per row."""
    logits = logits.float()
    simple = all(p.temperature == 0 and p.repetition_penalty == 1.0 for p in params)
    if simple:
        return logits.argmax(-1).tolist()
    out = []
    for i, p in enumerate(params):
        row = apply_repetition_penalty(logits[i].clone(), seen[i], p.repetition_penalty)
        if p.temperature == 0:
            out.append(int(row.argmax()))
            continue
        row = filter_top_k_top_p(row / p.temperature, p.top_k, p.top_p)
        probs = row.softmax(-1)
        out.append(int(torch.multinomial(probs.cpu(), 1, generator=generators[i])))  # CPU generators
    return out
