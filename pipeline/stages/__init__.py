"""The stage table: name -> module. A stage module defines

    VERSION: int                   bump when the artifact's meaning changes (invalidates caches)
    READS: list[str]               dotted config paths hashed into its key (and all it may read)
    CACHED: bool = True            False for terminal stages whose output is not an artifact (serve)
    inputs(cfg) -> list[str]       upstream stages, given the whole config
    run(ctx) -> dict               writes files into ctx.out, returns a small JSON summary

A stage never imports another stage (tests/test_import_graph.py): the formats it writes and reads live in
pipeline/artifacts/, and which stages a quant config needs (evaluate's, turbomind's and awq's inputs, and the
config checks) in the method table, pipeline/methods/.
"""
from __future__ import annotations

import importlib
from types import ModuleType

STAGES = {
    "load": "pipeline.stages.load",
    "calibrate": "pipeline.stages.calibrate",
    "kv_qparams": "pipeline.stages.kv_qparams",
    "awq": "pipeline.stages.awq",
    "gptq": "pipeline.stages.gptq",
    "pack": "pipeline.stages.pack",
    "export_ct": "pipeline.stages.export_ct",
    "smooth": "pipeline.stages.smooth",
    "quant_w8": "pipeline.stages.quant_w8",
    "turbomind": "pipeline.stages.turbomind",
    "evaluate": "pipeline.stages.evaluate",
    "serve": "pipeline.stages.serve",
}


def get(name: str) -> ModuleType:
    if name not in STAGES:
        raise ValueError(f"unknown stage {name!r}; known stages: {', '.join(STAGES)}")
    try:
        return importlib.import_module(STAGES[name])
    except ModuleNotFoundError as e:
        if e.name == STAGES[name]:
            raise ValueError(f"stage {name!r} is not implemented yet in this version") from None
        raise
