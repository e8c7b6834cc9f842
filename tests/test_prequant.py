"""Pre-quantized checkpoints served as they are: compressed-tensors W4A16 (written by compressed-tensors' own
compressor) and GPTQ (AutoGPTQ v1 / GPTQModel v2 layouts) folders of a tiny model -> workspace (the int4 codes
kept, groups regrouped exactly) and the load stage; the served logits match a dequantize-then-fp32 reference.

The GPTQ folders are written here following AutoGPTQ's documented packing (qweight: 8 codes per int32 along
the input dim K, nibble j = row 8i + j; qzeros: 8 per int32 along the outputs N, stored as zero - 1 in the v1
"gptq" checkpoint_format; scales (G, N); g_idx (K,)), because neither auto-gptq nor gptqmodel installs on a
CPU-only machine.
"""
from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import save_file

from hf_folders import TINY, hub_cache, write_hf_folder
from pipeline.engine import Engine
from pipeline.kernels.w4a16 import dequantize_w4, pack_w4
from pipeline.models.llama import build_model
from pipeline.quant.w8 import hf_name
from pipeline.workspace import from_hf_folder, read_config, reassemble

LINEAR = re.compile(r"layers\.\d+\.(q|k|v|o|gate|up|down)\.weight")


def write_quantized(d, quantize, qc: dict) -> dict:
    """tiny-random as a Hugging Face folder whose linears `quantize(w) -> ({part: tensor}, reference weight)`
    replaced, with quantization_config qc. Returns the reference: canonical tensors in fp32."""
    canon = write_hf_folder(d)
    hf, ref = {}, {k: v.float() for k, v in canon.items()}
    for k, w in canon.items():
        if not LINEAR.fullmatch(k):
            hf[hf_name(k)] = w
            continue
        parts, ref[k] = quantize(w)
        hf.update({f"{hf_name(k)[: -len('.weight')]}.{p}": t for p, t in parts.items()})
    save_file(hf, str(d / "model.safetensors"))
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps(cfg | ({"quantization_config": qc} if qc else {})))
    return ref


def write_compressed_tensors(d, strategy: str, group, symmetric: bool) -> dict:
    """Quantized and packed by compressed-tensors (W4A16, pack-quantized); the reference is each linear
    decompressed by compressed-tensors itself in fp32."""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor as CT
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme
    from compressed_tensors.quantization.utils import calculate_qparams
    qa = QuantizationArgs(num_bits=4, type="int", symmetric=symmetric, strategy=strategy, group_size=group)
    scheme = QuantizationScheme(targets=["Linear"], weights=qa)

    def quantize(w):
        N, K = w.shape
        wg = w.float().view(N, -1, group or K)
        s, z = calculate_qparams(wg.amin(-1), wg.amax(-1), qa)
        packed = CT.compress({"weight": w, "weight_scale": s.half(), "weight_zero_point": z}, scheme)
        return packed, CT.decompress({**packed, "weight_scale": packed["weight_scale"].float()}, scheme)["weight"]
    qc = QuantizationConfig(config_groups={"group_0": scheme}, format="pack-quantized",
                            quantization_status="compressed", ignore=["lm_head"]).model_dump(mode="json")
    return write_quantized(d, quantize, qc)


