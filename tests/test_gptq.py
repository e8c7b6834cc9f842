"""GPTQ (pipeline/quant/gptq.py, the gptq stage): error feedback beats round to nearest on correlated inputs, its
codes (act order, groups) are what the pack format reads back, and the runner builds and evaluates
quant=w4a16_gptq end to end; slow: the shipped GPTQ presets on SmolLM2, a shortened protocol, below round to
nearest on wikitext-2 and on Python source (the full protocol's figures: bench/quality.py)."""
import json
import math
import typing

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from pipeline.artifacts.packed_w4 import read_unpacked
from pipeline.quant import gptq, w4

from conftest import DOWNLOADS, compose
from test_quant_stages import TINY, run_stage, statuses


def correlated(T=1024, K=128, seed=0):
    """Inputs (T, K) with correlated channels and a few large ones, like a linear's real inputs."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, K, generator=g) @ (torch.randn(K, K, generator=g) / K ** 0.5)
    x = x + 0.3 * torch.randn(T, K, generator=g)
    x[:, :4] *= 8
    return x


def out_err(x, w, w_hat):
    return (x @ w.T - x @ w_hat.T).pow(2).mean().item()


def test_hessian_accumulated_in_batches_is_2_xtx_over_tokens():
    x = correlated(T=600, K=64)
    H, n = gptq.hessian_add(None, x[:100])
    H, n = gptq.hessian_add(H, x[100:].reshape(10, 50, 64), n)                # any leading shape
    assert n == 600
    torch.testing.assert_close(H, 2 * x.double().T @ x.double() / 600, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_output_error_is_well_below_round_to_nearest(act_order):
    x = correlated()
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(1)) * 0.02
    H, _ = gptq.hessian_add(None, x)
    q, s, z, info = gptq.quantize(w, H, 4, 64, act_order=act_order)
    rtn = out_err(x, w, w4.fake_quant(w, 4, 64))
    ours = out_err(x, w, w4.dequantize(q, s, z, 64))
    assert ours < 0.6 * rtn, (ours, rtn)
    assert info["loss"] < 0.6 * info["loss_rtn"]


@pytest.mark.parametrize("act_order,mse,group", [(False, False, 64), (True, False, 32), (True, True, 64),
                                                 (False, True, 32)])
def test_codes_are_what_the_pack_format_reads_back(act_order, mse, group):
    x = correlated(T=256)
    w = torch.randn(40, 128, generator=torch.Generator().manual_seed(2)) * 0.05     # N not a multiple of 8
    clip = torch.full((40, 128 // group, 2), 0.9)
    q, s, z, info = gptq.quantize(w, gptq.hessian_add(None, x)[0], 4, group, act_order=act_order, mse=mse,
                                  clip=clip)
    assert q.dtype == torch.uint8 and int(q.max()) <= 15 and s.shape == z.shape == (128 // group, 40)
    q2, s2, z2 = w4.unpack(*w4.pack(q, s, z, 4).values(), 4)
    assert torch.equal(q2, q) and torch.equal(s2, s) and torch.equal(z2, z)
    torch.testing.assert_close(w4.dequantize(q2, s2, z2, group), info["w_hat"], rtol=0, atol=1e-6)
    if act_order:   # static groups: each group's range comes from the original weights (the clip shrinks it)
        s0, z0 = w4.qparams(w, 4, group, True, clip)
        assert torch.equal(s, s0.T.half()) or mse


def test_feedback_moves_gptq_towards_round_to_nearest():
    """feedback 0 is round to nearest (same static groups), 1 is GPTQ; a damped update lies between."""
    x = correlated()
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(3)) * 0.02
    H, _ = gptq.hessian_add(None, x)
    loss = {}
    for fb in (0.0, 0.5, 1.0):
        q, s, z, info = gptq.quantize(w, H, 4, 64, act_order=True, feedback=fb)
        loss[fb] = info["loss"]
        if fb == 0:
            torch.testing.assert_close(info["w_hat"], w4.fake_quant(w, 4, 64), rtol=0, atol=1e-6)
    assert loss[1.0] < loss[0.5] < loss[0.0], loss


def test_a_block_is_quantized_in_place_and_x_becomes_its_quantized_output():
    from pipeline.models.llama import Block, ModelArgs, rope_cos_sin
    torch.manual_seed(0)
    args = ModelArgs(dim=64, n_layers=1, n_heads=4, n_kv_heads=2, head_dim=16, hidden_dim=128, vocab_size=32)
    block = Block(args).eval()
    w0 = {n: getattr(block, n).weight.detach().clone() for n in gptq.STACKS["qkv"] + ("down",)}
    x = torch.randn(3, 16, 64)
    cos, sin = rope_cos_sin(args, torch.arange(16))
    q = OmegaConf.create({"w_bits": 4, "group_size": 32, "zero_point": True, "gptq_damp": 0.01, "gptq_block": 64,
                          "gptq_desc_act": False, "gptq_mse": False, "gptq_feedback": 1.0})
    x_in = x.clone()
    r = gptq.quantize_block(block, x, cos, sin, 2, q)                          # batches of 2 and 1 sequences
    assert set(r["codes"]) == {"q", "k", "v", "o", "gate", "up", "down"}
    for n, (codes, scales, zeros) in r["codes"].items():
        torch.testing.assert_close(getattr(block, n).weight.data, w4.dequantize(codes, scales, zeros, 32))
    assert not torch.equal(block.down.weight.data, w0["down"])
    with torch.no_grad():
        torch.testing.assert_close(x, block(x_in, cos, sin), rtol=1e-4, atol=1e-5)


def test_bad_block_is_refused_naming_it():
    with pytest.raises(ValueError, match="GPTQ block 96 must be a multiple of group_size=64"):
        gptq.quantize(torch.randn(8, 128), torch.eye(128), group_size=64, block=96)


def test_runner_builds_and_evaluates_w4a16_gptq(cli):
    run = cli.tmp / "run"
    p = cli(*TINY, "quant=w4a16_gptq")
    assert statuses(run) == {s: "ran" for s in ("load", "calibrate", "awq", "gptq", "pack", "evaluate")}
    ppl = json.loads((run / "report.json").read_text())
    ev = next(s for s in ppl["stages"] if s["name"] == "evaluate")
    assert math.isfinite(ev["summary"]["ppl"]), p.stdout[-2000:]
    cache = cli.tmp / "cache"
    codes = load_file(str(next((cache / "gptq").glob("*/gptq.safetensors"))))
    pack = next((cache / "pack").glob("*/model.safetensors")).parent
    for lin in ("layers.0.q", "layers.1.down"):
        q, s, z = read_unpacked(pack, lin)
        assert torch.equal(q, codes[lin + ".codes"]) and torch.equal(s, codes[lin + ".scales"])
        assert torch.equal(z, codes[lin + ".zeros"])



@pytest.mark.slow
def test_smollm2_gptq_presets_beat_round_to_nearest_on_two_corpora(tmp_path, smollm2_gguf, wikitext):
    """The presets as shipped (only calibration and evaluation shortened): calibration 8 x 256 on wikitext-2 valid,
    evaluation 4 x 256 on wikitext-2 test and on CPython's typing.py (code: another domain). With 2,048 calibration
    tokens GPTQ fits them more than on the full protocol (32 x 512), where AWQ + GPTQ is also below AWQ on both
    corpora: here it is not, so only the relations to round to nearest are asserted."""
    corpora = {"wiki": str(wikitext["test"]), "code": typing.__file__}
    short = ["quant.calib.dataset=file", f"quant.calib.path={wikitext['valid']}", "quant.calib.samples=8",
             "quant.calib.seqlen=256", "quant.n_grid=5", "eval.windows=4", "eval.seqlen=256",
             f"download_dir={DOWNLOADS}", "pipeline=evaluate"]
    cfgs = {n: compose(f"quant={n}", *short) for n in ("w4a16_rtn", "w4a16", "w4a16_gptq", "w4a16_awq_gptq")}
    load, _ = run_stage("load", cfgs["w4a16"], {}, tmp_path)
    cal, _ = run_stage("calibrate", cfgs["w4a16"], {"load": load}, tmp_path)
    ppl = {}
    for name, c in cfgs.items():
        a, _ = run_stage("awq", c, {"load": load, "calibrate": cal}, tmp_path)
        ins = {"load": load, "awq": a}
        if c.quant.gptq:
            ins["gptq"], _ = run_stage("gptq", c, {"load": load, "calibrate": cal, "awq": a}, tmp_path)
        p, _ = run_stage("pack", c, ins, tmp_path)
        for corpus, path in corpora.items():
            c_eval = OmegaConf.merge(c, OmegaConf.create({"eval": {"path": path}}))
            ppl[name, corpus] = run_stage("evaluate", c_eval, {"load": load, "pack": p}, tmp_path)[1]["ppl"]
    print(ppl)
    assert ppl["w4a16_gptq", "wiki"] < ppl["w4a16_rtn", "wiki"] - 2, ppl
    for corpus in corpora:
        assert ppl["w4a16_gptq", corpus] < ppl["w4a16_rtn", corpus], ppl
        assert ppl["w4a16_awq_gptq", corpus] < ppl["w4a16_rtn", corpus] - 1, ppl
