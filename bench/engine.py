"""Engine speed and memory on one GPU, synthetic Llama-2-7B (random weights), all in one process.

    python bench/engine.py --out results.json [--quick]

Sections (results written to --out after each one, so a cut-off run keeps what it measured):
  check     tiny model on the GPU: engine (Triton kernels, CUDA graphs) vs the reference model, fp16/w4a16/kv8
  copy      device-to-device copy bandwidth (bytes read + written), the roofline's denominator
  decode    the original's protocol: batch 1, prompt 1 token, 512 new tokens, tokens/s for fp16, w4a16,
            w4a16_kv8 (CUDA graphs; w4a16 also eager), against the roofline
            (weight bytes + mean KV bytes per token) / copy bandwidth
  memory    total device memory (torch max allocated) at batch 8/16/32/48, context 2048, fp16 vs int8 KV;
            16-bit vs 4-bit weights at context 2048 and 4096 (batch 1); concurrent 2048-token sequences in 80 GB
  hf        transformers generate fp16, eager and cache_implementation="static", same protocol
The 7B workspaces are built on the GPU with random int4 codes/scales/zeros sent through the real pack path
(AutoAWQ pack -> unpack -> workspace re-layout) and random static KV qparams. No Hydra needed.
"""
from __future__ import annotations

import argparse
import gc
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
from pipeline.workspace import write_workspace  # noqa: E402

LLAMA7B = ModelArgs(dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, head_dim=128, hidden_dim=11008,
                    vocab_size=32000, max_seq_len=4096)
LINEARS = ("q", "k", "v", "o", "gate", "up", "down")
RES: dict = {}


def save(path):
    Path(path).write_text(json.dumps(RES, indent=2))


def free():
    gc.collect()
    torch.cuda.empty_cache()


