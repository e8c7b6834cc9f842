"""Request-side types of the engine API (see docs/engine-api.md)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional


@dataclass
class SamplingParams:
    max_new_tokens: int = 128
    temperature: float = 0.0          # 0: greedy
    top_p: float = 1.0
    top_k: int = 0                    # 0: off
    repetition_penalty: float = 1.0   # HF convention: >1 discourages tokens already in prompt or output
    seed: Optional[int] = None        # per-request generator; None: the engine's shared one
    stop_token_ids: List[int] = field(default_factory=list)
    stop: List[str] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: Optional[int] = None         # each new token's logprob and the top-k (0: the token's only); None: off
    prompt_logprobs: Optional[int] = None  # the same for every prompt token (the first: None); max_new_tokens may be 0
    presence_penalty: float = 0.0     # OpenAI: minus this from each token already in the output (-2..2)
    frequency_penalty: float = 0.0    # OpenAI: minus this times the token's count in the output (-2..2)
    min_p: float = 0.0                # drop tokens less likely than min_p x the most likely one (0: off)
    logit_bias: Dict[int, float] = field(default_factory=dict)   # token id -> added to its logit (-100..100)
    json_schema: Optional[str] = None  # JSON Schema (JSON text) the output must match: grammar-constrained

    def validate(self) -> None:
        scoring = self.prompt_logprobs is not None     # max_new_tokens 0: score the prompt only
        checks = [("max_new_tokens", self.max_new_tokens >= (0 if scoring else 1),
                   ">= 0 with prompt_logprobs, else >= 1"),
                  ("temperature", self.temperature >= 0, ">= 0"),
                  ("top_p", 0 < self.top_p <= 1, "in (0, 1]"), ("top_k", self.top_k >= 0, ">= 0"),
                  ("repetition_penalty", self.repetition_penalty > 0, "> 0"),
                  ("logprobs", self.logprobs is None or self.logprobs >= 0, "None or >= 0"),
                  ("prompt_logprobs", self.prompt_logprobs is None or self.prompt_logprobs >= 0, "None or >= 0"),
                  ("presence_penalty", -2 <= self.presence_penalty <= 2, "in [-2, 2]"),
                  ("frequency_penalty", -2 <= self.frequency_penalty <= 2, "in [-2, 2]"),
                  ("min_p", 0 <= self.min_p <= 1, "in [0, 1]"),
                  ("logit_bias", all(-100 <= b <= 100 for b in self.logit_bias.values()), "values in [-100, 100]")]
        for name, ok, want in checks:
            if not ok:
                raise ValueError(f"SamplingParams.{name}={getattr(self, name)!r} is invalid; it must be {want}")


@dataclass
class GenerationOutput:
    request_id: int
    token_ids: List[int]              # new token ids since the last yield
    text: str                         # new text since the last yield (stop strings cut)
    finished: bool = False
    finish_reason: Optional[str] = None   # "stop" | "length" | "cancelled" | "error"
    error: Optional[str] = None
    num_prompt_tokens: int = 0
    num_generated_tokens: int = 0
    logprobs: Optional[list] = None          # per token of token_ids: [logprob, top_ids, top_logprobs] (logprobs.py)
    prompt_logprobs: Optional[list] = None   # once, when the prompt is done: None, then one entry per prompt token
