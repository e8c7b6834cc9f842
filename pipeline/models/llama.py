"""Reference decoder for the LLaMA family (llama, mistral, qwen2, internlm, internlm2) in plain PyTorch.

Canonical tensor names (what every source is mapped to, see `adapters.py`):
    embed.weight                      (V, D)
    layers.{i}.attn_norm.weight       (D,)
    layers.{i}.q.weight / .bias       (nh*hd, D)
    layers.{i}.k.weight / .bias       (nkv*hd, D)
    layers.{i}.v.weight / .bias       (nkv*hd, D)
    layers.{i}.o.weight / .bias       (D, nh*hd)
    layers.{i}.mlp_norm.weight        (D,)
    layers.{i}.gate.weight            (F, D)
    layers.{i}.up.weight              (F, D)
    layers.{i}.down.weight            (D, F)
    norm.weight                       (D,)
    lm_head.weight                    (V, D)   absent when embeddings are tied

Usage:
    args = ModelArgs.from_json(path / "config.json")
    model = Transformer(args); model.load_state_dict(tensors, strict=False)
    logits = model(tokens)            # (B, T) -> (B, T, V)
"""
from __future__ import annotations

import contextlib
import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class ModelArgs:
    arch: str = "llama"
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int = 32
    head_dim: int = 128
    hidden_dim: int = 11008
    vocab_size: int = 32000
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: Optional[dict] = None
    max_seq_len: int = 4096
    tie_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    bos_token_id: Optional[int] = 1
    eos_token_id: Any = 2  # int or list of ints

    def __post_init__(self):
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")

    @classmethod
    def from_dict(cls, d: dict) -> "ModelArgs":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown model config keys {sorted(unknown)}; valid keys: {sorted(known)}")
        return cls(**d)

    @classmethod
    def from_json(cls, path) -> "ModelArgs":
        return cls.from_dict(json.loads(Path(path).read_text()))

    def to_json(self, path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=2))

    def num_params(self) -> int:
        D, F_, V, hd = self.dim, self.hidden_dim, self.vocab_size, self.head_dim
        attn = D * hd * (self.n_heads * 2 + self.n_kv_heads * 2)
        per_layer = attn + 3 * D * F_ + 2 * D
        return self.n_layers * per_layer + V * D * (1 if self.tie_embeddings else 2) + D


