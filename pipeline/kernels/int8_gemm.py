"""W8A8 GEMM: int8 activations x int8 weights -> int32 on tensor cores, scales applied in the epilogue.

Usage:
    from pipeline.kernels.int8_gemm import int8_linear
    xq, xs = quantize_per_token(x)                  # pipeline.kernels.quant_act: (M, K) int8, (M,) fp32
    y = int8_linear(xq, xs, wq, ws, bias, out_dtype=torch.float16)
    # wq (N, K) int8 (PyTorch Linear layout: K contiguous), ws (N,) fp16/bf16/fp32 per output channel
    # y[m, n] = xs[m] * ws[n] * sum_k xq[m, k] * wq[n, k]  (+ bias[n])   -> (M, N) fp16/bf16

Paths, chosen automatically per device (reported once per device in the log):
    triton    sm_80+ (and the interpreter): `_int8_mm_kernel`, pointer loads, or `_int8_mm_tma_kernel` (sm_90, host
              tensor descriptors) when the tuner measures it faster. int32 accumulation is exact; the
              epilogue multiplies by xs[m] * ws[n] in fp32, adds the bias, rounds once to out_dtype.
    int_mm    other CUDA GPUs (e.g. sm_61 P40, where Triton's int8 dot does not compile):
              torch._int_mm (cuBLASLt; needs M > 16 and K, N multiples of 8: M is padded to 17),
              then the same epilogue in PyTorch. If cuBLASLt refuses the device, `dequant` from then on.
    dequant   CPU and anything else: the integers as fp32 (exact), one fp32 matmul, the same epilogue.
All three agree to fp32 rounding of the dot (|int32| < 2^24 holds exactly while K*127^2 < 2^24).

A small tuner times a named config set once per (device, M bucket, N, K, dtype) on the first call
outside CUDA-graph capture (INT8_TUNE=0 turns it off); `tuning_record` reports what it chose. Its choices are
saved per GPU and reused by the next process (PIPELINE_TUNE_CACHE=0 turns that off).
"""
from __future__ import annotations

import logging

import torch
import triton
import triton.language as tl

from pipeline.kernels import dispatch
from pipeline.kernels.tiles import tile_ids
from pipeline.kernels.tuner import Tuner, config_version

log = logging.getLogger(__name__)
OUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MIN_CAPABILITY = (8, 0)


# ----------------------------------------------------------------------------------------- reference
def int8_linear_ref(xq, xs, wq, ws, bias=None, out_dtype=torch.float16) -> torch.Tensor:
    """PyTorch reference: exact integer products in fp64, scales in fp32 order as the kernel, one rounding."""
    acc = (xq.double() @ wq.double().t()).float()  # (M, N) exact integers (as fp32: as the kernel sees them)
    y = acc * xs.float().reshape(-1, 1) * ws.float().reshape(1, -1)
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype)


def _epilogue(acc, xs, ws, bias, out_dtype):
    y = acc.float() * xs.float().reshape(-1, 1) * ws.float().reshape(1, -1)
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype)


def _dequant_mm(xq, xs, wq, ws, bias, out_dtype):
    """Fallback anywhere: integer values as fp32 (exact), fp32 matmul, the kernel's epilogue."""
    return _epilogue(xq.float() @ wq.float().t(), xs, ws, bias, out_dtype)


_int_mm_broken: set[str] = set()  # devices where cuBLASLt refused int8


def _int_mm(xq, xs, wq, ws, bias, out_dtype):
    """torch._int_mm (cuBLASLt int8): M padded to 17 when smaller (its M > 16 constraint)."""
    M = xq.shape[0]
    a = xq if M > 16 else torch.cat([xq, xq.new_zeros(17 - M, xq.shape[1])])
    acc = torch._int_mm(a, wq.t())[:M]  # (M, N) int32; wq.t() is the column-major B it wants
    return _epilogue(acc, xs, ws, bias, out_dtype)


# ----------------------------------------------------------------------------------------- kernels
@triton.jit
def _store_epilogue(acc, xs_ptr, ws_ptr, b_ptr, y_ptr, M, N, stride_ym, offs_m, offs_n, HAS_BIAS: tl.constexpr):
    mask_m = offs_m < M
    mask_n = offs_n < N
    xs = tl.load(xs_ptr + offs_m, mask=mask_m, other=0.0)  # (BM,) fp32
    ws = tl.load(ws_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)  # (BN,)
    y = acc.to(tl.float32) * xs[:, None] * ws[None, :]
    if HAS_BIAS:
        y += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :]
    tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit(do_not_specialize=["M"])  # M == 1 as a constant was measured slower (and recompiles per M)