def random_w4(args: ModelArgs, g: int, seed: int = 0) -> dict:
    """Random int4 codes (uniform 0..15), zeros, scales ~ 1/(4.6 sqrt(K)), through AutoAWQ pack/unpack."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    shapes = {"q": (args.n_heads * args.head_dim, args.dim), "k": (args.n_kv_heads * args.head_dim, args.dim),
              "v": (args.n_kv_heads * args.head_dim, args.dim), "o": (args.dim, args.n_heads * args.head_dim),
              "gate": (args.hidden_dim, args.dim), "up": (args.hidden_dim, args.dim), "down": (args.dim, args.hidden_dim)}
    out = {}
    for i in range(args.n_layers):
        for n, (N, K) in shapes.items():
            q = torch.randint(0, 16, (N, K), generator=gen, device="cuda", dtype=torch.uint8)
            z = torch.randint(6, 10, (K // g, N), generator=gen, device="cuda").to(torch.uint8)
            s = (torch.rand(K // g, N, generator=gen, device="cuda") * 0.5 + 0.75) / (4.6 * K ** 0.5)
            packed = awq_format.pack(q, s.half(), z, 4)
            out[f"layers.{i}.{n}"] = awq_format.unpack(packed["qweight"], packed["qzeros"], packed["scales"], 4)
    return out


def random_kv(args: ModelArgs) -> dict:
    s = torch.full((args.n_kv_heads,), 0.05)
    z = torch.zeros(args.n_kv_heads)
    return {i: (s, z, s, z) for i in range(args.n_layers)}


def build_ws(root: Path, args, w4: bool, g: int = 128) -> Path:
    t0 = time.time()
    ws = root / ("ws_w4" if w4 else "ws_fp16")
    tensors = synthetic_tensors(args, 0, torch.float16, device="cuda")
    w = None
    if w4:
        w = random_w4(args, g)
        tensors = {k: v for k, v in tensors.items() if not any(k.endswith(f".{n}.weight") for n in LINEARS)}
    write_workspace(ws, args, tensors, None, w4=w, group_size=g, kv_qparams=random_kv(args), kv_bits=8,
                    model_name="synthetic-llama2-7b", dtype=torch.float16)
    del tensors, w
    free()
    RES.setdefault("build_seconds", {})[ws.name] = round(time.time() - t0, 1)
    return ws


def weight_bytes(eng) -> int:
    """Bytes a decode step reads for weights: every linear (int4 + scales + zeros, or fp16), lm_head, norms."""
    r, total = eng.runner, 0
    for L in r.layers:
        for w in (L.w_qkv, L.wo, L.w13, L.w2):
            ts = (w.qweight, w.scales, w.zeros) if hasattr(w, "qweight") else (w,)
            total += sum(t.numel() * t.element_size() for t in ts)
        total += (L.attn_norm.numel() + L.ffn_norm.numel()) * 2
    return total + r.lm_head.numel() * r.lm_head.element_size()


def kv_bytes_per_token(eng) -> float:
    return eng.runner.block_bytes(eng.block_size) / eng.block_size


def decode_tps(eng, n_new: int) -> float:
    p = SamplingParams(max_new_tokens=n_new, ignore_eos=True)
    eng.generate([[1]], SamplingParams(max_new_tokens=32, ignore_eos=True))  # warm-up: compile, tune, capture
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = eng.generate([[1]], p)
    torch.cuda.synchronize()
    assert len(out[0]) == n_new, len(out[0])
    return n_new / (time.perf_counter() - t0)


# ------------------------------------------------------------------------------------------------ sections
def check(root: Path):
    """Tiny model: engine greedy tokens and logits vs the reference model (fp16 on GPU)."""
    from pipeline.kernels.kvcache import kv_fake_quant
    from pipeline.kernels.w4a16 import dequantize_w4, pack_w4
    args = ModelArgs(dim=256, n_layers=2, n_heads=8, n_kv_heads=4, head_dim=32, hidden_dim=512, vocab_size=512,
                     max_seq_len=512)
    t = synthetic_tensors(args, 1, torch.float16, device="cuda")
    w4 = {}
    gen = torch.Generator(device="cuda").manual_seed(1)
    for i in range(args.n_layers):
        for n in LINEARS:
            N, K = t[f"layers.{i}.{n}.weight"].shape
            w4[f"layers.{i}.{n}"] = (torch.randint(0, 16, (N, K), generator=gen, device="cuda", dtype=torch.uint8),
                                     torch.full((K // 64, N), 1 / (4.6 * K ** 0.5), device="cuda").half(),
                                     torch.full((K // 64, N), 8.0, device="cuda").half())
    kvq = {i: (torch.full((4,), 0.03), torch.zeros(4), torch.full((4,), 0.03), torch.zeros(4)) for i in range(2)}
    out = {}
    prompts = [[3, 4, 5], list(range(20, 61)), [7]]
    for name, w, qp in (("fp16", None, 0), ("w4a16", w4, 0), ("w4a16_kv8", w4, 4)):
        write_workspace(root / f"tiny_{name}", args, t, None, w4=w, group_size=64, kv_qparams=kvq, kv_bits=8)
        ref_t = dict(t)
        if w:
            for k, (q, s, z) in w.items():
                ref_t[k + ".weight"] = dequantize_w4(pack_w4(q, s, z, 64), torch.float16)
        ref = build_model(args, ref_t, device="cuda")
        if qp:
            for blk in ref.layers:
                blk.kv_quant = lambda k, v: tuple(kv_fake_quant(x.transpose(1, 2), "static", 8, torch.full(
                    (4,), 0.03, device="cuda"), torch.zeros(4, device="cuda")).transpose(1, 2) for x in (k, v))
        eng = Engine.from_workspace(root / f"tiny_{name}", "cuda", {"quant_policy": qp, "session_len": 256,
                                                                      "max_batch_size": 4})
        toks = eng.generate(prompts, SamplingParams(max_new_tokens=24, ignore_eos=True))
        agree, diffs = 0, []
        for p, o in zip(prompts, toks):
            ids = p + o
            with torch.no_grad():
                lr = ref(torch.tensor([ids], device="cuda"))[0, len(p) - 1:-1].float()   # ref logits, engine's tokens
            le = eng.prompt_logits(ids)[len(p) - 1:-1]
            diffs.append(float((lr - le).abs().max() / lr.abs().max()))
            agree += sum(int(a == b) for a, b in zip(lr.argmax(-1).tolist(), o))
        out[name] = {"argmax_agree": f"{agree}/{sum(map(len, toks))}", "max_rel_logit_diff": round(max(diffs), 5),
                     "cuda_graph_buckets": sorted(eng.graphs.graphs)}
        del eng, ref
        free()
    RES["check"] = out


def copy_bw() -> float:
    n = 1 << 30
    x = torch.empty(n, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    torch.cuda.synchronize()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    for _ in range(20):
        y.copy_(x)
    e1.record()
    torch.cuda.synchronize()
    bw = 2 * n * 20 / (e0.elapsed_time(e1) / 1e3)
    del x, y
    free()
    RES["copy_GBps"] = round(bw / 1e9, 1)
    return bw


def decode(ws: Path, name: str, qp: int, bw: float, n_new: int, eager: bool = False):
    eng = Engine.from_workspace(ws, "cuda", {"quant_policy": qp, "session_len": 4096, "max_batch_size": 8,
                                             "num_blocks": 80})
    tps = decode_tps(eng, n_new)
    wb, kvb = weight_bytes(eng), kv_bytes_per_token(eng)
    per_tok = wb + kvb * (n_new + 1) / 2          # mean context over the run
    roof = bw / per_tok
    row = {"tokens_per_s": round(tps, 1), "roofline_tokens_per_s": round(roof, 1), "of_roofline": round(tps / roof, 3),
           "weight_GB": round(wb / 1e9, 3), "kv_bytes_per_token": kvb, "kv_mode": eng.runner.kv_mode}
    if eager:
        eng.graphs = None
        row["eager_tokens_per_s"] = round(decode_tps(eng, n_new), 1)
    RES.setdefault("decode", {})[name] = row
    return eng


def profile(eng, name: str, steps: int = 20):
    """GPU time of one graph-replayed decode step (batch 1, context ~512) by kernel, vs the step's wall time."""
    from torch.profiler import ProfilerActivity, profile as tprofile
    g = eng.graphs
    b = g.bucket(1)
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
    from pipeline.kernels.w4a16 import tuning_record
    x = torch.zeros(1, eng.runner.args.dim, dtype=torch.float16, device="cuda")
    L = eng.runner.layers[0]
    tuned = {}
    for n in ("w_qkv", "wo", "w13", "w2"):
        w = getattr(L, n)
        if hasattr(w, "qweight"):
            xx = torch.zeros(1, w.K, dtype=torch.float16, device="cuda")
            cfg, times = tuning_record(xx, w)
            tuned[n] = {"chosen": str(cfg), "ms": {str(k): round(v, 4) for k, v in (times or {}).items()}}
    del x
    RES.setdefault("profile", {})[name] = {"graph_replay_ms": round(replay_ms, 3), "kernel_ms_per_step": top,
                                           "kernel_sum_ms": round(sum(by.values()), 3), "w4a16_tuning": tuned}


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
    wgb = {"fp16": d["fp16"]["weight_GB"] + embed, "w4a16": d["w4a16"]["weight_GB"] + embed}   # resident weights
    kvpt = {16: d["fp16"]["kv_bytes_per_token"], 8: d["fp16"]["kv_bytes_per_token"] / 2}
    act = 0.0
    if "fp16_weights" in m:   # activation + workspace overhead at batch 8 (peak minus weights minus KV)
        act = m["fp16_weights"]["fp16_kv B=8 ctx=2048"] * 2**30 - wgb["fp16"] * 1e9 - 8 * 2048 * kvpt[16]
    out = {}
    for name, (w, kv) in {"fp16": ("fp16", 16), "kv8": ("fp16", 8), "w4a16": ("w4a16", 16),
                          "w4a16_kv8": ("w4a16", 8)}.items():
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


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="engine.json")
    ap.add_argument("--new", type=int, default=512)
    ap.add_argument("--quick", action="store_true", help="skip the HF static-cache baseline")
    ap.add_argument("--profile-only", action="store_true", help="w4a16 and fp16 decode + kernel profile only")
    a = ap.parse_args()
    t_start = time.time()
    RES.update(device=torch.cuda.get_device_name(), torch=torch.__version__, date="2026-11-25",
               protocol=f"batch 1, prompt 1 token, {a.new} new tokens, greedy, ignore_eos")
    shm = Path("/dev/shm")
    root = Path("/dev/shm/enginebench" if shm.exists() and shutil.disk_usage(shm).free > 24e9 else "/tmp/enginebench")
    RES["workspace_dir"] = str(root)
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    if not a.profile_only:
        check(root)
        save(a.out)
        print("check", RES["check"], flush=True)
    bw = copy_bw()
    if a.profile_only:
        ws4 = build_ws(root, LLAMA7B, w4=True)
        for name, qp in (("w4a16", 0), ("w4a16_kv8", 4)):
            eng = decode(ws4, name, qp, bw, a.new)
            profile(eng, name)
            del eng
            free()
        save(a.out)
        ws16 = build_ws(root, LLAMA7B, w4=False)
        eng = decode(ws16, "fp16", 0, bw, a.new)
        profile(eng, "fp16")
        save(a.out)
        print(json.dumps(RES, indent=1))
        return
    ws4 = build_ws(root, LLAMA7B, w4=True)
    eng = decode(ws4, "w4a16", 0, bw, a.new, eager=True)
    memory(eng, "int4_weights", {"fp16_kv": (16, "none")}, [1], [2048, 4096])
    del eng
    free()
    eng = decode(ws4, "w4a16_kv8", 4, bw, a.new)
    del eng
    free()
    shutil.rmtree(ws4)
    save(a.out)
    print("decode", RES["decode"], flush=True)
    ws16 = build_ws(root, LLAMA7B, w4=False)
    eng = decode(ws16, "fp16", 0, bw, a.new)
    save(a.out)
    memory(eng, "fp16_weights", {"fp16_kv": (16, "none"), "int8_kv": (8, "static")}, [8, 16, 32, 48], [2048])
    memory(eng, "fp16_weights_b1", {"fp16_kv": (16, "none")}, [1], [2048, 4096])
    del eng
    free()
    shutil.rmtree(ws16)
    fits_in_80gb()
    save(a.out)
    hf_baseline(a.new, static=not a.quick and time.time() - t_start < 300)
    d = RES["decode"]
    for k in d:
        d[k]["x_hf_eager"] = round(d[k]["tokens_per_s"] / RES["hf_fp16"]["eager"]["tokens_per_s"], 2)
    RES["seconds"] = round(time.time() - t_start, 1)
    save(a.out)
    print(json.dumps(RES, indent=1))
    print(f"\n{'config':<12}{'tok/s':>9}{'roofline':>10}{'of roof':>9}")
    for k, v in d.items():
        print(f"{k:<12}{v['tokens_per_s']:>9}{v['roofline_tokens_per_s']:>10}{v['of_roofline']:>9}")
    for k, v in RES["hf_fp16"].items():
        print(f"hf {k:<9}{v['tokens_per_s']:>9}")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
