"""Architecture adapters: checkpoint tensor names and configs -> canonical names and ModelArgs.

Every architecture difference lives in the ADAPTERS table (and in conf/model), never in
isinstance chains inside the algorithms. An adapter gives:
  hf_archs   - the `architectures` / `model_type` values of a config.json that select it
  names      - regex -> canonical name template for 1:1 tensors
  qkv_bias, o_bias - bias layout
  split      - optional function for packed tensors (internlm2 `wqkv`)
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from .llama import ModelArgs

_LLAMA_NAMES = {
    r"model\.embed_tokens\.weight": "embed.weight",
    r"model\.norm\.weight": "norm.weight",
    r"lm_head\.weight": "lm_head.weight",
    r"model\.layers\.(\d+)\.input_layernorm\.weight": "layers.{0}.attn_norm.weight",
    r"model\.layers\.(\d+)\.post_attention_layernorm\.weight": "layers.{0}.mlp_norm.weight",
    r"model\.layers\.(\d+)\.self_attn\.(q|k|v|o)_proj\.(weight|bias)": "layers.{0}.{1}.{2}",
    r"model\.layers\.(\d+)\.mlp\.(gate|up|down)_proj\.weight": "layers.{0}.{1}.weight",
}

_INTERNLM2_NAMES = {
    r"model\.tok_embeddings\.weight": "embed.weight",
    r"model\.norm\.weight": "norm.weight",
    r"output\.weight": "lm_head.weight",
    r"model\.layers\.(\d+)\.attention_norm\.weight": "layers.{0}.attn_norm.weight",
    r"model\.layers\.(\d+)\.ffn_norm\.weight": "layers.{0}.mlp_norm.weight",
    r"model\.layers\.(\d+)\.attention\.wo\.weight": "layers.{0}.o.weight",
    r"model\.layers\.(\d+)\.feed_forward\.w1\.weight": "layers.{0}.gate.weight",
    r"model\.layers\.(\d+)\.feed_forward\.w3\.weight": "layers.{0}.up.weight",
    r"model\.layers\.(\d+)\.feed_forward\.w2\.weight": "layers.{0}.down.weight",
}

# llama.cpp's GGUF names (llama arch); q/k rows are permuted by its converter, see gguf_source.py
GGUF_NAMES = {
    r"token_embd\.weight": "embed.weight",
    r"output_norm\.weight": "norm.weight",
    r"output\.weight": "lm_head.weight",
    r"blk\.(\d+)\.attn_norm\.weight": "layers.{0}.attn_norm.weight",
    r"blk\.(\d+)\.ffn_norm\.weight": "layers.{0}.mlp_norm.weight",
    r"blk\.(\d+)\.attn_(q|k|v)\.(weight|bias)": "layers.{0}.{1}.{2}",
    r"blk\.(\d+)\.attn_output\.(weight|bias)": "layers.{0}.o.{1}",
    r"blk\.(\d+)\.ffn_(gate|up|down)\.weight": "layers.{0}.{1}.weight",
}


def split_internlm2_wqkv(name: str, w: torch.Tensor, args: ModelArgs) -> dict[str, torch.Tensor]:
    """internlm2 packs q, k, v per KV group: rows ((nkv, nh/nkv + 2, hd), D)."""
    m = re.fullmatch(r"model\.layers\.(\d+)\.attention\.wqkv\.weight", name)
    if not m:
        return {}
    i, rep, hd = m.group(1), args.n_heads // args.n_kv_heads, args.head_dim
    g = w.view(args.n_kv_heads, rep + 2, hd, w.shape[-1])
    return {
        f"layers.{i}.q.weight": g[:, :rep].reshape(-1, w.shape[-1]).clone(),
        f"layers.{i}.k.weight": g[:, rep].reshape(-1, w.shape[-1]).clone(),
        f"layers.{i}.v.weight": g[:, rep + 1].reshape(-1, w.shape[-1]).clone(),
    }


def pack_internlm2_wqkv(q, k, v, args: ModelArgs) -> torch.Tensor:
    """Inverse of split_internlm2_wqkv (used to build internlm2 test checkpoints)."""
    rep, hd, D = args.n_heads // args.n_kv_heads, args.head_dim, q.shape[-1]
    g = torch.cat([q.view(args.n_kv_heads, rep, hd, D), k.view(args.n_kv_heads, 1, hd, D),
                   v.view(args.n_kv_heads, 1, hd, D)], dim=1)
    return g.reshape(-1, D)


@dataclass(frozen=True)
class Adapter:
    name: str
    hf_archs: tuple[str, ...]
    names: dict
    qkv_bias: bool = False
    o_bias: bool = False
    split: Optional[Callable] = None
    hf_config_keys: dict = field(default_factory=dict)  # our field -> alternative config.json key


ADAPTERS: dict[str, Adapter] = {
    "llama": Adapter("llama", ("LlamaForCausalLM", "llama"), _LLAMA_NAMES),
    "mistral": Adapter("mistral", ("MistralForCausalLM", "mistral"), _LLAMA_NAMES),
    "qwen2": Adapter("qwen2", ("Qwen2ForCausalLM", "qwen2"), _LLAMA_NAMES, qkv_bias=True),
    "internlm": Adapter("internlm", ("InternLMForCausalLM", "internlm"), _LLAMA_NAMES, qkv_bias=True, o_bias=True),
    "internlm2": Adapter("internlm2", ("InternLM2ForCausalLM", "internlm2"), _INTERNLM2_NAMES,
                         split=split_internlm2_wqkv),
}


def adapter_for_hf_config(cfg: dict, where: str = "config.json") -> Adapter:
    archs = list(cfg.get("architectures") or []) + [cfg.get("model_type")]
    for ad in ADAPTERS.values():
        if any(a in ad.hf_archs for a in archs if a):
            return ad
    raise ValueError(
        f"unsupported architecture {archs} in {where}; supported: "
        + ", ".join(f"{k} ({ad.hf_archs[0]})" for k, ad in ADAPTERS.items()))


def args_from_hf_config(cfg: dict, ad: Adapter) -> ModelArgs:
    D, nh = cfg["hidden_size"], cfg["num_attention_heads"]
    eos = cfg.get("eos_token_id", 2)
    bias = cfg.get("bias", cfg.get("attention_bias", None))
    rope = dict(cfg.get("rope_parameters") or {})  # transformers >= 5 keeps rope settings here
    theta = cfg.get("rope_theta", rope.pop("rope_theta", 10000.0))
    scaling = cfg.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)  # internlm v1: `bias`; llama: `attention_bias`
    return ModelArgs(
        arch=ad.name, dim=D, n_layers=cfg["num_hidden_layers"], n_heads=nh,
        n_kv_heads=cfg.get("num_key_value_heads") or nh,
        head_dim=cfg.get("head_dim") or D // nh,
        hidden_dim=cfg["intermediate_size"], vocab_size=cfg["vocab_size"],
        norm_eps=cfg.get("rms_norm_eps", 1e-6), rope_theta=float(theta), rope_scaling=scaling,
        max_seq_len=cfg.get("max_position_embeddings", 4096),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        qkv_bias=ad.qkv_bias if bias is None else bool(bias),
        o_bias=ad.o_bias if bias is None else bool(bias) and ad.name != "qwen2",
        bos_token_id=cfg.get("bos_token_id"), eos_token_id=eos,
    )


def rename(name: str, table: dict) -> Optional[str]:
    for pat, tpl in table.items():
        m = re.fullmatch(pat, name)
        if m:
            return tpl.format(*m.groups())
    return None


def to_canonical(tensors: dict[str, torch.Tensor], ad: Adapter, args: ModelArgs) -> dict[str, torch.Tensor]:
    """Map a checkpoint's tensors to canonical names; unknown tensors are an error, rotary buffers are dropped."""
    out, unknown = {}, []
    for name, t in tensors.items():
        if "rotary_emb" in name:
            continue
        new = rename(name, ad.names)
        if new is not None:
            out[new] = t
            continue
        parts = ad.split(name, t, args) if ad.split else {}
        if parts:
            out.update(parts)
        else:
            unknown.append(name)
    if unknown:
        raise ValueError(f"{len(unknown)} tensors of this {ad.name} checkpoint have no canonical name, "
                         f"e.g. {unknown[:3]}")
    if args.tie_embeddings:
        out.pop("lm_head.weight", None)
    return out
