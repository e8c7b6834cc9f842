"""Prompt-lookup speculative decoding (vLLM's "ngram" method): draft tokens copied from the sequence itself, all
checked by one decode step, greedy requests only, outputs identical to plain greedy decoding.

    drafts = propose(s.tokens, k=4, max_n=3)   # the tokens that followed the latest earlier match of the last n
    toks = accepted(drafts, preds)             # preds: the step's argmax for rows 0..len(drafts)

How a step checks them (Engine._decode_spec): a sequence at position p with drafts d_1..d_k takes k + 1 rows of one
decode step, row j at position p + j with input token d_j (row 0: its last token), all rows sharing its block table.
Every decode path writes a layer's K / V for all rows before any row attends, and row j attends to context p + j + 1,
so row j sees the drafts before it: the rows' argmax are what greedy decoding would choose after each prefix. A draft
is kept while it equals the choice of the row before it; the first choice that differs (or the choice after the
last draft) is kept too, so a step yields 1 to k + 1 tokens. The K / V rows of rejected drafts lie past the
sequence's length, in its own blocks, and are written again when those positions are decoded.
Where it pays: a memory-bound decode step costs about the same for a few more rows (a GPU at small batches; a CPU's
int4 kernels less so), on outputs that repeat their input (editing, extraction, code, quoting).
"""
from __future__ import annotations

import numpy as np


def eligible(s) -> bool:
    """A sequence whose token is the plain argmax: greedy, no logit bias, penalties or grammar, no logprobs."""
    p = s.params
    return p.temperature == 0 and not p.logit_bias and s.state is None and p.logprobs is None


def propose(tokens: list[int], k: int, max_n: int = 3, min_n: int = 2) -> list[int]:
    """Up to k tokens that followed the most recent earlier occurrence of the last n tokens (n from max_n down to
    min_n, the longest match first); [] where none occurs."""
    if k <= 0 or len(tokens) <= min_n:
        return []
    arr = np.asarray(tokens, dtype=np.int64)
    hay = arr[:-1]                       # a match must end before the last token: it has a continuation
    for n in range(min(max_n, len(hay)), min_n - 1, -1):
        hits = np.flatnonzero((np.lib.stride_tricks.sliding_window_view(hay, n) == arr[-n:]).all(axis=1))
        if len(hits):
            start = int(hits[-1]) + n
            return arr[start:start + k].tolist()
    return []


def accepted(drafts: list[int], preds: list[int]) -> list[int]:
    """The tokens a step yields: preds[0], then preds[j] for as long as draft j equals preds[j - 1]."""
    out = [preds[0]]
    for j, d in enumerate(drafts, 1):
        if d != preds[j - 1]:
            break
        out.append(preds[j])
    return out
