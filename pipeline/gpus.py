"""One visible GPU per sweep job on a machine with several GPUs.

    python -m pipeline.runner -m hydra/launcher=local launch.jobs=4 quant=fp16,kv8,w4a16,w4a16_kv8

The runner calls pin_job_gpu() at the start of every job, before anything initialises CUDA:
- nothing changes unless this is a multirun job, launch.spread_gpus is true, device is auto|cuda and
  two or more GPUs are visible (CUDA_VISIBLE_DEVICES, else `nvidia-smi -L`);
- a launcher that already gave the job one device (SLURM gres, Ray num_gpus, submitit gpus_per_node=1)
  leaves one visible: kept as is;
- otherwise the job's process claims a free GPU slot (a lock file <sweep dir>/.gpus/<device>.lock,
  trying device number job_num % n first) and sets CUDA_VISIBLE_DEVICES to that one device. The claim
  lasts as long as the process: joblib reuses its worker processes, and CUDA cannot move once
  initialised, so a worker keeps its GPU for every job it runs. With no free slot (more workers than
  GPUs) the job shares device job_num % n. A killed process's slot is freed (dead pid, same host).
"""
from __future__ import annotations

import atexit
import logging
import os
import shutil
import subprocess
from pathlib import Path
from typing import Optional

from .cache import KeyLock

log = logging.getLogger(__name__)
_pinned: Optional[str] = None  # this process's device, once claimed
_slot: Optional[KeyLock] = None


def visible_gpus() -> list[str]:
    """Device ids visible to this process, found without initialising CUDA."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [d.strip() for d in env.split(",") if d.strip() and d.strip() != "-1"]
    if not shutil.which("nvidia-smi"):
        return []
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [str(i) for i, line in enumerate(l for l in out.splitlines() if l.startswith("GPU "))]


def gpu_count() -> int:
    """OmegaConf resolver ${gpu_count:} (launcher presets: all GPUs for submitit_local's jobs)."""
    return len(visible_gpus())


def pin_job_gpu(job_num: int, slot_dir: Path) -> Optional[str]:
    """Make one GPU visible to this job's process; returns the device id kept, or None (no change)."""
    global _pinned, _slot
    if _pinned is not None:
        return _pinned
    devices = visible_gpus()
    if len(devices) < 2:
        return devices[0] if devices else None
    import torch
    if torch.cuda.is_initialized():
        log.warning("CUDA is already initialised in this process; cannot narrow it to one GPU (job %d)", job_num)
        return None
    n = len(devices)
    order = [devices[(job_num + i) % n] for i in range(n)]
    for dev in order:
        lk = KeyLock(Path(slot_dir) / f"{dev}.lock", stale_after=1e7)  # only a dead pid frees a slot
        if lk.acquire(blocking=False):
            _slot = lk
            atexit.register(lk.release)
            break
    else:
        dev = order[0]
        log.warning("all %d GPUs are claimed by other jobs; job %d shares GPU %s", n, job_num, dev)
    os.environ["CUDA_VISIBLE_DEVICES"] = dev
    _pinned = dev
    log.info("job %d: CUDA_VISIBLE_DEVICES=%s (one of %s)", job_num, dev, ",".join(devices))
    return dev
