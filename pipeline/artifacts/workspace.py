"""TurboMind-style workspace: layout, config.ini, tensor-parallel split and reassembly.

Layout (what `lmdeploy convert` writes, with our tensor format):
    workspace/triton_models/weights/config.ini          [llama] section, see `write_config`
    workspace/triton_models/weights/<name>              one safetensors file per tensor and TP rank, key "t"
        tok_embeddings.weight  norm.weight  output.weight (absent when tied)
        layers.N.attention_norm.weight  layers.N.ffn_norm.weight
        layers.N.attention.w_qkv.R.{weight | qweight,scales[,zeros]}[,bias] column-parallel (output dim),
                                  rank R holds [q heads of R | k heads of R | v heads of R]
        layers.N.attention.wo.R.{weight | qweight,scales[,zeros]}           row-parallel (input dim)
        layers.N.attention.wo.bias                                          (o_bias models; added once)
        layers.N.feed_forward.w13.R.{...}   column-parallel, rank R holds [gate rows of R | up rows of R]
        layers.N.feed_forward.w2.R.{...}    row-parallel
        layers.N.past_kv_scale.R.weight     (4, KV heads of R) fp32 rows: k_scale, k_zp, v_scale, v_zp
    KV heads: n_kv_heads / tp per rank, or, when tp is a multiple of n_kv_heads (GQA/MQA), one per rank,
    replicated on tp / n_kv_heads ranks (`kv_heads`); `check_tp` names the valid tp values.
    workspace/triton_models/tokenizer/                  Hugging Face tokenizer (with chat template)

int4 tensors are stored in the serving kernel's layout (`pipeline.kernels.w4a16.pack_w4`: qweight
(K//8, N) int32, scales/zeros (K//g, N) fp16); int8 (W8A8, weight_type int8) as qweight (N, K) int8 and
scales (N,) fp16 per output channel: a column-parallel rank holds its rows and their scales, a row-parallel
rank its input columns and all N scales (the same on every rank); 16-bit weights as (N, K) fp16 (bf16 if
the source is bf16).

quant_policy (as in LMDeploy's TurboMind): 0 = 16-bit KV, 4 = int8 KV, 8 = int4 KV (our choice for int4).
The KV qparams are static (calibrated, `past_kv_scale` files) when present and kv_mode = static, else
per-token dynamic. Edit quant_policy in config.ini to switch KV quantization for the next serve.

Usage:
    write_workspace(out, args, tensors, tokenizer_dir, tp=2, w4={"layers.0.q": (q, s, z), ...}, group_size=128)
    write_workspace(out, args, tensors, tokenizer_dir, w8={"layers.0.q": W8Weight(q_int8, scales), ...})
    write_workspace(out, args, tensors, tokenizer_dir, linears={...}, weight_type="int4")   # any pipeline/weights row
    cfg = read_config(ws); args = config_args(cfg)
    w = Workspace.open(ws)             # opened once: w.config, w.args, w.tensor(name), w.linear(prefix) as stored
    canon = reassemble(ws)             # canonical names -> tensor, (q, scales, zeros) or W8Weight: exact inverse
How each weight type is cut, joined, named and converted: its row in pipeline/weights (WEIGHT_TYPES).
    python -m pipeline.workspace --hf /models/llama-2-7b --out ./workspace [--tp 2]   # HF or AutoAWQ folder
    from_hf_folder(path, out, tp=1)    # the same from Python (fp16, AutoAWQ, GPTQ or compressed-tensors W4A16)
"""
from __future__ import annotations

import configparser
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file, save_file

from ..models.llama import ModelArgs
from . import check_format

FORMAT = 2                                    # the on-disk layout below (config.ini's format_version)
# 2: int4 in the serving kernel's layout (pack_w4: qweight (K//8, N)); 1 (no format_version): older layouts
REBUILD = ("python -m pipeline.runner pipeline=serve quant=<the quant> serve.tp=<tp> (the turbomind stage), or "
           "python -m pipeline.workspace --hf <folder> --out <workspace> --tp <tp>")
