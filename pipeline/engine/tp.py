"""Tensor parallelism over torch.distributed: one process per device; rank 0 schedules, the others follow.

Usage:
    eng = Engine.from_workspace(ws, device="cuda", overrides={"tp": 2})  # the workspace was built with tp=2
    python -m pipeline.runner pipeline=serve serve.tp=2               # turbomind stage builds it with tp=2

The Engine (scheduler, sampling, HTTP/CLI surfaces) lives in the calling process, which is rank 0; it
starts ranks 1..tp-1 as fresh processes (`python -m pipeline.engine.tp --rank r ...`: nothing of the
caller's __main__ is re-imported), device r = cuda:r, or all on the CPU. Each rank loads only
its own shards of the workspace (pipeline/workspace.py): w_qkv and w13 column-parallel (its q heads, its
KV heads, its gate/up rows), wo and w2 row-parallel, followed by one all-reduce each (`ShardRunner.reduce`;
W8A8: each rank quantizes its own input slice per token, so its token scales cover that slice only);
KV heads split across ranks, or replicated where tp is a multiple of n_kv_heads; the embedding
replicated; the output head vocab-parallel (rows [r V/tp, (r+1) V/tp), logits all-gathered), sampling
done once, on rank 0. Each rank's KV cache holds only its KV heads: capacity grows with tp.

Protocol: rank 0's `TPRunner` stands in for the ModelRunner the Engine drives. Every call that touches
the model (alloc, decode, prefill, call) first broadcasts a command (an int64 header + one int64
payload: the step's tokens, positions, slots, block tables, ...) on a gloo group over the CPU, then runs
the same forward on every rank; the activations' collectives run on the default group (NCCL on GPUs,
gloo on CPUs). CUDA graphs, when on, are captured per rank (the all-reduces inside them).

Failure: every collective has a bounded timeout (`timeout_s`); rank 0 pings idle followers every
PING_S seconds. Rank 0 watches its followers' processes: one that dies, or fails to load (its error is
sent through the store), ends the server with a message naming the rank, pid, device and exit code
(start-up failures raise RuntimeError instead). Followers exit when rank 0's process is gone.
Every rank runs with NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1, NVSHMEM_DISABLE_NVLS=1.
"""
from __future__ import annotations

import atexit
import dataclasses
import importlib
import logging
import json
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..artifacts.workspace import QUANT_POLICIES, Workspace, check_tp, config_args, kv_heads
from .model import ModelRunner, compute_dtype, load_layers
from .procs import exit_text, watch_parent

log = logging.getLogger(__name__)

NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
NOOP, STOP, ALLOC, DECODE, PREFILL, CALL = range(6)
HEADER = 16          # int64: op, n_tensors, extra, lengths...
PING_S = 1.0
EXIT_CODE = 70       # the server's exit status when a rank dies


# ------------------------------------------------------------------------------------ one rank's model
def check_workspace_tp(ws: Path, c: dict, tp: int) -> None:
    check_tp(config_args(c), tp)
    if c["tensor_para_size"] != tp:
        raise ValueError(f"{ws} was built with tensor_para_size={c['tensor_para_size']}, but tp={tp} was asked "
                         f"for: rebuild it with the same tp (turbomind stage with serve.tp={tp}), or serve it "
                         f"with tp={c['tensor_para_size']} (tp=1 serves any workspace)")


