"""The serving engine: persistent batching over a paged KV cache, streaming, cancellation.

Usage (API contract: docs/engine-api.md):
    eng = Engine.from_workspace(ws, device="auto", overrides={"quant_policy": 4, "max_batch_size": 8})
    eng.start()
    h = eng.submit(ids, SamplingParams(max_new_tokens=64, temperature=0.7, top_p=0.9, seed=0, stop=["\\n\\n"]))
    for out in h: print(out.text, end="")
    eng.generate([ids1, ids2], SamplingParams(max_new_tokens=16))   # blocking; steps itself if not started
    eng.stop()

Each step: finished / cancelled requests leave and free their blocks; waiting requests join while the
batch has room and their KV blocks (prompt + max_new_tokens, capped at session_len, reserved at once)
fit; prompt chunks (at most max_prefill_tokens per step in total) are prefilled, and a sequence whose prompt
is complete samples its first token; every sequence that was in the decode phase advances one token: in the same
forward as the prompt chunks when there are any (a mixed step, setting mixed_steps, default on: each decoder is
a one-token chunk, so the running batch does not wait a separate step for a new request's prefill), else in a
decode step (a CUDA graph per batch bucket on GPU). Requests that do not fit wait in FIFO order; none is dropped.
Prefix caching (setting prefix_caching, default on): a joining request reuses the cached KV blocks of its
prompt's longest already-computed run of full blocks (see blocks.py) and prefills only the rest; prompt blocks
are registered in the cache as their prefill completes them.
Prefill order (setting schedule): "shortest_first" (default) gives a step's prompt budget first to prompts already
in progress, then by admission step, and among prompts admitted in the same step to the one with the fewest
tokens left to compute (after its cached prefix), as SGLang's longest-prefix-match policy does for shared prefixes:
of requests that arrive together, the cheap ones get their first token a step earlier, and no request is ever passed
by one admitted after it. "fcfs": admission order.

PIPELINE_PROFILE_PREFILL=<dir>: profile the prefill steps with cProfile (in whatever thread steps the engine, e.g.
the server's) and rewrite <dir>/engine_prefill_profile.txt after each one: where a prefill step's host time goes.
"""
from __future__ import annotations

import cProfile
import contextlib
import io
import itertools
import logging
import os
import pstats
import threading
import time
from collections import deque
from pathlib import Path
from typing import Callable, Optional

import torch

from ..kernels import pdl
from ..kernels.dispatch import use_native, use_triton
from ..kernels.tuner import tuning_summary
from ..kernels.w4a16 import tuning_sizes
from ..artifacts.workspace import QUANT_POLICIES, TOKENIZER, Workspace
from ..weights import table_row
from .blocks import BlockManager, blocks_for
from .handle import RequestHandle, Sequence
from .logprobs import request_rows
from .model import ModelRunner
from .native import NativeRunner
from .params import GenerationOutput, SamplingParams
from . import processors, speculative
from .sampling import ARGMAX_ROWS, argmax, sample_device
from .text import Detokenizer, chat_prompt
from .timeline import DeviceTimeline

log = logging.getLogger(__name__)

SETTINGS = {"session_len": int, "max_batch_size": int, "cache_max_entry_count": float, "cache_block_seq_len": int,
            "max_prefill_tokens": int, "cuda_graphs": bool, "num_blocks": int, "quant_policy": int, "kv_mode": str,
            "tp": int, "tp_timeout": float, "warmup": bool, "lookahead": bool, "pdl": bool, "prefill_graphs": bool,
            "prefix_caching": bool, "mixed_steps": bool, "schedule": str, "lookahead_mark": float,
            "speculative_tokens": int, "speculative_ngram": int}
SCHEDULES = ("shortest_first", "fcfs")
# the numeric settings' valid ranges (low, high; None: unbounded; a bound in `OPEN` excluded) and what they are, so a
# bad value fails at start naming itself (from an override or config.ini), not later as a division by zero, an empty
# KV cache or an engine that never admits a request
RANGES = {"session_len": (2, None, "tokens a sequence may hold, prompt + output"),
          "max_batch_size": (1, None, "sequences running at once"),
          "cache_block_seq_len": (1, None, "tokens per KV block"),
          "max_prefill_tokens": (1, None, "prompt tokens a prefill step takes"),
          "cache_max_entry_count": (0.0, 1.0, "the fraction of free memory the KV cache takes"),
          "num_blocks": (0, None, "KV blocks (0: sized from cache_max_entry_count)"),
          "tp": (1, None, "tensor-parallel ranks"),
          "tp_timeout": (0.0, None, "seconds a tensor-parallel rank may take to answer"),
          "lookahead_mark": (0.0, 1.0, "the fraction of a decode step's layers after which a look-ahead run queues the "
                                       "next step (0: at once)"),
          "speculative_tokens": (0, None, "draft tokens a decode step checks per greedy request (0: off)"),
          "speculative_ngram": (2, None, "the longest n-gram prompt lookup matches")}
OPEN = {("cache_max_entry_count", 0.0), ("tp_timeout", 0.0)}
CPU_KV_BUDGET = 2 << 30     # bytes that cache_max_entry_count is a fraction of on a CPU


def _setting(name: str, value):
    """An override converted to its setting's type; booleans also from "true"/"false"/"1"/"0" strings."""
    typ = SETTINGS[name]
    if typ is bool and isinstance(value, str):
        if value.lower() not in ("true", "false", "1", "0", "yes", "no", "on", "off"):
            raise ValueError(f"engine override {name}={value!r} is not a boolean (true/false)")
        return value.lower() in ("true", "1", "yes", "on")
    try:
        return typ(value)
    except (TypeError, ValueError):
        raise ValueError(f"engine override {name}={value!r} is not a {typ.__name__}") from None


def check_settings(settings: dict, source: str = "engine setting") -> None:
    """ValueError naming the first numeric setting outside its range (RANGES)."""
    for name, (lo, hi, what) in RANGES.items():
        v = settings.get(name)
        if v is None:
            continue
        low_ok = v > lo if (name, lo) in OPEN else v >= lo
        if not low_ok or (hi is not None and v > hi):
            rng = f"{'>' if (name, lo) in OPEN else '>='} {lo}" + ("" if hi is None else f" and <= {hi}")
            raise ValueError(f"{source} {name}={v} is out of range: {what}, must be {rng}")


