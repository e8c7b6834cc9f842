"""bench/w4a16_decode.py's fit of a config's times over the four Llama-7B shapes as fixed cost + bytes at a rate."""
import pytest
from conftest import bench_script

BYTES = [26738688, 8912896, 47906816, 23953408]   # int4 codes + scales + zeros at g128: 12288, 4096, 22016, 11008 -> 4096


def test_fixed_and_rate_recovers_a_line_and_session_21s_fit():
    d = bench_script("w4a16_decode")
    fixed, rate = d.fixed_and_rate(BYTES, [5.0 + b / 2.5e6 for b in BYTES])   # 5 us + bytes at 2.5 TB/s
    assert fixed == pytest.approx(5.0) and rate == pytest.approx(2.5)
    fixed, rate = d.fixed_and_rate(BYTES, [25.5, 16.4, 36.3, 24.0])   # swap_m16_n64_c8 at M = 16 (tuning, session 21)
    assert fixed == pytest.approx(11.8, abs=0.1) and rate == pytest.approx(1.96, abs=0.01)
    assert d.fixed_and_rate([1, 1], [3.0, 4.0])[1] == float("inf")   # no spread in bytes: no rate
