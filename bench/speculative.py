"""Prompt-lookup speculative decoding against plain greedy decoding, batch 1, same engine and workspace, one run:
decode tok/s and the drafts kept on tasks whose answer repeats the prompt (copy, edit) and one whose answer does not
(a story), every engine's tokens checked equal to plain decoding's.

    python -m pipeline.runner pipeline=serve serve.mode=generate 'serve.prompts=[hi]'   # builds the default workspace
    python bench/speculative.py outputs/cache/turbomind/<key>/workspace --device cpu --out bench/results/spec.json

Each (task, engine) runs 3 times, the engines' order reversed every other round; reported: the median wall's tok/s
and its ratio to plain decoding (prefill included, the same in every engine), drafted / kept drafts and decode steps
of one run. Prefix caching off, so every run computes the same prompt the same way.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipeline.engine import Engine, SamplingParams  # noqa: E402

TEXT = ("The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs. How vexingly quick daft "
        "zebras jump. Sphinx of black quartz, judge my vow. The five boxing wizards jump quickly.")
TASKS = {"copy": f"Repeat the following text exactly, word for word:\n\n{TEXT}",
         "edit": f"Rewrite the following text, replacing every period with an exclamation mark:\n\n{TEXT}",
         "story": "Write a short story about a cat who learns to fly."}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("workspace")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--tokens", type=int, default=96)
    ap.add_argument("--k", default="4,8", help="draft tokens of the speculative engines")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    opts = {"session_len": 1024, "prefix_caching": False}
    engines = {"off": Engine.from_workspace(a.workspace, a.device, opts)}
    engines.update({f"k{k}": Engine.from_workspace(a.workspace, a.device, {**opts, "speculative_tokens": int(k)})
                    for k in a.k.split(",")})
    res = {"device": a.device, "workspace_model": engines["off"].model_name, "tokens": a.tokens, "rows": {}}
    for task, prompt in TASKS.items():
        ids = engines["off"].apply_chat_template([{"role": "user", "content": prompt}])
        runs: dict = {}
        for rnd in range(a.rounds):
            order = list(engines.items()) if rnd % 2 == 0 else list(engines.items())[::-1]
            for name, eng in order:
                st0 = dict(eng.stats()["steps"])
                t0 = time.perf_counter()
                toks = eng.generate([ids], SamplingParams(max_new_tokens=a.tokens, ignore_eos=True))[0]
                dt = time.perf_counter() - t0
                st = eng.stats()["steps"]
                runs.setdefault(name, []).append({"wall_s": dt, "tokens": toks, **{
                    k: st[k] - st0[k] for k in ("spec_drafted", "spec_accepted", "decode_steps")}})
        base = statistics.median(r["wall_s"] for r in runs["off"])
        for name, rs in runs.items():
            if any(r["tokens"] != runs["off"][0]["tokens"] for r in rs):
                raise SystemExit(f"{task} / {name}: tokens differ from plain greedy decoding")
            med = statistics.median(r["wall_s"] for r in rs)
            row = {"tok_s": a.tokens / med, "over_plain": base / med,
                   **{k: rs[0][k] for k in ("spec_drafted", "spec_accepted", "decode_steps")}}
            res["rows"][f"{task}/{name}"] = row
            print(f"{task:6s} {name:4s} {row['tok_s']:7.1f} tok/s  {row['over_plain']:.2f}x  drafted "
                  f"{row['spec_drafted']:3d}, kept {row['spec_accepted']:3d}, decode steps {row['decode_steps']}",
                  flush=True)
    Path(a.out).write_text(json.dumps(res, indent=1))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
