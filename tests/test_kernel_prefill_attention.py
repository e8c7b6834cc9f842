"""Paged prefill attention: Triton (interpreter on CPU, compiled on GPU) against the PyTorch reference, the plan
helper (bucketed shapes, in-place rewrite for graph replay), and ModelRunner.prefill on the kernel."""
import pytest
import torch

from kernel_interp import cuda_ok, fresh_seed, interpreted, rel_err
from test_engine import ARGS, tiny  # noqa: F401  (tiny: the engine tests' workspaces, a fixture)
from test_kernel_attention import MODES, TOL, make_case
from pipeline.engine import Engine
import pipeline.engine.model as model_mod
from pipeline.kernels import dispatch
from pipeline.kernels import prefill_attention as compiled_pa

# (new tokens n, context after the chunk): whole prompts (n == ctx) and later chunks (ctx > n)
LAYOUT = [(7, 7), (1, 20), (33, 70), (1, 1), (12, 40)]


def make_prefill(layout, H, n_kv, D, bs, kv_mode, kv_bits, dtype, device, pad=0, **kw):
    """Random caches (every slot filled: masking matters) and q rows for `layout`'s chunks, plus `pad` rows."""
    _, kc, vc, tables, _, params = make_case(len(layout), H, n_kv, D, bs, [ctx for _, ctx in layout], kv_mode,
                                             kv_bits, dtype, device, **kw)
    seqs, off = [], 0
    for b, (n, ctx) in enumerate(layout):
        seqs.append((off, n, tables[b].cpu(), ctx))
        off += n
    q = torch.randn(off + pad, H, D, device=device).to(dtype)
    return q, kc, vc, seqs, params


def restack(chunks):
    """Chunks (offset, n, table, ctx) with their offsets redone: concatenated from row 0, in order."""
    offs = [0]
    for _, n, _, _ in chunks:
        offs.append(offs[-1] + n)
    return [(o, n, bt, ctx) for o, (_, n, bt, ctx) in zip(offs, chunks)]


def check(mod, device, dtype, layout, H, n_kv, D, bs, kv_mode, kv_bits, pad=0, **launch):
    seed = fresh_seed()
    q, kc, vc, seqs, params = make_prefill(layout, H, n_kv, D, bs, kv_mode, kv_bits, dtype, device, pad)
    scale = D ** -0.5
    ref = compiled_pa.paged_prefill_attention_ref(q, kc, vc, seqs, scale, kv_mode, kv_bits, **params)
    out = torch.full_like(q, float("nan"))
    mod._launch(q, kc, vc, seqs, scale, kv_mode, kv_bits, **params, out=out, **launch)
    err = rel_err(out, ref)
    assert err < TOL[dtype], f"{kv_mode}/{kv_bits} {dtype} {layout} seed={seed}: rel err {err:.2e}"
    real = sum(n for n, _ in layout)
    assert torch.equal(out[real:], torch.zeros_like(out[real:])), "padding rows must be written as zeros"
    return q, kc, vc, seqs, params


@pytest.mark.parametrize("kv_mode,kv_bits", MODES)
@pytest.mark.parametrize("bs", [16, 64])
def test_interpreter_gqa(kv_mode, kv_bits, bs, monkeypatch):
    # G = 3 (not a power of two): 16 dot rows hold 5 query rows x 3 heads; 16-key blocks: unmasked and masked loops
    mod = interpreted("prefill_attention", monkeypatch)
    check(mod, "cpu", torch.float16, LAYOUT, H=6, n_kv=2, D=64, bs=bs, kv_mode=kv_mode, kv_bits=kv_bits, pad=5,
          block_m=16, block_n=16)


@pytest.mark.parametrize("kv_mode,kv_bits", [("none", 16), ("static", 4), ("dynamic", 8)])
def test_interpreter_mha_head_dim_32(kv_mode, kv_bits, monkeypatch):
    # G = 1, 32 rows a tile, the default 64-key blocks over 16-row paged blocks, two chunks only
    mod = interpreted("prefill_attention", monkeypatch)
    check(mod, "cpu", torch.float16, [(33, 33), (21, 90)], H=2, n_kv=2, D=32, bs=16, kv_mode=kv_mode,
          kv_bits=kv_bits, block_m=32)


