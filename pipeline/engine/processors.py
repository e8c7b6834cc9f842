"""Logits processors that need a request's history: repetition / presence / frequency penalties and the JSON grammar.

A request uses them when `needs_state(params)`; the engine then gives its Sequence a `RowState`. Penalties live on
the logits' device (token counts updated there), so penalized requests keep the look-ahead path; a grammar needs
each token on the host before the next mask, so a batch with a constrained request decodes on the plain path
(logits read by the host) while it runs. Temperature, top-k / top-p / min-p and logit_bias need no history
(`sampling.sample_device`). Per step:

    logits = apply(logits, seqs)        # (B, V) fp32: only the rows whose sequence has a RowState are changed
    ... choose tokens ...
    count_on_device(seqs, tokens)       # look-ahead path: counts take the device's tokens without a host sync
    ok = seq.state.accept(token)        # counts the token (unless counted on the device); advances the grammar
    seq.state.done                      # the grammar took its stop token (EOS): the request ends

Definitions (as OpenAI and vLLM): with c[v] the count of token v in the output so far,
    logit[v] -= frequency_penalty * c[v] + presence_penalty * (c[v] > 0)
and the repetition penalty (Hugging Face's) divides positive / multiplies negative logits of every token already in
the prompt or the output. The grammar's mask sets every token it forbids to -inf (EOS only where the JSON is done).
"""
from __future__ import annotations

from typing import Optional

import torch

from .params import SamplingParams


def needs_penalty(p: SamplingParams) -> bool:
    return p.repetition_penalty != 1.0 or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0


def needs_state(p: SamplingParams) -> bool:
    """True when choosing this request's tokens needs its history (penalties) or a grammar."""
    return needs_penalty(p) or p.json_schema is not None


def penalize(logits: torch.Tensor, counts: torch.Tensor, seen: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """One row (V,) fp32 -> penalized: counts (V,) fp32 output-token counts, seen (V,) bool prompt or output tokens."""
    if p.repetition_penalty != 1.0:
        r = p.repetition_penalty
        logits = torch.where(seen, torch.where(logits > 0, logits / r, logits * r), logits)
    if p.frequency_penalty != 0.0 or p.presence_penalty != 0.0:
        logits = logits - p.frequency_penalty * counts - p.presence_penalty * (counts > 0).float()
    return logits


class RowState:
    """One request's history for its processors: token counts and prompt/output membership (on the logits' device,
    made at its first step) and its grammar matcher (xgrammar; None without json_schema)."""

    def __init__(self, params: SamplingParams, prompt: list[int], matcher=None):
        self.params, self.prompt, self.matcher = params, prompt, matcher
        self.counts: Optional[torch.Tensor] = None      # (V,) fp32
        self.seen: Optional[torch.Tensor] = None        # (V,) bool
        self.ahead = 0                                  # tokens counted on the device, not yet accepted by the host

    def _init(self, vocab: int, device: torch.device) -> None:
        self.counts = torch.zeros(vocab, device=device)
        self.seen = torch.zeros(vocab, dtype=torch.bool, device=device)
        self.seen[torch.tensor(self.prompt, device=device)] = True

    def penalize(self, row: torch.Tensor) -> torch.Tensor:
        if self.counts is None:
            self._init(row.numel(), row.device)
        return penalize(row, self.counts, self.seen, self.params)

    @property
    def done(self) -> bool:
        """The grammar took its stop token: the output is complete."""
        return self.matcher is not None and self.matcher.is_terminated()

    def count(self, token: torch.Tensor) -> None:
        """Count this step's token, a (1,) tensor on the counts' device (no host sync); its accept() skips counting."""
        self.counts.index_put_((token,), torch.ones(1, device=token.device), accumulate=True)
        self.seen.index_put_((token,), torch.ones(1, dtype=torch.bool, device=token.device))
        self.ahead += 1

    def accept(self, token: int) -> bool:
        if self.ahead:
            self.ahead -= 1
        elif self.counts is not None:
            self.counts[token] += 1
            self.seen[token] = True
        return self.matcher is None or self.matcher.accept_token(token)


def on_device(s) -> bool:
    """A sequence whose tokens can be chosen without the host (no grammar): the look-ahead path can step it."""
    return s.state is None or s.state.matcher is None


def count_on_device(seqs: list, tokens: torch.Tensor) -> None:
    """tokens (B,) chosen on the device: each penalized row's counts take its token there."""
    for i, s in enumerate(seqs):
        if s.state is not None and s.state.counts is not None:
            s.state.count(tokens[i:i + 1])


def apply(logits: torch.Tensor, seqs: list, grammars=None) -> torch.Tensor:
    """logits (B, V) -> fp32 with each stateful row's penalties and grammar mask applied (a copy when any row is
    changed: the input may be a CUDA graph's output buffer). grammars: the engine's structured.Grammars."""
    logits = logits.float()
    rows = [i for i, s in enumerate(seqs) if s.state is not None]
    if not rows:
        return logits
    logits = logits.clone()
    for i in rows:
        if needs_penalty(seqs[i].params):
            logits[i] = seqs[i].state.penalize(logits[i])
    masked = [i for i in rows if seqs[i].state.matcher is not None]
    if masked:
        from .structured import apply_bitmask
        bitmask = grammars.bitmask(len(seqs))
        for i in masked:
            seqs[i].state.matcher.fill_next_token_bitmask(bitmask, i)
        apply_bitmask(logits, bitmask, masked)
    return logits
