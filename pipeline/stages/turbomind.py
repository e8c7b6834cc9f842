"""turbomind: offline conversion of a (quantized) checkpoint into a TurboMind-style workspace.

Inputs: load (fp16), plus pack when quant.w_bits=4 (int4 weights re-laid out for the serving kernel, norms
with the AWQ scales folded in), plus kv_qparams when quant.kv_bits with kv_mode=static; for W8A8
(w_bits=8, a_bits=8) quant_w8 instead of pack: int8 weights + per-channel scales (weight_type int8), norms
with the SmoothQuant scales folded in, and the static KV qparams of the smoothed model.
Reads quant and serve.tp only: serving knobs (session_len, max_batch_size, cache_*) are not baked in
(config.ini holds defaults; the serve stage passes its own), so changing them never rebuilds this.
Artifact: workspace/ (layout in pipeline/workspace.py).

Also from a folder, without the stage graph:
    python -m pipeline.workspace --hf /models/llama-2-7b-chat --out ./workspace --tp 1   # fp16 HF folder
    python -m pipeline.workspace --hf /models/llama-2-7b-awq --out ./workspace            # AutoAWQ folder
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch
from safetensors import safe_open

from ..models.store import read_args, read_tensors, tensor_names
from ..workspace import write_workspace

VERSION = 1
READS = ["quant", "serve.tp", "model.name"]


from . import evaluate  # noqa: E402


SERVED = {(None, None): "16-bit", (4, None): "W4A16", (8, 8): "W8A8"}   # (w_bits, a_bits) -> weight path


def check_served(q) -> None:
    if (q.w_bits, q.a_bits) not in SERVED:
        raise ValueError(f"quant={q.name} (w_bits={q.w_bits}, a_bits={q.a_bits}): the serving engine runs 16-bit "
                         "weights (w_bits null), W4A16 (w_bits=4) or W8A8 (w_bits=8, a_bits=8); other formats are "
                         "evaluated, not served: run this one with pipeline=evaluate for its perplexity, or serve "
                         "quant=w4a16_kv8 or quant=w8a8")


def inputs(cfg) -> list[str]:
    """Same upstream as evaluate: load, pack (w_bits=4) or quant_w8 (W8A8), kv_qparams (static KV).
    Refuses, before anything runs, weight formats the serving engine has no kernel path for."""
    check_served(cfg.quant)
    return evaluate.inputs(cfg)


def kv_static(kv_dir: Path, n_layers: int, bits: int, sym: bool) -> dict:
    """layer -> (k_scale, k_zp, v_scale, v_zp), each (n_kv_heads,) fp32, from the kv_qparams artifact."""
    from safetensors.torch import load_file
    from ..quant.kv import FILE, variant
    qp = load_file(str(Path(kv_dir) / FILE))
    v = variant(bits, sym)
    return {i: tuple(qp[f"layers.{i}.{t}.{v}.{s}"] for t in "kv" for s in ("scale", "zp")) for i in range(n_layers)}


def run(ctx) -> dict:
    q, tp = ctx.cfg.quant, ctx.cfg.serve.tp
    load_dir = ctx.inputs["load"]
    args = read_args(load_dir)
    w4 = w8 = None
    check_served(q)
    if q.a_bits:
        tensors, w8 = read_quant_w8(ctx.inputs["quant_w8"], load_dir, args)
    elif q.w_bits:
        from ..quant.blockwise import LINEARS
        from .pack import read_unpacked
        pdir = ctx.inputs["pack"]
        names = [n for n in tensor_names(pdir) if not n.endswith((".qweight", ".qzeros", ".scales"))]
        tensors = read_tensors(pdir, names)
        w4 = {f"layers.{i}.{n}": read_unpacked(pdir, f"layers.{i}.{n}", ctx.device)
              for i in range(args.n_layers) for n in LINEARS}
    else:
        tensors = read_tensors(load_dir)
    kvq = None
    if q.kv_bits:
        if q.kv_mode == "static":   # W8A8: the qparams of the smoothed model, written by quant_w8
            kvq = kv_static(ctx.inputs["quant_w8" if q.a_bits else "kv_qparams"], args.n_layers, q.kv_bits, q.kv_sym)
    dtype = next(t for t in tensors.values() if t.is_floating_point()).dtype
    info = write_workspace(ctx.out / "workspace", args, tensors, load_dir / "tokenizer", tp=tp, w4=w4, w8=w8,
                           group_size=q.group_size, kv_qparams=kvq, kv_bits=q.kv_bits, kv_mode=q.kv_mode,
                           model_name=str(ctx.cfg.model.name), dtype=dtype, track=ctx.track)
    files = list((ctx.out / "workspace").rglob("*"))
    info["bytes"] = sum(f.stat().st_size for f in files if f.is_file())
    return info


def read_quant_w8(qdir: Path, load_dir: Path, args) -> tuple[dict, dict]:
    """A quant_w8 artifact (Hugging Face names) -> (canonical tensors without the linears' weights,
    {"layers.0.q": W8Weight(int8 (N, K), scales (N,) fp16), ...})."""
    from ..quant.blockwise import LINEARS
    from ..quant.w8 import W8Weight, hf_name
    from .quant_w8 import read_w8
    lin = {f"layers.{i}.{n}" for i in range(args.n_layers) for n in LINEARS}
    names = [n for n in tensor_names(load_dir) if not (n.endswith(".weight") and n[: -len(".weight")] in lin)]
    with safe_open(str(Path(qdir) / "model.safetensors"), framework="pt", device="cpu") as f:
        tensors = {n: f.get_tensor(hf_name(n)) for n in names}
    w8 = {}
    for n in sorted(lin):
        q, s, _ = read_w8(qdir, n)
        w8[n] = W8Weight(q, s)
    return tensors, w8


# ------------------------------------------------------------------------------------ HF / AutoAWQ folders
def from_hf_folder(path: Path, out: Path, tp: int = 1, model_name: Optional[str] = None, **serve) -> dict:
    """A workspace from a Hugging Face folder: fp16 weights, or AutoAWQ int4 (quantization_config.quant_method
    == "awq", GEMM layout: qweight (K, N/8), qzeros (K/g, N/8), scales (K/g, N))."""
    from ..models.adapters import adapter_for_hf_config, args_from_hf_config, rename, to_canonical
    from ..quant.w4 import unpack
    path = Path(path)
    cfg = json.loads((path / "config.json").read_text())
    qc = cfg.get("quantization_config") or {}
    if qc.get("quant_method") != "awq":
        from ..models.sources import load_hf_folder
        args, tensors, _ = load_hf_folder(path)
        return _write(out, path, args, tensors, tp=tp, model_name=model_name or path.name,
                      dtype=next(iter(tensors.values())).dtype, **serve)
    if qc.get("bits", 4) != 4 or qc.get("version", "gemm").lower() != "gemm":
        raise ValueError(f"{path}: AutoAWQ bits={qc.get('bits')} version={qc.get('version')}; supported: 4-bit GEMM")
    ad = adapter_for_hf_config(cfg, str(path / "config.json"))
    args = args_from_hf_config(cfg, ad)
    raw = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), framework="pt", device="cpu") as fh:
            raw.update({k: fh.get_tensor(k) for k in fh.keys()})
    w4, rest = {}, {}
    for name, t in raw.items():
        if name.endswith(".qweight"):
            base = name[: -len(".qweight")]
            canon = rename(base + ".weight", ad.names)
            if canon is None:
                raise ValueError(f"AutoAWQ tensor {name!r} in {path} has no canonical name")
            w4[canon[: -len(".weight")]] = unpack(t, raw[base + ".qzeros"], raw[base + ".scales"], 4)
        elif not name.endswith((".qzeros", ".scales")):
            rest[name] = t
    if "lm_head.weight" not in rest and "output.weight" not in rest:
        args.tie_embeddings = True
    tensors = to_canonical(rest, ad, args)
    return _write(out, path, args, tensors, tp=tp, w4=w4, group_size=qc["group_size"],
                  model_name=model_name or path.name, dtype=torch.float16, **serve)


def _write(out: Path, src: Path, args, tensors, **kw) -> dict:
    """write_workspace with the folder's tokenizer (skipped, with a note, when the folder has none)."""
    import shutil
    import tempfile
    from ..models.sources import save_tokenizer
    with tempfile.TemporaryDirectory() as tmp:
        tok = Path(tmp) / "tokenizer"
        try:
            save_tokenizer(src, tok)
        except (OSError, ValueError) as e:
            print(f"note: no tokenizer saved from {src} ({type(e).__name__}: {e})")
            shutil.rmtree(tok, ignore_errors=True)
            tok = None
        return write_workspace(out, args, tensors, tok, **kw)