WEIGHTS, TOKENIZER = "triton_models/weights", "triton_models/tokenizer"
QUANT_POLICIES = {0: 16, 4: 8, 8: 4}          # quant_policy -> KV bits
COL = {"w_qkv": "attention", "w13": "feed_forward"}
ROW = {"wo": "attention", "w2": "feed_forward"}
ROW_NAMES = {"wo": "o", "w2": "down"}         # the row-parallel linears' canonical names
SERVE_DEFAULTS = dict(session_len=4096, max_batch_size=32, cache_max_entry_count=0.8, cache_block_seq_len=64)


# ------------------------------------------------------------------------------------ config.ini
def write_config(wdir: Path, args: ModelArgs, *, model_name: str, weight_type: str, group_size: int,
                 quant_policy: int, kv_mode: str, tp: int, **serve) -> None:
    s = {**SERVE_DEFAULTS, **serve}
    c = configparser.ConfigParser()
    c["llama"] = {
        "model_name": model_name, "model_arch": args.arch, "head_num": args.n_heads, "kv_head_num": args.n_kv_heads,
        "size_per_head": args.head_dim, "hidden_units": args.dim, "inter_size": args.hidden_dim,
        "num_layer": args.n_layers, "vocab_size": args.vocab_size, "norm_eps": args.norm_eps,
        "rotary_embedding": args.head_dim, "rope_theta": args.rope_theta,
        "rope_scaling": json.dumps(args.rope_scaling), "max_position_embeddings": args.max_seq_len,
        "tie_word_embeddings": int(args.tie_embeddings), "attn_bias": int(args.qkv_bias), "o_bias": int(args.o_bias),
        "bos_id": json.dumps(args.bos_token_id), "eos_id": json.dumps(args.eos_token_id),
        "format_version": FORMAT,
        "weight_type": weight_type, "group_size": group_size, "quant_policy": quant_policy, "kv_mode": kv_mode,
        "tensor_para_size": tp, **s}
    with open(wdir / "config.ini", "w") as f:
        c.write(f)


def read_config(ws: Path) -> dict:
    """config.ini as a typed dict (ints, floats, JSON values decoded)."""
    path = Path(ws) / WEIGHTS / "config.ini"
    if not path.exists():
        raise ValueError(f"{ws} is not a workspace: {path} does not exist (build one with the turbomind stage)")
    c = configparser.ConfigParser()
    c.read(path)
    out = {}
    for k, v in c["llama"].items():
        for conv in (int, float, json.loads):
            try:
                out[k] = conv(v)
                break
            except ValueError:
                continue
        else:
            out[k] = v
    check_format(out.get("format_version"), FORMAT, "workspace", ws, REBUILD)
    qp = out["quant_policy"]
    if qp not in QUANT_POLICIES:
        raise ValueError(f"quant_policy={qp} in {path} is not one of {sorted(QUANT_POLICIES)} "
                         "(0: 16-bit KV, 4: int8 KV, 8: int4 KV)")
    return out


def config_args(c: dict) -> ModelArgs:
    return ModelArgs(arch=c["model_arch"], dim=c["hidden_units"], n_layers=c["num_layer"], n_heads=c["head_num"],
                     n_kv_heads=c["kv_head_num"], head_dim=c["size_per_head"], hidden_dim=c["inter_size"],
                     vocab_size=c["vocab_size"], norm_eps=c["norm_eps"], rope_theta=float(c["rope_theta"]),
                     rope_scaling=c["rope_scaling"], max_seq_len=c["max_position_embeddings"],
                     tie_embeddings=bool(c["tie_word_embeddings"]), qkv_bias=bool(c["attn_bias"]),
                     o_bias=bool(c["o_bias"]), bos_token_id=c["bos_id"], eos_token_id=c["eos_id"])


# ------------------------------------------------------------------------------------ tensor files
def save_tensor(wdir: Path, name: str, t: torch.Tensor) -> None:
    save_file({"t": t.contiguous().cpu()}, str(Path(wdir) / name))


