"""Perplexity through the pipeline equals what transformers computes on the same tokens."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F


# ~47 s on 2 cores: slow; the default run keeps SmolLM2's logits vs transformers (test_model.py) and the native
# backend's perplexity vs the evaluate stage's (test_native_smollm2.py)
@pytest.mark.slow
def test_smollm2_perplexity_matches_transformers(cli, smollm2_gguf, wikitext):
    transformers = pytest.importorskip("transformers")
    p = cli("pipeline=evaluate", "quant=fp16", f"eval.path={wikitext['test']}", "eval.windows=3", "eval.seqlen=128")
    rep = json.loads((cli.tmp / "run" / "report.json").read_text())
    ours = next(s for s in rep["stages"] if s["name"] == "evaluate")["summary"]
    assert (cli.tmp / "run" / "evaluate.json").exists() and "ppl=" in p.stdout
    load_dir = next(s for s in rep["stages"] if s["name"] == "load")["path"]
    from pipeline.models.store import read_tokenizer
    assert "<|im_start|>assistant" in read_tokenizer(load_dir).apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)

    tok = transformers.AutoTokenizer.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name, dtype=torch.float32).eval()
    ids = torch.tensor(tok(wikitext["test"].read_text(), add_special_tokens=False).input_ids)[: 3 * 128].view(3, 128)
    with torch.no_grad():
        logits = model(ids).logits[:, :-1]
    ref = math.exp(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)).item())
    assert ours["windows"] == 3 and ours["tokens"] == 3 * 127
    assert abs(ours["ppl"] - ref) / ref < 1e-3, (ours["ppl"], ref)


def test_tiny_model_end_to_end_and_cache(cli):
    # the default deploy pipeline with the default quant (w4a16_kv8): load, calibrate, awq, pack,
    # kv_qparams, evaluate, turbomind (cached stages) and serve (never cached)
    small = ["model=tiny-random", "eval.windows=2", "eval.seqlen=64", "serve.max_new_tokens=4",
             "quant.calib.samples=4", "quant.calib.seqlen=64"]
    first = cli(*small)
    assert first.stdout.count("ran in") == 8 and ">>> What is the capital of France?" in first.stdout
    for stage in ("calibrate", "awq", "pack", "kv_qparams", "turbomind"):
        assert stage in first.stdout
    second = cli(*small)
    assert second.stdout.count("cached") == 7 and second.stdout.count("ran in") == 1
