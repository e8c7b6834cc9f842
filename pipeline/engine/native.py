"""The torch-native backend: the engine's model runner on PyTorch's own kernels (CPU, old GPUs, or forced).

Usage (the engine picks it; see pipeline/kernels/dispatch.py `use_native`):
    PIPELINE_KERNELS=native python -m pipeline.runner ...        # force it on any device (a GPU included)
    PIPELINE_NATIVE_DTYPE=fp32 ...                                 # exact mode: fp32 linears (default bf16;
                                                                   # fp16 on a GPU below sm_80)
    PIPELINE_NATIVE_DECODE_THREADS=2 ...                           # decode threads (default 1 where torch has 2)
    PIPELINE_NATIVE_DENSE_ROWS=0 ...                               # int4 prefill on the int4 op (default: bf16
                                                                   # copy from 32 rows)
    r = NativeRunner.from_workspace(ws, torch.device("cpu"), session_len=4096)
    r.allocate_cache(num_blocks, block_size=64)
    logits = r.decode(tokens, positions, slots, block_tables, context_lens)     # (B,) -> (B, V) fp32
    logits = r.prefill(tokens, positions, slots, seqs, select)                 # as ModelRunner.prefill

What differs from ModelRunner (same API, same paged-KV engine around it):
  - every linear is repacked once at load for PyTorch's kernels (its weight type's `native`, pipeline/weights;
    layouts in pipeline/kernels/native.py: int4 on
    `_weight_int4pack_mm[_for_cpu]`, W8A8 on `torch._int_mm`, dense in the activation dtype), and the lm_head is
    int8 weight-only on a CPU in bf16 mode; on a CPU, int4 linears run inputs of >= 32 rows (prefill) on a bf16
    copy prepacked for oneDNN (PIPELINE_NATIVE_DENSE_ROWS; `dense_rows` below);
  - on an x86 CPU where our C kernels build (pipeline/kernels/cpu_build.py; PIPELINE_CPU_KERNEL=0 turns them off):
    int4 and the int8 lm_head on integer dot products (kernels/cpu_linear.py), decode attention over the paged
    cache in place (kernels/cpu_attn.py), and per layer one call each for the residual add + RMSNorm, rotary +
    KV write (16-bit, static int8 / int4), and SwiGLU + down projection; where all of a layer's ops are these (int4
    linears, those KV kinds), a decode step's layers run in one C call (kernels/cpu_decoder.py;
    PIPELINE_CPU_FUSED=0 turns it off);
  - the activation dtype fed to the linears is bf16 (the CPU's fast int4 / bf16 kernels) or fp32
    (PIPELINE_NATIVE_DTYPE=fp32: exact mode, weights dequantized once to fp32); the residual stream, norms, rotary,
    KV quantization and attention stay fp32;
  - one KV tensor per layer, (num_blocks, block_size, 2, n_kv, head_dim[/2]): a step writes K and V of its tokens
    with one index_copy_, and attention gathers a sequence's blocks with one index and dequantizes K and V
    together (the codes, static/dynamic scales and int4 packing of pipeline/kernels/kvcache.py, with its op order:
    exact mode matches the reference path bit for bit there), then SDPA (grouped-query heads without a copy).
    k_cache / v_cache are views of it in the usual layout;
  - the per-token host work is a plain loop of ~30 torch calls a layer; on a GPU, decode steps replay CUDA graphs
    (engine/graphs.py: per batch and context bucket, the keys masked past each context, padding rows writing a
    scratch block) where the largest bucket's gathered fp32 K/V fits `graph_memory_ok`, else they run eagerly
    (PIPELINE_NATIVE_CUDA_GRAPHS=0 too): a 7B w4a16 forced on an H100 decodes 2.4-2.9x faster with them
    (bench/results/engine_native_graphs_h100_s15.json).
"""
from __future__ import annotations

import logging
import math
import os
from contextlib import contextmanager
from typing import Optional

import torch
import torch.nn.functional as F

