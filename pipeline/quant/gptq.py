"""GPTQ (Frantar et al., 2022): quantize a linear's columns one at a time, feeding each column's rounding error
into the columns not yet quantized through the inverse Hessian of the layer's output error.

    H = hessian_add(None, x)                      # x (..., K) calibration inputs; call again per batch
    q, scales, zeros, info = quantize(w, H, bits=4, group_size=64)   # codes in pipeline/quant/w4.py's format
    w_hat = w4.dequantize(q, scales, zeros, 64)   # == info["w_hat"]

The loss of a linear is ||X W^T - X W_hat^T||^2 = tr(dW H dW^T) / 2 with H = 2 X^T X (K, K), summed in float64
(each batch's X^T X one float32 matmul) over all calibration tokens, normalised by their count (only H's shape
matters: dampening is relative to its mean diagonal). Steps:
    dampening   H += damp * mean(diag H) * I (damp 0.01: GPTQ's default); inputs never seen (diag 0) get
                H_kk = 1 and w[:, k] = 0
    Hinv        U = cholesky(H^-1) upper: row k of U holds what column k's error does to the columns after k
    columns     in blocks of `block` (128), lazily: inside a block, column k's error e = (w_k - q_k) / U_kk
                updates the block's later columns at once (w_j -= e U_kj); the block's errors update the
                columns after the block with one matmul when it is done
    groups      asymmetric (or symmetric) groups of g consecutive inputs, the format `pack` writes (no g_idx);
                a group's scale and zero come from its columns as they are when the group's first column is
                reached (already carrying the error of the groups before), optionally shrunk by clip ratios
                (N, K/g, 2) (AWQ's clips, for AWQ + GPTQ) and/or by an MSE grid search per (row, group)
    act order   (desc_act) columns processed by descending diag(H) (most sensitive first). Our packed format
                has no g_idx (each group is g consecutive inputs), so the groups stay static: every group's
                scale and zero are computed up front from the original weights, before any error feedback,
                and each column is coded with its own group's parameters whatever its turn. Serving needs no
                reordering; the codes are the same format.
    feedback    the fraction of each column's scaled error fed into the later columns (1: GPTQ; 0: round to
                nearest with the same group parameters; between: a damped update that fits the calibration
                windows less closely)
"""
from __future__ import annotations

import torch

from .w4 import fake_quant, qparams

SUB = 16                                       # inner lazy-update block (divides every group size)
MSE_RATIOS = [1 - i / 20 for i in range(10)]   # shrink factors the MSE grid tries (1 .. 0.55)
KEEP_BYTES = 2 ** 30                           # down's inputs of all windows kept for the block output up to this


def hessian_add(H, x: torch.Tensor, n_seen: int = 0):
    """Running H = 2/n X^T X over all tokens seen: x (..., K) -> (H (K, K) float64, tokens seen). Each call's
    X^T X is one float32 matmul (a batch of tokens); the running sum is kept in float64."""
    x = x.reshape(-1, x.shape[-1]).float()                                     # (T, K)
    n = n_seen + x.shape[0]
    h = 2.0 * (x.T @ x).double()                                               # (K, K)
    H = h / n if H is None else H * (n_seen / n) + h / n
    return H, n


def _mse_clip(w: torch.Tensor, bits: int, zero_point: bool, base) -> torch.Tensor:
    """Per-row shrink ratios (N, 1, 2) for one group w (N, g) minimising sum |w - Q(w)|^2.4 (on top of `base`)."""
    best_r, best_e = None, None
    for r in MSE_RATIOS:
        clip = base * r
        e = (w - _fake(w, bits, zero_point, clip)).abs().pow(2.4).sum(-1)     # (N,)
        if best_e is None:
            best_r, best_e = clip.clone(), e
        else:
            better = e < best_e
            best_e = torch.where(better, e, best_e)
            best_r = torch.where(better[:, None, None], clip, best_r)
    return best_r


def _fake(w, bits, zero_point, clip):
    g = w.shape[1]
    s, z = qparams(w, bits, g, zero_point, clip)                              # (N, 1)
    return (torch.round(w / s).add_(z).clamp_(0, 2 ** bits - 1) - z) * s


