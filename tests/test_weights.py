"""The weight-type table (pipeline/weights): every row's tensor-parallel cuts join back exactly, along output rows
and input columns, in the stored layout; its files read back the same record; a row-parallel int4 cut must fall on
whole groups. A new row needs a sample here (test_every_row_has_a_sample says so)."""
from __future__ import annotations

import pytest
import torch

from pipeline.kernels.w4a16 import pack_w4
from pipeline.quant.w8 import W8Weight, quantize_w8
from pipeline.weights import IN, OUT, WEIGHT_TYPES, of

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
