"""CUDA graphs of the decode step, one per (batch-size bucket, context bucket), over static input buffers.

At batch 1 a decode step is ~250 small kernel launches; replaying a captured graph removes the host's
launch overhead. A batch of n runs in the smallest bucket >= n; padding rows write no KV (slot -1) and
attend one row of block 0 (their logits are dropped). The context bucket (a power of two >= the longest
context of the batch, 256 at least, the capacity at most) sizes the attention's context splits, so a
short context is spread over programs instead of looping in one.

Each graph also takes the argmax of its logits and leaves it in its own token input buffer, so a greedy
step can be replayed with no host round trip for its input (`run_greedy(None, ...)`).

With mark > 0 every graph also records one event (`mark`, shared by all buckets) after that fraction of its
layers: the engine's look-ahead run waits on it before queuing the next step (Engine._await_mark), so what arrived
during this step is seen while a third of it is still running. The latest replay's record is the one waited for.

Usage:
    g = DecodeGraphs(runner, max_batch_size=32, max_blocks=64, mark=0.67)
    logits = g.run(tokens, positions, slots, block_tables, context_lens, max_context=300)   # -> (n, V)
    toks = g.run_greedy(None, positions + 1, ...)   # inputs: the previous replay's argmax -> (n,)
"""
from __future__ import annotations

import logging
from typing import Optional

import torch

log = logging.getLogger(__name__)

BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256)
MIN_CONTEXT_BUCKET = 256


def _graph_event(device) -> Optional[torch.cuda.Event]:
    """An event that a CUDA graph can record (an external event record node), checked by capturing one; None where
    this torch / driver cannot (then the engine queues look-ahead steps without a mark)."""
    try:
        ev = torch.cuda.Event(external=True)
        x = torch.zeros(1, device=device)
        s = torch.cuda.Stream(device)
        s.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(s):
            x.add_(1)
        torch.cuda.current_stream(device).wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            x.add_(1)
            ev.record()
        g.replay()
        ev.synchronize()
        return ev
    except (TypeError, RuntimeError) as e:
        log.warning("decode graphs without a mid-step mark (look-ahead queues each step at once): %s", e)
        return None


