"""Pre-quantized Hugging Face checkpoints -> our int4 linears: AutoAWQ (GEMM), GPTQ (AutoGPTQ / GPTQModel) and
compressed-tensors W4A16 (pack-quantized), picked by config.json's quantization_config.quant_method (GPTQ also
from quantize_config.json).

    ck = read_quantized(folder, dtype)   # None for a 16-bit folder
    ck.args, ck.tensors                  # canonical tensors, every quantized linear dequantized: (q - z) * s
    ck.w4, ck.group_size                 # {"layers.0.q": (q (N, K) uint8, scales (K/g, N) fp16, zeros (K/g, N)
                                         #  uint8)} in the quantizer format (pipeline/quant/w4.py), or None

Each format's reader gives, per linear, Native(q (N, K) 0..15, scales (G, N), zeros (G, N) integers, g_idx (K,):
the group of each input column). The serving kernels need contiguous groups of 32, 64 or 128 inputs: the
workspace's group is the largest such g for which every linear's g_idx is constant on each block of g inputs
(and its zeros fit 0..15); the conversion is then exact (block b takes the scale and zero of group
g_idx[b * g]): GPTQ group 128 on K = 576 (a ragged last group) -> 64; per-channel (GPTQ group_size -1,
compressed-tensors strategy channel) -> the largest g dividing every K.
GPTQ act-order (desc_act, compressed-tensors actorder "group") scatters a group's columns across K, and our
kernels have no g_idx. Permuting K instead would have to permute the activation too, but q/k/v and gate/up
read the shared residual stream with different permutations; so such a checkpoint is kept 16-bit: its linears
dequantized exactly (tensors), w4 None, and a warning (quant=w4a16 re-quantizes it when int4 serving matters
more than exactness). The same holds for AutoGPTQ's v1 zero 16 (a stored nibble 15 plus its +1 offset).
"""
from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple, Optional

import torch

from .adapters import adapter_for_hf_config, args_from_hf_config, rename, to_canonical
from .llama import ModelArgs

log = logging.getLogger(__name__)
GROUPS = (128, 64, 32)            # the serving kernels' group sizes, largest first
LINEAR_RE = r"layers\.\d+\.(q|k|v|o|gate|up|down)"


class Native(NamedTuple):
    q: torch.Tensor               # (N, K) integer codes 0..15
    scales: torch.Tensor          # (G, N)
    zeros: torch.Tensor           # (G, N) integers
    g_idx: torch.Tensor           # (K,) group of each input column

    def dequantize(self, dtype) -> torch.Tensor:
        """(N, K) (q - z[g_idx]) * s[g_idx], fp32 math, one cast."""
        z, s = self.zeros.float()[self.g_idx].T, self.scales.float()[self.g_idx].T
        return ((self.q.float() - z) * s).to(dtype)


def contiguous_groups(K: int, g: int) -> torch.Tensor:
    """g_idx of plain groups of g inputs (g = -1 or K: one group, per channel)."""
    return torch.arange(K) // (K if g in (-1, None) else g)


