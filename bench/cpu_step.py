"""CPU decode step: the engine's host time per step beside the model runner's, with and without the CPU step path.

    python bench/cpu_step.py --workspace PATH [--new-tokens 64] [--rounds 3] [--out bench/results/cpu_step.json]

PATH: a workspace, e.g. the default main job's (`python -m pipeline.runner`; its run folder's report.json names the
turbomind stage's folder, the workspace is its `workspace/`). Engine.generate in this thread (as bench/cpu.py), greedy,
EOS ignored, batch 1 and 8 concurrent chat prompts, max_batch_size 8. Per run: output tok/s over the wall time, the
decode step time from the engine's counters, the runner's own `decode` time per step (timed around the call), and the
host time per step = (wall - prefill time - runner decode time) / runner calls: scheduling, step inputs, the token
choice, detokenizing and streaming (plus the request's admission, amortized).

Two modes alternate in one process (the machine is shared; each row records the load average): `step` (this code:
the chunked CPU argmax of sampling.argmax, and a greedy step of >= 4 rows running its inputs, forward and token
choice inside the runner's decode threads; batch 1 takes the code before) and `baseline` (torch's argmax, the decode threads switched around the forward only: the code
before). Both must give the same tokens; the script checks it.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import pipeline  # noqa: E402,F401  (before torch: OMP_WAIT_POLICY=passive)
from pipeline.engine import Engine, SamplingParams  # noqa: E402
from pipeline.engine import engine as engine_mod, sampling  # noqa: E402

QUESTIONS = ["What is the capital of France?", "Write a haiku about the sea.", "Name three primary colors.",
             "What does a compiler do?", "Give me a synonym for happy.", "Why is the sky blue?",
             "How many legs does a spider have?", "What is 12 times 12?"]
KEYS = ("tok_s", "decode_tok_s", "step_ms", "runner_ms", "host_ms_per_step")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workspace", required=True)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "cpu_step.json"))
    a = ap.parse_args()
    eng = Engine.from_workspace(a.workspace, "cpu", {"max_batch_size": 8})
    prompts = [eng.apply_chat_template([{"role": "user", "content": q}]) for q in QUESTIONS]
    runner, timed = eng.runner, {"s": 0.0, "n": 0}
    decode = runner.decode

    def timed_decode(*args, **kw):
        t = time.perf_counter()
        out = decode(*args, **kw)
        timed["s"] += time.perf_counter() - t
        timed["n"] += 1
        return out
    runner.decode = timed_decode
    modes = {"step": (sampling.argmax, eng._step_threads),
             "baseline": (lambda logits: logits.argmax(-1), contextlib.nullcontext)}

    def use(mode: str) -> None:
        choose, threads = modes[mode]
        engine_mod.argmax = sampling.argmax = choose   # sample_device reads the module's name at call time
        eng._step_threads = threads

    params = SamplingParams(max_new_tokens=a.new_tokens, ignore_eos=True)
    eng.generate([prompts[1]], SamplingParams(max_new_tokens=4, ignore_eos=True))   # warm-up (lazy op setup)
    rows, tokens = [], {}
    for r in range(a.rounds):
        for batch in (1, 8):
            for mode in ("baseline", "step") if r % 2 == 0 else ("step", "baseline"):
                use(mode)
                before, load = dict(eng.steps), os.getloadavg()[0]
                timed.update(s=0.0, n=0)
                t0 = time.perf_counter()
                out = eng.generate(prompts[:batch], params)
                wall = time.perf_counter() - t0
                d = {k: eng.steps[k] - before[k] for k in before}
                row = {"round": r, "mode": mode, "batch": batch, "load": round(load, 2),
                       "tok_s": round(batch * a.new_tokens / wall, 2),
                       "decode_tok_s": round(d["decode_tokens"] / d["decode_s"], 2),
                       "step_ms": round(d["decode_s"] / d["decode_steps"] * 1e3, 3),
                       "runner_ms": round(timed["s"] / timed["n"] * 1e3, 3),
                       "host_ms_per_step": round((wall - d["prefill_s"] - timed["s"]) / timed["n"] * 1e3, 3)}
                print(row, flush=True)
                rows.append(row)
                tokens.setdefault(batch, []).append(out)
    use("step")
    same = all(o == outs[0] for outs in tokens.values() for o in outs)
    median = {f"{m}_batch{b}": {k: round(statistics.median(x[k] for x in rows if x["mode"] == m and x["batch"] == b), 3)
                                for k in KEYS} for b in (1, 8) for m in ("baseline", "step")}
    res = {"torch_threads": __import__("torch").get_num_threads(), "new_tokens": a.new_tokens, "rounds": a.rounds,
           "same_tokens": same, "median": median, "rows": rows}
    Path(a.out).write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps(median, indent=1), "\nsame tokens in every run:", same)
    if not same:
        raise SystemExit("the two modes gave different tokens")


if __name__ == "__main__":
    main()
