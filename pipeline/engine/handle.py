"""A request's state inside the engine (Sequence) and the caller's side of it (RequestHandle).

RequestHandle is a thread-safe stream of GenerationOutput: iterate it (blocking) or `async for` over
`h.aiter()` (asyncio); the last output has finished=True. Iterating when the engine's thread is not
started steps the engine in the caller's thread. Text is detokenized incrementally (text.Detokenizer);
incomplete UTF-8 and any tail that may begin a stop string are held back.
"""
from __future__ import annotations

import asyncio
import queue
from dataclasses import dataclass, field
from typing import Optional

import torch

from .params import GenerationOutput, SamplingParams
from .text import Detokenizer


class RequestHandle:
    def __init__(self, engine, request_id: int):
        self._engine, self.request_id = engine, request_id
        self._q: queue.Queue = queue.Queue()
        self._done = False            # consumer saw the final output
        self.done_pushed = False      # engine pushed the final output
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._event: Optional[asyncio.Event] = None

    def cancel(self) -> None:
        self._engine.cancel(self.request_id)

    def _push(self, out: GenerationOutput, wake: bool = True) -> None:
        """Queue an output (from the engine's thread). wake=False: the caller wakes the consumer itself, e.g. once
        for every handle of a step (wake_all)."""
        if out.finished:
            self.done_pushed = True
        self._q.put(out)
        if wake:
            loop = self._loop
            if loop is not None:
                loop.call_soon_threadsafe(self._event.set)

    def __iter__(self):
        return self

    def __next__(self) -> GenerationOutput:
        if self._done:
            raise StopIteration
        while self._q.empty() and not self._engine.running_thread():   # not started: drive the engine here
            self._engine.step()
        out = self._q.get()
        self._done = out.finished
        return out

    def aiter(self):
        return self

    def __aiter__(self):
        return self

    async def __anext__(self) -> GenerationOutput:
        if self._done:
            raise StopAsyncIteration
        if self._loop is None:
            self._event = asyncio.Event()
            self._loop = asyncio.get_running_loop()
        while True:
            self._event.clear()
            try:
                out = self._q.get_nowait()
            except queue.Empty:
                await self._event.wait()
                continue
            self._done = out.finished
            return out

    async def next_outputs(self) -> list[GenerationOutput]:
        """Every output queued now, waiting for the first (StopAsyncIteration after the final one): a consumer that
        fell behind catches up in one wake-up and one write."""
        outs = [await self.__anext__()]
        while not outs[-1].finished:
            try:
                outs.append(self._q.get_nowait())
            except queue.Empty:
                break
        self._done = outs[-1].finished
        return outs


def wake_all(handles) -> None:
    """Wake the asyncio consumers of these handles (pushed with wake=False): one call into each event loop."""
    loops: dict = {}
    for h in handles:
        if h._loop is not None:
            loops.setdefault(h._loop, []).append(h._event)
    for loop, events in loops.items():
        loop.call_soon_threadsafe(_set_all, events)


def _set_all(events: list) -> None:
    for ev in events:
        ev.set()


@dataclass
class Sequence:
    rid: int
    prompt: list[int]
    params: SamplingParams
    handle: RequestHandle
    generator: torch.Generator
    reserve: int                              # tokens of KV reserved at admission
    detok: Detokenizer                        # output text and stop strings (no tokenizer: ids only)
    blocks: list[int] = field(default_factory=list)
    block_table: Optional[torch.Tensor] = None
    n_cached: int = 0                         # tokens whose K/V are in the cache
    out_ids: list[int] = field(default_factory=list)
    finished: bool = False
    state: Optional[object] = None            # processors.RowState: penalties / grammar (None: device-only path)
    _sent_ids: int = 0
    logprobs: list = field(default_factory=list)   # one entry per out_ids token when params.logprobs is set
    prompt_logprobs: Optional[list] = None         # params.prompt_logprobs: [None, one entry per prompt token ...]
    _sent_prompt_logprobs: bool = False
    t_submit: float = 0.0                          # time.perf_counter() at submit (latency counters: engine.py)
    n_hit: int = 0                                 # prompt tokens found in the prefix cache at admission
    admit_step: int = 0                            # the engine step that admitted it (prefill order: engine.py)

    def __post_init__(self):
        if self.params.prompt_logprobs is not None:
            self.prompt_logprobs = [None]

    @property
    def tokens(self) -> list[int]:
        """prompt + output ids: a new list (O(length)); the step loop uses n_tokens / last_token instead."""
        return self.prompt + self.out_ids

    @property
    def n_tokens(self) -> int:
        return len(self.prompt) + len(self.out_ids)

    @property
    def last_token(self) -> int:
        return self.out_ids[-1] if self.out_ids else self.prompt[-1]

    def emit(self, final: bool = False, reason: Optional[str] = None, error: Optional[str] = None) -> None:
        out = GenerationOutput(self.rid, self.out_ids[self._sent_ids:], self.detok.take(final), final,
                               reason, error, len(self.prompt), len(self.out_ids))
        if self.params.logprobs is not None:
            out.logprobs = self.logprobs[self._sent_ids:]
        if self.prompt_logprobs is not None and not self._sent_prompt_logprobs \
                and len(self.prompt_logprobs) == len(self.prompt):   # sent once, with the first output
            out.prompt_logprobs, self._sent_prompt_logprobs = self.prompt_logprobs, True
        self._sent_ids = len(self.out_ids)
        self.handle._push(out)
