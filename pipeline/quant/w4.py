"""Group-wise integer weight quantization (RTN math) and the AutoAWQ GEMM pack / unpack.

    q, scales, zeros = quantize(w, bits=4, group_size=64, zero_point=True, clip=None)
    w_hat = dequantize(q, scales, zeros, group_size)          # == fake_quant(w, ...)
    t = pack(q, scales, zeros, bits)                          # {"qweight", "qzeros", "scales"}
    q, scales, zeros = unpack(t["qweight"], t["qzeros"], t["scales"], bits)   # bit-exact inverse

Quantizer format (also the input of pipeline/kernels/w4a16.py's pack_w4):
    w (N, K): N outputs, K inputs, groups of g consecutive inputs.
    q (N, K) uint8 in [0, 2^bits), scales (K/g, N) fp16, zeros (K/g, N) uint8 integers,
    w_hat[n, k] = (q[n, k] - zeros[k/g, n]) * scales[k/g, n].
    asymmetric (zero_point): scale = (max - min) / (2^b - 1), zero = clamp(round(-min / scale), 0, 2^b - 1)
    symmetric:               scale = absmax / (2^(b-1) - 1), zero = 2^(b-1)
    clip (N, K/g) ratios in (0, 1]: the group's min and max (or absmax) are shrunk by the ratio first;
    clip (N, K/g, 2): separate ratios for the min and the max (symmetric: the max's ratio).
    The scale is rounded to fp16 before the codes are computed, so fake_quant == what is packed.

AutoAWQ GEMM layout (version "gemm"), bits <= 4: 8 values per int32 along N, nibble i (bits 4i..4i+3)
of packed column c holds column 8c + ORDER[i], ORDER = [0, 2, 4, 6, 1, 3, 5, 7]:
    qweight (K, N/8) int32 from q.T;  qzeros (K/g, N/8) int32 from zeros;  scales (K/g, N) fp16.
N that is not a multiple of 8 is padded with zero codes (unpack trims to scales' N).
bits = 8: 4 bytes per int32 in natural order (not an AutoAWQ format).
"""
from __future__ import annotations

import torch

AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]
BITS = (3, 4, 8)
GROUP_SIZES = (32, 64, 128)


def check_bits(bits: int) -> None:
    if bits not in BITS:
        raise ValueError(f"quant.w_bits={bits!r} is not one of {list(BITS)}")


def check_group(group_size: int) -> None:
    if group_size not in GROUP_SIZES:
        raise ValueError(f"quant.group_size={group_size!r} is not one of {list(GROUP_SIZES)}")


def linear_inputs(args) -> dict[str, int]:
    """Input width (K) of every quantized linear of a decoder block."""
    qkv = args.dim
    return {"q": qkv, "k": qkv, "v": qkv, "o": args.n_heads * args.head_dim, "gate": args.dim,
            "up": args.dim, "down": args.hidden_dim}


def check_group_size(args, group_size: int, where: str = "") -> None:
    """Refuse a group size that does not divide some linear's input width, naming the layer."""
    for name, k in linear_inputs(args).items():
        if group_size < 1 or k % group_size:
            ok = [g for g in GROUP_SIZES if all(v % g == 0 for v in linear_inputs(args).values())]
            raise ValueError(f"quant.group_size={group_size} does not divide the input width {k} of linear "
                             f"layers.*.{name}{where}; group sizes that fit every linear: {ok}")


