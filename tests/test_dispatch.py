"""The dispatcher: Triton only where it can run; the reference on CPUs and old GPUs."""
import logging

import pytest
import torch

from kernel_interp import interpreted, rel_err
from pipeline.kernels import dispatch, norm


def test_modes(monkeypatch):
    t = torch.zeros(1)
    monkeypatch.setenv("PIPELINE_KERNELS", "reference")
    assert not dispatch.use_triton(t, "k_modes") and dispatch.last_path("k_modes") == "reference"
    monkeypatch.setenv("PIPELINE_KERNELS", "triton")
    assert dispatch.use_triton(t, "k_modes") and dispatch.last_path("k_modes") == "triton"
    monkeypatch.setenv("PIPELINE_KERNELS", "auto")
    assert not dispatch.use_triton(t, "k_modes"), "auto must never send CPU tensors to Triton"
    monkeypatch.setenv("PIPELINE_KERNELS", "fast")
    with pytest.raises(ValueError, match="fast"):
        dispatch.use_triton(t, "k_modes")


def test_old_gpu_uses_reference_and_logs_it(monkeypatch, caplog):
    monkeypatch.setenv("PIPELINE_KERNELS", "auto")
    monkeypatch.setattr(dispatch, "device_capability", lambda device: (7, 0))  # pretend: a V100
    monkeypatch.setattr(dispatch, "_reported", set())   # logged once a process: earlier tests may have logged it
    x, w = torch.randn(4, 48), torch.rand(48)
    with caplog.at_level(logging.INFO, logger="pipeline.kernels.dispatch"):
        y = norm.rms_norm(x, w, 1e-6)
    assert dispatch.last_path("rms_norm") == "reference"
    assert any("rms_norm" in r.getMessage() and "pytorch reference" in r.getMessage() for r in caplog.records)
    assert torch.equal(y, norm.rms_norm_ref(x, w, 1e-6))
    assert not dispatch.use_triton(x, "k_bf16", min_capability=(8, 0))


def test_new_gpu_uses_triton(monkeypatch):
    mod = interpreted("norm", monkeypatch)  # CPU tensors can run Triton only through the interpreter
    monkeypatch.setenv("PIPELINE_KERNELS", "auto")
    monkeypatch.setattr(dispatch, "device_capability", lambda device: (9, 0))  # pretend: an H100
    x, w = torch.randn(4, 48), torch.rand(48)
    y = mod.rms_norm(x, w, 1e-6)
    assert dispatch.last_path("rms_norm") == "triton"
    assert rel_err(y, mod.rms_norm_ref(x, w, 1e-6)) < 1e-5
