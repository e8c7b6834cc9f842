"""Config composition, typed mode fields, the plan (dry run) and the cache command, all in-process.

Presets in conf/quant compose with Hydra defaults (base/*.yaml, calib/*.yaml): every preset must resolve
to the values its flat file had at 50f6d68, and every stage key must stay what it was for unchanged values.
"""
from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from pipeline import graph, runner  # noqa: F401 - runner registers the schema
from pipeline import stages as stage_table
from pipeline.schema import QuantConfig

CONF = Path(__file__).resolve().parents[1] / "conf"
GRID = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
CPU_CALIB = {"calib": {"samples": 32, "seqlen": 512}}
# The keys each flat preset file set at 50f6d68 (before they composed); everything else is the schema's default.
FLAT_PRESETS = {
    "fp16": {"name": "fp16"},
    "kv4": {"name": "kv4", "kv_bits": 4, "kv_mode": "static", **CPU_CALIB},
    "kv4_dynamic": {"name": "kv4_dynamic", "kv_bits": 4, "kv_mode": "dynamic"},
    "kv8": {"name": "kv8", "kv_bits": 8, "kv_mode": "static", **CPU_CALIB},
    "kv8_dynamic": {"name": "kv8_dynamic", "kv_bits": 8, "kv_mode": "dynamic"},
    "w4a16": {"name": "w4a16", "w_bits": 4, "group_size": 64, "zero_point": True, "search": True, "clip": True,
              "search_samples": 2, **CPU_CALIB},
    "w4a16_kv8": {"name": "w4a16_kv8", "w_bits": 4, "group_size": 64, "zero_point": True, "search": True,
                  "clip": True, "kv_bits": 8, "kv_mode": "static", "search_samples": 2, **CPU_CALIB},
    "w4a16_rtn": {"name": "w4a16_rtn", "w_bits": 4, "group_size": 64, "zero_point": True, "search": False,
                  "clip": False},
    "w8a8": {"name": "w8a8", "w_bits": 8, "a_bits": 8, "smooth_alpha": 0.5, "smooth_search": True,
             "smooth_grid": GRID, "search_samples": 2},
    "w8a8_kv8": {"name": "w8a8_kv8", "w_bits": 8, "a_bits": 8, "smooth_alpha": 0.5, "smooth_search": True,
                 "smooth_grid": GRID, "search_samples": 2, "kv_bits": 8, "kv_mode": "static"},
    "w8a8_nosmooth": {"name": "w8a8_nosmooth", "w_bits": 8, "a_bits": 8, "smooth_alpha": 0.0},
}
# Stage keys at 50f6d68 (default model, quant=<preset>, targets evaluate+turbomind+serve), with the VERSION and
# READS of every stage then: a stage whose chain changed VERSION or READS since is not compared.
KEYS_AT_50F6D68 = {
    'fp16': {'load': 'ad8fc91cd6f21003', 'evaluate': '22f21444b9d97f7b', 'turbomind': '1b01479003a812fc', 'serve': 'ddde3731f5287e7c'},
    'kv4': {'load': 'ad8fc91cd6f21003', 'calibrate': 'a60fd1c1702b65f9', 'kv_qparams': 'accebcec5778fbe3', 'evaluate': 'ca5d813ebd6728d2', 'turbomind': '593b53201d1bc495', 'serve': '83a29a0a78c6e3cb'},
    'kv4_dynamic': {'load': 'ad8fc91cd6f21003', 'evaluate': 'f3557723e020a0ab', 'turbomind': '265b33537544530f', 'serve': '3146331fe6b85e5d'},
    'kv8': {'load': 'ad8fc91cd6f21003', 'calibrate': 'a60fd1c1702b65f9', 'kv_qparams': 'accebcec5778fbe3', 'evaluate': 'f07e7634335394e0', 'turbomind': '08a55ea223e8d392', 'serve': 'bce6e4b2257f7e06'},
    'kv8_dynamic': {'load': 'ad8fc91cd6f21003', 'evaluate': '2d87f991bbc85fc3', 'turbomind': '2e8b5aabc8a45d12', 'serve': '4069cd6a74c45c0e'},
    'w4a16': {'load': 'ad8fc91cd6f21003', 'calibrate': 'a60fd1c1702b65f9', 'awq': 'fcba145f3c23ccee', 'pack': 'e0bdb21b19b8a7ed', 'evaluate': '1078c741359764ec', 'turbomind': '9156f3ee9a6df73e', 'serve': 'c97df446ce96b87c'},
    'w4a16_kv8': {'load': 'ad8fc91cd6f21003', 'calibrate': 'a60fd1c1702b65f9', 'awq': 'fcba145f3c23ccee', 'pack': 'e0bdb21b19b8a7ed', 'kv_qparams': 'accebcec5778fbe3', 'evaluate': '6fc6403399cdaf40', 'turbomind': '32f6571679d7e40d', 'serve': 'c407c72ea9e50010'},
    'w4a16_rtn': {'load': 'ad8fc91cd6f21003', 'awq': '517bddebacba420f', 'pack': '50731d46e3863e21', 'evaluate': '9fd7c85316142a75', 'turbomind': '840b841a0ad5ce48', 'serve': '4d0585b2d083cc1b'},
    'w8a8': {'load': 'ad8fc91cd6f21003', 'calibrate': 'acdff7e155fa5d32', 'smooth': 'e41d83ca155c4a49', 'quant_w8': '5aa69074c5f02a67', 'evaluate': 'ad2a296b3f4ba633', 'turbomind': 'a07d8aba6522a248', 'serve': '5a461c086148751c'},
    'w8a8_kv8': {'load': 'ad8fc91cd6f21003', 'calibrate': 'acdff7e155fa5d32', 'smooth': 'e41d83ca155c4a49', 'quant_w8': '5aa69074c5f02a67', 'evaluate': 'd3005b12d5c1404b', 'turbomind': 'ed6b11fe75044fa5', 'serve': 'fc5715dc5d2f5a74'},
    'w8a8_nosmooth': {'load': 'ad8fc91cd6f21003', 'calibrate': 'acdff7e155fa5d32', 'smooth': '22ef4b060b1d7faf', 'quant_w8': '309347326f1243bf', 'evaluate': '8bab990fcc9d3de1', 'turbomind': '30509e2476161786', 'serve': '325bf2bc14e3aa9f'},
}
STAGES_AT_50F6D68 = {  # name: (VERSION, READS)
    "load": (1, ["model"]), "calibrate": (1, ["quant.calib"]), "kv_qparams": (1, ["quant.num_tp"]),
    "awq": (2, ["quant.w_bits", "quant.group_size", "quant.zero_point", "quant.search", "quant.n_grid", "quant.clip",
                "quant.search_samples"]),
    "pack": (1, ["quant.w_bits", "quant.group_size", "quant.zero_point"]),
    "smooth": (2, ["quant.smooth_alpha", "quant.smooth_search", "quant.smooth_grid", "quant.search_samples"]),
    "quant_w8": (1, ["quant.w_bits", "quant.a_bits"]), "turbomind": (1, ["quant", "serve.tp", "model.name"]),
    "evaluate": (1, ["eval", "quant"]), "serve": (1, ["serve", "model.name"]),
}
PRESETS = sorted(p.stem for p in (CONF / "quant").glob("*.yaml"))


