"""Tensor parallelism on the CPU (gloo, one process per rank): greedy tokens equal to tp=1, failures end runs.

- tiny random llama (4 heads, 2 KV heads) at tp=2, fp16 and w4a16 + int8 KV: greedy tokens equal tp=1 on the
  same workspace (tp=1 reassembles the shards), prefill logits close; MQA (1 KV head) at tp=2: the KV head
  replicated on both ranks; the calling process (rank 0) keeps its torch thread count.
- the CLI: `pipeline=serve serve.tp=2` on tiny-random w4a16 (RTN stages, turbomind tp=2, serve on two ranks).
- SmolLM2-135M (9 heads, 3 KV heads: tp=2 divides neither, refused naming the valid tp values [1, 3]) at tp=3,
  fp16 and w4a16 (RTN, group 64) workspaces from the load artifact: greedy tokens equal tp=1 for several
  prompts. The whole CLI at tp=3 (quant stages, turbomind tp=3, serve on three ranks) is marked slow.
- a follower killed mid-generation ends the server within seconds (exit 70, message naming the rank and
  the signal); rank 0 killed: the follower exits too; a follower that cannot load its shards makes
  Engine.from_workspace raise, naming the rank and the cause.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pipeline.engine import Engine, SamplingParams
from pipeline.models.llama import ModelArgs
from pipeline.models.sources import save_byte_tokenizer, synthetic_tensors
from pipeline.workspace import check_tp, write_workspace

from conftest import REPO, run_cli
from test_engine import ARGS, kv_params, make_w4

PROMPTS = [[5, 6, 7], list(range(10, 47)), [100], list(range(200, 215))]
GREEDY = SamplingParams(max_new_tokens=10, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny_ws(tmp_path_factory):
    root = tmp_path_factory.mktemp("tp")
    t = synthetic_tensors(ARGS, 0, torch.float32)
    save_byte_tokenizer(root / "tok", ARGS.vocab_size)
    write_workspace(root / "fp16", ARGS, t, root / "tok", tp=2)
    write_workspace(root / "w4", ARGS, t, root / "tok", tp=2, w4=make_w4(t), group_size=64, kv_qparams=kv_params(),
                    kv_bits=8)
    mqa = ModelArgs(**{**ARGS.__dict__, "n_kv_heads": 1})
    write_workspace(root / "mqa", mqa, synthetic_tensors(mqa, 1, torch.float32), root / "tok", tp=2)
    return root


def run_both(ws: Path, prompts, tp: int, params=GREEDY, logits=False, **over):
    """Greedy tokens (and optionally the prefill logits of prompts[1]) at tp=1 and at tp."""
    out = []
    for n in (1, tp):
        eng = Engine.from_workspace(ws, "cpu", overrides={"tp": n, **over})
        try:
            out.append((eng.generate(prompts, params), eng.prompt_logits(prompts[1]) if logits else None,
                        {**eng.stats(), "block_bytes": eng.runner.block_bytes(64)}))
        finally:
            eng.stop()
    return out


@pytest.mark.parametrize("kind", ["fp16", "w4", "mqa"])
def test_tiny_tp2_greedy_equals_tp1(tiny_ws, kind):
    threads = torch.get_num_threads()
    (ref, l1, s1), (got, l2, s2) = run_both(tiny_ws / kind, PROMPTS, 2, logits=True)
    assert torch.get_num_threads() == threads      # rank 0 in this process: its thread share only inside its steps
    assert got == ref
    assert (l1 - l2).abs().max() <= 1e-4 * l1.abs().max()
    assert s2["tp"] == 2 and s1["tp"] == 1
    # each rank holds half the KV heads (MQA: the one head, replicated): a block costs half (the same) per rank
    assert s2["block_bytes"] * (1 if kind == "mqa" else 2) == s1["block_bytes"]


def test_refuses_tp_that_does_not_fit_the_heads(tiny_ws):
    smol = ModelArgs(dim=576, n_layers=30, n_heads=9, n_kv_heads=3, head_dim=64, hidden_dim=1536, vocab_size=49152)
    with pytest.raises(ValueError, match=r"tp=2 does not fit n_heads=9, n_kv_heads=3.*valid tp values.*\[1, 3\]"):
        check_tp(smol, 2)
    with pytest.raises(ValueError, match=r"tensor_para_size=2, but tp=4"):
        Engine.from_workspace(tiny_ws / "fp16", "cpu", overrides={"tp": 4})


def test_rank_that_cannot_load_fails_start(tiny_ws, tmp_path):
    ws = tmp_path / "broken"
    shutil.copytree(tiny_ws / "fp16", ws)
    (ws / "triton_models/weights/layers.1.attention.wo.1.weight").unlink()
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match=r"rank 1 \(pid \d+, cpu\) failed to load its shards: .*layers\.1\.attention\.wo\.1"):
        Engine.from_workspace(ws, "cpu", overrides={"tp": 2})
    assert time.monotonic() - t0 < 60
    assert not torch.distributed.is_initialized()


SERVER = """
import sys
from pipeline.engine import Engine, SamplingParams
eng = Engine.from_workspace(sys.argv[1], "cpu", overrides={"tp": 2, "tp_timeout": 30}).start()
print("ready", flush=True)
while True:
    eng.generate([[1, 2, 3]], SamplingParams(max_new_tokens=200, ignore_eos=True))
