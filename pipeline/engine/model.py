"""Model runner: the decoder on the kernels over a paged KV cache (chunked prefill, batched decode).

Usage:
    r = ModelRunner.from_workspace(ws, torch.device("cuda"), session_len=4096, quant_policy=None)
    r.allocate_cache(num_blocks, block_size=64)
    logits = r.prefill(tokens, positions, slots, seqs, select)   # seqs: [(offset, n, block_table, ctx_len)]
    logits = r.decode(tokens, positions, slots, block_tables, context_lens)   # (B,) -> (B, V) fp32

Per layer: rms_norm (fused residual) -> w_qkv (fp16, W4A16 or W8A8) -> rope_kv_write (rotary + KV quantize +
paged write) -> attention (decode: paged_decode_attention; prefill: every chunk's queries against its
sequence's cached KV, one paged_prefill_attention launch per layer from a plan built once per step (Triton), else
the KV gathered, dequantized, through SDPA) -> wo -> rms_norm -> w13 -> silu_mul -> w2.
W8A8 (weight_type int8): the norms before w_qkv and w13 are fused with the per-token int8 quantization
of their output (rms_norm_quant); wo and w2 quantize their input per token (quantize_per_token); every
int8 linear is the int8 GEMM with the token and channel scales in its epilogue.
Compute dtype: fp16 on CUDA (bf16 for a bf16 workspace), fp32 on CPU (kernels' PyTorch references).
"""
from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from ..kernels.attention import dequant_kv, gather_kv, kv_rows, paged_decode_attention
from ..kernels.dispatch import use_triton
from ..kernels.norm import rms_norm
from ..kernels.prefill_attention import PrefillPlan, paged_prefill_attention, prefill_plan
from ..kernels.rope_kv import rope_kv_write
from ..models.llama import ModelArgs, rope_cos_sin
from ..artifacts.workspace import QUANT_POLICIES, Workspace
from ..weights import of, table_row

log = logging.getLogger(__name__)


BATCHED_PREFILL_KEYS = 8192  # padded key rows (sequences x longest context) one batched prefill attention gathers


def _expand_heads(x: torch.Tensor, G: int, dim: int) -> torch.Tensor:
    """KV heads repeated G times along `dim` for grouped-query attention (no copy when G == 1)."""
    return x if G == 1 else x.repeat_interleave(G, dim)


# The linears of a layer dispatch on their weight type (pipeline/weights: its row's apply, norm_apply, swiglu_down).
def linear(x: torch.Tensor, w, b: Optional[torch.Tensor] = None) -> torch.Tensor:
    return of(w).apply(x, w, b)


def norm_linear(x, residual, norm, eps, w, b=None):
    """RMSNorm(x [+ residual]) * norm, then the linear w: (y, the new residual stream x [+ residual]).
    For an int8 weight the norm and the activations' per-token quantization are one kernel."""
    return of(w).norm_apply(x, residual, norm, eps, w, b)


def swiglu_down(gate_up: torch.Tensor, w) -> torch.Tensor:
    """w2(silu(gate) * up) for gate_up (T, 2I); W4A16 computes the product while loading its input."""
    return of(w).swiglu_down(gate_up, w)


@dataclass
class Layer:
    attn_norm: torch.Tensor
    ffn_norm: torch.Tensor
    w_qkv: object                      # a weight type's record (pipeline/weights): dense (N, K), W4Weight, W8Weight;
                                       # N = (nh + 2 nkv) * hd, rows [q | k | v]
    b_qkv: Optional[torch.Tensor]
    wo: object
    b_o: Optional[torch.Tensor]
    w13: object                        # rows [gate | up]
    w2: object
    kv_static: Optional[torch.Tensor]  # (4, nkv) fp32: k_scale, k_zp, v_scale, v_zp


def compute_dtype(device: torch.device, weight_type: str) -> torch.dtype:
    if device.type != "cuda":
        return torch.float32
    return table_row(weight_type).act_dtype