def rope_inv_freq(args: ModelArgs) -> torch.Tensor:
    """Inverse frequencies (hd/2,) with the checkpoint's rope scaling applied."""
    hd = args.head_dim
    inv = 1.0 / (args.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    sc = args.rope_scaling or {}
    kind = sc.get("rope_type", sc.get("type", "default"))
    if kind in ("default", None):
        pass
    elif kind == "linear":
        inv = inv / sc["factor"]
    elif kind == "llama3":
        factor, lo, hi = sc["factor"], sc["low_freq_factor"], sc["high_freq_factor"]
        old = sc["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        smooth = (old / wavelen - lo) / (hi - lo)
        scaled = torch.where(wavelen > old / lo, inv / factor, inv)
        mid = (wavelen <= old / lo) & (wavelen >= old / hi)
        inv = torch.where(mid, (1 - smooth) * inv / factor + smooth * inv, scaled)
    elif kind == "dynamic":
        pass  # dynamic NTK only changes frequencies beyond the trained context; we serve within it
    else:
        raise ValueError(f"rope_scaling type {kind!r} is not supported; supported: default, linear, dynamic, llama3")
    return inv.float()


def rope_cos_sin(args: ModelArgs, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (T, hd/2) in fp32 for integer positions (T,)."""
    inv = rope_inv_freq(args).to(positions.device)
    ang = positions.float()[:, None] * inv[None, :]
    return ang.cos(), ang.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """HF 'rotate_half' rotary. x (B, h, T, hd); cos/sin (T, hd/2)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].float(), x[..., half:].float()
    out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    return out.to(x.dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class Block(nn.Module):
    """One decoder block. Hooks used by quantization stages:
    - `kv_observer(k, v)`: called with rotated K and V, both (B, nkv, T, hd)  (calibration)
    - `kv_quant(k, v) -> (k, v)`: fake-quantizes K and V before attention      (evaluation)
    """

    def __init__(self, args: ModelArgs):
        super().__init__()
        D, hd = args.dim, args.head_dim
        self.args = args
        self.attn_norm = RMSNorm(D, args.norm_eps)
        self.q = nn.Linear(D, args.n_heads * hd, bias=args.qkv_bias)
        self.k = nn.Linear(D, args.n_kv_heads * hd, bias=args.qkv_bias)
        self.v = nn.Linear(D, args.n_kv_heads * hd, bias=args.qkv_bias)
        self.o = nn.Linear(args.n_heads * hd, D, bias=args.o_bias)
        self.mlp_norm = RMSNorm(D, args.norm_eps)
        self.gate = nn.Linear(D, args.hidden_dim, bias=False)
        self.up = nn.Linear(D, args.hidden_dim, bias=False)
        self.down = nn.Linear(args.hidden_dim, D, bias=False)
        self.kv_observer: Optional[Callable] = None
        self.kv_quant: Optional[Callable] = None

    def attention(self, h, cos, sin):
        B, T, _ = h.shape
        a = self.args
        q = self.q(h).view(B, T, a.n_heads, a.head_dim).transpose(1, 2)      # (B, nh, T, hd)
        k = self.k(h).view(B, T, a.n_kv_heads, a.head_dim).transpose(1, 2)   # (B, nkv, T, hd)
        v = self.v(h).view(B, T, a.n_kv_heads, a.head_dim).transpose(1, 2)   # (B, nkv, T, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.kv_observer is not None:
            self.kv_observer(k, v)
        if self.kv_quant is not None:
            k, v = self.kv_quant(k, v)
        rep = a.n_heads // a.n_kv_heads
        if rep > 1:
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)          # (B, nh, T, hd)
        return self.o(y.transpose(1, 2).reshape(B, T, a.n_heads * a.head_dim))

    def mlp(self, h):
        return self.down(F.silu(self.gate(h)) * self.up(h))

    def forward(self, x, cos, sin):
        x = x + self.attention(self.attn_norm(x), cos, sin)
        return x + self.mlp(self.mlp_norm(x))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.embed = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(Block(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.lm_head = None if args.tie_embeddings else nn.Linear(args.dim, args.vocab_size, bias=False)

    def output(self, x):
        x = self.norm(x)
        w = self.embed.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(x, w)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        B, T = tokens.shape
        cos, sin = rope_cos_sin(self.args, torch.arange(T, device=tokens.device))
        x = self.embed(tokens)                                                 # (B, T, D)
        for layer in self.layers:
            x = layer(x, cos, sin)
        return self.output(x)                                                  # (B, T, V)


@contextlib.contextmanager
def no_weight_init():
    """Skip torch.nn.init in module constructors whose weights are loaded next. On the meta device the
    random init is useless and costs ~3 s per process (torch imports its compiler stack for it)."""
    names = ("normal_", "uniform_", "kaiming_uniform_", "kaiming_normal_", "trunc_normal_", "xavier_uniform_")
    saved = {n: getattr(nn.init, n) for n in names}
    for n in names:
        setattr(nn.init, n, lambda t, *a, **k: t)
    try:
        yield
    finally:
        for n, f in saved.items():
            setattr(nn.init, n, f)


def build_model(args: ModelArgs, tensors: dict[str, torch.Tensor], device="cpu", dtype=None) -> Transformer:
    """A Transformer holding `tensors` (canonical names); missing or unexpected names are an error."""
    dtype = dtype or next(iter(tensors.values())).dtype
    with torch.device("meta"), no_weight_init():
        model = Transformer(args)
    model = model.to_empty(device=device).to(dtype)
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    if unexpected:
        raise ValueError(f"unexpected tensors {unexpected[:5]} for a {args.arch} model with {args.n_layers} layers")
    if missing:
        raise ValueError(f"missing tensors {missing[:5]} for a {args.arch} model with {args.n_layers} layers")
    return model.eval()