"""


def start_server(ws: Path):
    p = subprocess.Popen([sys.executable, "-c", SERVER, str(ws)], cwd=REPO, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    err = ""
    for line in p.stderr:                      # launch() prints the followers' pids
        err += line
        m = re.search(r"follower pids (\d+)", line)
        if m:
            assert p.stdout.readline().strip() == "ready"
            return p, int(m.group(1)), err
    raise AssertionError(f"the server did not start:\n{err}")


def gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/status").read_text().split("State:")[1].split()[0] in ("Z", "X")
    except (FileNotFoundError, IndexError):
        return True


def test_killed_follower_ends_the_server(tiny_ws):
    p, pid, _ = start_server(tiny_ws / "fp16")
    time.sleep(1.0)                            # mid-generation
    os.kill(pid, signal.SIGKILL)
    t0 = time.monotonic()
    try:
        code = p.wait(timeout=30)
    finally:
        p.kill()
    err = p.stderr.read()
    assert time.monotonic() - t0 < 10, time.monotonic() - t0
    assert code == 70
    assert re.search(rf"rank 1 \(pid {pid}, cpu\) was killed by SIGKILL; ending the server", err), err[-2000:]


def test_killed_rank0_ends_the_followers(tiny_ws):
    p, pid, _ = start_server(tiny_ws / "fp16")
    p.kill()
    p.wait()
    t0 = time.monotonic()
    while not gone(pid) and time.monotonic() - t0 < 20:
        time.sleep(0.2)
    assert gone(pid), f"follower {pid} still running 20 s after rank 0 died"


# ------------------------------------------------------------------------------------ through the CLI
def test_cli_serve_tp2_tiny_w4a16(cli, tmp_path):
    """pipeline=serve serve.tp=2: RTN quant stages -> turbomind with tp=2 -> serve on two ranks (started by the
    engine process, whose log is the run folder's engine_core.log; generate mode prints only the answers)."""
    p = cli("model=tiny-random", "pipeline=serve", "quant=w4a16_rtn", "quant.group_size=32", "serve.tp=2",
            "serve.max_new_tokens=4", "serve.session_len=256", "serve.prompts=[\"Hi\"]")
    assert "tp=2 on cpu, cpu" in (tmp_path / "run" / "engine_core.log").read_text()
    assert ">>> Hi" in p.stdout
    assert re.search(r"turbomind .*weight_type=int4, tp=2", p.stdout), p.stdout[-2000:]


# ------------------------------------------------------------------------------------ SmolLM2 at tp=3
SMOL_PROMPTS = ["What is the capital of France?", "Name three colors."]


@pytest.fixture(scope="module")
def smol_load(tmp_path_factory):
    """SmolLM2's load artifact (the real GGUF, dequantized) through the CLI; 1 torch thread in this process
    (2 CI cores, 3 ranks)."""
    tmp = tmp_path_factory.mktemp("smol")
    run_cli(f"cache_dir={tmp / 'cache'}", f"hydra.run.dir={tmp / 'run'}", "pipeline=load")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield next((tmp / "cache").glob("load/*/config.json")).parent
    torch.set_num_threads(n)


def smol_prompts(tok_dir: Path) -> list[list[int]]:
    from transformers import AutoTokenizer
    t = AutoTokenizer.from_pretrained(str(tok_dir))
    return [t(t.apply_chat_template([{"role": "user", "content": s}], add_generation_prompt=True, tokenize=False),
              add_special_tokens=False).input_ids for s in SMOL_PROMPTS]


@pytest.mark.parametrize("quant", ["fp16", pytest.param("w4a16", marks=pytest.mark.slow)])  # int4 tp: tiny tests
def test_smollm2_tp3_greedy_equals_tp1(smol_load, tmp_path, quant):
    """fp16, and w4a16 RTN group 64 (the awq stage's RTN path: pipeline.quant.w4.quantize, no search/clip)."""
    from pipeline.models.store import read_args, read_tensors
    from pipeline.quant.blockwise import LINEARS
    from pipeline.quant.w4 import quantize
    args, t = read_args(smol_load), read_tensors(smol_load)
    w4 = None
    if quant == "w4a16":
        w4 = {f"layers.{i}.{n}": quantize(t[f"layers.{i}.{n}.weight"], 4, 64)
              for i in range(args.n_layers) for n in LINEARS}
    write_workspace(tmp_path / "ws", args, t, smol_load / "tokenizer", tp=3, w4=w4, group_size=64)
    prompts = smol_prompts(smol_load / "tokenizer")
    (ref, _, _), (got, _, st) = run_both(tmp_path / "ws", prompts, 3, SamplingParams(max_new_tokens=6),
                                         session_len=256)
    assert st["tp"] == 3 and st["weight_type"] == ("int4" if w4 else "fp16")
    assert got == ref
    assert all(len(r) > 0 for r in ref)


@pytest.mark.slow
def test_smollm2_cli_serve_tp3_w4a16(tmp_path):
    """The whole CLI at tp=3 on SmolLM2 (load, awq RTN, pack, turbomind tp=3, serve): ~2-3 min on 2 cores."""
    p = run_cli(f"cache_dir={tmp_path / 'cache'}", f"hydra.run.dir={tmp_path / 'run'}", "pipeline=serve",
                "quant=w4a16_rtn", "serve.tp=3", "serve.max_new_tokens=6", "serve.session_len=512",
                "serve.prompts=[\"What is the capital of France?\"]")
    assert "tp=3 on cpu, cpu, cpu" in p.stderr
    assert "Paris" in p.stdout


@pytest.mark.slow   # a bench smoke run (bench/tp.py with gloo on the CPU); tp behaviour: the tests above
def test_bench_tp_dry_run(tmp_path):
    """bench/tp.py (issue 8, 2 GPUs) end to end on the CPU with gloo and tiny shapes."""
    out = tmp_path / "tp.json"
    p = subprocess.run([sys.executable, str(REPO / "bench/tp.py"), "--dry-run", "--quants", "fp16", "--out", str(out)],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    import json
    r = json.loads(out.read_text())["results"]["tiny_fp16"]
    assert r["correctness"]["greedy_equal"]
    assert r["tp2"]["allreduce"]["calls_per_step"] == 4
    assert r["tp2"]["kv_capacity"]["kv_bytes_per_token_per_rank"] * 2 == r["tp1"]["kv_capacity"]["kv_bytes_per_token_per_rank"]