def load_layers(w: Workspace, rank: int, device, dtype, mode: str, qp: int, merged: bool = False) -> tuple[list[Layer], str]:
    """Rank `rank`'s decoder layers of an opened workspace, as stored (tp=1: the whole model; TP ranks: their
    shards; merged: a workspace built for tp > 1 joined into one model, Workspace.merged_layer); 16-bit tensors in
    dtype, quantized linears as written. Returns the layers and the KV mode (static falls back to dynamic when the
    workspace has no past_kv_scale files)."""
    wt = w.wtype

    def t(x):
        return None if x is None else x.to(dtype)

    layers = []
    for i in range(w.args.n_layers):
        L = f"layers.{i}"
        m = w.merged_layer(i, device) if merged else w.rank_layer(i, rank, device)
        if mode == "static" and m["kv_static"] is None:
            if i == 0:
                log.warning("quant_policy=%d with static KV, but %s has no past_kv_scale files: using "
                            "per-token dynamic KV quantization", qp, w.path)
            mode = "dynamic"
        layers.append(Layer(
            t(w.tensor(f"{L}.attention_norm.weight", device)), t(w.tensor(f"{L}.ffn_norm.weight", device)),
            wt.cast(m["w_qkv"], dtype), t(m["b_qkv"]), wt.cast(m["wo"], dtype), t(m["b_o"]),
            wt.cast(m["w13"], dtype), wt.cast(m["w2"], dtype),
            None if m["kv_static"] is None else m["kv_static"].float().contiguous()))
    return layers, mode