def test_plan_shapes_depend_on_the_bucket_only_and_replay_with_new_contents(monkeypatch):
    """One plan (the tensors a CUDA graph would capture) rewritten in place for another step's chunks: same
    tensors, same shapes, the kernel follows the new contents; rows past n_tokens are never written."""
    mod = interpreted("prefill_attention", monkeypatch)
    H, n_kv, D, bs = 4, 2, 32, 16
    q, kc, vc, seqs, params = make_prefill(LAYOUT, H, n_kv, D, bs, "static", 8, torch.float16, "cpu", pad=9)
    T = q.shape[0]
    plan = mod.prefill_plan(seqs, H, n_kv, D, n_tokens=T - 2, max_seqs=6, block_m=16, device="cpu")
    assert plan.tiles.shape == (-(-(T - 2) // plan.block_q) + 6, mod.FIELDS)
    assert plan.tables.shape == (6, seqs[0][2].numel())
    buf, shapes = plan.buf.data_ptr(), (plan.tiles.shape, plan.tables.shape)
    for chunks in (seqs, seqs[2:4], seqs[1:2], [(0, 40, seqs[4][2], 40), (0, 13, seqs[2][2], 60)]):
        chunks = restack(chunks)
        if chunks != seqs:
            assert mod.prefill_plan(chunks, H, n_kv, D, n_tokens=T - 2, max_seqs=6, block_m=16, out=plan) is plan
        assert plan.buf.data_ptr() == buf and (plan.tiles.shape, plan.tables.shape) == shapes
        out = torch.full_like(q, float("nan"))
        mod._launch(q, kc, vc, None, 0.3, "static", 8, **params, plan=plan, out=out)
        ref = mod.paged_prefill_attention_ref(q, kc, vc, chunks, 0.3, "static", 8, **params, plan=plan)
        real = sum(n for _, n, _, _ in chunks)
        assert rel_err(out[:real], ref[:real]) < TOL[torch.float16], chunks
        assert torch.equal(out[real:T - 2], torch.zeros_like(out[real:T - 2]))
        assert out[T - 2:].isnan().all(), "rows past the plan's n_tokens must not be written"
        # the reference reads the same chunks back from the plan
        from_plan = mod.paged_prefill_attention_ref(q, kc, vc, None, 0.3, "static", 8, **params, plan=plan)
        assert torch.equal(from_plan[:T - 2], ref[:T - 2])
    # tiles: longest first, then the padding rows' zero tiles, then empty ones
    t = plan.tiles.tolist()
    work = [pos0 + n if ctx else -1 for _, _, n, pos0, ctx in t if n]
    assert work == sorted(work, reverse=True) and t[-1][2] == 0


def test_plan_errors_name_the_bad_value():
    t = torch.zeros(8, dtype=torch.int32)
    with pytest.raises(ValueError, match="concatenated in order"):
        compiled_pa.prefill_plan([(0, 3, t, 3), (4, 2, t, 9)], 4, 2, 32)
    with pytest.raises(ValueError, match="n <= ctx"):
        compiled_pa.prefill_plan([(0, 5, t, 3)], 4, 2, 32)
    with pytest.raises(ValueError, match="capacity"):
        compiled_pa.prefill_plan([(0, 5, t, 129)], 4, 2, 32, block_size=16)  # 8 blocks of 16
    with pytest.raises(ValueError, match="do not fit"):
        compiled_pa.prefill_plan([(0, 3, t, 3), (3, 2, t, 9)], 4, 2, 32, max_seqs=1)
    with pytest.raises(ValueError, match="do not fit"):
        compiled_pa.prefill_plan([(0, 3, t, 3), (3, 2, t, 9)], 4, 2, 32, n_tokens=4)
    plan = compiled_pa.prefill_plan([(0, 3, t, 3)], 4, 2, 32, n_tokens=16, max_seqs=2)
    with pytest.raises(ValueError, match="same n_tokens"):
        compiled_pa.prefill_plan([(0, 3, t, 3)], 4, 2, 32, n_tokens=32, max_seqs=2, out=plan)
    q, kc, vc, seqs, params = make_prefill([(3, 3)], 4, 2, 32, 16, "static", 8, torch.float16, "cpu")
    with pytest.raises(ValueError, match="was not built for"):
        compiled_pa._launch(q, kc, vc, seqs, 0.2, "static", 8, **params, plan=plan)  # plan for 16 rows, q has 3
    with pytest.raises(ValueError, match="k_scale"):
        compiled_pa._launch(q, kc, vc, seqs, 0.2, "static", 8, **{**params, "k_scale": None})


def test_public_function_dispatches_to_triton(monkeypatch):
    mod = interpreted("prefill_attention", monkeypatch)
    q, kc, vc, seqs, params = make_prefill([(5, 9), (3, 3)], 4, 2, 32, 16, "dynamic", 4, torch.float16, "cpu")
    out = mod.paged_prefill_attention(q, kc, vc, seqs, 0.2, "dynamic", 4, **params)
    assert dispatch.last_path("paged_prefill_attention") == "triton"
    ref = mod.paged_prefill_attention_ref(q, kc, vc, seqs, 0.2, "dynamic", 4, **params)
    assert rel_err(out, ref) < TOL[torch.float16]


def step_inputs(eng, layout, gen):
    """A prefill step of chunks [(n, ctx)] on the engine's runner: (tokens, positions, slots, seqs). Sequence i
    owns cache blocks 4i..4i+3; a later chunk's first ctx - n tokens are prefilled (alone) beforehand."""
    owned = [list(range(4 * i, 4 * i + 4)) for i in range(len(layout))]
    cols, seqs, dev = [], [], eng.runner.device
    for i, (n, ctx) in enumerate(layout):
        ids = torch.randint(0, ARGS.vocab_size, (ctx,), generator=gen).to(dev)
        where = torch.tensor([eng._slot(owned[i], p) for p in range(ctx)], device=dev)
        pos = torch.arange(ctx, device=dev)
        if ctx > n:
            eng.runner.prefill(ids[:ctx - n], pos[:ctx - n], where[:ctx - n],
                               [(0, ctx - n, eng._table(owned[i]), ctx - n)])
        cols.append((ids[ctx - n:], pos[ctx - n:], where[ctx - n:]))
        seqs.append((sum(c[0].numel() for c in cols[:-1]), n, eng._table(owned[i]), ctx))
    return (*(torch.cat(c) for c in zip(*cols)), seqs)


@pytest.mark.parametrize("qp,kv_mode", [(0, None), (4, None), (8, None), (4, "dynamic")])
def test_model_prefill_on_the_kernel(tiny, qp, kv_mode, monkeypatch):  # noqa: F811
    """ModelRunner.prefill with the attention on the kernel (one launch per layer from one plan) gives the
    gather + SDPA path's logits; also with the step padded to a bucket and a plan built beforehand. The CPU runner
    computes in fp32, the kernel in fp16: q (and a 16-bit cache) go to fp16 around it."""
    mod = interpreted("prefill_attention", monkeypatch)
    monkeypatch.setenv("PIPELINE_KERNELS", "reference")  # every other kernel: its reference

    calls = []

    def kernel(q, k_cache, v_cache, seqs, scale, plan=None, **kv):
        calls.append(plan)
        if k_cache.dtype == torch.float32:
            k_cache, v_cache = k_cache.half(), v_cache.half()
        return mod._launch(q.half(), k_cache, v_cache, seqs, scale, plan=plan, **kv).float()
    eng = Engine.from_workspace(tiny["root"] / "w4", "cpu", {"session_len": 256, "quant_policy": qp,
                                                             **({"kv_mode": kv_mode} if kv_mode else {})})
    r = eng.runner
    args = step_inputs(eng, [(9, 9), (4, 20), (17, 17)], torch.Generator().manual_seed(1))
    meta, T = args[3], args[0].shape[0]
    want = r.prefill(*args)  # gather + SDPA

    monkeypatch.setattr(model_mod, "paged_prefill_attention", kernel)
    monkeypatch.setattr(model_mod, "use_triton", lambda t, name, *a: name == "paged_prefill_attention")
    got = r.prefill(*args)
    assert len(calls) == ARGS.n_layers and calls[0] is not None and all(c is calls[0] for c in calls)
    assert (got - want).abs().max() <= 1e-2 * want.abs().max()   # fp16 q around the kernel (seen: <= 3e-3)
    # a bucket of T + 3 rows (padding tokens skip the cache write), its plan built beforehand for 4 chunks
    plan = r.prefill_plan(meta, T + 3, max_seqs=4)
    pad = (torch.zeros(3, dtype=torch.long), torch.zeros(3, dtype=torch.long), torch.full((3,), -1))
    padded = r.prefill(*(torch.cat([a, p]) for a, p in zip(args[:3], pad)), meta, plan=plan)
    assert calls[-1] is plan
    assert (padded[:T] - got).abs().max() <= 1e-5 * want.abs().max() and padded.isfinite().all()


@pytest.mark.gpu
@pytest.mark.skipif(not cuda_ok(), reason="needs CUDA")
@pytest.mark.parametrize("qp,kv_mode", [(0, None), (4, None), (8, None), (4, "dynamic")])
def test_gpu_model_prefill_on_the_kernel(tiny, qp, kv_mode, monkeypatch):  # noqa: F811
    """On a GPU ModelRunner.prefill runs its attention on the kernel: the same logits as the gather + SDPA path."""
    eng = Engine.from_workspace(tiny["root"] / "w4", "cuda", {"session_len": 256, "quant_policy": qp,
                                                              "cuda_graphs": False,
                                                              **({"kv_mode": kv_mode} if kv_mode else {})})
    args = step_inputs(eng, [(9, 9), (4, 20), (17, 17), (1, 30)], torch.Generator().manual_seed(2))
    got = eng.runner.prefill(*args)
    assert dispatch.last_path("paged_prefill_attention") == "triton"
    monkeypatch.setattr(model_mod, "use_triton", lambda t, name, *a: False)
    want = eng.runner.prefill(*args)
    assert (got - want).abs().max() <= 1e-2 * want.abs().max()


@pytest.mark.gpu
@pytest.mark.skipif(not cuda_ok(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kv_mode,kv_bits", MODES)
@pytest.mark.parametrize("H,n_kv", [(32, 32), (32, 8), (28, 4)])
@pytest.mark.parametrize("bs", [16, 64])
def test_gpu_real_sizes(dtype, kv_mode, kv_bits, H, n_kv, bs):
    layout = [(1, 1), (777, 777), (512, 1536), (2, 3000), (128, 128), (1000, 1000), (33, 2081)]
    check(compiled_pa, "cuda", dtype, layout, H=H, n_kv=n_kv, D=128, bs=bs, kv_mode=kv_mode, kv_bits=kv_bits,
          pad=100)


@pytest.mark.gpu
@pytest.mark.skipif(not cuda_ok(), reason="needs CUDA")
@pytest.mark.parametrize("block_m,num_warps,num_stages", [(64, 4, 2), (128, 8, 3), (64, 4, 3)])
def test_gpu_configs_and_graph_replay(block_m, num_warps, num_stages):
    """Other tile configs, and a CUDA graph of one launch replayed with new plan contents: one 2048-token prompt,
    then 16 chunks of 128 rows (15 of them later chunks, up to 2048 keys) over the same caches."""
    H, n_kv, D = 32, 8, 128
    _, kc, vc, tables, _, params = make_case(16, H, n_kv, D, 64, [2048] * 16, "static", 8, torch.float16, "cuda")
    tables = tables.cpu()
    q = torch.randn(2048 + 64, H, D, device="cuda").half()
    steps = [[(0, 2048, tables[0], 2048)], [(128 * i, 128, tables[i], 128 * (i + 1)) for i in range(16)]]
    kw = dict(block_m=block_m, num_warps=num_warps, num_stages=num_stages)
    plan = compiled_pa.prefill_plan(steps[0], H, n_kv, D, n_tokens=q.shape[0], max_seqs=16, block_m=block_m,
                                    device="cuda")
    out = torch.full_like(q, float("nan"))

    def run():
        compiled_pa._launch(q, kc, vc, None, D ** -0.5, "static", 8, **params, plan=plan, out=out, **kw)
    run()
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s), torch.cuda.graph(g, stream=s):
        run()
    torch.cuda.synchronize()
    for chunks in steps + steps:
        compiled_pa.prefill_plan(chunks, H, n_kv, D, n_tokens=q.shape[0], max_seqs=16, block_m=block_m, out=plan)
        out.fill_(float("nan"))
        g.replay()
        torch.cuda.synchronize()
        ref = compiled_pa.paged_prefill_attention_ref(q, kc, vc, chunks, D ** -0.5, "static", 8, **params)
        assert rel_err(out, ref) < TOL[torch.float16]
        assert torch.equal(out[2048:], torch.zeros_like(out[2048:]))
