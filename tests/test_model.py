"""The reference decoder matches transformers: the real SmolLM2 and tiny random checkpoints of each family."""
from __future__ import annotations

import json

import pytest
import torch

from pipeline.models.adapters import pack_internlm2_wqkv
from pipeline.models.llama import build_model
from pipeline.models.sources import load_gguf, load_hf_folder

transformers = pytest.importorskip("transformers")


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_smollm2_matches_transformers(smollm2_gguf):
    args, tensors, _ = load_gguf(smollm2_gguf)
    ours = build_model(args, tensors)
    ref = transformers.AutoModelForCausalLM.from_pretrained(
        str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name, dtype=torch.float32).eval()
    tokens = torch.randint(0, args.vocab_size, (2, 41))
    with torch.no_grad():
        assert rel_err(ours(tokens), ref(tokens).logits) < 1e-4


def _tiny(cls_name: str, **extra):
    cfg_cls = getattr(transformers, cls_name)
    return cfg_cls(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                   tie_word_embeddings=False, **extra)


@pytest.mark.parametrize("cfg_name,model_name,extra", [
    ("LlamaConfig", "LlamaForCausalLM", {}),
    ("LlamaConfig", "LlamaForCausalLM", {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}),
    ("MistralConfig", "MistralForCausalLM", {}),
    ("Qwen2Config", "Qwen2ForCausalLM", {}),
])
def test_hf_families_match_transformers(tmp_path, cfg_name, model_name, extra):
    torch.manual_seed(0)
    hf = getattr(transformers, model_name)(_tiny(cfg_name, **extra)).eval()
    with torch.no_grad():  # random biases so that a dropped bias would show
        for n, p in hf.named_parameters():
            if n.endswith("bias"):
                p.normal_()
    hf.save_pretrained(tmp_path)
    args, tensors, _ = load_hf_folder(tmp_path)
    ours = build_model(args, tensors)
    tokens = torch.randint(0, 128, (2, 23))
    with torch.no_grad():
        assert rel_err(ours(tokens), hf(tokens).logits) < 1e-5


def _llama_with_bias(bias: bool):
    torch.manual_seed(1)
    hf = transformers.LlamaForCausalLM(_tiny("LlamaConfig", attention_bias=bias)).eval()
    with torch.no_grad():
        for n, p in hf.named_parameters():
            if n.endswith("bias"):
                p.normal_()
    return hf


def test_internlm_v1_tensor_names(tmp_path):
    """InternLM (v1) = llama names with q/k/v/o biases and `bias: true` in its own config.json."""
    from safetensors.torch import save_file
    hf = _llama_with_bias(True)
    save_file({k: v.contiguous() for k, v in hf.state_dict().items()}, tmp_path / "model.safetensors")
    c = hf.config
    (tmp_path / "config.json").write_text(json.dumps({
        "architectures": ["InternLMForCausalLM"], "model_type": "internlm", "bias": True,
        "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_hidden_layers, "num_attention_heads": c.num_attention_heads,
        "num_key_value_heads": c.num_key_value_heads, "vocab_size": c.vocab_size, "rms_norm_eps": c.rms_norm_eps,
        "rope_theta": 10000.0, "max_position_embeddings": 256, "tie_word_embeddings": False}))
    args, tensors, _ = load_hf_folder(tmp_path)
    assert args.arch == "internlm" and args.qkv_bias and args.o_bias
    tokens = torch.randint(0, 128, (2, 19))
    with torch.no_grad():
        assert rel_err(build_model(args, tensors)(tokens), hf(tokens).logits) < 1e-5


def test_internlm2_packed_wqkv(tmp_path):
    """InternLM2: tok_embeddings / attention.wqkv (packed per KV group) / feed_forward.w1,w3,w2 / output."""
    from safetensors.torch import save_file
    hf = _llama_with_bias(False)
    sd, c = hf.state_dict(), hf.config
    from pipeline.models.adapters import ADAPTERS, args_from_hf_config
    cfg = {"architectures": ["InternLM2ForCausalLM"], "model_type": "internlm2", "bias": False,
           "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
           "num_hidden_layers": c.num_hidden_layers, "num_attention_heads": c.num_attention_heads,
           "num_key_value_heads": c.num_key_value_heads, "vocab_size": c.vocab_size, "rms_norm_eps": c.rms_norm_eps,
           "rope_theta": 10000.0, "max_position_embeddings": 256, "tie_word_embeddings": False}
    margs = args_from_hf_config(cfg, ADAPTERS["internlm2"])
    out = {"model.tok_embeddings.weight": sd["model.embed_tokens.weight"], "model.norm.weight": sd["model.norm.weight"],
           "output.weight": sd["lm_head.weight"]}
    for i in range(c.num_hidden_layers):
        p, q = f"model.layers.{i}.", f"model.layers.{i}."
        out[q + "attention.wqkv.weight"] = pack_internlm2_wqkv(
            sd[p + "self_attn.q_proj.weight"], sd[p + "self_attn.k_proj.weight"], sd[p + "self_attn.v_proj.weight"], margs)
        out[q + "attention.wo.weight"] = sd[p + "self_attn.o_proj.weight"]
        out[q + "attention_norm.weight"] = sd[p + "input_layernorm.weight"]
        out[q + "ffn_norm.weight"] = sd[p + "post_attention_layernorm.weight"]
        out[q + "feed_forward.w1.weight"] = sd[p + "mlp.gate_proj.weight"]
        out[q + "feed_forward.w3.weight"] = sd[p + "mlp.up_proj.weight"]
        out[q + "feed_forward.w2.weight"] = sd[p + "mlp.down_proj.weight"]
    save_file({k: v.contiguous() for k, v in out.items()}, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    args, tensors, _ = load_hf_folder(tmp_path)
    assert args.arch == "internlm2"
    tokens = torch.randint(0, 128, (2, 19))
    with torch.no_grad():
        assert rel_err(build_model(args, tensors)(tokens), hf(tokens).logits) < 1e-5
