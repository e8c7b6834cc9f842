"""Quantization methods, one table: a quant config selects one weight method and one KV method, and the stage
graph's shape comes from them (evaluate and turbomind read the weight method's artifact, plus the static KV
qparams when the KV method needs them).

    m = select(cfg)                    # validates cfg for the methods it selects; m.weight, m.kv
    m.upstream()                       # ["load", "pack", "kv_qparams"]: evaluate's / turbomind's inputs
    m.weight.apply(model, inputs); m.kv.apply(model, cfg.quant, m.kv_dir(inputs))   # evaluation
    tensors, linears, weight_type = m.weight.read(inputs, args, device); m.kv.read(m.kv_dir(inputs), args, cfg.quant)

Adding a method: a module here with a WeightMethod (or KvMethod) subclass (pipeline/methods/base.py) and one
row in WEIGHT_METHODS (or KV_METHODS); the stages it names must exist in pipeline/stages/__init__.py. Its
`weight_type` names the row of pipeline.weights.WEIGHT_TYPES its linears are served as (a new kind of linear:
a module in pipeline/weights and one row there).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .awq import AWQ, RTN
from .base import KvMethod, WeightMethod
from .fp16 import FP16
from .gptq import AWQGPTQ, GPTQ
from .kv import DynamicKV, NoKV, StaticKV
from .smoothquant import SmoothQuant

WEIGHT_METHODS: dict[str, WeightMethod] = {
    "fp16": FP16(),
    "rtn": RTN(),
    "awq": AWQ(),
    "gptq": GPTQ(),                    # error feedback (+ AWQ's scales and clips first: awq_gptq)
    "awq_gptq": AWQGPTQ(),
    "smoothquant": SmoothQuant(),      # W8A8
}
KV_METHODS: dict[str, KvMethod] = {
    "none": NoKV(),
    "static": StaticKV(),              # int8 / int4, calibrated
    "dynamic": DynamicKV(),            # int8 / int4, per token
}

SERVED_HINT = ("the serving engine runs 16-bit weights (w_bits null), W4A16 (w_bits=4) or W8A8 (w_bits=8, "
               "a_bits=8); other formats are evaluated, not served: run this one with pipeline=evaluate for its "
               "perplexity, or serve quant=w4a16_kv8 or quant=w8a8")


def _one(table: dict, q, what: str):
    found = [m for m in table.values() if m.matches(q)]
    if len(found) != 1:
        raise ValueError(f"quant={q.name}: {len(found)} {what} methods match ({[m.name for m in found]}); "
                         f"known: {list(table)}")
    return found[0]


@dataclass(frozen=True)
class Selected:
    weight: WeightMethod
    kv: KvMethod

    def kv_source(self) -> Optional[str]:
        """The stage whose artifact holds the static KV qparams, or None when the KV method needs none."""
        return self.weight.kv_qparams_from if "kv_qparams" in self.kv.stages else None

    def upstream(self) -> list[str]:
        """What evaluate and turbomind read: load, the weight artifact, the static KV qparams."""
        ups = ["load"]
        if self.weight.artifact:
            ups.append(self.weight.artifact)
        src = self.kv_source()
        if src and src not in ups:
            ups.append(src)
        return ups

    def stages(self) -> list[str]:
        """Every stage the two methods need, upstream first."""
        out = ["load"]
        for s in self.weight.stages + self.kv.stages:
            if s not in out:
                out.append(s)
        return out

    def kv_dir(self, inputs: dict[str, Path]) -> Optional[Path]:
        src = self.kv_source()
        return inputs.get(src) if src else None


def select(cfg, serving: bool = False, validate: bool = True) -> Selected:
    """The weight and KV methods cfg.quant selects, checked: a bad config is refused here, before anything runs.
    serving: also refuse weights the serving engine has no kernel path for. validate=False inside a stage's
    run (its cfg holds only the sub-trees it reads; the whole config was checked while planning)."""
    q = cfg.quant
    sel = Selected(_one(WEIGHT_METHODS, q, "weight"), _one(KV_METHODS, q, "KV"))
    if not validate:
        return sel
    sel.weight.validate(cfg)
    sel.kv.validate(cfg)
    if serving and not sel.weight.served(q):
        raise ValueError(f"quant={q.name} (w_bits={q.w_bits}, a_bits={q.a_bits}): {SERVED_HINT}")
    return sel


def require(cfg, stage: str) -> WeightMethod:
    """The selected weight method, which must run `stage` (a method stage's inputs() call this: a config whose
    method does not run the stage is refused while planning, with the method's own checks)."""
    sel = select(cfg)
    if stage not in sel.stages():
        raise ValueError(f"stage {stage} is not part of quant={cfg.quant.name} (weight method {sel.weight.name}, "
                         f"KV method {sel.kv.name}: stages {sel.stages()})")
    return sel.weight