from ..kernels import cpu_attn, cpu_linear
from ..kernels.cpu_decoder import FusedDecoder
from ..kernels.cpu_linear import KV_KINDS, add_rms_norm, rope_kv
from ..kernels.kvcache import kv_dynamic_params, pack_int4, qrange, unpack_int4
from ..kernels.native import dense_rows_from_env, native_head, swiglu_down
from ..weights import native_linear, of
from .model import ModelRunner

log = logging.getLogger(__name__)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def prefill_rows_max_context() -> int:
    """PIPELINE_CPU_PREFILL_ROWS_CONTEXT: the longest context (tokens) for which a CPU prefill step attends through the
    C decode attention, one query row at a time (default 512; 0: never); longer ones take SDPA, whose blocked
    matmuls win as a chunk's rows x context grows (the row kernel reads each key once per query row)."""
    return int(os.environ.get("PIPELINE_CPU_PREFILL_ROWS_CONTEXT", 512))


def act_dtype_from_env(device: torch.device) -> torch.dtype:
    """PIPELINE_NATIVE_DTYPE (bf16 | fp16 | fp32); default bf16, or fp16 on a GPU without bf16 (below sm_80)."""
    name = os.environ.get("PIPELINE_NATIVE_DTYPE")
    if name is None:
        return torch.float16 if device.type == "cuda" and not torch.cuda.is_bf16_supported(False) else torch.bfloat16
    if name not in DTYPES:
        raise ValueError(f"PIPELINE_NATIVE_DTYPE={name!r} is not one of {sorted(DTYPES)}")
    return DTYPES[name]


def dense_rows(layers, act: torch.dtype, device: torch.device) -> int:
    """Rows from which a CPU int4 linear runs on a bf16 copy of its weight (PIPELINE_NATIVE_DENSE_ROWS, default
    32: prefill), or 0: not on a CPU, not bf16, or the copies (4x the int4 bytes) would take over a quarter of the
    free memory."""
    rows = dense_rows_from_env()
    if not rows or device.type != "cpu" or act != torch.bfloat16:
        return 0
    need = sum(2 * w.N * w.K for L in layers for w in (L.w_qkv, L.wo, L.w13, L.w2) if of(w).native_dense_copy)
    free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    if need > free / 4:
        log.info("int4 linears keep int4 for prefill: their bf16 copies (%.1f GB) exceed a quarter of the free "
                 "memory (%.1f GB)", need / 1e9, free / 1e9)
        return 0
    return rows


def decode_threads() -> int:
    """Intra-op threads for a CPU decode step (PIPELINE_NATIVE_DECODE_THREADS; prefill keeps torch's setting). The
    default: 1 where torch has 2 threads. A decode step's ops are small, and with OMP_WAIT_POLICY=passive each
    multi-threaded op wakes the second thread: on the 2-core VM of bench/cpu.py, 1 thread decodes 1.5x faster at
    batch 1 (15-16.5 ms a step against 24) and 1.1x at batch 8 (docs/perf-log.md, session 10)."""
    n = os.environ.get("PIPELINE_NATIVE_DECODE_THREADS")
    if n is not None:
        return int(n)
    return 1 if torch.get_num_threads() <= 2 else torch.get_num_threads()


@contextmanager
def decode_threading(device: torch.device):
    """Run the block (a decode step) on decode_threads() intra-op threads on a CPU; torch's setting is restored
    after. Nested blocks switch nothing (the engine wraps a step's inputs, forward and token choice in one)."""
    threads, want = torch.get_num_threads(), decode_threads()
    switch = torch.device(device).type == "cpu" and want != threads
    if switch:
        torch.set_num_threads(want)
    try:
        yield
    finally:
        if switch:
            torch.set_num_threads(threads)


def scratch_blocks(device: torch.device) -> int:
    """KV blocks allocated past the engine's: one on a GPU (the padding rows of a CUDA-graph decode step write
    there), none on a CPU (no graphs)."""
    return 1 if device.type == "cuda" else 0