def load_tensor(wdir: Path, name: str, device="cpu") -> torch.Tensor:
    path = Path(wdir) / name
    if not path.exists():
        raise ValueError(f"workspace tensor {name!r} is missing from {wdir}")
    return load_file(str(path), device=str(device))["t"]


def out_slices(args: ModelArgs, kind: str, r: int, tp: int) -> list[tuple[str, int, int]]:
    """Canonical pieces (name suffix, row start, row end) making up rank r's column-parallel tensor."""
    hd = args.head_dim
    if kind == "w_qkv":
        nq, (a, b) = args.n_heads // tp, kv_heads(args, r, tp)
        return [("q", r * nq * hd, (r + 1) * nq * hd), ("k", a * hd, b * hd), ("v", a * hd, b * hd)]
    f = args.hidden_dim // tp
    return [("gate", r * f, (r + 1) * f), ("up", r * f, (r + 1) * f)]


def kv_heads(args: ModelArgs, r: int, tp: int) -> tuple[int, int]:
    """KV heads [a, b) of rank r: n_kv_heads / tp each when tp divides n_kv_heads; otherwise (tp a multiple
    of n_kv_heads, GQA/MQA) one head per rank, replicated on tp / n_kv_heads ranks, the one its q heads use."""
    nkv = args.n_kv_heads
    if nkv % tp == 0:
        return r * nkv // tp, (r + 1) * nkv // tp
    h = r // (tp // nkv)
    return h, h + 1


def col_pieces(args: ModelArgs, kind: str, tp: int, ranks: list, biases: Optional[list], wt) -> tuple[dict, dict]:
    """A column-parallel linear's ranks (records of weight type wt) -> its canonical pieces in order (name -> parts)
    and its bias's (name -> parts); a KV head replicated on several ranks is taken once."""
    from ..weights import OUT
    pieces, bparts, seen = {}, {}, set()
    for r in range(tp):
        off = 0
        for n, a, b in out_slices(args, kind, r, tp):
            if (n, a) not in seen:
                seen.add((n, a))
                pieces.setdefault(n, []).append(wt.cut(ranks[r], off, off + b - a, OUT))
                if biases:
                    bparts.setdefault(n, []).append(biases[r][off:off + b - a])
            off += b - a
    return pieces, bparts


def kv_head_ranks(args: ModelArgs, tp: int) -> list[int]:
    """One rank per KV head range, in head order (the ranks whose past_kv_scale files make up all heads)."""
    firsts = {kv_heads(args, r, tp)[0]: r for r in reversed(range(tp))}
    return [r for _, r in sorted(firsts.items())]


def check_tp(args: ModelArgs, tp: int) -> None:
    nh, nkv, f = args.n_heads, args.n_kv_heads, args.hidden_dim
    ok = [t for t in range(1, nh + 1) if nh % t == 0 and f % t == 0 and (nkv % t == 0 or t % nkv == 0)]
    if tp < 1 or tp not in ok:
        raise ValueError(f"tp={tp} does not fit n_heads={nh}, n_kv_heads={nkv}, hidden_dim={f}: tp must divide "
                         f"n_heads and hidden_dim, and divide n_kv_heads or be a multiple of it "
                         f"(KV heads replicated); valid tp values for this model: {ok}")


