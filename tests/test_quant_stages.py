"""Quantization stages end to end: cache keys (group_size reruns awq onward only), config-time refusal,
offline named sets, and the proof's two relations on a shortened SmolLM2 protocol:
AWQ perplexity below RTN at the same bits and group, kv8 within 1% of fp16."""
import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from pipeline import stages
from pipeline.graph import StageContext, sub_config
from pipeline.schema import Config

from conftest import DOWNLOADS, compose

TINY = ["model=tiny-random", "pipeline=evaluate", "eval.windows=2", "eval.seqlen=64", "quant.calib.samples=4", "quant.calib.seqlen=64",
        "quant.search_samples=2", "quant.n_grid=4"]


def statuses(run_dir: Path) -> dict:
    rep = json.loads((run_dir / "report.json").read_text())
    return {s["name"]: s["status"] for s in rep["stages"]}


def test_group_size_change_reruns_awq_pack_evaluate_not_calibrate(cli):
    run1, run2 = cli.tmp / "r1", cli.tmp / "r2"
    cli(*TINY, "quant=w4a16_kv8", "quant.group_size=64", f"hydra.run.dir={run1}")
    assert set(statuses(run1).values()) == {"ran"}
    cli(*TINY, "quant=w4a16_kv8", "quant.group_size=32", f"hydra.run.dir={run2}")
    assert statuses(run2) == {"load": "cached", "calibrate": "cached", "awq": "ran", "pack": "ran",
                              "kv_qparams": "cached", "evaluate": "ran"}
    packed = next((cli.tmp / "cache" / "pack").glob("[0-9a-f]*"))
    qc = json.loads((packed / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "awq" and qc["version"] == "gemm" and qc["bits"] == 4


def test_group_size_that_does_not_divide_is_refused_naming_the_layer():
    # in-process: the runner makes this check while planning, before any stage runs (tiny: dim 64)
    with pytest.raises(ValueError) as e:
        compose(*TINY, "quant=w4a16", "quant.group_size=128")
    assert "group_size=128" in str(e.value) and "layers.*.q" in str(e.value)


def test_named_set_offline_fails_fast_with_a_hint(monkeypatch):
    from pipeline.quant.calib_data import calib_text
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    c = OmegaConf.create({"dataset": "pileval", "path": None})
    with pytest.raises(ValueError, match=r"quant.calib.dataset=file quant.calib.path="):
        calib_text(c)


def run_stage(name, cfg, inputs, root):
    mod = stages.get(name)
    out = root / f"{name}-{len(list(root.iterdir()))}"
    out.mkdir()
    ctx = StageContext(name=name, cfg=sub_config(cfg, mod.READS), inputs=inputs, out=out,
                       device=torch.device("cpu"), run_dir=out, download_dir=DOWNLOADS)
    return out, mod.run(ctx)


def test_awq_beats_rtn_and_kv8_within_1pct_of_fp16(tmp_path, smollm2_gguf, wikitext):
    base = OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.create({
        "download_dir": str(DOWNLOADS),
        "eval": {"path": str(wikitext["test"]), "windows": 4, "seqlen": 256, "batch_size": 4},
        "quant": {"calib": {"dataset": "file", "path": str(wikitext["valid"]), "samples": 8, "seqlen": 256},
                  "group_size": 64, "search_samples": 2, "n_grid": 5}}))

    def cfg(**quant):
        return OmegaConf.merge(base, OmegaConf.create({"quant": quant}))
    load, _ = run_stage("load", base, {}, tmp_path)
    cal, _ = run_stage("calibrate", base, {"load": load}, tmp_path)
    kvq, _ = run_stage("kv_qparams", base, {"load": load, "calibrate": cal}, tmp_path)
    ppl = {}
    for name, q in {"rtn": dict(w_bits=4, search=False, clip=False), "awq": dict(w_bits=4)}.items():
        c = cfg(name=name, **q)
        a, _ = run_stage("awq", c, {"load": load, "calibrate": cal}, tmp_path)
        p, _ = run_stage("pack", c, {"load": load, "awq": a}, tmp_path)
        ppl[name] = run_stage("evaluate", c, {"load": load, "pack": p}, tmp_path)[1]["ppl"]
    ppl["fp16"] = run_stage("evaluate", cfg(name="fp16"), {"load": load}, tmp_path)[1]["ppl"]
    ppl["kv8"] = run_stage("evaluate", cfg(name="kv8", kv_bits=8), {"load": load, "kv_qparams": kvq}, tmp_path)[1]["ppl"]
    print(ppl)
    assert ppl["awq"] < ppl["rtn"] - 0.2, ppl
    assert abs(ppl["kv8"] / ppl["fp16"] - 1) < 0.01, ppl
