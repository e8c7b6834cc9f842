"""bench/prefill.py end to end on the CPU (tiny shapes): every layout and row timed, the profile and baselines written."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow   # a bench smoke run (~26 s on 2 cores): checks the GPU script runs, not a user-facing behaviour
def test_bench_prefill_dry_run(tmp_path):
    p = subprocess.run([sys.executable, str(REPO / "bench/prefill.py"), "--dry-run", "--ablate-batching", "--out",
                        str(tmp_path)],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    res = json.loads((tmp_path / "prefill.json").read_text())
    assert set(res["rows"]) == {"w4a16", "w4a16_kv8", "w4a16_kv8_fullcache"}
    for row in res["rows"].values():
        for layout in ("1x512", "1x2048", "4x512", "16x128", "2x1024+1024", "mix160+1024_26x700", "26x700"):
            assert row[layout]["tokens_per_s"] > 0 and row[layout]["ms"] > 0 and row[layout]["host_enqueue_ms"] > 0
        assert row["4x512"]["engine_generate_ms"] > 0 and "engine_generate_ms" not in row["2x1024+1024"]
        assert row["profile_4x512"]["wall_ms_under_profiler"] > 0 and row["kv_cache_tokens"] > 0
        assert row["profile_mix160+1024_26x700"]["wall_ms_under_profiler"] > 0
        assert "graph_ms" not in row["4x512"]   # CUDA graphs: GPU only
        assert row["4x512"]["per_chunk_attention_ms"] > 0 and "per_chunk_attention_ms" not in row["1x2048"]
    assert res["baselines"]["4x512"]["tokens"] == 4 * 512 // 16
    assert "of FLOP floor" in p.stdout.splitlines()[-22]
