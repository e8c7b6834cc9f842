"""Log-probabilities on the device, for the requests that ask (SamplingParams.logprobs / prompt_logprobs).

log_softmax of the fp32 logits (the model's own distribution: before temperature, top-k/top-p and penalties, as
vLLM reports by default), then the given token's log-probability and the k most likely tokens, for the asking rows
only; the results (a few numbers a row) go to the host with non-blocking copies, so a decode step queued ahead
(Engine._decode_ahead) is not held back by them. Requests that ask for nothing never reach this module.

    lp = request_rows(logits, tokens, [None, 5, 0])   # logits (B, V), tokens (B,) int64 on the device; None: skip
    ...                                               # (the next step may be queued here)
    rows = lp.fetch()      # [None, [logprob, top_ids (5), top_logprobs (5)], [logprob, [], []]]

An entry is `[logprob, top_ids, top_logprobs]`: plain lists (they cross the engine-core process's msgpack IPC as
they are), the top ones most likely first.
"""
from __future__ import annotations

from typing import Optional

import torch

ROWS_PER_PASS = 512    # rows per log_softmax: bounds the (rows, V) fp32 temporaries of a long prompt's logprobs


class DeviceLogprobs:
    """The asking rows' logprobs, computed and queued for the host; fetch() waits for them."""

    def __init__(self, logits: torch.Tensor, tokens: torch.Tensor, ks: list[Optional[int]]):
        self.rows = [i for i, k in enumerate(ks) if k is not None]
        self.ks, self.n = [ks[i] for i in self.rows], len(ks)
        if len(self.rows) < len(ks):
            idx = torch.tensor(self.rows, device=logits.device)
            logits, tokens = logits[idx], tokens[idx]
        kmax = max(self.ks)
        chosen, top_v, top_i = [], [], []
        for a in range(0, logits.shape[0], ROWS_PER_PASS):
            lp = torch.log_softmax(logits[a:a + ROWS_PER_PASS].float(), dim=-1)          # (r, V)
            chosen.append(lp.gather(1, tokens[a:a + ROWS_PER_PASS, None])[:, 0])     # (r,)
            if kmax:
                v, i = lp.topk(kmax, dim=-1)                                          # (r, kmax), sorted
                top_v.append(v)
                top_i.append(i)
        out = [torch.cat(chosen)] + ([torch.cat(top_v), torch.cat(top_i)] if kmax else [])
        self.done = None
        if logits.device.type == "cuda":
            host = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in out]
            for h, t in zip(host, out):
                h.copy_(t, non_blocking=True)
            self.done = torch.cuda.Event()
            self.done.record()
            out = host
        self.out = out

    def fetch(self) -> list[Optional[list]]:
        """One entry per row given (None where not asked): [logprob, top_ids, top_logprobs]."""
        if self.done is not None:
            self.done.synchronize()
        chosen = self.out[0].tolist()
        top_v, top_i = (self.out[1].tolist(), self.out[2].tolist()) if len(self.out) > 1 else ([], [])
        res: list[Optional[list]] = [None] * self.n
        for j, (row, k) in enumerate(zip(self.rows, self.ks)):
            res[row] = [chosen[j], top_i[j][:k] if k else [], top_v[j][:k] if k else []]
        return res


def request_rows(logits: torch.Tensor, tokens: torch.Tensor, ks: list[Optional[int]]) -> Optional[DeviceLogprobs]:
    """The logprobs of `tokens` (and the top-k) for the rows whose k is not None; None when no row asks."""
    if all(k is None for k in ks):
        return None
    return DeviceLogprobs(logits, tokens, ks)