def _group_params(w, bits, zero_point, clip, mse):
    """scale, zero (N,) of one group w (N, g); clip (N, 1, 2) ratios or None."""
    base = clip if clip is not None else w.new_ones(w.shape[0], 1, 2)
    if mse:
        base = _mse_clip(w, bits, zero_point, base)
    s, z = qparams(w, bits, w.shape[1], zero_point, base)
    return s[:, 0], z[:, 0]


@torch.no_grad()
def quantize(w: torch.Tensor, H: torch.Tensor, bits: int = 4, group_size: int = 64, zero_point: bool = True,
             damp: float = 0.01, block: int = 128, act_order: bool = False, clip=None, mse: bool = False,
             feedback: float = 1.0):
    """GPTQ one linear: w (N, K), H (K, K) -> q (N, K) uint8, scales (K/g, N) fp16, zeros (K/g, N) uint8, info
    {"w_hat" (N, K) float32: the dequantized weights, "loss": tr(dW H dW^T) / 2 per output row summed,
    "loss_rtn": the same for round to nearest}. clip: (N, K/g, 2) ratios for each group's min and max."""
    N, K = w.shape
    g = group_size
    if K % g:
        raise ValueError(f"group_size={g} does not divide the input width K={K}")
    if block % g or g % SUB:
        raise ValueError(f"GPTQ block {block} must be a multiple of group_size={g}, itself a multiple of {SUB}")
    qmax = 2 ** bits - 1
    dev = w.device
    W = w.float().clone()                                                      # (N, K)
    H = H.double().clone()                                                     # (K, K)
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    G = K // g
    scales = torch.zeros(G, N, device=dev)                                     # group j's row: contiguous
    zeros = torch.zeros(G, N, device=dev)
    clip = clip.float() if clip is not None else None
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(K, device=dev)
    if act_order:                                                              # static groups (module doc)
        for j in range(G):
            c = clip[:, j: j + 1] if clip is not None else None
            scales[j], zeros[j] = _group_params(W[:, j * g:(j + 1) * g], bits, zero_point, c, mse)
    H = H[perm][:, perm]
    H += damp * torch.mean(torch.diag(H)) * torch.eye(K, dtype=H.dtype, device=dev)
    L = torch.linalg.cholesky(H)
    Linv = torch.linalg.solve_triangular(L, torch.eye(K, dtype=H.dtype, device=dev), upper=False)
    U = torch.linalg.cholesky(Linv.T @ Linv, upper=True).float()              # (K, K), H^-1 = U^T U
    group = (perm // g).tolist()                                               # column -> its group
    WT = W.T[perm].contiguous()                                                # (K, N): a column is a row here
    QT = torch.zeros(K, N, device=dev)                                         # dequantized, permuted order
    codes = torch.zeros(K, N, device=dev)
    for b0 in range(0, K, block):
        b1 = min(b0 + block, K)
        W1 = WT[b0:b1].clone()                                                 # (B, N)
        E1 = torch.zeros_like(W1)                                              # scaled errors (B, N)
        U1 = U[b0:b1, b0:b1]                                                   # (B, B)
        for i in range(b1 - b0):
            col = b0 + i
            j = group[col]                                                     # the column's group
            if not act_order and col % g == 0:                                 # group start: its params now
                c = clip[:, j: j + 1] if clip is not None else None
                scales[j], zeros[j] = _group_params(W1[i: i + g].T, bits, zero_point, c, mse)
            s, z = scales[j], zeros[j]
            x = W1[i]                                                          # (N,)
            code = (torch.round(x / s) + z).clamp_(0, qmax)
            qx = (code - z) * s
            codes[col], QT[col] = code, qx
            e = (x - qx) * (feedback / U1[i, i])
            E1[i] = e
            s1 = (i // SUB + 1) * SUB                                          # the same lazy scheme, nested:
            W1[i + 1: s1].addr_(U1[i, i + 1: s1], e, alpha=-1)                 # this sub-block now,
            if i + 1 == s1:                                                    # the rest of the block when
                W1[s1:] -= U1[s1 - SUB: s1, s1:].T @ E1[s1 - SUB: s1]          # the sub-block is done
        WT[b1:] -= U[b0:b1, b1:].T @ E1                                        # columns after the block
    inv = torch.argsort(perm)
    Q, codes = QT[inv].T.contiguous(), codes[inv].T
    Hd = H[inv][:, inv].float()                                                # dampened, original order
    dq = w.float() - Q
    w0 = w.float().clone()
    w0[:, dead] = 0.0
    rtn = fake_quant(w0, bits, g, zero_point, clip)
    loss = lambda d: 0.5 * torch.einsum("nk,kl,nl->", d, Hd, d).item()        # noqa: E731
    info = {"w_hat": Q, "loss": loss(dq), "loss_rtn": loss(w.float() - rtn)}
    return codes.to(torch.uint8), scales.half(), zeros.to(torch.uint8), info



# Linears quantized together (they share an input, so one H; rows are independent in GPTQ, so stacking them
# is the same as quantizing each), in the order a block computes them: each group's H is taken with the
# groups before it already quantized (sequential inside the block, as after the previous blocks).
STACKS = {"qkv": ("q", "k", "v"), "o": ("o",), "gate_up": ("gate", "up"), "down": ("down",)}


def _stack(block, names, clips):
    w = torch.cat([getattr(block, n).weight.data.float() for n in names])                 # (sum N, K)
    c = torch.cat([clips[n].float() for n in names]) if clips else None                 # (sum N, K/g, 2)
    return w, c


@torch.no_grad()
def quantize_block(block, x: torch.Tensor, cos, sin, batch: int, q, clips: dict | None = None) -> dict:
    """GPTQ every linear of one decoder block, sequentially, on its input x (S, T, D), `batch` sequences at a time.
    The block's weights are replaced by their dequantized values and x by the quantized block's output (the next
    block's input). q: w_bits, group_size, zero_point, gptq_{damp, block, desc_act, mse, feedback}. clips:
    linear -> (N, K/g, 2) ratios (AWQ's) or None. Returns {"codes": {linear: (codes (N, K) uint8, scales (K/g, N)
    fp16, zeros (K/g, N) uint8)}, "info": {stack: {"loss", "loss_rtn"}}}."""
    parts = [slice(s0, s0 + batch) for s0 in range(0, x.shape[0], batch)]
    o_in, resid = [None] * len(parts), [None] * len(parts)                    # per batch, kept between stacks
    keep = x[..., :1].numel() * block.gate.weight.shape[0] * x.element_size() <= KEEP_BYTES
    down_in = [None] * len(parts)                                              # (S_b, T, F) when kept
    seen = {}
    hook = block.o.register_forward_pre_hook(lambda m, a: seen.__setitem__("o", a[0]))

    def mlp_in(b):
        h = block.mlp_norm(resid[b])
        return torch.nn.functional.silu(block.gate(h)) * block.up(h)           # (S_b, T, F)

    def stack_input(name, b):                                                  # the stack's input, batch b
        if name == "qkv":
            return block.attn_norm(x[parts[b]])
        if name == "o":                                                        # with the quantized q, k, v
            block.attention(block.attn_norm(x[parts[b]]), cos, sin)
            o_in[b] = seen.pop("o")                                            # (S_b, T, nh*hd)
            return o_in[b]
        if name == "gate_up":
            resid[b] = x[parts[b]] + block.o(o_in[b])                          # with the quantized o
            o_in[b] = None
            return block.mlp_norm(resid[b])
        a = mlp_in(b)
        down_in[b] = a if keep else None                                       # reused for the block output
        return a

    out, info = {}, {}
    try:
        for name, members in STACKS.items():
            H, n = None, 0
            for b in range(len(parts)):
                H, n = hessian_add(H, stack_input(name, b), n)
            w, c = _stack(block, members, clips)
            codes, scales, zeros, inf = quantize(w, H, q.w_bits, q.group_size, q.zero_point, q.gptq_damp,
                                                 q.gptq_block, q.gptq_desc_act, c, q.gptq_mse, q.gptq_feedback)
            r0 = 0
            for m in members:
                lin = getattr(block, m)
                r1 = r0 + lin.weight.shape[0]
                out[m] = (codes[r0:r1].contiguous(), scales[:, r0:r1].contiguous(), zeros[:, r0:r1].contiguous())
                lin.weight.data = inf["w_hat"][r0:r1].to(lin.weight.dtype)
                r0 = r1
            info[name] = {"loss": inf["loss"], "loss_rtn": inf["loss_rtn"]}
    finally:
        hook.remove()
    for b, sl in enumerate(parts):                                             # the block's output, quantized
        x[sl] = resid[b] + block.down(down_in[b] if down_in[b] is not None else mlp_in(b))
        resid[b] = down_in[b] = None
    return {"codes": out, "info": info}
