"""What logprobs cost the engine: decode tokens/s with and without them, and prompt scoring (echo) vs plain prefill.

    python bench/logprobs.py WORKSPACE --out logprobs.json            # GPU if there is one
    python bench/logprobs.py WORKSPACE --device cpu --batch 4 --new 16 --prompt 64 --session-len 256

Rows (each after one untimed run of the same requests, the engine stepping in this thread):
  decode    `batch` greedy requests of a 16-token prompt, `new` tokens each (ignore_eos): tokens/s with no logprobs
            (the fast path: greedy decode graph, look-ahead), logprobs=0 and logprobs=5 on every request, and
            logprobs=5 on one request of the batch
  score     `batch` prompts of `prompt` tokens: prompt tokens/s of plain prefill (max_new_tokens=1) and of scoring
            (max_new_tokens=0, prompt_logprobs=1: every row's logits, lm-eval's loglikelihood request)
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.engine import Engine, SamplingParams  # noqa: E402


def timed(eng: Engine, prompts: list[list[int]], params: list[SamplingParams]) -> float:
    """Seconds for these requests, run to the end in this thread (after one untimed run of the same)."""
    for timing in (False, True):
        if eng.runner.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        handles = [eng.submit(p, sp) for p, sp in zip(prompts, params)]
        for h in handles:
            for _ in h:
                pass
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("workspace")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--new", type=int, default=128, help="new tokens per decode request")
    ap.add_argument("--prompt", type=int, default=512, help="tokens per scored prompt")
    ap.add_argument("--session-len", type=int, default=None, help="default: the workspace's")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    eng = Engine.from_workspace(a.workspace, a.device, {"prefix_caching": False,    # every prompt computed
                                                        "session_len": a.session_len})
    V, B = eng.runner.args.vocab_size, a.batch
    gen = torch.Generator().manual_seed(0)
    short = [torch.randint(100, V - 1, (16,), generator=gen).tolist() for _ in range(B)]
    long = [torch.randint(100, V - 1, (a.prompt,), generator=gen).tolist() for _ in range(B)]
    res = {"device": str(eng.runner.device), "model": eng.model_name, "batch": B, "new": a.new, "prompt": a.prompt}
    for name, ks in [("none", [None] * B), ("logprobs0_all", [0] * B), ("logprobs5_all", [5] * B),
                     ("logprobs5_one", [5] + [None] * (B - 1))]:
        s = timed(eng, short, [SamplingParams(max_new_tokens=a.new, ignore_eos=True, logprobs=k) for k in ks])
        res[f"decode_{name}_tok_s"] = round(B * a.new / s, 1)
    s = timed(eng, long, [SamplingParams(max_new_tokens=1, ignore_eos=True)] * B)
    res["prefill_tok_s"] = round(B * a.prompt / s, 1)
    s = timed(eng, long, [SamplingParams(max_new_tokens=0, prompt_logprobs=1)] * B)
    res["score_tok_s"] = round(B * a.prompt / s, 1)
    print(json.dumps(res, indent=1))
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