def check_request(prompt_ids, params: SamplingParams, session_len: int, vocab_size: int,
                  kv_capacity_tokens: int) -> tuple[list[int], int]:
    """A request's prompt as ints and the tokens of KV it reserves; ValueError naming what is wrong.
    (The engine-core process's front end runs the same checks, so a bad request fails at submit there too.)"""
    params.validate()
    prompt = [int(t) for t in prompt_ids]
    if not prompt:
        raise ValueError("the prompt is empty: give at least one token id")
    if len(prompt) >= session_len:
        raise ValueError(f"the prompt has {len(prompt)} tokens, more than session_len={session_len} "
                         "allows (at most session_len - 1); shorten it or raise session_len")
    if min(prompt) < 0 or max(prompt) >= vocab_size:
        raise ValueError(f"prompt token ids must be in [0, {vocab_size}), got range [{min(prompt)}, {max(prompt)}]")
    bad = [t for t in params.logit_bias if not 0 <= int(t) < vocab_size]
    if bad:
        raise ValueError(f"logit_bias token ids must be in [0, {vocab_size}), got {bad[:5]}")
    if params.json_schema is not None:
        from .structured import check_schema
        check_schema(params.json_schema)
    need = min(len(prompt) + params.max_new_tokens, session_len)
    if need > kv_capacity_tokens:
        raise ValueError(f"the request needs {need} tokens of KV cache, more than the whole cache holds "
                         f"({kv_capacity_tokens}); lower max_new_tokens")
    return prompt, need


