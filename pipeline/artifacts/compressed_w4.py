"""Our int4 weights as a compressed-tensors W4A16 checkpoint (format pack-quantized), the layout llm-compressor
writes and vLLM serves: the export_ct stage's artifact (`pipeline.targets=[export_ct]`).

    write_compressed_w4(pack_dir, out)     # a pack artifact (AWQ / RTN ...) -> a compressed-tensors folder
    python -m pipeline.artifacts.compressed_w4 <pack artifact folder> <out folder>

Layout (Hugging Face Llama/Qwen2 names, pipeline/quant/w8.py's hf_name):
    model.safetensors   per linear `weight_packed` (N, K/8) int32 (codes - 8 as signed 4-bit, packed along K by
                        compressed-tensors' pack_to_int32), `weight_scale` (N, K/g) fp16, `weight_shape` [N, K],
                        asymmetric only: `weight_zero_point` (N/8, K/g) int32 (zeros - 8, packed along N);
                        biases, norms (AWQ scales folded in), embeddings, lm_head as they are
    config.json         transformers config + quantization_config: one config group, weights {num_bits 4,
                        type int, symmetric = not zero_point, strategy group, group_size}, lm_head ignored
    tokenizer files     the pack artifact's tokenizer, at the top level (AutoTokenizer.from_pretrained(out))
Our codes q in 0..15 with zeros z: (q - z) * s == ((q - 8) - (z - 8)) * s, what compressed-tensors dequantizes.
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch

from ..cache import save_safetensors
from ..models.llama import ModelArgs
from ..quant.blockwise import LINEARS
from ..quant.w8 import hf_config, hf_name
from .packed_w4 import read_dense, read_unpacked


def scheme(group_size: int, symmetric: bool):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    return QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(
        num_bits=4, type="int", symmetric=symmetric, strategy="group", group_size=group_size))


def compress_linear(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, symmetric: bool) -> dict:
    """Quantizer format (q (N, K) uint8, scales/zeros (K/g, N)) -> compressed-tensors' tensors of one linear."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
    t = {"weight_packed": pack_to_int32((q.to(torch.int16) - 8).to(torch.int8), 4),
         "weight_scale": scales.T.half().contiguous(), "weight_shape": torch.tensor(q.shape)}
    if not symmetric:
        t["weight_zero_point"] = pack_to_int32((zeros.T.to(torch.int16) - 8).to(torch.int8), 4, packed_dim=0)
    return t


def write_compressed_w4(pack_dir: Path, out: Path) -> dict:
    """A pack artifact -> a compressed-tensors W4A16 folder at `out`; returns its quantization_config."""
    from compressed_tensors.quantization import QuantizationConfig
    pack_dir, out = Path(pack_dir), Path(out)
    cfg = json.loads((pack_dir / "config.json").read_text())     # ModelArgs + quantization_config
    qc = cfg.pop("quantization_config")
    args = ModelArgs.from_dict(cfg)
    if qc["bits"] != 4:
        raise ValueError(f"pack artifact {pack_dir} holds {qc['bits']}-bit weights; compressed-tensors W4A16 "
                         "export needs quant.w_bits=4")
    sym = not qc["zero_point"]
    tensors = {hf_name(k): v for k, v in read_dense(pack_dir).items()}
    for i in range(args.n_layers):
        for n in LINEARS:
            base = hf_name(f"layers.{i}.{n}.weight")[: -len(".weight")]
            parts = compress_linear(*read_unpacked(pack_dir, f"layers.{i}.{n}"), symmetric=sym)
            tensors.update({f"{base}.{p}": t for p, t in parts.items()})
    out.mkdir(parents=True, exist_ok=True)
    save_safetensors(tensors, out / "model.safetensors", metadata={"format": "pt"})
    config = QuantizationConfig(config_groups={"group_0": scheme(qc["group_size"], sym)}, format="pack-quantized",
                                quantization_status="compressed", ignore=["lm_head"]).model_dump(mode="json")
    (out / "config.json").write_text(json.dumps(hf_config(args) | {"quantization_config": config}, indent=2))
    shutil.copytree(pack_dir / "tokenizer", out, dirs_exist_ok=True)
    return config


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    print(json.dumps(write_compressed_w4(Path(sys.argv[1]), Path(sys.argv[2]))))
