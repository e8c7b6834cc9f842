"""Engine vs the reference model on SmolLM2-135M-Instruct (CPU, kernels' PyTorch references).

- fp16 workspace: greedy tokens for 64 new tokens equal the reference's (same fp16-rounded weights, fp32
  compute), three chat prompts of different lengths batched together.
- perplexity through the engine's prefill equals evaluate.perplexity on the reference within 0.5%, for
  fp16 and for W4A16 (RTN, group 64) + dynamic int8 KV (slow).
"""
from __future__ import annotations

import pytest
import torch

from pipeline.engine import Engine, SamplingParams
from pipeline.models.llama import build_model
from pipeline.models.sources import load_gguf, save_tokenizer
from pipeline.workspace import write_workspace


@pytest.fixture(scope="module")
def smol(smollm2_gguf, tmp_path_factory):
    root = tmp_path_factory.mktemp("smol")
    args, tensors, tok_src = load_gguf(smollm2_gguf)
    save_tokenizer(tok_src, root / "tok")
    write_workspace(root / "fp16", args, tensors, root / "tok", model_name="smollm2-135m")
    t16 = {k: v.half().float() for k, v in tensors.items()}
    return {"root": root, "args": args, "tensors": tensors, "t16": t16}


@pytest.mark.slow   # ~1 min alone on 2 cores, over 3 min on a loaded machine: out of the default run
@torch.no_grad()
def test_fp16_greedy_64_tokens_batched_equals_reference(smol):
    eng = Engine.from_workspace(smol["root"] / "fp16", "cpu", {"session_len": 512, "max_prefill_tokens": 64})
    qs = ["What is the capital of France?", "Write a haiku about the sea.",
          "Explain in two sentences why the sky is blue, and mention Rayleigh scattering by name."]
    prompts = [eng.apply_chat_template([{"role": "user", "content": q}]) for q in qs]
    assert len({len(p) for p in prompts}) == 3
    out = eng.generate(prompts, SamplingParams(max_new_tokens=64, ignore_eos=True))
    ref = build_model(smol["args"], smol["t16"])
    for p, o in zip(prompts, out):
        # teacher-forced: the reference's argmax after every prefix of the engine's tokens is the engine's
        # next token, which (by induction) is the reference's own greedy sequence, in one forward pass
        logits = ref(torch.tensor([p + o]))[0, len(p) - 1:-1]
        assert logits.argmax(-1).tolist() == o


@pytest.mark.slow
@torch.no_grad()
def test_perplexity_through_engine_equals_evaluate(smol):
    from types import SimpleNamespace

    from pipeline.data import eval_text
    from pipeline.quant.kv import attach_kv_fake_quant
    from pipeline.quant.w4 import dequantize, quantize
    from pipeline.stages.evaluate import perplexity, windows
    eng16 = Engine.from_workspace(smol["root"] / "fp16", "cpu", {"session_len": 512})
    data = windows(torch.tensor(eng16.tokenizer(eval_text(None), add_special_tokens=False).input_ids), 256, 4)
    args, t16 = smol["args"], smol["t16"]
    w4, tq = {}, dict(t16)
    for k, v in smol["tensors"].items():
        if k.startswith("layers.") and k.endswith(".weight") and v.dim() == 2:
            q, s, z = quantize(v, 4, 64)
            w4[k[: -len(".weight")]] = (q, s, z)
            tq[k] = dequantize(q, s, z, 64)
    write_workspace(smol["root"] / "w4kv8", args, smol["tensors"], smol["root"] / "tok", w4=w4, group_size=64,
                    kv_bits=8, kv_mode="dynamic")
    eng4 = Engine.from_workspace(smol["root"] / "w4kv8", "cpu", {"session_len": 512})
    assert eng4.runner.kv_mode == "dynamic" and eng4.stats()["quant_policy"] == 4
    ref4 = build_model(args, tq)
    attach_kv_fake_quant(ref4, SimpleNamespace(kv_bits=8, kv_mode="dynamic", kv_sym=False), None)
    for eng, ref in ((eng16, build_model(args, t16)), (eng4, ref4)):
        want, _ = perplexity(ref, data, 2, torch.device("cpu"))
        nll = 0.0
        for w in data:
            logits = eng.prompt_logits(w.tolist())[:-1]
            nll += torch.nn.functional.cross_entropy(logits, w[1:], reduction="sum").item()
        got = float(torch.exp(torch.tensor(nll / data[:, 1:].numel())))
        assert abs(got - want) / want < 0.005, (got, want)
