"""Serving throughput over HTTP: N concurrent streaming clients against the API server, the same engine at
batch 1 (one client), a shared-prefix workload with prefix caching on and off, and `transformers` (static
`generate` and continuous batching) on the same requests, all in one run; with the workload's roofline.

    python bench/serve.py        # GPU: synthetic-llama2-7b, w4a16_kv8, 32 clients, 128 requests, prefix workload, peers
    python bench/serve.py --model tiny-random --quant fp16 --clients 4 --requests 8 --batch1 2 --prompt-len 16:64 \\
        --output-len 8:32 --prefix-len 128 --prefix-requests 8 --question-len 8:32 --device cpu   # a CPU smoke run

Workload (seeded): prompt lengths ~ uniform integers in --prompt-len, output lengths ~ uniform integers in
--output-len; prompts are random token ids (/v1/completions with a token-id prompt, so lengths are exact)
and every request runs to its output length (ignore_eos). Clients pull requests from one queue, each
keeping one request in flight. Per request: TTFT (send -> first token) and ITL (gaps between tokens,
from stream_options.continuous_usage_stats: one SSE chunk per engine step, with its token count). A run's wall
(output tok/s = its tokens / wall): the first request sent -> the last token received (`wall_s`; until session
16 the wall also held the client processes' wake-up after the go signal and their exit, kept as
`wall_s_to_client_exit`). Each client process opens its connections and streams one 3-token request before the
clock (and before the engine counters are read): a fresh process's first request spent 13-30 ms more in the client.
The warm-up (4 requests) and batch-1 (--batch1) requests come from the same distributions but are other
prompts than the batched run's: prefix caching is on, and a prompt sent again would hit the cache.
The workspace is built by the pipeline (quant.search/clip off and a small calibration set by default:
weights are random, so only their format matters for speed). Writes <out>/serve_<model>_<quant>.json
(out = --out, else $OUT, else bench/results) after each part, so a run cut short keeps what it measured,
and prints a table last.

Shared-prefix workload (--no-prefix skips it; --prefix-only runs it alone with the second start: a device call of its
own): --prefix-requests prompts, each = one shared random prefix of --prefix-len tokens (seeded) + its own random
question of U(--question-len) tokens; outputs U(--prefix-output-len, default --output-len). The first --prefix-lead requests (default 1: the one that fills the cache) go alone,
then the rest with --clients concurrent clients; every request counts in the reported numbers. (With
--prefix-lead 0 the first wave of --clients requests is admitted before any prefix block is computed, and all
of it misses.) It runs on the main server (serve.prefix_caching=true, after the runs above) and then on a second
server, started after the first stops (GPU memory): the same workspace served directly, `python -m pipeline.serve
WORKSPACE --no-prefix-caching` with the first server's max batch, session length and KV blocks (its launch to
first token is the "second start" figure), after the main warm-up. Right before the measured run, both servers get a warm-up of
4 requests of the same shape with another shared prefix, sent the same way (so the cache-hit path is warm, and
no measured request hits a block the warm-up brought).
Reported for each: TTFT p50/p90/p99, output tok/s, the server's prefix-cache hit rate over the run (prompt
tokens reused / prompt tokens looked up, from the `prefix_cache` counters of /health; None where the server
has none), and TTFT p50 (off) / TTFT p50 (on). Then the same requests again at a lighter load
(--prefix-light-clients, default --clients // 4) on each server: at 32 clients the TTFT of a wave sent at once is
mostly its queueing behind the other prompts, at 8 mostly the arrival's own prefill. Last, the first --prefix-single
requests (default 16) with one client on each server: an arrival's TTFT with nothing else running.

transformers peers (--no-hf skips both; --hf-only runs only them, on the same requests, with no server or
workspace: a device call of their own): LlamaForCausalLM with random weights of the model's shape, fp16
on GPU, fp32 on CPU. `generate`: the first --clients requests as one left-padded batch, generated to the
longest output length (useful tokens counted). Continuous batching (paged attention): the
ContinuousBatchingManager that `model.generate_batch` drives, fed the batched run's requests with --clients
in flight (the engine's max_batch_size), each with its own max_new_tokens (generate_batch takes one
max_new_tokens for all: that would generate to the longest for every request), greedy, EOS off; its wall
starts at the first request (the manager's set-up and CUDA-graph warm-up are stored apart). A failure of
either row is stored as an error string.

Roofline (`model_costs`, `roofline`; for the batched and batch-1 runs): a bound on the wall with no overlap
between prefill and decode, from the workspace's config.ini. V = vocab, d = hidden size, A = n_heads * head_dim.
  N = parameters of the layers' linears (q, k, v, o, gate, up, down); embeddings, lm_head, norms and biases not in N.
  prefill (compute bound): FLOPs = 2 N sum(prompt_len) + 2 V d n_requests (lm_head at the last position)
      + attention 2 * 2 n_layers A sum(prompt_len (prompt_len + 1) / 2) (QK^T and PV, causal);
      time = FLOPs / --peak-tflops.
  decode: the first output token comes from prefill: decode tokens = sum(output_len - 1), and the j-th decode
      token of a request reads the KV of context prompt_len + j. steps = decode tokens / B, B = the mean decode
      batch the engine ran (its step counters: decode_tokens / decode_steps);
      bytes = steps * weight bytes + KV bytes per token * sum of the contexts;
      FLOPs = 2 (N + V d) decode tokens + attention 2 * 2 n_layers A sum of the contexts;
      time = max(bytes / --peak-tbps, FLOPs / --peak-tflops).
  weight bytes (read once per decode step): the linears in their format (int4: 0.5 B/param + an fp16 scale and
      zero per group of group_size inputs; int8: 1 B/param + an fp16 scale per output channel; fp16/bf16:
      2 B/param) + the 16-bit lm_head (2 V d); the embedding table is gathered, not read. KV bytes per token:
      2 (K, V) n_layers n_kv_heads (head_dim * KV bits / 8, 16-bit KV as 2 bytes, + 2 * 4 B of fp32 scale and
      zero point when kv_mode is dynamic). The sum of the workspace's weight files (less the embeddings) is
      stored beside it as a check.
  roofline s = prefill + decode; roofline output tok/s = sum(output_len) / roofline s;
  fraction = measured output tok/s / roofline output tok/s.
  Defaults: 660 TFLOP/s (an H100's measured dense fp16) and 3.0 TB/s. Llama-2-7B w4a16_kv8 (group 64), the
  default workload (128 requests, prompts U[128, 1024], outputs U[64, 256]) at B = 32, in expectation:
  prefill 1.47 s + decode 2.01 s = 3.48 s, 5,890 output tok/s; the seed-0 draw of it: 3.52 s, 5,870 tok/s
  (tests/test_bench_serve.py checks this).
A/B mode (--ab NAME[:ENV=VALUE,...] ..., --ab-rounds R): after the workspace is built, only the batched run, on one
server per variant (`python -m pipeline.serve WORKSPACE` with the variant's environment added, the same batch,
session and KV blocks; warmed up as above), R rounds, the variants' order reversed every other round (A B, B A, ...):
a machine that drifts over the runs (session 15 saw each of four runs in a row slower than the one before) moves
every variant alike. Reported: each run, and per variant the median output tok/s and in-step decode / prefill
tok/s, and its output tok/s over the first variant's in the same round. E.g. `--ab mma:PIPELINE_ATTN_DECODE=mma fma`;
a variant may also add server flags: `--ab mixed nomixed:--no-mixed-steps`.
`--ab-workload prefix`: the shared-prefix workload instead (cache on; its warm-up, then --clients and, unless 0,
--prefix-light-clients), for what moves an arrival's TTFT: each run also keeps TTFT p50 of the wave sent at once and
of later arrivals with the server's split of the latter, and the summary TTFT p50 over the first variant's by round.
E.g. `--ab-workload prefix --ab m067 m085:PIPELINE_LOOKAHEAD_MARK=0.85`.
Prefill host share (every engine run, shown for the batched one): prefill_enqueue_s / prefill_s from the
engine's step counters: the part of the prefill steps' time the host spent issuing launches (target <= 25%).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import multiprocessing
import os
import queue as queue_mod
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

# the repository, not bench/ (a script's folder comes first in sys.path): bench/kernels.py would shadow the
# `kernels` package that transformers imports
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.server.launch import REPO, ApiServer  # noqa: E402

FAST_BUILD = ["quant.search=false", "quant.clip=false", "quant.calib.samples=8", "quant.calib.seqlen=512"]
WARMUP_REQUESTS = 4
HF_CB_DEADLINE_S = 180      # the continuous-batching row gives up (an error string) past this


def workload(n: int, prompt_len: tuple, output_len: tuple, vocab: int, seed, prefix_len: int = 0) -> list[dict]:
    """n requests; with prefix_len, every prompt starts with the same random prefix of that many tokens."""
    rng = random.Random(seed)
    prefix = [rng.randrange(3, vocab) for _ in range(prefix_len)]
    return [{"prompt": prefix + [rng.randrange(3, vocab) for _ in range(rng.randint(*prompt_len))],
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
    # t_sent / t_last: time.perf_counter() (CLOCK_MONOTONIC, one clock for every client process on Linux)
    return {"ttft": times[0] - t0, "itl": itl, "tokens": counts[-1], "latency": times[-1] - t0,
            "t_sent": t0, "t_last": times[-1]}


def server_latency(h0: dict, h1: dict):
    """Mean ms over a run, from /health's counters (None where the server has none): the front end's arrival ->
    engine submit and arrival -> first token's event; the engine's submit -> admitted and submit -> first token; the
    engine process's pickup of a request (front end's send -> taken, between steps)."""
    (f0, e0), (f1, e1) = ((h.get("frontend_latency"), h.get("latency")) for h in (h0, h1))
    if not (f0 and f1 and e0 and e1):
        return None
    mean = lambda a, b, k, n: 1e3 * (b[k] - a[k]) / (b[n] - a[n]) if b[n] > a[n] else None  # noqa: E731
    return {"frontend_submit": mean(f0, f1, "submit_s", "streams"),
            "frontend_ttft": mean(f0, f1, "ttft_s", "first_chunks"), "engine_queue": mean(e0, e1, "queue_s", "admitted"),
            "engine_ttft": mean(e0, e1, "ttft_s", "first_tokens"),
            "engine_pickup": mean(e0, e1, "pickup_s", "picked") if "picked" in e0 else None}


def cache_delta(h0: dict, h1: dict):
    """The server's prefix-cache counters over a run (None where /health has no `prefix_cache`)."""
    a, b = h0.get("prefix_cache"), h1.get("prefix_cache")
    if not a or not b:
        return None
    q, hits = b.get("queries", 0) - a.get("queries", 0), b.get("hits", 0) - a.get("hits", 0)
    return {"enabled": b.get("enabled"), "queries": q, "hits": hits, "hit_rate": hits / q if q else 0.0,
            "evictions": b.get("evictions", 0) - a.get("evictions", 0), "cached_blocks": b.get("cached_blocks")}