def _int8_mm_kernel(x_ptr, w_ptr, xs_ptr, ws_ptr, b_ptr, y_ptr, M, N, K, stride_xm, stride_wn, stride_ym,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
            EVEN_K: tl.constexpr, HAS_BIAS: tl.constexpr):
    # x (M, K) int8 row-major, w (N, K) int8 row-major (both K-major: what int8 MMA wants)
    pid_m, pid_n = tile_ids(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rn = tl.max_contiguous(tl.multiple_of(offs_n % N, BLOCK_N), BLOCK_N)  # wrapped: weight loads need no mask
    mask_m = offs_m[:, None] < M  # rows are masked, not wrapped: at M < BLOCK_M no broadcast loads
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :]  # (BM, BK)
    w_ptrs = w_ptr + rn[None, :].to(tl.int64) * stride_wn + offs_k[:, None]  # (BK, BN): W^T tile
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        if EVEN_K:
            a = tl.load(x_ptrs, mask=mask_m, other=0)
            b = tl.load(w_ptrs)
        else:
            kk = k * BLOCK_K + offs_k
            a = tl.load(x_ptrs, mask=mask_m & (kk[None, :] < K), other=0)
            b = tl.load(w_ptrs, mask=kk[:, None] < K, other=0)
        acc = tl.dot(a, b, acc, out_dtype=tl.int32)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    _store_epilogue(acc, xs_ptr, ws_ptr, b_ptr, y_ptr, M, N, stride_ym, offs_m, offs_n, HAS_BIAS)


