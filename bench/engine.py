"""Engine speed and memory on one GPU, synthetic Llama-2-7B (random weights), all in one process.

    python bench/engine.py --out results.json [--quick]
    python bench/engine.py --decode-only --out results.json   # check + copy + the decode rows only
    python bench/engine.py --dry-run                          # CPU, tiny shapes: the same code paths, no GPU
    python bench/engine.py --profile-only --kinds w4 --pdl off,on   # each row without, then with PDL
    python bench/engine.py --profile-only --kinds w4 --pdl-off-for "/attention,norm,rope_kv"  # all PDL, then GEMVs only

Sections (results written to --out after each one, so a cut-off run keeps what it measured):
  check     tiny model on the GPU: engine (Triton kernels, CUDA graphs) vs the reference model,
            fp16/w4a16/w4a16_kv8/w8a8/w8a8_kv8 (W8A8: the reference's linears are W8A8Linear)
  copy      device-to-device copy bandwidth (bytes read + written), the roofline's denominator
  decode    the original's protocol: batch 1, prompt 1 token, 512 new tokens, tokens/s for fp16, w4a16,
            w4a16_kv8, w8a8, w8a8_kv8 (CUDA graphs; w4a16 also eager), against the roofline
            (weight bytes + mean KV bytes per token) / copy bandwidth; weight bytes are what a step reads:
            int4 codes + scales + zeros, int8 codes + per-channel scales, or fp16
  memory    total device memory (torch max allocated) at batch 8/16/32/48, context 2048, fp16 vs int8 KV;
            16-bit vs 4-bit weights at context 2048 and 4096 (batch 1); concurrent 2048-token sequences in 80 GB
  hf        transformers generate fp16, eager and cache_implementation="static", same protocol
The 7B workspaces are built on the GPU with random int4 codes/scales/zeros sent through the real pack path
(AutoAWQ pack -> unpack -> workspace re-layout), random int8 codes + per-channel fp16 scales (W8A8), and
random static KV qparams. No Hydra needed.
--dry-run: everything on the CPU (the kernels' PyTorch references) at tiny shapes, 16 new tokens: check,
copy and the decode rows; no timing it prints means anything for a GPU.
"""
from __future__ import annotations

import argparse
import gc
import importlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipeline.engine import Engine, SamplingParams  # noqa: E402
from pipeline.models.llama import ModelArgs, build_model  # noqa: E402
from pipeline.models.sources import synthetic_tensors  # noqa: E402
from pipeline.quant import w4 as awq_format  # noqa: E402
from pipeline.quant.w8 import W8A8Linear, W8Weight, quantize_w8  # noqa: E402
from pipeline.weights import of  # noqa: E402
from pipeline.workspace import write_workspace  # noqa: E402

LLAMA7B = ModelArgs(dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, head_dim=128, hidden_dim=11008,
                    vocab_size=32000, max_seq_len=4096)
INTERNLM7B = ModelArgs(arch="internlm", dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, head_dim=128, hidden_dim=11008,
                       vocab_size=103168, max_seq_len=4096, qkv_bias=True, o_bias=True)
SHAPES = {"llama2-7b": LLAMA7B, "internlm-7b": INTERNLM7B}
PDL_MODULES = ("attention", "norm", "rope_kv", "w4a16")  # kernel modules that launch with PDL
PDL_MODES = {"auto": ("", ""), "on": ("1", "_pdl"), "off": ("0", "_nopdl")}  # -> PIPELINE_PDL, row suffix
TINY = ModelArgs(dim=256, n_layers=2, n_heads=8, n_kv_heads=4, head_dim=32, hidden_dim=512, vocab_size=512,
                 max_seq_len=512)
LINEARS = ("q", "k", "v", "o", "gate", "up", "down")
ROWS = {"w4": (("w4a16", 0), ("w4a16_kv8", 4)), "w8": (("w8a8", 0), ("w8a8_kv8", 4)), "fp16": (("fp16", 0),)}
RES: dict = {}
DEV = "cuda"        # --dry-run: "cpu"


def save(path):
    Path(path).write_text(json.dumps(RES, indent=2))


def free():
    gc.collect()
    if DEV == "cuda":
        torch.cuda.empty_cache()


def sync():
    if DEV == "cuda":
        torch.cuda.synchronize()