class Engine:
    def __init__(self, runner: ModelRunner, tokenizer, settings: dict, model_name: str, weight_type: str,
                 quant_policy: int):
        self.runner, self.tokenizer, self.model_name = runner, tokenizer, model_name
        self.weight_type, self.quant_policy = weight_type, quant_policy
        s = settings
        self.session_len, self.max_batch_size = s["session_len"], s["max_batch_size"]
        self.block_size, self.max_prefill_tokens = s["cache_block_seq_len"], s.get("max_prefill_tokens", 2048)
        self.max_blocks = blocks_for(self.session_len, self.block_size)
        dev = runner.device
        num_blocks = s.get("num_blocks")
        if not num_blocks:
            per_block = runner.block_bytes(self.block_size)
            if dev.type == "cuda":
                free, _ = torch.cuda.mem_get_info(dev)
                num_blocks = int(free * s["cache_max_entry_count"]) // per_block
            else:
                need = self.max_batch_size * self.max_blocks
                num_blocks = min(need, int(CPU_KV_BUDGET * s["cache_max_entry_count"]) // per_block)
        num_blocks = runner.allocate_cache(num_blocks, self.block_size) or num_blocks   # tp: the ranks' minimum
        # automatic prefix caching: prompts that start with cached full blocks reuse their KV (blocks.py)
        self.blocks = BlockManager(num_blocks, self.block_size, prefix_caching=s.get("prefix_caching", True))
        self.prefix_cache = {"queries": 0, "hits": 0}   # prompt tokens looked up / reused at admission
        self.mixed_steps = s.get("mixed_steps", True)   # decoders ride along in prefill steps as one-token chunks
        self.schedule = s.get("schedule") or "shortest_first"
        if self.schedule not in SCHEDULES:
            raise ValueError(f"engine setting schedule={self.schedule!r} is not one of {SCHEDULES}")
        self._n_steps = 0                               # step() calls: a prompt's admission step orders its prefill
        self._prompt_hashes: dict[int, list[bytes]] = {}   # id(sequence) -> its full prompt blocks' hashes
        self._computing: dict[bytes, int] = {}   # prompt block hash -> rid of the running sequence computing it
        self.graphs = None
        # a decode step's context (NativeRunner on a CPU: its decode threads for the inputs, forward and token choice)
        self._step_threads = getattr(runner, "decode_threading", contextlib.nullcontext)
        # greedy decode one step ahead: the next step is queued on the device before the host reads this one
        self.lookahead = s.get("lookahead", True) and s.get("tp", 1) == 1
        # prompt-lookup speculative decoding for greedy batches (speculative.py; 0: off)
        self.spec_k, self.spec_n = s.get("speculative_tokens", 0), s.get("speculative_ngram", 3)
        mark = s.get("lookahead_mark", float(os.environ.get("PIPELINE_LOOKAHEAD_MARK", 0.67)))
        check_settings({"lookahead_mark": mark}, "engine setting (or PIPELINE_LOOKAHEAD_MARK)")
        self._next = torch.zeros(self.max_batch_size, dtype=torch.long, device=dev)  # last step's greedy tokens
        # programmatic dependent launch (Hopper): by default where it was measured faster (W4A16; see kernels/pdl.py);
        # set before warm-up, so the captured decode graphs carry it
        # (tp > 1: off; the rank processes launch their own kernels and were not measured with it)
        pdl_on = table_row(weight_type).pdl if s.get("pdl") is None else bool(s["pdl"])   # pipeline/weights
        self.pdl = pdl_on and s.get("tp", 1) == 1
        pdl.set_default(self.pdl)
        # decode graphs on the Triton kernels and, opted in, the native runner (engine/native.py `graph_memory_ok`;
        # a failed capture there falls back to eager steps); not on the PyTorch references
        # (PIPELINE_KERNELS=reference), whose masked indexing a CUDA-graph capture refuses
        native = getattr(runner, "native", False)
        if dev.type == "cuda" and s.get("cuda_graphs", True) and (
                runner.graph_memory_ok(self.max_batch_size, self.max_blocks * self.block_size) if native
                else use_triton(torch.empty(0, device=dev), "rope_kv_write")):
            from .graphs import DecodeGraphs
            # lookahead_mark: the decode graphs mark this fraction of their layers (an event the host can wait on),
            # so a look-ahead run queues its next step only then, after taking what arrived meanwhile
            self.graphs = DecodeGraphs(runner, self.max_batch_size, self.max_blocks,
                                       mark=mark if self.lookahead and not native else 0.0)
        # what look-ahead runs wait on before queuing the next step (anything with .synchronize(); None: no wait)
        self.step_mark = self.graphs.mark if self.graphs is not None else None
        self.prefill_graphs = None
        if (dev.type == "cuda" and s.get("cuda_graphs", True) and s.get("prefill_graphs", True)
                and s.get("tp", 1) == 1 and use_triton(torch.empty(0, device=dev), "paged_prefill_attention")):
            from .graphs import PrefillGraphs   # whole prefill steps as graphs (needs the Triton attention kernel)
            self.prefill_graphs = PrefillGraphs(runner, self.max_prefill_tokens, self.max_batch_size, self.max_blocks,
                                                self.block_size)
        eos = runner.args.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        if tokenizer is not None and tokenizer.eos_token_id is not None:
            self.eos_ids.add(tokenizer.eos_token_id)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._inbox: deque = deque()
        self._cancels: set[int] = set()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._ids = itertools.count()
        self._thread: Optional[threading.Thread] = None
        self._stopping = False
        self._gen = torch.Generator(device=dev).manual_seed(0)   # unseeded requests' draws (sampling.py)
        self._grammars = None   # structured.Grammars, made by the first json_schema request
        # the engine-core process (core.py) turns these: it sends token ids (its front end detokenizes and checks
        # stop strings), collects outputs through its own handles, and polls its socket after every decode step
        self.detokenize = True
        self.handle_factory: Callable[["Engine", int], RequestHandle] = RequestHandle
        self.on_step: Optional[Callable[[], None]] = None
        # called mid-step in look-ahead runs, at the decode graph's mark: take new requests and cancels (send nothing)
        self.on_poll: Optional[Callable[[], None]] = None
        # where the engine's time goes (cumulative; /health shows it): decode steps vs prefill chunks
        self.steps = {"decode_steps": 0, "decode_tokens": 0, "decode_s": 0.0,
                      "prefill_steps": 0, "prefill_tokens": 0, "prefill_s": 0.0,
                      "prefill_enqueue_s": 0.0,   # of prefill_s: until the step's launches were all issued
                      "mixed_steps": 0, "mixed_decode_tokens": 0,   # prefill steps that also advanced decoders
                      # prefill steps run as a graph: their rows (decoders included) and their buckets' rows (the
                      # difference is padding computed for nothing)
                      "prefill_graph_rows": 0, "prefill_graph_bucket_rows": 0,
                      # speculative steps: drafts checked, drafts kept (each a token without a step of its own)
                      "spec_steps": 0, "spec_drafted": 0, "spec_accepted": 0}
        # requests' time inside the engine (seconds, summed; /health): submit -> admitted (queue_s over `admitted`),
        # submit -> first token chosen (ttft_s over `first_tokens`; its output goes out right after the step)
        self.latency = {"admitted": 0, "queue_s": 0.0, "first_tokens": 0, "ttft_s": 0.0}
        self.timeline = DeviceTimeline(self.runner.device)   # the device's idle time between steps (timeline.py)
        # where a start's time went (seconds; /health shows it): load (from_workspace), GEMM tuning, graph captures
        self.startup: dict[str, float] = {}
        if dev.type == "cuda" and s.get("warmup", True):
            self.warmup()

    def warmup(self) -> None:
        """Compile and tune every GEMM shape a prefill chunk can hit and capture every decode graph bucket now,
        so that no request pays for it (the first batch of 32 would otherwise wait for ~20 Triton compiles)."""
        t0 = time.perf_counter()
        # every row bucket of the GEMM tuners, largest first: the int8 tuner's power-of-two buckets are then tuned at
        # their top (128, not 96), as before
        sizes = tuning_sizes(self.max_prefill_tokens)[::-1]
        if hasattr(self.runner, "warmup_gemms"):
            self.runner.warmup_gemms(sizes)
        t1 = time.perf_counter()
        n_graphs = 0
        if self.graphs is not None:
            try:
                n_graphs = self.graphs.capture_all()
            except Exception as e:  # noqa: BLE001 - the native runner's graphs (opt-in) serve eagerly instead
                if not getattr(self.runner, "native", False):
                    raise
                log.warning("decode CUDA graphs failed to capture (%s: %s): decode steps run eagerly",
                            type(e).__name__, str(e)[:500])
                self.graphs = self.step_mark = None
                torch.cuda.synchronize(self.runner.device)
        t2 = time.perf_counter()
        n_prefill = 0
        if not self._probe_prefill_kernel():
            self.prefill_graphs = None
        if self.prefill_graphs is not None:
            try:
                n_prefill = self.prefill_graphs.capture_all()
            except Exception as e:  # noqa: BLE001 - serve without them rather than not at all
                log.warning("prefill CUDA graphs failed to capture (%s: %s): prefill steps run eagerly",
                            type(e).__name__, str(e)[:500])
                self.prefill_graphs = None
                torch.cuda.synchronize(self.runner.device)
        t3 = time.perf_counter()
        self.startup.update(tune_s=t1 - t0, decode_graphs_s=t2 - t1, prefill_graphs_s=t3 - t2, warmup_s=t3 - t0,
                            decode_graphs=n_graphs, prefill_graphs=n_prefill, **tuning_summary())
        log.info("warm-up: GEMMs tuned for %d prefill sizes, %d decode graphs and %d prefill graphs captured in %.1f s",
                 len(sizes), n_graphs, n_prefill, time.perf_counter() - t0)

    def _probe_prefill_kernel(self) -> bool:
        """Run the paged prefill attention kernel once (16 tokens writing no KV): False, with a warning, and prefill
        through gather + SDPA from then on, if it does not compile or run on this GPU / Triton."""
        r = self.runner
        if not getattr(r, "prefill_kernel", False) or not use_triton(torch.empty(0, device=r.device),
                                                                     "paged_prefill_attention"):
            return False
        try:
            n = 16
            r.prefill(*self._dev([0] * n, list(range(n)), [-1] * n), [(0, n, self._table([0]), n)])
            torch.cuda.synchronize(r.device)
            return True
        except Exception as e:  # noqa: BLE001
            log.warning("the paged prefill attention kernel failed here (%s: %s): prefill attends through gather + "
                        "SDPA", type(e).__name__, str(e)[:500])
            r.prefill_kernel = False
            return False

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_workspace(cls, ws, device="auto", overrides: Optional[dict] = None) -> "Engine":
        w = Workspace.open(ws)          # config.ini parsed and checked once; the runner reads this object
        ws, c = w.path, w.config
        overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
        bad = set(overrides) - set(SETTINGS)
        if bad:
            raise ValueError(f"unknown engine overrides {sorted(bad)}; valid: {sorted(SETTINGS)}")
        settings = {k: c[k] for k in ("session_len", "max_batch_size", "cache_max_entry_count", "cache_block_seq_len")}
        settings.update({k: _setting(k, v) for k, v in overrides.items()})
        check_settings({k: v for k, v in settings.items() if k not in overrides}, f"{w.path}'s config.ini:")
        check_settings({k: v for k, v in settings.items() if k in overrides})
        trained = c.get("max_position_embeddings")
        if trained and settings["session_len"] > trained and not c.get("rope_scaling"):   # as vLLM, but a warning
            log.warning("session_len=%d is past the model's max_position_embeddings=%d (no rope scaling): tokens "
                        "beyond position %d are outside what it was trained on", settings["session_len"], trained,
                        trained)
        qp = settings.get("quant_policy", c["quant_policy"])
        if qp not in QUANT_POLICIES:
            raise ValueError(f"quant_policy={qp} is not one of {sorted(QUANT_POLICIES)} (0: fp16 KV, 4: int8, 8: int4)")
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        dev = torch.device(device)
        t0 = time.perf_counter()
        if settings.get("tp", 1) > 1:   # tensor parallelism: this process is rank 0 (pipeline/engine/tp.py)
            from .tp import launch
            runner = launch(w, dev, settings["tp"], {**settings, "quant_policy": qp}, settings.get("tp_timeout", 120.0))
            settings["cuda_graphs"] = False   # each rank captures its own graphs inside the TP group
        else:   # the torch-native backend on a CPU, an old GPU, or PIPELINE_KERNELS=native (kernels/dispatch.py)
            runner_cls = NativeRunner if use_native(dev) else ModelRunner
            runner = runner_cls.from_workspace(w, dev, settings["session_len"], qp, settings.get("kv_mode"))
        tok = None
        if (ws / TOKENIZER).exists():
            from transformers import AutoTokenizer
            tok = AutoTokenizer.from_pretrained(str(ws / TOKENIZER))
        load_s = time.perf_counter() - t0
        engine = cls(runner, tok, settings, c["model_name"], c["weight_type"], qp)
        engine.startup["load_s"] = load_s   # the runner (weights) and the tokenizer; the KV cache comes after
        return engine

    # ------------------------------------------------------------------ public API
    def submit(self, prompt_ids: list[int], params: Optional[SamplingParams] = None,
               request_id: Optional[int] = None) -> RequestHandle:
        """Queue a request; returns its handle at once. request_id: the caller's own id (the engine-core process
        uses its front end's ids); default: the engine numbers requests itself."""
        params = params or SamplingParams()
        prompt, need = check_request(prompt_ids, params, self.session_len, self.runner.args.vocab_size,
                                     self.blocks.num_blocks * self.block_size)
        rid = next(self._ids) if request_id is None else int(request_id)
        gen = self._gen if params.seed is None else \
            torch.Generator(device=self.runner.device).manual_seed(params.seed)
        detok = Detokenizer(self.tokenizer, params.stop) if self.detokenize else Detokenizer(None, [])
        state = processors.RowState(params, prompt, self._matcher(params)) if processors.needs_state(params) else None
        seq = Sequence(rid, prompt, params, self.handle_factory(self, rid), gen, reserve=need, detok=detok,
                       state=state, t_submit=time.perf_counter())
        with self._lock:
            self._inbox.append(seq)
        self._wake.set()
        return seq.handle

    def _matcher(self, params: SamplingParams):
        """A grammar matcher for a json_schema request (None without one); the tokenizer's tables are built once."""
        if params.json_schema is None:
            return None
        if self._grammars is None:
            from .structured import Grammars
            self._grammars = Grammars(self.tokenizer, self.runner.args.vocab_size, self.eos_ids)
        return self._grammars.matcher(params.json_schema)

    def cancel(self, request_id: int) -> None:
        with self._lock:
            self._cancels.add(request_id)
        self._wake.set()

    def generate(self, prompts: list[list[int]], params: Optional[SamplingParams] = None) -> list[list[int]]:
        handles = [self.submit(p, params) for p in prompts]
        if self._thread is None:   # step here until every request is done (batched together)
            while any(not h.done_pushed for h in handles):
                self.step()
        return [[t for out in h for t in out.token_ids] for h in handles]

    def start(self) -> "Engine":
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)
            self._thread.start()
        return self

    def running_thread(self) -> bool:
        return self._thread is not None

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        for s in list(self.running) + list(self.waiting):
            self._finish(s, "cancelled")
        self.waiting.clear()
        if hasattr(self.runner, "shutdown"):   # tensor parallelism: stop the other ranks
            self.runner.shutdown()

    def stats(self) -> dict:
        return dict(free_blocks=self.blocks.free_blocks, total_blocks=self.blocks.num_blocks,
                    block_size=self.block_size, running=len(self.running), waiting=len(self.waiting) + len(self._inbox),
                    kv_capacity_tokens=self.blocks.num_blocks * self.block_size, max_batch_size=self.max_batch_size,
                    session_len=self.session_len, quant_policy=self.quant_policy, weight_type=self.weight_type,
                    model_name=self.model_name, kv_mode=self.runner.kv_mode, device=str(self.runner.device),
                    tp=getattr(self.runner, "tp", 1), pdl=pdl.enabled(self.runner.device),
                    steps={**self.steps, **self.timeline.counters()},
                    prefix_cache=self._prefix_cache_stats(), startup=dict(self.startup), latency=dict(self.latency))

    def _prefix_cache_stats(self) -> dict:
        """Prefix caching counters: prompt tokens looked up and reused at admission, blocks holding a prefix hash
        (in use or evictable), cached blocks evicted to make room."""
        q, h = self.prefix_cache["queries"], self.prefix_cache["hits"]
        return dict(enabled=self.blocks.prefix_caching, queries=q, hits=h, hit_rate=h / q if q else 0.0,
                    cached_blocks=self.blocks.cached_blocks, evictions=self.blocks.evictions)

    def _count(self, phase: str, tokens: int, t0: float) -> None:
        """Count a step that has finished on the device (sampling reads the logits back, which waits for it)."""
        self.steps[phase + "_steps"] += 1
        self.steps[phase + "_tokens"] += tokens
        self.steps[phase + "_s"] += time.perf_counter() - t0

    def apply_chat_template(self, messages: list[dict], tools: Optional[list[dict]] = None) -> list[int]:
        return chat_prompt(self.tokenizer, messages, tools)

    @torch.no_grad()
    def prompt_logits(self, ids: list[int]) -> torch.Tensor:
        """Logits (T, V) fp32 of every position of `ids` through the engine's prefill (for perplexity)."""
        blocks = self.blocks.allocate(len(ids))
        try:
            bt = self._table(blocks)
            outs = []
            for a in range(0, len(ids), self.max_prefill_tokens):
                b = min(a + self.max_prefill_tokens, len(ids))
                pos = list(range(a, b))
                outs.append(self.runner.prefill(*self._dev(ids[a:b], pos, [self._slot(blocks, p) for p in pos]),
                                                [(0, b - a, bt, b)]))
            return torch.cat(outs)
        finally:
            self.blocks.free(blocks)

    # ------------------------------------------------------------------ the step loop
    def has_work(self) -> bool:
        """Requests running, waiting or just submitted, or cancels to apply: a step has something to do."""
        return bool(self.running or self.waiting or self._inbox or self._cancels)

    def _loop(self) -> None:
        while not self._stopping:
            if not self.has_work():
                self.timeline.pause()
                self._wake.wait(0.05)
                self._wake.clear()
                continue
            self.step()

    @torch.no_grad()
    def step(self) -> None:
        with self._lock:
            new, self._inbox = list(self._inbox), deque()
            cancels, self._cancels = self._cancels, set()
        self.waiting.extend(new)
        for s in [s for s in self.waiting if s.rid in cancels]:
            self.waiting.remove(s)
            self._finish(s, "cancelled")
        for s in [s for s in self.running if s.rid in cancels]:
            self._finish(s, "cancelled")
        while self.waiting and len(self.running) < self.max_batch_size:
            s = self.waiting[0]
            hit = self._cached_prefix(s)
            if self._computed_soon(s, hit) or not self.blocks.can_allocate(s.reserve, hit):
                break
            self.waiting.popleft()
            s.blocks = self.blocks.allocate(s.reserve, hit)   # the hit blocks (shared) + fresh ones
            s.n_cached = len(hit) * self.block_size           # their KV is in the cache: prefill starts past them
            s.n_hit, s.admit_step = s.n_cached, self._n_steps
            if self.blocks.prefix_caching and s.params.prompt_logprobs is None:   # echo: never looked up
                self.prefix_cache["queries"] += len(s.prompt)
                self.prefix_cache["hits"] += s.n_cached
            s.block_table = self._table(s.blocks)
            for h in self._prompt_hashes.get(id(s), [])[len(hit):]:
                self._computing.setdefault(h, s.rid)
            self.running.append(s)
            self.latency["admitted"] += 1
            self.latency["queue_s"] += time.perf_counter() - s.t_submit
        self._n_steps += 1
        batch = list(self.running)
        try:
            # prefill first: a new request's first token does not wait behind the running batch's decode step
            # (those sequences decode right after, in this same step); the decoders are chosen before it
            decoders = [s for s in batch if s.n_cached == s.n_tokens - 1 and s.out_ids]
            prompts = [s for s in batch if s.n_cached < len(s.prompt)]
            if self.schedule == "shortest_first":   # in progress, then by admission step, then fewest tokens left
                prompts.sort(key=lambda s: (s.n_cached == s.n_hit, s.admit_step,
                                            len(s.prompt) - s.n_cached if s.n_cached == s.n_hit else 0))
            if prompts and decoders and self.mixed_steps:
                self._prefill(prompts, decoders)   # one forward: the decoders as one-token chunks
            else:
                self._prefill(prompts)
                self._decode([s for s in decoders if not s.finished])
        except Exception as e:  # noqa: BLE001 - one bad step fails its requests, never the engine
            log.exception("engine step failed")
            for s in batch:
                if not s.finished:
                    self._finish(s, "error", error=f"{type(e).__name__}: {e}")

    def _cached_prefix(self, s: Sequence) -> list[int]:
        """The cached blocks of the longest run of s's full prompt blocks in the prefix cache, never reaching its
        last prompt token (prefill must compute it: its logits give the first new token)."""
        if not self.blocks.prefix_caching or s.params.prompt_logprobs is not None:   # echo: every row's logits
            return []
        hashes = self._prompt_hashes.get(id(s))
        if hashes is None:   # hashed once, kept for registration after its prefill chunks
            hashes = self._prompt_hashes[id(s)] = self.blocks.prefix_hashes(s.prompt)
        return self.blocks.lookup(hashes[:(len(s.prompt) - 1) // self.block_size])

    def _computed_soon(self, s: Sequence, hit: list[int]) -> bool:
        """The first prompt block of s past its cached prefix is being computed by a running sequence (the same
        prompt's other samples, n > 1, or any concurrent request with the same prefix): s waits until that block
        is cached, so the prefix is computed once and its KV blocks shared."""
        hashes = self._prompt_hashes.get(id(s))
        if not hashes or s.params.prompt_logprobs is not None or len(hit) >= (len(s.prompt) - 1) // self.block_size:
            return False
        return hashes[len(hit)] in self._computing

    def _register_prompt_blocks(self, chunks: list[tuple[Sequence, int, int]]) -> None:
        """Cache the prompt blocks this prefill step completed ((s, start, n) chunks: every KV row of the block
        written) under their prefix hashes. Prompt blocks only: a block with generated tokens may also hold the
        row that greedy lookahead decoding wrote past a sequence's end."""
        if not self.blocks.prefix_caching:
            return
        for s, a, n in chunks:
            hashes = self._prompt_hashes.get(id(s), [])
            for i in range(a // self.block_size, min((a + n) // self.block_size, len(hashes))):
                self.blocks.register(s.blocks[i], hashes[i])   # a hash another block holds: that one stays
                if self._computing.get(hashes[i]) == s.rid:
                    del self._computing[hashes[i]]

    def _slot(self, blocks, pos: int) -> int:
        return blocks[pos // self.block_size] * self.block_size + pos % self.block_size

    def _host_table(self, blocks) -> torch.Tensor:
        t = torch.zeros(self.max_blocks, dtype=torch.int32)
        t[:len(blocks)] = torch.tensor(blocks, dtype=torch.int32)
        return t

    def _table(self, blocks) -> torch.Tensor:
        return self._host_table(blocks).to(self.runner.device)

    def _dev(self, *lists):
        """Host int lists -> int64 device tensors (tokens, positions, slots, ...)."""
        dev = self.runner.device
        return tuple(torch.tensor(x, dtype=torch.long).to(dev, non_blocking=True) for x in lists)

    def _decode(self, seqs: list[Sequence]) -> None:
        if not seqs:
            return
        if self.spec_k and all(speculative.eligible(s) for s in seqs):
            return self._decode_spec(seqs)
        if self.lookahead and all(processors.on_device(s) for s in seqs) \
                and len(seqs) == len(self.running) and not self.waiting:
            return self._decode_ahead(seqs)
        t0 = time.perf_counter()
        self.timeline.begin()
        logits = self._decode_logits(seqs, [s.n_tokens - 1 for s in seqs], [s.last_token for s in seqs])
        for s in seqs:
            s.n_cached += 1
        self._accept(seqs, logits)
        self._count("decode", len(seqs), t0)

    def _decode_spec(self, seqs: list[Sequence]) -> None:
        """One decode step over greedy sequences and their prompt-lookup drafts (speculative.py): k + 1 rows for a
        sequence with k drafts (within max_batch_size rows in all, its token budget and its blocks), 1 to k + 1
        tokens for each."""
        t0 = time.perf_counter()
        room = self.max_batch_size - len(seqs)
        rows, pos, toks, plan = [], [], [], []
        for s in seqs:
            p = s.n_tokens - 1
            k = min(self.spec_k, room, s.params.max_new_tokens - len(s.out_ids) - 1, self.session_len - s.n_tokens - 1,
                    len(s.blocks) * self.block_size - 1 - p)
            drafts = speculative.propose(s.tokens, k, self.spec_n) if k > 0 else []
            room -= len(drafts)
            plan.append((s, len(rows), drafts))
            rows += [s] * (len(drafts) + 1)
            pos += range(p, p + len(drafts) + 1)
            toks += [s.last_token] + drafts
        self.timeline.begin()
        preds = argmax(self._decode_logits(rows, pos, toks)).tolist()
        self.timeline.end()
        n = 0
        for s, row, drafts in plan:
            got = speculative.accepted(drafts, preds[row:row + len(drafts) + 1])
            s.n_cached += len(got)            # the K / V of its last token and of the drafts kept
            self.steps["spec_drafted"] += len(drafts)
            self.steps["spec_accepted"] += len(got) - 1
            for t in got:
                self._accept_tokens([s], [t])
                n += 1
                if s.finished:
                    break
        self.steps["spec_steps"] += 1
        self._count("decode", n, t0)

    def _decode_logits(self, seqs: list[Sequence], pos: list[int], tokens: list[int]) -> torch.Tensor:
        """A decode step's logits (rows, V) for these rows (a sequence, its position, its input token), through the
        captured graphs where there are some."""
        inputs = self._step_inputs(seqs, pos, self._dev(tokens)[0])
        if self.graphs is not None:
            return self.graphs.run(*inputs, max_context=max(pos) + 1)
        return self.runner.decode(*inputs)

    def _step_inputs(self, seqs: list[Sequence], pos: list[int], tokens):
        """A decode step's device inputs for these sequences at these positions: (tokens, positions, slots,
        block tables, context lengths); tokens is passed through (a device tensor, or None)."""
        positions, slots = self._dev(pos, [self._slot(s.blocks, p) for s, p in zip(seqs, pos)])
        bt = torch.stack([s.block_table for s in seqs])
        ctx = torch.tensor([p + 1 for p in pos], dtype=torch.int32).to(self.runner.device, non_blocking=True)
        return tokens, positions, slots, bt, ctx

    def _decode_ahead(self, seqs: list[Sequence]) -> None:
        """Decode steps (greedy or sampled, penalized too; no grammars) for a batch that nothing else is waiting on,
        each step queued on the device before the host reads the previous one's tokens: the step's input tokens are
        the ones its predecessor chose on the device (argmax, or `sample_device` with the rows' own generators and
        penalties counted on the device: processors.py), so
        the host's per-token work (reading tokens, stop checks, streaming, the next step's inputs) overlaps the
        device's step instead of idling it. A sequence whose step in flight is its last (max_new_tokens, session_len)
        is left out of the step queued next, its rows' tokens gathered on the device, so the run goes on without it.
        A new request, a cancel or any other finish ends the run after the step in flight (its tokens are kept for
        the sequences still running; a finished sequence's extra token is dropped, and its extra KV row lies in
        blocks it still owned)."""
        pos = [s.n_tokens - 1 for s in seqs]
        pending = self._launch_step(seqs, pos, [s.last_token for s in seqs])
        while True:
            t0 = time.perf_counter()
            self._await_mark()
            nxt = [p + 1 for p in pos]
            keep: list[int] = []
            if not (self._inbox or self._cancels or self._stopping):
                keep = [i for i, (s, p) in enumerate(zip(seqs, nxt)) if self._room_for_two(s, p)]
            following = self._launch_step([seqs[i] for i in keep], [nxt[i] for i in keep], None,
                                          keep=None if len(keep) == len(seqs) else keep) if keep else None
            toks, lps = pending()
            for s in seqs:
                s.n_cached += 1
            self._accept_tokens(seqs, toks, lps)
            self._count("decode", len(seqs), t0)
            if self.on_step is not None:   # stream this step's tokens, take new requests and cancels
                self.on_step()
            if following is None:
                return
            kept = set(keep)
            left_out = [s for i, s in enumerate(seqs) if i not in kept]
            seqs, pos = [seqs[i] for i in keep], [nxt[i] for i in keep]
            if any(s.finished for s in seqs) or not all(s.finished for s in left_out):
                toks, lps = following()   # an unforeseen finish, or a left-out row that goes on: end the run here
                live = [i for i, s in enumerate(seqs) if not s.finished]
                for i in live:
                    seqs[i].n_cached += 1
                self._accept_tokens([seqs[i] for i in live], [toks[i] for i in live], lps and [lps[i] for i in live])
                self._count("decode", len(live), time.perf_counter())
                return
            pending = following

    def _await_mark(self) -> None:
        """Wait until the decode step in flight passes its graph's mark (lookahead_mark of its layers) and take what
        arrived meanwhile: a request that arrives during a step then waits for that step only, not also for the
        next one, which is queued after this point (with the mark at 2/3, ~2 ms of a 7B's step are left to queue
        it in). Without a mark (no graphs, or the setting 0) the next step is queued right away, as before."""
        if self.step_mark is None:
            return
        self.step_mark.synchronize()
        if self.on_poll is not None:
            self.on_poll()

    def _room_for_two(self, s: Sequence, next_pos: int) -> bool:
        """The step in flight and the one after it both fit this sequence's reserved blocks and limits."""
        return (next_pos < len(s.blocks) * self.block_size and s.n_tokens + 2 <= self.session_len
                and len(s.out_ids) + 2 <= s.params.max_new_tokens)

    def _launch_step(self, seqs: list[Sequence], pos: list[int], tokens: Optional[list[int]],
                     keep: Optional[list[int]] = None):
        """Queue one decode step and its token choice on the device (greedy: the graph's own argmax; sampled:
        `sample_device`), leaving the chosen tokens where the next step reads its inputs; tokens=None: this step's
        inputs are the tokens the previous one left (keep: the previous batch's rows that `seqs` are, in order; their
        tokens are gathered on the device first). Returns a function that waits for this step only and gives
        its tokens (host ints) and their logprobs (None, or an entry per sequence: logprobs.py) for the sequences
        that ask."""
        n = len(seqs)
        self.timeline.begin()
        if tokens is None and keep is not None:
            buf = self.graphs.tokens if self.graphs is not None else self._next
            idx = torch.tensor(keep, dtype=torch.long).to(buf.device, non_blocking=True)
            buf[:n].copy_(buf.index_select(0, idx))
        greedy = all(s.params.temperature == 0 and not s.params.logit_bias and s.state is None for s in seqs)
        ks = [s.params.logprobs for s in seqs]
        want_lp = any(k is not None for k in ks)
        tok = self._dev(tokens)[0] if tokens is not None else None
        if self.graphs is not None and greedy and not want_lp:   # the graph leaves its argmax in its own token input
            out = self.graphs.run_greedy(*self._step_inputs(seqs, pos, tok), max_context=max(pos) + 1)
        else:
            if self.graphs is not None:   # tok None: the graph's input buffer already holds them
                next_in = self.graphs.tokens
                logits = self.graphs.run(*self._step_inputs(seqs, pos, tok), max_context=max(pos) + 1)
                out = argmax(logits) if greedy else None
            else:
                next_in = self._next
                # CPU, >= 4 rows: inputs, forward and a greedy choice (sampling.argmax) all on the decode threads
                with self._step_threads() if greedy and n >= ARGMAX_ROWS else contextlib.nullcontext():
                    logits = self.runner.decode(*self._step_inputs(seqs, pos, self._next[:n] if tok is None else tok))
                    out = argmax(logits) if greedy else None
            if out is None:   # penalties (their rows only; counted on the device), logit_bias, sampling
                out = sample_device(processors.apply(logits, seqs), [s.params for s in seqs],
                                    [s.generator for s in seqs])
                processors.count_on_device(seqs, out)
            next_in[:n].copy_(out)                     # the next step's inputs
        lp = request_rows(logits, out, ks) if want_lp else None
        if self.runner.device.type != "cuda":
            host = out.tolist(), lp and lp.fetch()
            return lambda: host
        buf = torch.empty(n, dtype=torch.long, pin_memory=True)
        buf.copy_(out, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        self.timeline.end()

        def wait() -> tuple[list[int], Optional[list]]:
            done.synchronize()
            return buf.tolist(), lp and lp.fetch()
        return wait

    def _prefill(self, seqs: list[Sequence], decoders: list[Sequence] = ()) -> None:
        """One forward over prompt chunks of `seqs` (at most max_prefill_tokens tokens in all) and, in a mixed
        step, each of `decoders` as a one-token chunk (its last token at its next position) placed first, so the
        token budget never cuts them. Samples every decoder and every sequence whose prompt this step completes."""
        budget, chunks = self.max_prefill_tokens - len(decoders), []
        for s in seqs:
            if budget <= 0:
                break
            n = min(len(s.prompt) - s.n_cached, budget)
            chunks.append((s, s.n_cached, n))
            budget -= n
        if not chunks:
            if decoders:
                self._decode(list(decoders))
            return
        t0 = time.perf_counter()
        tokens, positions, slots, meta, select, done = [], [], [], [], [], []
        echo, scored = [], []   # prompt logprobs: (s, first row, the prompt tokens its rows predict); max_new_tokens 0
        for s, a, n in [(s, s.n_cached, 1) for s in decoders] + chunks:
            if s.prompt_logprobs is not None and a < len(s.prompt):
                echo.append((s, len(tokens), s.prompt[a + 1:a + n + 1]))
            meta.append((len(tokens), n, s.block_table, a + n))
            tokens += s.prompt[a:a + n] if a < len(s.prompt) else [s.last_token]
            positions += list(range(a, a + n))
            slots += [self._slot(s.blocks, p) for p in range(a, a + n)]
            s.n_cached = a + n
            if a + n == len(s.prompt) and s.params.max_new_tokens == 0:
                scored.append(s)                     # the prompt scored; nothing to generate
            elif a + n >= len(s.prompt):             # a completed prompt, or a decoder's one-token chunk
                select.append(len(tokens) - 1)
                done.append(s)
        prof = _profiler()
        if prof is not None:
            prof.enable()
        self.timeline.begin()
        pg = self.prefill_graphs
        if echo:   # every row of the echo chunks: eager (a graph returns one row a chunk)
            rows = [off + j for _, off, t in echo for j in range(len(t))]
            sel = torch.tensor(rows + select, dtype=torch.long, device=self.runner.device)
            logits = self.runner.prefill(*self._dev(tokens, positions, slots), meta, sel)
            self._prompt_logprobs(echo, logits[:len(rows)])
            logits = logits[len(rows):]
        elif pg is not None and pg.fits(len(tokens), len(meta)):   # the whole step is one graph launch
            host_meta = [(off, n, self._host_table(s.blocks), ctx)
                         for (off, n, _, ctx), s in zip(meta, list(decoders) + [c[0] for c in chunks])]
            logits = pg.run(tokens, positions, slots, host_meta, select or [0])[:len(select)]
            self.steps["prefill_graph_rows"] += len(tokens)
            self.steps["prefill_graph_bucket_rows"] += pg.bucket(len(tokens))
        else:
            sel = torch.tensor(select, dtype=torch.long, device=self.runner.device)
            logits = self.runner.prefill(*self._dev(tokens, positions, slots), meta, sel)
        self.steps["prefill_enqueue_s"] += time.perf_counter() - t0   # near prefill_s: the host is the bound
        self._register_prompt_blocks(chunks)   # before sampling, which may finish a sequence (and free its blocks)
        for s in scored:
            self._finish(s, "length")
        if done:
            self._accept(done, logits)
        elif self.runner.device.type == "cuda":   # nothing sampled: wait so the chunk's GPU time is counted here
            self.timeline.end()
            torch.cuda.synchronize(self.runner.device)
        if prof is not None:
            prof.disable()
            _dump_profile(prof, self.steps["prefill_steps"] + 1, threading.current_thread().name)
        self._count("prefill", len(tokens) - len(decoders), t0)
        if decoders:
            self.steps["mixed_steps"] += 1
            self.steps["mixed_decode_tokens"] += len(decoders)

    def _prompt_logprobs(self, echo: list, logits: torch.Tensor) -> None:
        """Append the logprobs of the prompt tokens these rows predict to each echo chunk's sequence.
        logits: (rows, V), the rows of every (s, first row, targets) chunk in order, one per target."""
        targets = [x for *_, t in echo for x in t]
        if not targets:
            return
        ks = [s.params.prompt_logprobs for s, _, t in echo for _ in t]
        entries = request_rows(logits, self._dev(targets)[0], ks).fetch()
        i = 0
        for s, _, t in echo:
            s.prompt_logprobs += entries[i:i + len(t)]
            i += len(t)

    def _accept(self, seqs: list[Sequence], logits: torch.Tensor) -> None:
        ks = [s.params.logprobs for s in seqs]
        raw = logits                                              # logprobs: the model's own distribution
        logits = processors.apply(logits, seqs, self._grammars)   # penalties and grammars: their rows only
        toks = sample_device(logits, [s.params for s in seqs], [s.generator for s in seqs])
        lp = request_rows(raw, toks, ks) if any(k is not None for k in ks) else None
        self.timeline.end()                                       # the step's last launch: the host waits next
        self._accept_tokens(seqs, toks.tolist(), lp and lp.fetch())

    def _accept_tokens(self, seqs: list[Sequence], toks: list[int], lps: Optional[list] = None) -> None:
        """Append each sequence's token (lps: its logprobs entry, None where not asked), finish or stream it."""
        for i, (s, t) in enumerate(zip(seqs, toks)):
            p = s.params
            if s.state is not None and not s.state.accept(t):
                self._finish(s, "error", error=f"the grammar refused token {t}")
                continue
            grammar_done = s.state is not None and s.state.done   # took its stop token: done, ignore_eos or not
            if t in p.stop_token_ids or (not p.ignore_eos and t in self.eos_ids) or grammar_done:
                self._finish(s, "stop")
                continue
            s.out_ids.append(t)
            if len(s.out_ids) == 1:
                self.latency["first_tokens"] += 1
                self.latency["ttft_s"] += time.perf_counter() - s.t_submit
            if lps is not None and lps[i] is not None:
                s.logprobs.append(lps[i])
            cut = s.detok.add(t)
            if cut:
                self._finish(s, "stop")
            elif len(s.out_ids) >= p.max_new_tokens or s.n_tokens >= self.session_len:
                self._finish(s, "length")
            else:
                s.emit()

    def _finish(self, s: Sequence, reason: str, error: Optional[str] = None) -> None:
        if s.finished:
            return
        s.finished = True
        self.blocks.free(s.blocks)   # one reference less each: cached prompt blocks stay reusable (LRU)
        for h in self._prompt_hashes.pop(id(s), []):
            if self._computing.get(h) == s.rid:
                del self._computing[h]
        if s in self.running:
            self.running.remove(s)
        s.emit(final=True, reason=reason, error=error)


_PROFILE: dict = {}


def _profiler() -> Optional[cProfile.Profile]:
    """The process's prefill profiler when PIPELINE_PROFILE_PREFILL names a folder (see the module doc)."""
    if not os.environ.get("PIPELINE_PROFILE_PREFILL"):
        return None
    return _PROFILE.setdefault("prof", cProfile.Profile())


def _dump_profile(prof: cProfile.Profile, steps: int, thread: str) -> None:
    out = Path(os.environ["PIPELINE_PROFILE_PREFILL"])
    out.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    buf.write(f"cProfile of {steps} prefill steps (thread {thread!r})\n")
    st = pstats.Stats(prof, stream=buf)
    st.sort_stats("tottime").print_stats(35)
    st.sort_stats("cumulative").print_stats(35)
    (out / "engine_prefill_profile.txt").write_text(buf.getvalue())


__all__ = ["Engine", "SamplingParams", "GenerationOutput"]
