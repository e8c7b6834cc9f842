"""lm-eval-harness itself (`python -m lm_eval --model local-completions`) against our API server with SmolLM2 on the
CPU: multiple-choice, loglikelihood, loglikelihood_rolling (perplexity) and generate_until tasks defined in the test's
temp folder (JSON lines read through `dataset_path: json`, no hub), tokenized by lm-eval with the workspace's own
tokenizer (`tokenizer_backend=huggingface`, token-id prompts in batches). Every loglikelihood lm-eval reports equals
the reference model's (PyTorch log_softmax over the load stage's weights rounded to fp16, as the quant=fp16 workspace
serves them), its accuracy is what those give, its perplexity the evaluate stage's on the same windows, and its
generations equal our own greedy completions; then
`local-chat-completions` (--apply_chat_template) generates what our chat endpoint answers."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import openai
import pytest
import torch

from conftest import DOWNLOADS, reference_model
from pipeline.server.launch import ApiServer
from pipeline.stages.evaluate import perplexity

pytest.importorskip("lm_eval")
MODEL = "smollm2-135m"
MC = [{"question": "The capital of France is", "choices": [" Paris", " London", " Berlin"], "answer": 0},
      {"question": "Two plus two equals", "choices": [" four", " seven"], "answer": 0},
      {"question": "The color of a clear sky is", "choices": [" green", " blue"], "answer": 1}]
LL = [{"context": "The quick brown fox", "continuation": " jumps over the lazy dog"},
      {"context": "Water boils at", "continuation": " 100 degrees Celsius"}]
ROLL = [{"text": "The history of the city begins in the Roman era, when a small settlement grew on the banks of the "
                 "river. Over the centuries it became a centre of trade, and its markets drew merchants from far away."},
        {"text": "Photosynthesis is the process by which green plants use sunlight to turn water and carbon dioxide "
                 "into sugar and oxygen."}]
GEN = [{"prompt": "Question: What is the capital of France?\nAnswer:"}, {"prompt": "Once upon a time"}]
TASKS = {
    "tiny_mc": ("mc", MC, 'output_type: multiple_choice\ndoc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\n'
                "doc_to_target: \"{{answer}}\"\ntarget_delimiter: \"\"\nmetric_list:\n  - metric: acc\n"),
    "tiny_ll": ("ll", LL, 'output_type: loglikelihood\ndoc_to_text: "{{context}}"\ndoc_to_target: "{{continuation}}"\n'
                "target_delimiter: \"\"\nmetric_list:\n  - metric: perplexity\n"),
    "tiny_roll": ("roll", ROLL, 'output_type: loglikelihood_rolling\ndoc_to_text: ""\ndoc_to_target: "{{text}}"\n'
                  "metric_list:\n  - metric: word_perplexity\n"),
    "tiny_gen": ("gen", GEN, 'output_type: generate_until\ndoc_to_text: "{{prompt}}"\ndoc_to_target: ""\n'
                 "generation_kwargs:\n  until: [\"\\n\"]\n  max_gen_toks: 8\n  do_sample: false\n"
                 "metric_list:\n  - metric: exact_match\n"),
}


@pytest.fixture(scope="module")
def server(tmp_path_factory, smollm2_cache):
    s = ApiServer(tmp_path_factory.mktemp("lm_eval_srv"), "quant=fp16", "serve.session_len=512",
                  "serve.max_batch_size=8", f"download_dir={DOWNLOADS}", cache_dir=smollm2_cache).start()
    s.ref = reference_model(smollm2_cache)
    s.tokenizer_dir = next((smollm2_cache / "turbomind").glob("*/workspace")) / "triton_models" / "tokenizer"
    yield s
    assert s.stop() == 0, s.log()[-3000:]


def write_tasks(d) -> None:
    for name, (stem, docs, spec) in TASKS.items():
        (d / f"{stem}.jsonl").write_text("".join(json.dumps(x) + "\n" for x in docs))
        (d / f"{name}.yaml").write_text(f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
                                        f"    test: {d / (stem + '.jsonl')}\ntest_split: test\n{spec}")


def run_lm_eval(d, model: str, args: str, tasks: list[str], *flags: str) -> dict:
    """The lm_eval CLI; -> {task: [samples]} from its --log_samples files."""
    cmd = [sys.executable, "-m", "lm_eval", "--model", model, "--model_args", args, "--tasks", ",".join(tasks),
           "--include_path", str(d), "--output_path", str(d / model), "--log_samples", *flags]
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "OPENAI_API_KEY": "unused"}
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=d)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    out = {}
    for f in (d / model).rglob("samples_*.jsonl"):
        task = next(t for t in TASKS if f.name.startswith(f"samples_{t}_"))
        out[task] = sorted((json.loads(x) for x in f.read_text().splitlines()), key=lambda s: s["doc_id"])
    return out


@torch.no_grad()
def ref_loglikelihood(server, tok, context: str, continuation: str) -> float:
    """What lm-eval asks for, scored by the reference model: context and continuation tokenized as one text."""
    whole = tok(context + continuation, add_special_tokens=False).input_ids
    n_ctx = len(tok(context, add_special_tokens=False).input_ids)
    rows = torch.log_softmax(server.ref(torch.tensor([whole]))[0].float(), -1)
    return sum(rows[i - 1, whole[i]].item() for i in range(n_ctx, len(whole)))


@pytest.mark.slow   # two lm-eval CLI runs (start-up ~10 s each, 22 requests) and a SmolLM2 server: 1-4 min on 2 cores
def test_lm_eval_local_completions_matches_our_scoring(server, tmp_path):
    from lm_eval.utils import check_remote_tokenizer_support
    from transformers import AutoTokenizer
    assert check_remote_tokenizer_support(server.url + "/v1/completions")   # lm-eval's auto-detection: "remote"
    write_tasks(tmp_path)
    args = (f"model={MODEL},base_url={server.url}/v1/completions,tokenizer_backend=huggingface,"
            f"tokenizer={server.tokenizer_dir},tokenized_requests=True,max_retries=1,max_length=512")
    samples = run_lm_eval(tmp_path, "local-completions", args, list(TASKS), "--batch_size", "4")
    tok = AutoTokenizer.from_pretrained(str(server.tokenizer_dir))
    for s, doc in zip(samples["tiny_mc"], MC):
        got = [float(r[0]) for r in s["filtered_resps"]]
        want = [ref_loglikelihood(server, tok, doc["question"], c) for c in doc["choices"]]
        assert got == pytest.approx(want, abs=2e-3, rel=1e-3)
        assert s["acc"] == float(max(range(len(want)), key=want.__getitem__) == doc["answer"])
    assert sum(s["acc"] for s in samples["tiny_mc"]) == 3            # SmolLM2 gets these right
    for s, doc in zip(samples["tiny_ll"], LL):
        assert float(s["filtered_resps"][0][0]) == pytest.approx(
            ref_loglikelihood(server, tok, doc["context"], doc["continuation"]), abs=2e-3, rel=1e-3)
    # loglikelihood_rolling (perplexity): each text is one window after lm-eval's prefix token; the evaluate stage's
    # perplexity over the same window with the reference model agrees within 0.5% (the bar; measured: 3e-7)
    prefix = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    for s, doc in zip(samples["tiny_roll"], ROLL):
        ids = [prefix] + tok(doc["text"], add_special_tokens=False).input_ids
        ours, n = perplexity(server.ref, torch.tensor([ids]), 1, "cpu")
        assert n == len(ids) - 1
        assert math.exp(-float(s["filtered_resps"][0]) / n) == pytest.approx(ours, rel=5e-3)
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    for s, doc in zip(samples["tiny_gen"], GEN):
        ours = client.completions.create(model=MODEL, prompt=doc["prompt"], max_tokens=8, temperature=0, stop=["\n"])
        assert s["filtered_resps"][0] == ours.choices[0].text
    # local-chat-completions (generation through our chat template): lm-eval's answers are ours
    chat = run_lm_eval(tmp_path, "local-chat-completions", f"model={MODEL},base_url={server.url}/v1/chat/completions,"
                       "max_retries=1", ["tiny_gen"], "--apply_chat_template")
    for s, doc in zip(chat["tiny_gen"], GEN):
        ours = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": doc["prompt"]}],
                                              max_tokens=8, temperature=0, stop=["\n"])
        assert s["filtered_resps"][0] == ours.choices[0].message.content
