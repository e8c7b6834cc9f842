"""evaluate: perplexity on a text file (non-overlapping windows) plus weight and KV memory.

Reads `eval` (path, windows, seqlen, batch_size, dtype) and `quant`. Summary: ppl, tokens, windows,
weight_bytes, kv_bytes_per_token. Also writes eval.json into the artifact.
"""
from __future__ import annotations

import json
import math

import torch
import torch.nn.functional as F

from ..data import eval_text
from ..methods import select
from ..models.store import parse_dtype, read_model, read_tokenizer

VERSION = 1
READS = ["eval", "quant"]


def inputs(cfg) -> list[str]:
    """load, the weight method's artifact, the KV qparams of a static KV method (pipeline/methods)."""
    return select(cfg).upstream()


def windows(tokens: torch.Tensor, seqlen: int, n: int) -> torch.Tensor:
    """The first n non-overlapping windows of seqlen tokens: (n, seqlen)."""
    avail = tokens.numel() // seqlen
    if avail == 0:
        raise ValueError(f"the evaluation text has {tokens.numel()} tokens, fewer than eval.seqlen={seqlen}")
    n = min(n, avail)
    return tokens[: n * seqlen].view(n, seqlen)


@torch.no_grad()
def perplexity(model, batches: torch.Tensor, batch_size: int, device, track=lambda it, **k: it) -> tuple[float, int]:
    """exp(mean next-token NLL) over all windows; each window predicts its tokens 1..T-1."""
    nll, count = 0.0, 0
    chunks = list(batches.split(batch_size))
    for x in track(chunks, total=len(chunks), description="perplexity"):
        x = x.to(device)
        logits = model(x)[:, :-1].float()                                   # (B, T-1, V)
        nll += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum").item()
        count += x[:, 1:].numel()
    return math.exp(nll / count), count


def weight_bytes(model, quant) -> int:
    """Bytes of the weights as served: linears at w_bits (+ fp16 scale and zero per group), the rest 16-bit."""
    total = 0
    for name, p in model.named_parameters():
        is_linear = name.startswith("layers.") and name.endswith(".weight") and p.dim() == 2
        if is_linear and quant.w_bits:
            total += p.numel() * quant.w_bits // 8 + (0 if quant.a_bits else p.numel() // quant.group_size * 4)
        else:
            total += p.numel() * 2
    return total


def kv_bytes_per_token(args, quant) -> float:
    per_head = args.head_dim * (quant.kv_bits or 16) / 8
    if quant.kv_bits and quant.kv_mode == "dynamic":
        per_head += 4  # a 16-bit scale and zero point per token and head
    return 2 * args.n_layers * args.n_kv_heads * per_head


def build_eval_model(ctx, dtype):
    """The reference model with the quant config's weights and KV handling applied."""
    model = read_model(ctx.inputs["load"], device=ctx.device, dtype=dtype)
    m = select(ctx.cfg, validate=False)
    m.weight.apply(model, ctx.inputs)
    m.kv.apply(model, ctx.cfg.quant, m.kv_dir(ctx.inputs))
    return model


def run(ctx) -> dict:
    e = ctx.cfg.eval
    dtype = parse_dtype(e.dtype, ctx.device)
    tok = read_tokenizer(ctx.inputs["load"])
    ids = torch.tensor(tok(eval_text(e.path), add_special_tokens=False).input_ids)
    data = windows(ids, e.seqlen, e.windows)
    model = build_eval_model(ctx, dtype)
    ppl, n = perplexity(model, data, e.batch_size, ctx.device, ctx.track)
    res = {"ppl": round(ppl, 4), "tokens": n, "windows": data.shape[0], "seqlen": e.seqlen,
           "dtype": str(dtype).replace("torch.", ""), "quant": ctx.cfg.quant.name,
           "weight_bytes": weight_bytes(model, ctx.cfg.quant),
           "kv_bytes_per_token": kv_bytes_per_token(model.args, ctx.cfg.quant)}
    (ctx.out / "eval.json").write_text(json.dumps(res, indent=2))
    return res
