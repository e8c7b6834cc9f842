"""W8A8: int8 GEMM (Triton, torch._int_mm, dequantize) and per-token activation quantization.

    pytest tests/test_kernel_int8.py              # CPU: interpreter on odd shapes + fallbacks
    python -m pytest -m gpu tests/test_kernel_int8.py   # on the GPU machine, real sizes
"""
import logging

import pytest
import torch

from kernel_interp import cuda_ok, fresh_seed, interpreted, rel_err
from pipeline.kernels import dispatch
from pipeline.kernels import int8_gemm as compiled_g
from pipeline.kernels import quant_act as compiled_qa

gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not cuda_ok(), reason="needs a CUDA GPU")
TOL = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}  # one rounding of the output


def make(M, N, K, device="cpu", bias=True, out_dtype=torch.float16):
    xq = torch.randint(-127, 128, (M, K), dtype=torch.int8, device=device)
    wq = torch.randint(-127, 128, (N, K), dtype=torch.int8, device=device)
    xs = torch.rand(M, device=device) * 0.02 + 1e-3
    ws = (torch.rand(N, device=device) * 0.02 + 1e-3).to(torch.float16)
    b = torch.randn(N, device=device).to(out_dtype) if bias else None
    return xq, xs, wq, ws, b


@pytest.fixture
def poisoned(monkeypatch):
    """Outputs the kernel must overwrite start as NaN."""
    real = compiled_g._alloc_out
    monkeypatch.setattr(compiled_g, "_alloc_out", lambda *a: real(*a).fill_(float("nan")))


# ------------------------------------------------------------------------------ interpreter (CPU)
INTERP = {"ptr_k64": ("ptr", 16, 32, 64, 4, 1), "ptr_m32": ("ptr", 32, 16, 32, 4, 1),
          "tma": ("tma", 16, 32, 64, 4, 1)}


@pytest.mark.parametrize("out_dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("M,N,K,cfg", [(1, 40, 96, "ptr_k64"), (5, 33, 200, "ptr_k64"), (19, 50, 72, "ptr_m32"),
                                       (3, 48, 128, "tma"), (17, 24, 64, "tma")])
def test_interpreter_gemm_matches_reference(monkeypatch, poisoned, out_dtype, M, N, K, cfg):
    g = interpreted("int8_gemm", monkeypatch)
    seed = fresh_seed()
    xq, xs, wq, ws, b = make(M, N, K, bias=M % 2 == 1, out_dtype=out_dtype)
    y = g.int8_linear(xq, xs, wq, ws, b, out_dtype, config=INTERP[cfg], path="triton")
    ref = g.int8_linear_ref(xq, xs, wq, ws, b, torch.float64)
    assert y.shape == (M, N) and y.dtype == out_dtype
    assert rel_err(y, ref) < TOL[out_dtype], f"seed={seed}"


def test_batch_dims_and_errors(monkeypatch):
    g = interpreted("int8_gemm", monkeypatch)
    xq, xs, wq, ws, b = make(6, 24, 64)
    y = g.int8_linear(xq.view(2, 3, 64), xs.view(2, 3), wq, ws, b)
    assert y.shape == (2, 3, 24)
    assert rel_err(y.view(6, 24), g.int8_linear_ref(xq, xs, wq, ws, b, torch.float64)) < TOL[torch.float16]
    with pytest.raises(ValueError, match="int8"):
        g.int8_linear(xq.float(), xs, wq, ws)
    with pytest.raises(ValueError, match="K=64"):
        g.int8_linear(xq[:, :63], xs, wq, ws)
    with pytest.raises(ValueError, match="one per token"):
        g.int8_linear(xq, xs[:5], wq, ws)
    with pytest.raises(ValueError, match=r"ws shape \(23,\)"):
        g.int8_linear(xq, xs, wq, ws[:23])
    with pytest.raises(ValueError, match="path='fast'"):
        g.int8_linear(xq, xs, wq, ws, path="fast")


@pytest.mark.parametrize("path", ["dequant", "int_mm"])
def test_fallbacks_agree(path):
    """Both fallbacks compute the same function (int_mm on CPU: K, N not multiples of 8 -> dequant)."""
    if path == "int_mm" and not cuda_ok():
        pytest.skip("torch._int_mm path is CUDA-only")
    xq, xs, wq, ws, b = make(9, 40, 96, device="cuda" if path == "int_mm" else "cpu")
    y = compiled_g.int8_linear(xq, xs, wq, ws, b, path=path)
    assert rel_err(y, compiled_g.int8_linear_ref(xq, xs, wq, ws, b, torch.float64)) < TOL[torch.float16]


def test_p40_never_calls_triton(monkeypatch, caplog):
    """The dispatcher is told the device is sm_61 (Tesla P40): nothing launches the Triton int8 kernel,
    the fallback is logged, and outputs match the reference (on a GPU: through torch._int_mm)."""
    monkeypatch.setenv("PIPELINE_KERNELS", "auto")
    monkeypatch.setattr(dispatch, "device_capability", lambda device: (6, 1))

    def boom(*a, **k):
        raise AssertionError("the Triton int8 kernel must not run on sm_61")

    monkeypatch.setattr(compiled_g, "_launch", boom)
    monkeypatch.setattr(compiled_g, "_int8_mm_kernel", boom)
    monkeypatch.setattr(compiled_g, "_int8_mm_tma_kernel", boom)
    monkeypatch.setattr(compiled_g, "_reported", set())
    device = "cuda" if cuda_ok() else "cpu"
    xq, xs, wq, ws, b = make(33, 64, 128, device=device)
    with caplog.at_level(logging.INFO, logger="pipeline.kernels.int8_gemm"):
        y = compiled_g.int8_linear(xq, xs, wq, ws, b)
    expect = "int_mm" if device == "cuda" else "dequant"
    assert any(f"capability (6, 1)): {expect}" in r.getMessage() for r in caplog.records), caplog.text
    assert dispatch.last_path("int8_gemm") == "reference"
    assert rel_err(y, compiled_g.int8_linear_ref(xq, xs, wq, ws, b, torch.float64)) < TOL[torch.float16]


