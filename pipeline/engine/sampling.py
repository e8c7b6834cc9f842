"""Next-token choice per row: logit_bias, temperature, top-k, top-p, min-p, seeded sampling, greedy.

`sample_device` chooses on the logits' device without a host sync, so a decode step of sampled requests can be
queued ahead of the host (Engine._decode_ahead). What needs a request's history (penalties, a grammar) is applied
to the logits before it, by processors.py."""
from __future__ import annotations

from typing import Optional

import torch

from .params import SamplingParams


def filter_top_k_top_p(logits: torch.Tensor, top_k: list[int], top_p: list[float],
                       min_p: Optional[list[float]] = None) -> torch.Tensor:
    """(B, V) temperature-scaled logits -> the same with each row's tokens outside its top-k (0: off), then
    outside its top-p nucleus (the smallest prefix of the sorted distribution whose mass reaches top_p; 1: off),
    then less likely than min_p times its most likely token (0: off) at -inf. One batched pass for all rows (a
    decode step of B sampled requests launches a few kernels, not a few per request)."""
    B, V = logits.shape
    dev = logits.device
    on = [0 < k < V for k in top_k]
    if any(on):
        kmax = max(k for k, o in zip(top_k, on) if o)
        vals = torch.topk(logits, kmax, dim=-1).values                                     # (B, kmax)
        idx = torch.tensor([k - 1 if o else 0 for k, o in zip(top_k, on)], device=dev)
        kth = vals.gather(1, idx[:, None])                                                 # (B, 1)
        kth = kth.masked_fill(~torch.tensor(on, device=dev)[:, None], float("-inf"))
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if any(p < 1.0 for p in top_p):
        srt, order = torch.sort(logits, descending=True, dim=-1)
        probs = srt.softmax(-1)
        tp = torch.tensor([p if p < 1.0 else float("inf") for p in top_p], device=dev)[:, None]
        drop = probs.cumsum(-1) - probs > tp          # mass before this token already reaches top_p
        logits = logits.scatter(1, order, srt.masked_fill(drop, float("-inf")))
    if min_p and any(m > 0 for m in min_p):
        probs = logits.softmax(-1)
        floor = torch.tensor(min_p, device=dev)[:, None] * probs.max(-1, keepdim=True).values    # (B, 1)
        logits = logits.masked_fill(probs < floor, float("-inf"))
    return logits


def add_logit_bias(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """(B, V) fp32 -> a copy with each row's logit_bias added (the input unchanged: it may be a graph's buffer)."""
    rows, cols, vals = [], [], []
    for i, p in enumerate(params):
        for t, b in p.logit_bias.items():
            rows.append(i)
            cols.append(int(t))
            vals.append(float(b))
    if not rows:
        return logits
    dev = logits.device
    idx = (torch.tensor(rows, device=dev), torch.tensor(cols, device=dev))
    return logits.index_put(idx, torch.tensor(vals, device=dev), accumulate=True)


ARGMAX_CHUNK = 1024   # a CPU argmax's chunk: torch's CPU argmax does ~1 ns an element, its amax far less
ARGMAX_ROWS = 4       # rows from which the chunked CPU argmax pays (below: torch's; measured in the engine)


def argmax(logits: torch.Tensor) -> torch.Tensor:
    """logits (B, V) -> (B,) int64, exactly `logits.argmax(-1)` (the first index of each row's largest value, a NaN
    counting as the largest). On a CPU with >= ARGMAX_ROWS rows: the max of each chunk of ARGMAX_CHUNK values
    (vectorized), the first chunk holding the row's max, then the argmax inside it. In a batch-8 decode step on one
    thread (49k vocabulary) ~230 us against torch's ~430 (~360 on two); at 1-2 rows its ~150 us floor loses to torch's
    ~100-140 (docs/perf-log.md, session 10). Other devices, a V not a multiple of the chunk, strided rows: torch's."""
    B, V = logits.shape
    C = ARGMAX_CHUNK
    if logits.device.type != "cpu" or B < ARGMAX_ROWS or V % C or V < 2 * C or not logits.is_contiguous():
        return logits.argmax(-1)
    chunks = logits.view(B, V // C, C)
    first = chunks.amax(-1).argmax(-1)                                       # (B,) the first chunk with the max
    inside = chunks.gather(1, first.view(B, 1, 1).expand(B, 1, C)).view(B, C)   # (B, C) that chunk
    return first * C + inside.argmax(-1)


def sample_device(logits: torch.Tensor, params: list[SamplingParams],
                  generators: list[torch.Generator]) -> torch.Tensor:
    """logits (B, V) -> tokens (B,) int64 on logits' device, with no host sync (a decode step can be queued behind
    it): logit_bias added; argmax for temperature 0; else temperature, top-k / top-p / min-p, and a draw by the
    exponential race (argmax of p / E with E ~ Exp(1) i.i.d. per token picks token v with probability p_v), E drawn
    from the row's own generator (on logits' device): a seeded request gives the same tokens whatever else is in
    the batch."""
    logits = add_logit_bias(logits.float(), params)
    out = argmax(logits)
    rows = [i for i, p in enumerate(params) if p.temperature > 0]
    if rows:
        dev = logits.device
        idx = torch.tensor(rows, device=dev)
        temps = torch.tensor([params[i].temperature for i in rows], device=dev)[:, None]
        sub = filter_top_k_top_p(logits[idx] / temps, [params[i].top_k for i in rows],
                                 [params[i].top_p for i in rows], [params[i].min_p for i in rows])
        probs = sub.softmax(-1)
        race = torch.empty_like(probs)
        for j, i in enumerate(rows):
            race[j].exponential_(generator=generators[i])
        out[idx] = (probs / race).argmax(-1)
    return out

