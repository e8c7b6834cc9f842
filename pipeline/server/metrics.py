"""Prometheus metrics of the API server: `GET /metrics` in Prometheus' text format, for a scraper and a dashboard.

    curl http://127.0.0.1:23333/metrics
    # prometheus.yml:  scrape_configs: [{job_name: llm-pipeline, static_configs: [{targets: ["127.0.0.1:23333"]}]}]

Names follow vLLM's (`vllm:time_to_first_token_seconds` is `llm_pipeline:time_to_first_token_seconds` here), so a
dashboard built for one serves the other by its prefix. Every series carries `model_name`.
  Gauges, read from the engine at each scrape: num_requests_running, num_requests_waiting, kv_cache_usage_perc
    (KV blocks in use / all; 0-1, as vLLM's), prefix_cache_cached_blocks.
  Counters: prompt_tokens_total, generation_tokens_total, request_success_total{finished_reason} (stop, length,
    abort: a request whose client left before its end), request_failure_total; from the engine:
    prefix_cache_queries_total, prefix_cache_hits_total (prompt tokens looked up / found in the prefix cache),
    prefix_cache_evictions_total, spec_decode_num_draft_tokens_total / _accepted_tokens_total (speculative decoding).
  Histograms, seconds (observed where the front end hands each output on, i.e. what a client sees less the network):
    time_to_first_token_seconds (request arrival -> first token), inter_token_latency_seconds (between consecutive
    outputs of a request, per token: a step's output of k tokens observes gap / k, k times), e2e_request_latency_seconds
    (arrival -> last output); and request_prompt_tokens, request_generation_tokens (per finished request).
One registry per app (tests run several servers in one process); the engine is asked for its stats once a scrape.
"""
from __future__ import annotations

import time
from typing import Callable, Optional

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

PREFIX = "llm_pipeline:"
# vLLM's buckets (seconds / tokens) where it has them
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
               80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0,
               960.0, 1920.0, 7680.0)
TOKEN_BUCKETS = tuple(m * 10 ** e for e in range(6) for m in (1, 2, 5))


class _EngineCollector:
    """The engine's own numbers, read at scrape time (stats(): the same dict /health shows)."""

    def __init__(self, stats: Callable[[], dict], model_name: str):
        self.stats, self.model_name = stats, model_name

    def collect(self):
        st = self.stats()
        lab = ["model_name"]
        pc, steps = st.get("prefix_cache") or {}, st.get("steps") or {}
        total = st.get("total_blocks") or 0
        for name, doc, value in (
                ("num_requests_running", "Requests in the running batch.", st.get("running", 0)),
                ("num_requests_waiting", "Requests waiting to be admitted.", st.get("waiting", 0)),
                ("kv_cache_usage_perc", "KV cache blocks in use, as a fraction of all (1 = full).",
                 (total - st.get("free_blocks", 0)) / total if total else 0.0),
                ("prefix_cache_cached_blocks", "KV blocks holding a prefix-cache entry (in use or evictable).",
                 pc.get("cached_blocks", 0))):
            g = GaugeMetricFamily(PREFIX + name, doc, labels=lab)
            g.add_metric([self.model_name], value)
            yield g
        for name, doc, value in (
                ("prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", pc.get("queries", 0)),
                ("prefix_cache_hits", "Prompt tokens found in the prefix cache (their KV reused).", pc.get("hits", 0)),
                ("prefix_cache_evictions", "Cached blocks evicted to make room.", pc.get("evictions", 0)),
                ("spec_decode_num_draft_tokens", "Draft tokens speculative decoding checked.",
                 steps.get("spec_drafted", 0)),
                ("spec_decode_num_accepted_tokens", "Draft tokens speculative decoding kept.",
                 steps.get("spec_accepted", 0))):
            c = CounterMetricFamily(PREFIX + name, doc, labels=lab)
            c.add_metric([self.model_name], value)
            yield c