class ShardRunner(ModelRunner):
    """The ModelRunner on rank r's shards; reduce/logits run the collectives on `group`."""
    group = None
    rank, tp, vocab_size = 0, 1, 0

    @classmethod
    def load(cls, ws, rank: int, tp: int, device: torch.device, session_len: int,
             quant_policy: Optional[int] = None, kv_mode: Optional[str] = None) -> "ShardRunner":
        w = Workspace.open(ws)
        c, args = w.config, w.args
        check_workspace_tp(w.path, c, tp)
        qp = c["quant_policy"] if quant_policy is None else quant_policy
        kv_bits = QUANT_POLICIES[qp]
        mode = "none" if kv_bits == 16 else (kv_mode or c.get("kv_mode", "static"))
        dtype = compute_dtype(device, c["weight_type"])
        a, b = kv_heads(args, rank, tp)
        local = dataclasses.replace(args, n_heads=args.n_heads // tp, n_kv_heads=b - a)

        def t(name):
            return w.tensor(name, device).to(dtype)

        layers, mode = load_layers(w, rank, device, dtype, mode, qp)
        embed = t("tok_embeddings.weight")                                  # (V, D), replicated
        head = embed if args.tie_embeddings else t("output.weight")
        V = args.vocab_size
        Vp = -(-V // tp)                                                    # rows per rank (last one padded)
        lm_head = head[rank * Vp:(rank + 1) * Vp]
        if lm_head.shape[0] < Vp:
            lm_head = torch.cat([lm_head, lm_head.new_zeros(Vp - lm_head.shape[0], lm_head.shape[1])])
        if not args.tie_embeddings:
            lm_head = lm_head.clone()                                       # frees the other ranks' rows
        del head
        r = cls(local, layers, embed, t("norm.weight"), lm_head, device, dtype, kv_bits, mode, session_len)
        r.rank, r.tp, r.vocab_size = rank, tp, V
        return r

    def reduce(self, x: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(x, group=self.group)
        return x

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        part = F.linear(h, self.lm_head).float()                            # (T, Vp): this rank's vocab rows
        parts = [torch.empty_like(part) for _ in range(self.tp)]
        dist.all_gather(parts, part, group=self.group)
        return torch.cat(parts, -1)[:, :self.vocab_size]                    # (T, V)


# ------------------------------------------------------------------------------------ what every rank runs
class Worker:
    """Executes commands on one rank: the same code on rank 0 (called by TPRunner) and on followers."""

    def __init__(self, runner: ShardRunner, spec: dict, ctrl):
        self.runner, self.spec, self.ctrl, self.graphs = runner, spec, ctrl, None

    def alloc(self, num_blocks: int, block_size: int, auto: bool) -> int:
        r = self.runner
        n = num_blocks
        if auto and r.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(r.device)
            n = min(n, int(free * self.spec["cache_max_entry_count"]) // r.block_bytes(block_size))
        n_t = torch.tensor([n], dtype=torch.int64)
        dist.all_reduce(n_t, op=dist.ReduceOp.MIN, group=self.ctrl)         # every rank holds the same blocks
        r.allocate_cache(int(n_t), block_size)
        if r.device.type == "cuda" and self.spec.get("cuda_graphs", True):
            from .blocks import blocks_for
            from .graphs import DecodeGraphs
            self.graphs = DecodeGraphs(r, self.spec["max_batch_size"], blocks_for(self.spec["session_len"], block_size))
        return int(n_t)

    def decode(self, *args) -> torch.Tensor:
        return (self.graphs.run if self.graphs is not None else self.runner.decode)(*args)

    def prefill(self, *args) -> torch.Tensor:
        return self.runner.prefill(*args)

    def call(self, fn: str, *args):
        mod, name = fn.split(":")
        return getattr(importlib.import_module(mod), name)(self.runner, *args)


def _header(op: int, lens: list[int], extra: int = 0) -> torch.Tensor:
    if len(lens) > HEADER - 3:
        raise ValueError(f"{len(lens)} tensors in one command; at most {HEADER - 3}")
    h = torch.zeros(HEADER, dtype=torch.int64)
    h[0], h[1], h[2] = op, len(lens), extra
    h[3:3 + len(lens)] = torch.tensor(lens, dtype=torch.int64)
    return h


def recv_command(ctrl) -> tuple[int, int, list[torch.Tensor], object]:
    """Follower side: (op, extra, int64 CPU tensors, object or None)."""
    h = torch.empty(HEADER, dtype=torch.int64)
    dist.broadcast(h, 0, group=ctrl)
    op, n, extra = (int(v) for v in h[:3])
    lens = h[3:3 + n].tolist()
    if sum(lens):
        flat = torch.empty(sum(lens), dtype=torch.int64)
        dist.broadcast(flat, 0, group=ctrl)
        parts = list(flat.split(lens))
    else:
        parts = [torch.empty(0, dtype=torch.int64) for _ in lens]
    obj = None
    if op == CALL:
        box = [None]
        dist.broadcast_object_list(box, 0, group=ctrl)
        obj = box[0]
    return op, extra, parts, obj


def follower_step(w: Worker, op: int, extra: int, parts: list[torch.Tensor], obj) -> None:
    dev = w.runner.device
    d = [p.to(dev) for p in parts]
    if op == ALLOC:
        w.alloc(int(parts[0][0]), int(parts[0][1]), bool(parts[0][2]))
    elif op == DECODE:
        tokens, positions, slots, bt, ctx = d
        w.decode(tokens, positions, slots, bt.view(tokens.shape[0], extra).int(), ctx.int())
    elif op == PREFILL:
        tokens, positions, slots, _, bts, select, _ = d
        mb = extra
        seqs = [(o, n, bts[i * mb:(i + 1) * mb].int(), c) for i, (o, n, c) in enumerate(parts[3].view(-1, 3).tolist())]
        w.prefill(tokens, positions, slots, seqs, select if int(parts[6][0]) else None)
    elif op == CALL:
        w.call(obj[0], *obj[1])
    else:
        raise ValueError(f"unknown tensor-parallel command {op}")


# ------------------------------------------------------------------------------------ follower process
def _follower_main(rank: int, tp: int, port: int, ws: str, device: str, spec: dict, timeout_s: float,
                   parent: int) -> None:
    """A follower rank: join, load its shards, then execute rank 0's commands until STOP."""
    os.environ.update(NO_MULTICAST)
    logging.basicConfig(level=logging.WARNING, format=f"[tp rank {rank}] %(levelname)s %(message)s")
    watch_parent(parent, f"[tp rank {rank}] rank 0 (pid {parent}) is gone; exiting")
    store = None
    try:
        store = dist.TCPStore("127.0.0.1", port, tp, False, timedelta(seconds=timeout_s))
        dev = torch.device(device)
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        else:
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // tp))
        store.set(f"alive/{rank}", str(os.getpid()))
        ctrl = _init_groups(store, rank, tp, dev, timeout_s)
        w = Worker(_load(Path(ws), rank, tp, dev, spec), spec, ctrl)
        store.set(f"ready/{rank}", "1")
        with torch.no_grad():
            while True:
                op, extra, parts, obj = recv_command(ctrl)
                if op == STOP:
                    break
                if op != NOOP:
                    follower_step(w, op, extra, parts, obj)
        dist.destroy_process_group()
    except BaseException as e:  # noqa: BLE001 - report to rank 0, then leave with a non-zero status
        msg = f"{type(e).__name__}: {e}"
        log.error("failed: %s\n%s", msg, traceback.format_exc())
        if store is not None:
            try:
                store.set(f"error/{rank}", msg[:2000])
            except Exception:  # noqa: BLE001 - the store may be gone with rank 0
                pass
        sys.stderr.flush()
        os._exit(1)


def _load(ws, rank: int, tp: int, dev: torch.device, spec: dict) -> ShardRunner:
    r = ShardRunner.load(ws, rank, tp, dev, spec["session_len"], spec["quant_policy"], spec.get("kv_mode"))
    r.group = dist.group.WORLD
    return r


def _init_groups(store, rank: int, tp: int, dev: torch.device, timeout_s: float):
    backend = "nccl" if dev.type == "cuda" else "gloo"
    dist.init_process_group(backend, store=dist.PrefixStore("pg", store), rank=rank, world_size=tp,
                            timeout=timedelta(seconds=timeout_s))
    return dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))


# ------------------------------------------------------------------------------------ rank 0
def _kill(procs: list) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
    for p in procs:
        p.wait()


class TPRunner:
    """Rank 0's stand-in for the ModelRunner: broadcasts each call to the followers, runs its own shard."""

    def __init__(self, worker: Worker, procs: list, devices: list, store, ctrl, timeout_s: float,
                 threads: Optional[int] = None):
        self.worker, self.local = worker, worker.runner
        self.threads = threads        # torch threads for rank 0's own compute on a CPU (cpu_threads), else None
        self.procs, self.devices, self.store, self.ctrl = procs, devices, store, ctrl
        self.tp, self.timeout_s = len(devices), timeout_s
        self.args, self.device, self.kv_mode = self.local.args, self.local.device, self.local.kv_mode
        self._lock = threading.Lock()
        self._last = time.monotonic()
        self._closing = False
        self.on_failure = None        # callable(reason): e.g. fail the Engine's requests before the exit
        threading.Thread(target=self._watchdog, name="tp-watchdog", daemon=True).start()
        threading.Thread(target=self._pinger, name="tp-ping", daemon=True).start()
        atexit.register(self.shutdown)

    # ---------------------------------------------------------------- commands
    def _send(self, op: int, tensors=(), extra: int = 0, obj=None) -> None:
        parts = [t.reshape(-1).to("cpu", torch.int64) for t in tensors]
        dist.broadcast(_header(op, [p.numel() for p in parts], extra), 0, group=self.ctrl)
        if parts and sum(p.numel() for p in parts):
            dist.broadcast(torch.cat(parts), 0, group=self.ctrl)
        if op == CALL:
            dist.broadcast_object_list([obj], 0, group=self.ctrl)
        self._last = time.monotonic()

    def _run(self, op: int, tensors, extra: int, local, obj=None):
        with self._lock:
            if self._closing:
                raise RuntimeError("the tensor-parallel group is shut down")
            try:
                self._send(op, tensors, extra, obj)
                with cpu_threads(self.threads):
                    return local()
            except Exception as e:
                dead = self.dead_rank()
                if dead:
                    self.fail(dead)
                raise RuntimeError(f"tensor-parallel step failed on rank 0: {type(e).__name__}: {e}") from e

    def block_bytes(self, block_size: int) -> int:   # per rank: its KV heads only
        return self.local.block_bytes(block_size)

    def allocate_cache(self, num_blocks: int, block_size: int) -> int:
        auto = not self.worker.spec.get("num_blocks")
        t = torch.tensor([num_blocks, block_size, int(auto)])
        return self._run(ALLOC, [t], 0, lambda: self.worker.alloc(num_blocks, block_size, auto))

    def decode(self, tokens, positions, slots, block_tables, context_lens) -> torch.Tensor:
        return self._run(DECODE, [tokens, positions, slots, block_tables, context_lens], block_tables.shape[1],
                         lambda: self.worker.decode(tokens, positions, slots, block_tables, context_lens))

    def prefill(self, tokens, positions, slots, seqs, select=None) -> torch.Tensor:
        meta = torch.tensor([[o, n, c] for o, n, _, c in seqs], dtype=torch.int64)
        bts = torch.cat([bt.reshape(-1).cpu() for _, _, bt, _ in seqs])
        mb = seqs[0][2].numel()
        sel = select if select is not None else torch.empty(0, dtype=torch.int64)
        has = torch.tensor([int(select is not None)])
        return self._run(PREFILL, [tokens, positions, slots, meta, bts, sel, has], mb,
                         lambda: self.worker.prefill(tokens, positions, slots, seqs, select))

    def call(self, fn: str, *args):
        """Run `module:function(runner, *args)` on every rank (e.g. a measurement); rank 0's result."""
        return self._run(CALL, [], 0, lambda: self.worker.call(fn, *args), obj=(fn, args))

    # ---------------------------------------------------------------- liveness
    def dead_rank(self) -> Optional[str]:
        for r, p in enumerate(self.procs, 1):
            if p.poll() is not None:
                err = self.store_error(r)
                return (f"tensor parallelism: rank {r} (pid {p.pid}, {self.devices[r]}) {exit_text(p.returncode)}"
                        + (f" ({err})" if err else "") + f"; ending the server (tp={self.tp})")
        return None

    def store_error(self, r: int) -> Optional[str]:
        try:
            return self.store.get(f"error/{r}").decode() if self.store.check([f"error/{r}"]) else None
        except Exception:  # noqa: BLE001
            return None

    def _watchdog(self) -> None:
        while not self._closing:
            time.sleep(0.2)
            reason = self.dead_rank()
            if reason and not self._closing:
                self.fail(reason)

    def _pinger(self) -> None:
        while not self._closing:
            time.sleep(PING_S / 2)
            if time.monotonic() - self._last >= PING_S and self._lock.acquire(timeout=0.1):
                try:
                    if not self._closing:
                        self._send(NOOP)
                except Exception:  # noqa: BLE001 - the watchdog reports dead ranks
                    pass
                finally:
                    self._lock.release()

    def fail(self, reason: str) -> None:
        """A rank is gone: say so, stop the others, end the server process."""
        if self._closing:
            return
        self._closing = True
        log.error(reason)
        print(f"error: {reason}", file=sys.stderr, flush=True)
        try:
            if self.on_failure is not None:
                self.on_failure(reason)
        finally:
            _kill(self.procs)
            sys.stdout.flush()
            os._exit(EXIT_CODE)

    def shutdown(self) -> None:
        if self._closing:
            return
        with self._lock:
            self._closing = True
            try:
                self._send(STOP)
            except Exception:  # noqa: BLE001
                pass
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
        if dist.is_initialized():
            dist.destroy_process_group()


def _await(store, procs: list, devices: list, key: str, what: str, timeout_s: float) -> None:
    """Wait until every follower set `key/r`; a follower that dies or reports an error raises at once."""
    t0 = time.monotonic()
    pending = set(range(1, len(procs) + 1))
    while pending:
        for r in sorted(pending):
            p = procs[r - 1]
            if store.check([f"error/{r}"]):
                raise RuntimeError(f"tensor parallelism: rank {r} (pid {p.pid}, {devices[r]}) failed to {what}: "
                                   f"{store.get(f'error/{r}').decode()}")
            if store.check([f"{key}/{r}"]):
                pending.discard(r)
            elif p.poll() is not None:
                raise RuntimeError(f"tensor parallelism: rank {r} (pid {p.pid}, {devices[r]}) {exit_text(p.returncode)} "
                                   f"before it could {what} (its log is above)")
        if pending and time.monotonic() - t0 > timeout_s:
            raise RuntimeError(f"tensor parallelism: ranks {sorted(pending)} did not {what} within {timeout_s:.0f} s "
                               "(serve.tp_timeout)")
        time.sleep(0.05)


@contextmanager
def cpu_threads(n: Optional[int]):
    """torch's intra-op threads set to n for the block (None: unchanged); the caller's setting is restored after, so
    that a tensor-parallel engine made in a Python process does not leave that process on n threads."""
    prev = torch.get_num_threads()
    if n is None or n == prev:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(prev)


def launch(ws, device: torch.device, tp: int, spec: dict, timeout_s: float = 120.0) -> TPRunner:
    """Spawn ranks 1..tp-1, join them in a process group, load rank 0's shard; returns rank 0's TPRunner.
    spec: session_len, quant_policy, kv_mode, max_batch_size, cache_max_entry_count, num_blocks, cuda_graphs."""
    if dist.is_initialized():
        raise RuntimeError("a torch.distributed process group already exists in this process: one tensor-parallel "
                           "engine per process (stop the other engine first)")
    w = Workspace.open(ws)                  # rank 0 reads it in this process; ranks 1.. open its path
    check_workspace_tp(w.path, w.config, tp)
    if device.type == "cuda":
        n = torch.cuda.device_count()
        if n < tp:
            raise ValueError(f"tp={tp} needs {tp} GPUs, but {n} are visible (CUDA_VISIBLE_DEVICES)")
        devices = [torch.device("cuda", i) for i in range(tp)]
    else:
        devices = [torch.device("cpu")] * tp
    threads = max(1, (os.cpu_count() or 1) // tp) if device.type == "cpu" else None   # rank 0's share of the cores
    os.environ.update(NO_MULTICAST)
    store = dist.TCPStore("127.0.0.1", 0, tp, True, timedelta(seconds=timeout_s), wait_for_workers=False)
    repo = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, **NO_MULTICAST, "PYTHONPATH": os.pathsep.join([repo, os.environ.get("PYTHONPATH", "")])}
    procs = []
    try:
        for r in range(1, tp):
            a = dict(rank=r, tp=tp, port=store.port, ws=str(w.path.resolve()), device=str(devices[r]), spec=spec,
                     timeout_s=timeout_s, parent=os.getpid())
            procs.append(subprocess.Popen([sys.executable, "-m", "pipeline.engine.tp", json.dumps(a)], env=env))
            log.info("tensor parallelism: rank %d pid %d on %s", r, procs[-1].pid, devices[r])
        _await(store, procs, devices, "alive", "start", timeout_s)
        if devices[0].type == "cuda":
            torch.cuda.set_device(devices[0])
        ctrl = _init_groups(store, 0, tp, devices[0], timeout_s)
        with cpu_threads(threads):
            runner = _load(w, 0, tp, devices[0], spec)
        _await(store, procs, devices, "ready", "load its shards", timeout_s)
    except BaseException:
        _kill(procs)
        if dist.is_initialized():
            dist.destroy_process_group()
        raise
    print(f"tensor parallelism: tp={tp} on {', '.join(map(str, devices))}; follower pids "
          f"{' '.join(str(p.pid) for p in procs)}", file=sys.stderr, flush=True)
    return TPRunner(Worker(runner, spec, ctrl), procs, devices, store, ctrl, timeout_s, threads)


if __name__ == "__main__":   # a follower rank, started by launch()
    _follower_main(**json.loads(sys.argv[1]))