class NativeRunner(ModelRunner):
    native = True

    def __init__(self, args, layers, embed, norm, lm_head, device, dtype, kv_bits, kv_mode, session_len,
                 act_dtype: Optional[torch.dtype] = None):
        super().__init__(args, layers, embed, norm, lm_head, device, dtype, kv_bits, kv_mode, session_len)
        act = act_dtype or act_dtype_from_env(torch.device(device))
        rows = dense_rows(self.layers, act, torch.device(device))
        self.dense_rows = rows     # steps of >= rows tokens run the linears on bf16 copies (0: never)
        for L in self.layers:   # the workspace's linears -> their torch-native layouts (their weight type's `native`)
            L.w_qkv, L.wo, L.w13, L.w2 = (native_linear(w, act, rows) for w in (L.w_qkv, L.wo, L.w13, L.w2))
            L.attn_norm, L.ffn_norm = L.attn_norm.float(), L.ffn_norm.float()
            L.b_qkv, L.b_o = (None if b is None else b.to(act) for b in (L.b_qkv, L.b_o))
        self.embed, self.norm = embed.float(), norm.float()
        self.head = native_head(lm_head, act)
        self.ckern = cpu_linear.library() if torch.device(device).type == "cpu" else None   # looked up once
        self.dtype = act           # the linears' inputs and a 16-bit KV cache
        half = args.head_dim // 2
        self.rot_cos = torch.cat([self.cos, self.cos], -1)          # (max_pos, hd): x * cos + roll(x, hd/2) * sin
        self.rot_sin = torch.cat([-self.sin, self.sin], -1)         # rotate_half(x) == roll(x, hd/2) * [-1 | 1]
        self.half = half

    def warmup_gemms(self, sizes: list[int]) -> None:
        """Run layer 0's linears once per size (lazy kernel setup before any request is timed)."""
        a, L = self.args, self.layers[0]
        with torch.inference_mode():
            for T in sizes:
                h = torch.zeros(T, a.dim, device=self.device)
                L.w_qkv(h, L.b_qkv), L.wo(torch.zeros(T, a.n_heads * a.head_dim, device=self.device), L.b_o)
                L.w2(L.w13(h)[:, :a.hidden_dim])

    # ------------------------------------------------------------------ KV cache
    def allocate_cache(self, num_blocks: int, block_size: int) -> None:
        a, dev = self.args, self.device
        hd = a.head_dim // 2 if self.kv_bits == 4 else a.head_dim
        dt = {16: self.dtype, 8: torch.int8, 4: torch.uint8}[self.kv_bits]
        self.num_blocks, self.block_size = num_blocks, block_size
        self.qrange = qrange(self.kv_bits) if self.kv_bits != 16 else None
        # on a GPU one scratch block past the engine's: a CUDA graph's padding rows (slot -1) write their K/V there
        extra = scratch_blocks(torch.device(dev))
        self.scratch_slot = num_blocks * block_size if extra else None
        self.kv_cache = [torch.zeros(num_blocks + extra, block_size, 2, a.n_kv_heads, hd, dtype=dt, device=dev)
                         for _ in self.layers]
        self.kv_rows = [c.view(-1, 2, a.n_kv_heads, hd) for c in self.kv_cache]   # by slot
        self.k_cache = [c[:num_blocks, :, 0].transpose(1, 2) for c in self.kv_cache]   # (num_blocks, n_kv, block, hd)
        self.v_cache = [c[:num_blocks, :, 1].transpose(1, 2) for c in self.kv_cache]
        side = ((num_blocks + extra) * block_size, 2, a.n_kv_heads)
        self.kv = []
        for L in self.layers:
            if self.kv_mode == "static":     # kv_static rows: k_scale, k_zp, v_scale, v_zp -> (2, n_kv, 1)
                s = L.kv_static.float()
                self.kv.append({"scale": s[0::2, :, None].contiguous(), "zp": s[1::2, :, None].contiguous()})
            elif self.kv_mode == "dynamic":
                self.kv.append({n: torch.zeros(side, dtype=torch.float32, device=dev) for n in ("scale", "zp")})
            else:
                self.kv.append({})
        self.attn_cpu = None     # decode attention on our C kernel over the paged cache where it takes the caches
        if torch.device(dev).type == "cpu" and cpu_attn.available() and all(
                cpu_attn.supports(c, self.kv_bits, self.kv_mode, a.n_heads) for c in self.kv_cache):
            self.attn_cpu = cpu_attn.PagedAttnCPU(self.kv_cache, self.kv, self.kv_bits, self.kv_mode, a.n_heads,
                                                  self.scale)
        # rotary + the KV write in one C call a layer (cpu_linear.rope_kv; it checks dtypes and device): 16-bit
        # caches and static int8 / int4 codes (dynamic scales: torch's ops)
        self.rope_kv = torch.device(dev).type == "cpu" and self.kv_mode in ("static", "none") and (
            self.kv_cache[0].dtype in KV_KINDS)
        self.fused = FusedDecoder.build(self)    # a decode step's layers in one C call, where every op above is C

    def _write_kv(self, l: int, kv: torch.Tensor, slots: torch.Tensor) -> None:
        """kv (T, 2, n_kv, hd) fp32 -> codes at rows `slots` of layer l's cache (kvcache.py's rounding)."""
        rows, p = self.kv_rows[l], self.kv[l]
        if self.scratch_slot is not None:   # padding rows of a CUDA graph: the scratch block, no host check
            slots = torch.where(slots < 0, self.scratch_slot, slots)
        if self.kv_mode == "none":
            rows.index_copy_(0, slots, kv.to(rows.dtype))
            return
        if self.kv_mode == "dynamic":
            s, z = kv_dynamic_params(kv, self.kv_bits)                          # (T, 2, n_kv)
            p["scale"].index_copy_(0, slots, s)
            p["zp"].index_copy_(0, slots, z)
            s, z = s[..., None], z[..., None]
        else:
            s, z = p["scale"], p["zp"]
        codes = torch.round((kv - z) / s).clamp_(*self.qrange).to(torch.int8)
        rows.index_copy_(0, slots, pack_int4(codes) if self.kv_bits == 4 else codes)

    def _read_kv(self, l: int, blocks: torch.Tensor, n: Optional[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of the sequences whose block ids are `blocks` (B, nb), dequantized fp32 (B, n_kv, L, hd);
        n: keep the first n rows (one sequence), else all nb * block_size rows (the caller masks)."""
        cache = self.kv_cache[l]
        x = cache.index_select(0, blocks.flatten()).view(blocks.shape[0], -1, *cache.shape[2:])  # (B, L, 2, n_kv, hd')
        if n is not None:
            x = x[:, :n]
        if self.kv_mode == "none":
            x = x.float()
        else:
            q = unpack_int4(x) if self.kv_bits == 4 else x
            p = self.kv[l]
            if self.kv_mode == "static":
                x = q * p["scale"] + p["zp"]
            else:
                r = (blocks[:, :, None] * self.block_size
                     + torch.arange(self.block_size, device=blocks.device)).flatten(1)   # (B, L) cache rows
                r = r if n is None else r[:, :n]
                x = q * p["scale"][r][..., None] + p["zp"][r][..., None]
        return x[:, :, 0].transpose(1, 2), x[:, :, 1].transpose(1, 2)

    # ------------------------------------------------------------------ forward
    def _run(self, tokens, positions, slots, attend, select=None) -> torch.Tensor:
        """The decoder over T rows; attend(l, q (T, nh, hd) fp32) -> (T, nh * hd) after this step's K/V are written."""
        a = self.args
        T, nh, nkv, hd, eps = tokens.shape[0], a.n_heads, a.n_kv_heads, a.head_dim, a.norm_eps
        cos, sin = (t.index_select(0, positions)[:, None] for t in (self.rot_cos, self.rot_sin))   # (T, 1, hd)
        slots = slots.long()
        lib = self.ckern
        hdt = torch.bfloat16 if 0 < self.dense_rows <= T else torch.float32     # what the linears take
        res = F.embedding(tokens, self.embed)                                    # (T, D) fp32: the residual stream
        x = None
        for l, L in enumerate(self.layers):
            res, h = add_rms_norm(res, x, L.attn_norm, eps, lib, hdt)            # res += x (in place on a CPU)
            qkv = L.w_qkv(h, L.b_qkv).float().view(T, nh + 2 * nkv, hd)
            if not (self.rope_kv and rope_kv(qkv, cos, sin, nh, nkv, self.kv_rows[l], slots, self.kv[l].get("scale"),
                                             self.kv[l].get("zp"), self.qrange, lib)):
                qk = qkv[:, :nh + nkv]
                torch.add(qk * cos, torch.roll(qk, self.half, -1) * sin, out=qk)   # rotary on q and k, in place
                self._write_kv(l, qkv[:, nh:].view(T, 2, nkv, hd), slots)
            res, h = add_rms_norm(res, L.wo(attend(l, qkv[:, :nh]), L.b_o), L.ffn_norm, eps, lib, hdt)
            x = swiglu_down(L.w2, L.w13(h))                                      # w2(silu(gate) * up)
        h = add_rms_norm(res, x, self.norm, eps, lib)[1]
        if select is not None:
            h = h[select]
        return self.head(h).float()                                              # (T', V)

    def _run_fused(self, tokens, positions, slots, step) -> torch.Tensor:
        """_run's decoder for a decode step in one C call (kernels/cpu_decoder.py; the same ops, the same bits)."""
        cos, sin = (t.index_select(0, positions) for t in (self.rot_cos, self.rot_sin))    # (T, hd)
        res = F.embedding(tokens, self.embed)                                             # (T, D) fp32
        x = self.fused(res, cos, sin, slots.long().contiguous(), step)
        return self.head(add_rms_norm(res, x, self.norm, self.args.norm_eps, self.ckern)[1]).float()   # (T, V)

    def decode(self, tokens, positions, slots, block_tables, context_lens,
               max_context_len: Optional[int] = None) -> torch.Tensor:
        if self.attn_cpu is not None:       # the C kernel reads each sequence's rows in place: no gather, no mask
            with self.decode_threading(), torch.inference_mode():
                if self.fused is not None and tokens.shape[0] < self.fused.max_rows:
                    return self._run_fused(tokens, positions, slots,
                                           self.attn_cpu.step_args(block_tables, context_lens))
                return self._run(tokens, positions, slots, self.attn_cpu.step(block_tables, context_lens))
        B = tokens.shape[0]
        if max_context_len is not None:   # a CUDA graph's step (graphs.py): shapes from the bucket, no host read
            n_max, ctx = max_context_len, None
        else:
            ctx = context_lens.tolist()
            n_max = max(ctx)
        blocks = block_tables[:, :math.ceil(n_max / self.block_size)].long()     # (B, nb)
        if ctx is not None and (B == 1 or min(ctx) == n_max):
            n, mask = n_max, None
        else:       # ragged contexts: every sequence's keys up to the longest, the rest masked out
            n = None
            keys = torch.arange(blocks.shape[1] * self.block_size, device=tokens.device)
            mask = (keys[None, :] < context_lens[:, None])[:, None, None, :]    # (B, 1, 1, L)

        def attend(l, q):
            k, v = self._read_kv(l, blocks, n)
            o = F.scaled_dot_product_attention(q[:, :, None], k, v, attn_mask=mask, scale=self.scale,
                                               enable_gqa=True)                 # (B, nh, 1, hd)
            return o.view(B, -1)
        with self.decode_threading(), torch.inference_mode():
            return self._run(tokens, positions, slots, attend)

    def graph_step_bytes(self, batch: int, context: int) -> int:
        """Temporary bytes of one layer's attention in a decode step of `batch` rows over a `context` bucket: the
        gathered cache rows (codes) and their fp32 K and V, twice (SDPA's math path may copy them)."""
        a = self.args
        per_row = 2 * a.n_kv_heads * a.head_dim
        return batch * context * per_row * (self.kv_cache[0].element_size() + 2 * 4)

    def graph_memory_ok(self, batch: int, context: int) -> bool:
        """Decode steps of this runner in CUDA graphs: on a GPU (PIPELINE_NATIVE_CUDA_GRAPHS=0 turns them off) where
        the graphs' pool, which keeps the largest step's temporaries, fits in half of the memory left after the
        weights and the KV cache."""
        if torch.device(self.device).type != "cuda" or os.environ.get("PIPELINE_NATIVE_CUDA_GRAPHS", "1") == "0":
            return False
        free, _ = torch.cuda.mem_get_info(self.device)
        need = self.graph_step_bytes(batch, context)
        if need > free // 2:
            log.warning("decode steps run without CUDA graphs: a %d x %d-token step needs ~%.1f GB of temporaries "
                        "(%.1f GB free)", batch, context, need / 1e9, free / 1e9)
            return False
        return True

    def _prefill_rows(self, positions, seqs):
        """attend(l, q) for a prefill step on the C decode attention: row i of the step is a query over the first
        positions[i] + 1 rows of its sequence's cache (its own row and the chunk's earlier ones are written before
        attention), so causal attention needs no mask and no gather of the cached keys."""
        T = positions.shape[0]
        if sum(n for _, n, _, _ in seqs) != T:
            raise ValueError(f"prefill: chunks of {sum(n for _, n, _, _ in seqs)} rows for a step of {T}")
        bt = torch.empty(T, seqs[0][2].shape[0], dtype=torch.int32)          # (T, max_blocks): each row's sequence's
        for off, n, table, _ in seqs:
            bt[off:off + n] = table
        return self.attn_cpu.step(bt, (positions + 1).to(torch.int32))

    def decode_threading(self):
        """A context for a whole decode step on this runner's device (decode_threading): the engine runs its
        inputs, `decode` and the greedy token choice in one, so these small ops do not wake a second thread."""
        return decode_threading(self.device)

    def prefill(self, tokens, positions, slots, seqs, select=None, plan=None) -> torch.Tensor:
        """Chunks of several sequences (see ModelRunner.prefill); each chunk's queries attend to its sequence's
        cached keys (this chunk's included): on a CPU, for a step of several chunks with short contexts, through
        the C decode attention, each row a query over its own sequence's rows up to its position (`_prefill_rows`;
        not in the fp32 exact mode), else in one SDPA call a chunk. On the 2-core VM of bench/cpu.py (session 12):
        8 chat prompts (297 tokens) 225-250 ms a prefill step against 272-275 with SDPA a chunk; one 37-token
        prompt 56-64 against 49-55, so a lone chunk keeps SDPA.
        `plan` (the Triton kernel's) is not used."""
        if (self.attn_cpu is not None and self.dtype != torch.float32    # exact mode: SDPA, as the reference path
                and len(seqs) > 1 and max(ctx for *_, ctx in seqs) <= prefill_rows_max_context()):
            with torch.inference_mode():
                return self._run(tokens, positions, slots, self._prefill_rows(positions, seqs), select)
        bs, dev = self.block_size, tokens.device
        chunks = []
        for off, n, bt, ctx in seqs:
            mask = None
            if n != ctx:   # a later chunk: its queries see every earlier token and their own prefix
                mask = torch.arange(ctx, device=dev)[None, :] <= (ctx - n + torch.arange(n, device=dev))[:, None]
            chunks.append((off, n, bt[:math.ceil(ctx / bs)].long().to(dev)[None], ctx, mask))

        def attend(l, q):
            out = torch.empty(q.shape[0], q.shape[1] * q.shape[2], dtype=q.dtype, device=q.device)
            for off, n, blocks, ctx, mask in chunks:
                k, v = self._read_kv(l, blocks, ctx)
                o = F.scaled_dot_product_attention(q[off:off + n].transpose(0, 1)[None], k, v, attn_mask=mask,
                                                   is_causal=mask is None, scale=self.scale, enable_gqa=True)
                out[off:off + n] = o[0].transpose(0, 1).reshape(n, -1)
            return out
        with torch.inference_mode():
            return self._run(tokens, positions, slots, attend, select)
