"""Our AWQ/RTN int4 weights exported as compressed-tensors W4A16 (the export_ct stage):
compressed-tensors' own decompressor gives back exactly the weights our pack artifact dequantizes to, and
our pre-quantized reader serves the same codes."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import compose
from pipeline.artifacts.compressed_w4 import compress_linear, scheme
from pipeline.artifacts.packed_w4 import read_unpacked
from pipeline.models.prequant import read_quantized
from pipeline.quant.w4 import dequantize, quantize


def decompress(parts: dict, group: int, symmetric: bool) -> torch.Tensor:
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    parts = {**parts, "weight_scale": parts["weight_scale"].float()}
    return PackedQuantizationCompressor.decompress(parts, scheme(group, symmetric))["weight"]


@pytest.mark.parametrize("symmetric", [True, False])
def test_compress_linear_decompresses_to_our_dequantized_weight(symmetric):
    w = torch.randn(48, 128, generator=torch.Generator().manual_seed(0))
    q, s, z = quantize(w, 4, 32, zero_point=not symmetric)
    parts = compress_linear(q, s, z, symmetric)
    assert ("weight_zero_point" in parts) == (not symmetric)
    assert torch.equal(decompress(parts, 32, symmetric), dequantize(q, s, z, 32))


def test_export_ct_stage_writes_a_compressed_tensors_checkpoint(cli):
    cli("model=tiny-random", "pipeline.targets=[export_ct]", "quant=w4a16_rtn", "quant.group_size=32")
    (pack,) = [p for p in (cli.tmp / "cache" / "pack").glob("[0-9a-f]*") if p.is_dir()]
    (ct,) = [p for p in (cli.tmp / "cache" / "export_ct").glob("[0-9a-f]*") if p.is_dir()]
    qc = json.loads((ct / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    assert qc["config_groups"]["group_0"]["weights"]["group_size"] == 32 and qc["ignore"] == ["lm_head"]
    from safetensors.torch import load_file
    t = load_file(str(ct / "model.safetensors"))
    base = "model.layers.1.mlp.down_proj"
    parts = {k[len(base) + 1:]: v for k, v in t.items() if k.startswith(base + ".")}
    q, s, z = read_unpacked(pack, "layers.1.down")
    sym = qc["config_groups"]["group_0"]["weights"]["symmetric"]
    assert torch.equal(decompress(parts, 32, sym), dequantize(q, s, z, 32))
    ck = read_quantized(ct)                                    # and served back as the same codes
    assert ck.method == "compressed-tensors" and ck.group_size == 32
    for name, (q2, s2, z2) in ck.w4.items():
        q1, s1, z1 = read_unpacked(pack, name)
        assert torch.equal(q1, q2) and torch.equal(s1, s2) and torch.equal(z1, z2)
    assert (ct / "tokenizer.json").exists()


def test_export_ct_refuses_a_config_without_int4_weights():
    with pytest.raises(ValueError, match=r"export_ct exports 4-bit pack artifacts.*quant=w8a8"):
        compose("model=tiny-random", "quant=w8a8", "pipeline.targets=[export_ct]")


@pytest.mark.slow
def test_transformers_loads_the_symmetric_export_with_our_logits(cli):
    """transformers (its compressed-tensors integration) loads the exported folder and computes our logits.
    Symmetric only: transformers cannot load asymmetric pack-quantized checkpoints yet (their packed zero
    points; vllm-project/llm-compressor#1618), which vLLM serves."""
    from transformers import AutoModelForCausalLM

    from pipeline.artifacts.packed_w4 import apply_packed
    from pipeline.models.store import read_model
    cli("model=tiny-random", "pipeline.targets=[export_ct]", "quant=w4a16_rtn", "quant.group_size=32",
        "quant.zero_point=false")
    (pack,) = [p for p in (cli.tmp / "cache" / "pack").glob("[0-9a-f]*") if p.is_dir()]
    (ct,) = [p for p in (cli.tmp / "cache" / "export_ct").glob("[0-9a-f]*") if p.is_dir()]
    (load,) = [p.parent for p in (cli.tmp / "cache" / "load").glob("*/model.safetensors")]
    hf = AutoModelForCausalLM.from_pretrained(str(ct), dtype=torch.float32)
    ref = read_model(load)
    apply_packed(ref, pack)
    ids = torch.tensor([[5, 17, 99, 3, 250, 41]])
    with torch.no_grad():
        lt, lr = hf(ids).logits[0], ref(ids)[0]
    assert (lt - lr).abs().max() <= 1e-5 * lr.abs().max()
