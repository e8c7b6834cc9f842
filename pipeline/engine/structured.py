"""Grammar-constrained decoding with xgrammar (what vLLM and SGLang use): a JSON Schema becomes a token mask per step.

    check_schema('{"type": "object"}')                  # ValueError naming what xgrammar cannot use
    g = Grammars(tokenizer, vocab_size=49152, stop_ids=[2])   # once per engine: the tokenizer's tables
    m = g.matcher(schema_text)                           # a fresh matcher; compiled grammars are cached per schema
    bitmask = g.bitmask(batch)                           # (batch, ceil(V / 32)) int32, one bit per token
    m.fill_next_token_bitmask(bitmask, row); apply_bitmask(logits, bitmask, rows); m.accept_token(t)

The grammar allows the stop tokens only where the JSON is complete, so a constrained request ends on EOS exactly
when its output parses and matches. JSON is compiled compact (`any_whitespace=False`): a small model cannot wander
into endless whitespace. xgrammar is imported on first use: a server that never constrains never loads it.
"""
from __future__ import annotations

import json

import torch


def _xgr():
    import xgrammar
    return xgrammar


def check_schema(text: str) -> None:
    """ValueError when `text` is not a JSON Schema that xgrammar can compile (not JSON, a bad type, a dangling $ref)."""
    try:
        schema = json.loads(text)
    except (TypeError, json.JSONDecodeError) as e:
        raise ValueError(f"json_schema is not valid JSON: {e}") from None
    if not isinstance(schema, (dict, bool)):
        raise ValueError(f"json_schema must be a JSON object, got {type(schema).__name__}")
    try:
        _xgr().Grammar.from_json_schema(text, any_whitespace=False)
    except RuntimeError as e:     # xgrammar's converter: "<time> <file>:<line>: <reason>"
        raise ValueError(f"json_schema cannot be used: {str(e).strip().split(': ', 1)[-1]}") from None


class Grammars:
    """The tokenizer's tables for xgrammar (built once, ~0.1 s) and its compiler, which caches grammars per schema."""

    def __init__(self, tokenizer, vocab_size: int, stop_ids: list[int]):
        xgr = _xgr()
        if tokenizer is None:
            raise ValueError("json_schema needs the workspace's tokenizer (triton_models/tokenizer is missing)")
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=sorted(stop_ids))
        self.compiler = xgr.GrammarCompiler(info)
        self.vocab_size = vocab_size

    def matcher(self, schema: str):
        """A matcher at the start of `schema`'s grammar (the compiler caches compiled grammars by schema text)."""
        return _xgr().GrammarMatcher(self.compiler.compile_json_schema(schema, any_whitespace=False))

    def bitmask(self, rows: int) -> torch.Tensor:
        return _xgr().allocate_token_bitmask(rows, self.vocab_size)


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int]) -> None:
    """logits (B, V) fp32: the tokens each listed row's mask forbids set to -inf, in place (bitmask on the host)."""
    _xgr().apply_token_bitmask_inplace(logits, bitmask.to(logits.device, non_blocking=True), indices=rows)
