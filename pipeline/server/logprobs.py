"""OpenAI logprob objects from the engine's entries ([logprob, top_ids, top_logprobs] per token, see
pipeline/engine/logprobs.py), for one HTTP request's choices.

    lp = ChoiceLogprobs(tokenizer, chat=False)
    lp.completion(i, prompt_ids, prompt_entries)   # echo: the prompt's part ({tokens, token_logprobs, ...})
    lp.completion(i, token_ids, entries)           # then the generated tokens (called again per streamed piece)
    lp.chat(token_ids, entries)                    # chat: [{token, logprob, bytes, top_logprobs: [...]}, ...]

Completions (the legacy shape lm-eval reads): `tokens` (each token's text), `token_logprobs`, `top_logprobs` (a dict
token text -> logprob per token: the top-k and the chosen token, as vLLM gives them; the first prompt token of an
echo has None for both, having no context) and `text_offset` (where each token's text starts in the choice's text,
counted over the tokens' texts, carried on across streamed pieces). -inf is reported as -9999.0 (JSON has no
infinity; vLLM's convention).
"""
from __future__ import annotations

from typing import Optional

FLOOR = -9999.0


class ChoiceLogprobs:
    def __init__(self, tokenizer, chat: bool):
        self.tok, self.chat_shape = tokenizer, chat
        self._text: dict[int, str] = {}
        self._offset: dict[int, int] = {}      # choice index -> text_offset of its next token

    def text(self, token_id: int) -> str:
        s = self._text.get(token_id)
        if s is None:
            s = self._text[token_id] = self.tok.decode([token_id]) if self.tok is not None else f"token_id:{token_id}"
        return s

    def completion(self, index: int, ids: list[int], entries: list[Optional[list]]) -> dict:
        """The legacy logprobs object of these tokens of choice `index` (entries: one per id, None: no context)."""
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        off = self._offset.get(index, 0)
        for t, e in zip(ids, entries):
            s = self.text(t)
            out["tokens"].append(s)
            out["text_offset"].append(off)
            off += len(s)
            if e is None:
                out["token_logprobs"].append(None)
                out["top_logprobs"].append(None)
                continue
            lp, top_ids, top_lps = e
            top = {self.text(i): max(v, FLOOR) for i, v in zip(top_ids, top_lps)}
            top.setdefault(s, max(lp, FLOOR))
            out["token_logprobs"].append(max(lp, FLOOR))
            out["top_logprobs"].append(top)
        self._offset[index] = off
        return out

    def _chat_token(self, token_id: int, lp: float) -> dict:
        s = self.text(token_id)
        return {"token": s, "logprob": max(lp, FLOOR), "bytes": list(s.encode("utf-8"))}

    def chat(self, ids: list[int], entries: list[list]) -> list[dict]:
        """The chat shape's `logprobs.content` items of these tokens."""
        return [{**self._chat_token(t, lp), "top_logprobs": [self._chat_token(i, v) for i, v in zip(top_ids, top_lps)]}
                for t, (lp, top_ids, top_lps) in zip(ids, entries)]

    def piece(self, index: int, ids: list[int], entries: Optional[list]) -> Optional[dict]:
        """A choice's (or a streamed chunk's) `logprobs` value for these generated tokens; None when not asked."""
        if entries is None:
            return None
        return {"content": self.chat(ids, entries)} if self.chat_shape else self.completion(index, ids, entries)


def merge(a: dict, b: dict) -> dict:
    """Two legacy logprobs objects of consecutive tokens as one (echo: the prompt's, then the generated ones)."""
    return {k: a[k] + b[k] for k in a}
