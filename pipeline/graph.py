"""Plan and execute the stage graph: keys, cache hits, locks, atomic artifacts.

The runner (pipeline/runner.py) owns the console; this module owns disk and keys.
"""
from __future__ import annotations

import copy
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from omegaconf import DictConfig, OmegaConf

from . import stages as stage_table
from .cache import Cache, stage_key

log = logging.getLogger(__name__)

PATH_KEYS = ("model.path", "eval.path", "quant.calib.path")  # config values naming files or folders


@dataclass
class StageContext:
    """What a stage sees: its own config sub-trees, its inputs' folders and a folder to write into."""
    name: str
    cfg: DictConfig                 # only the sub-trees the stage declared in READS
    inputs: dict[str, Path]         # upstream stage name -> artifact folder
    out: Path                       # write artifacts here; the runner renames it into the cache
    device: torch.device
    run_dir: Path                   # Hydra's run folder (logs, reports); not cached
    download_dir: Path
    track: Callable = field(default=lambda it, total=None, description="": it)  # progress over an iterable
    full_cfg: Optional[DictConfig] = None  # only for uncached terminal stages (serve)


@dataclass
class PlannedStage:
    name: str
    module: Any
    key: str
    upstream: list[str]
    config: dict
    cached: bool


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={name!r} but no CUDA device is available here; use device=cpu or device=auto")
    return dev


def fingerprint(path: Optional[str]) -> Any:
    """Cheap identity of a file or folder named in the config: names, sizes and mtimes."""
    if not path:
        return None
    p = Path(path)
    if p.is_file():
        st = p.stat()
        return [p.name, st.st_size, st.st_mtime_ns]
    if p.is_dir():
        return sorted([f.relative_to(p).as_posix(), f.stat().st_size, f.stat().st_mtime_ns]
                      for f in p.rglob("*") if f.is_file())
    return None


# Keys removed from the schema (pipeline/schema.py), with the one value they ever had: a stage that still
# declares one in READS reads this value, and a stage reading a whole sub-tree (evaluate and turbomind read
# `quant`) hashes it as before, so cache keys made before the removal stay valid.
RETIRED = {"quant.num_tp": 1, "quant.extra": {}}
# Keys added to the schema later, with their default: a stage's key leaves them out while they hold it, so
# cache keys made before they existed stay valid.
ADDED = {"model.revision": None, "quant.gptq": False, "quant.gptq_damp": 0.01, "quant.gptq_block": 128,
         "quant.gptq_desc_act": False, "quant.gptq_mse": False, "quant.gptq_feedback": 1.0}


def _hashed(conf: dict) -> dict:
    """A stage's config as its key hashes it: ADDED keys at their default left out."""
    conf = copy.deepcopy(conf)
    for path, default in ADDED.items():
        *parents, leaf = path.split(".")
        node = conf
        for p in parents:
            node = node.get(p) if isinstance(node, dict) else None
        if isinstance(node, dict) and leaf in node and node[leaf] == default:
            del node[leaf]
    return conf


def sub_config(cfg: DictConfig, reads: list[str]) -> DictConfig:
    """The sub-trees of cfg named by reads (a stage's READS), read-only; what the stage sees and hashes."""
    sub = OmegaConf.create({})
    for path in reads:
        val = OmegaConf.select(cfg, path, throw_on_missing=True)
        OmegaConf.update(sub, path, RETIRED[path] if val is None and path in RETIRED else val, force_add=True)
    for path, val in RETIRED.items():
        if any(path.startswith(r + ".") for r in reads) and OmegaConf.select(cfg, path) is None:
            OmegaConf.update(sub, path, val, force_add=True)
    OmegaConf.set_readonly(sub, True)
    return sub


def plan(cfg: DictConfig) -> list[PlannedStage]:
    """Topologically ordered stages needed to reach cfg.pipeline.targets, each with its key."""
    order: list[str] = []
    visiting: set[str] = set()

    def visit(name: str) -> None:
        if name in order:
            return
        if name in visiting:
            raise ValueError(f"stage graph has a cycle through {name!r}")
        visiting.add(name)
        for up in stage_table.get(name).inputs(cfg):
            visit(up)
        visiting.discard(name)
        order.append(name)

    for t in cfg.pipeline.targets:
        visit(t)
    planned: dict[str, PlannedStage] = {}
    for name in order:
        mod = stage_table.get(name)
        ups = list(mod.inputs(cfg))
        conf = OmegaConf.to_container(sub_config(cfg, mod.READS), resolve=True)
        prints = {p: fingerprint(OmegaConf.select(cfg, p)) for p in PATH_KEYS
                  if any(p == r or p.startswith(r + ".") for r in mod.READS)}
        key = stage_key(name, mod.VERSION, {"config": _hashed(conf), "files": prints}, {u: planned[u].key for u in ups})
        planned[name] = PlannedStage(name, mod, key, ups, conf, getattr(mod, "CACHED", True))
    return [planned[n] for n in order]