def test_new_gpu_chooses_triton(monkeypatch):
    g = interpreted("int8_gemm", monkeypatch)
    monkeypatch.setenv("PIPELINE_KERNELS", "auto")
    monkeypatch.setattr(dispatch, "device_capability", lambda device: (9, 0))
    xq, xs, wq, ws, b = make(4, 32, 64)
    assert g.choose_path(xq) == "triton"
    assert rel_err(g.int8_linear(xq, xs, wq, ws, b), g.int8_linear_ref(xq, xs, wq, ws, b, torch.float64)) < 1e-3


# ------------------------------------------------------------------------------ activation quant
def check_quant(qa, q, s, ref_q, ref_s):
    assert q.dtype == torch.int8 and s.dtype == torch.float32 and q.shape == ref_q.shape
    assert torch.allclose(s, ref_s, rtol=1e-6, atol=0)
    d = (q.int() - ref_q.int()).abs()
    assert d.max() <= 1 and (d > 0).float().mean() < 1e-3  # ties may round apart after fp rounding
    assert q.abs().max() <= 127


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(5, 37), (2, 3, 100)])
def test_interpreter_quantize_per_token(monkeypatch, dtype, shape):
    qa = interpreted("quant_act", monkeypatch)
    seed = fresh_seed()
    x = (torch.randn(shape) * 4).to(dtype)
    x[..., 0] = 0 if len(shape) == 2 else x[..., 0]
    q, s = qa.quantize_per_token(x)
    check_quant(qa, q, s, *qa.quantize_per_token_ref(x))
    assert rel_err(q.float() * s[..., None], x.float()) < 0.02, f"seed={seed}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("with_residual", [False, True])
def test_interpreter_rms_norm_quant(monkeypatch, dtype, with_residual):
    qa = interpreted("quant_act", monkeypatch)
    fresh_seed()
    x = (torch.randn(3, 5, 72) * 3).to(dtype)
    w = (torch.rand(72) + 0.5).to(dtype)
    r = torch.randn(3, 5, 72).to(dtype) if with_residual else None
    got = qa.rms_norm_quant(x, w, 1e-5, r)
    ref = qa.rms_norm_quant_ref(x, w, 1e-5, r)
    check_quant(qa, got[0], got[1], ref[0], ref[1])
    if with_residual:
        assert torch.equal(got[2], ref[2])
    with pytest.raises(ValueError, match="weight shape"):
        qa.rms_norm_quant(x, w[:71], 1e-5)


def test_zero_row_and_reference_on_cpu(monkeypatch):
    monkeypatch.setenv("PIPELINE_KERNELS", "auto")
    x = torch.zeros(2, 16)
    q, s = compiled_qa.quantize_per_token(x)
    assert torch.equal(q, torch.zeros_like(q, dtype=torch.int8)) and torch.isfinite(s).all()


# ----------------------------------------------------------------------------------------- GPU
LLAMA = [(4096, 12288), (4096, 4096), (4096, 22016), (11008, 4096)]  # (K, N)


@gpu
@needs_cuda
@pytest.mark.parametrize("out_dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("K,N", LLAMA)
def test_gpu_every_config_real_sizes(poisoned, out_dtype, K, N):
    for M in (1, 16, 64, 256, 1024):
        xq, xs, wq, ws, b = make(M, N, K, device="cuda", out_dtype=out_dtype)
        ref = compiled_g.int8_linear_ref(xq, xs, wq, ws, b, torch.float64)
        for name in compiled_g.candidates(M, xq.device):
            y = compiled_g.int8_linear(xq, xs, wq, ws, b, out_dtype, config=name, path="triton")
            assert rel_err(y, ref) < TOL[out_dtype], f"M={M} K={K} N={N} {out_dtype} {name}"
        for path in ("int_mm", "dequant"):
            y = compiled_g.int8_linear(xq, xs, wq, ws, b, out_dtype, path=path)
            assert rel_err(y, ref) < TOL[out_dtype], f"M={M} K={K} N={N} {out_dtype} {path}"


@gpu
@needs_cuda
def test_gpu_odd_shapes_and_quant_act():
    for M, N, K in ((1, 4099, 1000), (7, 333, 520), (130, 1000, 2048), (300, 72, 4104)):
        xq, xs, wq, ws, b = make(M, N, K, device="cuda")
        y = compiled_g.int8_linear(xq, xs, wq, ws, b)
        assert rel_err(y, compiled_g.int8_linear_ref(xq, xs, wq, ws, b, torch.float64)) < TOL[torch.float16]
    for dtype in (torch.float16, torch.bfloat16):
        x = torch.randn(257, 4096, device="cuda").to(dtype)
        w = (torch.rand(4096, device="cuda") + 0.5).to(dtype)
        r = torch.randn_like(x)
        got = compiled_qa.rms_norm_quant(x, w, 1e-5, r)
        ref = compiled_qa.rms_norm_quant_ref(x, w, 1e-5, r)
        check_quant(compiled_qa, got[0], got[1], ref[0], ref[1])
        check_quant(compiled_qa, *compiled_qa.quantize_per_token(x), *compiled_qa.quantize_per_token_ref(x))
