"""Per-channel activation statistics, accumulated over calibration batches.

Linear inputs (q/k/v share one input, gate/up share one), per input channel (C,):
    max, min, mean, absmax, absmean
K (after rotary) and V, per KV head and head_dim channel (n_kv_heads, head_dim): min, max, absmax

Saved names (stats.safetensors of the calibrate stage), fp32:
    layers.{i}.{qkv|o|gate_up|down}.{max|min|mean|absmax|absmean}
    layers.{i}.{k|v}.{min|max|absmax}
"""
from __future__ import annotations

import torch

# group of linears sharing an input -> (the linear whose input is observed, all members)
GROUPS = {"qkv": ("q", ("q", "k", "v")), "o": ("o", ("o",)), "gate_up": ("gate", ("gate", "up")),
          "down": ("down", ("down",))}
LINEAR_STATS = ("max", "min", "mean", "absmax", "absmean")
KV_STATS = ("min", "max", "absmax")


class ChannelStats:
    """Running per-channel max/min/sum/absmax/abssum over the last axis of every tensor it sees."""

    def __init__(self):
        self.n = 0
        self.acc: dict[str, torch.Tensor] = {}

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()                       # (n, C)
        a = x.abs()
        new = {"max": x.amax(0), "min": x.amin(0), "sum": x.sum(0), "absmax": a.amax(0), "abssum": a.sum(0)}
        if not self.acc:
            self.acc = new
        else:
            for k, v in new.items():
                op = {"max": torch.maximum, "absmax": torch.maximum, "min": torch.minimum}.get(k, torch.add)
                self.acc[k] = op(self.acc[k], v)
        self.n += x.shape[0]

    def result(self) -> dict[str, torch.Tensor]:
        a = self.acc
        return {"max": a["max"], "min": a["min"], "mean": a["sum"] / self.n, "absmax": a["absmax"],
                "absmean": a["abssum"] / self.n}


class KVStats:
    """Per (KV head, channel) min / max / absmax of K and V given as (B, nkv, T, hd)."""

    def __init__(self):
        self.acc: dict[str, torch.Tensor] = {}

    def __call__(self, k: torch.Tensor, v: torch.Tensor) -> None:
        for name, t in (("k", k), ("v", v)):
            t = t.detach().float()
            new = {"min": t.amin((0, 2)), "max": t.amax((0, 2)), "absmax": t.abs().amax((0, 2))}  # (nkv, hd)
            for s, val in new.items():
                key = f"{name}.{s}"
                old = self.acc.get(key)
                self.acc[key] = val if old is None else (torch.minimum if s == "min" else torch.maximum)(old, val)


def observe_block(block) -> tuple[dict, KVStats, list]:
    """Attach observers to one Block; returns (per-group ChannelStats, KVStats, hook handles)."""
    lin = {g: ChannelStats() for g in GROUPS}
    handles = []
    for g, (first, _) in GROUPS.items():
        handles.append(getattr(block, first).register_forward_pre_hook(
            lambda mod, args, st=lin[g]: st.update(args[0])))
    kv = KVStats()
    block.kv_observer = kv
    return lin, kv, handles


def block_stats(i: int, lin: dict, kv: KVStats) -> dict[str, torch.Tensor]:
    out = {}
    for g, st in lin.items():
        for k, v in st.result().items():
            out[f"layers.{i}.{g}.{k}"] = v.cpu()
    for k, v in kv.acc.items():
        out[f"layers.{i}.{k}"] = v.cpu()
    return out