class DecodeGraphs:
    def __init__(self, runner, max_batch_size: int, max_blocks: int, mark: float = 0.0):
        self.runner = runner
        self.mark, self.mark_layer = None, None
        layers = len(getattr(runner, "layers", ()))
        if mark and layers and hasattr(runner, "layer_mark"):
            self.mark = _graph_event(runner.device)   # None where an event cannot be recorded inside a graph
            self.mark_layer = min(layers - 1, max(0, round(mark * layers) - 1))
        self.buckets = sorted({b for b in BUCKETS if b < max_batch_size} | {max_batch_size})
        B, dev = max_batch_size, runner.device
        self.tokens = torch.zeros(B, dtype=torch.long, device=dev)
        self.positions = torch.zeros(B, dtype=torch.long, device=dev)
        self.slots = torch.full((B,), -1, dtype=torch.long, device=dev)
        self.block_tables = torch.zeros(B, max_blocks, dtype=torch.int32, device=dev)
        self.context_lens = torch.ones(B, dtype=torch.int32, device=dev)
        self.graphs, self.outputs, self.pool = {}, {}, None
        cap = max_blocks * runner.block_size
        self.ctx_buckets = sorted({min(cap, MIN_CONTEXT_BUCKET << i) for i in range(max(1, cap.bit_length()))})

    def bucket(self, n: int) -> int:
        for b in self.buckets:
            if b >= n:
                return b
        raise ValueError(f"batch {n} exceeds the largest CUDA-graph bucket {self.buckets[-1]} (max_batch_size)")

    def _inputs(self, b: int):
        return (self.tokens[:b], self.positions[:b], self.slots[:b], self.block_tables[:b], self.context_lens[:b])

    def ctx_bucket(self, max_context) -> int:
        if max_context is None:
            return self.ctx_buckets[-1]
        for c in self.ctx_buckets:
            if c >= max_context:
                return c
        raise ValueError(f"context {max_context} exceeds the block tables' capacity {self.ctx_buckets[-1]}")

    def run(self, tokens, positions, slots, block_tables, context_lens, max_context=None) -> torch.Tensor:
        """max_context: the longest context in the batch (default: capacity, always safe). -> logits (n, V)"""
        b, c = self._replay(tokens, positions, slots, block_tables, context_lens, max_context)
        return self.outputs[b, c][0][:positions.shape[0]]

    def run_greedy(self, tokens, positions, slots, block_tables, context_lens, max_context=None) -> torch.Tensor:
        """The same step -> its argmax tokens (n,). tokens=None: the step's input tokens are the ones the
        previous replay's argmax left in the input buffer (greedy decoding queued ahead of the host)."""
        b, c = self._replay(tokens, positions, slots, block_tables, context_lens, max_context)
        return self.outputs[b, c][1][:positions.shape[0]]

    def _replay(self, tokens, positions, slots, block_tables, context_lens, max_context):
        n = positions.shape[0]
        b, c = self.bucket(n), self.ctx_bucket(max_context)
        if tokens is not None:
            self.tokens[:n].copy_(tokens, non_blocking=True)
        self.positions[:n].copy_(positions, non_blocking=True)
        self.slots[:n].copy_(slots, non_blocking=True)
        self.block_tables[:n].copy_(block_tables, non_blocking=True)
        self.context_lens[:n].copy_(context_lens, non_blocking=True)
        if b > n:  # padding rows: no KV write, one row of block 0
            self.slots[n:b].fill_(-1)
            self.context_lens[n:b].fill_(1)
            self.block_tables[n:b].zero_()
        if (b, c) not in self.graphs:
            self._capture(b, c)
        self.graphs[b, c].replay()
        return b, c

    def capture_all(self) -> int:
        """Capture every bucket now (padding rows only: nothing is written to the KV cache). Returns the count."""
        self.slots.fill_(-1)
        self.context_lens.fill_(1)
        self.block_tables.zero_()
        for b in self.buckets:
            for c in self.ctx_buckets:
                if (b, c) not in self.graphs:
                    self._capture(b, c)
        return len(self.graphs)

    def _capture(self, b: int, c: int) -> None:
        args = self._inputs(b)
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):  # warm-up: Triton compiles and the W4A16 tuner runs outside capture
            for _ in range(2):
                self.runner.decode(*args, max_context_len=c)   # rewrites the KV rows the replay writes: idempotent
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        if self.mark is not None:
            self.runner.layer_mark = (self.mark_layer, self.mark.record)
        try:
            with torch.cuda.graph(g, pool=self.pool):
                out = self.runner.decode(*args, max_context_len=c)
                tok = out.argmax(-1)
                self.tokens[:b].copy_(tok)   # the next step's inputs, for greedy decoding queued ahead (run_greedy)
        finally:
            if self.mark is not None:
                self.runner.layer_mark = None
        self.pool = g.pool()
        self.graphs[b, c], self.outputs[b, c] = g, (out, tok)


PREFILL_MIN_BUCKET = 16
PREFILL_FINE_FROM = 256   # from here, quarter steps between powers of two


