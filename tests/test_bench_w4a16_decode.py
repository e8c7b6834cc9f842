"""bench/w4a16_decode.py's fit of a config's times over the four Llama-7B shapes as fixed cost + bytes at a rate."""
import sys

import pytest
from conftest import bench_script

BYTES = [26738688, 8912896, 47906816, 23953408]   # int4 codes + scales + zeros at g128: 12288, 4096, 22016, 11008 -> 4096


@pytest.fixture
def decode(monkeypatch):
    """The script as a module; it puts bench/ first on sys.path and imports bench/kernels.py as `kernels`, which
    must not outlive the test: transformers imports a `kernels` package of its own (later tests failed on it)."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    before = sys.modules.get("kernels")
    yield bench_script("w4a16_decode")
    if before is None:
        sys.modules.pop("kernels", None)
    else:
        sys.modules["kernels"] = before


def test_fixed_and_rate_recovers_a_line_and_session_21s_fit(decode):
    fixed, rate = decode.fixed_and_rate(BYTES, [5.0 + b / 2.5e6 for b in BYTES])   # 5 us + bytes at 2.5 TB/s
    assert fixed == pytest.approx(5.0) and rate == pytest.approx(2.5)
    fixed, rate = decode.fixed_and_rate(BYTES, [25.5, 16.4, 36.3, 24.0])   # swap_m16_n64_c8, M = 16 (session 21)
    assert fixed == pytest.approx(11.8, abs=0.1) and rate == pytest.approx(1.96, abs=0.01)
    assert decode.fixed_and_rate([1, 1], [3.0, 4.0])[1] == float("inf")   # no spread in bytes: no rate


def test_the_module_leaves_no_kernels_shadow_behind():
    """Runs after the test above (file order): bench/kernels.py is not what `import kernels` finds any more."""
    mod = sys.modules.get("kernels")
    assert mod is None or "bench" not in str(getattr(mod, "__file__", ""))