def gptq_pack(q: torch.Tensor, z: torch.Tensor, v1: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """q (N, K), z (G, N) integer -> (qweight (K/8, N), qzeros (G, N/8)) int32, AutoGPTQ's bit layout."""
    qt = q.T.to(torch.int64)
    qweight = torch.zeros(qt.shape[0] // 8, qt.shape[1], dtype=torch.int64)
    zs = (z.to(torch.int64) - int(v1)) & 0xF                   # v1 stores zero - 1
    qzeros = torch.zeros(zs.shape[0], zs.shape[1] // 8, dtype=torch.int64)
    for j in range(8):
        qweight |= qt[j::8] << (4 * j)
        qzeros |= zs[:, j::8] << (4 * j)
    as_i32 = lambda x: torch.where(x >= 2 ** 31, x - 2 ** 32, x).to(torch.int32)  # noqa: E731
    return as_i32(qweight), as_i32(qzeros)


def write_gptq(d, group: int, sym: bool, v1: bool, act_order=None) -> dict:
    """Random codes in the GPTQ layout; the reference is (q - z[g_idx]) * s[g_idx] in fp32."""
    gen = torch.Generator().manual_seed(3)

    def quantize(w):
        N, K = w.shape
        g = K if group == -1 else group
        G = -(-K // g)
        g_idx = torch.arange(K) // g
        if act_order == "scattered":                           # desc_act: a group's columns scattered over K
            g_idx = g_idx[torch.randperm(K, generator=gen)]
        q = torch.randint(0, 16, (N, K), generator=gen)
        z = torch.full((G, N), 8) if sym else torch.randint(1, 16, (G, N), generator=gen)
        s = (torch.rand(G, N, generator=gen) * 0.02 + 0.001).half()
        qweight, qzeros = gptq_pack(q, z, v1)
        parts = {"qweight": qweight, "qzeros": qzeros, "scales": s, "g_idx": g_idx.to(torch.int32)}
        return parts, (q - z[g_idx].T).float() * s.float()[g_idx].T
    qc = {"quant_method": "gptq", "bits": 4, "group_size": group, "sym": sym, "desc_act": bool(act_order),
          "checkpoint_format": "gptq" if v1 else "gptq_v2"}
    if v1 and sym:                 # older AutoGPTQ: quantize_config.json beside a config.json without it
        ref = write_quantized(d, quantize, {})
        (d / "quantize_config.json").write_text(json.dumps({k: v for k, v in qc.items() if k != "quant_method"}))
        return ref
    return write_quantized(d, quantize, qc)


def served_weights(ws) -> dict:
    """The workspace's linears as the kernels compute with them, dequantized in fp32."""
    _, back = reassemble(ws)
    g = read_config(ws)["group_size"]
    return {k + ".weight": dequantize_w4(pack_w4(*v, g)) if isinstance(v, tuple) else v.float()
            for k, v in back.items() if LINEAR.fullmatch(k + ".weight") or LINEAR.fullmatch(k)}


def assert_logits_match(ws, ref: dict) -> None:
    """The engine over the workspace vs the reference model (fp32 weights, the non-linears as served: fp16)."""
    model = build_model(TINY, {k: v if LINEAR.fullmatch(k) else v.half().float() for k, v in ref.items()})
    eng = Engine.from_workspace(ws, "cpu", {"session_len": 64})
    ids = [5, 17, 99, 3, 250, 41, 7, 64]
    with torch.no_grad():
        lr = model(torch.tensor([ids]))[0]
    le = eng.prompt_logits(ids)
    assert (lr - le).abs().max() <= 2e-3 * lr.abs().max()


@pytest.mark.parametrize("strategy,group,symmetric,ws_group", [
    ("group", 32, False, 32), ("group", 64, True, 64), ("channel", None, False, 64), ("channel", None, True, 64)])
def test_compressed_tensors_w4a16_served_exactly(tmp_path, strategy, group, symmetric, ws_group):
    ref = write_compressed_tensors(tmp_path / "ct", strategy, group, symmetric)
    info = from_hf_folder(tmp_path / "ct", tmp_path / "ws")
    assert info["weight_type"] == "int4" and read_config(tmp_path / "ws")["group_size"] == ws_group
    served = served_weights(tmp_path / "ws")
    assert served.keys() == {k for k in ref if LINEAR.fullmatch(k)}
    assert all(torch.equal(served[k], ref[k]) for k in served)       # the codes, scales and zeros kept exactly
    if strategy == "group" and not symmetric:
        assert_logits_match(tmp_path / "ws", ref)


@pytest.mark.parametrize("group,sym,v1,act_order,ws_group", [
    (32, True, True, None, 32),         # AutoGPTQ v1, symmetric, quantize_config.json
    (128, False, False, None, 64),      # GPTQModel v2, asymmetric, group 128 > K = 64: one group per row
    (-1, False, True, None, 64),        # per channel
    (64, False, True, "in order", 64),  # desc_act whose g_idx keeps groups contiguous: int4, exact
    (32, False, True, "scattered", None),  # desc_act, scattered groups -> kept 16-bit, dequantized exactly
])
def test_gptq_served_exactly(tmp_path, group, sym, v1, act_order, ws_group):
    ref = write_gptq(tmp_path / "gptq", group, sym, v1, act_order)
    info = from_hf_folder(tmp_path / "gptq", tmp_path / "ws")
    if ws_group is None:
        assert info["weight_type"] == "fp16"
        _, back = reassemble(tmp_path / "ws")
        assert all(torch.equal(back[k], ref[k].half()) for k in ref if LINEAR.fullmatch(k))
        return
    assert info["weight_type"] == "int4" and read_config(tmp_path / "ws")["group_size"] == ws_group
    served = served_weights(tmp_path / "ws")
    assert all(torch.equal(served[k], ref[k]) for k in served) and len(served) == 7 * TINY.n_layers
    if group == 128:
        assert_logits_match(tmp_path / "ws", ref)


def test_load_and_turbomind_stages_serve_a_gptq_checkpoint_by_hub_id(cli, tmp_path):
    """The runner on `model.path=org/name`, a GPTQ tiny-random in a Hugging Face cache in the Hub's own layout,
    offline: load keeps the int4 linears beside their dequantized weights (what evaluate's quant=fp16
    measures), and the turbomind stage serves those int4 codes as they are."""
    from pipeline.models.store import read_tensors, read_w4
    ref = write_gptq(tmp_path / "gptq", 32, False, False)
    hub_cache(tmp_path / "hf_cache", "tiny-org/tiny-llama-gptq", tmp_path / "gptq")
    env = {"HF_HUB_CACHE": str(tmp_path / "hf_cache"), "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_OFFLINE": "1"}
    cli("model=tiny-random", "model.source=hf", "model.path=tiny-org/tiny-llama-gptq", "quant=fp16",
        "pipeline.targets=[turbomind]", env=env)
    (load,) = [f.parent for f in (cli.tmp / "cache" / "load").glob("*/model.safetensors")]
    dense, w4 = read_tensors(load), read_w4(load)
    assert all(torch.equal(dense[k], ref[k]) for k in ref if LINEAR.fullmatch(k))
    assert all(torch.equal(dequantize_w4(pack_w4(*w4[k[:-7]], 32)), ref[k]) for k in ref if LINEAR.fullmatch(k))
    (ws,) = list((cli.tmp / "cache" / "turbomind").glob("*/workspace"))
    assert read_config(ws)["weight_type"] == "int4" and read_config(ws)["group_size"] == 32
    served = served_weights(ws)
    assert all(torch.equal(served[k], ref[k]) for k in served) and len(served) == 7 * TINY.n_layers


@pytest.mark.parametrize("qc,needle", [
    ({"quant_method": "bitsandbytes", "load_in_4bit": True}, "quant_method='bitsandbytes' is not one we read"),
    ({"quant_method": "gptq", "bits": 8, "group_size": 128}, "GPTQ bits=8 checkpoint_format='gptq'; supported"),
    ({"quant_method": "compressed-tensors", "format": "int-quantized", "config_groups": {}},
     "compressed-tensors format='int-quantized'"),
])
def test_unreadable_quantization_configs_are_named(tmp_path, qc, needle):
    from pipeline.models.prequant import read_quantized
    write_quantized(tmp_path / "m", lambda w: ({"weight": w}, w.float()), qc)
    with pytest.raises(ValueError, match=re.escape(needle)):
        read_quantized(tmp_path / "m")