async def _clients(url: str, model: str, reqs: list[dict], take, clients: int, put, ready=None) -> None:
    """`clients` closed-loop streaming clients: each sends reqs[take()] until take() gives None; each result
    goes to put(result). First the client is warmed (its `clients` connections opened, its streaming path run once
    on a 3-token prompt: a fresh process's first request took 13-30 ms longer to its first token than its second
    on a 2-core CPU, which is the client's time, not the server's), then `await ready()` (if given)."""
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as c:
        await asyncio.gather(*(c.get("/health") for _ in range(clients)))
        await one_request(c, model, {"prompt": [1, 2, 3], "max_tokens": 1})
        if ready is not None:
            await ready()

        async def client():
            while (i := take()) is not None:
                put({**await one_request(c, model, reqs[i]), "sent": i})
        await asyncio.gather(*(client() for _ in range(clients)))


def _taker(counter, n: int):
    """Next request index from a shared counter (a multiprocessing Value: its lock is held for microseconds)."""
    def take():
        with counter.get_lock():
            i = counter.value
            counter.value += 1
        return i if i < n else None
    return take


def _client_proc(url: str, model: str, reqs: list[dict], counter, done, clients: int, ready, go) -> None:
    """A client process (spawned): warms its client, signals ready, waits for go, then runs its share of the
    clients."""
    async def start() -> None:
        ready.set()
        await asyncio.to_thread(go.wait)
    asyncio.run(_clients(url, model, reqs, _taker(counter, len(reqs)), clients, done.put, start))
    done.put(None)


def serving_span(results: list[dict]) -> float | None:
    """Seconds from the first request sent to the last token received (the benchmark's wall): the client
    processes' start-up after the go signal and their exit are not the server's time."""
    ok = [r for r in results if "t_sent" in r]
    return max(r["t_last"] for r in ok) - min(r["t_sent"] for r in ok) if ok else None


