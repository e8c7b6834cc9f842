"""RMSNorm (+ fused residual add) and SiLU-mul: Triton against the PyTorch reference."""
import pytest
import torch

from kernel_interp import cuda_ok, fresh_seed, interpreted, rel_err
from pipeline.kernels import norm as compiled_norm

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def check_rms(mod, device, dtype, shape, with_residual):
    seed = fresh_seed()
    x = (torch.randn(shape, device=device) * 3).to(dtype)
    w = (torch.rand(shape[-1], device=device) + 0.5).to(dtype)
    r = torch.randn(shape, device=device).to(dtype) if with_residual else None
    out = torch.full_like(x, float("nan"))
    r_out = torch.full_like(x, float("nan")) if with_residual else None
    got = mod._launch_rms_norm(x, w, 1e-5, r, out, r_out)
    ref = compiled_norm.rms_norm_ref(x, w, 1e-5, r)
    if with_residual:
        assert got[1] is r_out and rel_err(r_out, ref[1]) < TOL[dtype], f"residual seed={seed}"
        got, ref = got[0], ref[0]
    assert got is out and rel_err(out, ref) < TOL[dtype], f"{dtype} {shape} seed={seed}"


def check_silu(mod, device, dtype, shape, fused_input):
    seed = fresh_seed()
    gu = torch.randn(*shape[:-1], 2 * shape[-1], device=device).to(dtype)
    out = torch.full(shape, float("nan"), dtype=dtype, device=device)
    if fused_input:
        got, ref = mod._launch_silu_mul(gu, None, out), compiled_norm.silu_mul_ref(gu)
    else:
        g, u = gu.chunk(2, -1)
        got, ref = mod._launch_silu_mul(g, u, out), compiled_norm.silu_mul_ref(g, u)
    assert got is out and rel_err(out, ref) < TOL[dtype], f"{dtype} {shape} seed={seed}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("shape", [(5, 37), (2, 3, 100)])
def test_interpreter_rms_norm(dtype, with_residual, shape, monkeypatch):
    check_rms(interpreted("norm", monkeypatch), "cpu", dtype, shape, with_residual)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("fused_input", [False, True])
def test_interpreter_silu_mul(dtype, fused_input, monkeypatch):
    check_silu(interpreted("norm", monkeypatch), "cpu", dtype, (3, 1500), fused_input)


def test_public_functions_and_errors(monkeypatch):
    mod = interpreted("norm", monkeypatch)
    x, w = torch.randn(3, 40).half(), torch.rand(40).half()
    assert rel_err(mod.rms_norm(x, w, 1e-6), mod.rms_norm_ref(x, w, 1e-6)) < TOL[torch.float16]
    assert rel_err(mod.silu_mul(torch.cat([x, x], -1)), mod.silu_mul_ref(x, x)) < TOL[torch.float16]
    with pytest.raises(ValueError, match="weight shape"):
        mod.rms_norm(x, w[:39], 1e-6)
    with pytest.raises(ValueError, match="residual"):
        mod.rms_norm(x, w, 1e-6, residual=x.float())
    with pytest.raises(ValueError, match="even"):
        mod.silu_mul(x[:, :39])


@pytest.mark.gpu
@pytest.mark.skipif(not cuda_ok(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("shape", [(1, 4096), (257, 4096), (64, 5120)])
def test_gpu_rms_norm(dtype, with_residual, shape):
    check_rms(compiled_norm, "cuda", dtype, shape, with_residual)


@pytest.mark.gpu
@pytest.mark.skipif(not cuda_ok(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("fused_input", [False, True])
def test_gpu_silu_mul(dtype, fused_input):
    check_silu(compiled_norm, "cuda", dtype, (257, 11008), fused_input)