def _pause_for_tests(stage: str) -> None:
    """PIPELINE_TEST_PAUSE=<stage>:<seconds>: sleep after <stage> wrote its files into its temp folder
    and before the commit, holding the lock (so tests can SIGKILL a run in the middle of a stage)."""
    spec = os.environ.get("PIPELINE_TEST_PAUSE", "")
    name, _, secs = spec.partition(":")
    if name == stage:
        log.warning("PIPELINE_TEST_PAUSE: pausing %s s inside stage %s", secs, stage)
        time.sleep(float(secs))


@dataclass
class StageStatus:
    """What execute would do with a planned stage (the plan view, pipeline.dry_run=true)."""
    stage: PlannedStage
    cached: bool
    why: str = ""                   # when not cached: no entry | incomplete: ... | corrupt: ... | upstream ...
    owner: Optional[dict] = None    # the live process computing it now, if any


def status(steps: list[PlannedStage], cache: Cache) -> list[StageStatus]:
    """Each planned stage with whether its artifact is in the cache and, if not, why. Runs nothing."""
    out: list[StageStatus] = []
    missing: set[str] = set()
    for st in steps:
        man, why = cache.check(st.name, st.key) if st.cached else (None, "a terminal stage, never cached")
        owner = None
        if man is None:
            missing.add(st.name)
            owner = cache.lock_owner(st.name, st.key) if st.cached else None
            ups = [u for u in st.upstream if u in missing]
            if ups:
                why += f"; upstream not cached: {', '.join(ups)}"
        out.append(StageStatus(st, man is not None, why, owner))
    return out


@dataclass
class StageResult:
    name: str
    key: str
    status: str                     # cached | ran | failed | planned (dry run)
    seconds: float = 0.0
    summary: dict = field(default_factory=dict)
    path: Optional[Path] = None


def execute(cfg: DictConfig, steps: list[PlannedStage], cache: Cache, run_dir: Path, track=None,
            on_start=None, on_wait=None, results: Optional[list] = None) -> list[StageResult]:
    """Run the planned stages, skipping the ones whose artifact is in the cache; returns their StageResults.
    Each result is appended to `results` (a new list unless an empty one is given) as its stage ends, so a caller that passes
    its own list still has the results so far (the failed stage last) when a stage raises."""
    device = resolve_device(cfg.device)
    results = [] if results is None else results
    paths: dict[str, Path] = {}
    for st in steps:
        ctx_kwargs = dict(name=st.name, cfg=sub_config(cfg, st.module.READS),
                          inputs={u: paths[u] for u in st.upstream}, device=device, run_dir=run_dir,
                          download_dir=Path(cfg.download_dir), track=track or (lambda it, **k: it))
        if not st.cached:
            if on_start:
                on_start(st)
            t0 = time.time()
            out = run_dir / st.name
            out.mkdir(parents=True, exist_ok=True)
            summary = st.module.run(StageContext(out=out, full_cfg=cfg, **ctx_kwargs)) or {}
            results.append(StageResult(st.name, st.key, "ran", time.time() - t0, summary, out))
            continue
        man = cache.lookup(st.name, st.key)
        if man is None:
            with cache.lock(st.name, st.key, on_wait=lambda owner: on_wait and on_wait(st, owner)):
                man = cache.lookup(st.name, st.key)  # someone else may have made it meanwhile
                if man is None:
                    if on_start:
                        on_start(st)
                    t0 = time.time()
                    tmp = cache.new_tmp(st.name, st.key)
                    try:
                        summary = st.module.run(StageContext(out=tmp, **ctx_kwargs)) or {}
                        _pause_for_tests(st.name)
                        man = cache.commit(st.name, st.key, tmp, {
                            "version": st.module.VERSION, "config": st.config, "summary": summary,
                            "upstream": {u: paths and next(r.key for r in results if r.name == u) for u in st.upstream},
                            "seconds": time.time() - t0})
                    except BaseException:
                        shutil.rmtree(tmp, ignore_errors=True)
                        results.append(StageResult(st.name, st.key, "failed", time.time() - t0))
                        raise
                    results.append(StageResult(st.name, st.key, "ran", time.time() - t0, man["summary"]))
        if not results or results[-1].name != st.name:
            results.append(StageResult(st.name, st.key, "cached", 0.0, man.get("summary", {})))
        paths[st.name] = cache.path(st.name, st.key)
        results[-1].path = paths[st.name]
    return results