def make(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def test_every_preset_is_covered():
    assert PRESETS == sorted(FLAT_PRESETS)


@pytest.mark.parametrize("preset", PRESETS)
def test_composed_preset_resolves_to_the_flat_files_values(preset):
    composed = OmegaConf.to_container(make(f"quant={preset}").quant, resolve=True)
    flat = OmegaConf.to_container(OmegaConf.merge(OmegaConf.structured(QuantConfig), FLAT_PRESETS[preset]),
                                  resolve=True)
    assert composed == flat


def unchanged_chain(steps) -> set:
    """Names of planned stages whose VERSION and READS, and those of all their upstream, are as at 50f6d68."""
    ok: set = set()
    for st in steps:  # topological order
        mod = stage_table.get(st.name)
        if (STAGES_AT_50F6D68.get(st.name) == (mod.VERSION, list(mod.READS))
                and all(u in ok for u in st.upstream)):
            ok.add(st.name)
    return ok


@pytest.mark.parametrize("preset", PRESETS)
def test_stage_keys_unchanged_for_unchanged_values(preset):
    steps = graph.plan(make(f"quant={preset}", "pipeline.targets=[evaluate,turbomind,serve]"))
    same = unchanged_chain(steps)
    keys = {st.name: st.key for st in steps if st.name in same}
    expected = {n: k for n, k in KEYS_AT_50F6D68[preset].items() if n in same}
    assert keys == expected


@pytest.mark.parametrize("override,allowed", [
    ("serve.mode=apii", "[generate, chat, api]"),
    ("quant.kv_mode=dinamic", "[static, dynamic]"),
    ("eval.dtype=fp8", "[auto, float32, float16, bfloat16]"),
    ("verify=sha", "[full, size]"),
    ("quant.calib.dataset=c5", "[embedded, file, c4, wikitext2, ptb, pileval]"),
])
def test_wrong_mode_value_fails_at_compose_naming_the_allowed_values(override, allowed):
    with pytest.raises(Exception) as err:
        make(override)
    chain, e = [], err.value
    while e is not None:
        chain.append(str(e))
        e = e.__cause__
    text = "\n".join(chain)
    key, value = override.split("=")
    assert f"Invalid value '{value}', expected one of {allowed}" in text and f"full_key: {key}" in text


def test_mode_overrides_still_work_and_compare_as_strings():
    cfg = make("serve.mode=api", "quant=kv8_dynamic", "eval.dtype=float16", "verify=size")
    assert cfg.serve.mode == "api" and cfg.quant.kv_mode == "dynamic" and cfg.eval.dtype == "float16"
    assert cfg.verify == "size" and f"{cfg.serve.mode}" == "api"
    assert make("serve=chat").serve.mode == "chat"


def test_calib_dataset_enum_matches_the_calibration_sources():
    from pipeline.quant.calib_data import SOURCES
    from pipeline.schema import CalibDataset
    assert [d.value for d in CalibDataset] == list(SOURCES)


@pytest.mark.parametrize("key", ["quant.num_tp", "quant.extra"])
def test_dead_keys_are_gone(key):
    with pytest.raises(Exception, match=f"Could not override '{key}'"):
        make(f"{key}=1")
