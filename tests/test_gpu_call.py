"""bench/gpu_call.sh (the device calls' named measurement sets): it parses, and every config it names exists."""
import re
import subprocess
from pathlib import Path

from pipeline.kernels.w4a16_configs import CONFIGS
from pipeline.kernels.w4a16_gluon_sk import SK_CONFIGS

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "gpu_call.sh"


def test_script_parses_and_names_existing_benches():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
    text = SCRIPT.read_text()
    for bench in re.findall(r"python3 (bench/\w+\.py)", text):
        assert (SCRIPT.parents[1] / bench).exists(), bench


def test_decode_set_names_real_configs():
    text = SCRIPT.read_text().replace("\\\n", "")
    names = re.search(r"^DECODE=(\S+)", text, re.M).group(1).split(",")
    assert len(names) >= 10 and not [n for n in names if n not in CONFIGS and n not in SK_CONFIGS]
