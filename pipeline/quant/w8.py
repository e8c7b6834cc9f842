"""W8A8 pieces shared by quant_w8, evaluate and the engine: the weight quantizer, the linear, the names.

    q, s = quantize_w8(w)                      # w (N, K) -> q (N, K) int8, s (N,) fp32: w ~= q * s[:, None]
    lin = W8A8Linear(q, s, bias)               # forward: dynamic per-token int8 x, int8 GEMM, x's dtype out
    w = W8Weight(q, s)                         # the workspace's / engine's int8 linear (a NamedTuple)
    y = w8a8_linear(x, w, bias)                # what W8A8Linear.forward runs
    hf = hf_name("layers.3.q.weight")          # "model.layers.3.self_attn.q_proj.weight" (Llama/Qwen2 names)
    cfg = hf_config(args)                      # a transformers config.json for the reference ModelArgs
    qc = compressed_tensors_config()           # quantization_config of an int8 W8A8 compressed-tensors checkpoint

The checkpoint layout is what vLLM's CompressedTensorsW8A8Int8 scheme and llm-compressor's W8A8 (INT8,
dynamic per-token activations) recipe produce: per linear `<name>.weight` int8 (N, K) and
`<name>.weight_scale` (N, 1), symmetric (no zero point), config_groups.group_0 with weights
{num_bits 8, type int, symmetric, strategy channel} and input_activations {num_bits 8, type int,
symmetric, strategy token, dynamic true}, format "int-quantized", lm_head ignored.
"""
from __future__ import annotations

import re
from typing import NamedTuple

import torch
from torch import nn

from ..kernels.int8_gemm import int8_linear
from ..kernels.quant_act import quantize_per_token

QMAX = 127


def quantize_w8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per output channel symmetric int8: s = max|w_n| / 127, q = round(w / s) in [-127, 127]."""
    if w.dim() != 2:
        raise ValueError(f"weight must be 2-D (N, K), got shape {tuple(w.shape)}")
    wf = w.float()
    s = wf.abs().amax(1).clamp_min(1e-8) / QMAX  # (N,)
    q = torch.round(wf / s[:, None]).clamp(-QMAX, QMAX).to(torch.int8)
    return q, s


class W8Weight(NamedTuple):
    """An int8 linear as the workspace stores it and the engine runs it."""
    qweight: torch.Tensor   # (N, K) int8, K contiguous
    scales: torch.Tensor    # (N,) per output channel (fp16 as quant_w8 writes it)


def w8a8_linear(x: torch.Tensor, w: W8Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Dynamic per-token int8 quantization of x (..., K), then the int8 GEMM with both scales in its
    epilogue: (..., N) in x's dtype."""
    xq, xs = quantize_per_token(x)  # (..., K) int8, (...) fp32
    return int8_linear(xq, xs, w.qweight, w.scales, bias, out_dtype=x.dtype)


class W8A8Linear(nn.Module):
    """y = int8_gemm(quantize_per_token(x), weight) * scales (+ bias); weight int8 (N, K), weight_scale (N,)."""

    def __init__(self, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        if weight.dtype != torch.int8 or weight.dim() != 2:
            raise ValueError(f"weight must be int8 (N, K), got {weight.dtype} {tuple(weight.shape)}")
        self.weight = nn.Parameter(weight.contiguous(), requires_grad=False)
        self.weight_scale = nn.Parameter(weight_scale.reshape(-1).contiguous(), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.out_features, self.in_features = weight.shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return w8a8_linear(x, W8Weight(self.weight, self.weight_scale), self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


# canonical name -> Hugging Face Llama/Qwen2 name
_HF_NAMES = [
    (r"embed\.weight", "model.embed_tokens.weight"),
    (r"norm\.weight", "model.norm.weight"),
    (r"lm_head\.weight", "lm_head.weight"),
    (r"layers\.(\d+)\.attn_norm\.weight", "model.layers.{0}.input_layernorm.weight"),
    (r"layers\.(\d+)\.mlp_norm\.weight", "model.layers.{0}.post_attention_layernorm.weight"),
    (r"layers\.(\d+)\.(q|k|v|o)\.(\w+)", "model.layers.{0}.self_attn.{1}_proj.{2}"),
    (r"layers\.(\d+)\.(gate|up|down)\.(\w+)", "model.layers.{0}.mlp.{1}_proj.{2}"),
]


def hf_name(canonical: str) -> str:
    for pat, tmpl in _HF_NAMES:
        m = re.fullmatch(pat, canonical)
        if m:
            return tmpl.format(*m.groups())
    raise ValueError(f"no Hugging Face name for canonical tensor {canonical!r}")


def hf_config(args) -> dict:
    """transformers config for the reference ModelArgs (Qwen2 when q/k/v have biases and o has none)."""
    qwen2 = args.qkv_bias and not args.o_bias
    cfg = {"architectures": ["Qwen2ForCausalLM" if qwen2 else "LlamaForCausalLM"],
           "model_type": "qwen2" if qwen2 else "llama",
           "hidden_size": args.dim, "intermediate_size": args.hidden_dim, "num_hidden_layers": args.n_layers,
           "num_attention_heads": args.n_heads, "num_key_value_heads": args.n_kv_heads,
           "head_dim": args.head_dim, "rms_norm_eps": args.norm_eps, "rope_theta": args.rope_theta,
           "rope_scaling": args.rope_scaling, "max_position_embeddings": args.max_seq_len,
           "vocab_size": args.vocab_size, "tie_word_embeddings": args.tie_embeddings,
           "hidden_act": "silu", "torch_dtype": "float16"}
    if not qwen2:
        cfg["attention_bias"] = bool(args.qkv_bias)
    for k in ("bos_token_id", "eos_token_id"):
        if getattr(args, k, None) is not None:
            cfg[k] = getattr(args, k)
    return cfg


def compressed_tensors_config() -> dict:
    act = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token", "dynamic": True,
           "group_size": None, "block_structure": None, "actorder": None, "observer": None, "observer_kwargs": {}}
    wgt = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel", "dynamic": False,
           "group_size": None, "block_structure": None, "actorder": None, "observer": "minmax",
           "observer_kwargs": {}}
    return {"quant_method": "compressed-tensors", "format": "int-quantized", "quantization_status": "compressed",
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": wgt, "input_activations": act,
                                          "output_activations": None}},
            "ignore": ["lm_head"], "kv_cache_scheme": None}