class ModelRunner:
    native = False   # the torch-native subclass (native.py) sets it: no CUDA graphs around it

    def __init__(self, args: ModelArgs, layers: list[Layer], embed, norm, lm_head, device, dtype,
                 kv_bits: int, kv_mode: str, session_len: int):
        self.args, self.layers, self.embed, self.norm, self.lm_head = args, layers, embed, norm, lm_head
        self.device, self.dtype, self.kv_bits, self.kv_mode = device, dtype, kv_bits, kv_mode
        self.scale = args.head_dim ** -0.5
        max_pos = max(session_len, args.max_seq_len)
        cos, sin = rope_cos_sin(args, torch.arange(max_pos, device=device))
        self.cos, self.sin = cos.contiguous(), sin.contiguous()   # (max_pos, hd/2) fp32
        self.k_cache = self.v_cache = None
        self.batched_prefill = True   # one attention call per layer for a step's chunks (False: one per chunk)
        self.prefill_kernel = True    # paged_prefill_attention on the Triton path (False: gather + SDPA)
        self.layer_mark: Optional[tuple] = None   # (layer, fn): fn() after that layer of a forward (graphs.py)

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_workspace(cls, ws, device: torch.device, session_len: int,
                       quant_policy: Optional[int] = None, kv_mode: Optional[str] = None) -> "ModelRunner":
        """ws: a path or an opened Workspace. A workspace built for tp=1 is read as stored (rank 0's files, the
        int4 linears already in the kernel layout); one built for tp > 1 is joined from its ranks' files in the
        same stored layout (Workspace.merged_layer). Neither unpacks nor repacks."""
        w = Workspace.open(ws)
        c = w.config
        qp = c["quant_policy"] if quant_policy is None else quant_policy
        if qp not in QUANT_POLICIES:
            raise ValueError(f"quant_policy={qp} is not one of {sorted(QUANT_POLICIES)} (0: fp16 KV, 4: int8, 8: int4)")
        dtype = compute_dtype(device, c["weight_type"])
        kv_bits = QUANT_POLICIES[qp]
        mode = "none" if kv_bits == 16 else (kv_mode or c.get("kv_mode", "static"))
        layers, mode = load_layers(w, 0, device, dtype, mode, qp, merged=w.tp > 1)
        embed = w.tensor("tok_embeddings.weight", device).to(dtype)
        lm_head = embed if w.args.tie_embeddings else w.tensor("output.weight", device).to(dtype)
        return cls(w.args, layers, embed, w.tensor("norm.weight", device).to(dtype), lm_head, device, dtype,
                   kv_bits, mode, session_len)

    @torch.no_grad()
    def warmup_gemms(self, sizes: list[int]) -> None:
        """Run layer 0's linears at these row counts: their kernels compile and the GEMM tuners (keyed by
        shape, so layer 0 speaks for every layer) choose, before any request is timed."""
        a, L = self.args, self.layers[0]
        for T in sizes:
            h = torch.zeros(T, a.dim, device=self.device, dtype=self.dtype)
            linear(h, L.w_qkv, L.b_qkv)
            linear(torch.zeros(T, a.n_heads * a.head_dim, device=self.device, dtype=self.dtype), L.wo, L.b_o)
            swiglu_down(linear(h, L.w13), L.w2)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # ------------------------------------------------------------------ KV cache
    def block_bytes(self, block_size: int) -> int:
        a = self.args
        per_row = a.head_dim * {16: torch.finfo(self.dtype).bits // 8, 8: 1, 4: 0.5}[self.kv_bits]
        side = 2 * 4 * 2 if self.kv_mode == "dynamic" else 0      # k/v scale and zp, fp32
        return int(a.n_layers * a.n_kv_heads * block_size * (2 * per_row + side))

    def allocate_cache(self, num_blocks: int, block_size: int) -> None:
        a, dev = self.args, self.device
        hd = a.head_dim // 2 if self.kv_bits == 4 else a.head_dim
        dt = {16: self.dtype, 8: torch.int8, 4: torch.uint8}[self.kv_bits]
        shape = (num_blocks, a.n_kv_heads, block_size, hd)
        self.k_cache = [torch.zeros(shape, dtype=dt, device=dev) for _ in self.layers]
        self.v_cache = [torch.zeros(shape, dtype=dt, device=dev) for _ in self.layers]
        self.num_blocks, self.block_size = num_blocks, block_size
        self.kv = []
        for L in self.layers:
            kw = {"kv_mode": self.kv_mode, "kv_bits": self.kv_bits}
            if self.kv_mode == "static":
                kw.update(zip(("k_scale", "k_zp", "v_scale", "v_zp"), (t.contiguous() for t in L.kv_static)))
            elif self.kv_mode == "dynamic":
                side = (num_blocks, a.n_kv_heads, block_size)
                kw.update({n: torch.zeros(side, dtype=torch.float32, device=dev)
                           for n in ("k_scale", "k_zp", "v_scale", "v_zp")})
            self.kv.append(kw)

    def _cached_kv(self, l: int, which: str, rows) -> torch.Tensor:
        """One sequence's (or a padded batch's) K or V rows of layer l, dequantized, in the compute dtype.
        rows: `kv_rows` of the sequence (block table (max_blocks,) -> (n, nkv, hd)) or of B sequences (tables
        (B, max_blocks) -> (B, n, nkv, hd)); computed once per step, shared by every layer."""
        cache = (self.k_cache if which == "k" else self.v_cache)[l]
        kw = self.kv[l]
        s, z = kw.get(which + "_scale"), kw.get(which + "_zp")
        if self.kv_mode == "dynamic":
            s, z = gather_kv(s, rows), gather_kv(z, rows)
        x = gather_kv(cache, rows)
        if self.kv_mode == "none":
            return x
        return dequant_kv(x, self.kv_mode, self.kv_bits, s, z).to(self.dtype)

    # ------------------------------------------------------------------ forward
    def _forward(self, tokens, attend, select=None) -> torch.Tensor:
        a = self.args
        T = tokens.shape[0]
        nh, nkv, hd = a.n_heads, a.n_kv_heads, a.head_dim
        x = F.embedding(tokens, self.embed)                               # (T, D)
        res = None                                                        # residual stream: x until layer 0's norm
        for l, L in enumerate(self.layers):
            qkv, res = norm_linear(x, res, L.attn_norm, a.norm_eps, L.w_qkv, L.b_qkv)   # (T, (nh + 2 nkv) hd)
            q, k, v = qkv.split([nh * hd, nkv * hd, nkv * hd], dim=-1)
            o = attend(l, q.view(T, nh, hd), k.view(T, nkv, hd), v.view(T, nkv, hd))   # (T, nh, hd)
            x = self.reduce(linear(o.reshape(T, nh * hd), L.wo, L.b_o))
            gate_up, res = norm_linear(x, res, L.ffn_norm, a.norm_eps, L.w13)           # (T, 2 I)
            x = self.reduce(swiglu_down(gate_up, L.w2))
            if self.layer_mark is not None and l == self.layer_mark[0]:
                self.layer_mark[1]()                                      # e.g. a CUDA graph's event (graphs.py)
        h, _ = rms_norm(x, self.norm, a.norm_eps, residual=res)
        if select is not None:
            h = h[select]
        return self.logits(h)                                              # (T' , V)

    # tensor-parallel hooks (pipeline/engine/tp.py overrides them): identity / the whole head on one device
    def reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of the row-parallel partial outputs over ranks (after wo and w2)."""
        return x

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return F.linear(h, self.lm_head).float()

    def decode(self, tokens, positions, slots, block_tables, context_lens,
               max_context_len: Optional[int] = None) -> torch.Tensor:
        """One token per sequence. tokens/positions/slots (B,), block_tables (B, max_blocks) int32,
        context_lens (B,) int32 (including this token); max_context_len: an upper bound on them that sizes
        the attention's context splits (default: the block tables' capacity). Returns logits (B, V) fp32."""
        def attend(l, q, k, v):
            q = rope_kv_write(q, k, v, positions, self.cos, self.sin, self.k_cache[l], self.v_cache[l], slots,
                              **self.kv[l])
            return paged_decode_attention(q, self.k_cache[l], self.v_cache[l], block_tables, context_lens,
                                          self.scale, max_context_len=max_context_len, **self.kv[l])
        return self._forward(tokens, attend)

    def _batch_plan(self, seqs, q_device) -> Optional[dict]:
        """Index tensors for one attention call over every chunk of a prefill step (None: one call per chunk).
        Chunks are padded to the longest chunk (queries) and the longest context (keys); batched only while the
        padding at most doubles the keys gathered, so one long prompt beside short ones keeps the per-chunk loop, and
        while the padded key rows stay within BATCHED_PREFILL_KEYS (the gathered, dequantized K and V are transient
        memory outside the KV cache's budget)."""
        if not self.batched_prefill or len(seqs) < 2:
            return None
        ctxs = [ctx for *_, ctx in seqs]
        B, n_max, c_max = len(seqs), max(n for _, n, _, _ in seqs), max(ctxs)
        if B * c_max > min(2 * sum(ctxs), BATCHED_PREFILL_KEYS):
            return None
        starts = [0] + list(itertools.accumulate(n for _, n, _, _ in seqs))[:-1]
        if [off for off, *_ in seqs] != starts:
            raise ValueError(f"prefill chunks must be concatenated in order: offsets {[o for o, *_ in seqs]}, "
                             f"expected {starts}")
        offs = torch.tensor(starts, dtype=torch.long)
        ns = torch.tensor([n for _, n, _, _ in seqs], dtype=torch.long)
        cs = torch.tensor(ctxs, dtype=torch.long)
        i = torch.arange(n_max)
        q_ok = i[None, :] < ns[:, None]                                          # (B, n_max) real query rows
        q_idx = torch.where(q_ok, offs[:, None] + i[None, :], 0)                 # rows of q (padding: row 0)
        out_b, out_i = (torch.empty(int(ns.sum()), dtype=torch.long) for _ in range(2))  # row of q -> (chunk, row)
        out_b[q_idx[q_ok]] = torch.arange(B)[:, None].expand(B, n_max)[q_ok]
        out_i[q_idx[q_ok]] = i[None, :].expand(B, n_max)[q_ok]
        dev = q_device
        tables = torch.stack([bt for _, _, bt, _ in seqs]).to(dev)
        plan = {"rows": kv_rows(tables, c_max, self.block_size), "q_idx": q_idx.to(dev),
                "out": (out_b.to(dev), out_i.to(dev)), "mask": None}
        if any(n != ctx for _, n, _, ctx in seqs):   # a later chunk: explicit mask (else plain causal, flash kernels)
            kpos = torch.arange(c_max)
            qpos = cs[:, None] - ns[:, None] + i[None, :]                        # (B, n_max) position of each query
            mask = (kpos[None, None, :] <= qpos[:, :, None]) | ~q_ok[:, :, None]  # causal; padding rows see all
            plan["mask"] = (mask & (kpos[None, :] < cs[:, None])[:, None, :]).unsqueeze(1).to(dev)
        return plan

    def _batched_prefill_attention(self, l: int, q: torch.Tensor, plan: dict) -> torch.Tensor:
        """Every chunk's queries against its sequence's cached (dequantized) keys and values in one SDPA call.
        Key rows past a sequence's context are hidden by the mask (or, for whole prompts, by causality: a real
        query row i only sees keys 0..i); they hold finite values (the cache is zero-initialised and only ever
        written with finite K and V), so no 0 * NaN reaches a real row."""
        G = self.args.n_heads // self.args.n_kv_heads
        K, V = (_expand_heads(self._cached_kv(l, w, plan["rows"]).transpose(1, 2), G, 1)
                for w in "kv")                                                   # (B, nh, c_max, hd)
        qs = q[plan["q_idx"]].transpose(1, 2)                                    # (B, nh, n_max, hd)
        if plan["mask"] is None:
            o = F.scaled_dot_product_attention(qs, K, V, is_causal=True, scale=self.scale)
        else:
            o = F.scaled_dot_product_attention(qs, K, V, attn_mask=plan["mask"], scale=self.scale)
        return o.transpose(1, 2)[plan["out"]]                                     # (T, nh, hd), no host sync

    def _looped_prefill_attention(self, l: int, q: torch.Tensor, seqs, rows) -> torch.Tensor:
        """One SDPA call per chunk over its sequence's cached (dequantized) keys and values; rows: each chunk's
        `kv_rows`."""
        G = self.args.n_heads // self.args.n_kv_heads
        out = torch.empty_like(q)
        for (off, n, bt, ctx), r in zip(seqs, rows):
            K, V = (_expand_heads(self._cached_kv(l, w, r).transpose(0, 1), G, 0)[None]
                    for w in "kv")                                       # (1, nh, ctx, hd)
            qs = q[off:off + n].transpose(0, 1)[None]                    # (1, nh, n, hd)
            if n == ctx:    # the whole sequence in this chunk: plain causal (lets SDPA use flash kernels)
                o = F.scaled_dot_product_attention(qs, K, V, is_causal=True, scale=self.scale)
            else:           # a later chunk: its queries see every earlier token and their own prefix
                kpos = torch.arange(ctx, device=q.device)
                mask = kpos[None, :] <= (ctx - n + torch.arange(n, device=q.device))[:, None]  # (n, ctx)
                o = F.scaled_dot_product_attention(qs, K, V, attn_mask=mask, scale=self.scale)
            out[off:off + n] = o[0].transpose(0, 1)
        return out

    def prefill_plan(self, seqs, n_tokens: int, max_seqs: Optional[int] = None,
                     out: Optional[PrefillPlan] = None) -> PrefillPlan:
        """The prefill attention kernel's plan for a step's chunks, on the runner's device: the step's host work,
        once for all layers. n_tokens: the step's rows (a bucket: tokens padded up to it); max_seqs: the chunks a
        plan of this shape holds (default len(seqs)); out: a plan of the same shape to rewrite in place."""
        a = self.args
        return prefill_plan(seqs, a.n_heads, a.n_kv_heads, a.head_dim, n_tokens=n_tokens, max_seqs=max_seqs,
                            block_size=self.block_size, device=self.device, out=out)

    def prefill(self, tokens, positions, slots, seqs, select=None, plan: Optional[PrefillPlan] = None) -> torch.Tensor:
        """Chunks of several sequences, concatenated: tokens/positions/slots (T,). seqs: [(offset, n,
        block_table (max_blocks,) int32, ctx_len)] where the chunk holds the sequence's last n of ctx_len
        tokens. select: row indices whose logits to return (default: all).
        plan: `prefill_plan(seqs, T)`; when the attention runs on Triton (GPU, interpreter) it is built here if not
        given, and every layer's attention is one kernel launch from it. A prebuilt plan keeps that host work out
        of the forward (tokens may be padded past the chunks' rows, up to plan.n_tokens, with slots -1)."""
        if plan is None and self.prefill_kernel and use_triton(tokens, "paged_prefill_attention"):
            plan = self.prefill_plan(seqs, tokens.shape[0])
        batched = rows = None
        if plan is None:
            batched = self._batch_plan(seqs, q_device=tokens.device)
            if batched is None:   # per chunk, shared by the layers
                rows = [kv_rows(bt.to(tokens.device), ctx, self.block_size) for _, _, bt, ctx in seqs]

        def attend(l, q, k, v):
            q = rope_kv_write(q, k, v, positions, self.cos, self.sin, self.k_cache[l], self.v_cache[l], slots,
                              **self.kv[l])
            if plan is not None:
                return paged_prefill_attention(q, self.k_cache[l], self.v_cache[l], seqs, self.scale, plan=plan,
                                               **self.kv[l])
            if batched is not None:
                return self._batched_prefill_attention(l, q, batched)
            return self._looped_prefill_attention(l, q, seqs, rows)
        return self._forward(tokens, attend, select)