# ------------------------------------------------------------------------------ the formats
def _nibbles(p: torch.Tensor, dim: int) -> torch.Tensor:
    """int32 (R, C) -> uint8, 8 values per word along `dim`: nibble i (bits 4i..4i+3) is the i-th
    (GPTQ's natural order)."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int64)
    x = ((p.to(torch.int64).unsqueeze(-1) >> shifts) & 0xF).to(torch.uint8)  # (R, C, 8)
    if dim == 0:                                                       # (R, C, 8) -> (R * 8, C)
        return x.permute(0, 2, 1).reshape(-1, p.shape[1])
    return x.reshape(p.shape[0], -1)


def _awq(get, base: str, qc: dict) -> Native:
    from ..quant.w4 import unpack
    q, s, z = unpack(get(base + ".qweight"), get(base + ".qzeros"), get(base + ".scales"), 4)
    return Native(q, s, z, contiguous_groups(q.shape[1], qc["group_size"]))


def _gptq(get, base: str, qc: dict) -> Native:
    """qweight (K/8, N) int32 packed along K, qzeros (G, N/8) packed along N, scales (G, N), g_idx (K,);
    checkpoint_format "gptq" (AutoGPTQ, v1) stores zero - 1, "gptq_v2" (GPTQModel) the zero itself."""
    s = get(base + ".scales")
    N = s.shape[1]
    q = _nibbles(get(base + ".qweight"), 0).T                         # (N, K)
    z = _nibbles(get(base + ".qzeros"), 1)[:, :N].to(torch.int16) + (qc["checkpoint_format"] == "gptq")
    g_idx = get(base + ".g_idx", None)
    g_idx = contiguous_groups(q.shape[1], qc["group_size"]) if g_idx is None else g_idx.long()
    return Native(q, s, z, g_idx)


def _compressed_tensors(get, base: str, qc: dict) -> Native:
    """weight_packed (N, K/8) int32 (8 signed 4-bit values + 8 per word along K), weight_scale (N, G),
    weight_zero_point (N/8, G) packed along N (asymmetric only), weight_shape [N, K], weight_g_idx (actorder)."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
    N, K = (int(v) for v in get(base + ".weight_shape"))
    s = get(base + ".weight_scale")                                    # (N, G)
    q = (unpack_from_int32(get(base + ".weight_packed"), 4, torch.Size((N, K))).to(torch.int16) + 8).to(torch.uint8)
    zp = get(base + ".weight_zero_point", None)
    if zp is None:
        z = torch.zeros_like(s, dtype=torch.int16)
    elif zp.dtype == torch.int32 and zp.shape[0] != N:
        z = unpack_from_int32(zp, 4, torch.Size((N, s.shape[1])), packed_dim=0).to(torch.int16)
    else:
        z = zp.to(torch.int16).reshape(N, -1)
    g_idx = get(base + ".weight_g_idx", None)
    g_idx = contiguous_groups(K, qc["group_size"]) if g_idx is None else g_idx.long()
    return Native(q, s.T.contiguous(), (z + 8).T.contiguous(), g_idx)


def _awq_config(qc: dict, where: str) -> dict:
    if qc.get("bits", 4) != 4 or str(qc.get("version", "gemm")).lower() != "gemm":
        raise ValueError(f"{where}: AutoAWQ bits={qc.get('bits')} version={qc.get('version')}; supported: 4-bit GEMM")
    return {"group_size": qc["group_size"]}


def _gptq_config(qc: dict, where: str) -> dict:
    fmt = qc.get("checkpoint_format", "gptq")
    if qc.get("bits") != 4 or fmt not in ("gptq", "gptq_v2"):
        raise ValueError(f"{where}: GPTQ bits={qc.get('bits')} checkpoint_format={fmt!r}; supported: bits 4, "
                         "checkpoint_format 'gptq' (AutoGPTQ) or 'gptq_v2' (GPTQModel)")
    return {"group_size": qc.get("group_size", 128), "checkpoint_format": fmt}


def _ct_config(qc: dict, where: str) -> dict:
    wts = [g.get("weights") or {} for g in (qc.get("config_groups") or {}).values()]
    ok = (qc.get("format") == "pack-quantized" and len(wts) == 1 and wts[0].get("num_bits") == 4
          and wts[0].get("type") == "int" and wts[0].get("strategy") in ("group", "channel"))
    if not ok:
        raise ValueError(f"{where}: compressed-tensors format={qc.get('format')!r} with weights {wts}; supported: "
                         "format 'pack-quantized', one config group of 4-bit int weights, strategy group or channel "
                         "(W4A16, as llm-compressor writes it)")
    w = wts[0]
    return {"group_size": w.get("group_size") if w["strategy"] == "group" else -1}


@dataclass(frozen=True)
class Format:
    marker: str                   # the suffix that makes a tensor a quantized linear's
    parts: tuple[str, ...]        # every suffix the format's linears carry
    config: Callable              # (quantization_config, where) -> what read needs; refuses what we can't read
    read: Callable                # (get, HF linear prefix, config) -> Native


FORMATS = {
    "awq": Format(".qweight", (".qweight", ".qzeros", ".scales"), _awq_config, _awq),
    "gptq": Format(".qweight", (".qweight", ".qzeros", ".scales", ".g_idx"), _gptq_config, _gptq),
    "compressed-tensors": Format(".weight_packed", (".weight_packed", ".weight_scale", ".weight_zero_point",
                                                    ".weight_shape", ".weight_g_idx"), _ct_config, _compressed_tensors),
}