def prefill_buckets(max_tokens: int) -> list[int]:
    """Token-count buckets of the prefill graphs: 16, 24, 32, 48, ..., 192 (powers of two and 1.5x between them:
    padding at most a third, cheap while the weights' bytes bound the step), then quarter steps 256, 320, 384, 448,
    512, 640, ... (padding at most a fifth where the GEMMs' FLOPs bound it: 13% of the rows of a 7B's serving run
    were padding with 1.5x steps, ~8% expected with these), the last one max_tokens."""
    out, b = [], PREFILL_MIN_BUCKET
    while b < max_tokens:
        steps = (b, b * 3 // 2) if b < PREFILL_FINE_FROM else (b, b * 5 // 4, b * 3 // 2, b * 7 // 4)
        out += [x for x in steps if x < max_tokens]
        b *= 2
    return out + [max_tokens]


def capture_chunks(b: int, table_tokens: int, table) -> list[tuple]:
    """The chunks a bucket of b rows is captured with: whole prompts of at most one block table's tokens each, in
    order, all on `table` ((offset, n, table, context) as ModelRunner.prefill takes)."""
    return [(off, min(table_tokens, b - off), table, min(table_tokens, b - off)) for off in range(0, b, table_tokens)]


class PrefillGraphs:
    """CUDA graphs of a whole prefill step, one per token-count bucket: every layer's linears, norms, rotary + KV
    write and the paged prefill attention kernel (one launch per layer, its tiling read from a plan buffer), then
    the logits of the rows that sample. A step of T tokens in C chunks replays the smallest bucket >= T (C <=
    max_seqs): one host->device copy of its inputs, one of its plan, one graph launch, instead of ~30 launches
    per layer. Padding rows write no KV (slot -1) and their attention rows are zeros.

    Usage:
        pg = PrefillGraphs(runner, max_tokens=2048, max_seqs=32, max_blocks=64, block_size=64)
        logits = pg.run(tokens, positions, slots, seqs, select)   # host lists; seqs as ModelRunner.prefill takes
    A step holds at most max_seqs chunks of at most one block table's tokens (max_blocks * block_size) each, so
    buckets stop there; a bucket larger than one table is captured as several such chunks.
    """

    def __init__(self, runner, max_tokens: int, max_seqs: int, max_blocks: int, block_size: int):
        self.runner, self.max_seqs, self.max_blocks = runner, max_seqs, max_blocks
        self.table_tokens = max_blocks * block_size
        self.buckets = prefill_buckets(min(max_tokens, max_seqs * self.table_tokens))
        self.graphs, self.io, self.plans, self.outputs, self.pool = {}, {}, {}, {}, None
        self.staging: dict[int, torch.Tensor] = {}   # pinned host copies of each bucket's inputs

    def bucket(self, n: int) -> Optional[int]:
        for b in self.buckets:
            if b >= n:
                return b
        return None

    def fits(self, n_tokens: int, n_seqs: int) -> bool:
        return n_seqs <= self.max_seqs and self.bucket(n_tokens) is not None

    def _views(self, b: int):
        io = self.io[b]                       # int64 [tokens (b) | positions (b) | slots (b) | select (max_seqs)]
        return io[:b], io[b:2 * b], io[2 * b:3 * b], io[3 * b:]

    def _fill(self, b: int, tokens, positions, slots, seqs, select) -> None:
        T, S = len(tokens), len(select)
        host = self.staging[b]
        host.zero_()
        host[2 * b:3 * b].fill_(-1)                                        # padding rows write no KV
        host[:T] = torch.tensor(tokens)
        host[b:b + T] = torch.tensor(positions)
        host[2 * b:2 * b + T] = torch.tensor(slots)
        host[3 * b:3 * b + S] = torch.tensor(select)
        self.io[b].copy_(host, non_blocking=True)   # the step syncs (sampling) before this buffer is reused
        self.runner.prefill_plan(seqs, b, max_seqs=self.max_seqs, out=self.plans[b])

    def run(self, tokens: list[int], positions: list[int], slots: list[int], seqs, select: list[int]) -> torch.Tensor:
        """-> logits (len(select), V) fp32 of the selected rows (select non-empty: callers with nothing to sample
        pass [0] and drop the row)."""
        b = self.bucket(len(tokens))
        if b not in self.graphs:
            self._capture(b)
        self._fill(b, tokens, positions, slots, seqs, select)
        self.graphs[b].replay()
        return self.outputs[b][:len(select)]

    def capture_all(self) -> int:
        for b in self.buckets:
            if b not in self.graphs:
                self._capture(b)
        return len(self.graphs)

    def _capture(self, b: int) -> None:
        r, dev = self.runner, self.runner.device
        self.io[b] = torch.zeros(3 * b + self.max_seqs, dtype=torch.long, device=dev)
        self.staging[b] = torch.zeros(3 * b + self.max_seqs, dtype=torch.long, pin_memory=True)
        table = torch.zeros(self.max_blocks, dtype=torch.int32, device=dev)
        dummy = capture_chunks(b, self.table_tokens, table)               # slots -1: nothing is written
        self.plans[b] = r.prefill_plan(dummy, b, max_seqs=self.max_seqs)
        self._fill(b, [0] * b, [p for _, n, _, _ in dummy for p in range(n)], [-1] * b, dummy, [0])
        tokens, positions, slots, select = self._views(b)
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):   # warm-up: compiles and GEMM tuning for this row count, outside the capture
            for _ in range(2):
                r.prefill(tokens, positions, slots, dummy, select, plan=self.plans[b])
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, pool=self.pool):
            out = r.prefill(tokens, positions, slots, dummy, select, plan=self.plans[b])
        self.pool = g.pool()
        self.graphs[b], self.outputs[b] = g, out
