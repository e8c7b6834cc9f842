"""Quantize a 7B model on one GPU: time and peak device memory of load, calibrate, awq, [gptq,] pack, kv_qparams.

    python bench/quantize_7b.py --out results.json                       # synthetic Llama-2-7B, 128 x 2048
    python bench/quantize_7b.py --samples 32 --layers 8 --out r.json     # a fraction (say so when reporting)
    python bench/quantize_7b.py --method awq_gptq --out r.json           # AWQ + GPTQ (gptq: GPTQ alone)

Runs the stages' run() functions directly (no Hydra run folder, no cache), each into a fresh folder,
with the config the runner would build (conf/model/synthetic-llama2-7b.yaml, quant=w4a16 at group 128; --method
gptq / awq_gptq: conf/quant/w4a16_gptq.yaml / w4a16_awq_gptq.yaml's settings at the same group).
Calibration text: the embedded corpus (Python's pydoc topics) through the synthetic byte tokenizer.
Peak memory: torch.cuda.max_memory_allocated, reset before every stage.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline import stages
from pipeline.graph import StageContext, sub_config
from pipeline.schema import Config

PRESETS = {"awq": "w4a16", "gptq": "w4a16_gptq", "awq_gptq": "w4a16_awq_gptq"}   # --method -> conf/quant/<preset>


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--search-samples", type=int, default=8)
    ap.add_argument("--group", type=int, default=128)
    ap.add_argument("--layers", type=int, default=32, help="decoder blocks (32 = the whole 7B model)")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--device", default="cuda", help="cuda (timings) or cpu (a smoke run of the script)")
    ap.add_argument("--method", default="awq", choices=list(PRESETS), help="awq | gptq | awq_gptq")
    ap.add_argument("--out", default="quantize_7b.json")
    a = ap.parse_args()
    repo = Path(__file__).resolve().parents[1]
    model = OmegaConf.load(repo / "conf/model/synthetic-llama2-7b.yaml")
    model.shape.n_layers = a.layers
    preset = OmegaConf.load(repo / f"conf/quant/{PRESETS[a.method]}.yaml")
    method = {k: v for k, v in preset.items() if k in ("search", "clip", "gptq") or k.startswith("gptq_")}
    cfg = OmegaConf.merge(OmegaConf.structured(Config), {"model": model, "quant": {
        "name": PRESETS[a.method], "w_bits": 4, "group_size": a.group, "kv_bits": 8, **method,
        "search_samples": a.search_samples, "calib": {"dataset": "embedded", "samples": a.samples, "seqlen": a.seqlen}}})
    gptq = bool(cfg.quant.gptq)
    dev = torch.device(a.device)
    cuda = dev.type == "cuda"
    work = Path(a.workdir or tempfile.mkdtemp(prefix="q7b-"))
    paths, rows = {}, []
    plan = [("load", []), ("calibrate", ["load"]), ("awq", ["load", "calibrate"])]
    plan += [("gptq", ["load", "calibrate", "awq"])] * gptq
    plan += [("pack", ["load", "awq"] + ["gptq"] * gptq), ("kv_qparams", ["load", "calibrate"])]
    for name, ups in plan:
        mod = stages.get(name)
        out = work / name
        out.mkdir(parents=True, exist_ok=True)
        ctx = StageContext(name=name, cfg=sub_config(cfg, mod.READS), inputs={u: paths[u] for u in ups}, out=out,
                           device=dev, run_dir=work, download_dir=work / "downloads")
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        summary = mod.run(ctx)
        if cuda:
            torch.cuda.synchronize()
        rows.append({"stage": name, "seconds": round(time.perf_counter() - t0, 2),
                     "peak_GiB": round(torch.cuda.max_memory_allocated() / 2 ** 30, 3) if cuda else None, "summary": summary})
        paths[name] = out
        print(f"{name:10s} {rows[-1]['seconds']:8.1f} s  peak {rows[-1]['peak_GiB']} GiB", flush=True)
        Path(a.out).write_text(json.dumps({"partial": True, "stages": rows}, indent=2))  # survives a timeout
    quant = [r for r in rows if r["stage"] in ("calibrate", "awq", "gptq", "pack")]
    res = {"device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__, "layers": a.layers,
           "method": a.method, "quant": OmegaConf.to_container(cfg.quant),
           "calib": f"{a.samples} x {a.seqlen}", "search_samples": a.search_samples, "group_size": a.group,
           "stages": rows, "quantize_seconds": round(sum(r["seconds"] for r in quant), 2),
           "quantize_peak_GiB": max(r["peak_GiB"] for r in quant) if cuda else None}
    Path(a.out).write_text(json.dumps(res, indent=2))
    print(f"{'+'.join(r['stage'] for r in quant)}: {res['quantize_seconds']:.1f} s, peak {res['quantize_peak_GiB']} GiB "
          f"({a.layers} layers, calib {res['calib']})")


if __name__ == "__main__":
    main()
