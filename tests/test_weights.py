"""The weight-type table (pipeline/weights): every row's tensor-parallel cuts join back exactly, along output rows
and input columns, in the stored layout; its files read back the same record; a row-parallel int4 cut must fall on
whole groups. A new row needs a sample here (test_every_row_has_a_sample says so).

GPU (python -m pytest -m gpu tests/test_weights.py): each row's apply / norm_apply / swiglu_down on the Triton kernels
equals the same through the kernels' PyTorch references; a workspace built for tp=2 served at tp=1 (merged load)
gives the greedy tokens of the same weights built for tp=1."""
from __future__ import annotations

import pytest
import torch

from pipeline.engine import Engine, SamplingParams
from pipeline.kernels.w4a16 import pack_w4
from pipeline.models.sources import synthetic_tensors
from pipeline.quant.w8 import W8Weight, quantize_w8
from pipeline.weights import IN, OUT, WEIGHT_TYPES, of
from pipeline.workspace import write_workspace

from test_workspace import ARGS, rand_w4, rand_w8

N, K, G = 96, 256, 64


def sample(name: str):
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(N, K, generator=gen)
    q4 = torch.randint(0, 16, (N, K), generator=gen, dtype=torch.uint8)
    return {"fp16": lambda: w.half(), "bf16": lambda: w.bfloat16(),
            "int4": lambda: pack_w4(q4, torch.rand(K // G, N, generator=gen).half(),
                                    torch.randint(0, 16, (K // G, N), generator=gen).half(), G),
            "int8": lambda: W8Weight(quantize_w8(w)[0], quantize_w8(w)[1].half())}[name]()


def same(wt, a, b) -> bool:
    pa, pb = wt.parts(a), wt.parts(b)
    return pa.keys() == pb.keys() == set(wt.files) and all(
        pa[k].dtype == pb[k].dtype and torch.equal(pa[k], pb[k]) for k in pa)


def test_every_row_has_a_sample():
    for name in WEIGHT_TYPES:
        sample(name)


@pytest.mark.parametrize("name", list(WEIGHT_TYPES))
def test_cuts_join_back_and_files_read_back(name):
    wt, w = WEIGHT_TYPES[name], sample(name)
    assert of(w) is WEIGHT_TYPES["fp16" if name == "bf16" else name] and isinstance(w, wt.record)
    rows = [wt.cut(w, a, b, OUT) for a, b in ((0, 32), (32, 40), (40, N))]        # uneven column-parallel shards
    cols = [wt.cut(w, a, b, IN) for a, b in ((0, G), (G, K))]                      # whole groups
    assert same(wt, wt.cat(rows, OUT), w) and same(wt, wt.cat(cols, IN), w)
    assert same(wt, wt.cat([wt.cat(rows[:2], OUT), rows[2]], OUT), w)              # nested joins (qkv of pieces)
    files = {k: v.clone() for k, v in wt.parts(w).items()}
    assert same(wt, wt.from_parts(files.__getitem__, G), w)
    assert same(wt, wt.from_canonical(wt.to_canonical(w)), w)


def test_int4_row_parallel_cut_must_fall_on_groups():
    with pytest.raises(ValueError, match="group_size=64 boundaries"):
        WEIGHT_TYPES["int4"].cut(sample("int4"), 0, 32, IN)


# ---- GPU: each row's engine paths (Triton) against the kernels' PyTorch references, and the merged load ----------
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("name", list(WEIGHT_TYPES))
def test_gpu_apply_norm_apply_swiglu_down_equal_the_references(monkeypatch, name):
    wt = WEIGHT_TYPES[name]
    files = wt.parts(sample(name))
    w = wt.cast(wt.from_parts(lambda p: files[p].cuda(), G), wt.act_dtype)
    gen = torch.Generator(device="cuda").manual_seed(0)
    x, res = (torch.randn(5, K, device="cuda", generator=gen).to(wt.act_dtype) for _ in range(2))
    gate_up = torch.randn(5, 2 * K, device="cuda", generator=gen).to(wt.act_dtype)
    norm, b = torch.rand(K, device="cuda").to(wt.act_dtype) + 0.5, torch.randn(N, device="cuda").to(wt.act_dtype)

    def run():
        y0, (y1, r1), (y2, r2) = (wt.apply(x, w, b), wt.norm_apply(x, res, norm, 1e-5, w, b),
                                  wt.norm_apply(x, None, norm, 1e-5, w))
        return [y0, y1, r1, y2, r2, wt.swiglu_down(gate_up, w)]

    got = run()
    monkeypatch.setenv("PIPELINE_KERNELS", "reference")
    for g, r in zip(got, run()):
        assert g.shape == r.shape and g.dtype == r.dtype
        torch.testing.assert_close(g.float(), r.float(), rtol=2e-2, atol=2e-2 * r.float().abs().max().item())


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("kind", ["fp16", "int4", "int8"])
def test_gpu_workspace_built_for_tp2_served_at_tp1_equals_tp1(tmp_path, kind):
    """The merged load (Workspace.merged_layer) on the GPU: the same linears, so the same greedy tokens."""
    t = synthetic_tensors(ARGS, 0, torch.float16)
    kw = {"fp16": {}, "int4": {"w4": rand_w4(t), "group_size": 64}, "int8": {"w8": rand_w8(t)}}[kind]
    out = []
    for tp in (1, 2):
        write_workspace(tmp_path / f"tp{tp}", ARGS, t, None, tp=tp, **kw)
        eng = Engine.from_workspace(tmp_path / f"tp{tp}", "cuda", {"session_len": 128, "max_batch_size": 2})
        out.append(eng.generate([[1, 2, 3], [4, 5]], SamplingParams(max_new_tokens=8, ignore_eos=True)))
        del eng
    assert out[0] == out[1]
