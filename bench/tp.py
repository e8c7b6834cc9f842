"""Tensor-parallel speed and memory (issue 8): tp=1 vs tp=2 on synthetic Llama-2-7B / 13B, fp16 and w4a16.

    python bench/tp.py --out $OUT/tp.json                        # 2 GPUs (nvidia-h200-x2), both models
    python bench/tp.py --out $OUT/tp7b.json --models 7b           # one model per call (10-minute limit)
    python bench/tp.py --dry-run                                  # CPU, gloo, tiny shapes: every section runs

Per model, on one workspace built with tp=2 (the tp=1 engine joins its rank files in the kernel layout):
  correctness  greedy tokens of 4 prompts x 32 new tokens, tp=2 vs tp=1 (fp16 and w4a16): equal, or the first
               position where they part; max |logit diff| / max |logit| of prompt_logits over 64 tokens
  decode       batch 1, prompt 1 token, 512 new tokens, ignore_eos: tokens/s (CUDA graphs per rank)
  allreduce    mean time of one all-reduce of a (1, dim) fp16 activation, times 2 x n_layers per decode step
  throughput   64 concurrent requests, 128-token random prompts, 128 new tokens each: generated tokens/s
  kv_capacity  the engine's KV cache at cache_max_entry_count=0.9: tokens, and 2048-token sequences it holds
Every rank runs with NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1, NVSHMEM_DISABLE_NVLS=1.
Results are written to --out after each section, so a cut-off run keeps what it measured.
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
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipeline.engine import Engine, SamplingParams  # noqa: E402
from pipeline.engine.tp import NO_MULTICAST  # noqa: E402
from pipeline.models.llama import ModelArgs  # noqa: E402
from pipeline.models.sources import synthetic_tensors  # noqa: E402
from pipeline.workspace import write_workspace  # noqa: E402

os.environ.update(NO_MULTICAST)
MODELS = {
    "7b": ModelArgs(dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, head_dim=128, hidden_dim=11008,
                    vocab_size=32000, max_seq_len=4096),
    "13b": ModelArgs(dim=5120, n_layers=40, n_heads=40, n_kv_heads=40, head_dim=128, hidden_dim=13824,
                     vocab_size=32000, max_seq_len=4096),
    "tiny": ModelArgs(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=32, hidden_dim=256, vocab_size=320,
                      max_seq_len=512),
}
LINEARS = ("q", "k", "v", "o", "gate", "up", "down")
RES: dict = {}


def save(path: str) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(RES, indent=2))


def free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def sync(dev: str) -> None:
    if dev == "cuda":
        torch.cuda.synchronize()


def build(root: Path, name: str, args: ModelArgs, w4: bool, g: int, dev: str) -> Path:
    """A tp=2 workspace of random weights (w4: random int4 codes, zeros 6..9, scales ~ 1/(4.6 sqrt(K)))."""
    t0 = time.time()
    ws = root / f"{name}_{'w4a16' if w4 else 'fp16'}"
    tensors = synthetic_tensors(args, 0, torch.float16, device=dev)
    q4 = None
    if w4:
        gen, q4 = torch.Generator(device=dev).manual_seed(0), {}
        for k in [k for k in tensors if any(k.endswith(f".{n}.weight") for n in LINEARS)]:
            N, K = tensors.pop(k).shape
            q4[k[:-len(".weight")]] = (
                torch.randint(0, 16, (N, K), generator=gen, device=dev, dtype=torch.uint8),
                ((torch.rand(K // g, N, generator=gen, device=dev) * 0.5 + 0.75) / (4.6 * K ** 0.5)).half(),
                torch.randint(6, 10, (K // g, N), generator=gen, device=dev).half())
    write_workspace(ws, args, tensors, None, tp=2, w4=q4, group_size=g, model_name=f"synthetic-{name}",
                    dtype=torch.float16)
    del tensors, q4
    free()
    RES.setdefault("build_seconds", {})[ws.name] = round(time.time() - t0, 1)
    return ws


def allreduce_seconds(runner, rows: int, iters: int) -> float:
    """Mean seconds of one all-reduce of (rows, dim) activations in the compute dtype (run on every rank)."""
    x = torch.randn(rows, runner.args.dim, device=runner.device, dtype=runner.dtype)
    for _ in range(3):
        dist.all_reduce(x, group=runner.group)
    sync = torch.cuda.synchronize if runner.device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for _ in range(iters):
        dist.all_reduce(x, group=runner.group)
    sync()
    return (time.perf_counter() - t0) / iters


def decode_tps(eng, dev: str, n_new: int) -> float:
    eng.generate([[1]], SamplingParams(max_new_tokens=16, ignore_eos=True))   # warm-up: compile, tune, capture
    sync(dev)
    t0 = time.perf_counter()
    out = eng.generate([[1]], SamplingParams(max_new_tokens=n_new, ignore_eos=True))
    sync(dev)
    assert len(out[0]) == n_new, len(out[0])
    return n_new / (time.perf_counter() - t0)


def throughput(eng, dev: str, n_req: int, prompt_len: int, n_new: int, vocab: int) -> dict:
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, vocab, (prompt_len,), generator=gen).tolist() for _ in range(n_req)]
    p = SamplingParams(max_new_tokens=n_new, ignore_eos=True)
    eng.generate(prompts[:2], SamplingParams(max_new_tokens=4, ignore_eos=True))
    sync(dev)
    t0 = time.perf_counter()
    out = eng.generate(prompts, p)
    sync(dev)
    dt = time.perf_counter() - t0
    n = sum(map(len, out))
    return {"requests": n_req, "prompt_len": prompt_len, "new_tokens": n, "seconds": round(dt, 2),
            "tokens_per_s": round(n / dt, 1)}


def run_engine(ws: Path, tp: int, dev: str, a, args: ModelArgs, prompts) -> dict:
    """Every measurement that one engine (tp ranks) makes; one engine alive at a time."""
    over = {"tp": tp, "session_len": a.session_len, "max_batch_size": a.concurrent,
            "cache_max_entry_count": 0.9, "tp_timeout": 300, "cuda_graphs": not a.eager}
    t0 = time.time()
    eng = Engine.from_workspace(ws, dev, overrides=over)
    row = {"start_seconds": round(time.time() - t0, 1)}
    try:
        st = eng.stats()
        row["kv_capacity"] = {"tokens": st["kv_capacity_tokens"], "block_size": st["block_size"],
                              "seqs_2048": st["kv_capacity_tokens"] // 2048,
                              "kv_bytes_per_token_per_rank": eng.runner.block_bytes(st["block_size"]) / st["block_size"]}
        row["tokens"] = eng.generate(prompts, SamplingParams(max_new_tokens=a.check_new, ignore_eos=True))
        row["prompt_logits"] = eng.prompt_logits(list(range(1, 65))).cpu()
        row["decode_tokens_per_s"] = round(decode_tps(eng, dev, a.new), 1)
        if tp > 1:
            s = eng.runner.call("bench.tp:allreduce_seconds", 1, a.iters)
            row["allreduce"] = {"us_per_call": round(s * 1e6, 1), "calls_per_step": 2 * args.n_layers,
                                "ms_per_step": round(s * 2 * args.n_layers * 1e3, 3),
                                "of_decode_step": round(s * 2 * args.n_layers * row["decode_tokens_per_s"], 3)}
        row["throughput"] = throughput(eng, dev, a.concurrent, a.prompt_len, a.tput_new, args.vocab_size)
    finally:
        eng.stop()
        del eng
        free()
    return row


def compare(r1: dict, r2: dict) -> dict:
    parts = []
    for x, y in zip(r1["tokens"], r2["tokens"]):
        parts.append(next((i for i, (u, v) in enumerate(zip(x, y)) if u != v), None))
    l1, l2 = r1.pop("prompt_logits"), r2.pop("prompt_logits")
    return {"greedy_equal": all(p is None for p in parts), "first_difference": parts,
            "max_rel_logit_diff": round(float((l1 - l2).abs().max() / l1.abs().max()), 6),
            "prefill_argmax_agree": f"{int((l1.argmax(-1) == l2.argmax(-1)).sum())}/{l1.shape[0]}"}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "tp.json"))
    ap.add_argument("--models", default="7b,13b")
    ap.add_argument("--quants", default="fp16,w4a16")
    ap.add_argument("--new", type=int, default=512)
    ap.add_argument("--concurrent", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--tput-new", type=int, default=128)
    ap.add_argument("--check-new", type=int, default=32)
    ap.add_argument("--session-len", type=int, default=4096)
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--eager", action="store_true", help="no CUDA graphs (each rank captures its own by default)")
    ap.add_argument("--dry-run", action="store_true", help="CPU + gloo, tiny shapes, few tokens (checks the script)")
    a = ap.parse_args(argv)
    if a.dry_run:
        a.models, a.new, a.concurrent, a.prompt_len, a.tput_new, a.check_new = "tiny", 16, 4, 16, 8, 8
        a.session_len, a.iters, a.group_size = 256, 5, 64
        dev = "cpu"
    else:
        dev = "cuda"
        if torch.cuda.device_count() < 2:
            sys.exit(f"bench/tp.py needs 2 GPUs, {torch.cuda.device_count()} visible (or use --dry-run on a CPU)")
    t_start = time.time()
    RES.update(device=torch.cuda.get_device_name() if dev == "cuda" else "cpu (gloo, dry run)",
               gpus=torch.cuda.device_count(), torch=torch.__version__,
               date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
               env={k: os.environ[k] for k in NO_MULTICAST},
               protocol={"decode": f"batch 1, prompt 1 token, {a.new} new tokens, greedy, ignore_eos",
                         "throughput": f"{a.concurrent} concurrent requests, {a.prompt_len}-token prompts, "
                                       f"{a.tput_new} new tokens", "kv_capacity": "cache_max_entry_count=0.9"})
    shm = Path("/dev/shm")
    root = Path("/dev/shm/tpbench" if shm.exists() and shutil.disk_usage(shm).free > 40e9 else "/tmp/tpbench")
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    gen = torch.Generator().manual_seed(2)
    for name in a.models.split(","):
        args = MODELS[name]
        prompts = [torch.randint(3, args.vocab_size, (n,), generator=gen).tolist() for n in (1, 7, 33, 100)]
        for quant in a.quants.split(","):
            ws = build(root, name, args, quant == "w4a16", a.group_size, dev)
            key = f"{name}_{quant}"
            r1 = run_engine(ws, 1, dev, a, args, prompts)
            r2 = run_engine(ws, 2, dev, a, args, prompts)
            RES.setdefault("results", {})[key] = {
                "correctness": compare(r1, r2), "tp1": {k: v for k, v in r1.items() if k != "tokens"},
                "tp2": {k: v for k, v in r2.items() if k != "tokens"},
                "tp2_over_tp1": {"decode": round(r2["decode_tokens_per_s"] / r1["decode_tokens_per_s"], 3),
                                 "throughput": round(r2["throughput"]["tokens_per_s"] / r1["throughput"]["tokens_per_s"], 3),
                                 "kv_seqs_2048": round(r2["kv_capacity"]["seqs_2048"] / max(1, r1["kv_capacity"]["seqs_2048"]), 3)}}
            shutil.rmtree(ws)
            RES["seconds"] = round(time.time() - t_start, 1)
            save(a.out)
            print(key, json.dumps(RES["results"][key]["correctness"]), flush=True)
    print(f"\n{'model':<12}{'eq':>4}{'dec t1':>9}{'dec t2':>9}{'AR ms':>7}{'tput t1':>9}{'tput t2':>9}{'kv t1':>7}{'kv t2':>7}")
    for k, v in RES["results"].items():
        t1, t2 = v["tp1"], v["tp2"]
        print(f"{k:<12}{'yes' if v['correctness']['greedy_equal'] else 'no':>4}{t1['decode_tokens_per_s']:>9}"
              f"{t2['decode_tokens_per_s']:>9}{t2['allreduce']['ms_per_step']:>7}{t1['throughput']['tokens_per_s']:>9}"
              f"{t2['throughput']['tokens_per_s']:>9}{t1['kv_capacity']['seqs_2048']:>7}{t2['kv_capacity']['seqs_2048']:>7}")
    print(f"results: {a.out}")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
