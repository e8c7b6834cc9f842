"""Run the reference model one decoder block at a time: only one block's weights on the device.

    for step in walk_blocks(load_dir, tokens, device, dtype, track):
        ...   # observe / search on step.block (block step.i) with its input step.x (N, T, D)
        step.forward()   # optional: advance x through the block now (hooks see it); else done after the body
        step.done = True # or: the body wrote the block's output into step.x itself (gptq)
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..models.llama import Block, ModelArgs, rope_cos_sin
from ..models.store import read_args, read_tensors

LINEARS = ("q", "k", "v", "o", "gate", "up", "down")


def compute_dtype(load_dir: Path, device) -> torch.dtype:
    """The dtype blockwise passes run in: fp32 on CPU; the checkpoint's 16-bit dtype (or fp16) on a GPU."""
    if device.type != "cuda":
        return torch.float32
    from safetensors import safe_open
    with safe_open(str(Path(load_dir) / "model.safetensors"), framework="pt") as f:
        dt = f.get_slice(next(iter(f.keys()))).get_dtype()
    return torch.bfloat16 if dt == "BF16" else torch.float16


def block_tensor_names(args: ModelArgs, i: int) -> list[str]:
    p = f"layers.{i}."
    names = [p + "attn_norm.weight", p + "mlp_norm.weight"] + [p + f"{n}.weight" for n in LINEARS]
    if args.qkv_bias:
        names += [p + f"{n}.bias" for n in "qkv"]
    if args.o_bias:
        names.append(p + "o.bias")
    return names


def load_block(load_dir: Path, args: ModelArgs, i: int, device, dtype) -> Block:
    p = f"layers.{i}."
    t = read_tensors(load_dir, block_tensor_names(args, i), device=device, dtype=dtype)
    with torch.device("meta"):
        block = Block(args)
    block = block.to_empty(device=device).to(dtype)
    block.load_state_dict({k[len(p):]: v for k, v in t.items()}, strict=True)
    return block.eval()


def tokens_per_batch(seqlen: int, budget: int = 8192) -> int:
    return max(1, budget // seqlen)


@torch.no_grad()
def block_forward(block: Block, x: torch.Tensor, cos, sin, batch: int) -> torch.Tensor:
    """Block output for all N sequences of x (N, T, D), computed `batch` sequences at a time, in place."""
    for s in range(0, x.shape[0], batch):
        x[s: s + batch] = block(x[s: s + batch], cos, sin)
    return x


@dataclass
class BlockStep:
    """Block i with its input hidden states x (N, T, D) and rope cos/sin (T, hd/2)."""
    i: int
    block: Block
    x: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor
    batch: int
    done: bool = False

    def forward(self) -> torch.Tensor:
        """Advance x through the block in place (once); hooks on the block see this forward."""
        if not self.done:
            block_forward(self.block, self.x, self.cos, self.sin, self.batch)
            self.done = True
        return self.x


@torch.no_grad()
def walk_blocks(load_dir: Path, tokens: torch.Tensor, device, dtype, track=lambda it, **k: it,
                description: str = "blocks"):
    """Yield a BlockStep per decoder block; x is advanced through the block after the body (if the
    body did not call step.forward() itself)."""
    args = read_args(load_dir)
    emb = read_tensors(load_dir, ["embed.weight"], device=device, dtype=dtype)["embed.weight"]
    x = emb[tokens.to(device)]                                                 # (N, T, D)
    del emb
    cos, sin = rope_cos_sin(args, torch.arange(tokens.shape[1], device=device))
    batch = tokens_per_batch(tokens.shape[1])
    for i in track(range(args.n_layers), total=args.n_layers, description=description):
        step = BlockStep(i, load_block(load_dir, args, i, device, dtype), x, cos, sin, batch)
        yield step
        step.forward()
        del step
