"""SmoothQuant alpha search (quant.smooth_search): the search's fake-quantized linears compute what
quant_w8 + evaluate compute, the searched alpha is never worse than the fixed one or no smoothing on
the block output error, smooth.json records the chosen alphas, and a bad grid value is refused by name."""
import json

import pytest
import torch

from pipeline.models.llama import Block, ModelArgs, rope_cos_sin
from pipeline.quant import awq
from pipeline.quant.blockwise import LINEARS
from pipeline.quant.smooth import SmoothedW8A8, check_grid, group_ranges, replaced, search_block, smooth_scale
from pipeline.quant.stats import block_stats, observe_block
from pipeline.quant.w8 import W8A8Linear, quantize_w8

from conftest import compose
from test_quant_stages import TINY

ARGS = ModelArgs(dim=64, n_layers=1, n_heads=4, n_kv_heads=2, head_dim=16, hidden_dim=96)
GRID = [0.0, 0.25, 0.5, 0.75, 1.0]


def outlier_block():
    """A block whose qkv and gate_up inputs have two outlier channels (as real LLMs do), its inputs and
    the calibrate-style statistics of layer 0."""
    torch.manual_seed(0)
    block = Block(ARGS).eval()
    with torch.no_grad():
        for norm in (block.attn_norm, block.mlp_norm):
            norm.weight[[3, 17]] = 40.0
    x = torch.randn(2, 16, ARGS.dim)
    cos, sin = rope_cos_sin(ARGS, torch.arange(16))
    lin, kv, handles = observe_block(block)
    block(x, cos, sin)
    for h in handles:
        h.remove()
    block.kv_observer = None
    w = {f"layers.0.{k}": v for k, v in block.state_dict().items()}
    return block, x, cos, sin, block_stats(0, lin, kv), w


def w8a8_views(block, x, cos, sin, w, s):
    """(search's output, quant_w8's output, full precision) of the block smoothed by s {group: (C,)}."""
    # the search's view: every linear a SmoothedW8A8 of the full-precision block
    with replaced(block, {n: SmoothedW8A8(getattr(block, n), s[g]) for g, ms in awq.GROUPS.items() for n in ms}):
        y_search = block(x, cos, sin)
    # quant_w8's: fold the scales (awq.apply), int8 per channel weights with fp16 scales, W8A8Linear
    t = awq.apply(dict(w), 0, {f"layers.0.{g}.scale": v for g, v in s.items()}, ARGS)
    folded = Block(ARGS).eval()
    folded.load_state_dict({k[len("layers.0."):]: v for k, v in t.items()})
    for n in LINEARS:
        q, ws = quantize_w8(getattr(folded, n).weight)
        setattr(folded, n, W8A8Linear(q, ws.half(), getattr(folded, n).bias))
    return y_search, folded(x, cos, sin), block(x, cos, sin)


@torch.no_grad()
def test_smoothed_w8a8_computes_what_quant_w8_folds_and_quantizes():
    block, x, cos, sin, stats, w = outlier_block()
    ranges = group_ranges(stats, w, 0, ARGS)
    rel = lambda a, b: float((a - b).norm() / b.norm())  # noqa: E731
    # scales folded into the norms: the same integers and scales, the same output
    s = {g: smooth_scale(*ranges[g], 0.6 if g in ("qkv", "gate_up") else 0.0) for g in awq.GROUPS}
    y_search, y_quant, y_fp = w8a8_views(block, x, cos, sin, w, s)
    assert rel(y_search, y_quant) < 1e-5 < rel(y_quant, y_fp)
    # folded into v / up as well: those linears' fp16 weight scales round differently (1 / s is folded in
    # before rounding), a perturbation far below the W8A8 error itself
    s = {g: smooth_scale(*ranges[g], 0.6) for g in awq.GROUPS}
    y_search, y_quant, y_fp = w8a8_views(block, x, cos, sin, w, s)
    assert rel(y_search, y_quant) < 0.25 * rel(y_quant, y_fp)


def test_search_picks_from_grid_and_is_never_worse_than_fixed_or_none():
    block, x, cos, sin, stats, w = outlier_block()
    ranges = group_ranges(stats, w, 0, ARGS)
    res = search_block(block, x, cos, sin, ranges, ARGS, GRID, fixed_alpha=0.5)
    assert set(res["info"]) == set(awq.GROUPS) == set(res["scales"])
    for g, inf in res["info"].items():
        assert inf["alpha"] in GRID
        assert inf["loss"] <= inf["loss_fixed"] and inf["loss"] <= inf["loss_none"], (g, inf)
        torch.testing.assert_close(res["scales"][g], smooth_scale(*ranges[g], inf["alpha"]))
    for g in ("qkv", "gate_up"):  # the outlier channels: smoothing must pay off
        assert res["info"][g]["alpha"] > 0 and res["info"][g]["loss"] < 0.5 * res["info"][g]["loss_none"], g
    # a fixed alpha off the grid is still measured (the alpha-fixed path's loss, for the report)
    off = search_block(block, x, cos, sin, ranges, ARGS, [0.0, 1.0], fixed_alpha=0.3)["info"]["qkv"]
    assert off["alpha"] in (0.0, 1.0) and off["loss_fixed"] > 0


@pytest.mark.parametrize("grid, bad", [([0, 0.5, 1.5], "1.5"), ([-0.1, 0.5], "-0.1"), ([], "empty")])
def test_bad_grid_is_refused_naming_the_value(grid, bad):
    with pytest.raises(ValueError, match=f"quant.smooth_grid.*{bad}" if bad != "empty" else "smooth_grid is empty"):
        check_grid(grid)


def test_search_stage_records_alphas_and_refuses_a_bad_grid_before_running(cli):
    cli(*TINY, "quant=w8a8", "pipeline.targets=[smooth]")
    d = next((cli.tmp / "cache" / "smooth").glob("[0-9a-f]*"))
    info = json.loads((d / "smooth.json").read_text())
    assert info["search"] is True and info["grid"] == [i / 10 for i in range(11)]
    assert sorted(info["per_layer"]) == ["0", "1"]                                # tiny-random: 2 layers
    for layer in info["per_layer"].values():
        for g in awq.GROUPS:
            assert layer[g]["alpha"] in info["grid"] and layer[g]["loss"] <= layer[g]["loss_fixed"]
    # refused while planning, before any stage runs: checked in-process (Hydra compose + the runner's checks)
    with pytest.raises(ValueError, match="quant.smooth_grid value 1.5"):
        compose(*TINY, "quant=w8a8", "quant.smooth_grid=[0,0.5,1.5]")
