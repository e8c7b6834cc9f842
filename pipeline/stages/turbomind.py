"""turbomind: offline conversion of a (quantized) checkpoint into a TurboMind-style workspace.

Inputs: load (fp16), plus pack when quant.w_bits (int4 weights re-laid out for the serving kernel, norms
with the AWQ scales folded in), plus kv_qparams when quant.kv_bits with kv_mode=static.
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


def inputs(cfg) -> list[str]:
    """Same upstream as evaluate: load, pack (w_bits), kv_qparams (static KV). Refuses, before anything
    runs, weight formats the serving engine has no kernel path for yet."""
    if cfg.quant.w_bits not in (None, 4):
        raise ValueError(f"quant={cfg.quant.name} (w_bits={cfg.quant.w_bits}): the serving engine runs 16-bit "
                         "or 4-bit (W4A16) weights; W8A8 is evaluated but not served yet. Use "
                         f"pipeline=evaluate quant={cfg.quant.name} for its perplexity, or quant=w4a16_kv8 to serve")
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
    w4 = None
    if q.w_bits:
        if q.w_bits != 4:
            raise ValueError(f"quant.w_bits={q.w_bits}: the serving engine runs 4-bit weights (W4A16) or "
                             "16-bit (w_bits null)")
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
        if q.kv_mode == "static":
            kvq = kv_static(ctx.inputs["kv_qparams"], args.n_layers, q.kv_bits, q.kv_sym)
    dtype = next(iter(tensors.values())).dtype
    info = write_workspace(ctx.out / "workspace", args, tensors, load_dir / "tokenizer", tp=tp, w4=w4,
                           group_size=q.group_size, kv_qparams=kvq, kv_bits=q.kv_bits, kv_mode=q.kv_mode,
                           model_name=str(ctx.cfg.model.name), dtype=dtype, track=ctx.track)
    files = list((ctx.out / "workspace").rglob("*"))
    info["bytes"] = sum(f.stat().st_size for f in files if f.is_file())
    return info


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