def quantization_config(path: Path) -> Optional[dict]:
    """config.json's quantization_config, or quantize_config.json (older AutoGPTQ), or None (16-bit)."""
    path = Path(path)
    qc = json.loads((path / "config.json").read_text()).get("quantization_config")
    if not qc and (path / "quantize_config.json").exists():
        qc = {"quant_method": "gptq", **json.loads((path / "quantize_config.json").read_text())}
    return qc or None


# ------------------------------------------------------------------------------ to our int4
def serving_group(natives: dict[str, Native]) -> Optional[int]:
    """The largest kernel group g such that every linear's groups are unions of contiguous g-blocks and its
    zeros fit 0..15; None when there is none (act-order, v1 zero 16)."""
    for g in GROUPS:
        if all(n.q.shape[1] % g == 0 and bool((n.g_idx.view(-1, g) == n.g_idx.view(-1, g)[:, :1]).all())
               and int(n.zeros.min()) >= 0 and int(n.zeros.max()) <= 15 for n in natives.values()):
            return g
    return None


def regroup(n: Native, g: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Native -> quantizer format at group g (exact when serving_group allowed g)."""
    first = n.g_idx[::g]                                               # (K/g,) the group of each g-block
    return (n.q.to(torch.uint8).contiguous(), n.scales[first].half().contiguous(),
            n.zeros[first].to(torch.uint8).contiguous())


@dataclass
class Quantized:
    method: str
    args: ModelArgs
    tensors: dict                 # canonical name -> tensor; quantized linears dequantized
    w4: Optional[dict]            # canonical linear -> (q, scales, zeros) at group_size, or None (16-bit)
    group_size: Optional[int]


def read_quantized(path: Path, dtype: torch.dtype = torch.float32) -> Optional[Quantized]:
    """A pre-quantized Hugging Face folder -> Quantized (see the module doc); None for a 16-bit folder."""
    from safetensors import safe_open
    path = Path(path)
    qc = quantization_config(path)
    if qc is None:
        return None
    method = qc.get("quant_method")
    if method not in FORMATS:
        raise ValueError(f"{path}: quantization_config.quant_method={method!r} is not one we read; supported: "
                         f"{list(FORMATS)} (4-bit weights)")
    fmt, where = FORMATS[method], str(path / "config.json")
    fcfg = fmt.config(qc, where)
    cfg = json.loads((path / "config.json").read_text())
    ad = adapter_for_hf_config(cfg, where)
    args = args_from_hf_config(cfg, ad)
    raw = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), framework="pt", device="cpu") as fh:
            raw.update({k: fh.get_tensor(k) for k in fh.keys()})
    if not raw:
        raise ValueError(f"model.path={str(path)!r} holds no *.safetensors files (a {method} checkpoint)")

    def get(name: str, *default):
        """A tensor of the checkpoint; `default` when given and the tensor is absent (optional parts)."""
        return raw[name] if name in raw or not default else default[0]
    natives, rest = {}, {}
    for name, t in raw.items():
        if name.endswith(fmt.marker):
            base = name[: -len(fmt.marker)]
            canon = rename(base + ".weight", ad.names)
            if canon is None:
                raise ValueError(f"{method} tensor {name!r} in {path} has no canonical name")
            natives[canon[: -len(".weight")]] = fmt.read(get, base, fcfg)
        elif not name.endswith(fmt.parts):
            rest[name] = t
    if not natives:
        raise ValueError(f"{where} says quant_method={method!r} but no tensor ends in {fmt.marker!r}")
    if "lm_head.weight" not in rest and "output.weight" not in rest and "lm_head" not in natives:
        args.tie_embeddings = True
    tensors = to_canonical(rest, ad, args)
    tensors.update({k + ".weight": n.dequantize(dtype) for k, n in natives.items()})
    served = {k: n for k, n in natives.items() if re.fullmatch(LINEAR_RE, k)}
    g = serving_group(served)
    if g is None:
        log.warning("%s: the %s linears' groups are not contiguous blocks of %s inputs (act-order g_idx) or their "
                    "zeros leave 0..15: kept 16-bit (dequantized exactly); quant=w4a16 re-quantizes them",
                    path, method, "/".join(map(str, GROUPS)))
    w4 = {k: regroup(n, g) for k, n in served.items()} if g else None
    return Quantized(method, args, tensors, w4, g)
