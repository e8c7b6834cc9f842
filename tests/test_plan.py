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
PRESETS = sorted(p.stem for p in (CONF / "quant").glob("*.yaml") if p.stem in FLAT_PRESETS)
LATER_PRESETS = ["w4a16_awq_gptq", "w4a16_gptq"]   # added after 50f6d68: nothing of theirs to compare


def make(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def test_every_preset_is_covered():
    assert PRESETS == sorted(FLAT_PRESETS)
    assert sorted(p.stem for p in (CONF / "quant").glob("*.yaml")) == sorted(PRESETS + LATER_PRESETS)


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


# ---- the plan (pipeline.dry_run=true) and the cache command, on fake entries in a temp cache ----------------

import json  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

from pipeline import cachectl  # noqa: E402
from pipeline.cache import Cache, KeyLock, save_safetensors  # noqa: E402

TINY = ["model=tiny-random", "pipeline=evaluate", "quant=w4a16_kv8"]


def fake_entry(cache: Cache, stage: str, key: str, payload: bytes = b"x" * 100) -> Path:
    tmp = cache.new_tmp(stage, key)
    (tmp / "data.bin").write_bytes(payload)
    cache.commit(stage, key, tmp, {"version": 1, "config": {}, "summary": {}, "upstream": {}})
    return cache.path(stage, key)


@pytest.fixture
def planned(tmp_path):
    """A plan of tiny-random w4a16_kv8 with: load and calibrate cached, awq corrupt, pack missing, kv_qparams
    only a temp folder, evaluate cached."""
    cfg = make(*TINY, f"cache_dir={tmp_path / 'cache'}")
    steps = graph.plan(cfg)
    keys = {st.name: st.key for st in steps}
    cache = Cache(tmp_path / "cache")
    for name in ("load", "calibrate", "awq", "evaluate"):
        fake_entry(cache, name, keys[name])
    with open(cache.path("awq", keys["awq"]) / "data.bin", "r+b") as f:
        f.write(b"y")                                                    # same size, wrong checksum
    cache.new_tmp("kv_qparams", keys["kv_qparams"])
    return cfg, steps, keys, cache


def test_status_says_cached_or_why_not(planned):
    cfg, steps, keys, cache = planned
    st = {s.stage.name: s for s in graph.status(steps, cache)}
    assert [s.stage.name for s in graph.status(steps, cache)] == [x.name for x in steps]
    assert st["load"].cached and st["calibrate"].cached and st["evaluate"].cached
    assert st["awq"].why == "corrupt: data.bin fails its checksum"
    assert st["pack"].why == "no entry; upstream not cached: awq"
    assert st["kv_qparams"].why.startswith("incomplete: only a temp folder")


def test_dry_run_prints_the_plan_and_runs_nothing(planned, capsys):
    cfg, steps, keys, cache = planned
    before = sorted(p.relative_to(cache.root) for p in cache.root.rglob("*"))
    results = runner.show_plan(cfg)
    out = capsys.readouterr().out
    assert "6 stages, 3 cached, 3 to run" in out
    lines = [ln.split() for ln in out.splitlines() if ln.startswith("  ")]
    assert [ln[0] for ln in lines] == [s.name for s in steps] and [ln[1] for ln in lines] == [s.key for s in steps]
    assert f"pack        {keys['pack']}  runs: no entry; upstream not cached: awq" in out
    assert {r.name: r.status for r in results} == {"load": "cached", "calibrate": "cached", "awq": "planned",
                                                   "pack": "planned", "kv_qparams": "planned", "evaluate": "cached"}
    assert sorted(p.relative_to(cache.root) for p in cache.root.rglob("*")) == before


def test_dry_run_from_the_command_line_exits_0(tmp_path):
    p = subprocess.run([sys.executable, "-m", "pipeline.runner", *TINY, f"cache_dir={tmp_path / 'cache'}",
                        f"hydra.run.dir={tmp_path / 'run'}", "pipeline.dry_run=true"],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "6 stages, 0 cached, 6 to run" in p.stdout and "runs: no entry" in p.stdout
    assert not (tmp_path / "cache").exists()
    rep = json.loads((tmp_path / "run" / "report.json").read_text())
    assert rep["ok"] and rep["dry_run"] and {s["status"] for s in rep["stages"]} == {"planned"}


def ctl(*args: str) -> tuple[int, str]:
    said: list[str] = []
    rc = cachectl.main(list(args), say=said.append)
    return rc, "\n".join(said)


def test_ls_lists_entries_with_size_age_state_and_named(planned):
    cfg, steps, keys, cache = planned
    other = fake_entry(cache, "load", "0123456789abcdef")
    rc, out = ctl("ls", *TINY, f"cache_dir={cache.root}")
    assert rc == 0 and "5 entries" in out
    rows = {(ln.split()[0], ln.split()[1]): ln for ln in out.splitlines()[2:]}
    assert "complete" in rows["load", keys["load"]] and " yes " in rows["load", keys["load"]]
    assert " no " in rows["load", other.name]
    assert "corrupt: data.bin has" not in rows["awq", keys["awq"]]  # ls checks sizes unless --verify
    assert "fails its checksum" in ctl("ls", "--verify", *TINY, f"cache_dir={cache.root}")[1]
    assert "temp folder of an unfinished run" in out


def test_rm_one_key_or_a_whole_stage_and_never_a_locked_one(planned):
    cfg, steps, keys, cache = planned
    fake_entry(cache, "load", "0123456789abcdef")
    rc, out = ctl("rm", "load", "0123456789abcdef", f"cache_dir={cache.root}")
    assert rc == 0 and "removed load/0123456789abcdef" in out
    assert cache.path("load", keys["load"]).exists() and not cache.path("load", "0123456789abcdef").exists()
    lk = KeyLock(cache.lock_path("evaluate", keys["evaluate"]))
    assert lk.acquire(blocking=False)                                   # a live process (this one) computes it
    try:
        rc, out = ctl("rm", "evaluate", f"cache_dir={cache.root}")
        assert rc == 1 and f"locked by pid {os.getpid()}" in out and cache.path("evaluate", keys["evaluate"]).exists()
    finally:
        lk.release()
    rc, out = ctl("rm", "evaluate", f"cache_dir={cache.root}")
    assert rc == 0 and f"removed evaluate/{keys['evaluate']}" in out
    assert not list((cache.root / "evaluate").glob("[0-9a-f]*")) and not list((cache.root / "evaluate").glob(".trash-*"))


def test_gc_keeps_what_the_given_configs_name(planned):
    cfg, steps, keys, cache = planned
    stray = fake_entry(cache, "awq", "0123456789abcdef")
    gone_stage = fake_entry(cache, "old_stage", "fedcba9876543210")
    rc, out = ctl("gc", "--dry-run", *TINY, f"cache_dir={cache.root}")
    assert rc == 0 and "would remove awq/0123456789abcdef" in out and "would remove old_stage/" in out
    assert stray.exists()                                               # a dry run removes nothing
    rc, out = ctl("gc", *TINY, f"cache_dir={cache.root}")
    assert rc == 0 and not stray.exists() and not gone_stage.exists()
    assert all(cache.path(n, keys[n]).exists() for n in ("load", "calibrate", "awq", "evaluate"))
    # the temp folder is named by the config (kv_qparams' key): kept; fp16 alone names only load and evaluate
    rc, out = ctl("gc", "model=tiny-random", "pipeline=evaluate", "quant=fp16,kv8_dynamic", f"cache_dir={cache.root}")
    assert rc == 0 and cache.path("load", keys["load"]).exists() and not cache.path("awq", keys["awq"]).exists()
    assert not list((cache.root / "kv_qparams").glob(".tmp-*"))


def test_gc_never_removes_an_entry_being_computed(planned):
    cfg, steps, keys, cache = planned
    tmp = cache.new_tmp("awq", "0123456789abcdef")
    lk = KeyLock(cache.lock_path("awq", "0123456789abcdef"))
    assert lk.acquire(blocking=False)
    try:
        rc, out = ctl("gc", *TINY, f"cache_dir={cache.root}")
        assert rc == 1 and tmp.exists() and "kept awq/0123456789abcdef: locked by pid" in out
    finally:
        lk.release()


def test_save_safetensors_sorts_metadata_so_bytes_do_not_depend_on_order(tmp_path):
    import torch
    from safetensors import safe_open
    tensors = {"b": torch.ones(3), "a": torch.arange(5.0)}
    meta = {"format": "pt", "layout": "canonical-awq-gemm", "z": "1", "m": "é/\"x"}
    blobs = set()
    for i, order in enumerate([list(meta), sorted(meta), sorted(meta, reverse=True)] * 2):
        f = tmp_path / f"{i}.safetensors"
        save_safetensors(tensors, f, {k: meta[k] for k in order})
        blobs.add(f.read_bytes())
        with safe_open(str(f), "pt") as fh:
            assert fh.metadata() == meta and torch.equal(fh.get_tensor("a"), tensors["a"])
    assert len(blobs) == 1
    n = int.from_bytes(next(iter(blobs))[:8], "little")
    assert list(json.loads(next(iter(blobs))[8:8 + n])["__metadata__"]) == sorted(meta)


def test_save_safetensors_rewrites_a_header_that_grows(tmp_path, monkeypatch):
    import torch
    from safetensors import safe_open
    from pipeline import cache as cache_mod
    dumps = json.dumps
    monkeypatch.setattr(cache_mod.json, "dumps", lambda obj, **kw: dumps(obj, indent=2, ensure_ascii=False))
    save_safetensors({"a": torch.arange(7.0)}, tmp_path / "x.safetensors", {"z": "1", "a": "2"})
    with safe_open(str(tmp_path / "x.safetensors"), "pt") as fh:
        assert fh.metadata() == {"z": "1", "a": "2"} and torch.equal(fh.get_tensor("a"), torch.arange(7.0))
    assert not list(tmp_path.glob("*.sorting"))


def test_execute_returns_its_results_and_keeps_them_when_a_stage_fails(tmp_path):
    from types import SimpleNamespace
    cfg = make("model=tiny-random", f"cache_dir={tmp_path / 'cache'}", "device=cpu")
    cache = Cache(tmp_path / "cache")

    def stage(name, fail=False):
        def run(ctx):
            if fail:
                raise RuntimeError(f"{name} broke")
            (ctx.out / "x").write_text(name)
            return {"stage": name}
        return graph.PlannedStage(name, SimpleNamespace(READS=[], VERSION=1, run=run), f"{name}000000000000",
                                  [], {}, True)

    ok = graph.execute(cfg, [stage("a")], cache, tmp_path / "run")
    assert [(r.name, r.status) for r in ok] == [("a", "ran")] and not hasattr(graph.execute, "results")
    results: list = []
    with pytest.raises(RuntimeError, match="b broke"):
        graph.execute(cfg, [stage("a"), stage("b", fail=True)], cache, tmp_path / "run", results=results)
    assert [(r.name, r.status) for r in results] == [("a", "cached"), ("b", "failed")]
