"""A CPU decode step's decoder layers in one C call (csrc/decoder_cpu.c), over the runner's own kernels' layouts.

    dec = FusedDecoder.build(runner)        # None where it does not apply (see `build`)
    x = dec(res, cos, sin, slots, step)     # res (T, D) fp32 updated in place; x (T, D): the last layer's MLP output

Taken for W4A16 workspaces with a 16-bit KV cache or int8 / int4 with static scales (`build`). NativeRunner's
per-op loop makes ~8 calls a layer into C (norms, linears, rotary + KV write, attention), each with
~4-10 us of Python and ctypes around it: ~1.5 ms of a ~6 ms batch-1 step on the 2-core VM of bench/cpu.py. Here a
step's layers are one call; each op inside is the same C function with the same arguments, so the step's outputs
are bit for bit those of the per-op loop (tests/test_cpu_decoder.py). PIPELINE_CPU_FUSED=0 turns it off.
"""
from __future__ import annotations

import ctypes
import os
from typing import Optional

import torch

from . import cpu_linear
from .cpu_attn import _Step

_P, _I = ctypes.c_void_p, ctypes.c_int


class _Linear(ctypes.Structure):
    _fields_ = [("w", _P), ("ws", _P), ("wm", _P), ("bias", _P), ("N", _I), ("K", _I), ("group", _I)]


class _Layer(ctypes.Structure):
    _fields_ = [("attn_norm", _P), ("ffn_norm", _P), ("qkv", _Linear), ("wo", _Linear), ("w13", _Linear),
                ("w2", _Linear), ("kv_rows", _P), ("kv_scale", _P), ("kv_zp", _P)]


class _Args(ctypes.Structure):
    _fields_ = [("cos", _P), ("sin", _P), ("slots", _P), ("st", ctypes.POINTER(_Step)), ("scratch", _P)] + [
        (n, _I) for n in ("T", "D", "nh", "nkv", "hd", "F", "terms", "threads", "lo", "hi", "kv_kind")] + [
        ("eps", ctypes.c_float)]


def library() -> Optional[ctypes.CDLL]:
    lib = cpu_linear.library()
    if lib is not None and lib.decoder_cpu.argtypes is None:
        lib.decoder_cpu.argtypes = [ctypes.POINTER(_Args), ctypes.POINTER(_Layer), _I, _P, _P]
        lib.decoder_cpu_scratch.restype = ctypes.c_long
        lib.decoder_cpu_scratch.argtypes = [_I] * 6
    return lib


def enabled() -> bool:
    return os.environ.get("PIPELINE_CPU_FUSED", "1") != "0"


def _int4(w) -> Optional[cpu_linear.Int4CPU]:
    """The Int4CPU a runner linear runs decode rows on (itself, or ByRows' small side), else None."""
    w = getattr(w, "small", w)
    return w if isinstance(w, cpu_linear.Int4CPU) else None


class FusedDecoder:
    """The runner's layers as csrc/decoder_cpu.c's structs (pointers into the runner's tensors, which it keeps)."""

    def __init__(self, runner, lins: list[tuple[cpu_linear.Int4CPU, ...]]):
        a, lib = runner.args, library()
        self._fn = lib.decoder_cpu
        self.D, self.nh, self.nkv, self.hd, self.F = a.dim, a.n_heads, a.n_kv_heads, a.head_dim, a.hidden_dim
        first = lins[0][0]
        self.terms, self.threads, self.thread_rows = first.terms, first.threads, first.thread_rows
        self.max_rows = min(getattr(w, "rows", 1 << 30) for L in runner.layers for w in (L.w_qkv, L.wo, L.w13, L.w2))
        self.eps, (self.lo, self.hi) = float(a.norm_eps), runner.qrange or (0, 0)
        self.kv_kind = cpu_linear.KV_KINDS[runner.kv_rows[0].dtype]
        self._keep, layers = [], []
        for l, (L, (qkv, wo, w13, w2)) in enumerate(zip(runner.layers, lins)):
            biases = [None if b is None else b.float().contiguous() for b in (L.b_qkv, L.b_o)]   # as the loop adds them
            self._keep += biases

            def lin(w, b=None):
                return _Linear(w.packed.data_ptr(), w.ws.data_ptr(), w.wm.data_ptr(),
                               None if b is None else b.data_ptr(), w.N, w.K, w.group_size)
            p = runner.kv[l]
            layers.append(_Layer(L.attn_norm.data_ptr(), L.ffn_norm.data_ptr(), lin(qkv, biases[0]), lin(wo, biases[1]),
                                 lin(w13), lin(w2), runner.kv_rows[l].data_ptr(),
                                 *(p[k].data_ptr() if k in p else None for k in ("scale", "zp"))))
        self.layers = (_Layer * len(layers))(*layers)
        self._scratch_rows, self._scratch = 0, None

    @classmethod
    def build(cls, runner) -> Optional["FusedDecoder"]:
        """For a CPU runner whose decode attention is the C kernel, whose KV cache is 16-bit or int8 / int4 with static
        scales (the runner's `rope_kv`) and whose every linear decodes on Int4CPU with one setting of terms and
        threads; else None."""
        if not enabled() or runner.attn_cpu is None or not runner.rope_kv or library() is None:
            return None
        lins = [tuple(_int4(w) for w in (L.w_qkv, L.wo, L.w13, L.w2)) for L in runner.layers]
        flat = [w for ws in lins for w in ws]
        if not flat or any(w is None for w in flat) or len({(w.terms, w.threads, w.thread_rows) for w in flat}) != 1:
            return None
        fp32 = [t for L in runner.layers for t in (L.attn_norm, L.ffn_norm)] + [
            t for p in runner.kv for t in p.values()]
        if not all(t.dtype == torch.float32 and t.is_contiguous() for t in fp32):
            return None
        return cls(runner, lins)

    def __call__(self, res: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, slots: torch.Tensor,
                 step: _Step) -> torch.Tensor:
        """res (T, D) fp32 contiguous (in place: the residual stream after the last layer); cos / sin (T, hd) fp32,
        slots (T,) int64 contiguous; step: the attention's step struct (PagedAttnCPU.step_args). Returns x
        (T, D), the last layer's MLP output (the caller adds it and applies the final norm)."""
        T = res.shape[0]
        if T > self._scratch_rows:
            n = library().decoder_cpu_scratch(T, self.D, self.nh, self.nkv, self.hd, self.F)
            self._scratch, self._scratch_rows = torch.empty(n, dtype=torch.float32), T
        x = torch.empty(T, self.D, dtype=torch.float32)
        args = _Args(cos.data_ptr(), sin.data_ptr(), slots.data_ptr(), ctypes.pointer(step), self._scratch.data_ptr(),
                     T, self.D, self.nh, self.nkv, self.hd, self.F, self.terms,
                     self.threads if T >= self.thread_rows else 1, self.lo, self.hi, self.kv_kind, self.eps)
        if self._fn(ctypes.byref(args), self.layers, len(self.layers), res.data_ptr(), x.data_ptr()):
            raise MemoryError(f"decoder_cpu: no scratch memory for {T} x {self.D} activations")
        return x
