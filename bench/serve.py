"""Serving throughput over HTTP: N concurrent streaming clients against the API server, the same engine at
batch 1 (one client), and `transformers` generate with the same batch, all in one run.

    python bench/serve.py                                          # GPU: synthetic-llama2-7b, w4a16_kv8, 32 clients
    python bench/serve.py --model tiny-random --quant fp16 --clients 4 --requests 8 --batch1 2 --prompt-len 16:64 \\
        --output-len 8:32 --device cpu                             # a smoke run on a CPU

Workload (seeded): prompt lengths ~ uniform integers in --prompt-len, output lengths ~ uniform integers in
--output-len; prompts are random token ids (/v1/completions with a token-id prompt, so lengths are exact)
and every request runs to its output length (ignore_eos). Clients pull requests from one queue, each
keeping one request in flight. Per request: TTFT (send -> first token) and ITL (gaps between tokens,
from stream_options.continuous_usage_stats: one SSE chunk per engine step, with its token count).
The workspace is built by the pipeline (quant.search/clip off and a small calibration set by default:
weights are random, so only their format matters for speed). Writes <out>/serve_<model>_<quant>.json
(out = --out, else $OUT, else bench/results) and prints a table last.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.server.launch import REPO, ApiServer  # noqa: E402

FAST_BUILD = ["quant.search=false", "quant.clip=false", "quant.calib.samples=8", "quant.calib.seqlen=512"]


def workload(n: int, prompt_len: tuple, output_len: tuple, vocab: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [{"prompt": [rng.randrange(3, vocab) for _ in range(rng.randint(*prompt_len))],
             "max_tokens": rng.randint(*output_len)} for _ in range(n)]


def pct(xs: list, p: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


async def one_request(c: httpx.AsyncClient, model: str, req: dict) -> dict:
    t0 = time.perf_counter()
    times, counts = [], []
    body = {"model": model, "prompt": req["prompt"], "max_tokens": req["max_tokens"], "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True,
                                                                   "continuous_usage_stats": True}}
    async with c.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            return {"error": f"{r.status_code}: {(await r.aread())[:300]!r}"}
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            ev = json.loads(line[6:])
            if "error" in ev:
                return {"error": ev["error"]["message"]}
            u = ev.get("usage")
            if u and ev["choices"] and u["completion_tokens"] > (counts[-1] if counts else 0):
                times.append(time.perf_counter())
                counts.append(u["completion_tokens"])
    if not counts or counts[-1] != req["max_tokens"]:
        return {"error": f"got {counts[-1] if counts else 0} tokens, asked {req['max_tokens']}"}
    itl = [(b - a) / (nb - na) for a, b, na, nb in zip(times, times[1:], counts, counts[1:])]
    return {"ttft": times[0] - t0, "itl": itl, "tokens": counts[-1], "latency": times[-1] - t0}


async def drive(url: str, model: str, reqs: list[dict], clients: int) -> dict:
    """`clients` concurrent streaming clients over the request list; throughput and latency percentiles."""
    queue: asyncio.Queue = asyncio.Queue()
    for r in reqs:
        queue.put_nowait(r)
    results, running = [], []
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as c:
        async def client():
            while not queue.empty():
                results.append(await one_request(c, model, queue.get_nowait()))

        async def sample_batch():   # the engine's running batch, as seen by /health
            while True:
                running.append((await c.get("/health")).json()["running"])
                await asyncio.sleep(0.25)
        steps0 = (await c.get("/health")).json()["steps"]
        sampler = asyncio.ensure_future(sample_batch())
        t0 = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(clients)))
        wall = time.perf_counter() - t0
        sampler.cancel()
        steps1 = (await c.get("/health")).json()["steps"]
    steps = {k: steps1[k] - steps0[k] for k in steps0}   # the engine's own account of this run's work
    ok = [r for r in results if "error" not in r]
    errors = [r["error"] for r in results if "error" in r]
    ttft = [r["ttft"] for r in ok]
    itl = [x for r in ok for x in r["itl"]]
    out_tokens = sum(r["tokens"] for r in ok)
    return {"clients": clients, "requests": len(reqs), "ok": len(ok), "errors": errors[:5], "n_errors": len(errors),
            "wall_s": wall, "requests_per_s": len(ok) / wall, "output_tokens_per_s": out_tokens / wall,
            "output_tokens": out_tokens, "prompt_tokens": sum(len(r["prompt"]) for r in reqs),
            "ttft_ms": {p: 1e3 * pct(ttft, p) for p in (50, 90, 99)},
            "itl_ms": {p: 1e3 * pct(itl, p) for p in (50, 90, 99)},
            "mean_running_batch": statistics.mean(running) if running else 0.0, "engine_steps": steps,
            "prefill_tokens_per_s": steps["prefill_tokens"] / max(steps["prefill_s"], 1e-9),
            "decode_tokens_per_s_in_steps": steps["decode_tokens"] / max(steps["decode_s"], 1e-9),
            "prefill_share_of_wall": steps["prefill_s"] / wall, "decode_share_of_wall": steps["decode_s"] / wall}


def hf_generate(ws: Path, reqs: list[dict], device: str) -> dict:
    """transformers LlamaForCausalLM (fp16 on GPU, fp32 on CPU; random weights of the workspace's shape)
    generating the same requests as one left-padded batch to the longest output length."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from pipeline.workspace import config_args, read_config
    a = config_args(read_config(ws))
    cfg = LlamaConfig(vocab_size=a.vocab_size, hidden_size=a.dim, intermediate_size=a.hidden_dim,
                      num_hidden_layers=a.n_layers, num_attention_heads=a.n_heads, num_key_value_heads=a.n_kv_heads,
                      head_dim=a.head_dim, rms_norm_eps=a.norm_eps, rope_theta=a.rope_theta,
                      max_position_embeddings=4096, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    torch.set_default_dtype(dtype)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).eval()
    torch.set_default_dtype(torch.float32)
    T = max(len(r["prompt"]) for r in reqs)
    ids = torch.zeros(len(reqs), T, dtype=torch.long)
    mask = torch.zeros(len(reqs), T, dtype=torch.long)
    for i, r in enumerate(reqs):                               # left padding
        ids[i, T - len(r["prompt"]):] = torch.tensor(r["prompt"])
        mask[i, T - len(r["prompt"]):] = 1
    ids, mask = ids.to(device), mask.to(device)
    new = max(r["max_tokens"] for r in reqs)

    def run(n: int) -> float:
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.no_grad():
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - t0
    run(2)                                                     # warm-up
    prefill, total = run(1), run(new)
    useful = sum(r["max_tokens"] for r in reqs)
    res = {"batch": len(reqs), "max_new_tokens": new, "wall_s": total, "ttft_ms_batch": 1e3 * prefill,
           "itl_ms": 1e3 * (total - prefill) / max(1, new - 1), "output_tokens_per_s": useful / total,
           "padded_tokens_per_s": len(reqs) * new / total, "requests_per_s": len(reqs) / total,
           "dtype": str(dtype).removeprefix("torch.")}
    del model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return res


def span(s: str) -> tuple:
    a, b = s.split(":")
    return int(a), int(b)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="synthetic-llama2-7b")
    ap.add_argument("--quant", default="w4a16_kv8")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--requests", type=int, default=128)
    ap.add_argument("--batch1", type=int, default=8, help="requests for the batch-1 (one client) run")
    ap.add_argument("--prompt-len", type=span, default=(128, 1024))
    ap.add_argument("--output-len", type=span, default=(64, 256))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--no-hf", action="store_true", help="skip the transformers baseline")
    ap.add_argument("--set", nargs="*", default=None,
                    help="runner overrides replacing the fast-build ones (`--set` alone: none)")
    ap.add_argument("--cache-dir", default=str(REPO / "outputs" / "cache"))
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    out = Path(args.out or os.environ.get("OUT") or REPO / "bench" / "results")
    out.mkdir(parents=True, exist_ok=True)
    device = args.device
    if device == "auto":
        import torch
        device = "cuda" if torch.cuda.is_available() else "cpu"

    overrides = [f"model={args.model}", f"quant={args.quant}", f"device={device}",
                 f"serve.max_batch_size={args.clients}", "serve.session_len=4096", *(FAST_BUILD if args.set is None else args.set)]
    t0 = time.time()
    server = ApiServer(Path(tempfile.mkdtemp(prefix="bench_serve_")), *overrides, cache_dir=Path(args.cache_dir))
    server.start(timeout=1800)
    build_s = time.time() - t0
    h = server.health()
    ws = next(line.split("workspace: ", 1)[1].strip() for line in server.log().splitlines() if "workspace: " in line)
    from pipeline.workspace import read_config
    vocab = read_config(Path(ws))["vocab_size"]
    reqs = workload(args.requests, args.prompt_len, args.output_len, vocab, args.seed)
    try:
        asyncio.run(drive(server.url, h["model"], reqs[:min(4, len(reqs))], min(4, args.clients)))   # warm-up
        batched = asyncio.run(drive(server.url, h["model"], reqs, args.clients))
        batch1 = asyncio.run(drive(server.url, h["model"], reqs[:args.batch1], 1))
    finally:
        server.stop()
    hf = None if args.no_hf else hf_generate(Path(ws), reqs[:args.clients], device)

    res = {"command": " ".join(["python bench/serve.py", *sys.argv[1:]]), "device": device_name(device),
           "model": args.model, "quant": args.quant, "server": {k: h[k] for k in (
               "weight_type", "quant_policy", "kv_capacity_tokens", "max_batch_size", "session_len", "device")},
           "workload": {"prompt_len_uniform": args.prompt_len, "output_len_uniform": args.output_len,
                        "seed": args.seed}, "startup_s": build_s,
           "engine_batched": batched, "engine_batch1": batch1, "transformers_generate": hf}
    path = out / f"serve_{args.model}_{args.quant}.json"
    path.write_text(json.dumps(res, indent=1))
    print(f"\nwrote {path}")
    table(res)


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        import torch
        return torch.cuda.get_device_name()
    return f"cpu ({os.cpu_count()} cores)"