def linear_shapes(args: ModelArgs) -> dict:
    """(N, K) of each decoder linear."""
    return {"q": (args.n_heads * args.head_dim, args.dim), "k": (args.n_kv_heads * args.head_dim, args.dim),
            "v": (args.n_kv_heads * args.head_dim, args.dim), "o": (args.dim, args.n_heads * args.head_dim),
            "gate": (args.hidden_dim, args.dim), "up": (args.hidden_dim, args.dim), "down": (args.dim, args.hidden_dim)}


def random_w4(args: ModelArgs, g: int, seed: int = 0) -> dict:
    """Random int4 codes (uniform 0..15), zeros, scales ~ 1/(4.6 sqrt(K)), through AutoAWQ pack/unpack."""
    gen = torch.Generator(device=DEV).manual_seed(seed)
    out = {}
    for i in range(args.n_layers):
        for n, (N, K) in linear_shapes(args).items():
            q = torch.randint(0, 16, (N, K), generator=gen, device=DEV, dtype=torch.uint8)
            z = torch.randint(6, 10, (K // g, N), generator=gen, device=DEV).to(torch.uint8)
            s = (torch.rand(K // g, N, generator=gen, device=DEV) * 0.5 + 0.75) / (4.6 * K ** 0.5)
            packed = awq_format.pack(q, s.half(), z, 4)
            out[f"layers.{i}.{n}"] = awq_format.unpack(packed["qweight"], packed["qzeros"], packed["scales"], 4)
    return out


def random_w8(args: ModelArgs, seed: int = 0) -> dict:
    """Random int8 codes (uniform -127..127, std 73.6) and fp16 scales per output channel ~ 1/(73.6 sqrt(K)):
    weights of std ~ 1/sqrt(K), as synthetic_tensors."""
    gen = torch.Generator(device=DEV).manual_seed(seed)
    out = {}
    for i in range(args.n_layers):
        for n, (N, K) in linear_shapes(args).items():
            q = torch.randint(-127, 128, (N, K), generator=gen, device=DEV, dtype=torch.int8)
            s = (torch.rand(N, generator=gen, device=DEV) * 0.5 + 0.75) / (73.6 * K ** 0.5)
            out[f"layers.{i}.{n}"] = W8Weight(q, s.half())
    return out


def random_kv(args: ModelArgs) -> dict:
    s = torch.full((args.n_kv_heads,), 0.05)
    z = torch.zeros(args.n_kv_heads)
    return {i: (s, z, s, z) for i in range(args.n_layers)}


def build_ws(root: Path, args, kind: str, g: int = 128) -> Path:
    """kind: fp16 | w4 (int4, group g) | w8 (int8 per channel)."""
    t0 = time.time()
    ws = root / f"ws_{kind}"
    tensors = synthetic_tensors(args, 0, torch.float16, device=DEV)
    w4 = random_w4(args, g) if kind == "w4" else None
    w8 = random_w8(args) if kind == "w8" else None
    if kind != "fp16":
        tensors = {k: v for k, v in tensors.items() if not any(k.endswith(f".{n}.weight") for n in LINEARS)}
    write_workspace(ws, args, tensors, None, w4=w4, w8=w8, group_size=g, kv_qparams=random_kv(args), kv_bits=8,
                    model_name=RES.get("model", "tiny"), dtype=torch.float16)
    del tensors, w4, w8
    free()
    RES.setdefault("build_seconds", {})[ws.name] = round(time.time() - t0, 1)
    return ws


def layout_bytes(w) -> int:
    """Bytes of a linear's stored tensors: a weight type's record (of(w).parts), or a torch-native layout's tensors
    (PIPELINE_KERNELS=native: pipeline/kernels/native.py; ByRows counts its decode side)."""
    w = getattr(w, "small", w)
    try:
        return sum(t.numel() * t.element_size() for t in of(w).parts(w).values())
    except TypeError:
        return sum(t.numel() * t.element_size() for t in vars(w).values() if isinstance(t, torch.Tensor))


def weight_bytes(eng) -> int:
    """Bytes a decode step reads for weights: every linear (int4 + scales + zeros, int8 + scales, or fp16),
    lm_head, norms."""
    r, total = eng.runner, 0
    for L in r.layers:
        total += sum(layout_bytes(w) for w in (L.w_qkv, L.wo, L.w13, L.w2))
        total += (L.attn_norm.numel() + L.ffn_norm.numel()) * 2
    return total + r.lm_head.numel() * r.lm_head.element_size()


def kv_bytes_per_token(eng) -> float:
    return eng.runner.block_bytes(eng.block_size) / eng.block_size


def decode_tps(eng, n_new: int) -> float:
    p = SamplingParams(max_new_tokens=n_new, ignore_eos=True)
    eng.generate([[1]], SamplingParams(max_new_tokens=32, ignore_eos=True))  # warm-up: compile, tune, capture
    sync()
    t0 = time.perf_counter()
    out = eng.generate([[1]], p)
    sync()
    assert len(out[0]) == n_new, len(out[0])
    return n_new / (time.perf_counter() - t0)


# ------------------------------------------------------------------------------------------------ sections
def check(root: Path, kinds=("fp16", "w4", "w8")):
    """Tiny model: engine greedy tokens and logits vs the reference model (fp16 on GPU). W8A8: the reference's
    linears are W8A8Linear on the same int8 weights (per-token activations quantized the same way); a
    per-token int8 rounding flips where the two differ in fp16 summation order, so each row also gives the
    reference's own distance from the unquantized reference (the quantization noise) as the yardstick."""
    from pipeline.kernels.kvcache import kv_fake_quant
    from pipeline.kernels.w4a16 import dequantize_w4, pack_w4
    args = TINY
    t = synthetic_tensors(args, 1, torch.float16, device=DEV)
    w4 = {}
    gen = torch.Generator(device=DEV).manual_seed(1)
    for i in range(args.n_layers):
        for n in LINEARS:
            N, K = t[f"layers.{i}.{n}.weight"].shape
            w4[f"layers.{i}.{n}"] = (torch.randint(0, 16, (N, K), generator=gen, device=DEV, dtype=torch.uint8),
                                     torch.full((K // 64, N), 1 / (4.6 * K ** 0.5), device=DEV).half(),
                                     torch.full((K // 64, N), 8.0, device=DEV).half())
    w8 = {}
    for i in range(args.n_layers):
        for n in LINEARS:
            q, sc = quantize_w8(t[f"layers.{i}.{n}.weight"])
            w8[f"layers.{i}.{n}"] = W8Weight(q, sc.half())
    kvq = {i: (torch.full((4,), 0.03), torch.zeros(4), torch.full((4,), 0.03), torch.zeros(4)) for i in range(2)}
    out = {}
    prompts = [[3, 4, 5], list(range(20, 61)), [7]]
    ref16 = build_model(args, t, device=DEV)     # unquantized: the scale of each config's quantization noise
    variants = {"fp16": ({}, 0), "w4a16": ({"w4": w4}, 0), "w4a16_kv8": ({"w4": w4}, 4), "w8a8": ({"w8": w8}, 0),
                "w8a8_kv8": ({"w8": w8}, 4)}
    for name, (quant, qp) in variants.items():
        if (next(iter(quant), "fp16")) not in kinds:
            continue
        write_workspace(root / f"tiny_{name}", args, t, None, group_size=64, kv_qparams=kvq, kv_bits=8, **quant)
        ref_t = dict(t)
        for k, (q, sc, z) in quant.get("w4", {}).items():
            ref_t[k + ".weight"] = dequantize_w4(pack_w4(q, sc, z, 64), torch.float16)
        ref = build_model(args, ref_t, device=DEV)
        for k, w in quant.get("w8", {}).items():
            i, n = k.split(".")[1:]
            setattr(ref.layers[int(i)], n, W8A8Linear(w.qweight, w.scales))
        if qp:
            for blk in ref.layers:
                blk.kv_quant = lambda k, v: tuple(kv_fake_quant(x.transpose(1, 2), "static", 8, torch.full(
                    (4,), 0.03, device=DEV), torch.zeros(4, device=DEV)).transpose(1, 2) for x in (k, v))
        eng = Engine.from_workspace(root / f"tiny_{name}", DEV, {"quant_policy": qp, "session_len": 256,
                                                                   "max_batch_size": 4})
        toks = eng.generate(prompts, SamplingParams(max_new_tokens=24, ignore_eos=True))
        agree, diffs, noise = 0, [], []
        for p, o in zip(prompts, toks):
            ids = p + o
            with torch.no_grad():
                lr = ref(torch.tensor([ids], device=DEV))[0, len(p) - 1:-1].float()   # ref logits, engine's tokens
                l16 = ref16(torch.tensor([ids], device=DEV))[0, len(p) - 1:-1].float()
            le = eng.prompt_logits(ids)[len(p) - 1:-1]
            diffs.append(float((lr - le).abs().max() / lr.abs().max()))
            noise.append(float((lr - l16).abs().max() / lr.abs().max()))
            agree += sum(int(a == b) for a, b in zip(lr.argmax(-1).tolist(), o))
        out[name] = {"argmax_agree": f"{agree}/{sum(map(len, toks))}", "max_rel_logit_diff": round(max(diffs), 5),
                     "ref_vs_unquantized_ref": round(max(noise), 5),
                     "cuda_graph_buckets": sorted(eng.graphs.graphs) if eng.graphs is not None else [],
                     "weight_type": eng.stats()["weight_type"]}
        del eng, ref
        free()
    RES["check"] = out
    del ref16


def copy_bw() -> float:
    n = 1 << (30 if DEV == "cuda" else 26)
    x = torch.empty(n, dtype=torch.uint8, device=DEV)
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    sync()
    if DEV == "cuda":
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        for _ in range(20):
            y.copy_(x)
        e1.record()
        torch.cuda.synchronize()
        seconds = e0.elapsed_time(e1) / 1e3
    else:
        t0 = time.perf_counter()
        for _ in range(20):
            y.copy_(x)
        seconds = time.perf_counter() - t0
    bw = 2 * n * 20 / seconds
    del x, y
    free()
    RES["copy_GBps"] = round(bw / 1e9, 1)
    return bw


def decode(ws: Path, name: str, qp: int, bw: float, n_new: int, eager: bool = False):
    eng = Engine.from_workspace(ws, DEV, {"quant_policy": qp, "session_len": 4096, "max_batch_size": 8,
                                          "num_blocks": 80})
    tps = decode_tps(eng, n_new)
    wb, kvb = weight_bytes(eng), kv_bytes_per_token(eng)
    per_tok = wb + kvb * (n_new + 1) / 2          # mean context over the run
    roof = bw / per_tok
    row = {"tokens_per_s": round(tps, 1), "roofline_tokens_per_s": round(roof, 1), "of_roofline": round(tps / roof, 3),
           "weight_GB": round(wb / 1e9, 3), "weight_bytes": wb, "kv_bytes_per_token": kvb, "kv_mode": eng.runner.kv_mode,
           "weight_type": eng.stats()["weight_type"]}
    if eager:
        eng.graphs = None
        row["eager_tokens_per_s"] = round(decode_tps(eng, n_new), 1)
    RES.setdefault("decode", {})[name] = row
    return eng


def profile(eng, name: str, steps: int = 20):
    """GPU time of one graph-replayed decode step (batch 1, context ~512) by kernel, vs the step's wall time."""
    from torch.profiler import ProfilerActivity, profile as tprofile
    g = eng.graphs
    b = (g.bucket(1), g.ctx_bucket(512))
    g.context_lens[:1].fill_(512)
    g.positions[:1].fill_(511)
    torch.cuda.synchronize()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    for _ in range(steps):
        g.graphs[b].replay()
    e1.record()
    torch.cuda.synchronize()
    replay_ms = e0.elapsed_time(e1) / steps
    with tprofile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            g.graphs[b].replay()
        torch.cuda.synchronize()
    by = {}
    for ev in prof.key_averages():
        t = getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0)
        if t and ev.key not in ("cudaGraphLaunch",):
            by[ev.key[:60]] = round(t / steps / 1e3, 4)    # ms per step
    top = dict(sorted(by.items(), key=lambda kv: -kv[1])[:12])
    RES.setdefault("profile", {})[name] = {"graph_replay_ms": round(replay_ms, 3), "kernel_ms_per_step": top,
                                           "kernel_sum_ms": round(sum(by.values()), 3), "gemm_tuning": gemm_tuning(eng)}


def gemm_tuning(eng, M: int = 1) -> dict:
    """Layer 0's quantized linears at M rows: the tuner's choice and its timings (L2 flushed), fastest first."""
    from pipeline.kernels.int8_gemm import tuning_record as int8_tuning_record
    from pipeline.kernels.w4a16 import tuning_record
    L, tuned = eng.runner.layers[0], {}
    for n in ("w_qkv", "wo", "w13", "w2"):
        w = getattr(L, n)
        if isinstance(w, W8Weight):
            cfg, times = int8_tuning_record(torch.zeros(M, w.qweight.shape[1], dtype=torch.int8, device="cuda"),
                                            w.qweight)
        elif hasattr(w, "qweight"):
            act = "silu_mul" if n == "w2" else None  # the down projection runs with SwiGLU fused
            bias = {"w_qkv": L.b_qkv, "wo": L.b_o}.get(n)
            cfg, times = tuning_record(torch.zeros(M, w.K * (2 if act else 1), dtype=torch.float16, device="cuda"), w,
                                       bias, act=act)
        else:
            continue
        tuned[n] = {"chosen": str(cfg),
                    "ms": dict(sorted(((str(k), round(v, 4)) for k, v in (times or {}).items()), key=lambda kv: kv[1]))}
    return tuned


def memory(eng, label: str, kv: dict, batches, ctxs):
    """Peak device memory for decode steps at batch B with every sequence at context `ctx`."""
    r = eng.runner
    eng.graphs = None   # captured graphs point at the cache being replaced
    bs = eng.block_size
    out = {}
    for kv_name, (bits, mode) in kv.items():
        for B in batches:
            for ctx in ctxs:
                r.k_cache = r.v_cache = r.kv = None
                free()
                torch.cuda.reset_peak_memory_stats()
                r.kv_bits, r.kv_mode = bits, mode
                nb = B * (ctx // bs) + 1
                r.allocate_cache(nb, bs)
                per = ctx // bs
                bt = torch.arange(1, nb, dtype=torch.int32, device="cuda").view(B, per)
                bt = torch.cat([bt, bt.new_zeros(B, eng.max_blocks - per)], 1)
                pos = torch.full((B,), ctx - 1, dtype=torch.long, device="cuda")
                slots = bt[:, per - 1].long() * bs + bs - 1
                with torch.no_grad():
                    r.decode(torch.ones(B, dtype=torch.long, device="cuda"), pos, slots, bt,
                             torch.full((B,), ctx, dtype=torch.int32, device="cuda"))
                torch.cuda.synchronize()
                out[f"{kv_name} B={B} ctx={ctx}"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    RES.setdefault("memory_GiB", {})[label] = out
    r.k_cache = r.v_cache = None
    free()


def fits_in_80gb():
    """Concurrent 2048-token sequences in 80 GB: (80e9 - weights - activation peak) / KV bytes of one sequence."""
    d, m = RES["decode"], RES.get("memory_GiB", {})
    embed = LLAMA7B.vocab_size * LLAMA7B.dim * 2 / 1e9
    wgb = {k: d[k]["weight_GB"] + embed for k in ("fp16", "w4a16", "w8a8") if k in d}   # resident weights
    kvpt = {16: d["fp16"]["kv_bytes_per_token"], 8: d["fp16"]["kv_bytes_per_token"] / 2}
    act = 0.0
    if "fp16_weights" in m:   # activation + workspace overhead at batch 8 (peak minus weights minus KV)
        act = m["fp16_weights"]["fp16_kv B=8 ctx=2048"] * 2**30 - wgb["fp16"] * 1e9 - 8 * 2048 * kvpt[16]
    out = {}
    for name, (w, kv) in {"fp16": ("fp16", 16), "kv8": ("fp16", 8), "w4a16": ("w4a16", 16),
                          "w4a16_kv8": ("w4a16", 8), "w8a8": ("w8a8", 16), "w8a8_kv8": ("w8a8", 8)}.items():
        if w in wgb:
            out[name] = int((80e9 - wgb[w] * 1e9 - max(act, 0)) // (2048 * kvpt[kv]))
    RES["concurrent_2048_in_80GB"] = {"sequences": out, "activation_overhead_GB": round(act / 1e9, 2)}


def hf_baseline(n_new: int, static: bool):
    from transformers import LlamaConfig, LlamaForCausalLM
    a = LLAMA7B
    cfg = LlamaConfig(hidden_size=a.dim, intermediate_size=a.hidden_dim, num_hidden_layers=a.n_layers,
                      num_attention_heads=a.n_heads, num_key_value_heads=a.n_kv_heads, vocab_size=a.vocab_size,
                      max_position_embeddings=4096)
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg).half().eval()
    ids = torch.tensor([[1]], device="cuda")
    res = {}
    for kind in (["eager", "static"] if static else ["eager"]):
        kw = {"cache_implementation": "static"} if kind == "static" else {}
        t0 = time.perf_counter()
        model.generate(ids, max_new_tokens=32, min_new_tokens=32, do_sample=False, **kw)   # warm-up / compile
        warm = time.perf_counter() - t0
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = model.generate(ids, max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False, **kw)
        torch.cuda.synchronize()
        n = out.shape[1] - 1
        res[kind] = {"tokens_per_s": round(n / (time.perf_counter() - t0), 1), "warmup_s": round(warm, 1)}
        RES["hf_fp16"] = res
    del model
    free()


def compare():
    """Speed ratios within this run: every decode row against fp16 and w4a16 (and HF eager when measured)."""
    d = RES.get("decode", {})
    for k, v in d.items():
        for base in ("fp16", "w4a16"):
            if base in d and base != k:
                v[f"x_{base}"] = round(v["tokens_per_s"] / d[base]["tokens_per_s"], 3)
        if "hf_fp16" in RES:
            v["x_hf_eager"] = round(v["tokens_per_s"] / RES["hf_fp16"]["eager"]["tokens_per_s"], 2)


def table():
    print(f"\n{'config':<18}{'tok/s':>9}{'roofline':>10}{'of roof':>9}{'x fp16':>8}{'x w4a16':>9}")
    for k, v in RES.get("decode", {}).items():
        print(f"{k:<18}{v['tokens_per_s']:>9}{v['roofline_tokens_per_s']:>10}{v['of_roofline']:>9}"
              f"{v.get('x_fp16', 1.0 if k == 'fp16' else ''):>8}{v.get('x_w4a16', 1.0 if k == 'w4a16' else ''):>9}")
    for k, v in RES.get("hf_fp16", {}).items():
        print(f"hf {k:<15}{v['tokens_per_s']:>9}")


_PDL_ON = {}  # module -> its own pdl_enabled, kept while an ablation replaces it


def pdl_off_for(mods: tuple[str, ...]) -> None:
    """PDL off in exactly these kernel modules (the others use their own switch) for engines built next."""
    for mod in PDL_MODULES:
        m = importlib.import_module(f"pipeline.kernels.{mod}")
        _PDL_ON.setdefault(mod, m.pdl_enabled)
        m.pdl_enabled = (lambda device: False) if mod in mods else _PDL_ON[mod]


def main():
    global DEV
    ap = argparse.ArgumentParser(description="Engine speed and memory, batch-1 decode (see the module doc).")
    ap.add_argument("--out", default=None, help="results JSON (default engine.json; --dry-run: /tmp/engine_dry.json)")
    ap.add_argument("--new", type=int, default=512, help="new tokens per decode run (--dry-run: at most 16)")
    ap.add_argument("--quick", action="store_true", help="skip the HF static-cache baseline")
    ap.add_argument("--eager-too", action="store_true", help="every decode row also without CUDA graphs, same engine")
    ap.add_argument("--profile-only", action="store_true", help="decode rows + kernel profile only (no check)")
    ap.add_argument("--decode-only", action="store_true",
                    help="check, copy bandwidth and the decode rows (fp16, w4a16, w4a16_kv8, w8a8, w8a8_kv8) only")
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes: check + copy + decode rows")
    ap.add_argument("--shapes", default="llama2-7b", choices=sorted(SHAPES),
                    help="random weights with these real shapes (memory tables and baselines: llama2-7b only)")
    ap.add_argument("--kinds", default="fp16,w4,w8",
                    help="weight kinds to run: fp16, w4 (w4a16, w4a16_kv8), w8 (w8a8, w8a8_kv8); default all")
    ap.add_argument("--pdl", default="auto", help="programmatic dependent launch per row, comma-separated: auto (the "
                    "engine's default: on for int4 weights), on (forced, rows <row>_pdl), off (rows <row>_nopdl); GEMM "
                    "tuning from the first engine of a row is reused by the next")
    ap.add_argument("--pdl-off-for", default="", help="an ablation, in one process: '/'-separated sets of comma-separated "
                    "kernel modules launched without PDL even where it is on, each set giving its own rows "
                    f"(<row>_no-<a>+<b>; an empty set: the unchanged rows); modules: {sorted(PDL_MODULES)}")
    a = ap.parse_args()
    ablations = [tuple(filter(None, part.split(","))) for part in a.pdl_off_for.split("/")]
    for mods in ablations:
        for mod in mods:
            if mod not in PDL_MODULES:
                ap.error(f"--pdl-off-for {mod!r}: must be one of {sorted(PDL_MODULES)}")
    RES["pdl_off_for"] = a.pdl_off_for
    pdl_modes = a.pdl.split(",")
    if not set(pdl_modes) <= set(PDL_MODES):
        ap.error(f"--pdl {a.pdl!r}: each must be one of {sorted(PDL_MODES)}")
    kinds = a.kinds.split(",")
    if not set(kinds) <= set(ROWS):
        ap.error(f"--kinds {a.kinds!r}: each must be one of {sorted(ROWS)}")
    if a.dry_run:
        DEV, a.new = "cpu", min(a.new, 16)
    out = a.out or ("/tmp/engine_dry.json" if a.dry_run else "engine.json")
    args = TINY if a.dry_run else SHAPES[a.shapes]
    light = a.decode_only or a.dry_run or args is not LLAMA7B    # no memory tables, no transformers baseline
    t_start = time.time()
    RES.update(device=torch.cuda.get_device_name() if DEV == "cuda" else "cpu (dry run, tiny shapes)",
               torch=torch.__version__, date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
               model="tiny" if a.dry_run else f"synthetic-{a.shapes}",
               kernels=os.environ.get("PIPELINE_KERNELS", "auto"),   # native: the torch-native fallback, forced
               protocol=f"batch 1, prompt 1 token, {a.new} new tokens, greedy, ignore_eos")
    shm = Path("/dev/shm")
    root = Path("/dev/shm/enginebench" if shm.exists() and shutil.disk_usage(shm).free > 24e9 else "/tmp/enginebench")
    if a.dry_run:
        root = Path("/tmp/enginebench_dry")
    RES["workspace_dir"] = str(root)
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    if not a.profile_only:
        check(root, kinds)
        save(out)
        print("check", RES["check"], flush=True)
    bw = copy_bw()
    for kind in ("w4", "w8", "fp16"):            # one 7B workspace on disk at a time
        if kind not in kinds:
            continue
        ws = build_ws(root, args, kind)
        for (name, qp), mode, off in [(r, m, o) for r in ROWS[kind] for m in pdl_modes for o in ablations]:
            os.environ["PIPELINE_PDL"], suffix = PDL_MODES[mode]
            pdl_off_for(off)
            row = name + suffix + ("_no-" + "+".join(off) if off else "")
            eng = decode(ws, row, qp, bw, a.new, eager=a.eager_too or (row == "w4a16" and not (light or a.profile_only)))
            RES["decode"][row]["pdl"] = eng.stats()["pdl"]
            if a.profile_only:
                profile(eng, row)
            elif not light and name == "w4a16":
                memory(eng, "int4_weights", {"fp16_kv": (16, "none")}, [1], [2048, 4096])
            elif not light and name == "fp16":
                memory(eng, "fp16_weights", {"fp16_kv": (16, "none"), "int8_kv": (8, "static")}, [8, 16, 32, 48],
                       [2048])
                memory(eng, "fp16_weights_b1", {"fp16_kv": (16, "none")}, [1], [2048, 4096])
            del eng
            free()
            save(out)
        shutil.rmtree(ws)
        print("decode", RES["decode"], flush=True)
    if not light and not a.profile_only and {"fp16", "w4"} <= set(kinds):
        fits_in_80gb()
        save(out)
        hf_baseline(a.new, static=not a.quick and time.time() - t_start < 300)
    compare()
    RES["seconds"] = round(time.time() - t_start, 1)
    save(out)
    print(json.dumps(RES, indent=1))
    table()


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
