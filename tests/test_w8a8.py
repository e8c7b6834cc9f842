"""W8A8 SmoothQuant stages: the scale formula, GQA sharing, folding exactness, the weight quantizer, the
compressed-tensors checkpoint layout, and the pipeline end to end on the tiny model (alpha changes the
smooth and quant_w8 keys, not calibrate's)."""
import json

import pytest
import torch
from safetensors import safe_open

from pipeline.models.llama import Block, ModelArgs, rope_cos_sin
from pipeline.quant import awq
from pipeline.quant.w8 import W8A8Linear, hf_name, quantize_w8
from pipeline.quant.smooth import group_shared, layer_scales, smooth_scale

from test_quant_stages import TINY, statuses

ARGS = ModelArgs(dim=64, n_layers=1, n_heads=4, n_kv_heads=2, head_dim=16, hidden_dim=96)


def test_smooth_scale_formula_and_alpha_zero():
    x = torch.tensor([4.0, 0.25, 9.0])
    w = torch.tensor([1.0, 4.0, 0.01])
    torch.testing.assert_close(smooth_scale(x, w, 0.5), x.sqrt() / w.sqrt())
    torch.testing.assert_close(smooth_scale(x, w, 0.8), x.pow(0.8) / w.pow(0.2))
    assert torch.equal(smooth_scale(x, w, 0.0), torch.ones(3))
    with pytest.raises(ValueError, match="smooth_alpha=1.5"):
        smooth_scale(x, w, 1.5)


def test_layer_scales_share_o_per_kv_group_and_balance_ranges():
    torch.manual_seed(0)
    block = Block(ARGS)
    w = {f"layers.0.{k}": v for k, v in block.state_dict().items()}
    stats = {f"layers.0.{g}.absmax": torch.rand(n) * 10 + 0.1
             for g, n in (("qkv", 64), ("o", 64), ("gate_up", 64), ("down", 96))}
    stats["layers.0.qkv.absmax"][5] = 300.0  # an outlier channel
    s = layer_scales(stats, w, 0, ARGS, 0.5)
    o = s["o"].reshape(ARGS.n_kv_heads, 2, ARGS.head_dim)
    assert torch.equal(o[:, 0], o[:, 1]), "query heads of one KV group must share the o scales"
    torch.testing.assert_close(group_shared(torch.arange(64.0), ARGS).reshape(2, 2, 16)[:, 0],
                               torch.arange(64.0).reshape(2, 2, 16)[:, 1])
    # after smoothing, the channel's activation range equals its weight range (alpha 0.5)
    xq = stats["layers.0.qkv.absmax"] / s["qkv"]
    wq = torch.stack([w[f"layers.0.{n}.weight"].abs().amax(0) for n in "qkv"]).amax(0) * s["qkv"]
    torch.testing.assert_close(xq, wq)
    assert xq.max() / xq.median() < stats["layers.0.qkv.absmax"].max() / stats["layers.0.qkv.absmax"].median()


def test_folding_smooth_scales_is_exact():
    torch.manual_seed(1)
    block = Block(ARGS).double().eval()
    t = {f"layers.0.{k}": v.clone() for k, v in block.state_dict().items()}
    stats = {f"layers.0.{g}.absmax": torch.rand(n).double() * 5 + 0.1
             for g, n in (("qkv", 64), ("o", 64), ("gate_up", 64), ("down", 96))}
    res = {f"layers.0.{g}.scale": v for g, v in layer_scales(stats, t, 0, ARGS, 0.5).items()}
    t = awq.apply(t, 0, res, ARGS)
    block2 = Block(ARGS).double().eval()
    block2.load_state_dict({k[len("layers.0."):]: v for k, v in t.items()})
    x = torch.randn(2, 8, 64).double()
    cos, sin = rope_cos_sin(ARGS, torch.arange(8))
    torch.testing.assert_close(block2(x, cos.double(), sin.double()), block(x, cos.double(), sin.double()))


def test_quantize_w8_and_linear():
    torch.manual_seed(3)
    w = torch.randn(24, 40)
    q, s = quantize_w8(w)
    assert q.dtype == torch.int8 and s.shape == (24,) and q.abs().max() <= 127
    assert (q.abs().amax(1) == 127).all(), "the largest weight of every row maps to +-127"
    assert ((q.float() * s[:, None] - w).abs() <= s[:, None] / 2 + 1e-6).all()
    lin = W8A8Linear(q, s.half(), torch.randn(24))
    x = torch.randn(3, 5, 40)
    y = lin(x)
    ref = x @ (q.float() * s.half().float()[:, None]).T + lin.bias
    assert y.shape == (3, 5, 24) and y.dtype == torch.float32
    assert ((y - ref).norm() / ref.norm()) < 2e-2  # per-token int8 activations
    with pytest.raises(ValueError, match="int8"):
        W8A8Linear(w, s)


def test_w8a8_pipeline_and_compressed_tensors_layout(cli):
    run1, run2 = cli.tmp / "r1", cli.tmp / "r2"
    cli(*TINY, "quant=w8a8_kv8", f"hydra.run.dir={run1}")
    st = statuses(run1)
    assert st == {"load": "ran", "calibrate": "ran", "smooth": "ran", "quant_w8": "ran", "evaluate": "ran"}
    d = next((cli.tmp / "cache" / "quant_w8").glob("[0-9a-f]*"))
    cfg = json.loads((d / "config.json").read_text())
    qc = cfg["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "int-quantized"
    assert qc["quantization_status"] == "compressed" and "lm_head" in qc["ignore"]
    g = qc["config_groups"]["group_0"]
    assert g["targets"] == ["Linear"] and g["output_activations"] is None
    assert {k: g["weights"][k] for k in ("num_bits", "type", "symmetric", "strategy", "dynamic")} == \
        {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel", "dynamic": False}
    assert {k: g["input_activations"][k] for k in ("num_bits", "type", "symmetric", "strategy", "dynamic")} == \
        {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token", "dynamic": True}
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["num_key_value_heads"] == 2
    with safe_open(str(d / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
        w = f.get_tensor("model.layers.0.self_attn.q_proj.weight")
        s = f.get_tensor("model.layers.0.self_attn.q_proj.weight_scale")
        assert w.dtype == torch.int8 and s.shape == (w.shape[0], 1) and s.dtype == torch.float16
        assert f.get_tensor("model.layers.1.mlp.down_proj.weight").dtype == torch.int8
        assert f.get_tensor("model.layers.0.input_layernorm.weight").is_floating_point()
    assert hf_name("layers.1.o.weight_scale") in keys and "model.embed_tokens.weight" in keys
    assert not any(k.endswith("weight_zero_point") for k in keys)  # symmetric
    assert (d / "kv_qparams.safetensors").exists() and (d / "tokenizer").is_dir()
    ppl = json.loads(next((cli.tmp / "cache" / "evaluate").glob("[0-9a-f]*/eval.json")).read_text())["ppl"]
    assert ppl == ppl and ppl < 1e4
    cli(*TINY, "quant=w8a8_kv8", "quant.smooth_alpha=0.8", f"hydra.run.dir={run2}")
    assert statuses(run2) == {"load": "cached", "calibrate": "cached", "smooth": "ran", "quant_w8": "ran",
                              "evaluate": "ran"}