# ------------------------------------------------------------------------------------ opened once
@dataclass(frozen=True)
class Workspace:
    """A workspace opened once: config.ini parsed and its format checked, the ModelArgs; tensors read on demand.
    What Engine.from_workspace, ModelRunner and every TP rank read (`Workspace.open` takes a path or a Workspace)."""
    path: Path
    config: dict
    args: ModelArgs

    @classmethod
    def open(cls, ws) -> "Workspace":
        if isinstance(ws, Workspace):
            return ws
        c = read_config(ws)
        return cls(Path(ws), c, config_args(c))

    @property
    def wdir(self) -> Path:
        return self.path / WEIGHTS

    @property
    def tp(self) -> int:
        return self.config["tensor_para_size"]

    @property
    def weight_type(self) -> str:
        return self.config["weight_type"]

    @property
    def group_size(self) -> int:
        return self.config["group_size"]

    @property
    def wtype(self):
        """The weight type of its linears: config.ini's weight_type, a row of pipeline.weights.WEIGHT_TYPES."""
        from ..weights import table_row
        return table_row(self.weight_type)

    def has(self, name: str) -> bool:
        return (self.wdir / name).exists()

    def tensor(self, name: str, device="cpu") -> torch.Tensor:
        return load_tensor(self.wdir, name, device)

    def linear(self, prefix: str, device="cpu"):
        """One rank's linear as stored (its weight type's record: dense (N, K), W4Weight in the kernel layout,
        W8Weight, ...); never re-packed."""
        return self.wtype.from_parts(lambda part: load_tensor(self.wdir, f"{prefix}.{part}", device), self.group_size)

    def rank_layer(self, i: int, r: int, device="cpu") -> dict:
        """Layer i of rank r as stored (tp = 1: the whole layer): w_qkv, b_qkv, wo, b_o (rank 0 only: added once
        after the all-reduce), w13, w2, kv_static (None where absent)."""
        args, L = self.args, f"layers.{i}"
        kvs = f"{L}.past_kv_scale.{r}.weight"
        return {"w_qkv": self.linear(f"{L}.attention.w_qkv.{r}", device),
                "b_qkv": self.tensor(f"{L}.attention.w_qkv.{r}.bias", device) if args.qkv_bias else None,
                "wo": self.linear(f"{L}.attention.wo.{r}", device),
                "b_o": self.tensor(f"{L}.attention.wo.bias", device) if args.o_bias and r == 0 else None,
                "w13": self.linear(f"{L}.feed_forward.w13.{r}", device),
                "w2": self.linear(f"{L}.feed_forward.w2.{r}", device),
                "kv_static": self.tensor(kvs, device) if self.has(kvs) else None}

    def layer_pieces(self, i: int, device="cpu") -> dict:
        """Layer i's linears joined from every rank's files, as stored records under their canonical names
        (q, k, v, o, gate, up, down), with the biases (q.bias, ..., o.bias: None where absent) and kv_static
        (the (4, n_kv_heads) past_kv_scale rows, or None)."""
        from ..weights import IN, OUT
        args, tp, L, wt = self.args, self.tp, f"layers.{i}", self.wtype
        out = {}
        for kind, sub in COL.items():
            ranks = [self.linear(f"{L}.{sub}.{kind}.{r}", device) for r in range(tp)]
            bias = kind == "w_qkv" and args.qkv_bias
            biases = [self.tensor(f"{L}.{sub}.{kind}.{r}.bias", device) for r in range(tp)] if bias else None
            pieces, bparts = col_pieces(args, kind, tp, ranks, biases, wt)
            for n, parts in pieces.items():
                out[n] = wt.cat(parts, OUT)
                out[n + ".bias"] = torch.cat(bparts[n]) if biases else None
        for kind, sub in ROW.items():
            out[ROW_NAMES[kind]] = wt.cat([self.linear(f"{L}.{sub}.{kind}.{r}", device) for r in range(tp)], IN)
        out["o.bias"] = self.tensor(f"{L}.attention.wo.bias", device) if args.o_bias else None
        out["kv_static"] = None
        if self.has(f"{L}.past_kv_scale.0.weight"):
            out["kv_static"] = torch.cat([self.tensor(f"{L}.past_kv_scale.{r}.weight", device)
                                          for r in kv_head_ranks(args, tp)], 1)
        return out

    def merged_layer(self, i: int, device="cpu") -> dict:
        """Layer i of a workspace built for tp > 1 as one tp = 1 model, joined from its ranks' files in the
        stored layout (int4 stays in the kernel layout: its N and grouped-K splits join without unpacking):
        w_qkv, b_qkv, wo, b_o, w13, w2, kv_static (None where absent)."""
        from ..weights import OUT
        m, wt = self.layer_pieces(i, device), self.wtype
        b_qkv = None if m["q.bias"] is None else torch.cat([m[n + ".bias"] for n in "qkv"])
        return {"w_qkv": wt.cat([m[n] for n in "qkv"], OUT), "b_qkv": b_qkv, "wo": m["o"], "b_o": m["o.bias"],
                "w13": wt.cat([m["gate"], m["up"]], OUT), "w2": m["down"], "kv_static": m["kv_static"]}


