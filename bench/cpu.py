"""CPU benchmark: our engine (torch-native backend) beside `transformers` fp32 and llama.cpp, on one machine.

    python bench/cpu.py                          # everything: the main job twice, then the three engines
    python bench/cpu.py --skip-main-job --workspace PATH [--new-tokens 64] [--threads 2] [--out FILE]

One run, same cores (torch and llama.cpp both get --threads), same prompt token ids, greedy, the same number of
new tokens (EOS ignored):
  ours          Engine.from_workspace(<the default main job's w4a16_kv8 workspace>, "cpu"): AWQ int4 weights,
                static int8 KV, the torch-native backend (pipeline/engine/native.py, bf16 activations)
  transformers  LlamaForCausalLM from the same GGUF (dequantized to fp32), generate(do_sample=False)
  llama.cpp     llama-cpp-python on the same GGUF file (SmolLM2-135M-Instruct.Q4_1.gguf: Q4_1 linears, Q8_0
                embedding / output), Llama.generate with top_k=1
Rows: batch 1 (one request: prefill ms, decode tok/s = (n - 1) / time from the first to the last token) and 8
concurrent requests (8 different chat prompts: output tok/s over the wall time from submit to the last token;
ours: 8 requests in one Engine.generate; transformers: one left-padded batch; llama.cpp: llama-cpp-python's API
serves one sequence at a time, so its 8 requests run one after another). Ours: the median-wall run of --rounds runs of
each (batch 1 and 8 alternating); the peers: one run each.
The main job (--skip-main-job to skip): `python -m pipeline.runner` run twice; the second run (everything cached
but serve) is timed, and its report.json names the workspace benchmarked here.

Other workers share the machine: before each measured section the load average is read, and the run waits (up to
--max-wait s) for the 1-minute load to fall below 1; every row records the load it started at.

llama.cpp install (pinned flags): a native build (-DGGML_NATIVE=ON, the default) crashed with a segmentation fault
on the VM these numbers come from, so the benchmark's llama.cpp is built from PyPI's source package for plain AVX2:
    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=OFF \\
        -DGGML_AMX_INT8=OFF -DGGML_OPENMP=OFF" pip install llama-cpp-python --no-binary llama-cpp-python
Writes --out (default bench/results/cpu.json) and prints a table.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# the repository, not bench/ (a script's folder comes first in sys.path): bench/kernels.py would shadow the
# `kernels` package that transformers imports
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(REPO))
import pipeline  # noqa: E402,F401  (before torch: sets OMP_WAIT_POLICY=passive, see pipeline/__init__.py)

QUESTIONS = ["What is the capital of France?", "Write a haiku about the sea.", "Name three primary colors.",
             "What does a compiler do?", "Give me a synonym for happy.", "Why is the sky blue?",
             "How many legs does a spider have?", "What is 12 times 12?"]


def wait_for_quiet(max_wait: float) -> float:
    """The 1-minute load average once it is below 1, or after max_wait seconds."""
    t0 = time.time()
    while os.getloadavg()[0] >= 1.0 and time.time() - t0 < max_wait:
        time.sleep(5)
    return round(os.getloadavg()[0], 2)


# ------------------------------------------------------------------------------------------------ main job
def main_job(download_dir: str) -> dict:
    """`python -m pipeline.runner` twice (the default job); the second run timed; its workspace path."""
    out = {}
    for run in ("first", "second"):
        run_dir = REPO / "outputs" / "bench_cpu" / run
        t0 = time.perf_counter()
        p = subprocess.run([sys.executable, "-m", "pipeline.runner", f"download_dir={download_dir}",
                            f"hydra.run.dir={run_dir}"], cwd=REPO, capture_output=True, text=True)
        if p.returncode:
            raise SystemExit(f"main job failed:\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}")
        out[f"{run}_run_s"] = round(time.perf_counter() - t0, 2)
        rep = json.loads((run_dir / "report.json").read_text())
    out["stages"] = {s["name"]: s["status"] for s in rep["stages"]}
    art = Path(next(s["path"] for s in rep["stages"] if s["name"] == "turbomind"))   # the stage's artifact folder
    out["workspace"] = str((art / "workspace").resolve().relative_to(REPO))   # relative: the JSON is committed
    return out


# ------------------------------------------------------------------------------------------------ engines
def ours(ws: Path, prompts: list[list[int]], n: int, rounds: int = 5) -> dict:
    """Engine.generate in this (the main) thread, as the engine-core process steps it: per-token times from the
    engine's own step counters (prefill: the first token; decode: the rest). An engine started as a thread of a
    process (Engine.start) runs PyTorch's int4 kernel about half as fast on this CPU (OpenMP in a second thread).
    `rounds` runs of each, batch 1 and 8 alternating (the order swapped every round): each row is the run of median
    wall time, and `walls_s` lists all (one run of each moved the 8-concurrent / batch-1 ratio between 2.3x and 3.5x
    on this shared 2-vCPU VM, session 17; a slow batch-1 run alone inflates it)."""
    from pipeline.engine import Engine, SamplingParams
    eng = Engine.from_workspace(ws, "cpu", {"max_batch_size": 8})
    params = SamplingParams(max_new_tokens=n, ignore_eos=True)
    eng.generate([prompts[1]], SamplingParams(max_new_tokens=4, ignore_eos=True))   # warm-up (lazy op setup)

    def run(batch):
        before = dict(eng.steps)
        t0 = time.perf_counter()
        out = eng.generate(batch, params)
        wall = time.perf_counter() - t0
        d = {k: eng.steps[k] - before[k] for k in before}
        tokens = sum(len(o) for o in out)
        assert tokens == n * len(batch)
        r = {"requests": len(batch), "tokens": tokens, "wall_s": round(wall, 3),
             "output_tok_s": round(tokens / wall, 2), "prefill_s": round(d["prefill_s"], 3),
             "decode_steps": d["decode_steps"], "decode_s": round(d["decode_s"], 3)}
        if len(batch) == 1:
            r["first_token_ms"] = round(d["prefill_s"] * 1e3, 1)
            r["decode_tok_s"] = round(d["decode_tokens"] / d["decode_s"], 2)
        return r
    runs = {1: [], 8: []}
    for r in range(rounds):
        for b in ((1, 8) if r % 2 == 0 else (8, 1)):
            runs[b].append(run(prompts[:b]))
    med = {b: sorted(rs, key=lambda x: x["wall_s"])[len(rs) // 2] for b, rs in runs.items()}
    return {"batch1": {**med[1], "walls_s": [x["wall_s"] for x in runs[1]]},
            "batch8": {**med[8], "walls_s": [x["wall_s"] for x in runs[8]]},
            "rounds": rounds, "backend": type(eng.runner).__name__, "kernel_isa": kernel_isa()}


def kernel_isa() -> str | None:
    """The build of our C kernels this machine runs (cpu_build: avx512_amx, avx512_vnni, avx2), with the AMX row
    threshold where it applies."""
    from pipeline.kernels import cpu_build
    lib = cpu_build.load("cpu_kernels")
    isa = lib and cpu_build.isa_of(lib)
    return f"{isa} (from {cpu_build.amx_rows()} rows)" if isa == "avx512_amx" else isa


def hf(gguf: Path, prompts: list[list[int]], n: int, pad_id: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.generation.streamers import BaseStreamer
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32).eval()

    class Stamps(BaseStreamer):
        def __init__(self):
            self.t, self.first = [], True

        def put(self, value):
            if self.first:      # generate() first puts the prompt
                self.first = False
                return
            self.t.append(time.perf_counter())

        def end(self):
            pass

    def run(batch):
        L = max(len(p) for p in batch)
        ids = torch.tensor([[pad_id] * (L - len(p)) + p for p in batch])
        mask = torch.tensor([[0] * (L - len(p)) + [1] * len(p) for p in batch])
        st = Stamps() if len(batch) == 1 else None
        t0 = time.perf_counter()
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                                 do_sample=False, streamer=st, pad_token_id=pad_id)
        t1 = time.perf_counter()
        assert out.shape[1] - L == n
        return t0, [st.t] if st else [[t1] * n for _ in batch]
    run(prompts[:1][:1])   # warm-up
    return {"batch1": timing(*run(prompts[:1])), "batch8": timing(*run(prompts[:8]))}


def llama_cpp(gguf: Path, prompts: list[list[int]], n: int, threads: int) -> dict:
    from llama_cpp import Llama
    llm = Llama(model_path=str(gguf), n_ctx=512, n_threads=threads, n_threads_batch=threads, verbose=False)

    def one(p):
        llm.reset()
        st = []
        for _ in llm.generate(p, top_k=1, temp=0.0, repeat_penalty=1.0, reset=True):
            st.append(time.perf_counter())
            if len(st) == n:
                break
        return st
    one(prompts[1][:8])   # warm-up
    t0 = time.perf_counter()
    b1 = timing(t0, [one(prompts[0])])
    t0 = time.perf_counter()
    b8 = timing(t0, [one(p) for p in prompts[:8]])
    return {"batch1": b1, "batch8": b8, "version": __import__("llama_cpp").__version__,
            "note": "8 requests one after another (llama-cpp-python serves one sequence at a time)"}


def timing(t0: float, stamps: list[list[float]]) -> dict:
    """Per-request token timestamps -> prefill (first token) ms, decode tok/s, output tok/s over the wall time."""
    n = sum(len(s) for s in stamps)
    end = max(s[-1] for s in stamps)
    out = {"requests": len(stamps), "tokens": n, "wall_s": round(end - t0, 3),
           "output_tok_s": round(n / (end - t0), 2)}
    if len(stamps) == 1:
        s = stamps[0]
        out["first_token_ms"] = round((s[0] - t0) * 1e3, 1)
        out["decode_tok_s"] = round((len(s) - 1) / (s[-1] - s[0]), 2)
    return out


# ------------------------------------------------------------------------------------------------ main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workspace", help="the w4a16_kv8 workspace (default: the main job's)")
    ap.add_argument("--skip-main-job", action="store_true")
    ap.add_argument("--download-dir", default=str(Path("~/.cache/llm-pipeline/downloads").expanduser()))
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5, help="ours: runs of batch 1 and of 8 (alternating); the median's")
    ap.add_argument("--max-wait", type=float, default=300.0, help="seconds to wait for the load to fall below 1")
    ap.add_argument("--engines", default="ours,transformers,llama.cpp")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "cpu.json"))
    a = ap.parse_args()
    import torch
    torch.set_num_threads(a.threads)
    from pipeline.models.sources import embedded_gguf
    res = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "machine": platform.processor() or
           platform.machine(), "cpu": cpu_name(), "cores": os.cpu_count(), "threads": a.threads,
           "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
           "torch": torch.__version__, "new_tokens": a.new_tokens, "rows": {}}
    if not a.skip_main_job:
        res["load_main_job"] = wait_for_quiet(a.max_wait)
        res["main_job"] = main_job(a.download_dir)
        print(f"main job: first run {res['main_job']['first_run_s']} s, second run {res['main_job']['second_run_s']} s",
              flush=True)
    ws = Path(a.workspace) if a.workspace else REPO / res["main_job"]["workspace"]
    gguf = embedded_gguf(Path(a.download_dir))
    from transformers import AutoTokenizer
    from pipeline.artifacts.workspace import TOKENIZER
    tok = AutoTokenizer.from_pretrained(str(ws / TOKENIZER))
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True) for q in QUESTIONS]
    prompts = [list(p["input_ids"] if isinstance(p, dict) or hasattr(p, "keys") else p) for p in prompts]
    res["prompt_tokens"] = [len(p) for p in prompts]
    runs = {"ours": lambda: ours(ws, prompts, a.new_tokens, a.rounds),
            "transformers": lambda: hf(gguf, prompts, a.new_tokens, tok.pad_token_id or 0),
            "llama.cpp": lambda: llama_cpp(gguf, prompts, a.new_tokens, a.threads)}
    for name in a.engines.split(","):
        load = wait_for_quiet(a.max_wait)
        print(f"{name} (load {load}) ...", flush=True)
        res["rows"][name] = {"load_avg_1m": load, **runs[name]()}
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(res, indent=2))
    print_table(res)


def cpu_name() -> str:
    try:
        return next(ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                    if ln.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor()


def print_table(res: dict) -> None:
    rows = res["rows"]
    base = rows.get("ours", {}).get("batch1", {}).get("decode_tok_s")
    print(f"\n{res['cpu']}, {res['threads']} threads, {res['new_tokens']} new tokens, greedy")
    print(f"| engine | load | batch-1 first token ms | batch-1 decode tok/s | ours / it | 8 concurrent output tok/s |")
    print("|---|---|---|---|---|---|")
    for name, r in rows.items():
        d = r["batch1"]["decode_tok_s"]
        ratio = f"{base / d:.2f}x" if base else "-"
        print(f"| {name} | {r['load_avg_1m']} | {r['batch1']['first_token_ms']} | {d} | {ratio} | "
              f"{r['batch8']['output_tok_s']} |")
    if "ours" in rows:
        o = rows["ours"]
        print(f"ours ({o.get('kernel_isa')}): 8 concurrent / batch-1 output tok/s = "
              f"{o['batch8']['output_tok_s'] / o['batch1']['output_tok_s']:.2f}x")
    if "main_job" in res:
        print(f"main job second run: {res['main_job']['second_run_s']} s")


if __name__ == "__main__":
    main()