async def drive(url: str, model: str, reqs: list[dict], clients: int, lead: int = 0, procs: int = 1) -> dict:
    """`clients` concurrent streaming clients over the request list (the first `lead` requests sent alone,
    one after the other, before them); throughput and latency percentiles over every request.
    procs > 1: the clients run in that many processes (spawned and ready before the clock starts), so one
    Python event loop parsing ~4,000 SSE events a second does not add its own queueing to the TTFTs."""
    procs = max(1, min(procs, clients))
    lead = min(lead, len(reqs))
    results, running = [], []
    async with httpx.AsyncClient(base_url=url, timeout=600) as c:
        samples = []   # (time, /health) every 0.25 s: the counters after the first wave (server_latency_later)

        async def sample_batch():   # the engine's running batch, as seen by /health
            while True:
                t = time.perf_counter()
                h = (await c.get("/health")).json()
                running.append(h["running"])
                samples.append((t, h))
                await asyncio.sleep(0.25)
        await one_request(c, model, {"prompt": [1, 2, 3], "max_tokens": 1})   # warm (`_clients`), off the counters
        clock: dict = {}

        async def begin() -> None:
            """The clients are warm: the engine's counters now, the clock, the lead requests one by one."""
            clock["h0"] = (await c.get("/health")).json()
            clock["sampler"] = asyncio.ensure_future(sample_batch())
            clock["t0"] = time.perf_counter()
            for i in range(lead):
                results.append({**await one_request(c, model, reqs[i]), "sent": i})
        if procs == 1:
            nxt = iter(range(lead, len(reqs)))
            await _clients(url, model, reqs, lambda: next(nxt, None), clients, results.append, begin)
        else:
            mp = multiprocessing.get_context("spawn")
            counter, done, go = mp.Value("l", lead), mp.Queue(), mp.Event()
            ready = [mp.Event() for _ in range(procs)]
            share = [clients // procs + (k < clients % procs) for k in range(procs)]
            workers = [mp.Process(target=_client_proc, daemon=True,
                                  args=(url, model, reqs, counter, done, share[k], ready[k], go))
                       for k in range(procs)]
            for w in workers:
                w.start()
            if not all(await asyncio.to_thread(lambda: [e.wait(120) for e in ready])):
                raise RuntimeError("bench client processes did not start within 120 s")
            await begin()
            go.set()
            left = procs
            while left:
                try:
                    r = await asyncio.to_thread(done.get, True, 5.0)
                except queue_mod.Empty:   # a client process that died sends no end mark: say so, do not hang
                    dead = [w for w in workers if w.exitcode not in (None, 0)]
                    if dead:
                        raise RuntimeError(f"bench client process(es) {[w.pid for w in dead]} exited with "
                                           f"{[w.exitcode for w in dead]}")
                    continue
                if r is None:
                    left -= 1
                else:
                    results.append(r)
            for w in workers:
                w.join(10)
        h0, sampler, t0 = clock["h0"], clock["sampler"], clock["t0"]
        wall_procs = time.perf_counter() - t0   # to the client processes' exit
        wall = serving_span(results) or wall_procs
        sampler.cancel()
        h1 = (await c.get("/health")).json()
    steps = {k: h1["steps"][k] - h0["steps"][k] for k in h0["steps"]}   # the engine's own account of this run
    lat = server_latency(h0, h1)
    ok = [r for r in results if "error" not in r]
    errors = [r["error"] for r in results if "error" in r]
    ttft = [r["ttft"] for r in ok]
    wave = [r["ttft"] for r in ok if lead <= r["sent"] < lead + clients]   # sent at once after the lead requests
    later = [r["ttft"] for r in ok if r["sent"] >= lead + clients]          # each sent as a client's previous one ended
    # the server's latency counters over the later arrivals only: from the first /health sample taken after every
    # request of the first wave had its first token, to the end (requests in flight at that sample straddle it)
    wave_done = max((r["t_sent"] + r["ttft"] for r in ok if r["sent"] < lead + clients), default=None)
    mid = next((h for t, h in samples if wave_done is not None and t >= wave_done), None)
    itl = [x for r in ok for x in r["itl"]]
    out_tokens = sum(r["tokens"] for r in ok)
    enqueue = steps.get("prefill_enqueue_s")
    return {"clients": clients, "requests": len(reqs), "ok": len(ok), "errors": errors[:5], "n_errors": len(errors),
            "wall_s": wall, "wall_s_to_client_exit": wall_procs,
            "requests_per_s": len(ok) / wall, "output_tokens_per_s": out_tokens / wall,
            "output_tokens": out_tokens, "prompt_tokens": sum(len(r["prompt"]) for r in reqs),
            "ttft_ms": {p: 1e3 * pct(ttft, p) for p in (50, 90, 99)},
            "ttft_ms_first_wave": {p: 1e3 * pct(wave, p) for p in (50, 90, 99)} if wave else None,
            "ttft_ms_later": {p: 1e3 * pct(later, p) for p in (50, 90, 99)} if later else None,
            "itl_ms": {p: 1e3 * pct(itl, p) for p in (50, 90, 99)},
            "ttft_ms_mean": 1e3 * statistics.mean(ttft) if ttft else None,
            "ttft_ms_later_mean": 1e3 * statistics.mean(later) if later else None,
            "server_latency_ms": lat,
            "server_latency_ms_later": server_latency(mid, h1) if mid is not None and later else None,
            "lead_requests": min(lead, len(reqs)),
            "lead_ttft_ms": [1e3 * r.get("ttft", math.nan) for r in results[:lead]],
            "mean_running_batch": statistics.mean(running) if running else 0.0,
            "mean_decode_batch": steps["decode_tokens"] / steps["decode_steps"] if steps["decode_steps"] else 0.0,
            "engine_steps": steps, "prefix_cache": cache_delta(h0, h1),
            "prefill_tokens_per_s": steps["prefill_tokens"] / max(steps["prefill_s"], 1e-9),
            "decode_tokens_per_s_in_steps": steps["decode_tokens"] / max(steps["decode_s"], 1e-9),
            "prefill_share_of_wall": steps["prefill_s"] / wall, "decode_share_of_wall": steps["decode_s"] / wall,
            "prefill_host_share": enqueue / steps["prefill_s"] if enqueue is not None and steps["prefill_s"] > 0
            else None,
            # the device's own timeline (engine/timeline.py; GPU only): its share of the wall running steps, and its
            # waits for the host between consecutive steps
            "device_busy_share_of_wall": steps["device_busy_s"] / wall if steps.get("device_busy_s") else None,
            "device_gap_share_of_wall": steps["device_gap_s"] / wall if steps.get("device_gaps") else None,
            "device_gap_ms_mean": 1e3 * steps["device_gap_s"] / steps["device_gaps"] if steps.get("device_gaps")
            else None,
            # the API server process's CPU time (all its threads: HTTP, SSE, detokenization) per streamed token
            "frontend_cpu_us_per_token": 1e6 * (h1["frontend_cpu_s"] - h0["frontend_cpu_s"]) / max(out_tokens, 1)
            if "frontend_cpu_s" in h0 else None}


# ------------------------------------------------------------------------------------ roofline
def model_costs(cfg: dict) -> dict:
    """What the roofline needs from a workspace's config.ini (read_config): see the module doc."""
    from pipeline.workspace import QUANT_POLICIES
    d, L, hd = cfg["hidden_units"], cfg["num_layer"], cfg["size_per_head"]
    A, kv = cfg["head_num"] * hd, cfg["kv_head_num"] * hd
    linears = [(d, A + 2 * kv), (A, d), (d, 2 * cfg["inter_size"]), (cfg["inter_size"], d)]   # (K in, N out)
    wt, g = cfg["weight_type"], cfg["group_size"]

    def nbytes(k: int, n: int) -> float:
        if wt == "int4":
            return k * n / 2 + 2 * 2 * (k / g) * n      # packed nibbles + fp16 scale and zero per group
        if wt == "int8":
            return k * n + 2 * n                        # + an fp16 scale per output channel
        return 2 * k * n
    lm_head = cfg["vocab_size"] * d
    bits = QUANT_POLICIES[cfg["quant_policy"]]
    side = 2 * 4 if cfg.get("kv_mode") == "dynamic" else 0
    return {"n_params": L * sum(k * n for k, n in linears), "lm_head_params": lm_head, "n_layers": L, "attn_dim": A,
            "weight_bytes": L * sum(nbytes(k, n) for k, n in linears) + 2 * lm_head,
            "kv_bytes_per_token": 2 * L * cfg["kv_head_num"] * (hd * (2 if bits == 16 else bits / 8) + side),
            "weight_type": wt, "group_size": g, "kv_bits": bits, "kv_mode": cfg.get("kv_mode")}


def weight_file_bytes(ws: Path) -> int:
    """The workspace's weight files as read per decode step: all but the embedding table (unless it is the
    tied lm_head) and the static KV scales."""
    from pipeline.workspace import WEIGHTS
    files = [f for f in (Path(ws) / WEIGHTS).iterdir() if f.is_file() and f.name != "config.ini"]
    tied = not any(f.name == "output.weight" for f in files)
    return sum(f.stat().st_size for f in files if "past_kv_scale" not in f.name
               and (tied or f.name != "tok_embeddings.weight"))


def roofline(prompt_lens: list, output_lens: list, costs: dict, mean_batch: float, peak_tflops: float,
             peak_tbps: float) -> dict:
    """The workload's roofline (module doc): seconds, output tok/s, and the terms they come from."""
    c, flops_s, bytes_s = costs, peak_tflops * 1e12, peak_tbps * 1e12
    causal = sum(p * (p + 1) / 2 for p in prompt_lens)
    prefill_flops = (2 * c["n_params"] * sum(prompt_lens) + 2 * c["lm_head_params"] * len(prompt_lens)
                     + 2 * 2 * c["n_layers"] * c["attn_dim"] * causal)
    decode_tokens = sum(max(0, o - 1) for o in output_lens)
    contexts = sum((o - 1) * p + (o - 1) * o / 2 for p, o in zip(prompt_lens, output_lens) if o > 1)
    steps = decode_tokens / max(mean_batch, 1.0)
    weight_bytes, kv_bytes = steps * c["weight_bytes"], contexts * c["kv_bytes_per_token"]
    decode_flops = (2 * (c["n_params"] + c["lm_head_params"]) * decode_tokens
                    + 2 * 2 * c["n_layers"] * c["attn_dim"] * contexts)
    prefill = prefill_flops / flops_s
    decode = max((weight_bytes + kv_bytes) / bytes_s, decode_flops / flops_s)
    total = prefill + decode
    return {"roofline_s": total, "roofline_output_tokens_per_s": sum(output_lens) / total if total else 0.0,
            "prefill_s": prefill, "decode_s": decode, "prefill_flops": prefill_flops, "decode_flops": decode_flops,
            "decode_tokens": decode_tokens, "decode_steps": steps, "mean_batch": mean_batch,
            "mean_context": contexts / decode_tokens if decode_tokens else 0.0,
            "decode_weight_bytes": weight_bytes, "decode_kv_bytes": kv_bytes,
            "decode_bound": "memory" if (weight_bytes + kv_bytes) / bytes_s >= decode_flops / flops_s else "compute",
            "peak_tflops": peak_tflops, "peak_tbps": peak_tbps}


def run_roofline(run: dict, reqs: list[dict], costs: dict, args) -> dict:
    """The roofline of an engine run's requests at the run's measured mean decode batch, and the fraction of
    its output tok/s that the run reached."""
    r = roofline([len(q["prompt"]) for q in reqs], [q["max_tokens"] for q in reqs], costs,
                 run["mean_decode_batch"] or 1.0, args.peak_tflops, args.peak_tbps)
    rate = r["roofline_output_tokens_per_s"]
    r["fraction_reached"] = run["output_tokens_per_s"] / rate if rate else None
    return r


# ------------------------------------------------------------------------------------ transformers peers
def preset_args(model: str):
    """ModelArgs of a conf/model preset that gives its shape (the synthetic ones): --hf-only needs no workspace."""
    from omegaconf import OmegaConf

    from pipeline.models.llama import ModelArgs
    path = REPO / "conf" / "model" / f"{model}.yaml"
    c = OmegaConf.load(path) if path.exists() else {}
    if "shape" not in c:
        raise SystemExit(f"--hf-only takes a model preset with a `shape` (synthetic-*), not {model!r}")
    return ModelArgs(**OmegaConf.to_container(c["shape"]))


def hf_model(a, device: str):
    """transformers LlamaForCausalLM, random weights of these ModelArgs' shape (fp16 on GPU, fp32 on CPU)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=a.vocab_size, hidden_size=a.dim, intermediate_size=a.hidden_dim,
                      num_hidden_layers=a.n_layers, num_attention_heads=a.n_heads, num_key_value_heads=a.n_kv_heads,
                      head_dim=a.head_dim, rms_norm_eps=a.norm_eps, rope_theta=a.rope_theta,
                      max_position_embeddings=4096, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            return LlamaForCausalLM(cfg).eval()
    finally:
        torch.set_default_dtype(torch.float32)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch
        torch.cuda.synchronize()


def hf_generate(model, reqs: list[dict], device: str) -> dict:
    """transformers `generate` on the requests as one left-padded batch to the longest output length."""
    import torch
    T = max(len(r["prompt"]) for r in reqs)
    ids = torch.zeros(len(reqs), T, dtype=torch.long)
    mask = torch.zeros(len(reqs), T, dtype=torch.long)
    for i, r in enumerate(reqs):                               # left padding
        ids[i, T - len(r["prompt"]):] = torch.tensor(r["prompt"])
        mask[i, T - len(r["prompt"]):] = 1
    ids, mask = ids.to(device), mask.to(device)
    new = max(r["max_tokens"] for r in reqs)

    def run(n: int) -> float:
        sync(device)
        t0 = time.perf_counter()
        with torch.no_grad():
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        sync(device)
        return time.perf_counter() - t0
    run(2)                                                     # warm-up
    prefill, total = run(1), run(new)
    useful = sum(r["max_tokens"] for r in reqs)
    return {"batch": len(reqs), "max_new_tokens": new, "wall_s": total, "ttft_ms_batch": 1e3 * prefill,
            "itl_ms": 1e3 * (total - prefill) / max(1, new - 1), "output_tokens_per_s": useful / total,
            "padded_tokens_per_s": len(reqs) * new / total, "requests_per_s": len(reqs) / total,
            "dtype": str(model.dtype).removeprefix("torch.")}


def hf_generate_batch(model, reqs: list[dict], clients: int, device: str) -> dict:
    """transformers continuous batching (module doc): the requests with `clients` in flight, each to its own
    max_new_tokens. Raises on a failed request, a dead generation thread or HF_CB_DEADLINE_S."""
    import torch
    from transformers import ContinuousBatchingConfig, GenerationConfig
    from transformers.generation.continuous_batching.utils import WorkloadHints
    longest = max(r["max_tokens"] for r in reqs)
    gen = GenerationConfig(max_new_tokens=longest, do_sample=False, eos_token_id=-1, pad_token_id=0)
    cb = ContinuousBatchingConfig()
    if not device.startswith("cuda"):   # else it sizes its paged cache and batch from the host's memory: slow
        page = getattr(cb, "page_size", getattr(cb, "block_size", 256))
        cb.num_blocks = clients * -(-max(len(r["prompt"]) + r["max_tokens"] for r in reqs) // page) + 2
        cb.max_batch_tokens = 512
    hints = WorkloadHints(max_prompt_length=max(len(r["prompt"]) for r in reqs), max_generated_length=longest,
                          num_requests=len(reqs))
    pending, asked, done = list(enumerate(reqs)), {}, {}
    t_setup = time.perf_counter()
    with torch.no_grad(), model.continuous_batching_context_manager(
            generation_config=gen, block=True, timeout=10, continuous_batching_config=cb, workload_hints=hints) as m:
        setup = time.perf_counter() - t_setup
        attn = getattr(model.config, "_attn_implementation", None)   # the paged one the manager switched to

        def add() -> None:
            i, r = pending.pop(0)
            rid = m.add_request(input_ids=r["prompt"], request_id=f"bench_{i}", max_new_tokens=r["max_tokens"],
                                eos_token_id=-1)
            if rid is None:
                raise RuntimeError(f"the manager refused request {i}")
            asked[rid] = r
        t0 = time.perf_counter()
        for _ in range(min(clients, len(reqs))):
            add()
        while len(done) < len(reqs):
            if time.perf_counter() - t0 > HF_CB_DEADLINE_S:
                raise TimeoutError(f"{len(done)} of {len(reqs)} requests done after {HF_CB_DEADLINE_S} s")
            res = m.get_result(timeout=1)
            if res is None:
                if not m.is_running():
                    raise RuntimeError(f"the generation thread stopped with {len(done)} of {len(reqs)} requests done")
                continue
            if res.is_finished():
                done[res.request_id] = res
                if pending:
                    add()
        sync(device)
        wall = time.perf_counter() - t0
    failed = [f"{k}: {v.error}" for k, v in done.items() if v.error is not None]
    if failed:
        raise RuntimeError(f"{len(failed)} requests failed, e.g. {failed[0]}")
    made = sum(len(v.generated_tokens) for v in done.values())
    useful = sum(min(len(v.generated_tokens), asked[k]["max_tokens"]) for k, v in done.items())
    return {"requests": len(reqs), "in_flight": clients, "per_request_max_new_tokens": True, "wall_s": wall,
            "setup_s": setup, "output_tokens": useful, "generated_tokens": made,
            "output_tokens_per_s": useful / wall, "requests_per_s": len(reqs) / wall,
            "dtype": str(model.dtype).removeprefix("torch."),
            "attn_implementation": attn}


def hf_rows(a, reqs: list[dict], clients: int, device: str) -> tuple[dict, dict]:
    """Both transformers rows on one model (ModelArgs a's shape); a row that fails is {"error": ...}."""
    def attempt(fn, *a):
        try:
            return fn(*a)
        except Exception as e:  # noqa: BLE001 - a peer's failure is a result, not the bench's end
            return {"error": f"{type(e).__name__}: {e}"[:2000]}
        finally:
            if device.startswith("cuda"):
                import torch
                torch.cuda.empty_cache()
    model = attempt(hf_model, a, device)
    if isinstance(model, dict):
        return model, model
    static = attempt(hf_generate, model, reqs[:clients], device)
    return static, attempt(hf_generate_batch, model, reqs, clients, device)


# ------------------------------------------------------------------------------------ the run
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
    ap.add_argument("--prefix-len", type=int, default=1024, help="shared prefix tokens of the prefix workload")
    ap.add_argument("--prefix-requests", type=int, default=64)
    ap.add_argument("--question-len", type=span, default=(64, 256), help="own tokens after the shared prefix")
    ap.add_argument("--prefix-output-len", type=span, default=None, help="default: --output-len")
    ap.add_argument("--prefix-lead", type=int, default=1, help="prefix requests sent alone before the concurrent rest")
    ap.add_argument("--prefix-light-clients", type=int, default=None,
                    help="the prefix workload again at this lighter concurrency, on both servers (default: --clients "
                         "// 4; 0: skip)")
    ap.add_argument("--prefix-single", type=int, default=16,
                    help="the first N prefix requests again with one client, on both servers (0: skip): the TTFT of "
                         "an arrival with nothing else running")
    ap.add_argument("--no-prefix", action="store_true", help="skip the shared-prefix workload (and its second server)")
    ap.add_argument("--prefix-only", action="store_true",
                    help="only the shared-prefix workload on both servers (and the second start): no batched or "
                         "batch-1 runs, no transformers rows (a device call of its own, with --no-hf's other half)")
    ap.add_argument("--peak-tflops", type=float, default=660.0, help="roofline: dense fp16 peak")
    ap.add_argument("--peak-tbps", type=float, default=None,
                    help="roofline: memory bandwidth (default: the device-to-device copy measured on this workplace's "
                         "cards: 4.3 TB/s on an H200, else 3.0, an H100's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--schedule", choices=["shortest_first", "fcfs"], default=None,
                    help="the engine's prefill order on both servers (default: the engine's, shortest_first)")
    ap.add_argument("--client-procs", type=int, default=None,
                    help="processes the concurrent clients run in (default: 4 where the machine has 8 or more CPUs, "
                         "else 1)")
    ap.add_argument("--ab", nargs="+", default=None, metavar="NAME[:ENV=VALUE,...]",
                    help="A/B mode: only the batched run, on one server per variant and round (module doc)")
    ap.add_argument("--ab-rounds", type=int, default=2, help="A/B mode: rounds (each variant once a round)")
    ap.add_argument("--ab-workload", choices=["batched", "prefix"], default="batched",
                    help="A/B mode: the run each variant gets: the batched workload, or the shared-prefix one with "
                         "the cache on at --clients and, unless 0, --prefix-light-clients (module doc)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--no-hf", action="store_true", help="skip the transformers rows")
    ap.add_argument("--hf-only", action="store_true",
                    help="only the transformers rows (same workload and seed; no server, no workspace), to "
                         "serve_<model>_transformers.json")
    ap.add_argument("--set", nargs="*", default=None,
                    help="runner overrides replacing the fast-build ones (`--set` alone: none)")
    ap.add_argument("--cache-dir", default=str(REPO / "outputs" / "cache"))
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.prefix_only and (args.no_prefix or args.ab or args.hf_only):
        ap.error("--prefix-only runs the shared-prefix workload alone: not with --no-prefix, --ab or --hf-only")
    variants = [parse_variant(v) for v in args.ab or []]
    if len({n for n, *_ in variants}) != len(variants) or args.ab_rounds < 1:
        raise SystemExit("--ab: the variants need distinct names; --ab-rounds >= 1")
    if variants and args.ab_workload == "prefix" and args.no_prefix:
        ap.error("--ab-workload prefix runs the shared-prefix workload: not with --no-prefix")
    light = args.clients // 4 if args.prefix_light_clients is None else args.prefix_light_clients
    if args.client_procs is None:
        args.client_procs = 4 if (os.cpu_count() or 1) >= 8 else 1
    out = Path(args.out or os.environ.get("OUT") or REPO / "bench" / "results")
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"serve_{args.model}_{args.quant}.json"
    device = args.device
    if device == "auto":
        import torch
        device = "cuda" if torch.cuda.is_available() else "cpu"

    if args.peak_tbps is None:
        args.peak_tbps = 4.3 if "H200" in device_name(device) else 3.0
    if args.hf_only:   # the transformers rows alone, on the workload this command's other runs send
        a = preset_args(args.model)
        reqs = workload(args.requests, args.prompt_len, args.output_len, a.vocab_size, args.seed)
        res = {"command": " ".join(["python bench/serve.py", *sys.argv[1:]]), "device": device_name(device),
               "model": args.model, "workload": {"requests": args.requests, "clients": args.clients,
                                                 "prompt_len_uniform": args.prompt_len,
                                                 "output_len_uniform": args.output_len, "seed": args.seed}}
        res["transformers_generate"], res["transformers_generate_batch"] = hf_rows(a, reqs, args.clients, device)
        path = out / f"serve_{args.model}_transformers.json"
        path.write_text(json.dumps(res, indent=1))
        print(json.dumps({k: res[k] for k in ("transformers_generate", "transformers_generate_batch")}, indent=1))
        print(f"\nwrote {path}")
        return
    overrides = [f"model={args.model}", f"quant={args.quant}", f"device={device}",
                 f"serve.max_batch_size={args.clients}", "serve.session_len=4096", *(FAST_BUILD if args.set is None else args.set),
                 *([f"serve.schedule={args.schedule}"] if args.schedule else [])]
    t0 = time.time()
    server = ApiServer(Path(tempfile.mkdtemp(prefix="bench_serve_")), *overrides, cache_dir=Path(args.cache_dir))
    server.start(timeout=1800)
    build_s = time.time() - t0
    h = server.health()
    ws = Path(next(line.split("workspace: ", 1)[1].strip() for line in server.log().splitlines()
                   if "workspace: " in line))
    from pipeline.workspace import read_config
    cfg = read_config(ws)
    costs = {**model_costs(cfg), "weight_file_bytes": weight_file_bytes(ws)}
    n = args.requests
    pool = workload(n + WARMUP_REQUESTS + args.batch1, args.prompt_len, args.output_len, cfg["vocab_size"], args.seed)
    reqs, warm, solo = pool[:n], pool[n:n + WARMUP_REQUESTS], pool[n + WARMUP_REQUESTS:]
    pout = args.prefix_output_len or args.output_len
    preqs, pwarm = ([], []) if args.no_prefix else (workload(
        k, args.question_len, pout, cfg["vocab_size"], f"{args.seed}/{name}", prefix_len=args.prefix_len)
        for k, name in ((args.prefix_requests, "prefix"), (WARMUP_REQUESTS, "prefix-warmup")))
    res = {"command": " ".join(["python bench/serve.py", *sys.argv[1:]]), "device": device_name(device),
           "model": args.model, "quant": args.quant, "server": {k: h.get(k) for k in (
               "weight_type", "quant_policy", "kv_capacity_tokens", "max_batch_size", "session_len", "device")},
           "workload": {"requests": n, "clients": args.clients, "prompt_len_uniform": args.prompt_len,
                        "output_len_uniform": args.output_len, "seed": args.seed, "batch1_requests": args.batch1,
                        "client_procs": args.client_procs, "schedule": args.schedule or "engine default",
                        "prefix": None if args.no_prefix else {
                            "requests": args.prefix_requests, "prefix_len": args.prefix_len,
                            "question_len_uniform": args.question_len, "output_len_uniform": pout,
                            "lead_requests": args.prefix_lead, "light_clients": light or None,
                            "single_client_requests": args.prefix_single or None}},
           "startup_s": build_s, "startup": h.get("startup"), "roofline_model": {**costs, "peak_tflops": args.peak_tflops,
                                                    "peak_tbps": args.peak_tbps}}

    def save() -> None:
        path.write_text(json.dumps(res, indent=1))

    def run(url: str, rs: list[dict], clients: int, lead: int = 0) -> dict:
        return asyncio.run(drive(url, h["model"], rs, clients, lead, args.client_procs))
    if variants:
        server.stop()   # built the workspace (and its tunings); every variant gets its own server
        if args.ab_workload == "prefix":   # the cache-hit path warm (pwarm), then the measured runs
            runs = {"": (preqs, args.clients), **({"light_": (preqs, light)} if light else {})}
            measure = lambda url: ab_prefix_run(run, url, pwarm, runs, args)   # noqa: E731
        else:
            measure = lambda url: {"": run(url, reqs, args.clients)}          # noqa: E731
        res["ab"] = ab_runs(ws, h, device, variants, args.ab_rounds, warm, args, run, measure,
                            lambda ab: (res.update(ab=ab), save()))
        print(f"\nwrote {path}")
        ab_table(res["ab"])
        return
    try:
        run(server.url, warm, min(WARMUP_REQUESTS, args.clients))
        if not args.prefix_only:
            res["engine_batched"] = b = run(server.url, reqs, args.clients)
            b["roofline"] = run_roofline(b, reqs, costs, args)
            save()
            res["engine_batch1"] = one = run(server.url, solo, 1)
            one["roofline"] = run_roofline(one, solo, costs, args)
            save()
        if preqs:
            run(server.url, pwarm, min(WARMUP_REQUESTS, args.clients), args.prefix_lead)   # its shapes and paths
            res["prefix_on"] = run(server.url, preqs, args.clients, args.prefix_lead)
            if light:
                res["prefix_on_light"] = run(server.url, preqs, light, args.prefix_lead)
            if args.prefix_single:
                res["prefix_on_single"] = run(server.url, preqs[:args.prefix_single], 1)
            save()
    finally:
        server.stop()
    if preqs:
        t0 = time.time()
        # the second start: the workspace served directly (`python -m pipeline.serve WORKSPACE`, as `lmdeploy serve
        # api_server ./workspace`), prefix caching off, the first server's batch, session and KV blocks
        off = ApiServer.for_workspace(Path(tempfile.mkdtemp(prefix="bench_serve_noprefix_")), ws,
                                      *same_server(h, device, args.schedule), "--no-prefix-caching")
        off.start(timeout=1800)
        res["prefix_off_startup_s"] = time.time() - t0
        res["prefix_off_first_token_s"] = first_token_s(off.url, h["model"], t0)   # the target: launch -> a token
        res["prefix_off_startup"] = off.health().get("startup")   # where the engine core's start went
        res["prefix_off_command"] = " ".join(["python -m pipeline.serve", *map(str, off.cmd[3:])])
        try:
            run(off.url, warm, min(WARMUP_REQUESTS, args.clients))
            run(off.url, pwarm, min(WARMUP_REQUESTS, args.clients), args.prefix_lead)
            res["prefix_off"] = run(off.url, preqs, args.clients, args.prefix_lead)
            if light:
                res["prefix_off_light"] = run(off.url, preqs, light, args.prefix_lead)
            if args.prefix_single:
                res["prefix_off_single"] = run(off.url, preqs[:args.prefix_single], 1)
        finally:
            off.stop()
        res["prefix_ttft_p50_off_over_on"] = res["prefix_off"]["ttft_ms"][50] / res["prefix_on"]["ttft_ms"][50]
        for part in ("light", "single"):
            if f"prefix_on_{part}" in res and f"prefix_off_{part}" in res:
                res[f"prefix_ttft_p50_off_over_on_{part}"] = (res[f"prefix_off_{part}"]["ttft_ms"][50]
                                                              / res[f"prefix_on_{part}"]["ttft_ms"][50])
        save()
    from pipeline.workspace import config_args
    res["transformers_generate"], res["transformers_generate_batch"] = (None, None) if args.no_hf or args.prefix_only \
        else hf_rows(config_args(cfg), reqs, args.clients, device)
    save()
    print(f"\nwrote {path}")
    table(res)


AB_KEYS = ("output_tokens_per_s", "decode_tokens_per_s_in_steps", "prefill_tokens_per_s", "ttft_ms", "itl_ms",
           "n_errors", "prefill_share_of_wall", "decode_share_of_wall", "mean_decode_batch",
           "device_busy_share_of_wall", "device_gap_share_of_wall", "ttft_ms_first_wave", "ttft_ms_later",
           "server_latency_ms_later", "prefix_cache")
AB_MEDIANS = ("output_tokens_per_s", "decode_tokens_per_s_in_steps", "prefill_tokens_per_s", "ttft_p50_ms")


def parse_variant(spec: str) -> tuple[str, dict, list]:
    """--ab's 'NAME' or 'NAME:ITEM[,ITEM...]', an item ENV=VALUE or a `python -m pipeline.serve` flag (--no-mixed-steps;
    one with a value as --flag=value) -> (name, {ENV: VALUE}, [flags])."""
    name, _, rest = spec.partition(":")
    env, flags = {}, []
    for kv in filter(None, rest.split(",")):
        if kv.startswith("--"):
            flags += kv.split("=", 1)
            continue
        k, sep, v = kv.partition("=")
        if not sep or not k:
            raise SystemExit(f"--ab {spec!r}: expected NAME or NAME:ENV=VALUE|--flag[=value][,...]")
        env[k] = v
    if not name:
        raise SystemExit(f"--ab {spec!r}: the variant needs a name")
    return name, env, flags


def ab_order(variants: list, rounds: int) -> list[tuple[int, tuple]]:
    """(round, variant) in run order: the variants' order reversed every other round."""
    return [(r, v) for r in range(rounds) for v in (variants if r % 2 == 0 else variants[::-1])]


def ab_summary(variants: list, runs: list[dict]) -> dict:
    """Per variant: the medians of AB_MEDIANS over its runs, and its output tok/s and TTFT p50 over the first
    variant's, round by round (with a lighter run too, the same for it under `light`)."""
    out = {}
    for name, *_ in variants:
        mine = [x for x in runs if x["variant"] == name]
        if not mine:        # a run cut short: the variants measured so far
            continue
        out[name] = _ab_medians(mine, [x for x in runs if x["variant"] == variants[0][0]])
        if all(x.get("light") for x in mine):
            out[name]["light"] = _ab_medians([{**x["light"], "round": x["round"]} for x in mine],
                                             [{**x["light"], "round": x["round"]} for x in runs
                                              if x["variant"] == variants[0][0] and x.get("light")])
    return out


def _ab_medians(mine: list[dict], first: list[dict]) -> dict:
    base = {x["round"]: x for x in first}
    m = {k: statistics.median(x["ttft_ms"][50] if k == "ttft_p50_ms" else x[k] for x in mine) for k in AB_MEDIANS}
    m["over_first_by_round"] = [x["output_tokens_per_s"] / base[x["round"]]["output_tokens_per_s"] for x in mine
                                if x["round"] in base]
    m["ttft_p50_over_first_by_round"] = [x["ttft_ms"][50] / base[x["round"]]["ttft_ms"][50] for x in mine
                                         if x["round"] in base]
    return m


def ab_prefix_run(run, url: str, pwarm: list, runs: dict, args) -> dict:
    """--ab-workload prefix on one server: the prefix warm-up, then each of runs (key prefix -> (requests, clients)),
    the first --prefix-lead requests alone as in the main run."""
    run(url, pwarm, min(WARMUP_REQUESTS, args.clients), args.prefix_lead)
    return {key: run(url, rs, clients, args.prefix_lead) for key, (rs, clients) in runs.items()}


def same_server(h: dict, device: str, schedule) -> list[str]:
    """`python -m pipeline.serve WORKSPACE` flags for a server like the one whose /health is h: the same device,
    batch, session, KV block size and block count (and prefill order, when one was asked)."""
    return ["--device", device, "--max-batch-size", str(h["max_batch_size"]), "--session-len", str(h["session_len"]),
            "--cache-block-seq-len", str(h["block_size"]), "--num-blocks", str(h["total_blocks"]),
            *(["--schedule", schedule] if schedule else [])]


def ab_runs(ws: Path, h: dict, device: str, variants: list, rounds: int, warm: list, args, run, measure,
            save) -> dict:
    """The A/B mode (module doc): one server per (round, variant), warmed up, then measure(url) -> {"": the run,
    "light_": a lighter one (optional)} on each."""
    flags = same_server(h, device, args.schedule)
    ab = {"variants": [{"name": n, "env": e, "flags": f} for n, e, f in variants], "rounds": rounds,
          "workload": args.ab_workload, "runs": []}
    for r, (name, env, extra) in ab_order(variants, rounds):
        srv = ApiServer.for_workspace(Path(tempfile.mkdtemp(prefix=f"bench_serve_ab_{name}_")), ws, *flags, *extra,
                                      env=env)
        t0 = time.time()
        srv.start(timeout=1800)
        try:
            start_s = time.time() - t0
            run(srv.url, warm, min(WARMUP_REQUESTS, args.clients))
            xs = measure(srv.url)
        finally:
            srv.stop()
        x = xs[""]
        row = {"round": r, "variant": name, "startup_s": start_s, **{k: x.get(k) for k in AB_KEYS}}
        if "light_" in xs:
            row["light"] = {"clients": xs["light_"]["clients"], **{k: xs["light_"].get(k) for k in AB_KEYS}}
        ab["runs"].append(row)
        print(f"A/B round {r} {name}: {x['output_tokens_per_s']:.1f} output tok/s, TTFT p50 {x['ttft_ms'][50]:.1f} "
              f"ms, decode {x['decode_tokens_per_s_in_steps']:.0f} tok/s in its steps, {x['n_errors']} errors"
              + ("" if "light_" not in xs else f"; at {xs['light_']['clients']} clients TTFT p50 "
                 f"{xs['light_']['ttft_ms'][50]:.1f} ms"), flush=True)
        ab["summary"] = ab_summary(variants, ab["runs"])
        save(ab)
    return ab


def ab_table(ab: dict) -> None:
    first = ab["variants"][0]["name"]
    print(f"{'variant':<24}{'out tok/s (median)':>20}{'decode in steps':>17}{'prefill in steps':>18}"
          f"{'TTFT p50 ms':>13}  over {first} by round: tok/s; TTFT p50")
    for v in ab["variants"]:
        for label, x in ((v["name"], ab["summary"][v["name"]]),
                         (f"  {v['name']}, lighter", ab["summary"][v["name"]].get("light"))):
            if x:
                print(f"{label:<24}{x['output_tokens_per_s']:>20.1f}{x['decode_tokens_per_s_in_steps']:>17.0f}"
                      f"{x['prefill_tokens_per_s']:>18.0f}{x['ttft_p50_ms']:>13.1f}  "
                      + " ".join(f"{q:.3f}" for q in x["over_first_by_round"]) + "; "
                      + " ".join(f"{q:.3f}" for q in x["ttft_p50_over_first_by_round"]))


def first_token_s(url: str, model: str, t0: float) -> float:
    """Seconds from t0 (the server's launch) until one short completion has come back."""
    r = httpx.post(url + "/v1/completions", json={"model": model, "prompt": "Hello", "max_tokens": 1}, timeout=600)
    r.raise_for_status()
    return time.time() - t0


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        import torch
        return torch.cuda.get_device_name()
    return f"cpu ({os.cpu_count()} cores)"


def table(r: dict) -> None:
    b, one = r.get("engine_batched"), r.get("engine_batch1")
    hf, cb = r.get("transformers_generate"), r.get("transformers_generate_batch")
    on, off, pw = r.get("prefix_on"), r.get("prefix_off"), r["workload"]["prefix"]
    print(f"{r['model']} {r['quant']} on {r['device']}; prompts U{r['workload']['prompt_len_uniform']}, "
          f"outputs U{r['workload']['output_len_uniform']} tokens")
    print(f"{'run':<40}{'req/s':>8}{'out tok/s':>11}{'TTFT p50/p90/p99 ms':>24}{'ITL p50/p90/p99 ms':>22}")
    rows = [(f"engine, {b['clients']} HTTP clients", b), ("engine, 1 HTTP client (batch 1)", one)] if b else []
    if on and off:
        rows += [("prefix workload, cache on", on), ("prefix workload, cache off", off)]
    for name, x in rows:
        t, i = x["ttft_ms"], x["itl_ms"]
        print(f"{name:<40}{x['requests_per_s']:>8.2f}{x['output_tokens_per_s']:>11.1f}"
              f"{t[50]:>10.0f}/{t[90]:.0f}/{t[99]:.0f}{i[50]:>12.1f}/{i[90]:.1f}/{i[99]:.1f}")
    if b:   # --prefix-only runs none of these
        engine_lines(r, b, one, hf, cb)
    if on and off:
        rate = lambda x: "n/a" if x["prefix_cache"] is None else f"{x['prefix_cache']['hit_rate']:.0%}"  # noqa: E731
        print(f"prefix workload ({pw['requests']} requests, {pw['prefix_len']}-token shared prefix + "
              f"U{pw['question_len_uniform']} own, the first {on['lead_requests']} alone): hit rate on {rate(on)}, "
              f"off {rate(off)}; TTFT p50 off/on = {r['prefix_ttft_p50_off_over_on']:.2f}x (target >= 3x)")
        for part, label in (("ttft_ms_first_wave", f"the {on['clients']} sent at once"), ("ttft_ms_later", "the rest")):
            if on.get(part) and off.get(part):
                print(f"  TTFT p50 of {label}: on {on[part][50]:.0f} ms, off {off[part][50]:.0f} ms "
                      f"({off[part][50] / on[part][50]:.2f}x)")
        for part in ("light", "single"):
            lon, loff = r.get(f"prefix_on_{part}"), r.get(f"prefix_off_{part}")
            if lon and loff:
                print(f"  {lon['requests']} requests at {lon['clients']} client(s): TTFT p50 on {lon['ttft_ms'][50]:.0f} "
                      f"ms, off {loff['ttft_ms'][50]:.0f} ms = {r[f'prefix_ttft_p50_off_over_on_{part}']:.2f}x; output "
                      f"tok/s on {lon['output_tokens_per_s']:.1f}, off {loff['output_tokens_per_s']:.1f}")
    print("TTFT means, ms (client | front end: arrival -> first event | engine: submit -> first token, of it queued; "
          "the engine process's pickup of a request, between steps):")
    f = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731
    for name, x in rows:
        for label, mean, lat in ((name, x.get("ttft_ms_mean"), x.get("server_latency_ms")),
                                 ("  later arrivals", x.get("ttft_ms_later_mean"), x.get("server_latency_ms_later"))):
            if lat and mean is not None:
                cpu = x.get("frontend_cpu_us_per_token") if label == name else None
                print(f"  {label:<38} {mean:.1f} | {f(lat['frontend_ttft'])} (submit {f(lat['frontend_submit'])}) | "
                      f"{f(lat['engine_ttft'])} (queued {f(lat['engine_queue'])}; pickup {f(lat.get('engine_pickup'))})"
                      + ("" if cpu is None else f"; front end CPU {cpu:.0f} us a streamed token"))
    for label, wall, parts in (("first start", r["startup_s"], r.get("startup")),
                               ("second start", r.get("prefix_off_startup_s"), r.get("prefix_off_startup"))):
        if wall is not None:
            print(f"{label}: ready {wall:.1f} s after launch"
                  + (f", first token {r['prefix_off_first_token_s']:.1f} s (target <= 45 s)"
                     if label == "second start" and r.get("prefix_off_first_token_s") else "")
                  + ("; engine core: " + ", ".join(f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}"
                                                   for k, v in parts.items()) if parts else ""))
    print("errors: " + " + ".join(str(x["n_errors"]) for x in (b, one, on, off) if x))
    if b:
        print(f"mean running batch {b['mean_running_batch']:.1f}; "
              f"batched/batch-1 output tok/s = {b['output_tokens_per_s'] / one['output_tokens_per_s']:.2f}x"
              + "".join(f"; batched/{k} = {b['output_tokens_per_s'] / x['output_tokens_per_s']:.2f}x"
                        for k, x in (("transformers generate", hf), ("transformers cont. batching", cb))
                        if x and "error" not in x))

def engine_lines(r: dict, b: dict, one: dict, hf, cb) -> None:
    """table()'s lines on the batched and batch-1 runs: the peers, where the time went, the roofline."""
    if hf is not None:
        name = f"transformers generate, batch {b['clients']}"
        print(f"{name:<40}error: {hf['error'][:200]}" if "error" in hf else
              f"{name:<40}{hf['requests_per_s']:>8.2f}{hf['output_tokens_per_s']:>11.1f}"
              f"{hf['ttft_ms_batch']:>10.0f} (batch){hf['itl_ms']:>14.1f} (mean)")
    if cb is not None:
        name = f"transformers continuous batching ({b['clients']})"
        print(f"{name:<40}error: {cb['error'][:200]}" if "error" in cb else
              f"{name:<40}{cb['requests_per_s']:>8.2f}{cb['output_tokens_per_s']:>11.1f}"
              f"{'-':>10}{'-':>14}   (wall {cb['wall_s']:.1f} s)")
    print(f"where the batched run's time went (engine steps): prefill {b['prefill_share_of_wall']:.0%} of the wall at "
          f"{b['prefill_tokens_per_s']:.0f} prompt tok/s, decode {b['decode_share_of_wall']:.0%} at "
          f"{b['decode_tokens_per_s_in_steps']:.0f} tok/s")
    if b.get("device_busy_share_of_wall") is not None:
        print(f"the device (its own timeline): running steps {b['device_busy_share_of_wall']:.0%} of the wall, waiting "
              f"for the host between steps {b['device_gap_share_of_wall']:.0%} "
              f"({b['engine_steps']['device_gaps']} gaps, {b['device_gap_ms_mean']:.2f} ms mean)")
    for name, x in (("batched", b), ("batch-1", one)):
        st = x["engine_steps"]
        if st.get("prefill_steps"):
            print(f"{name}: {st['prefill_steps']} prefill steps, {1e3 * st['prefill_s'] / st['prefill_steps']:.1f} ms "
                  f"each, of which {1e3 * st.get('prefill_enqueue_s', 0.0) / st['prefill_steps']:.1f} ms issuing launches")
        if st.get("prefill_graph_bucket_rows"):
            print(f"{name}: prefill graphs ran {st['prefill_graph_bucket_rows']} bucket rows for "
                  f"{st['prefill_graph_rows']} real ones "
                  f"({1 - st['prefill_graph_rows'] / st['prefill_graph_bucket_rows']:.0%} padding)")
    share = b["prefill_host_share"]
    print("prefill host share, batched run (prefill_enqueue_s / prefill_s): "
          + ("n/a (no prefill_enqueue_s)" if share is None else f"{share:.0%} (target <= 25%)"))
    m = r["roofline_model"]
    print(f"roofline ({m['peak_tflops']:.0f} TFLOP/s, {m['peak_tbps']:.1f} TB/s; {m['weight_bytes'] / 1e9:.2f} GB "
          f"weights/step, {m['kv_bytes_per_token'] / 1e3:.0f} kB KV/token; module doc):")
    for name, x in (("batched", b), ("batch-1", one)):
        f = x["roofline"]
        print(f"  {name}: {f['roofline_s']:.2f} s (prefill {f['prefill_s']:.2f} + decode {f['decode_s']:.2f}, "
              f"mean decode batch {f['mean_batch']:.1f}) = {f['roofline_output_tokens_per_s']:.0f} out tok/s; "
              f"measured {x['output_tokens_per_s']:.1f} = {f['fraction_reached']:.1%} of it")

if __name__ == "__main__":
    main()
