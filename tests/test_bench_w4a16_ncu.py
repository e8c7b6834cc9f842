"""bench/w4a16_ncu.py's reading of Nsight Compute's CSV (`--page details`), on a hand-written fixture in ncu's column
layout (no GPU or ncu here): kernels kept apart, launches counted, values averaged, Duration in us, other metrics
dropped, the lines ncu prints before its CSV skipped."""
import pytest
from conftest import bench_script

HEAD = '"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream","Block Size","Grid Size",' \
       '"Device","CC","Section Name","Metric Name","Metric Unit","Metric Value"'


def row(i: int, kernel: str, metric: str, unit: str, value: str) -> str:
    return f'"{i}","1","python3","h","{kernel}","1","7","(128, 1, 1)","(528, 1, 1)","0","9.0","S","{metric}","{unit}",' \
           f'"{value}"'


@pytest.fixture(scope="module")
def ncu():
    return bench_script("w4a16_ncu")


def test_summary_of_a_details_csv(ncu):
    text = "\n".join(["==PROF== Connected to process 1", HEAD,
                      row(0, "_silu_mul_kernel", "Duration", "nsecond", "2,500"),
                      row(1, "_w4a16_swap_kernel", "Duration", "usecond", "20.0"),
                      row(1, "_w4a16_swap_kernel", "DRAM Throughput", "%", "40"),
                      row(1, "_w4a16_swap_kernel", "Registers Per Thread", "register/thread", "128"),
                      row(1, "_w4a16_swap_kernel", "Block Limit Registers", "block", "4"),
                      row(2, "_silu_mul_kernel", "Duration", "nsecond", "3,500"),
                      row(3, "_w4a16_swap_kernel", "Duration", "usecond", "22.0"),
                      row(3, "_w4a16_swap_kernel", "DRAM Throughput", "%", "44"),
                      row(3, "_w4a16_swap_kernel", "Registers Per Thread", "register/thread", "128")])
    s = ncu.summarize(text)
    assert list(s) == ["_silu_mul_kernel", "_w4a16_swap_kernel"]
    assert s["_silu_mul_kernel"] == {"launches": 2, "Duration (us)": 3.0}
    assert s["_w4a16_swap_kernel"] == {"launches": 2, "Duration (us)": 21.0, "DRAM Throughput (%)": 42.0,
                                       "Registers Per Thread (register/thread)": 128.0}
    with pytest.raises(ValueError, match="no ncu CSV header"):
        ncu.summarize("==ERROR== ERR_NVGPUCTRPERM")


def test_stall_reasons_kept_and_a_refusal_falls_back_to_the_sections(ncu, monkeypatch, tmp_path):
    stall = "smsp__average_warps_issue_stalled_long_scoreboard_per_issue_active.ratio"
    text = "\n".join([HEAD, row(0, "_k", "Duration", "usecond", "10"), row(0, "_k", stall, "", "3.5"),
                      row(0, "_k", "smsp__something_else", "", "1")])
    assert ncu.summarize(text)["_k"] == {"launches": 1, "Duration (us)": 10.0, stall: 3.5}

    calls = []

    class Done:
        def __init__(self, cmd):
            self.returncode = 1 if ncu.STALLS in cmd else 0
            self.stdout = "==ERROR== Failed to find metric" if self.returncode else text
            self.stderr = ""

    monkeypatch.setattr(ncu.subprocess, "run", lambda cmd, **kw: calls.append(cmd) or Done(cmd))
    a = type("A", (), {"K": 64, "N": 64, "group": 64, "reps": 1, "act": False, "timeout": 5, "keep_csv": False})()
    got = ncu.run_ncu(a, 16, "cfg", tmp_path)
    assert len(calls) == 2 and ncu.STALLS in calls[0] and ncu.STALLS not in calls[1]
    assert got["_k"]["Duration (us)"] == 10.0 and "Failed to find metric" in got["stall_metrics_error"]