def table(r: dict) -> None:
    b, one, hf = r["engine_batched"], r["engine_batch1"], r["transformers_generate"]
    print(f"{r['model']} {r['quant']} on {r['device']}; prompts U{r['workload']['prompt_len_uniform']}, "
          f"outputs U{r['workload']['output_len_uniform']} tokens")
    print(f"{'run':<34}{'req/s':>8}{'out tok/s':>11}{'TTFT p50/p90/p99 ms':>24}{'ITL p50/p90/p99 ms':>22}")
    for name, x in ((f"engine, {b['clients']} HTTP clients", b), ("engine, 1 HTTP client (batch 1)", one)):
        t, i = x["ttft_ms"], x["itl_ms"]
        print(f"{name:<34}{x['requests_per_s']:>8.2f}{x['output_tokens_per_s']:>11.1f}"
              f"{t[50]:>10.0f}/{t[90]:.0f}/{t[99]:.0f}{i[50]:>12.1f}/{i[90]:.1f}/{i[99]:.1f}")
    if hf:
        print(f"{'transformers generate, batch ' + str(hf['batch']):<34}{hf['requests_per_s']:>8.2f}"
              f"{hf['output_tokens_per_s']:>11.1f}{hf['ttft_ms_batch']:>10.0f} (batch){hf['itl_ms']:>14.1f} (mean)")
    print(f"where the batched run's time went (engine steps): prefill {b['prefill_share_of_wall']:.0%} of the wall at "
          f"{b['prefill_tokens_per_s']:.0f} prompt tok/s, decode {b['decode_share_of_wall']:.0%} at "
          f"{b['decode_tokens_per_s_in_steps']:.0f} tok/s")
    for name, r in (("batched", b), ("batch-1", one)):
        st = r["engine_steps"]
        if st.get("prefill_steps"):
            print(f"{name}: {st['prefill_steps']} prefill steps, {1e3 * st['prefill_s'] / st['prefill_steps']:.1f} ms "
                  f"each, of which {1e3 * st.get('prefill_enqueue_s', 0.0) / st['prefill_steps']:.1f} ms issuing launches")
    print(f"errors: {b['n_errors']} + {one['n_errors']}; mean running batch {b['mean_running_batch']:.1f}; "
          f"batched/batch-1 output tok/s = {b['output_tokens_per_s'] / one['output_tokens_per_s']:.2f}x"
          + (f"; batched/transformers = {b['output_tokens_per_s'] / hf['output_tokens_per_s']:.2f}x" if hf else ""))


if __name__ == "__main__":
    main()