# ------------------------------------------------------------------------------------ write
def save_linear(wdir: Path, prefix: str, wt, w) -> None:
    """One rank's linear (a record of weight type wt) as its files <prefix>.<part>."""
    for part, t in wt.parts(w).items():
        save_tensor(wdir, f"{prefix}.{part}", t)


def write_workspace(out: Path, args: ModelArgs, tensors: dict, tokenizer_dir: Optional[Path], *, tp: int = 1,
                    w4: Optional[dict] = None, w8: Optional[dict] = None, linears: Optional[dict] = None,
                    weight_type: Optional[str] = None, group_size: int = 128, kv_qparams: Optional[dict] = None,
                    kv_bits: Optional[int] = None, kv_mode: str = "static", model_name: str = "model",
                    dtype: torch.dtype = torch.float16, track=lambda it, **k: it, **serve) -> dict:
    """Write a workspace. tensors: canonical name -> tensor (all weights; quantized linears may be absent);
    linears: canonical linear name (e.g. "layers.0.q") -> what the quantizer wrote for weight type `weight_type`
    (a row of pipeline.weights.WEIGHT_TYPES), every linear of the model; none: 16-bit linears from tensors in dtype.
    w4=... is linears=..., weight_type="int4" ((q, scales, zeros) in the quantizer format); w8=... is
    weight_type="int8" (W8Weight: int8 (N, K), scales (N,)), as quant_w8 writes them (W8A8).
    kv_qparams: layer -> (k_scale, k_zp, v_scale, v_zp), each (n_kv_heads,) fp32.
    group_size in config.ini: the quantized linears' own group where they have one, else this argument."""
    from ..weights import IN, OUT, dense_type, table_row
    check_tp(args, tp)
    given = [(n, x) for n, x in (("w4", w4), ("w8", w8), ("linears", linears)) if x]
    if len(given) > 1:
        raise ValueError(f"write_workspace: give one of w4 (int4), w8 (int8) or linears, not {[n for n, _ in given]}")
    if given:
        weight_type = {"w4": "int4", "w8": "int8"}.get(given[0][0], weight_type)
    dtype = torch.bfloat16 if dtype == torch.bfloat16 else torch.float16
    wt = table_row(weight_type) if given else dense_type(dtype)
    qlin = {n: wt.from_canonical(x) for n, x in given[0][1].items()} if given else {}   # converted once
    wdir = Path(out) / WEIGHTS
    wdir.mkdir(parents=True, exist_ok=True)
    dense = lambda n: tensors[n + ".weight"].to(dtype)  # noqa: E731

    def lin(n):
        if not given:
            return wt.from_canonical(tensors[n + ".weight"])
        if n not in qlin:
            raise ValueError(f"write_workspace: linear {n!r} is missing from the {wt.name} linears (a workspace "
                             "holds one weight type)")
        return qlin[n]

    save_tensor(wdir, "tok_embeddings.weight", dense("embed"))
    save_tensor(wdir, "norm.weight", dense("norm"))
    if not args.tie_embeddings:
        save_tensor(wdir, "output.weight", dense("lm_head"))
    hd = args.head_dim
    for i in track(range(args.n_layers), total=args.n_layers, description="workspace"):
        p, L = f"layers.{i}.", f"layers.{i}"
        save_tensor(wdir, f"{L}.attention_norm.weight", dense(p + "attn_norm"))
        save_tensor(wdir, f"{L}.ffn_norm.weight", dense(p + "mlp_norm"))
        if args.o_bias:
            save_tensor(wdir, f"{L}.attention.wo.bias", tensors[p + "o.bias"].to(dtype))
        for r in range(tp):
            for kind, sub in COL.items():
                pieces = out_slices(args, kind, r, tp)
                save_linear(wdir, f"{L}.{sub}.{kind}.{r}", wt, wt.cat([wt.cut(lin(p + n), a, b, OUT) for n, a, b in pieces], OUT))
                if kind == "w_qkv" and args.qkv_bias:
                    save_tensor(wdir, f"{L}.{sub}.{kind}.{r}.bias",
                                torch.cat([tensors[p + n + ".bias"][a:b] for n, a, b in pieces]).to(dtype))
            for kind, sub in ROW.items():
                K = args.n_heads * hd if kind == "wo" else args.hidden_dim
                save_linear(wdir, f"{L}.{sub}.{kind}.{r}", wt,
                            wt.cut(lin(p + ROW_NAMES[kind]), r * K // tp, (r + 1) * K // tp, IN))
            if kv_qparams is not None:
                a, b = kv_heads(args, r, tp)
                qp = torch.stack([torch.as_tensor(t, dtype=torch.float32) for t in kv_qparams[i]])  # (4, nkv)
                save_tensor(wdir, f"{L}.past_kv_scale.{r}.weight", qp[:, a:b])
    policy = {None: 0, 16: 0, 8: 4, 4: 8}[kv_bits]
    mode = "static" if kv_qparams is not None else kv_mode if policy else "none"
    own = wt.group_size(next(iter(qlin.values()))) if qlin else None
    write_config(wdir, args, model_name=model_name, weight_type=wt.name, group_size=own or group_size,
                 quant_policy=policy, kv_mode=mode, tp=tp, **serve)
    if tokenizer_dir is not None:
        shutil.copytree(tokenizer_dir, Path(out) / TOKENIZER, dirs_exist_ok=True)
    return {"weight_type": wt.name, "tp": tp, "quant_policy": policy, "kv_mode": mode}


# ------------------------------------------------------------------------------------ read back
def reassemble(ws, device="cpu") -> tuple[ModelArgs, dict]:
    """All ranks -> canonical tensors: names like write_workspace's `tensors` ("layers.0.q.weight"), and for
    quantized linears what the quantizer wrote (int4: the (q, scales, zeros) triple; int8: the W8Weight) under the
    linear's name ("layers.0.q"). Exact inverse of write_workspace (tests, tools)."""
    w = Workspace.open(ws)
    args, wt = w.args, w.wtype
    out = {"embed.weight": w.tensor("tok_embeddings.weight", device), "norm.weight": w.tensor("norm.weight", device)}
    if not args.tie_embeddings:
        out["lm_head.weight"] = w.tensor("output.weight", device)
    for i in range(args.n_layers):
        p, L = f"layers.{i}.", f"layers.{i}"
        out[p + "attn_norm.weight"] = w.tensor(f"{L}.attention_norm.weight", device)
        out[p + "mlp_norm.weight"] = w.tensor(f"{L}.ffn_norm.weight", device)
        for n, x in w.layer_pieces(i, device).items():
            if n == "kv_static":
                if x is not None:
                    out[p + "past_kv_scale"] = x
            elif n.endswith(".bias"):
                if x is not None:
                    out[p + n] = x
            else:
                out[p + n + wt.canonical_suffix] = wt.to_canonical(x)
    return args, out


# ------------------------------------------------------------------------------------ HF / AutoAWQ folders
def from_hf_folder(path: Path, out: Path, tp: int = 1, model_name: Optional[str] = None, **serve) -> dict:
    """A workspace from a Hugging Face folder: fp16 weights, or a pre-quantized checkpoint's own int4 linears
    (AutoAWQ GEMM, GPTQ, compressed-tensors W4A16: pipeline/models/prequant.py; 16-bit dequantized where its
    groups do not fit the kernels, e.g. act-order)."""
    from ..models.prequant import read_quantized
    from ..models.sources import load_hf_folder
    path = Path(path)
    ck = read_quantized(path, torch.float16)
    if ck is None:
        args, tensors, _ = load_hf_folder(path)
        return _write(out, path, args, tensors, tp=tp, model_name=model_name or path.name,
                      dtype=next(iter(tensors.values())).dtype, **serve)
    return _write(out, path, ck.args, ck.tensors, tp=tp, w4=ck.w4, group_size=ck.group_size or 128,
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