@triton.jit(do_not_specialize=["M"])
def _int8_mm_tma_kernel(x_desc, w_desc, xs_ptr, ws_ptr, b_ptr, y_ptr, M, N, K, stride_ym,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                HAS_BIAS: tl.constexpr):
    # same math; tiles come through the bulk tensor copy engine (out-of-range elements read as 0)
    pid_m, pid_n = tile_ids(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    off_m = pid_m * BLOCK_M
    off_n = pid_n * BLOCK_N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        a = x_desc.load([off_m, k * BLOCK_K])  # (BM, BK)
        b = w_desc.load([off_n, k * BLOCK_K])  # (BN, BK)
        acc = tl.dot(a, b.T, acc, out_dtype=tl.int32)
    offs_m = off_m + tl.arange(0, BLOCK_M)
    offs_n = off_n + tl.arange(0, BLOCK_N)
    _store_epilogue(acc, xs_ptr, ws_ptr, b_ptr, y_ptr, M, N, stride_ym, offs_m, offs_n, HAS_BIAS)


# ------------------------------------------------------------------------------- configs and tuner
# name -> (kind, BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages); kind "ptr" = _int8_mm_kernel, "tma" = _int8_mm_tma_kernel
CONFIGS = {
    "gemv_n16_k256": ("ptr", 16, 16, 256, 4, 4),
    "gemv_n32_k256": ("ptr", 16, 32, 256, 4, 4),
    "gemv_n64_k256": ("ptr", 16, 64, 256, 4, 4),
    "gemv_n32_k512": ("ptr", 16, 32, 512, 4, 3),
    "gemv_n64_k128": ("ptr", 16, 64, 128, 4, 6),
    "gemv_n16_k512": ("ptr", 16, 16, 512, 4, 4),
    "gemv_n32_k256_s6": ("ptr", 16, 32, 256, 4, 6),
    "mid_m32_n64": ("ptr", 32, 64, 256, 4, 4),
    "mid_m64_n64": ("ptr", 64, 64, 256, 4, 4),
    "mid_m64_n128": ("ptr", 64, 128, 128, 4, 4),
    "tile_m128_n128": ("ptr", 128, 128, 128, 8, 4),
    "tile_m128_n256": ("ptr", 128, 256, 128, 8, 3),
    "tma_m64_n128": ("tma", 64, 128, 128, 4, 4),
    "tma_m128_n128": ("tma", 128, 128, 128, 8, 4),
    "tma_m128_n256": ("tma", 128, 256, 128, 8, 3),
    "tma_m256_n128": ("tma", 256, 128, 128, 8, 3),
    "tma_m128_n256_s4": ("tma", 128, 256, 128, 8, 4),
    "tma_m256_n128_s4": ("tma", 256, 128, 128, 8, 4),
    "tma_m128_n256_k64": ("tma", 128, 256, 64, 8, 6),
    "tma_m256_n128_k64": ("tma", 256, 128, 64, 8, 6),
}
DECODE_SET = ("gemv_n16_k256", "gemv_n32_k256", "gemv_n64_k256", "gemv_n32_k512", "gemv_n64_k128",
              "gemv_n16_k512", "gemv_n32_k256_s6")
MID_SET = ("gemv_n32_k256", "mid_m32_n64", "mid_m64_n64", "mid_m64_n128", "tma_m64_n128")
PREFILL_SET = ("mid_m64_n128", "tile_m128_n128", "tile_m128_n256", "tma_m128_n128", "tma_m128_n256",
               "tma_m256_n128", "tma_m128_n256_s4", "tma_m256_n128_s4", "tma_m128_n256_k64", "tma_m256_n128_k64")
INTERPRET_CONFIG = ("ptr", 16, 32, 64, 4, 1)
# INT8_TUNE=0: default configs, no timing. Bump "1" when a kernel of this family changes (config edits change
# the digest by themselves): saved tunings of other versions are ignored (pipeline/kernels/tuner.py).
TUNER = Tuner("INT8_TUNE", version=config_version("1", CONFIGS))


def candidates(M: int, device: torch.device) -> tuple[str, ...]:
    names = DECODE_SET if M <= 16 else MID_SET if M <= 128 else PREFILL_SET
    cap = dispatch.device_capability(device)
    return tuple(n for n in names if CONFIGS[n][0] == "ptr" or (cap is not None and cap >= (9, 0)))


def default_config(M: int) -> str:
    return "gemv_n32_k256" if M <= 16 else "mid_m64_n64" if M <= 128 else "tile_m128_n128"


def _m_bucket(M: int) -> int:
    return 1 << max(0, (M - 1).bit_length())


def _alloc_out(M, N, dtype, device) -> torch.Tensor:
    return torch.empty(M, N, device=device, dtype=dtype)  # tests poison it


def _launch(xq, xs, wq, ws, bias, out_dtype, cfg) -> torch.Tensor:
    kind, BM, BN, BK, warps, stages = cfg
    M, K = xq.shape
    N = wq.shape[0]
    y = _alloc_out(M, N, out_dtype, xq.device)
    grid = (dispatch.cdiv(M, BM) * dispatch.cdiv(N, BN),)
    b = bias if bias is not None else ws
    if kind == "tma" and K % 16:  # descriptors need 16-byte row strides
        kind = "ptr"
    if kind == "tma":
        from triton.tools.tensor_descriptor import TensorDescriptor
        xd = TensorDescriptor.from_tensor(xq, [BM, BK])
        wd = TensorDescriptor.from_tensor(wq, [BN, BK])
        _int8_mm_tma_kernel[grid](xd, wd, xs, ws, b, y, M, N, K, y.stride(0), BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK,
                          GROUP_M=8, HAS_BIAS=bias is not None, num_warps=warps, num_stages=stages)
    else:
        _int8_mm_kernel[grid](xq, wq, xs, ws, b, y, M, N, K, xq.stride(0), wq.stride(0), y.stride(0),
                      BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK, GROUP_M=8, EVEN_K=K % BK == 0,
                      HAS_BIAS=bias is not None, num_warps=warps, num_stages=stages)
    return y


def _key(xq, wq, bias, out_dtype) -> tuple:
    return (xq.device.index, _m_bucket(xq.shape[0]), wq.shape[0], wq.shape[1], out_dtype, bias is not None)


def tuning_record(xq, wq, bias=None, out_dtype=torch.float16) -> tuple[str | None, dict[str, float]]:
    """(chosen config, {config: ms}) of the tuner for this call's shape, if it has run."""
    return TUNER.record(_key(xq.reshape(-1, wq.shape[1]), wq, bias, out_dtype))


def _choose(xq, xs, wq, ws, bias, out_dtype) -> str:
    M = xq.shape[0]
    return TUNER.choose(_key(xq, wq, bias, out_dtype), candidates(M, xq.device),
                        lambda name: _launch(xq, xs, wq, ws, bias, out_dtype, CONFIGS[name]), default_config(M),
                        xq.device)


# ----------------------------------------------------------------------------------------- dispatch
_reported: set[tuple[str, str]] = set()


def choose_path(t: torch.Tensor) -> str:
    """'triton' (sm_80+ or PIPELINE_KERNELS=triton), 'int_mm' (other CUDA GPUs), else 'dequant'."""
    if dispatch.use_triton(t, "int8_gemm", MIN_CAPABILITY):
        path = "triton"
    elif t.device.type == "cuda" and dispatch.mode() != "reference" and str(t.device) not in _int_mm_broken:
        path = "int_mm"
    else:
        path = "dequant"
    key = (str(t.device), path)
    if key not in _reported:
        _reported.add(key)
        log.info("int8 GEMM on %s (capability %s): %s", t.device, dispatch.device_capability(t.device), path)
    return path


def _check(xq, xs, wq, ws, bias, out_dtype):
    if xq.dtype != torch.int8 or wq.dtype != torch.int8:
        raise ValueError(f"xq and wq must be int8, got {xq.dtype} and {wq.dtype}")
    if wq.dim() != 2:
        raise ValueError(f"wq must be 2-D (N, K), got shape {tuple(wq.shape)}")
    N, K = wq.shape
    if xq.shape[-1] != K:
        raise ValueError(f"xq.shape[-1]={xq.shape[-1]} != weight K={K} (wq shape {tuple(wq.shape)})")
    rows = xq.numel() // K if K else 0
    if xs.numel() != rows:
        raise ValueError(f"xs has {xs.numel()} elements; expected one per token = {rows} (xq shape {tuple(xq.shape)})")
    if tuple(ws.shape) not in ((N,), (N, 1)):
        raise ValueError(f"ws shape {tuple(ws.shape)} != (N,) = ({N},)")
    if bias is not None and tuple(bias.shape) != (N,):
        raise ValueError(f"bias shape {tuple(bias.shape)} != (N,) = ({N},)")
    if out_dtype not in OUT_DTYPES:
        raise ValueError(f"out_dtype={out_dtype} not supported; valid: {OUT_DTYPES}")
    for name, t in (("xs", xs), ("wq", wq), ("ws", ws), ("bias", bias)):
        if t is not None and t.device != xq.device:
            raise ValueError(f"{name} is on {t.device} but xq on {xq.device}")


def int8_linear(xq: torch.Tensor, xs: torch.Tensor, wq: torch.Tensor, ws: torch.Tensor,
                bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.float16,
                config: str | tuple | None = None, path: str | None = None) -> torch.Tensor:
    """y = (xs * xq) @ (ws * wq).T (+ bias) -> (..., N) out_dtype. xq (..., K) int8, xs (...) per token.

    `config`: a CONFIGS name or raw tuple (tests); `path`: force 'triton' | 'int_mm' | 'dequant'."""
    _check(xq, xs, wq, ws, bias, out_dtype)
    N, K = wq.shape
    lead = xq.shape[:-1]
    x2 = xq.reshape(-1, K)
    x2 = x2 if x2.stride(-1) == 1 else x2.contiguous()
    fine = xs.dim() == 1 and xs.dtype == torch.float32 and xs.is_contiguous()  # skip no-op calls: host time
    xs2 = xs if fine else xs.reshape(-1).float().contiguous()
    ws2 = ws if ws.dim() == 1 and ws.is_contiguous() else ws.reshape(-1).contiguous()
    wq = wq if wq.stride(-1) == 1 else wq.contiguous()
    if x2.shape[0] == 0:
        return torch.empty(*lead, N, dtype=out_dtype, device=xq.device)
    path = path or choose_path(xq)
    if path == "triton":
        if isinstance(config, tuple) or (config is None and xq.device.type != "cuda"):
            cfg = config or INTERPRET_CONFIG
        else:
            cfg = CONFIGS[config or _choose(x2, xs2, wq, ws2, bias, out_dtype)]
        y = _launch(x2, xs2, wq, ws2, bias, out_dtype, cfg)
    elif path == "int_mm" and (K % 8 or N % 8):  # cuBLASLt int8 wants K, N multiples of 8
        y = _dequant_mm(x2, xs2, wq, ws2, bias, out_dtype)
    elif path == "int_mm":
        try:
            y = _int_mm(x2, xs2, wq, ws2, bias, out_dtype)
        except RuntimeError as e:  # cuBLASLt without int8 support on this GPU
            _int_mm_broken.add(str(xq.device))
            log.warning("torch._int_mm failed on %s (%s); int8 GEMM falls back to dequantize + matmul",
                        xq.device, str(e).splitlines()[0][:120])
            y = _dequant_mm(x2, xs2, wq, ws2, bias, out_dtype)
    elif path == "dequant":
        y = _dequant_mm(x2, xs2, wq, ws2, bias, out_dtype)
    else:
        raise ValueError(f"path={path!r}; valid: 'triton', 'int_mm', 'dequant'")
    return y.reshape(*lead, N)