def qparams(w: torch.Tensor, bits: int, group_size: int, zero_point: bool = True, clip=None):
    """scales fp16 (N, G), zeros float (N, G) for w (N, K) float32."""
    N, K = w.shape
    wg = w.reshape(N, K // group_size, group_size)
    if zero_point:
        mx, mn = wg.amax(-1), wg.amin(-1)
        if clip is not None:
            lo, hi = (clip[..., 0], clip[..., 1]) if clip.dim() == 3 else (clip, clip)
            mx, mn = mx * hi, mn * lo
        qmax = 2 ** bits - 1
        scale = ((mx - mn).clamp_min(1e-5) / qmax).half().float()
        zero = torch.round(-mn / scale).clamp_(0, qmax)
    else:
        am = wg.abs().amax(-1)
        if clip is not None:
            am = am * (clip[..., 1] if clip.dim() == 3 else clip)
        scale = (am.clamp_min(1e-5) / (2 ** (bits - 1) - 1)).half().float()
        zero = torch.full_like(scale, 2 ** (bits - 1))
    return scale, zero


def quantize(w: torch.Tensor, bits: int, group_size: int, zero_point: bool = True, clip=None):
    """w (N, K) -> q (N, K) uint8, scales (K/g, N) fp16, zeros (K/g, N) uint8 (see module doc)."""
    check_bits(bits)
    N, K = w.shape
    if K % group_size:
        raise ValueError(f"group_size={group_size} does not divide the input width K={K}")
    w = w.float()
    scale, zero = qparams(w, bits, group_size, zero_point, clip)               # (N, G)
    wg = w.reshape(N, K // group_size, group_size)
    q = (torch.round(wg / scale[..., None]) + zero[..., None]).clamp_(0, 2 ** bits - 1)
    return q.reshape(N, K).to(torch.uint8), scale.T.half().contiguous(), zero.T.to(torch.uint8).contiguous()


def dequantize(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
               dtype=torch.float32) -> torch.Tensor:
    N, K = q.shape
    qg = q.float().reshape(N, K // group_size, group_size)
    w = (qg - zeros.T.float()[..., None]) * scales.T.float()[..., None]
    return w.reshape(N, K).to(dtype)


def fake_quant(w: torch.Tensor, bits: int, group_size: int, zero_point: bool = True, clip=None) -> torch.Tensor:
    """Quantize and dequantize w (N, K) in float32 math; returns w's dtype."""
    N, K = w.shape
    wf = w.float()
    scale, zero = qparams(wf, bits, group_size, zero_point, clip)
    wg = wf.reshape(N, K // group_size, group_size)
    q = (torch.round(wg / scale[..., None]) + zero[..., None]).clamp_(0, 2 ** bits - 1)
    return ((q - zero[..., None]) * scale[..., None]).reshape(N, K).to(w.dtype)


def _layout(bits: int):
    return (4, AWQ_ORDER) if bits <= 4 else (8, [0, 1, 2, 3])


def pack_cols(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes (R, N) -> int32 (R, ceil(N / per)), AutoAWQ order for bits <= 4."""
    width, order = _layout(bits)
    per = 32 // width
    R, N = x.shape
    x = x.to(torch.int64)
    if N % per:
        x = torch.cat([x, x.new_zeros(R, per - N % per)], 1)
    x = x.reshape(R, -1, per)[:, :, order]                                     # nibble i <- column ORDER[i]
    shifts = torch.arange(per, device=x.device, dtype=torch.int64) * width
    packed = (x << shifts).sum(-1)                                             # < 2^32
    return torch.where(packed >= 2 ** 31, packed - 2 ** 32, packed).to(torch.int32)


def unpack_cols(p: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """int32 (R, M) -> uint8 codes (R, n); inverse of pack_cols."""
    width, order = _layout(bits)
    per = 32 // width
    shifts = torch.arange(per, device=p.device, dtype=torch.int64) * width
    nib = (p.to(torch.int64)[..., None] >> shifts) & (2 ** width - 1)          # (R, M, per), nibble i
    out = torch.empty_like(nib)
    out[..., order] = nib                                                      # column ORDER[i] <- nibble i
    return out.reshape(p.shape[0], -1)[:, :n].to(torch.uint8)


def pack(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int) -> dict[str, torch.Tensor]:
    """Quantizer format -> AutoAWQ GEMM tensors {qweight (K, N/8), qzeros (K/g, N/8), scales (K/g, N)}."""
    return {"qweight": pack_cols(q.T, bits), "qzeros": pack_cols(zeros, bits),
            "scales": scales.half().contiguous()}


def unpack(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, bits: int):
    """AutoAWQ GEMM tensors -> (q (N, K) uint8, scales (K/g, N) fp16, zeros (K/g, N) uint8)."""
    n = scales.shape[1]
    q = unpack_cols(qweight, bits, n).T.contiguous()
    return q, scales, unpack_cols(qzeros, bits, n)
