"""bench/serve.py end to end on the CPU (tiny model): the script a GPU call runs must work before the call."""
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_serve_bench_smoke_run_accounts_for_every_token(tmp_path):
    cmd = [sys.executable, "bench/serve.py", "--model", "tiny-random", "--quant", "fp16", "--clients", "2",
           "--requests", "4", "--batch1", "1", "--prompt-len", "8:16", "--output-len", "4:8", "--device", "cpu",
           "--no-hf", "--out", str(tmp_path), "--cache-dir", str(tmp_path / "cache")]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "where the batched run's time went" in r.stdout
    res = json.loads((tmp_path / "serve_tiny-random_fp16.json").read_text())
    b = res["engine_batched"]
    assert b["ok"] == b["requests"] == 4 and b["n_errors"] == 0
    steps = b["engine_steps"]
    assert steps["prefill_tokens"] == b["prompt_tokens"]            # every prompt token prefilled once
    assert steps["decode_tokens"] == b["output_tokens"] - b["ok"]   # the first token of each comes from prefill
    assert 0 < b["prefill_share_of_wall"] + b["decode_share_of_wall"] <= 1.0
