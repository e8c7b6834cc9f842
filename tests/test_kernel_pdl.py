"""Programmatic dependent launch: when it is on, and that it never lets a kernel read stale inputs.

    pytest tests/test_kernel_pdl.py                   # CPU: the switch
    python -m pytest -m gpu tests/test_kernel_pdl.py  # GPU: kernel chains in CUDA graphs, PDL on vs off
"""
import pytest
import torch

from pipeline.kernels import pdl

gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_off_on_cpu_and_in_the_interpreter(monkeypatch):
    monkeypatch.delenv("PIPELINE_PDL", raising=False)
    assert pdl.enabled(torch.device("cpu")) is False
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert pdl.enabled(torch.device("cuda", 0)) is False  # never asks the (absent) GPU
    assert pdl.launch_kwargs(False) == {}
    assert pdl.launch_kwargs(True) == {"launch_pdl": True}


def test_env_switch_turns_it_off(monkeypatch):
    monkeypatch.setenv("PIPELINE_PDL", "0")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert pdl.enabled(torch.device("cuda", 0)) is False


def test_default_off_until_set_and_env_overrides(monkeypatch):
    """Unset PIPELINE_PDL: the process default (off until the engine turns it on for int4 weights); 0/1 win."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("PIPELINE_PDL", raising=False)
    monkeypatch.setattr(pdl, "_hopper_or_newer", lambda index: True)  # pretend an H100 with a PDL-capable Triton
    monkeypatch.setitem(pdl._default, "on", False)
    dev = torch.device("cuda", 0)
    assert pdl.enabled(dev) is False
    pdl.set_default(True)
    assert pdl.enabled(dev) is True
    monkeypatch.setenv("PIPELINE_PDL", "0")
    assert pdl.enabled(dev) is False
    pdl.set_default(False)
    monkeypatch.setenv("PIPELINE_PDL", "1")
    assert pdl.enabled(dev) is True
    monkeypatch.setenv("PIPELINE_PDL", "yes")
    with pytest.raises(ValueError, match="PIPELINE_PDL='yes'"):
        pdl.enabled(dev)
    from pipeline.weights import WEIGHT_TYPES     # the engine's default per weight type: on for int4 only
    assert [WEIGHT_TYPES[t].pdl for t in ("int4", "int8", "fp16", "bf16")] == [True, False, False, False]


def _chain(x_in, norm_w, w1, w2, w3, cfg):
    """rms_norm -> GEMV -> GEMV (SwiGLU fused) -> rms_norm with residual: each kernel reads what the one
    before it wrote in the same step, the pattern of a decode layer."""
    from pipeline.kernels.norm import rms_norm
    from pipeline.kernels.w4a16 import w4a16_linear
    h = rms_norm(x_in, norm_w, 1e-5)
    gu = w4a16_linear(h, w1, config=cfg)  # (M, 2 * 4096)
    d = w4a16_linear(gu, w2, config=cfg, act="silu_mul")  # (M, 4096)
    e = w4a16_linear(d, w3, config=cfg)
    return rms_norm(e, norm_w, 1e-5, residual=x_in)


@gpu
@needs_cuda
@pytest.mark.parametrize("cfg", ["wide_n128_s2_h2", "wide_n32_s4_w2_h2", "fma_n64_c8", "gemv_n64_c4_sl",
                                 "gl_m16_n128_k16_s4_c4", "gl_m32_n128_k16_s4_c4", "gl_m64_n64_k16_s4_c2_ws",
                                 "glv_n64_r32_s4_c8", "glv_n128_r32_s6_c4_ws"])
def test_gpu_graph_chain_identical_with_and_without_pdl(monkeypatch, cfg):
    """The chain captured in a CUDA graph and replayed on fresh inputs gives the same bits with PDL as the
    eager launches without it: a kernel that read its input before the previous kernel finished writing it
    would differ."""
    from test_kernel_w4a16 import make_quant
    from pipeline.kernels import w4a16 as w4
    dev = torch.device("cuda")
    if torch.cuda.get_device_capability() < (9, 0) or not pdl.supported_by_triton():
        pytest.skip("PDL needs compute capability 9.0 and a Triton with launch_pdl")
    from pipeline.kernels import w4a16_gluon
    if cfg.startswith("gl") and not w4a16_gluon.available(dev):
        pytest.skip("the Gluon kernel runs on sm_90 only")
    torch.manual_seed(0)
    D, F = 4096, 11008
    w1 = w4.pack_w4(*make_quant(2 * F, D, 128), 128).to(dev)
    w2 = w4.pack_w4(*make_quant(D, F, 128), 128).to(dev)
    w3 = w4.pack_w4(*make_quant(D, D, 128), 128).to(dev)
    norm_w = torch.rand(D, device=dev).half() + 0.5
    M = 1 if cfg.startswith(("wide", "fma", "glv")) else 24 if cfg.startswith("gl_") else 4
    inputs = [torch.randn(M, D, device=dev).half() for _ in range(6)]

    monkeypatch.setenv("PIPELINE_PDL", "0")
    want = [_chain(x, norm_w, w1, w2, w3, cfg) for x in inputs]

    monkeypatch.setenv("PIPELINE_PDL", "1")
    assert pdl.enabled(dev)
    x_in = inputs[0].clone()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        _chain(x_in, norm_w, w1, w2, w3, cfg)  # compile the PDL variants outside capture
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, stream=s):
            out = _chain(x_in, norm_w, w1, w2, w3, cfg)
    torch.cuda.synchronize()
    for rep in range(3):
        for i, x in enumerate(inputs):
            x_in.copy_(x)
            g.replay()
            for got, ref, name in zip(out, want[i], ("y", "residual")):
                assert torch.equal(got, ref), f"{cfg} replay {rep} input {i}: {name} differs with PDL"