class Metrics:
    """The server's registry: request timers feed the histograms and counters; render() is the /metrics body."""

    def __init__(self, model_name: str, engine_stats: Callable[[], dict]):
        self.model_name = model_name
        self.registry = r = CollectorRegistry()
        lab = ["model_name"]

        def hist(name, doc, buckets):
            return Histogram(PREFIX + name, doc, lab, buckets=buckets, registry=r).labels(model_name)
        self.ttft = hist("time_to_first_token_seconds", "Request arrival to its first token.", TTFT_BUCKETS)
        self.itl = hist("inter_token_latency_seconds", "Time between a request's consecutive tokens.", ITL_BUCKETS)
        self.e2e = hist("e2e_request_latency_seconds", "Request arrival to its last output.", E2E_BUCKETS)
        self.prompt_len = hist("request_prompt_tokens", "Prompt tokens of a finished request.", TOKEN_BUCKETS)
        self.gen_len = hist("request_generation_tokens", "Generated tokens of a finished request.", TOKEN_BUCKETS)
        self.prompt_tokens = Counter(PREFIX + "prompt_tokens", "Prompt tokens of finished requests.", lab,
                                     registry=r).labels(model_name)
        self.gen_tokens = Counter(PREFIX + "generation_tokens", "Tokens generated.", lab, registry=r).labels(model_name)
        self._success = Counter(PREFIX + "request_success", "Requests finished, by reason.",
                                lab + ["finished_reason"], registry=r)
        self.failure = Counter(PREFIX + "request_failure", "Requests that ended in an error.", lab,
                               registry=r).labels(model_name)
        r.register(_EngineCollector(engine_stats, model_name))

    def request(self, t_arrival: Optional[float] = None) -> "RequestTimer":
        return RequestTimer(self, time.perf_counter() if t_arrival is None else t_arrival)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    def aborted(self) -> None:
        """A request the front end ended before its last output (its client left): counted as vLLM's `abort`."""
        self._success.labels(self.model_name, "abort").inc()

    def finished(self, reason: Optional[str], n_prompt: int, n_gen: int) -> None:
        if reason == "error":
            self.failure.inc()
            return
        self._success.labels(self.model_name, reason or "unknown").inc()
        self.prompt_tokens.inc(n_prompt)
        self.prompt_len.observe(n_prompt)
        self.gen_len.observe(n_gen)


class RequestTimer:
    """One choice of one request: observe(out) for each engine output as the front end hands it on."""

    def __init__(self, metrics: Metrics, t_arrival: float):
        self.m, self.t0, self.last = metrics, t_arrival, None

    def observe(self, out) -> None:
        now, k = time.perf_counter(), len(out.token_ids)
        if k:
            self.m.gen_tokens.inc(k)
            if self.last is None:
                self.m.ttft.observe(now - self.t0)
                k -= 1                                # the first token's time is TTFT, not a gap
            elif k:
                gap = (now - self.last) / k
                for _ in range(k):
                    self.m.itl.observe(gap)
            self.last = now
        if out.finished:
            self.m.e2e.observe(now - self.t0)
            self.m.finished(out.finish_reason, out.num_prompt_tokens, out.num_generated_tokens)


class StatsLog:
    """Every `interval` s while the engine works, one log line of what it did since the last (as vLLM's periodic
    stats line): prompt and generation throughput, running and waiting requests, KV cache usage, the prefix cache's
    hit rate over the interval (and, with speculative decoding, the share of drafts kept). A daemon thread; stop()
    ends it."""

    def __init__(self, stats: Callable[[], dict], interval: float, log):
        import threading
        self.stats, self.interval, self.log = stats, interval, log
        self._stop = threading.Event()
        self._last = self._read()
        self._thread = threading.Thread(target=self._run, name="stats-log", daemon=True)
        self._thread.start()

    def _read(self) -> dict:
        st = self.stats()
        steps, pc, lat = st.get("steps", {}), st.get("prefix_cache") or {}, st.get("latency", {})
        return {"t": time.monotonic(), "prompt": steps.get("prefill_tokens", 0),
                "gen": steps.get("decode_tokens", 0) + steps.get("mixed_decode_tokens", 0) + lat.get("first_tokens", 0),
                "queries": pc.get("queries", 0), "hits": pc.get("hits", 0), "running": st.get("running", 0),
                "waiting": st.get("waiting", 0), "free": st.get("free_blocks", 0), "total": st.get("total_blocks", 0),
                "drafted": steps.get("spec_drafted", 0), "kept": steps.get("spec_accepted", 0)}

    def line(self, a: dict, b: dict) -> Optional[str]:
        """The line for the interval from reading a to reading b (None: the engine did nothing and holds nothing)."""
        dt = max(b["t"] - a["t"], 1e-9)
        prompt, gen, q = b["prompt"] - a["prompt"], b["gen"] - a["gen"], b["queries"] - a["queries"]
        if not (prompt or gen or b["running"] or b["waiting"]):
            return None
        usage = (b["total"] - b["free"]) / b["total"] if b["total"] else 0.0
        hit = f"{(b['hits'] - a['hits']) / q:.1%}" if q else "-"
        drafted = b.get("drafted", 0) - a.get("drafted", 0)
        spec = f", Drafts kept: {(b.get('kept', 0) - a.get('kept', 0)) / drafted:.1%}" if drafted else ""
        return (f"Avg prompt throughput: {prompt / dt:.1f} tokens/s, Avg generation throughput: {gen / dt:.1f} "
                f"tokens/s, Running: {b['running']} reqs, Waiting: {b['waiting']} reqs, KV cache usage: {usage:.1%}, "
                f"Prefix cache hit rate: {hit}{spec}")

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                now = self._read()
            except Exception as e:   # noqa: BLE001 - an engine gone is reported by its client; keep quiet here
                self.log.debug("stats log: %s", e)
                continue
            text = self.line(self._last, now)
            self._last = now
            if text:
                self.log.info(text)

    def stop(self) -> None:
        self._stop.set()
