"""The quantization method table (pipeline/methods): which method a quant config selects, the stages it
needs (the shape of the graph), and the config checks made while planning."""
from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from pipeline import methods, stages
from pipeline.schema import Config


def cfg(**quant):
    return OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.create({"quant": quant}))


PRESETS = {   # quant overrides -> (weight method, KV method, evaluate's / turbomind's inputs)
    "fp16": ({}, "fp16", "none", ["load"]),
    "kv8": ({"kv_bits": 8}, "fp16", "static", ["load", "kv_qparams"]),
    "kv4_dynamic": ({"kv_bits": 4, "kv_mode": "dynamic"}, "fp16", "dynamic", ["load"]),
    "w4a16_rtn": ({"w_bits": 4, "group_size": 64, "search": False, "clip": False}, "rtn", "none", ["load", "pack"]),
    "w4a16_kv8": ({"w_bits": 4, "group_size": 64, "kv_bits": 8}, "awq", "static", ["load", "pack", "kv_qparams"]),
    "w4a16_gptq": ({"w_bits": 4, "group_size": 64, "search": False, "clip": False, "gptq": True}, "gptq", "none",
                   ["load", "pack"]),
    "w4a16_awq_gptq": ({"w_bits": 4, "group_size": 64, "gptq": True}, "awq_gptq", "none", ["load", "pack"]),
    "w8a8_kv8": ({"w_bits": 8, "a_bits": 8, "kv_bits": 8}, "smoothquant", "static", ["load", "quant_w8"]),
    "w8a8_kv8_dynamic": ({"w_bits": 8, "a_bits": 8, "kv_bits": 8, "kv_mode": "dynamic"}, "smoothquant", "dynamic",
                         ["load", "quant_w8"]),
}


@pytest.mark.parametrize("name", PRESETS)
def test_a_config_selects_one_weight_and_one_kv_method_and_the_graph_follows(name):
    q, weight, kv, ups = PRESETS[name]
    m = methods.select(cfg(name=name, **q))
    assert (m.weight.name, m.kv.name, m.upstream()) == (weight, kv, ups)
    c = cfg(name=name, **q)
    assert stages.get("evaluate").inputs(c) == ups and stages.get("turbomind").inputs(c) == ups


def test_every_method_names_known_stages_and_has_one_row():
    for table in (methods.WEIGHT_METHODS, methods.KV_METHODS):
        for key, m in table.items():
            assert m.name == key
            assert set(m.stages) <= set(stages.STAGES), m.name
            assert getattr(m, "artifact", None) in (None, *m.stages)


def test_awq_needs_calibration_rtn_does_not():
    assert stages.get("awq").inputs(cfg(name="w4a16", w_bits=4, group_size=64)) == ["load", "calibrate"]
    assert stages.get("awq").inputs(cfg(name="rtn", w_bits=4, group_size=64, search=False, clip=False)) == ["load"]


def test_gptq_packs_its_codes_after_the_awq_stage_which_searches_only_for_awq_gptq():
    gq = cfg(name="gptq", w_bits=4, group_size=64, search=False, clip=False, gptq=True)
    assert stages.get("awq").inputs(gq) == ["load"]
    assert stages.get("gptq").inputs(gq) == ["load", "calibrate", "awq"]
    assert stages.get("pack").inputs(gq) == ["load", "awq", "gptq"]
    assert stages.get("awq").inputs(cfg(name="awq_gptq", w_bits=4, group_size=64, gptq=True)) == ["load", "calibrate"]
    assert stages.get("pack").inputs(cfg(name="w4a16", w_bits=4, group_size=64)) == ["load", "awq"]


@pytest.mark.parametrize("q,needle", [
    ({"w_bits": 4, "a_bits": 8}, "needs quant.w_bits=8 and quant.a_bits=8"),
    ({"w_bits": 8, "a_bits": 8, "smooth_alpha": 1.5}, "smooth_alpha=1.5"),
    ({"w_bits": 5}, "quant.w_bits=5"),
    ({"w_bits": 4, "group_size": 100}, "quant.group_size=100"),
    ({"kv_bits": 6}, "quant.kv_bits=6"),
    ({"w_bits": 4, "group_size": 64, "gptq": True, "gptq_block": 96}, "quant.gptq_block=96"),
    ({"w_bits": 4, "group_size": 64, "gptq": True, "gptq_damp": -0.1}, "quant.gptq_damp=-0.1"),
])
def test_bad_configs_are_refused_while_planning(q, needle):
    with pytest.raises(ValueError, match=needle.replace(".", r"\.").replace("(", r"\(")):
        methods.select(cfg(name="bad", **q))


def test_weights_without_a_kernel_are_evaluated_not_served():
    c = cfg(name="w3", w_bits=3, group_size=64)
    assert stages.get("evaluate").inputs(c) == ["load", "pack"]
    with pytest.raises(ValueError, match=r"\(w_bits=3, a_bits=None\): the serving engine"):
        stages.get("turbomind").inputs(c)


def test_a_method_stage_outside_the_selected_method_is_refused():
    with pytest.raises(ValueError, match="stage awq is not part of quant=fp16"):
        stages.get("awq").inputs(cfg(name="fp16"))
